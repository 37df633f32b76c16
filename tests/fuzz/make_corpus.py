"""Writes the seed corpora under tests/fuzz/corpus/<target>/: small valid files built with the real
writers (edgeforge's safetensors writer and a calibration statistics file; gguf-py's GGUFWriter for
a tiny llama with a vocabulary; the docs/examples specs with their paths pointed at the fuzz
harness's stand-in files). Deterministic: rerunning rewrites the same bytes.

Run: python -m tests.fuzz.make_corpus
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"


def safetensors_seeds(out: Path) -> None:
    from services.calibrator.stats_file import METADATA_KEY
    from shared.tensors.safetensors_writer import write_safetensors
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "x.safetensors"
        write_safetensors(path, {"w": ((2, 3), "F32"), "b": ((3,), "F16"), "i": ((4,), "I8")},
                          [("w", np.arange(6, dtype=np.float32).reshape(2, 3)), ("b", np.ones(3, np.float16)),
                           ("i", np.arange(4, dtype=np.int8))], metadata={"format": "pt"})
        (out / "tensors.safetensors").write_bytes(path.read_bytes())
        meta = {"version": 2, "model": "m", "dataset": "d", "samples": 1, "sequence_length": 8, "tokens": 8,
                "sites": {"x": {"weights": ["x.weight"], "in_features": 2, "hessian": True}}}
        arrays = {"x.abs_max": np.ones(2, np.float32), "x.mean_abs": np.ones(2, np.float32),
                  "x.sq_mean": np.ones(2, np.float32), "x.range": np.arange(5, dtype=np.float32),
                  "x.hessian": np.eye(2, dtype=np.float32)}
        write_safetensors(path, {k: (v.shape, "F32") for k, v in arrays.items()}, arrays.items(),
                          metadata={METADATA_KEY: json.dumps(meta)})
        (out / "stats.safetensors").write_bytes(path.read_bytes())
    (out / "empty.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")


def gguf_seeds(out: Path) -> None:
    import gguf
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "tiny.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        hidden, heads, vocab = 32, 2, 4
        writer.add_block_count(1)
        writer.add_context_length(64)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(64)
        writer.add_head_count(heads)
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(["a", "b", "c", "d"])
        writer.add_token_types([1, 1, 1, 1])
        writer.add_bos_token_id(0)
        writer.add_tensor("token_embd.weight", np.zeros((vocab, hidden), np.float32))
        writer.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(np.ones((hidden, hidden), np.float32),
                                                                      gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor("output_norm.weight", np.ones(hidden, np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (out / "tiny-llama.gguf").write_bytes(path.read_bytes())


def spec_seeds(out: Path) -> None:
    """docs/examples/*.yaml with model/file paths renamed to the harness's stand-ins (fuzz_spec.FILES)."""
    names = {"path": "model.gguf", "calibration": "calibration.txt", "evaluation": "evaluation.txt",
             "training": "training.txt"}
    for example in sorted((ROOT / "docs" / "examples").glob("*.yaml")):
        text = example.read_text()
        text = re.sub(r"(model: \{?\s*path: )[^,}\n]+", rf"\g<1>{names['path']}", text)
        for section in ("calibration", "evaluation", "training"):
            text = re.sub(rf"({section}: \{{?\s*(?:text_)?file: )[^,}}\n]+", rf"\g<1>{names[section]}", text)
        (out / example.name).write_text(text)


def main() -> None:
    for target, build in (("safetensors", safetensors_seeds), ("gguf", gguf_seeds), ("spec", spec_seeds)):
        (CORPUS / target).mkdir(parents=True, exist_ok=True)
        build(CORPUS / target)


if __name__ == "__main__":
    main()
