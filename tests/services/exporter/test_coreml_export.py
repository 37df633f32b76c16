"""Core ML export, proved on Linux by reading the package back: op types, weight storage, sizes, I/O,
our quantized weights stored value for value, and every compressed weight decoded identically by
numpy and coremltools. Prediction needs macOS; those tests run there and are skipped elsewhere.

MobileNetV2 (real ImageNet weights) in every variant, MiniLM (real weights) in float16 and int8, the
tiny llama fixture (synthetic weights: machinery only) in int4 GPTQ and int8; SmolLM2 is slow."""
from __future__ import annotations

import json
import re
import sys
import time
import types

import numpy as np
import pytest
import torch

from services.compressor.compress import Calibration, compress
from services.compressor.quant.rtn import quantize
from services.exporter.base import (ActivationRanges, CoremlOptions, ExportInput, ExportOptions, PaletteMode)
from services.exporter.formats.coreml import (CoremlExporter, FlexibleDim, export_module,
                                              quantized_module_weights)
from services.exporter.formats.coreml_package import dense_weights, read_program
from services.exporter.formats.coreml_weights import blockwise, op_name
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig
from shared.quant.compressed import CompressedModel, TensorPlan
from shared.quant.grids import GGUF_GRIDS, Granularity, Grid, Method, QuantizationConfig

SHA = "0" * 64
MACOS_ONLY = pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS (coremltools: "
                                                                 "'Model prediction is only supported on macOS')")
F16 = ExportOptions(float_type="f16")
INT8 = Grid(8, Granularity.PER_CHANNEL)
INT4_G32 = Grid(4, Granularity.PER_GROUP, 32)
TOKENS = [1, 504, 3458, 282, 4649, 314, 7042, 28, 284, 260, 5765, 338, 6656, 2099, 281, 357]


def coreml(**kwargs) -> ExportOptions:
    return ExportOptions(float_type="f16", coreml=CoremlOptions(**kwargs))


def decoded(path, parameter: str) -> np.ndarray:
    """A parameter's weight as the package computes with it (MIL names are the parameter's, dots → _)."""
    pattern = re.compile(r"(^|_)" + re.escape(parameter.replace(".", "_")) + r"(_|$)")
    matches = [value for name, value in dense_weights(path).items() if pattern.search(name)]
    assert len(matches) == 1, f"{parameter}: {len(matches)} weights match"
    return matches[0]


def snr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    error = reference.astype(np.float64) - approximation
    return 10 * np.log10((reference.astype(np.float64) ** 2).sum() / (error ** 2).sum())


# ---------------------------------------------------------------- MobileNetV2

MOBILENET = {                                  # variant -> (options, grid of our carried weights)
    "f16": (F16, None),
    "int8": (F16, INT8),
    "int4_g32": (F16, INT4_G32),
    "kmeans4": (coreml(palette_bits=4), None),
    "uniform4_g8": (coreml(palette_bits=4, palette_mode=PaletteMode.UNIFORM, palette_group_size=8), None),
    "sparse50": (coreml(sparsity=0.5), None),
    "sparse50_kmeans4": (coreml(sparsity=0.5, palette_bits=4), None),
}


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    """Every variant of the real MobileNetV2 (BatchNorm folded), with the weights we carried."""
    from shared.models.vision import mobilenet_v2
    directory = tmp_path_factory.mktemp("mobilenet")
    out = {}
    for name, (options, grid) in MOBILENET.items():
        model = mobilenet_v2()
        weights = quantized_module_weights(model, grid) if grid else None
        started = time.perf_counter()
        exported = export_module(model, {"image": torch.zeros(1, 3, 224, 224)}, options,
                                 directory / f"{name}.mlpackage", weights=weights, output_names=("logits",))
        out[name] = (exported, weights, time.perf_counter() - started)
    return out


