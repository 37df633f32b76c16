"""Shared fixtures: the real assets prepared by `make setup`, and loopback servers on port 0."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The generated edgeforge.v1 code: gen/ (make gen), or Bazel's own where EDGEFORGE_PROTO_PATH says (bazel/).
GENERATED = Path(os.environ.get("EDGEFORGE_PROTO_PATH") or ROOT / "gen")
for path in (ROOT, GENERATED):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

ASSETS = ROOT / ".edgeforge-assets"
# Real PostgreSQL and S3 (weed mini) servers, started once per session when a test asks for them, and the
# `database` fixture that runs a suite on SQLite and on PostgreSQL (docs/DEPLOY.md).
pytest_plugins = ["tests.backends.postgres", "tests.backends.s3", "tests.backends.database"]


@pytest.fixture(scope="session")
def assets() -> Path:
    """The prepared real model and text (make setup runs `python -m shared.assets prepare`)."""
    if not (ASSETS / "models" / "smollm2-fp32" / "model.safetensors").is_file():
        from shared.assets import prepare
        prepare(ASSETS)
    return ASSETS


@pytest.fixture(scope="session")
def smollm2_dir(assets) -> Path:
    return assets / "models" / "smollm2-fp32"


@pytest.fixture(scope="session")
def gemma3_dir(assets) -> Path:
    """Gemma 3 270M as a float32 directory: gemma3 architecture, its SentencePiece vocabulary carried
    as tokenizer.gguf (prepared beside SmolLM2; the source GGUF lies at gemma3_gguf)."""
    from shared.assets import prepare_gemma3
    return prepare_gemma3(assets)


@pytest.fixture(scope="session")
def gemma3_gguf(gemma3_dir) -> Path:
    """The Q4_K_M GGUF the gemma3 directory was imported from (written by llama.cpp's tools)."""
    from shared.assets import gemma3_gguf as assemble
    return assemble(gemma3_dir.parent)


@pytest.fixture(scope="session")
def random_decoder(tmp_path_factory):
    """A factory: random_decoder(config, tokenizer_dir, seed) -> a model directory with `config` (any
    architecture), random weights and the tokenizer files of `tokenizer_dir`. Norm weights vary around
    their identity (1, or 0 for gemma3's 1 + weight) and qwen2 gets non-zero biases, so every term of
    the forward pass matters. Synthetic weights exercise the machinery only, never quality claims."""
    import json
    import shutil

    import numpy as np

    from shared.tensors.safetensors_writer import write_safetensors

    def make(config, tokenizer_dir: Path, seed: int = 0) -> Path:
        directory = tmp_path_factory.mktemp(f"random-{config.architecture}") / "model"
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config.to_hf()))
        rng = np.random.default_rng(seed)
        shapes = config.tensor_shapes()

        def value(name, shape):
            if name.endswith("norm.weight"):          # around the identity: 1, or 0 for gemma3's 1 + weight
                return (1.0 - config.norm_offset) + rng.normal(0, 0.1, shape)
            return rng.normal(0, 0.1 if name.endswith(".bias") else 0.05, shape)
        tensors = ((name, value(name, shape).astype(np.float32)) for name, shape in shapes.items())
        write_safetensors(directory / "model.safetensors", {n: (s, "F32") for n, s in shapes.items()}, tensors)
        for name in ("tokenizer.json", "tokenizer.gguf", "tokenizer_config.json"):
            if (tokenizer_dir / name).is_file():
                shutil.copy(tokenizer_dir / name, directory / name)
        return directory
    return make


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A tiny llama with random weights and SmolLM2's real tokenizer: every code path of a build runs in
    seconds. Synthetic weights are for exercising the machinery only, never for quality claims."""
    import json
    import shutil

    import numpy as np

    from shared.models.decoder_config import DecoderConfig
    from shared.tensors.safetensors_writer import write_safetensors
    directory = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    directory.mkdir()
    config = DecoderConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, rope_theta=10000.0,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    rng = np.random.default_rng(0)
    shapes = config.tensor_shapes()
    tensors = ((name, (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.05, shape)).astype(np.float32))
               for name, shape in shapes.items())
    write_safetensors(directory / "model.safetensors", {n: (s, "F32") for n, s in shapes.items()}, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, directory / name)
    return directory


@pytest.fixture(scope="session")
def small_cnn(tmp_path_factory):
    """(module directory, {"calibration"|"training"|"evaluation": .npz}) of a small SmallCNN trained for
    150 steps on 3,000 real Fashion-MNIST images (seconds): real data, a real if modest classifier."""
    import torch

    from services.compressor.train.loop import TrainingConfig, train
    from shared.models import modules
    from shared.models.cnn import NORMALISATION, SmallCNN, load_fashion_mnist
    from shared.models.module_data import save_images
    root = tmp_path_factory.mktemp("small-cnn")
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    files = {"calibration": root / "calibration.npz", "training": root / "training.npz",
             "evaluation": root / "evaluation.npz"}
    save_images(files["calibration"], images[:256], labels[:256])
    save_images(files["training"], images[256:3256], labels[256:3256])
    save_images(files["evaluation"], test_images[:500], test_labels[:500])
    torch.manual_seed(0)
    model = SmallCNN(channels=(8, 16), hidden=32)
    mean, std = NORMALISATION["fashion-mnist"]
    x = (torch.as_tensor(images[256:3256], dtype=torch.float32)[:, None] / 255 - mean) / std
    train(model, (x, torch.as_tensor(labels[256:3256], dtype=torch.int64)),
          lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]),
          TrainingConfig(steps=150, batch_size=64, learning_rate=3e-3), device="cpu")
    directory = modules.write_module_dir(
        model.eval(), root / "small-cnn", architecture="small_cnn", task=modules.IMAGE_TASK,
        input={"image": {"channels": 1, "size": 28, "mean": [mean], "std": [std]}, "names": ["images"]},
        source={"format": "test fixture", "dataset": "fashion-mnist", "train_images": 3000}, check=True)
    return directory.path, files


@pytest.fixture
def json_logs():
    """Every log record of this process as JSON lines (DEBUG and up) in a buffer; the root logger's
    handlers and level come back afterwards."""
    import io
    import logging

    from shared import logs
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    stream = io.StringIO()
    logs.configure("json", "debug", service="coordinator", stream=stream)
    yield stream
    logging.captureWarnings(False)
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.fixture(autouse=True)
def _log_context():
    """Each test starts and ends with the log context fields it found (shared/logs.py). In the services a
    call binds its device or build in a context the RPC interceptor or the build's own thread restores;
    a test calling the scheduler directly would otherwise leave "device" on every later test's log lines."""
    from shared import logs
    saved = logs.current()
    yield
    logs.restore(saved)
