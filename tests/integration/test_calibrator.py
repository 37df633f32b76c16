"""Calibrate over real gRPC: a stand-alone calibrator server on 127.0.0.1:0 that reads and writes artifacts
through a real coordinator's ArtifactStore, on the tiny llama. A repeated request returns the same
artifact without running the model; bad data fails with INVALID_ARGUMENT naming the field."""
from __future__ import annotations

import grpc
import numpy as np
import pytest
from status_checks import reason, rpc_code

from edgeforge.v1 import calibrator_pb2, calibrator_pb2_grpc, common_pb2
from services.calibrator import servicer as calibrator_servicer
from services.calibrator.server import create_server
from services.calibrator.stats import tokenizer_of
from services.calibrator.stats_file import CalibrationStats
from shared.artifact_access import RemoteArtifacts
from shared.datasets import TOKEN_IDS_MAGIC
from shared.auth import RemoteVerifier
from shared.grpc_status import error_details
from shared.models.bundle import ModelDir
from shared.server import channel


@pytest.fixture
def calibrator(coordinator, tmp_path):
    to_coordinator = channel(coordinator.address, token=coordinator.admin_token)
    access = RemoteArtifacts(coordinator.address, tmp_path / "calibrator-cache", token=coordinator.admin_token)
    server, port = create_server("127.0.0.1:0", access, RemoteVerifier(to_coordinator))   # callers checked by WhoAmI
    channel_ = channel(f"127.0.0.1:{port}", token=coordinator.admin_token)
    yield calibrator_pb2_grpc.CalibratorStub(channel_)
    channel_.close()
    to_coordinator.close()
    server.stop(0).wait()


@pytest.fixture
def runs(monkeypatch) -> list:
    """Every time the model actually runs (calibrate_to_file), its config."""
    calls = []
    real = calibrator_servicer.calibrate_to_file

    def counted(model, tokens, config, path, provenance):
        calls.append(config)
        return real(model, tokens, config, path, provenance)
    monkeypatch.setattr(calibrator_servicer, "calibrate_to_file", counted)
    return calls


def upload_text(coordinator, path, body: str):
    path.write_text(body)
    return coordinator.upload(path, common_pb2.ARTIFACT_KIND_DATASET)


def test_calibrate_stores_statistics_and_reuses_them(coordinator, calibrator, runs, tiny_model_dir, assets, tmp_path):
    model = coordinator.upload_model(tiny_model_dir)
    text = (assets / "data" / "calib.txt").read_text()[:20_000]
    ids = tokenizer_of(ModelDir(tiny_model_dir)).encode(text)
    token_file = upload_text(coordinator, tmp_path / "calib.ids", TOKEN_IDS_MAGIC + "\n" + " ".join(map(str, ids)))
    request = calibrator_pb2.CalibrateRequest(model=model.name, dataset=token_file.name, samples=2, sequence_length=32)

    first = calibrator.Calibrate(request, timeout=300)
    assert first.tokens == 64 and first.stats.kind == common_pb2.ARTIFACT_KIND_CALIBRATION_STATS
    assert first.stats.media_type == "application/x-edgeforge-calibration+safetensors"
    assert list(first.stats.lineage.inputs) == [model.name, token_file.name]
    assert len(first.layers) == 14 and all(layer.has_hessian for layer in first.layers)
    q, k = first.layers[0], first.layers[1]
    assert q.weight == "model.layers.0.self_attn.q_proj.weight"
    assert q.site == k.site == "model.layers.0.self_attn.q_proj"
    assert q.in_features == 64 and q.abs_max >= q.mean_abs > 0
    stats = CalibrationStats.open(coordinator.download(first.stats.name, tmp_path / "stats.safetensors"))
    assert stats.metadata["model"] == model.sha256 and stats.metadata["dataset"] == token_file.sha256
    assert stats.hessian(q.weight).shape == (64, 64)

    again = calibrator.Calibrate(request, timeout=300)
    assert again == first and len(runs) == 1                      # the same artifact; the model did not run

    bare = calibrator.Calibrate(calibrator_pb2.CalibrateRequest(
        model=model.name, dataset=token_file.name, samples=2, sequence_length=32, hessians=False), timeout=300)
    assert bare.stats.name != first.stats.name and not any(layer.has_hessian for layer in bare.layers)
    assert len(runs) == 2 and runs[1].hessians == "none"
    assert [layer.abs_max for layer in bare.layers] == [layer.abs_max for layer in first.layers]

    as_text = upload_text(coordinator, tmp_path / "calib.txt", text)
    from_text = calibrator.Calibrate(calibrator_pb2.CalibrateRequest(
        model=model.name, dataset=as_text.name, samples=2, sequence_length=32), timeout=300)
    text_stats = CalibrationStats.open(coordinator.download(from_text.stats.name, tmp_path / "text.safetensors"))
    for weight in stats.weights():                                # the same tokens, the same statistics
        assert np.array_equal(text_stats.hessian(weight), stats.hessian(weight))
        assert text_stats.activation_range(weight) == stats.activation_range(weight)


def test_the_embedded_calibrator_answers_on_the_coordinator_address(coordinator, tiny_model_dir, assets, tmp_path):
    model = coordinator.upload_model(tiny_model_dir)
    dataset = upload_text(coordinator, tmp_path / "calib.txt", (assets / "data" / "calib.txt").read_text()[:20_000])
    stub = calibrator_pb2_grpc.CalibratorStub(coordinator.channel)
    request = calibrator_pb2.CalibrateRequest(model=model.name, dataset=dataset.name, samples=2, sequence_length=16)
    assert stub.Calibrate(request, timeout=300) == stub.Calibrate(request, timeout=300)


@pytest.mark.parametrize("body,expected_reason,message", [
    ("", "INSUFFICIENT_DATA", "calibration.dataset is empty"),
    ("a few words only", "INSUFFICIENT_DATA", "calibration.dataset has 4 tokens; 2 samples of 32 need 62"),
    (f"{TOKEN_IDS_MAGIC}\n", "INSUFFICIENT_DATA", "holds no token ids"),
    (f"{TOKEN_IDS_MAGIC}\n1 2 3\n4 49152 6\n", "INVALID_FIELD",
     "calibration.dataset line 3: token id 49152 is outside the model's vocabulary [0, 49152)"),
])
def test_unusable_data_is_invalid_argument_naming_the_field(body, expected_reason, message, coordinator,
                                                            calibrator, tiny_model_dir, tmp_path):
    model = coordinator.upload_model(tiny_model_dir)
    dataset = upload_text(coordinator, tmp_path / "calibration-data", body)
    with pytest.raises(grpc.RpcError) as error:
        calibrator.Calibrate(calibrator_pb2.CalibrateRequest(model=model.name, dataset=dataset.name, samples=2,
                                                             sequence_length=32), timeout=300)
    assert rpc_code(error) == "INVALID_ARGUMENT" and reason(error) == expected_reason
    assert error_details(error.value)[1]["field"] == "calibration.dataset" and message in error.value.details()


def test_a_model_is_not_a_dataset(coordinator, calibrator, tiny_model_dir):
    model = coordinator.upload_model(tiny_model_dir)
    with pytest.raises(grpc.RpcError) as error:
        calibrator.Calibrate(calibrator_pb2.CalibrateRequest(model=model.name, dataset=model.name), timeout=300)
    assert rpc_code(error) == "INVALID_ARGUMENT" and error_details(error.value)[1]["field"] == "calibration.dataset"
