"""Quantization kernels: grids, round-to-nearest, llama.cpp block rules, slow reference twins."""
