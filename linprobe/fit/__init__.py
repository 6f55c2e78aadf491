"""Fit: the probes, the batched solvers behind them, label sets, and what a fitted probe scores."""
