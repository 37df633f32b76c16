"""Writes the ARM test's model: a tiny llama (width 64, 2 layers) with random weights and SmolLM2's
real tokenizer, the same shape as the `tiny_model_dir` fixture in tests/conftest.py.

    .venv/bin/python tests/arm/tiny_llama.py OUT_DIR [--tokenizer-from .edgeforge-assets/models/smollm2-fp32]

Under qemu-user every runtime is 10-300x slower than native; a model this small keeps each
measurement to seconds. The weights are synthetic: the build proves the machinery, not quality.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))                     # shared.* without installing the repository

from shared.models.decoder_config import DecoderConfig  # noqa: E402
from shared.tensors.safetensors_writer import write_safetensors  # noqa: E402

CONFIG = DecoderConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                       max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def write_tiny_llama(out_dir: Path, tokenizer_dir: Path) -> None:
    """config.json, model.safetensors (float32; norms 1, other weights N(0, 0.05)), and the tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(CONFIG.to_hf()))
    rng = np.random.default_rng(0)                     # the same weights on every run: same digest
    shapes = CONFIG.tensor_shapes()
    tensors = ((name, (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32))
               for name, shape in shapes.items())
    write_safetensors(out_dir / "model.safetensors", {n: (s, "F32") for n, s in shapes.items()}, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out_dir / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer-from", type=Path, default=REPO_ROOT / ".edgeforge-assets/models/smollm2-fp32")
    args = parser.parse_args()
    if not (args.tokenizer_from / "tokenizer.json").is_file():
        sys.exit(f"tiny_llama: no tokenizer.json in {args.tokenizer_from} (run make setup)")
    write_tiny_llama(args.out_dir, args.tokenizer_from)


if __name__ == "__main__":
    main()
