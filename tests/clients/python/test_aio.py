"""The asyncio SDK against a real coordinator: a whole build through `AsyncClient.build` (a real agent
measures it), streaming upload and download on grpc.aio, the same typed errors as the sync client, and
mutual TLS."""
from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from clients.python.aio import AsyncClient
from clients.python.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable
from clients.python.results import BuildState
from edgeforge.v1 import common_pb2, coordinator_pb2
from shared.grpc_status import error_details
from shared.server import ClientTls, ServerTls
from tests.integration.test_tls import _serve as serve_tls, pki  # noqa: F401  (pki: a fixture used by name)


def test_async_build_end_to_end(coordinator, agent, build_yaml, tmp_path):
    async def run():
        async with AsyncClient(coordinator.address, token=coordinator.admin_token) as client:
            uploads, progress = [], []
            result = await client.build(build_yaml, on_progress=progress.append, timeout=600,
                                        on_upload=lambda what, done, total: uploads.append((what, done, total)))
            watched = [p async for p in client.watch(result.operation)]
            report = await client.report(result.build)
            downloaded = await client.download(result.targets[0].artifact, tmp_path / "chosen.gguf")
            return result, uploads, progress, watched, report, downloaded, await client.list_builds()

    result, uploads, progress, watched, report, downloaded, builds = asyncio.run(run())
    assert result.passed and result.state is BuildState.SUCCEEDED, result.failures()
    (target,) = result.targets
    assert target.candidate_id == "gguf-q8_0" and target.p90_ms > 0 and target.quality.metric == "perplexity"
    last = {what: (done, total) for what, done, total in uploads}          # each file's final report
    assert set(last) == {"model", "calibration", "evaluation"} and all(d == t for d, t in last.values())
    assert progress[-1].stage == coordinator_pb2.BUILD_STAGE_DONE
    assert [p.stage for p in watched] == [coordinator_pb2.BUILD_STAGE_DONE]
    assert report.document == result.report and report.document["devices"][0]["chosen"] == "gguf-q8_0"
    assert downloaded.stat().st_size == target.size_bytes and downloaded.read_bytes()[:4] == b"GGUF"
    assert [b.name for b in builds] == [result.build]
    # The sync client reads the very same result.
    assert coordinator.result(result.build) == result


def test_async_calls_and_typed_errors(coordinator, agent, tmp_path, monkeypatch):
    blob = tmp_path / "notes.txt"
    blob.write_text("calibration text, uploaded and read back over grpc.aio\n" * 1000)

    async def run():
        async with AsyncClient(coordinator.address, token=coordinator.admin_token) as client:
            me = await client.whoami()
            devices = await client.list_devices({"device": "test-host"})
            artifact = await client.upload_dataset(blob)
            text = await client.read_text(artifact.name)
            token_id, secret = await client.create_token("builder", "async builder")
            listed = [t.name for t in await client.list_tokens()]
            with pytest.raises(InvalidArgument) as bad:
                await client.create_build(coordinator_pb2.BuildSpec())
            with pytest.raises(NotFound) as missing:
                await client.get_build("b-does-not-exist")
            async with AsyncClient(coordinator.address, token=secret) as builder:
                with pytest.raises(PermissionDenied):
                    await builder.create_token("admin", "escalation")
            revoked = await client.revoke_token(token_id)
            return me, devices, artifact, text, token_id, listed, bad.value, missing.value, revoked

    me, devices, artifact, text, token_id, listed, bad, missing, revoked = asyncio.run(run())
    assert me.role == 1 and [d.attributes["device"] for d in devices] == ["test-host"]
    assert artifact.kind == common_pb2.ARTIFACT_KIND_DATASET and text == blob.read_text()
    assert f"tokens/{token_id}" in listed and revoked.HasField("revoke_time")
    assert bad.field == "model.artifact" and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert isinstance(bad.__cause__, grpc.aio.AioRpcError) and error_details(bad) == ("INVALID_FIELD", bad.metadata)
    assert missing.code() == grpc.StatusCode.NOT_FOUND and "b-does-not-exist" in missing.details()

    monkeypatch.delenv("EDGEFORGE_TOKEN", raising=False)
    monkeypatch.delenv("EDGEFORGE_TOKEN_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]

    async def refused():
        async with AsyncClient(coordinator.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_builds()
        async with AsyncClient(f"127.0.0.1:{closed}", token="ef_x") as nowhere:
            with pytest.raises(Unavailable) as down:
                await nowhere.whoami()
        return down.value

    assert asyncio.run(refused()).code() == grpc.StatusCode.UNAVAILABLE


def test_async_client_speaks_mutual_tls(pki, tmp_path):
    """The certificates of tests/integration/test_tls.py: with its client certificate the async client gets
    in (and uploads, a client-streaming call, over TLS); without one the handshake is refused."""
    server, address, ctx = serve_tls(tmp_path, ServerTls(pki["server_cert"], pki["server_key"], pki["ca"]))
    blob = tmp_path / "over-tls.txt"
    blob.write_text("sent over mutual TLS\n")

    async def run():
        mutual = ClientTls(pki["ca"], pki["client_cert"], pki["client_key"])
        async with AsyncClient(address, token=ctx.admin_token, tls=mutual) as client:
            me, artifact = await client.whoami(), await client.upload_dataset(blob)
        async with AsyncClient(address, token=ctx.admin_token, tls=ClientTls(pki["ca"])) as no_certificate:
            with pytest.raises(Unavailable):
                await no_certificate.whoami()
        return me, artifact

    try:
        me, artifact = asyncio.run(run())
        assert me.display_name == "coordinator (internal)" and artifact.size_bytes == blob.stat().st_size
    finally:
        server.stop(0).wait()
