"""Authentication and authorization over real gRPC (a real coordinator on 127.0.0.1:0, real SQLite):
every service refuses missing, unknown and revoked tokens and wrong roles; health stays open;
builders see only their own builds and artifacts; an agent fetches only its live leases' artifacts;
a standalone worker checks its callers with the coordinator's Tokens.WhoAmI."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from status_checks import reason, rpc_code

from clients.python import spec as spec_file
from clients.python.client import Client, build_name
from edgeforge.v1 import (agent_pb2, agent_pb2_grpc, calibrator_pb2, calibrator_pb2_grpc, common_pb2,
                          coordinator_pb2, tokens_pb2)
from google.longrunning import operations_proto_pb2 as operations_pb2
from shared.auth import SERVICE_ROLES, RemoteVerifier
from shared.server import channel

# One cheap method per guarded service: (path, response streaming).
METHODS = {"edgeforge.v1.Coordinator": ("/edgeforge.v1.Coordinator/ListBuilds", False),
           "google.longrunning.Operations": ("/google.longrunning.Operations/ListOperations", False),
           "edgeforge.v1.ArtifactStore": ("/edgeforge.v1.ArtifactStore/ListArtifacts", False),
           "edgeforge.v1.DeviceRegistry": ("/edgeforge.v1.DeviceRegistry/ListDevices", False),
           "edgeforge.v1.AgentGateway": ("/edgeforge.v1.AgentGateway/FetchArtifact", True),
           "edgeforge.v1.Calibrator": ("/edgeforge.v1.Calibrator/Calibrate", False),
           "edgeforge.v1.Compressor": ("/edgeforge.v1.Compressor/ImportModel", False),
           "edgeforge.v1.Exporter": ("/edgeforge.v1.Exporter/Export", False),
           "edgeforge.v1.Tokens": ("/edgeforge.v1.Tokens/ListTokens", False)}


def raw_call(ch: grpc.Channel, path: str, streaming: bool, secret: str | None):
    """Calls `path` with an empty request (auth is decided before the request is read)."""
    metadata = (("authorization", f"Bearer {secret}"),) if secret else ()
    if streaming:
        return list(ch.unary_stream(path)(b"", metadata=metadata, timeout=10))
    return ch.unary_unary(path)(b"", metadata=metadata, timeout=10)


def test_every_service_refuses_missing_unknown_and_revoked_tokens(coordinator):
    assert set(METHODS) == set(SERVICE_ROLES)
    token, revoked = coordinator.ctx.tokens.create("admin", "revoked at once")
    coordinator.revoke_token(token.id)
    cases = [(None, "no token was sent"), ("ef_" + "x" * 43, "unknown bearer token"), ("abc", "start with 'ef_'"),
             (revoked, "was revoked")]
    with channel(coordinator.address) as bare:
        for service, (path, streaming) in METHODS.items():
            for secret, words in cases:
                with pytest.raises(grpc.RpcError) as error:
                    raw_call(bare, path, streaming, secret)
                assert (rpc_code(error), reason(error)) == ("UNAUTHENTICATED", "INVALID_TOKEN"), service
                assert words in error.value.details(), (service, error.value.details())
        health = health_pb2_grpc.HealthStub(bare).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING          # health needs no token


def test_reflection_needs_a_token_of_any_role(coordinator):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with channel(coordinator.address) as bare:
        with pytest.raises(grpc.RpcError) as error:
            list(reflection_pb2_grpc.ServerReflectionStub(bare).ServerReflectionInfo(iter([request]), timeout=10))
        assert rpc_code(error) == "UNAUTHENTICATED" and "no token was sent" in error.value.details()
    for role in ("builder", "agent"):
        with channel(coordinator.address, token=coordinator.create_token(role, f"{role} browsing")[1]) as ch:
            reply = list(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([request]), timeout=10))
            assert "edgeforge.v1.Coordinator" in {s.name for s in reply[0].list_services_response.service}


def test_wrong_roles_are_refused_naming_role_and_service(coordinator):
    secrets = {role: coordinator.create_token(role, f"{role} of the test")[1] for role in ("builder", "agent")}
    refused = [("agent", "edgeforge.v1.Coordinator"), ("agent", "edgeforge.v1.ArtifactStore"),
               ("agent", "edgeforge.v1.DeviceRegistry"), ("agent", "google.longrunning.Operations"),
               ("builder", "edgeforge.v1.AgentGateway"), ("builder", "edgeforge.v1.Calibrator"),
               ("builder", "edgeforge.v1.Compressor"), ("builder", "edgeforge.v1.Exporter"),
               ("builder", "edgeforge.v1.Tokens"), ("agent", "edgeforge.v1.Tokens")]
    with channel(coordinator.address) as bare:
        for role, service in refused:
            with pytest.raises(grpc.RpcError) as error:
                raw_call(bare, *METHODS[service], secrets[role])
            assert (rpc_code(error), reason(error)) == ("PERMISSION_DENIED", "WRONG_ROLE"), (role, service)
            assert role in error.value.details() and service in error.value.details()
    for role, secret in secrets.items():                                   # WhoAmI answers any live token
        client = Client(coordinator.address, token=secret)
        assert client.whoami().role == {"builder": tokens_pb2.TOKEN_ROLE_BUILDER,
                                        "agent": tokens_pb2.TOKEN_ROLE_AGENT}[role]
        client.close()


def test_tokens_over_rpc_and_revocation_takes_effect_at_once(coordinator):
    token_id, secret = coordinator.create_token("builder", "team vision")
    builder = Client(coordinator.address, token=secret)
    try:
        me = builder.whoami()
        assert me.name == f"tokens/{token_id}" and me.role == tokens_pb2.TOKEN_ROLE_BUILDER
        assert builder.list_builds() == []
        listed = {t.name: t for t in coordinator.list_tokens()}
        assert listed[f"tokens/{token_id}"].display_name == "team vision"
        assert not listed[f"tokens/{token_id}"].HasField("revoke_time")
        with pytest.raises(grpc.RpcError) as error:
            builder.create_token("admin", "escalation")
        assert rpc_code(error) == "PERMISSION_DENIED" and "builder" in error.value.details()
        coordinator.revoke_token(token_id)
        with pytest.raises(grpc.RpcError) as error:                          # the very next call
            builder.list_builds()
        assert rpc_code(error) == "UNAUTHENTICATED" and "revoked" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            coordinator.revoke_token("nope1234")
        assert rpc_code(error) == "NOT_FOUND"
    finally:
        builder.close()


def test_builders_see_only_their_own_artifacts(coordinator, tmp_path):
    a = Client(coordinator.address, token=coordinator.create_token("builder", "team a")[1])
    b = Client(coordinator.address, token=coordinator.create_token("builder", "team b")[1])
    try:
        (tmp_path / "a.txt").write_text("team a's private calibration text")
        mine = a.upload(tmp_path / "a.txt", common_pb2.ARTIFACT_KIND_DATASET)
        assert a.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=mine.name)).sha256 == mine.sha256
        for call in (lambda: b.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=mine.name)),
                     lambda: list(b.artifacts.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name=mine.name))),
                     lambda: b.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name="artifacts/" + "0" * 64))):
            with pytest.raises(grpc.RpcError) as error:                      # AIP-211: absent or not, the same
                call()
            assert (rpc_code(error), reason(error)) == ("PERMISSION_DENIED", "NOT_OWNER")
            assert "not visible to the builder token" in error.value.details()
        listing = a.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest())
        assert [x.name for x in listing.artifacts] == [mine.name]
        assert list(b.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest()).artifacts) == []
        assert [x.name for x in coordinator.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest()).artifacts] \
            == [mine.name]                                                     # the admin sees all
        upload = a.artifacts.CreateUpload(coordinator_pb2.CreateUploadRequest(
            kind=common_pb2.ARTIFACT_KIND_DATASET, size_bytes=3, sha256="1" * 64))
        with pytest.raises(grpc.RpcError) as error:                          # another's upload session
            b.artifacts.GetUpload(coordinator_pb2.GetUploadRequest(name=upload.name))
        assert rpc_code(error) == "PERMISSION_DENIED"
        claim = b.artifacts.CreateUpload(coordinator_pb2.CreateUploadRequest(     # knowing the digest is not
            kind=common_pb2.ARTIFACT_KIND_DATASET, size_bytes=mine.size_bytes, sha256=mine.sha256))  # holding it
        assert claim.state == coordinator_pb2.UPLOAD_STATE_ACTIVE and claim.committed_bytes == 0
        with pytest.raises(grpc.RpcError) as error:
            b.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=mine.name))
        assert rpc_code(error) == "PERMISSION_DENIED"
        (tmp_path / "b.txt").write_text("team a's private calibration text")  # the same bytes, uploaded by b
        assert b.upload(tmp_path / "b.txt", common_pb2.ARTIFACT_KIND_DATASET).name == mine.name
        assert b.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=mine.name)).name == mine.name
    finally:
        a.close()
        b.close()


def _tiny_spec(tiny_model_dir, assets):
    return spec_file.parse({
        "name": "tiny", "model": {"path": str(tiny_model_dir)},
        "calibration": {"text_file": str(assets / "data" / "calib.txt"), "samples": 2, "sequence_length": 32},
        "evaluation": {"text_file": str(assets / "data" / "eval.txt"), "max_tokens": 128, "window_tokens": 64},
        "targets": [{"selector": {"device": "test-host"}}],
        "candidates": [{"format": "gguf", "quantization": {"type": "q4_0"}}],
        "benchmark": {"prompt_tokens": 8, "generation_tokens": 4, "warmup_runs": 1, "timed_runs": 2,
                      "min_duration_ms": 0, "cooldown_ms": 0, "skip_throughput": True}}, tiny_model_dir.parent)


def test_builders_see_only_their_own_builds_and_their_outputs(coordinator, agent, tiny_model_dir, assets, tmp_path):
    a = Client(coordinator.address, token=coordinator.create_token("builder", "team a")[1])
    b = Client(coordinator.address, token=coordinator.create_token("builder", "team b")[1])
    try:
        operation = a.create_build(_tiny_spec(tiny_model_dir, assets))
        name = build_name(operation.name)
        refused = [lambda: b.get_build(name),
                   lambda: b.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation.name)),
                   lambda: b.cancel(operation.name),
                   lambda: b.get_build("builds/b-doesnotexist")]
        for call in refused:
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert (rpc_code(error), reason(error)) == ("PERMISSION_DENIED", "NOT_OWNER"), error.value.details()
        assert b.list_builds() == [] and [x.name for x in a.list_builds()] == [name]
        assert not b.operations.ListOperations(operations_pb2.ListOperationsRequest()).operations
        spec = coordinator_pb2.BuildSpec()
        spec.CopyFrom(a.get_build(name).spec)
        with pytest.raises(grpc.RpcError) as error:                          # b may not build from a's model
            b.coordinator.CreateBuild(coordinator_pb2.CreateBuildRequest(spec=spec))
        assert rpc_code(error) == "PERMISSION_DENIED" and "not visible to the builder token" in error.value.details()
        operation = a.wait(operation.name)
        build = a.get_build(name)
        assert build.state == coordinator_pb2.BUILD_STATE_SUCCEEDED, build.error.message
        outputs = [build.report_json_artifact, build.reference_model, build.candidates[0].artifact]
        for output in outputs:                                              # granted through the build record
            assert a.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=output)).name == output
            with pytest.raises(grpc.RpcError) as error:
                b.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=output))
            assert rpc_code(error) == "PERMISSION_DENIED"
        listing = a.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest(page_size=100))
        listed = {x.name for x in listing.artifacts}
        assert set(outputs) <= listed
    finally:
        a.close()
        b.close()


def test_an_agent_fetches_only_its_own_live_leases(coordinator, tmp_path):
    ctx = coordinator.ctx
    (tmp_path / "blob.bin").write_bytes(b"model bytes for the device")
    artifact = coordinator.upload(tmp_path / "blob.bin", common_pb2.ARTIFACT_KIND_EXPORTED_MODEL)
    mine, other = (coordinator.create_token("agent", name)[1] for name in ("lab host 1", "lab host 2"))
    with channel(coordinator.address, token=mine) as ch1, channel(coordinator.address, token=other) as ch2:
        gateway, stranger = agent_pb2_grpc.AgentGatewayStub(ch1), agent_pb2_grpc.AgentGatewayStub(ch2)
        gateway.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="dev-1"), timeout=10)
        with pytest.raises(grpc.RpcError) as error:                          # another live token's device
            stranger.RegisterAgent(agent_pb2.RegisterAgentRequest(device_id="dev-1"), timeout=10)
        assert rpc_code(error) == "PERMISSION_DENIED" and "devices/dev-1" in error.value.details()
        ctx.scheduler.enqueue("b-x", "c", "dev-1", agent_pb2.BenchmarkJob(artifact=artifact.name))
        lease = gateway.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/dev-1", wait_ms=0), timeout=10).lease
        data = b"".join(c.data for c in gateway.FetchArtifact(agent_pb2.FetchArtifactRequest(lease=lease.name)))
        assert data == b"model bytes for the device"
        for call in (lambda: list(stranger.FetchArtifact(agent_pb2.FetchArtifactRequest(lease=lease.name))),
                     lambda: stranger.LeaseJob(agent_pb2.LeaseJobRequest(device="devices/dev-1"), timeout=10)):
            with pytest.raises(grpc.RpcError) as error:
                call()
            assert (rpc_code(error), reason(error)) == ("PERMISSION_DENIED", "NOT_OWNER")
        gateway.ReportResult(agent_pb2.ReportResultRequest(lease=lease.name, measurement=common_pb2.Measurement(
            latency=common_pb2.LatencyStats(samples_ms=[1.0]))), timeout=10)
        with pytest.raises(grpc.RpcError) as error:                          # the lease is over: no more bytes
            list(gateway.FetchArtifact(agent_pb2.FetchArtifactRequest(lease=lease.name)))
        assert (rpc_code(error), reason(error)) == ("FAILED_PRECONDITION", "LEASE_EXPIRED")


def test_a_standalone_worker_checks_callers_with_whoami(coordinator, tmp_path):
    from services.calibrator.server import create_server
    from shared.artifact_access import RemoteArtifacts
    to_coordinator = channel(coordinator.address, token=coordinator.admin_token)
    access = RemoteArtifacts(coordinator.address, tmp_path / "cache", token=coordinator.admin_token)
    server, port = create_server("127.0.0.1:0", access, RemoteVerifier(to_coordinator))
    address = f"127.0.0.1:{port}"
    _, builder = coordinator.create_token("builder", "not an admin")
    admin_id, admin = coordinator.create_token("admin", "worker caller")
    request = calibrator_pb2.CalibrateRequest(model="artifacts/" + "0" * 64, dataset="artifacts/" + "1" * 64)
    try:
        for secret, code, words in ((None, "UNAUTHENTICATED", "no token"), ("ef_" + "q" * 43, "UNAUTHENTICATED",
                                                                           "unknown bearer token"),
                                    (builder, "PERMISSION_DENIED", "builder")):
            with channel(address, token=secret) as ch, pytest.raises(grpc.RpcError) as error:
                calibrator_pb2_grpc.CalibratorStub(ch).Calibrate(request, timeout=30)
            assert rpc_code(error) == code and words in error.value.details(), error.value.details()
        with channel(address, token=admin) as ch:
            with pytest.raises(grpc.RpcError) as error:                      # let in: the handler answers
                calibrator_pb2_grpc.CalibratorStub(ch).Calibrate(request, timeout=30)
            assert rpc_code(error) not in ("UNAUTHENTICATED", "PERMISSION_DENIED"), error.value.details()
            coordinator.revoke_token(admin_id)
            with pytest.raises(grpc.RpcError) as error:                      # no cache in the worker either
                calibrator_pb2_grpc.CalibratorStub(ch).Calibrate(request, timeout=30)
            assert rpc_code(error) == "UNAUTHENTICATED" and "revoked" in error.value.details()
    finally:
        server.stop(0).wait()
        to_coordinator.close()


def test_admin_token_file_is_private_and_reused(coordinator, tmp_path):
    from services.coordinator.server import create_server
    path = tmp_path / "data" / "admin.token"
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text().strip() == coordinator.admin_token
    server, _, ctx = create_server("127.0.0.1:0", tmp_path / "data")              # a restart reuses it while live
    server.stop(0).wait()
    assert ctx.admin_token == coordinator.admin_token
    coordinator.revoke_token(coordinator.whoami().name)
    server, _, ctx = create_server("127.0.0.1:0", tmp_path / "data")              # revoked: replaced
    server.stop(0).wait()
    assert ctx.admin_token != coordinator.admin_token and path.read_text().strip() == ctx.admin_token
