"""Pruning: keep-masks (magnitude, N:M), SparseGPT and Wanda one-shot pruning, structured removal of
neurons/heads/channels, and honest sparse storage accounting."""
