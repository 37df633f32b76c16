"""Encoders and CNNs through torch's ONNX exporter, in float32, float16 storage and int8 weights:
onnxruntime agrees with the torch module, the weights are the compressor's RTN codes, and what module
export cannot do is refused before the (slow) torch export. The real MobileNetV2 and MiniLM are slow."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from services.compressor.quant.rtn import quantize
from services.exporter.base import ExportOptions, OnnxWeightOperator
from services.exporter.formats.onnx_module import export_module, to_onnx, validate_module, write_variant
from shared.errors import FailedPrecondition
from shared.quant.grids import Granularity, Grid

INT8 = Grid(8, Granularity.PER_CHANNEL)
INT4_G32 = Grid(4, Granularity.PER_GROUP, 32)


class SmallCnn(nn.Module):
    """MobileNet-like: strided conv, depthwise + pointwise convs with biases, pooling, a classifier."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU6(), nn.Conv2d(16, 16, 3, 1, 1, groups=16),
                                      nn.Conv2d(16, 32, 1), nn.ReLU6())
        self.classifier = nn.Linear(32, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class SmallEncoder(nn.Module):
    """BERT-like: embeddings, 2 post-LayerNorm blocks with a padding mask, mean pooling."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(1000, 64)
        self.blocks = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2)

    def forward(self, input_ids, attention_mask):
        x = self.blocks(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        mask = attention_mask[..., None].to(x.dtype)
        return (x * mask).sum(1) / mask.sum(1)


def seeded(module: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for parameter in module.parameters():
        nn.init.normal_(parameter, 0, 0.2)
    return module.eval()


@pytest.fixture(scope="module")
def cnn():
    module = seeded(SmallCnn())
    inputs = (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
    return module, inputs, ["pixel_values"], ["logits"], {"pixel_values": {0: "batch"}}


@pytest.fixture(scope="module")
def encoder():
    module = seeded(SmallEncoder())
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.int64)
    mask[1, 8:] = 0                                                    # one padded sentence
    names = ["input_ids", "attention_mask"]
    return module, (ids, mask), names, ["embedding"], {n: {0: "batch", 1: "sequence"} for n in names}


@pytest.fixture(scope="module")
def encoder_graph(encoder):
    """The encoder exported once (torch's exporter takes seconds); tests edit copies."""
    return to_onnx(*encoder)


def variants(case, graph, tmp_path):
    """float32, float16 storage and int8 per-channel weights of one exported graph, each validated."""
    module, inputs, names = case[:3]
    model, exporter = graph
    results = {}
    for name, options, grid in (("f32", ExportOptions(), None), ("f16", ExportOptions(float_type="f16"), None),
                                ("int8", ExportOptions(), INT8)):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        exported = write_variant(copy, exporter, options, tmp_path / f"{name}.onnx", weight_grid=grid)
        results[name] = exported, validate_module(module, inputs, names, exported.path)
    return results


def test_cnn_variants_agree_with_torch(cnn, tmp_path):
    module, inputs, names, outputs, axes = cnn
    exported = export_module(module, inputs, names, outputs, axes, ExportOptions(), tmp_path / "cnn.onnx")
    assert "dynamo" in exported.provenance["exporter"]
    results = variants(cnn, (onnx.load(str(exported.path)), exported.provenance["exporter"]), tmp_path)
    for name, (file, check) in results.items():
        print(f"CNN {name}: {file.path.stat().st_size} bytes, max |Δ| {check.max_abs_diff:.2e}, "
              f"top-1 {check.top1_agreement:.2f}")
    assert results["f32"][1].max_abs_diff < 1e-4
    assert results["f16"][1].max_abs_diff < 1e-2 and results["f16"][1].top1_agreement == 1.0
    assert results["f16"][0].provenance["float16_initializers"] == 8                 # 4 weights, 4 biases
    assert results["int8"][1].top1_agreement == 1.0
    assert results["int8"][0].provenance["weights_quantized"] == 4                 # 3 convs + the classifier


def test_conv_weights_are_the_compressors_rtn_codes(cnn, tmp_path):
    module, inputs, names, outputs, axes = cnn
    graph, exporter = to_onnx(module, inputs, names, outputs, axes)
    write_variant(graph, exporter, ExportOptions(), tmp_path / "int8.onnx", weight_grid=INT8)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    conv = next(name for name in initializers if name.endswith(".codes") and initializers[name].ndim == 4
                and initializers[name].shape[1] == 16)              # the pointwise conv (32, 16, 1, 1)
    weight = module.state_dict()[conv.removesuffix(".codes")].numpy()
    ours = quantize(weight.reshape(weight.shape[0], -1), INT8)
    assert np.array_equal(initializers[conv].reshape(32, -1), (ours.codes.astype(np.int16) - 128).astype(np.int8))
    assert np.array_equal(initializers[conv.replace(".codes", ".scales")], ours.scales[:, 0].astype(np.float32))


def test_encoder_variants_agree_with_torch(encoder, encoder_graph, tmp_path):
    results = variants(encoder, encoder_graph, tmp_path)
    for name, (exported, check) in results.items():
        print(f"encoder {name}: {exported.path.stat().st_size} bytes, max |Δ| {check.max_abs_diff:.2e}, "
              f"cosine {check.cosine_similarity:.6f}")
    assert results["f32"][1].max_abs_diff < 1e-4
    assert results["f16"][1].cosine_similarity > 0.9999
    assert results["int8"][1].cosine_similarity > 0.999
    assert results["int8"][0].provenance["weights_quantized"] >= 2 * 3              # out_proj and 2 FFN per block


def test_int4_per_group_linears_in_external_data(encoder, encoder_graph, tmp_path):
    module, inputs, names = encoder[:3]
    copy = onnx.ModelProto()
    copy.CopyFrom(encoder_graph[0])
    exported = write_variant(copy, encoder_graph[1], ExportOptions(external_data=True), tmp_path / "int4",
                             weight_grid=INT4_G32)
    assert sorted(p.name for p in exported.path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert validate_module(module, inputs, names, exported.path).cosine_similarity > 0.98


@pytest.mark.parametrize("options, grid, what", [
    (ExportOptions(float_type="bf16"), None, "bf16"),
    (ExportOptions(int8_activations=True), INT8, "int8 activations"),
    (ExportOptions(onnx_weight_operator=OnnxWeightOperator.MATMUL_NBITS), INT4_G32, "MatMulNBits"),
    (ExportOptions(), Grid(4, Granularity.PER_GROUP, 16), "per-group grid on the module's 3 Conv weights"),
])
def test_what_module_export_cannot_do_fails_first(cnn, tmp_path, options, grid, what):
    module, inputs, names, outputs, axes = cnn
    with pytest.raises(FailedPrecondition) as error:
        export_module(module, inputs, names, outputs, axes, options, tmp_path / "m.onnx", weight_grid=grid)
    assert error.value.reason == "UNSUPPORTED_OP" and what in error.value.message
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_mobilenet_v2(tmp_path):
    from shared.models.vision import mobilenet_v2, photos
    module = mobilenet_v2()
    images = (torch.from_numpy(photos()),)
    graph = to_onnx(module, images, ["pixel_values"], ["logits"], {"pixel_values": {0: "batch"}})
    results = variants((module, images, ["pixel_values"]), graph, tmp_path)
    for name, (exported, check) in results.items():
        print(f"MobileNetV2 {name}: {exported.path.stat().st_size / 1e6:.1f} MB, max |Δlogit| "
              f"{check.max_abs_diff:.3g}, top-1 {check.top1_agreement:.3f} of {check.positions} photos")
    assert results["f32"][1].max_abs_diff < 1e-3
    assert results["f16"][1].top1_agreement == 1.0 and results["int8"][1].top1_agreement >= 7 / 8


@pytest.mark.slow
def test_minilm_encoder(tmp_path):
    from shared.models.encoder import VALIDATION_SENTENCES, EncoderTokenizer, load_encoder
    module = load_encoder()
    ids, mask = EncoderTokenizer()(VALIDATION_SENTENCES)
    inputs = (torch.from_numpy(ids), torch.from_numpy(mask))
    names = ["input_ids", "attention_mask"]
    graph = to_onnx(module, inputs, names, ["sentence_embedding"], {n: {0: "batch", 1: "sequence"} for n in names})
    results = variants((module, inputs, names), graph, tmp_path)
    for name, (exported, check) in results.items():
        print(f"MiniLM {name}: {exported.path.stat().st_size / 1e6:.1f} MB, max |Δ| {check.max_abs_diff:.3g}, "
              f"cosine {check.cosine_similarity:.6f}")
    assert results["f32"][1].max_abs_diff < 1e-4
    assert results["f16"][1].cosine_similarity > 0.9999 and results["int8"][1].cosine_similarity > 0.99
