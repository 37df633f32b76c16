"""GGUF export of the real SmolLM2: loads and generates in llama.cpp, matches the torch reference in
float32, and our Q8_0/Q4_0 blocks are bit-identical to llama.cpp's own quantizer on the same F16 file."""
from __future__ import annotations

import numpy as np
import pytest

from services.compressor.compress import compress
from services.exporter.base import ExportInput, ExportOptions
from services.exporter.formats.gguf import GgufExporter
from services.exporter.quality import VALIDATION_PROMPTS
from services.exporter.runtimes import LlamaCppRuntime, ReferenceRuntime
from shared.models.bundle import ModelDir
from shared.models.gguf_import import import_gguf
from shared.models.tokenizer import TextTokenizer
from shared.quant.compressed import CompressedModel
from shared.quant.grids import Method, QuantizationConfig

SHA = "0" * 64


@pytest.fixture(scope="module")
def model(smollm2_dir) -> ModelDir:
    return ModelDir(smollm2_dir)


@pytest.fixture(scope="module")
def f16_gguf(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "smollm2-f16.gguf"
    GgufExporter().export(ExportInput(model, SHA, options=ExportOptions(float_type="f16")), path)
    return path


def test_float32_gguf_matches_the_torch_reference(model, tmp_path):
    path = tmp_path / "f32.gguf"
    GgufExporter().export(ExportInput(model, SHA, options=ExportOptions(float_type="f32")), path)
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    tokens = [tokenizer.bos_id] + tokenizer.encode(VALIDATION_PROMPTS[2])
    expected = ReferenceRuntime(model.path).logits(tokens)
    runtime = LlamaCppRuntime(path, 128)
    actual = runtime.logits(tokens)
    runtime.close()
    assert np.abs(actual - expected).max() < 2e-2          # float32 on both sides; summation order differs
    assert (actual.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.parametrize("gguf_type,ftype", [("q8_0", 7), ("q4_0", 2)])
def test_blocks_are_bit_identical_to_llama_cpp(f16_gguf, gguf_type, ftype, tmp_path):
    import gguf
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 2
    theirs = tmp_path / f"llama-cpp-{gguf_type}.gguf"
    assert llama_cpp.llama_model_quantize(str(f16_gguf).encode(), str(theirs).encode(), params) == 0

    import_gguf(f16_gguf, tmp_path / "from-f16")                 # F16 -> float32 is exact
    source = ModelDir(tmp_path / "from-f16")
    compress(source, SHA, QuantizationConfig(Method.RTN, gguf_type=gguf_type), tmp_path / "c.safetensors")
    ours = tmp_path / f"ours-{gguf_type}.gguf"
    GgufExporter().export(ExportInput(source, SHA, CompressedModel(tmp_path / "c.safetensors")), ours)

    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert a.keys() == b.keys()
    different = [n for n in a if a[n].tensor_type != b[n].tensor_type or not np.array_equal(a[n].data, b[n].data)]
    assert different == [], f"{len(different)} of {len(a)} tensors differ, e.g. {different[:3]}"
    assert a["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0     # llama.cpp's output rule


def test_quantized_gguf_generates_text(model, tmp_path):
    import llama_cpp
    compress(model, SHA, QuantizationConfig(Method.RTN, gguf_type="q4_0"), tmp_path / "c.safetensors")
    path = tmp_path / "q4_0.gguf"
    GgufExporter().export(ExportInput(model, SHA, CompressedModel(tmp_path / "c.safetensors")), path)
    llm = llama_cpp.Llama(str(path), n_ctx=256, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=16, temperature=0.0)
    text = reply["choices"][0]["message"]["content"]
    assert "Paris" in text, text
    llm.close()
