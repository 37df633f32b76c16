"""Transform on an image classifier: a SmallCNN briefly trained on real Fashion-MNIST images, through
every kind of step. Budgets are tiny (seconds); the acceptance numbers are bench/cnn_compression.py's."""
from __future__ import annotations

import numpy as np
import pytest

from services.compressor.steps import DistillStep, PruneStep, QatStep, Training
from services.compressor.transform import TransformData, run_transform
from shared.models import modules
from shared.quant.grids import Granularity, Method, QuantizationConfig

INT4 = QuantizationConfig(Method.RTN, bits=4, granularity=Granularity.PER_CHANNEL)


@pytest.fixture(scope="module")
def cnn(small_cnn):
    directory, files = small_cnn
    return directory, TransformData("image_classification", files["calibration"], 128, 0, files["training"],
                                    files["evaluation"])


def weights(path):
    state = modules.ModuleDir(path).load().module.state_dict()
    return {k: v for k, v in state.items() if k.endswith("weight") and v.dim() > 1}


def test_source_is_measured_in_accuracy(cnn, tmp_path):
    path, data = cnn
    reports, _ = run_transform(path, (PruneStep("magnitude", 0.5, scope="global"),), data, tmp_path / "w",
                               tmp_path / "out")
    source, pruned = reports
    assert source.quality.metric == "top1_accuracy" and source.quality.higher_is_better
    assert source.quality.value > 0.6                             # it learned something real
    assert source.quality.metrics["top1_agreement"] == pytest.approx(1.0)
    assert pruned.sparsity == pytest.approx(0.5, abs=1e-3)
    assert pruned.quality.metrics["top1_agreement"] < 1.0


def test_wanda_and_sparsegpt_two_four_on_linears_and_convs(cnn, tmp_path):
    path, data = cnn
    for method in ("wanda", "sparsegpt"):
        out = tmp_path / method
        reports, _ = run_transform(path, (PruneStep(method, 0.5, n=2, m=4),), data, tmp_path / f"w{method}", out)
        for name, weight in weights(out).items():
            matrix = weight.reshape(weight.shape[0], -1)
            if matrix.shape[1] % 4 == 0:
                assert ((matrix.reshape(matrix.shape[0], -1, 4) != 0).sum(-1) <= 2).all(), name
        assert "left dense" in reports[1].note                     # the first conv has 1·3·3 = 9 columns
        assert reports[1].quality.value > 0.3


def test_structured_then_distill_then_qat(cnn, tmp_path):
    path, data = cnn
    steps = (PruneStep("structured", 0.5), DistillStep(temperature=4.0, training=Training(steps=40)),
             QatStep(INT4, training=Training(steps=20)))
    reports, parameters = run_transform(path, steps, data, tmp_path / "w", tmp_path / "out")
    assert [r.kind for r in reports] == ["source", "prune", "distill", "qat"]
    assert reports[1].parameter_count < reports[0].parameter_count == sum(
        v.numel() for v in modules.ModuleDir(path).load().module.state_dict().values())
    assert reports[2].quality.value > reports[1].quality.value   # distillation recovers what pruning cost
    result = modules.ModuleDir(tmp_path / "out")
    assert result.structure["channels"] == [4, 8] and parameters == reports[-1].parameter_count
    from services.compressor.quant.rtn import quantize
    for name, weight in weights(tmp_path / "out").items():       # on the int4 grid: RTN is lossless
        matrix = weight.reshape(weight.shape[0], -1).numpy()
        assert np.array_equal(quantize(matrix, INT4.grid()).dequantize(), matrix), name


def test_iterative_magnitude_keeps_earlier_zeros(cnn, tmp_path):
    path, data = cnn
    step = PruneStep("magnitude", 0.8, schedule=(0.5, 0.8), finetune=Training(steps=15))
    reports, _ = run_transform(path, (step,), data, tmp_path / "w", tmp_path / "out")
    assert reports[1].sparsity == pytest.approx(0.8, abs=1e-3)
    assert reports[1].note.count("%:") == 2
