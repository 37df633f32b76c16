"""Every method end to end through `compress()` on the tiny llama (machinery, not quality): the file it
writes reads back, GGUF-typed results export to a GGUF that llama.cpp loads, recipes chain AWQ into GPTQ,
and missing calibration data is a precise error instead of a silent fallback."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from services.compressor.compress import Calibration, compress
from services.exporter.base import ExportInput
from services.exporter.formats.gguf import GgufExporter
from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.bundle import ModelDir
from shared.models.tokenizer import TextTokenizer
from shared.quant.compressed import CompressedModel
from shared.quant.grids import GptqOptions, Granularity, Method, QuantizationConfig
from shared.quant.qtensor import GgufTensor, QuantizedTensor

SHA = "a" * 64


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, assets):
    model = ModelDir(tiny_model_dir)
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    ids = tokenizer.encode((Path(assets) / "data" / "calib.txt").read_text()[:20_000])
    T = 64
    sequences = torch.tensor([[tokenizer.bos_id] + ids[i * (T - 1):(i + 1) * (T - 1)] for i in range(6)])
    return model, sequences


INT4 = dict(bits=4, granularity=Granularity.PER_GROUP, group_size=32)


@pytest.mark.parametrize("steps", [
    [QuantizationConfig(Method.GPTQ, gguf_type="q4_0")],
    [QuantizationConfig(Method.GPTQ, **INT4, gptq=GptqOptions(act_order=False))],
    [QuantizationConfig(Method.AWQ, **INT4)],
    [QuantizationConfig(Method.AWQ, gguf_type="q5_1"), QuantizationConfig(Method.GPTQ, gguf_type="q5_1")],
], ids=["gptq-q4_0", "gptq-int4", "awq-int4", "awq+gptq-q5_1"])
def test_layerwise_methods_write_a_readable_file(tiny, tmp_path, steps):
    model, sequences = tiny
    out = tmp_path / "c.safetensors"
    result = compress(model, SHA, steps[-1], out, pre_steps=tuple(steps[:-1]),
                      calibration=Calibration(sequences=sequences))
    compressed = CompressedModel(out)
    linears = [p for p in compressed.plans if p.grid is not None and ".layers." in p.name]
    assert len(linears) == 7 * model.config.num_hidden_layers
    for plan in linears:
        value = compressed.read(plan.name)
        assert isinstance(value, GgufTensor if steps[-1].gguf_type else QuantizedTensor)
        assert np.isfinite(value.dequantize()).all()
    reports = {t.name: t for t in result.tensors}
    assert all(reports[p.name].output_error > 0 for p in linears)       # measured on calibration inputs
    assert all(0 < reports[p.name].output_error < 0.5 for p in linears)


def test_gptq_gguf_exports_and_llama_cpp_loads_it(tiny, tmp_path):
    import llama_cpp
    model, sequences = tiny
    out = tmp_path / "c.safetensors"
    compress(model, SHA, QuantizationConfig(Method.GPTQ, gguf_type="q4_0"), out,
             calibration=Calibration(sequences=sequences))
    gguf_path = tmp_path / "m.gguf"
    exported = GgufExporter().export(ExportInput(model, SHA, CompressedModel(out)), gguf_path)
    assert "q4_0" in exported.labels["tensor_types"]
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=64, logits_all=True, verbose=False)
    try:
        llm.eval([1, 200, 300, 400])
        assert np.isfinite(np.array(llm.scores[:4])).all()
    finally:
        llm.close()


def test_awq_only_changes_norms_it_folds_into(tiny, tmp_path):
    model, sequences = tiny
    out = tmp_path / "c.safetensors"
    compress(model, SHA, QuantizationConfig(Method.AWQ, **INT4), out, calibration=Calibration(sequences=sequences))
    compressed = CompressedModel(out)
    changed = [name for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")
               if not np.array_equal(compressed.read(name), model.array(name))]
    assert changed                                                           # scales live in the norms now
    np.testing.assert_array_equal(compressed.read("model.norm.weight"), model.array("model.norm.weight"))


@pytest.mark.parametrize("recipe, pre, calibration, field", [
    (QuantizationConfig(Method.GPTQ, gguf_type="q4_0"), (), Calibration(), "calibration_dataset"),
    (QuantizationConfig(Method.AWQ, gguf_type="q4_0"), (), Calibration(), "calibration_dataset"),
    (QuantizationConfig(Method.IMATRIX, gguf_type="q4_0"), (), Calibration(), "calibration_stats"),
    (QuantizationConfig(Method.GPTQ, gguf_type="q4_0", gptq=GptqOptions(sequential=False)), (), Calibration(),
     "calibration_stats"),
])
def test_missing_calibration_is_a_precise_error(tiny, tmp_path, recipe, pre, calibration, field):
    model, _ = tiny
    out = tmp_path / "c.safetensors"
    with pytest.raises(FailedPrecondition) as info:
        compress(model, SHA, recipe, out, pre_steps=pre, calibration=calibration)
    assert info.value.field == field
    assert not out.exists()


def test_recipe_rules(tiny, tmp_path):
    model, sequences = tiny
    with pytest.raises(InvalidArgument) as info:
        compress(model, SHA, QuantizationConfig(Method.RTN, gguf_type="q4_0"), tmp_path / "c",
                 pre_steps=(QuantizationConfig(Method.GPTQ, gguf_type="q4_0"),))
    assert info.value.field == "recipe[0].method"
    with pytest.raises(InvalidArgument) as info:
        compress(model, SHA, QuantizationConfig(Method.GPTQ, gguf_type="q4_0"), tmp_path / "c",
                 pre_steps=(QuantizationConfig(Method.AWQ, gguf_type="q8_0"),))
    assert info.value.field == "recipe[0]"
    with pytest.raises(InvalidArgument, match="do not divide"):
        compress(model, SHA, QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=48),
                 tmp_path / "c")
