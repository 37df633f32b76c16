"""edgeforge clients: the Python SDK, the `edgeforge` CLI and the device agent."""
