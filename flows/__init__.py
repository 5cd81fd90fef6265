"""The Prefect flows, each a table of contents of its tasks; `flows/cli/` is the `tnflow` command."""
