"""Streaming tensor file I/O (safetensors writer; GGUF reading lives with the importer)."""
