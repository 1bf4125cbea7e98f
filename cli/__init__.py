"""The `compress` command line."""
