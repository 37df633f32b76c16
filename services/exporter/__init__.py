"""The exporter service: deployable files (GGUF, ONNX) and their validation in each runtime."""
