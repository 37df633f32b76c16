"""edgeforge services: coordinator, calibrator, compressor, exporter."""
