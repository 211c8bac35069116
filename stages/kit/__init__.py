"""Tools stage modules build with: shared calls across messages, sandboxed worker processes."""
