"""Weight histograms for the report: every quantized tensor of a real model carries the histogram of
its float weights, and every prune step the histogram of each pruned tensor's weights before pruning
with its cut — checked against numpy on the same weights (SmolLM2-135M for quantization, a SmallCNN
trained on real Fashion-MNIST for pruning)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.compressor.compress import Calibration, compress, plan
from services.compressor.convert import result_to_proto
from services.compressor.histogram import BINS, LARGEST_PRUNED, MAGNITUDE, NONE, HistogramSketch, weight_histogram
from services.compressor.prune.decoder import prune_decoder, prune_decoder_neurons
from services.compressor.steps import PruneStep
from services.compressor.streaming import stream_tensors
from services.compressor.transform import TransformData, run_transform
from shared.models import modules
from shared.models.bundle import ModelDir
from shared.models.decoder_config import is_linear_weight
from shared.quant.grids import Granularity, Method, QuantizationConfig

SHA = "c" * 64


def numpy_histogram(weight: np.ndarray) -> list[int]:
    # float64 edges, as WeightHistogram.low/high are (a float32 range would make numpy round its edges to float32)
    counts, _ = np.histogram(weight, bins=BINS, range=(float(weight.min()), float(weight.max())))
    return counts.tolist()


def prunable(path) -> dict[str, np.ndarray]:
    state = modules.ModuleDir(path).load().module.state_dict()
    return {k: v.numpy() for k, v in state.items() if k.endswith("weight") and v.dim() > 1}


@pytest.fixture(scope="module")
def cnn(small_cnn):
    directory, files = small_cnn
    return directory, TransformData("image_classification", files["calibration"], 128, 0, files["training"],
                                    files["evaluation"])


# ------------------------------------------------------------------------------------ quantization
def test_every_quantized_tensor_of_smollm2_has_its_weights_histogram(smollm2_dir, tmp_path):
    model = ModelDir(smollm2_dir)
    recipe = QuantizationConfig(Method.RTN, bits=8, granularity=Granularity.PER_CHANNEL)
    result = compress(model, SHA, recipe, tmp_path / "q.safetensors", device="cpu")
    assert [t.name for t in result.tensors] == [n for n in model.tensor_names() if is_linear_weight(n)]
    for report, proto in zip(result.tensors, result_to_proto(result)):
        weight = model.array(report.name)
        histogram = proto.histogram
        assert histogram.tensor == report.name and histogram.threshold_kind == NONE
        assert len(histogram.counts) == BINS and sum(histogram.counts) == weight.size
        assert (histogram.low, histogram.high) == (float(weight.min()), float(weight.max()))
        assert list(histogram.counts) == numpy_histogram(weight), report.name
        assert histogram.threshold == 0 and histogram.pruned_fraction == 0


def test_awq_histograms_are_of_the_models_weights_not_the_scaled_ones(tiny_model_dir, assets, tmp_path):
    from shared.models.tokenizer import TextTokenizer
    model = ModelDir(tiny_model_dir)
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    ids = tokenizer.encode((assets / "data" / "calib.txt").read_text()[:8_000])
    sequences = torch.tensor([[tokenizer.bos_id] + ids[i * 63:(i + 1) * 63] for i in range(4)])
    recipe = QuantizationConfig(Method.AWQ, bits=4, granularity=Granularity.PER_GROUP, group_size=32)
    result = compress(model, SHA, recipe, tmp_path / "q.safetensors", calibration=Calibration(sequences=sequences),
                      device="cpu")
    assert result.tensors and all(t.histogram is not None for t in result.tensors)
    for report in result.tensors:
        weight = model.array(report.name)
        assert (report.histogram.low, report.histogram.high) == (float(weight.min()), float(weight.max()))
        assert list(report.histogram.counts) == numpy_histogram(weight), report.name


def test_row_chunked_tensors_get_the_same_histogram_to_the_sketchs_resolution(tiny_model_dir):
    """A tensor streamed in row chunks is never whole in memory: min, max and total are still exact,
    and a bin may differ from numpy's only by values within 2⁻¹¹ of its edges."""
    model = ModelDir(tiny_model_dir)
    recipe = QuantizationConfig(Method.RTN, gguf_type="q8_0")
    plans = plan(model, recipe)
    whole, chunked = [], []
    for reports, chunk_bytes in ((whole, 1 << 30), (chunked, 4096)):
        for _, value in stream_tensors(model, plans, recipe, None, "cpu", None, reports.append,
                                       chunk_bytes=chunk_bytes):
            for _ in getattr(value, "chunks", ()):              # drain row chunks as the writer would
                pass
    assert [r.name for r in whole] == [r.name for r in chunked] and whole
    for a, b in zip(whole, chunked):
        weight = model.array(a.name)
        assert list(a.histogram.counts) == numpy_histogram(weight)
        assert (b.histogram.low, b.histogram.high) == (a.histogram.low, a.histogram.high)
        assert sum(b.histogram.counts) == weight.size
        edges = np.linspace(weight.min(), weight.max(), BINS + 1)[1:-1]
        near = int(sum((np.abs(weight - edge) <= abs(edge) * 2 ** -11 + 1e-12).sum() for edge in edges))
        assert np.abs(np.array(a.histogram.counts) - np.array(b.histogram.counts)).sum() <= 2 * near


def test_sketch_of_constant_and_empty_tensors():
    assert HistogramSketch().add(np.full((3, 4), 0.5, np.float32)).histogram("c").counts == (12,) + (0,) * 47
    assert weight_histogram("c", np.full(7, -2.0, np.float32)).counts == (7,) + (0,) * 47
    assert sum(weight_histogram("e", np.zeros(0, np.float32)).counts) == 0


