"""What every edgeforge service uses: errors, artifact storage, tensor I/O, model families, servers."""
