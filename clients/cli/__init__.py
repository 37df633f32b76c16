"""The `edgeforge` command line."""
