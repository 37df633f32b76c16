"""Fuzz target: edgeforge's own GGUF parser (shared/models/gguf_reader.py) and the metadata ->
DecoderConfig step of the importer (shared/models/gguf_import.read_config).

Run: python -m tests.fuzz.fuzz_gguf [libFuzzer flags] CORPUS_DIR…
"""
from __future__ import annotations

import atheris

import gguf  # noqa: F401  heavy dependencies are imported uninstrumented first
import numpy  # noqa: F401

with atheris.instrument_imports(include=["shared.untrusted", "shared.models.gguf_reader", "shared.models.gguf_import", "shared.models.decoder_config"]):
    from shared.models import gguf_import, gguf_reader


def check(data: bytes) -> None:
    reader = gguf_reader.parse_gguf(data, "fuzz.gguf")
    for info in reader.tensors.values():
        rows = gguf_reader.tensor_rows(info, data[info.offset:info.offset + info.nbytes], "fuzz.gguf")
        assert rows.size == info.nbytes
    config = gguf_import.read_config(reader)
    gguf_import.hf_to_gguf_names(config)


if __name__ == "__main__":
    from tests.fuzz.harness import main
    main(check)
