"""The statistics artifact: written block by block, identical to writing an in-memory result, read back
by CalibrationStats per weight, and refused precisely when it is not a version-2 statistics file."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from services.calibrator.cache import CalibrationIndex, cache_key
from services.calibrator.stats import (CalibrationConfig, calibrate_to_file, calibrate_tokens, tokenizer_of,
                                       write_stats)
from services.calibrator.stats_file import METADATA_KEY, CalibrationStats
from shared.errors import InvalidArgument, NotFound
from shared.models.bundle import ModelDir
from shared.tensors.safetensors_writer import write_safetensors

PROVENANCE = {"model": "a" * 64, "dataset": "b" * 64}


@pytest.fixture(scope="module")
def tokens(assets, tiny_model_dir) -> list[int]:
    return tokenizer_of(ModelDir(tiny_model_dir)).encode((assets / "data" / "calib.txt").read_text()[:50_000])


def test_streamed_file_equals_the_in_memory_result_and_reads_back(tiny_model_dir, tokens, tmp_path):
    model, config = ModelDir(tiny_model_dir), CalibrationConfig(3, 32)
    streamed, written = tmp_path / "streamed.safetensors", tmp_path / "written.safetensors"
    assert calibrate_to_file(model, tokens, config, streamed, PROVENANCE) == 96
    result = calibrate_tokens(model, tokens, config)
    write_stats(written, result, PROVENANCE)
    assert streamed.read_bytes() == written.read_bytes()

    stats = CalibrationStats.open(streamed)
    assert stats.metadata == {**PROVENANCE, "samples": 3, "sequence_length": 32, "tokens": 96, "version": 2,
                              "hessians": "auto"}
    assert stats.weights() == [layer.weight for layer in result.layers] and len(stats.weights()) == 14
    for site, summary in result.sites:
        for weight in site.weights:
            assert stats.has_hessian(weight)
            assert np.array_equal(stats.hessian(weight), summary.hessian) and stats.hessian(weight).dtype == np.float32
            assert np.array_equal(stats.importance(weight), summary.sq_mean)
            assert np.array_equal(stats.mean_abs(weight), summary.mean_abs)
            assert np.array_equal(stats.abs_max(weight), summary.abs_max)
            assert list(stats.activation_range(weight).values()) == summary.value_range.tolist()
    value_range = stats.activation_range("model.layers.1.mlp.up_proj.weight")
    assert list(value_range) == ["min", "max", "p99", "p99.9", "p99.99"]
    assert stats.hessian("model.layers.1.mlp.up_proj.weight").shape == (64, 64)
    assert stats.hessian("model.layers.1.mlp.down_proj.weight").shape == (128, 128)
    with pytest.raises(InvalidArgument, match="no statistics for lm_head.weight") as error:
        stats.abs_max("lm_head.weight")
    assert error.value.field == "calibration_stats"


def test_without_hessians_the_file_says_so(tiny_model_dir, tokens, tmp_path):
    path = tmp_path / "bare.safetensors"
    calibrate_to_file(ModelDir(tiny_model_dir), tokens, CalibrationConfig(2, 16, "none"), path, PROVENANCE)
    stats = CalibrationStats.open(path)
    weight = "model.layers.0.self_attn.q_proj.weight"
    assert not stats.has_hessian(weight) and stats.importance(weight).shape == (64,)
    with pytest.raises(InvalidArgument, match="no Hessian") as error:
        stats.hessian(weight)
    assert error.value.field == "calibration_stats"


def test_bad_data_writes_nothing(tiny_model_dir, tmp_path):
    path = tmp_path / "never.safetensors"
    with pytest.raises(InvalidArgument) as error:
        calibrate_to_file(ModelDir(tiny_model_dir), [5] * 10, CalibrationConfig(2, 16), path, PROVENANCE)
    assert error.value.reason == "INSUFFICIENT_DATA" and not path.exists()


def _tensor_file(path, metadata: dict | None, shape=(4,)):
    write_safetensors(path, {"x.abs_max": (shape, "F32")}, [("x.abs_max", np.zeros(shape, np.float32))],
                      metadata=metadata)
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b"not a safetensors file at all"), "not a readable safetensors file"),
    (lambda p: p.write_bytes(struct.pack("<Q", 10 ** 6) + b"{}"), "not a readable safetensors file"),
    (lambda p: _tensor_file(p, None), "no metadata key"),
    (lambda p: _tensor_file(p, {METADATA_KEY: "{oops"}), "is not JSON"),
    (lambda p: _tensor_file(p, {METADATA_KEY: json.dumps({"model": "m", "tokens": 1})}), "version 1"),
    (lambda p: _tensor_file(p, {METADATA_KEY: json.dumps({"version": 2, "model": "m"})}), "metadata lacks"),
    (lambda p: _tensor_file(p, {METADATA_KEY: json.dumps({
        "version": 2, "model": "m", "dataset": "d", "samples": 1, "sequence_length": 8, "tokens": 8,
        "sites": {"x": {"weights": ["x.weight"], "in_features": 5, "hessian": False}}})}),
     r"tensor x.abs_max has shape \(4,\), the metadata implies \(5,\)"),
    (lambda p: _tensor_file(p, {METADATA_KEY: json.dumps({
        "version": 2, "model": "m", "dataset": "d", "samples": 1, "sequence_length": 8, "tokens": 8,
        "sites": {"x": {"weights": ["x.weight"]}}})}), "site 'x' metadata is malformed"),
])
def test_files_that_are_not_statistics_are_refused_precisely(make, message, tmp_path):
    path = tmp_path / "stats.safetensors"
    make(path)
    with pytest.raises(InvalidArgument, match=message) as error:
        CalibrationStats.open(path)
    assert error.value.reason == "MALFORMED_MODEL" and error.value.field == "calibration_stats"


def test_cache_index_remembers_and_forgets_what_the_store_lost(tmp_path):
    index = CalibrationIndex(tmp_path / "cache" / "index.json")
    key = cache_key("m" * 64, "d" * 64, 128, 512, "auto", 2)
    assert key != cache_key("m" * 64, "d" * 64, 128, 512, "none", 2)
    present = lambda name: None

    def gone(name):
        raise NotFound(name)
    assert index.lookup(key, present) is None
    index.remember(key, "artifacts/" + "f" * 64)
    assert CalibrationIndex(tmp_path / "cache" / "index.json").lookup(key, present) == "artifacts/" + "f" * 64
    assert index.lookup(key, gone) is None
    (tmp_path / "cache" / "index.json").write_text("{damaged")
    assert index.lookup(key, present) is None
