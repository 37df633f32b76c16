"""Static QDQ int8: every linear's input is quantized with the calibrator's (min, max), its weights are
our int8 codes; onnxruntime computes what a fake-quantized torch reference computes, and its fused
int8 kernels keep the top-1 token."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from services.calibrator.stats import CalibrationConfig, calibrate, write_stats
from services.compressor.compress import compress
from services.exporter.base import ActivationRanges, ExportInput, ExportOptions, OnnxWeightOperator
from services.exporter.formats.onnx import OnnxExporter
from services.exporter.formats.onnx_weights import activation_qparams
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.models.llama import build_reference
from shared.quant.compressed import CompressedModel
from shared.quant.grids import Granularity, Method, QuantizationConfig
from test_onnx_export import SHA, TOKENS, reference_logits, run, session

INT8 = QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
QDQ = ExportOptions(int8_activations=True)


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, assets, tmp_path_factory):
    """The tiny model compressed to int8 per channel, and its activation ranges from a real calibration."""
    directory = tmp_path_factory.mktemp("qdq")
    model = ModelDir(tiny_model_dir)
    compress(model, SHA, INT8, directory / "c.safetensors")
    text = (assets / "data" / "calib.txt").read_text()[:20000]
    result = calibrate(model, text, CalibrationConfig(samples=4, sequence_length=64, hessians="none"))
    write_stats(directory / "stats.safetensors", result, {"model": SHA, "dataset": "calib"})
    ranges = ActivationRanges.from_stats(directory / "stats.safetensors", "calibrations/test")
    return model, CompressedModel(directory / "c.safetensors"), ranges


def fake_quantized_reference(model: ModelDir, compressed: CompressedModel, ranges: ActivationRanges, tokens):
    """The torch reference on our dequantized weights, each linear's input rounded onto its uint8 grid."""
    reference = build_reference(model.config,
                                lambda n: torch.from_numpy(np.ascontiguousarray(compressed.dequantized(n))))

    def hook(linear_name):
        scale, zero = (float(v) for v in activation_qparams(*ranges.get(linear_name)))

        def quantize(module, inputs):
            q = torch.clamp(torch.round(inputs[0] / scale) + zero, 0, 255)
            return ((q - zero) * scale,)
        return quantize
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            module.register_forward_pre_hook(hook(name))
    with torch.inference_mode():
        return reference(torch.tensor([tokens]))[0].numpy()


def test_qdq_graph_computes_the_fake_quantized_model(calibrated, tmp_path):
    model, compressed, ranges = calibrated
    exported = OnnxExporter().export(ExportInput(model, SHA, compressed, QDQ, ranges), tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    quantize_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize_nodes) == 4 * 2             # inputs of q/k/v (shared), o, gate/up (shared), down; 2 layers
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    low, high = ranges.get("model.layers.1.mlp.down_proj")
    assert initializers["model.layers.1.mlp.down_proj.input_scale"] == np.float32((high - min(low, 0)) / 255)
    assert exported.provenance["activation_quantization"]["calibration"] == "calibrations/test"

    expected = fake_quantized_reference(model, compressed, ranges, TOKENS)
    exact, _ = run(session(tmp_path / "m.onnx", optimize=False), TOKENS)       # QDQ evaluated as written
    assert np.abs(exact - expected).max() < 1e-3
    fused, _ = run(session(tmp_path / "m.onnx", optimize=True), TOKENS)        # onnxruntime's int8 kernels
    assert np.abs(fused - exact).max() < 1e-4                # uint8×uint8: no int16 saturation (onnx_weights.py)
    weights_only = reference_logits(model, compressed, TOKENS)                 # float activations
    top1 = (fused.argmax(-1) == weights_only.argmax(-1)).mean()
    print(f"QDQ vs float activations: top-1 {top1:.3f}, max |Δlogit| {np.abs(fused - weights_only).max():.4f}")
    assert top1 >= 0.75              # a random tiny model's logits are near-flat; SmolLM2: bench/onnx_int8.py


def test_int8_activations_need_int8_weights_and_ranges(calibrated, tiny_model_dir, tmp_path):
    model, compressed, ranges = calibrated
    with pytest.raises(FailedPrecondition) as error:
        OnnxExporter().check(ExportInput(model, SHA, None, QDQ, ranges))
    assert error.value.reason == "UNSUPPORTED_OP" and "needs 8-bit linear weights" in error.value.message
    nbits = ExportOptions(int8_activations=True, onnx_weight_operator=OnnxWeightOperator.MATMUL_NBITS)
    with pytest.raises(FailedPrecondition, match="MatMulNBits"):
        OnnxExporter().check(ExportInput(model, SHA, compressed, nbits, ranges))
    partial = ActivationRanges({k: v for k, v in ranges.ranges.items() if "layers.1." not in k})
    with pytest.raises(FailedPrecondition) as error:
        OnnxExporter().check(ExportInput(model, SHA, compressed, QDQ, partial))
    assert error.value.reason == "MISSING_CALIBRATION" and "model.layers.1.self_attn.q_proj" in error.value.message


def test_activation_qparams_keep_zero_exact():
    scale, zero = activation_qparams(-1.0, 3.0)
    assert scale == np.float32(4.0 / 255) and zero == 64
    assert activation_qparams(0.5, 2.0)[1] == 0                     # a positive range widens down to 0
    assert activation_qparams(0.0, 0.0) == (np.float32(1.0), np.uint8(0))
