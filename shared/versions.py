"""Versions of edgeforge and the libraries that shape an artifact (recorded in its lineage)."""
from __future__ import annotations

import functools
from importlib import metadata

EDGEFORGE_VERSION = "0.1.0"
_LIBRARIES = ("numpy", "torch", "safetensors", "gguf", "onnx", "onnxruntime", "llama_cpp_python", "tokenizers")


@functools.cache
def tool_versions(*libraries: str) -> dict[str, str]:
    """{"edgeforge": ..., library: version} for the named libraries (all known ones when none given)."""
    out = {"edgeforge": EDGEFORGE_VERSION}
    for name in libraries or _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
