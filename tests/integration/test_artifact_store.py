"""The ArtifactStore over real gRPC: uploads (resume, dedup, digest), reads from an offset, and bad input
that leaves nothing behind."""
from __future__ import annotations

import hashlib

import grpc
import pytest
from status_checks import rpc_code, reason

from clients.python import transfer
from edgeforge.v1 import common_pb2, coordinator_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

DATASET = common_pb2.ARTIFACT_KIND_DATASET


def _blob(size: int) -> bytes:
    return bytes((i * 7919) % 251 for i in range(size))


def test_upload_download_round_trip_with_offset(coordinator, tmp_path):
    data = _blob(3 * (1 << 20) + 123)
    source = tmp_path / "blob.bin"
    source.write_bytes(data)
    artifact = coordinator.upload(source, DATASET)
    assert artifact.sha256 == hashlib.sha256(data).hexdigest() and artifact.size_bytes == len(data)
    assert artifact.name == f"artifacts/{artifact.sha256}"
    stream = coordinator.artifacts.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name=artifact.name, offset=1000))
    received = b"".join(m.data for m in stream)
    assert received == data[1000:]
    assert coordinator.download(artifact.name, tmp_path / "copy.bin").read_bytes() == data


def test_same_bytes_are_stored_once(coordinator, tmp_path):
    source = tmp_path / "a.txt"
    source.write_bytes(b"hello edgeforge\n")
    first = coordinator.upload(source, DATASET)
    upload = coordinator.artifacts.CreateUpload(coordinator_pb2.CreateUploadRequest(
        kind=DATASET, size_bytes=first.size_bytes, sha256=first.sha256))
    assert upload.state == coordinator_pb2.UPLOAD_STATE_SUCCEEDED and upload.artifact.name == first.name


def test_interrupted_upload_resumes_from_committed_offset(coordinator, tmp_path):
    data = _blob(2 * (1 << 20) + 17)
    sha = hashlib.sha256(data).hexdigest()
    upload = coordinator.artifacts.CreateUpload(coordinator_pb2.CreateUploadRequest(
        kind=DATASET, size_bytes=len(data), sha256=sha, request_id="resume-1"))
    # First stream delivers 1 MiB and then the client goes away.
    upload = coordinator.artifacts.WriteUpload(iter([coordinator_pb2.WriteUploadRequest(
        upload=upload.name, offset=0, data=data[:1 << 20])]))
    assert upload.committed_bytes == 1 << 20 and upload.state == coordinator_pb2.UPLOAD_STATE_ACTIVE
    with pytest.raises(grpc.RpcError):
        coordinator.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=f"artifacts/{sha}"))
    # Writing at the wrong offset is refused and says where to resume.
    with pytest.raises(grpc.RpcError) as error:
        coordinator.artifacts.WriteUpload(iter([coordinator_pb2.WriteUploadRequest(upload=upload.name, offset=0,
                                                                                   data=data[:10])]))
    assert rpc_code(error) == "OUT_OF_RANGE" and reason(error) == "UPLOAD_OFFSET_MISMATCH"
    assert "1048576" in error.value.details()
    status = coordinator.artifacts.GetUpload(coordinator_pb2.GetUploadRequest(name=upload.name))
    done = coordinator.artifacts.WriteUpload(iter([coordinator_pb2.WriteUploadRequest(
        upload=upload.name, offset=status.committed_bytes, data=data[status.committed_bytes:])]))
    assert done.state == coordinator_pb2.UPLOAD_STATE_SUCCEEDED and done.artifact.sha256 == sha
    # The same request_id with the same body returns the same upload.
    again = coordinator.artifacts.CreateUpload(coordinator_pb2.CreateUploadRequest(
        kind=DATASET, size_bytes=len(data), sha256=sha, request_id="resume-1"))
    assert again.name == upload.name


