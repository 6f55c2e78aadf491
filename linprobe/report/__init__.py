"""Report: results, figures, diagnostics in words and the self-contained HTML page of a run."""
