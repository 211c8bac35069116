"""The `sluice` command line: CLI, HTTP client, ingest, supervisor."""