def test_mobilenet_sizes_shrink_as_each_variant_should(mobilenet):
    size = {name: exported.provenance["validation"]["weight_file_bytes"]
            for name, (exported, _, _) in mobilenet.items()}
    record = mobilenet["f16"][0].provenance["validation"]
    assert record["weights"] == 53 and record["storage"] == {"fp16": 53}           # 52 convolutions + classifier
    assert abs(size["f16"] / record["float16_bytes"] - 1) < 0.01                    # float16: 2 bytes a weight
    assert 0.45 < size["int8"] / size["f16"] < 0.55                                 # 8 bits + a scale per channel
    assert size["int4_g32"] < 0.35 * size["f16"]                                    # int4 where groups of 32 fit
    for palettized in ("kmeans4", "uniform4_g8"):                                  # (8 divides every channel count)
        assert size[palettized] < 0.30 * size["f16"]                                # 4-bit indices + 16-entry LUTs
    assert 0.5 < size["sparse50"] / size["f16"] < 0.6                               # half the values + a 1-bit mask
    assert size["sparse50_kmeans4"] < min(size["kmeans4"], size["sparse50"])        # jointly: 4-bit non-zeros + mask


def test_mobilenet_each_variant_stores_weights_in_its_ops(mobilenet):
    # 43 of the 53 weights have ≥ 2048 elements (coremltools.optimize's threshold, and ours for carried
    # weights); 29 of those have input columns (in·kh·kw) that groups of 32 divide.
    expected = {"int8": ("constexpr_blockwise_shift_scale", "int8+fp16", 43),
                "int4_g32": ("constexpr_blockwise_shift_scale", "int4+fp16", 29),
                "kmeans4": ("constexpr_lut_to_dense", "uint4+fp16", 43),
                "uniform4_g8": ("constexpr_lut_to_dense", "uint4+fp16", 43),
                "sparse50": ("constexpr_sparse_to_dense", "fp16+uint1", 43),
                "sparse50_kmeans4": ("constexpr_lut_to_sparse+constexpr_sparse_to_dense", "uint1+uint4+fp16", 43)}
    for name, (op, storage, count) in expected.items():
        record = mobilenet[name][0].provenance["validation"]
        assert record["compressed_weights"] == {op: count}, name
        assert record["storage"] == {storage: count, "fp16": 53 - count}, name
        assert record["decode_max_abs_diff"] == 0.0, name                 # numpy and coremltools decode alike
        assert record["deployment_target"] == "iOS18"
        assert record["inputs"] == [{"name": "image", "dtype": "float32", "shape": [1, 3, 224, 224], "shape_range": []}]
        assert record["outputs"][0]["name"] == "logits" and record["outputs"][0]["dtype"] == "float32"


def test_mobilenet_carries_our_codes_and_scales(mobilenet):
    for name, bits in (("int8", 8), ("int4_g32", 4)):
        exported, weights, _ = mobilenet[name]
        assert exported.provenance["validation"]["carried"]["equal"]
        _, program = read_program(exported.path)
        ops = {op.name: op for op in program.functions["main"].operations}
        for parameter in ("classifier.1.weight", "features.18.0.weight", "features.17.conv.0.0.weight"):
            ours = weights[parameter]
            op = ops[op_name(parameter)]
            stored = op.data.val.reshape(ours.shape).astype(np.int16)
            assert np.array_equal(stored, ours.codes.astype(np.int16) - (1 << (bits - 1))), parameter
            assert np.array_equal(op.scale.val.reshape(ours.scales.shape), ours.scales), parameter
            assert op.offset is None
            dense = decoded(exported.path, parameter).reshape(ours.shape)
            assert np.array_equal(dense, ours.dequantize().astype(np.float16)), parameter


