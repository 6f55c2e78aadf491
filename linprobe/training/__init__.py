"""Probing during training: live probes, the Monitor, checkpoint sweeps and framework integrations."""
