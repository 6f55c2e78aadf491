"""Capture: which layers (taps), what is kept of them (reduce), one forward per batch into the cache."""
