"""The edgeforge Python SDK."""
