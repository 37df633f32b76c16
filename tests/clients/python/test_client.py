"""The synchronous SDK against a real coordinator: a whole build through `Client.build` (a real agent
measures it), the typed results and report, and the typed errors, which stay `grpc.RpcError`s."""
from __future__ import annotations

import socket

import grpc
import pytest
import yaml
from sdk_builds import tiny_build

from clients.python import spec as spec_file
from clients.python.client import Client
from clients.python.errors import (ApiError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                                   PermissionDenied, Unauthenticated, Unavailable)
from clients.python.results import BuildState, build_name
from clients.python.spec import SpecError
from edgeforge.v1 import coordinator_pb2
from shared.grpc_status import error_details


def admin(coordinator) -> Client:
    return Client(coordinator.address, token=coordinator.admin_token)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_end_to_end_returns_typed_results(coordinator, agent, build_yaml, tmp_path):
    progress = []
    with admin(coordinator) as client:
        result = client.build(build_yaml, on_progress=progress.append, timeout=600)
        assert result.passed and result.state is BuildState.SUCCEEDED and result.error is None, result.failures()
        assert result.failures() == []
        (target,) = result.targets
        assert target.target == "host" and target.chosen and target.candidate_id == "gguf-q8_0"
        assert target.attributes["device"] == "test-host" and target.device.startswith("devices/")
        assert target.artifact.startswith("artifacts/") and target.format == "gguf"
        assert target.size_bytes > 100_000 and target.p90_ms > 0
        assert target.quality.metric == "perplexity" and target.quality.baseline > 1
        assert target.quality_delta_pct == target.quality.delta_pct
        assert result.report["devices"][0]["chosen"] == "gguf-q8_0"
        assert result.proto == client.get_build(result.build)

        assert progress and progress[-1].stage == coordinator_pb2.BUILD_STAGE_DONE
        assert all(p.build == result.build for p in progress)
        watched = list(client.watch(result.operation))                  # a finished build: its last progress
        assert [p.stage for p in watched] == [coordinator_pb2.BUILD_STAGE_DONE]
        assert client.get_operation(result.operation).done

        report = client.report(result.build)
        assert report.document == result.report and report.build == result.build
        assert "<html" in client.read_text(report.html_artifact).lower()
        downloaded = client.download(target.artifact, tmp_path / "model.gguf")
        assert downloaded.stat().st_size == target.size_bytes and downloaded.read_bytes()[:4] == b"GGUF"
        assert client.result(build_name(result.operation)) == result


def test_a_failed_build_is_a_result_and_a_timeout_leaves_it_running(coordinator, tiny_model_dir, assets):
    """No agent: the target matches no device, the build fails with FAILED_PRECONDITION."""
    spec = spec_file.parse(tiny_build(tiny_model_dir, assets), tiny_model_dir.parent)
    with admin(coordinator) as client:
        with pytest.raises(DeadlineExceeded) as timed_out:
            client.build(spec, timeout=0.0, poll_s=0.2)
        assert "still running" in timed_out.value.details()
        result = client.build(spec, poll_s=0.5, timeout=300)
        assert result.state is BuildState.FAILED and not result.passed and result.targets == ()
        assert isinstance(result.error, FailedPrecondition) and "test-host" in result.error.message
        (failure,) = result.failures()
        assert failure.startswith(f"{result.build} failed: FAILED_PRECONDITION")
        with pytest.raises(FailedPrecondition) as no_report:
            client.report(result.build)
        assert no_report.value.reason == "NO_REPORT"


def test_typed_errors_name_the_code_reason_and_field(coordinator, tiny_model_dir, assets, tmp_path, monkeypatch):
    with admin(coordinator) as client:
        with pytest.raises(InvalidArgument) as bad:
            client.create_build(coordinator_pb2.BuildSpec())          # nothing uploaded: no model artifact
        assert bad.value.field == "model.artifact" and bad.value.reason == "INVALID_FIELD"
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model.artifact" in bad.value.details()
        assert str(bad.value).startswith("INVALID_ARGUMENT INVALID_FIELD [model.artifact]: ")

        spec = spec_file.parse(tiny_build(tiny_model_dir, assets), tiny_model_dir.parent)
        spec.spec.constraints.max_p90_latency_ms = -1                    # past the local parser, to the server
        with pytest.raises(InvalidArgument) as negative:
            client.create_build(spec)
        assert negative.value.field == "constraints.max_p90_latency_ms"

        with pytest.raises(NotFound) as missing:
            client.get_build("builds/b-does-not-exist")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "b-does-not-exist" in missing.value.details()
        # What callers written against plain gRPC do still works: catch RpcError, read the rich status.
        assert isinstance(missing.value, grpc.RpcError) and isinstance(missing.value.__cause__, grpc.RpcError)
        assert error_details(missing.value) == (missing.value.reason, missing.value.metadata)

        with pytest.raises(ValueError):
            client.create_token("superuser", "nobody")
        _, builder_secret = client.create_token("builder", "sdk test builder")
    with Client(coordinator.address, token=builder_secret) as builder, pytest.raises(PermissionDenied):
        builder.create_token("admin", "escalation")

    bad_spec = tmp_path / "bad.yaml"
    typo = [{"format": "gguf", "quantisation": {"type": "q4_0"}}]
    bad_spec.write_text(yaml.safe_dump(tiny_build(tiny_model_dir, assets, candidates=typo)))
    with admin(coordinator) as client, pytest.raises(SpecError) as local:
        client.build(bad_spec)
    assert local.value.field == "candidates[0].quantisation" and "did you mean 'quantization'" in str(local.value)

    monkeypatch.delenv("EDGEFORGE_TOKEN", raising=False)
    monkeypatch.delenv("EDGEFORGE_TOKEN_FILE", raising=False)
    monkeypatch.chdir(tmp_path)                                          # no ./.edgeforge/admin.token here
    with Client(coordinator.address) as anonymous, pytest.raises(Unauthenticated) as unauthenticated:
        anonymous.whoami()
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with Client(f"127.0.0.1:{closed_port()}", token="ef_x") as nowhere, pytest.raises(Unavailable) as down:
        nowhere.list_builds()
    assert isinstance(down.value, ApiError) and down.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tokens_and_devices(coordinator, agent):
    with admin(coordinator) as client:
        assert client.whoami().role == 1                                  # TOKEN_ROLE_ADMIN
        token_id, secret = client.create_token("builder", "ci pipeline")
        assert secret.startswith("ef_") and any(t.name == f"tokens/{token_id}" for t in client.list_tokens())
        assert client.revoke_token(token_id).HasField("revoke_time")
        (device,) = client.list_devices({"device": "test-host"})
        assert device.attributes["device"] == "test-host"
        assert client.list_devices({"device": "no-such-host"}) == []
