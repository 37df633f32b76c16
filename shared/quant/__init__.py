"""Quantization vocabulary shared by the compressor and the exporters: grids, recipes, quantized tensors and their packed storage."""
