"""Whole builds through a real coordinator and a real agent (in a thread, spawning real measurement
processes) on a tiny random-weight llama with SmolLM2's tokenizer, plus the Coordinator, Operations
and AgentGateway RPCs' answers to bad input."""
from __future__ import annotations

import json
import time

import grpc
import pytest
from status_checks import reason, rpc_code

from clients.python import spec as spec_file
from clients.python.client import build_name
from edgeforge.v1 import agent_pb2, agent_pb2_grpc, common_pb2, coordinator_pb2
from google.longrunning import operations_proto_pb2 as operations_pb2


def tiny_spec(tiny_model_dir, assets, **overrides) -> spec_file.SpecFile:
    raw = {
        "name": "tiny", "model": {"path": str(tiny_model_dir)},
        "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
        "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
        "targets": [{"selector": {"device": "test-host"}}],
        "candidates": [{"format": "gguf", "quantization": {"type": "q4_0"}},
                       {"format": "gguf", "quantization": {"method": "none", "type": "f16"}},
                       {"format": "onnx", "quantization": {"bits": 8, "granularity": "per_channel"}}],
        "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2,
                      "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True},
    }
    raw.update(overrides)
    return spec_file.parse(raw, tiny_model_dir.parent)


def run_build(client, spec, timeout_s: float = 300):
    operation = client.create_build(spec)
    deadline = time.monotonic() + timeout_s
    while not operation.done:
        assert time.monotonic() < deadline, "build did not finish in time"
        operation = client.wait(operation.name, poll_s=2.0)
    return operation, client.get_build(build_name(operation.name))


def test_build_measures_selects_reports_and_reuses(coordinator, agent, tiny_model_dir, assets):
    operation, build = run_build(coordinator, tiny_spec(tiny_model_dir, assets))
    assert operation.done and not operation.HasField("error"), operation.error
    response = coordinator_pb2.Build()
    assert operation.response.Unpack(response) and response.name == build.name
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED
    assert [c.id for c in build.candidates] == ["gguf-q4_0", "gguf-f16", "onnx-int8-per_channel-sym"]
    for candidate in build.candidates:
        assert not candidate.HasField("error"), candidate.error
        assert candidate.quality.metric == "perplexity" and candidate.quality.value > 1
        assert candidate.validation.loaded and candidate.validation.positions > 0
    report = json.loads(coordinator.read_text(build.report_json_artifact))
    (device,) = report["devices"]
    assert device["attributes"]["device"] == "test-host" and device["chosen"] is not None
    for row in device["candidates"]:
        assert row["latency_ms"]["p50"] > 0 and len(row["latency_ms"]["samples"]) == 2
        assert row["peak_rss_bytes"] > 10 << 20 and row["load_ms"] > 0
        assert row["tokens_per_s"]["prompt"] > 0 and row["tokens_per_s"]["generation"] > 0
        assert row["status"] in ("chosen", "eligible") and (row["status"] == "chosen") == (not row["rejected_by"])
        # Predicted beside measured (shared/planner): the weights plus KV cache and the runtime's overhead,
        # from the agent's own measured bandwidth and compute.
        predicted = row["predicted"]
        assert predicted["memory_bytes"] > row["size_bytes"] and predicted["generation_tokens_per_s"] > 0
        assert predicted["bound"] in ("memory", "compute") and "measured by the agent" in predicted["basis"]
    html = coordinator.read_text(build.report_html_artifact)
    assert "<table" in html and "Predicted" in html
    exported = coordinator.ctx.store.get(build.candidates[0].artifact.removeprefix("artifacts/"))
    assert exported.lineage.producer == "edgeforge.v1.Exporter/Export"
    assert build.candidates[0].compressed_artifact in exported.lineage.inputs

    started = time.monotonic()
    _, again = run_build(coordinator, tiny_spec(tiny_model_dir, assets))
    assert again.name != build.name and again.state == coordinator_pb2.BUILD_STATE_SUCCEEDED
    assert again.calibration_stats == build.calibration_stats
    assert [c.artifact for c in again.candidates] == [c.artifact for c in build.candidates]
    assert time.monotonic() - started < 60


def test_constraints_nobody_meets_leave_the_device_without_a_choice(coordinator, agent, tiny_model_dir, assets):
    spec = tiny_spec(tiny_model_dir, assets, constraints={"max_size_bytes": 1000},
                     candidates=[{"format": "gguf", "quantization": {"type": "q8_0"}}])
    _, build = run_build(coordinator, spec)
    (device,) = build.devices
    assert device.chosen_candidate == ""
    assert device.candidates[0].status == coordinator_pb2.CANDIDATE_STATUS_REJECTED
    assert "max_size_bytes" in device.candidates[0].rejected_by


