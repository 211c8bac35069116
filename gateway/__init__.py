"""The HTTP upload gateway and the `sluice` command line."""
