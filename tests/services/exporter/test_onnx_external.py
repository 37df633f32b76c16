"""External data: weights streamed to model.onnx.data beside model.onnx in a directory, as the same
graph computes from a single file; a model over protobuf's 2 GiB exports and runs (slow)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from services.exporter.base import ExportInput, ExportOptions
from services.exporter.formats.onnx import MEDIA_TYPE_DIRECTORY, OnnxExporter
from services.exporter.formats.onnx_builder import ALIGNMENT_BYTES
from services.exporter.runtimes import OnnxRuntime
from shared.models.bundle import ModelDir
from test_onnx_export import SHA, TOKENS

ROOT = Path(__file__).resolve().parents[3]


def test_external_data_directory_computes_what_one_file_does(tiny_model_dir, tmp_path):
    model = ModelDir(tiny_model_dir)
    single = OnnxExporter().export(ExportInput(model, SHA), tmp_path / "single.onnx")
    source = ExportInput(model, SHA, options=ExportOptions(external_data=True))
    split = OnnxExporter().export(source, tmp_path / "split.onnx")
    assert split.path.is_dir() and sorted(p.name for p in split.path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert split.media_type == MEDIA_TYPE_DIRECTORY and split.provenance["external_data"] is True
    graph = onnx.load(str(split.path / "model.onnx"), load_external_data=False).graph
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    offsets = [int(next(e.value for e in t.external_data if e.key == "offset")) for t in external]
    assert len(external) >= 2 * 7 + 1 and all(offset % ALIGNMENT_BYTES == 0 for offset in offsets)
    assert (split.path / "model.onnx").stat().st_size < 200_000            # the graph alone
    assert (split.path / "model.onnx.data").stat().st_size > 0.95 * single.path.stat().st_size
    expected = OnnxRuntime(single.path, 1).logits(TOKENS)
    assert np.array_equal(OnnxRuntime(split.path, 1).logits(TOKENS), expected)
    assert OnnxExporter().read_back(split, source)["initializer_bytes"]["float"] > 12_000_000


def test_a_placeholder_file_at_the_output_path_becomes_the_directory(tiny_model_dir, tmp_path):
    (tmp_path / "m.onnx").touch()
    source = ExportInput(ModelDir(tiny_model_dir), SHA, options=ExportOptions(external_data=True))
    assert OnnxExporter().export(source, tmp_path / "m.onnx").path.is_dir()


PEAK_RSS = """
def peak_rss_bytes():          # VmHWM: this process's own peak (ru_maxrss carries the parent's across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
"""
BIG = PEAK_RSS + """
import json, sys, time
from pathlib import Path
from services.exporter.base import ExportInput
from services.exporter.formats.onnx import OnnxExporter
from shared.models.bundle import ModelDir
start = time.perf_counter()
exported = OnnxExporter().export(ExportInput(ModelDir(Path(sys.argv[1])), "0" * 64), Path(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - start, "path": str(exported.path),
                  "peak_rss_bytes": peak_rss_bytes()}))
"""
RUN = PEAK_RSS + """
import json, sys, time
import numpy as np
from services.exporter.runtimes import OnnxRuntime
start = time.perf_counter()
runtime = OnnxRuntime(sys.argv[1], 1)
logits = runtime.logits([1, 2, 3, 4])
print(json.dumps({"seconds": time.perf_counter() - start, "finite": bool(np.isfinite(logits).all()),
                  "shape": list(logits.shape), "peak_rss_bytes": peak_rss_bytes()}))
"""


def write_big_llama(directory: Path) -> int:
    """A llama with random weights of over 2 GiB: 2 layers of width 2048, a 160k vocabulary, untied
    head (2 × 1.25 GiB of embeddings). Returns the float32 bytes."""
    from shared.models.decoder_config import DecoderConfig
    from shared.tensors.safetensors_writer import write_safetensors
    directory.mkdir()
    config = DecoderConfig(vocab_size=160_000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                           num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)
    (directory / "config.json").write_text(json.dumps(config.to_hf()))
    shapes = config.tensor_shapes()
    rng = np.random.default_rng(0)

    def chunks(shape):                                    # 64k rows at a time: never one whole 1.25 GiB table
        for start in range(0, shape[0], 65536):
            rows = min(65536, shape[0] - start)
            yield rng.standard_normal((rows,) + shape[1:], dtype=np.float32) * np.float32(0.02)
    tensors = ((name, np.ones(shape, np.float32) if len(shape) == 1 else chunks(shape))
               for name, shape in shapes.items())
    write_safetensors(directory / "model.safetensors", {n: (s, "F32") for n, s in shapes.items()}, tensors)
    return 4 * config.parameter_count()


@pytest.mark.slow
def test_a_model_over_2_gib_exports_to_external_data_and_runs(tmp_path):
    size = write_big_llama(tmp_path / "big")
    assert size > 2 << 30
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    export = json.loads(subprocess.run([sys.executable, "-c", BIG, str(tmp_path / "big"), str(tmp_path / "big.onnx")],
                                       check=True, capture_output=True, text=True, env=env, cwd=ROOT).stdout)
    directory = Path(export["path"])
    data_bytes = (directory / "model.onnx.data").stat().st_size
    assert directory.is_dir() and data_bytes > 2 << 30
    loaded = json.loads(subprocess.run([sys.executable, "-c", RUN, str(directory)], check=True, capture_output=True,
                                       text=True, env=env, cwd=ROOT).stdout)
    print(f"\n{size / 2**30:.2f} GiB float32 model: export {export['seconds']:.0f} s, peak RSS "
          f"{export['peak_rss_bytes'] / 2**30:.2f} GiB; onnxruntime load+run {loaded['seconds']:.0f} s, peak RSS "
          f"{loaded['peak_rss_bytes'] / 2**30:.2f} GiB; data file {data_bytes / 2**30:.2f} GiB")
    assert loaded["finite"] and loaded["shape"] == [4, 160_000]
    assert export["peak_rss_bytes"] < 0.75 * size        # streamed: about the largest tensor, not the model
