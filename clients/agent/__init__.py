"""edgeforge-agent: runs on a device, connects out to the coordinator, measures artifacts, reports."""