def test_mobilenet_palettes_and_sparsity(mobilenet):
    from shared.models.vision import mobilenet_v2
    float_model = dict(mobilenet_v2().named_parameters())
    parameter = "features.17.conv.2.weight"                          # the last projection, 320 × 960
    original = float_model[parameter].detach().numpy()
    quality = {name: snr_db(original, decoded(mobilenet[name][0].path, parameter))
               for name in ("f16", "int8", "int4_g32", "kmeans4", "uniform4_g8")}
    assert quality["f16"] > 60 and quality["int8"] > 35
    assert quality["kmeans4"] > quality["int4_g32"] - 3                # one 16-value table ≈ 16 levels per 32 weights
    assert quality["uniform4_g8"] > 15
    sparse = decoded(mobilenet["sparse50"][0].path, parameter)
    joint = decoded(mobilenet["sparse50_kmeans4"][0].path, parameter)
    assert abs((sparse == 0).mean() - 0.5) < 0.01
    assert np.array_equal(sparse == 0, joint == 0)                       # joint: the same pruning, then palettes
    kept = sparse != 0
    assert np.array_equal(sparse[kept], original[kept].astype(np.float16))   # the kept half is the float weight
    assert len(np.unique(joint[kept])) <= 16
    _, program = read_program(mobilenet["uniform4_g8"][0].path)
    lut = next(op.lut.val for op in program.functions["main"].operations
               if op.op_type == "constexpr_lut_to_dense" and "features_17_conv_2_weight" in op.name)
    assert lut.shape == (320 // 8, 1, 1, 1, 16, 1)                      # a 16-entry table per 8 output channels
    steps = np.diff(lut.reshape(40, 16).astype(np.float64), axis=1)
    assert np.allclose(steps, steps.mean(axis=1, keepdims=True), rtol=2e-2)   # uniform: evenly spaced (float16)
    assert mobilenet["sparse50"][0].provenance["validation"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_mobilenet_provenance_names_the_tools_and_options(mobilenet):
    exported, _, seconds = mobilenet["sparse50_kmeans4"]
    provenance = exported.provenance
    assert provenance["tools"]["coremltools"] == "9.0" and provenance["tools"]["torch"]
    assert provenance["converter"]["compute_precision"] == "float16"
    assert provenance["converter"]["minimum_deployment_target"] == "iOS18"
    assert provenance["options"]["coreml"] == {"palette_bits": 4, "palette_mode": "kmeans", "palette_group_size": 0,
                                               "sparsity": 0.5, "deployment_target": "iOS18"}
    assert [step["step"] for step in provenance["optimize"]] == ["prune_weights", "palettize_weights"]
    assert provenance["optimize"][1]["joint_compression"] is True
    assert exported.path.is_dir() and exported.path.suffix == ".mlpackage"
    json.dumps(provenance)                                                 # plain values, for lineage
    print({name: f"{s:.1f} s" for name, (_, _, s) in mobilenet.items()})


@MACOS_ONLY
def test_mobilenet_predictions_match_torch_on_macos(mobilenet):
    import coremltools as ct
    from shared.models.vision import mobilenet_v2, photos
    images = photos()
    with torch.no_grad():
        expected = mobilenet_v2()(torch.from_numpy(images)).numpy()
    for name, (exported, _, _) in mobilenet.items():
        model = ct.models.MLModel(str(exported.path))
        logits = np.concatenate([model.predict({"image": image[None]})["logits"] for image in images])
        agreement = (logits.argmax(-1) == expected.argmax(-1)).mean()
        assert agreement >= (1.0 if name == "f16" else 0.75), name


# ---------------------------------------------------------------- MiniLM sentence encoder

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from shared.models.encoder import VALIDATION_SENTENCES, EncoderTokenizer, load_encoder
    directory = tmp_path_factory.mktemp("minilm")
    ids, mask = EncoderTokenizer()(VALIDATION_SENTENCES)
    tokens = FlexibleDim("tokens", 1, 128)
    out = {}
    for name, grid in (("f16", None), ("int8", INT8)):
        encoder = load_encoder()
        weights = quantized_module_weights(encoder, grid) if grid else None
        inputs = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        out[name] = (export_module(encoder, inputs, F16, directory / f"{name}.mlpackage", weights=weights,
                                   output_names=("embedding",),
                                   flexible={"input_ids": {1: tokens}, "attention_mask": {1: tokens}}), weights)
    return out, (ids, mask)


def test_minilm_float16_and_int8(minilm):
    exports, (ids, _) = minilm
    f16, int8 = (exports[name][0].provenance["validation"] for name in ("f16", "int8"))
    assert f16["storage"] == {"fp16": 38}                        # word/position embeddings + 36 linears
    assert int8["storage"] == {"int8+fp16": 38} and int8["carried"]["equal"]
    assert 0.45 < int8["weight_file_bytes"] / f16["weight_file_bytes"] < 0.55
    assert f16["ops"]["linear"] == 36 and int8["ops"]["linear"] == 36
    for record in (f16, int8):
        assert [i["name"] for i in record["inputs"]] == ["input_ids", "attention_mask"]
        assert all(i["dtype"] == "int32" and i["shape_range"][1] == [1, 128] for i in record["inputs"])
        assert record["infinite_multipliers"] == 0
    weights = exports["int8"][1]
    ours = weights["encoder.layer.3.intermediate.dense.weight"]
    assert np.array_equal(decoded(exports["int8"][0].path, "encoder.layer.3.intermediate.dense.weight"),
                          ours.dequantize().astype(np.float16))


class _MaskedSum(torch.nn.Module):
    """torch's usual additive mask, (1 − mask)·finfo(float32).min: −inf once the program is float16."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bias = (1.0 - mask.to(x.dtype)) * torch.finfo(torch.float32).min
        return torch.softmax(x + bias, dim=-1)


def test_float16_masks_are_made_finite(tmp_path):
    inputs = {"x": torch.randn(2, 8), "mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3])}
    exported = export_module(_MaskedSum(), inputs, F16, tmp_path / "mask.mlpackage", output_names=("probs",))
    assert exported.provenance["graph_passes"]["FiniteMultipliers"]        # the −inf became −65504
    assert exported.provenance["validation"]["infinite_multipliers"] == 0


@MACOS_ONLY
def test_minilm_embeddings_match_torch_on_macos(minilm):
    import coremltools as ct
    from shared.models.encoder import cosine, load_encoder
    exports, (ids, mask) = minilm
    with torch.no_grad():
        expected = load_encoder()(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    for name, minimum in (("f16", 0.999), ("int8", 0.99)):
        model = ct.models.MLModel(str(exports[name][0].path))
        got = model.predict({"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})["embedding"]
        assert np.isfinite(got).all() and cosine(got, expected).min() > minimum, name


# ---------------------------------------------------------------- the causal LM

@pytest.fixture(scope="module")
def llm(tiny_model_dir, tmp_path_factory):
    """The tiny llama compressed by GPTQ to int4 g32 (float16 package) and by RTN to asymmetric int8 per
    channel (float32 package)."""
    directory = tmp_path_factory.mktemp("coreml-llm")
    model = ModelDir(tiny_model_dir)
    sequences = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    recipes = {"gptq_int4": (QuantizationConfig(Method.GPTQ, bits=4, granularity=Granularity.PER_GROUP, group_size=32),
                             F16),
               "int8_asym": (QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL,
                                                symmetric=False), ExportOptions(float_type="f32"))}
    out = {}
    for name, (recipe, options) in recipes.items():
        compress(model, SHA, recipe, directory / f"{name}.safetensors", calibration=Calibration(sequences=sequences),
                 device="cpu")
        compressed = CompressedModel(directory / f"{name}.safetensors")
        source = ExportInput(model, SHA, compressed, options)
        started = time.perf_counter()
        exported = CoremlExporter(max_tokens=256).export(source, directory / f"{name}.mlpackage")
        out[name] = (exported, source, time.perf_counter() - started)
    return out


def test_llm_carries_gptq_int4_weights(llm):
    exported, source, seconds = llm["gptq_int4"]
    record = exported.provenance["validation"]
    assert record["ops"]["constexpr_blockwise_shift_scale"] == 14               # 2 layers × 7 linears
    assert record["ops"]["scaled_dot_product_attention"] == 2
    assert record["storage"] == {"int4+fp16": 14, "fp16": 1}                    # + the tied embedding / LM head
    assert record["carried"] == {"weights": 14, "storage": {"int4": 14}, "equal": True, "mismatched": []}
    assert record["inputs"] == [{"name": "input_ids", "dtype": "int32", "shape": [1, 16],
                                 "shape_range": [[1, 1], [1, 256]]}]
    assert record["outputs"][0]["name"] == "logits"
    _, program = read_program(exported.path)
    ops = {op.name: op for op in program.functions["main"].operations}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        ours = source.compressed.read(name)                                     # GPTQ's codes and scales
        op = ops[op_name(f"reference.{name}")]
        assert np.array_equal(op.data.val.astype(np.int16), ours.codes.astype(np.int16) - 8)
        assert np.array_equal(op.scale.val, ours.scales)                        # (rows, columns / 32) float16
        assert op.data.val.shape[1] // op.scale.val.shape[1] == 32
        assert np.array_equal(decoded(exported.path, f"reference.{name}"), ours.dequantize().astype(np.float16))
    assert CoremlExporter().read_back(exported, source)["carried"]["equal"]
    print(f"tiny llama int4 GPTQ export: {seconds:.1f} s, {exported.provenance['seconds']}")


def test_llm_int8_asymmetric_in_float32(llm):
    exported, source, _ = llm["int8_asym"]
    record = exported.provenance["validation"]
    assert record["storage"] == {"uint8+fp32+uint8": 14, "fp32": 1}            # codes, scale, zero point
    assert record["carried"]["equal"]
    name = "model.layers.1.self_attn.o_proj.weight"
    ours = source.compressed.read(name)
    _, program = read_program(exported.path)
    op = next(op for op in program.functions["main"].operations if op.name == op_name(f"reference.{name}"))
    assert np.array_equal(op.data.val, ours.codes) and np.array_equal(op.offset.val, ours.zeros)
    assert np.array_equal(op.scale.val, ours.scales.astype(np.float32))
    assert np.array_equal(decoded(exported.path, f"reference.{name}"), ours.dequantize())   # exact in float32
    assert exported.provenance["converter"]["compute_precision"] == "float32"
    assert exported.provenance["model"]["recipe"]["symmetric"] is False


@MACOS_ONLY
def test_llm_logits_match_the_reference_on_macos(llm):
    import coremltools as ct
    from shared.models.llama import build_reference
    for name, (exported, source, _) in llm.items():
        reference = build_reference(source.model.config, lambda n: torch.from_numpy(source.dequantized(n)))
        with torch.inference_mode():
            expected = reference(torch.tensor([TOKENS]))[0].numpy()
        got = ct.models.MLModel(str(exported.path)).predict({"input_ids": np.array([TOKENS], np.int32)})["logits"][0]
        assert got.shape == expected.shape and np.isfinite(got).all()
        assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9, name


# ---------------------------------------------------------------- weights in Core ML's form, no conversion

@pytest.mark.parametrize("grid", [Grid(8, Granularity.PER_CHANNEL), Grid(8, Granularity.PER_TENSOR, symmetric=False),
                                  Grid(4, Granularity.PER_GROUP, 32), Grid(4, Granularity.PER_GROUP, 64, False),
                                  GGUF_GRIDS["q8_0"], GGUF_GRIDS["q4_0"]], ids=lambda g: g.name)
def test_blockwise_form_decodes_to_our_dequantization(grid):
    weight = np.random.default_rng(0).normal(0, 0.05, (48, 128)).astype(np.float32)
    ours = quantize(weight, grid)
    form = blockwise(ours, (48, 128))
    assert np.array_equal(form.dense(), ours.dequantize())            # GGUF: gguf-py's dequantizer, bit for bit
    assert form.storage == ("" if grid.symmetric else "u") + f"int{grid.bits}"
    assert (form.offset is None) == grid.symmetric


def test_blockwise_form_of_a_convolution():
    weight = np.random.default_rng(1).normal(0, 0.1, (16, 8, 3, 3)).astype(np.float32)
    ours = quantize(weight.reshape(16, 72), Grid(4, Granularity.PER_GROUP, 36))   # 4 input channels per group
    form = blockwise(ours, (16, 8, 3, 3))
    assert form.block_shape == (1, 4, 3, 3) and form.scale.shape == (16, 2, 1, 1)
    assert np.array_equal(form.dense().reshape(16, 72), ours.dequantize())
    with pytest.raises(FailedPrecondition, match="kernels"):
        blockwise(quantize(weight.reshape(16, 72), Grid(4, Granularity.PER_GROUP, 8)), (16, 8, 3, 3))


# ---------------------------------------------------------------- refused before any work

def source_with(tiny_model_dir, grids=(), architecture=None, **options) -> ExportInput:
    """An ExportInput whose compressed model only has plans (check reads no weights)."""
    model = ModelDir(tiny_model_dir)
    if architecture:
        model = types.SimpleNamespace(config=DecoderConfig(**{**model.config.__dict__, "architecture": architecture,
                                                              "layer_types": ()}))
    compressed = None
    if grids:
        plans = [TensorPlan(f"model.layers.0.mlp.{n}_proj.weight", (128, 64), g) for n, g in zip(("up", "gate"), grids)]
        compressed = types.SimpleNamespace(plans=plans, base_model=SHA, recipe={})
    activations = ActivationRanges({}) if options.get("int8_activations") else None
    return ExportInput(model, SHA, compressed, ExportOptions(**options), activations)


@pytest.mark.parametrize("case, reason, words", [
    ({"float_type": "bf16"}, "UNSUPPORTED_OP", "bfloat16"),
    ({"grids": (Grid(3, Granularity.PER_GROUP, 32),)}, "UNSUPPORTED_OP", "3-bit linear"),
    ({"grids": (INT4_G32, GGUF_GRIDS["q4_k"])}, "UNSUPPORTED_OP", "q4_k"),
    ({"grids": (GGUF_GRIDS["q4_1"],)}, "UNSUPPORTED_OP", "q4_1"),
    ({"coreml": CoremlOptions(palette_bits=5)}, "UNSUPPORTED_OP", "5-bit palettes"),
    ({"grids": (INT4_G32,), "coreml": CoremlOptions(sparsity=0.5)}, "UNSUPPORTED_OP", "carried as they are"),
    ({"grids": (INT4_G32,), "coreml": CoremlOptions(deployment_target="iOS17")}, "UNSUPPORTED_OP", "before iOS18"),
    ({"coreml": CoremlOptions(palette_bits=4, sparsity=0.5, deployment_target="macOS14")}, "UNSUPPORTED_OP",
     "joint"),
    ({"int8_activations": True}, "UNSUPPORTED_OP", "int8 activations"),
    ({"architecture": "gemma3"}, "UNSUPPORTED_ARCH", "gemma3"),
], ids=lambda v: v if isinstance(v, str) and v.isupper() else None)
def test_check_refuses_what_core_ml_cannot_express(tiny_model_dir, tmp_path, case, reason, words):
    source = source_with(tiny_model_dir, **case)
    with pytest.raises(FailedPrecondition) as error:
        CoremlExporter().check(source)
    assert error.value.reason == reason and words in error.value.message
    with pytest.raises(FailedPrecondition):
        CoremlExporter().export(source, tmp_path / "m.mlpackage")         # export checks first: nothing written
    assert not (tmp_path / "m.mlpackage").exists()


def test_export_module_refuses_an_uncarriable_grid_before_tracing(tmp_path):
    layer = torch.nn.Linear(64, 32)
    weights = {"weight": quantize(layer.weight.detach().numpy(), Grid(3, Granularity.PER_CHANNEL))}
    started = time.perf_counter()
    with pytest.raises(FailedPrecondition, match="3-bit"):
        export_module(layer, {"x": torch.zeros(1, 64)}, F16, tmp_path / "m.mlpackage", weights=weights)
    assert time.perf_counter() - started < 1.0 and not (tmp_path / "m.mlpackage").exists()


# ---------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_int4_g32_package(smollm2_dir, tmp_path):
    model = ModelDir(smollm2_dir)
    recipe = QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_GROUP, group_size=32)
    compress(model, SHA, recipe, tmp_path / "c.safetensors", device="cpu")
    source = ExportInput(model, SHA, CompressedModel(tmp_path / "c.safetensors"), F16)
    started = time.perf_counter()
    exported = CoremlExporter().export(source, tmp_path / "smollm2.mlpackage")
    seconds = time.perf_counter() - started
    record = exported.provenance["validation"]
    assert record["carried"]["equal"] and record["carried"]["weights"] == 30 * 7
    assert record["storage"] == {"int4+fp16": 210, "fp16": 1}
    # int4 + a float16 scale per 32 (4.5 bits) for the linears, float16 for the 28M-weight embedding
    assert record["weight_file_bytes"] < 0.45 * record["float16_bytes"]
    assert record["inputs"][0]["shape_range"][1] == [1, 2048]
    print(f"SmolLM2 int4 g32: {seconds:.0f} s ({exported.provenance['seconds']}), "
          f"{record['weight_file_bytes'] / 1e6:.1f} MB vs {record['float16_bytes'] / 1e6:.1f} MB float16")
