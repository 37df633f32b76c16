"""Model families edgeforge understands, their configs, bundles and float32 reference forwards."""
