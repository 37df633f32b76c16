"""The compressor service: model import and weight quantization."""