def test_no_matching_device_fails_the_operation(coordinator, tiny_model_dir, assets):
    spec = tiny_spec(tiny_model_dir, assets, targets=[{"selector": {"os": "plan9"}}],
                     candidates=[{"format": "gguf", "quantization": {"type": "q8_0"}}])
    operation, build = run_build(coordinator, spec)
    assert operation.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "plan9" in operation.error.message and build.state == coordinator_pb2.BUILD_STATE_FAILED


def test_cancelling_a_build(coordinator, tiny_model_dir, assets):
    operation = coordinator.create_build(tiny_spec(tiny_model_dir, assets))
    coordinator.cancel(operation.name)
    operation = coordinator.wait(operation.name)
    assert operation.done and operation.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert coordinator.get_build(build_name(operation.name)).state == coordinator_pb2.BUILD_STATE_CANCELLED


def test_bad_build_requests(coordinator, tiny_model_dir, assets, tmp_path):
    stub = coordinator.coordinator
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateBuild(coordinator_pb2.CreateBuildRequest(spec=coordinator_pb2.BuildSpec()))
    assert rpc_code(error) == "INVALID_ARGUMENT" and "model.artifact" in error.value.details()
    text = tmp_path / "not-a-model.bin"
    text.write_bytes(b"definitely not a model\n")
    spec = tiny_spec(tiny_model_dir, assets).spec
    spec.model.artifact = coordinator.upload(text, common_pb2.ARTIFACT_KIND_SOURCE_MODEL).name
    spec.calibration.dataset = coordinator.upload(assets / "data" / "calib.txt", common_pb2.ARTIFACT_KIND_DATASET).name
    spec.evaluation.dataset = coordinator.upload(assets / "data" / "eval.txt", common_pb2.ARTIFACT_KIND_DATASET).name
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateBuild(coordinator_pb2.CreateBuildRequest(spec=spec))
    assert rpc_code(error) == "INVALID_ARGUMENT" and reason(error) == "UNKNOWN_MODEL_FORMAT"
    spec.model.artifact = coordinator.upload_model(tiny_model_dir).name
    spec.evaluation.dataset = spec.calibration.dataset
    with pytest.raises(grpc.RpcError) as error:
        stub.CreateBuild(coordinator_pb2.CreateBuildRequest(spec=spec))
    assert "held out" in error.value.details()
    assert coordinator.list_builds() == []                                   # nothing was started
    for call in (lambda: stub.GetBuild(coordinator_pb2.GetBuildRequest(name="builds/nope")),
                 lambda: coordinator.operations.GetOperation(operations_pb2.GetOperationRequest(name="operations/nope"))):
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert rpc_code(error) == "NOT_FOUND"
    with pytest.raises(grpc.RpcError) as error:
        stub.GetBuild(coordinator_pb2.GetBuildRequest(name="builds/../../etc"))
    assert rpc_code(error) == "INVALID_ARGUMENT"


def test_request_id_reuse_with_another_body_is_refused(coordinator, agent, tiny_model_dir, assets):
    first = coordinator.create_build(tiny_spec(tiny_model_dir, assets), request_id="same-id")
    repeat = coordinator.create_build(tiny_spec(tiny_model_dir, assets), request_id="same-id")
    assert repeat.name == first.name                                         # idempotent
    with pytest.raises(grpc.RpcError) as error:
        coordinator.create_build(tiny_spec(tiny_model_dir, assets, name="other"), request_id="same-id")
    assert rpc_code(error) == "ALREADY_EXISTS" and reason(error) == "REQUEST_ID_REUSED"
    coordinator.cancel(first.name)


def test_agent_gateway_bad_input(coordinator):
    agents, md = coordinator.agents, coordinator.agent_metadata
    cases = [
        (lambda: agents.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="Bad Id!"), metadata=md),
         "INVALID_ARGUMENT"),
        (lambda: agents.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="ok-2", slots=65), metadata=md),
         "INVALID_ARGUMENT"),
        (lambda: agents.Heartbeat(agent_pb2.HeartbeatRequest(device="devices/ghost"), metadata=md), "NOT_FOUND"),
        (lambda: agents.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/ghost", wait_ms=0), metadata=md),
         "NOT_FOUND"),
        (lambda: agents.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/x", wait_ms=10 ** 6), metadata=md),
         "INVALID_ARGUMENT"),
        (lambda: agents.ReportResult(agent_pb2.ReportResultRequest(lease="leases/none"), metadata=md),
         "INVALID_ARGUMENT"),
        (lambda: agents.ReportResult(agent_pb2.ReportResultRequest(
            lease="leases/none", error={"code": 2, "message": "x"}), metadata=md), "NOT_FOUND"),
        (lambda: list(agents.FetchArtifact(agent_pb2.FetchArtifactRequest(lease="leases/none"), metadata=md)),
         "NOT_FOUND"),
    ]
    for call, code in cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert rpc_code(error) == code, error.value.details()
    device = agents.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="ok-1", attributes={"os": "linux"}),
                                  metadata=md)
    assert device.name == "devices/ok-1" and device.state == coordinator_pb2.DEVICE_STATE_ONLINE
    assert device.slots == 1
    assert agents.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/ok-1", wait_ms=0),
                           metadata=md).HasField("lease") is False


