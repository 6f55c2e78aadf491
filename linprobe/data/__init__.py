"""Data in: every split and batch normalised once at the boundary (inputs), and the bundled datasets."""
