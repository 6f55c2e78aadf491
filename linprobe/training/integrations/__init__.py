"""Optional bridges to other tools; each module names the package it needs when that is missing."""