def test_agent_gateway_refuses_missing_unknown_revoked_and_wrong_role_tokens(coordinator):
    """Every AgentGateway call needs a live agent token; revoking one refuses its very next call."""
    from shared.server import channel
    agents = agent_pb2_grpc.AgentGatewayStub(channel(coordinator.address))     # no token of its own
    tokens = coordinator.ctx.tokens
    register = agent_pb2.RegisterAgentRequest(device_id="tok-1", attributes={"os": "linux"})
    token, secret = tokens.create("agent", "soon revoked")
    _, builder = tokens.create("builder", "a build pipeline")
    cases = [((), "UNAUTHENTICATED", "INVALID_TOKEN", "needs the metadata"),
             ((("authorization", "Basic abc"),), "UNAUTHENTICATED", "INVALID_TOKEN", "Bearer"),
             ((("authorization", "Bearer ef_" + "x" * 43),), "UNAUTHENTICATED", "INVALID_TOKEN", "unknown"),
             ((("authorization", f"Bearer {builder}"),), "PERMISSION_DENIED", "WRONG_ROLE", "builder")]
    for metadata, code, why, words in cases:
        for call in (lambda: agents.RegisterAgent(register, metadata=metadata),
                     lambda: list(agents.FetchArtifact(agent_pb2.FetchArtifactRequest(lease="leases/x"),
                                                       metadata=metadata))):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert (rpc_code(error), reason(error)) == (code, why) and words in error.value.details()
    live = (("authorization", f"Bearer {secret}"),)
    assert agents.RegisterAgent(register, metadata=live).name == "devices/tok-1"
    tokens.revoke(token.id)
    with pytest.raises(grpc.RpcError) as error:
        agents.Heartbeat(agent_pb2.HeartbeatRequest(device="devices/tok-1"), metadata=live)
    assert rpc_code(error) == "UNAUTHENTICATED" and "revoked" in error.value.details()
    assert not coordinator.ctx.state.db.query("SELECT * FROM tokens WHERE sha256 = ?", (secret,))   # only hashes
    assert coordinator.list_devices()                                            # the server still serves


def test_calibrated_methods_build_end_to_end(coordinator, agent, tiny_model_dir, assets):
    """GPTQ, AWQ→GPTQ (a recipe), importance-weighted RTN and a mixed-precision allocation, all from the
    spec, through the real services; the report lists each tensor's grid and error."""
    candidates = [
        {"format": "gguf", "quantization": {"method": "gptq", "type": "q4_0"}},
        {"format": "gguf", "recipe": [{"method": "awq", "type": "q5_1"}, {"method": "gptq", "type": "q5_1"}]},
        {"format": "onnx", "quantization": {"method": "imatrix", "bits": 4, "granularity": "per_group",
                                            "group_size": 32}},
        {"format": "gguf", "quantization": {"method": "rtn", "type": "q4_0",
                                            "mixed_precision": {"options": ["q4_0", "q8_0"],
                                                                "max_bits_per_weight": 6.0}}},
    ]
    spec = tiny_spec(tiny_model_dir, assets, candidates=candidates,
                     calibration={"text_file": str(assets / "data" / "calib.txt"), "samples": 4,
                                  "sequence_length": 32})
    operation, build = run_build(coordinator, spec)
    assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
    assert [c.id for c in build.candidates] == ["gguf-q4_0-gptq", "gguf-q5_1-awq+gptq", "onnx-int4-g32-sym-imatrix",
                                                "gguf-q4_0-mixed"]
    for candidate in build.candidates:
        assert not candidate.error.message, candidate.error.message
        assert candidate.quality.value > 0 and candidate.tensors
    gptq, mixed = build.candidates[0], build.candidates[3]
    assert all(t.output_error > 0 for t in gptq.tensors if ".layers." in t.name)
    linear_grids = {t.grid for t in mixed.tensors if ".layers." in t.name}
    assert linear_grids <= {"q4_0", "q8_0"} and 4.5 <= mixed.bits_per_weight
    compressed = coordinator.ctx.store.get(gptq.compressed_artifact.removeprefix("artifacts/"))
    assert build.calibration_stats in compressed.lineage.inputs                    # provenance of the data used
    report = json.loads(coordinator.ctx.store.path(build.report_json_artifact.removeprefix("artifacts/")).read_text())
    assert {c["id"] for c in report["quantization"]} >= {"gguf-q4_0-gptq", "gguf-q4_0-mixed"}
    html = coordinator.ctx.store.path(build.report_html_artifact.removeprefix("artifacts/")).read_text()
    assert "Quantization, tensor by tensor" in html and "gguf-q4_0-mixed" in html
