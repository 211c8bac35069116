"""The stage runtime: the only consumer code that talks to the broker."""
