"""The built-in stage modules: each a `STAGE` declaration and its pure handler."""