# ------------------------------------------------------------------------------------ pruning
def test_magnitude_pruning_reports_the_s_quantile_of_each_layer(cnn, tmp_path):
    path, data = cnn
    sparsity = 0.3
    reports, _ = run_transform(path, (PruneStep("magnitude", sparsity),), data, tmp_path / "w", tmp_path / "out")
    before = prunable(path)
    histograms = {h.tensor: h for h in reports[1].histograms}
    assert sorted(histograms) == sorted(before) and not reports[0].histograms
    for name, weight in before.items():
        h, magnitudes = histograms[name], np.sort(np.abs(weight).ravel())
        k = round(sparsity * weight.size)                          # exactly k weights go in every layer
        assert h.threshold_kind == MAGNITUDE and h.pruned_fraction == pytest.approx(k / weight.size)
        assert abs(h.pruned_fraction - sparsity) <= 0.5 / weight.size
        assert h.threshold == magnitudes[k]          # the empirical s-quantile: the smallest kept |w|
        assert abs(np.mean(np.abs(weight) < h.threshold) - sparsity) <= 1 / weight.size
        assert list(h.counts) == numpy_histogram(weight) and (h.low, h.high) == (weight.min(), weight.max())
        after = prunable(tmp_path / "out")[name]
        assert (after[np.abs(weight) < h.threshold] == 0).all() and (after[np.abs(weight) > h.threshold] != 0).all()


def test_global_magnitude_pruning_has_one_threshold(cnn, tmp_path):
    path, data = cnn
    reports, _ = run_transform(path, (PruneStep("magnitude", 0.5, scope="global"),), data, tmp_path / "w",
                               tmp_path / "out")
    before = prunable(path)
    everything = np.sort(np.concatenate([np.abs(w).ravel() for w in before.values()]))
    assert {h.threshold for h in reports[1].histograms} == {everything[round(0.5 * everything.size)]}
    fractions = {h.tensor: h.pruned_fraction for h in reports[1].histograms}
    assert len({round(f, 3) for f in fractions.values()}) > 1             # layers lose different shares
    total = sum(fractions[n] * w.size for n, w in before.items())
    assert round(total) == round(0.5 * everything.size)


def test_two_four_reports_half_pruned_and_the_largest_pruned_magnitude(cnn, tmp_path):
    path, data = cnn
    reports, _ = run_transform(path, (PruneStep("magnitude", 0.5, n=2, m=4),), data, tmp_path / "w",
                               tmp_path / "out")
    before, after = prunable(path), prunable(tmp_path / "out")
    histograms = {h.tensor: h for h in reports[1].histograms}
    assert "convs.0.weight" not in histograms                  # 1·3·3 columns do not split into fours
    assert sorted(histograms) == sorted(set(before) - {"convs.0.weight"})
    for name, h in histograms.items():
        pruned = after[name] == 0
        assert h.threshold_kind == LARGEST_PRUNED and h.pruned_fraction == 0.5
        assert h.threshold == pytest.approx(float(np.abs(before[name])[pruned].max()))
        assert not (pruned & (np.abs(before[name]) > h.threshold)).any()


def test_decoder_pruning_histograms(tiny_model_dir, tmp_path):
    """Causal LMs prune block by block (services/compressor/prune/decoder.py): the same numbers."""
    model = ModelDir(tiny_model_dir)
    report = prune_decoder(model, method="magnitude", sparsity=0.25, out_dir=tmp_path / "m")
    assert [h.tensor for h in report.histograms] == list(report.sparsity)
    for h in report.histograms:
        magnitudes = np.sort(np.abs(model.array(h.tensor)).ravel())
        assert h.threshold == magnitudes[round(0.25 * magnitudes.size)] and h.pruned_fraction == 0.25
    report = prune_decoder(model, method="magnitude", n=2, m=4, out_dir=tmp_path / "nm")
    assert {(h.threshold_kind, h.pruned_fraction) for h in report.histograms} == {(LARGEST_PRUNED, 0.5)}
    report = prune_decoder_neurons(model, fraction=0.25, out_dir=tmp_path / "neurons")
    assert len(report.histograms) == 3 * model.config.num_hidden_layers
    assert {(h.threshold_kind, h.pruned_fraction) for h in report.histograms} == {(NONE, 0.25)}


def test_histograms_survive_the_proto(cnn, tmp_path):
    path, data = cnn
    reports, _ = run_transform(path, (PruneStep("magnitude", 0.4),), data, tmp_path / "w", tmp_path / "out")
    proto = reports[1].histograms[0]
    assert len(proto.counts) == BINS and proto.threshold_kind == MAGNITUDE and proto.pruned_fraction > 0
    assert json.loads(json.dumps(list(proto.counts))) == list(proto.counts)


def test_structured_pruning_reports_the_removed_share(cnn, tmp_path):
    path, data = cnn
    reports, _ = run_transform(path, (PruneStep("structured", 0.5),), data, tmp_path / "w", tmp_path / "out")
    before, after = prunable(path), prunable(tmp_path / "out")
    histograms = {h.tensor: h for h in reports[1].histograms}
    assert histograms and set(histograms) <= set(before)
    for name, h in histograms.items():
        assert h.threshold_kind == NONE and h.threshold == 0
        assert h.pruned_fraction == pytest.approx(1 - after[name].size / before[name].size)
        assert list(h.counts) == numpy_histogram(before[name])
