"""linprobe benchmarks: each contender in the same process on the same data; ratios, not absolute times."""