def test_wrong_digest_stores_nothing(coordinator, tmp_path):
    data = b"these bytes do not hash to the declared digest"
    upload = coordinator.artifacts.CreateUpload(coordinator_pb2.CreateUploadRequest(
        kind=DATASET, size_bytes=len(data), sha256="ab" * 32))
    with pytest.raises(grpc.RpcError) as error:
        coordinator.artifacts.WriteUpload(iter([coordinator_pb2.WriteUploadRequest(upload=upload.name, data=data)]))
    assert rpc_code(error) == "INVALID_ARGUMENT" and reason(error) == "DIGEST_MISMATCH"
    assert hashlib.sha256(data).hexdigest() in error.value.details()
    listed = coordinator.artifacts.ListArtifacts(coordinator_pb2.ListArtifactsRequest())
    assert list(listed.artifacts) == []
    blobs = list((coordinator.ctx.store.blobs.root / "sha256").rglob("*"))
    assert [p for p in blobs if p.is_file()] == []


def test_bad_requests_get_precise_errors_and_the_server_keeps_serving(coordinator):
    stub = coordinator.artifacts
    cases = [
        (lambda: stub.CreateUpload(coordinator_pb2.CreateUploadRequest(kind=DATASET, size_bytes=1, sha256="xyz")),
         "INVALID_ARGUMENT", "sha256"),
        (lambda: stub.CreateUpload(coordinator_pb2.CreateUploadRequest(size_bytes=1, sha256="a" * 64)),
         "INVALID_ARGUMENT", "kind"),
        (lambda: stub.CreateUpload(coordinator_pb2.CreateUploadRequest(kind=DATASET, size_bytes=10 << 40,
                                                                       sha256="a" * 64)),
         "RESOURCE_EXHAUSTED", "size_bytes"),
        (lambda: stub.GetArtifact(coordinator_pb2.GetArtifactRequest(name="artifacts/" + "0" * 64)),
         "NOT_FOUND", None),
        (lambda: stub.GetArtifact(coordinator_pb2.GetArtifactRequest(name="../etc/passwd")), "INVALID_ARGUMENT",
         "name"),
        (lambda: stub.GetUpload(coordinator_pb2.GetUploadRequest(name="uploads/../../x")), "INVALID_ARGUMENT",
         "upload"),
        (lambda: list(stub.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name="artifacts/" + "1" * 64))),
         "NOT_FOUND", None),
        (lambda: stub.ListArtifacts(coordinator_pb2.ListArtifactsRequest(page_token="garbage")),
         "INVALID_ARGUMENT", "page_token"),
    ]
    for call, code, field in cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert rpc_code(error) == code, error.value.details()
        if field:
            from shared.grpc_status import error_details
            assert error_details(error.value)[1].get("field") == field
    health = health_pb2_grpc.HealthStub(coordinator.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_every_service(coordinator):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    stub = reflection_pb2_grpc.ServerReflectionStub(coordinator.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"edgeforge.v1.Coordinator", "edgeforge.v1.ArtifactStore", "edgeforge.v1.DeviceRegistry",
            "edgeforge.v1.AgentGateway", "edgeforge.v1.Calibrator", "edgeforge.v1.Compressor",
            "edgeforge.v1.Exporter", "google.longrunning.Operations", "grpc.health.v1.Health"} <= names


def test_transfer_download_rejects_a_wrong_digest(coordinator, tmp_path):
    source = tmp_path / "x.txt"
    source.write_bytes(b"some bytes")
    artifact = coordinator.upload(source, DATASET)
    read = lambda offset: coordinator.artifacts.ReadArtifact(coordinator_pb2.ReadArtifactRequest(
        name=artifact.name, offset=offset))
    with pytest.raises(transfer.TransferError):
        transfer.download(read, tmp_path / "out.txt", "f" * 64, artifact.size_bytes)
    assert not (tmp_path / "out.txt").exists() and not (tmp_path / "out.txt.part").exists()
