"""One real coordinator with embedded workers per test module, on 127.0.0.1:0, and what the corpus needs
around it: authenticated stubs, uploads, the valid inputs bad cases start from, and a snapshot of what
the store shows (artifact list, files on disk) to prove a failed call left nothing behind."""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import grpc
import pytest

from edgeforge.v1 import (agent_pb2_grpc, tokens_pb2_grpc, calibrator_pb2_grpc, common_pb2, compressor_pb2_grpc,
                          coordinator_pb2, coordinator_pb2_grpc, exporter_pb2_grpc)
from google.longrunning import operations_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared import server as bootstrap

STUBS = {"Coordinator": coordinator_pb2_grpc.CoordinatorStub, "Operations": operations_pb2_grpc.OperationsStub,
         "ArtifactStore": coordinator_pb2_grpc.ArtifactStoreStub,
         "DeviceRegistry": coordinator_pb2_grpc.DeviceRegistryStub, "AgentGateway": agent_pb2_grpc.AgentGatewayStub,
         "Calibrator": calibrator_pb2_grpc.CalibratorStub, "Compressor": compressor_pb2_grpc.CompressorStub,
         "Exporter": exporter_pb2_grpc.ExporterStub, "Tokens": tokens_pb2_grpc.TokensStub,
         "Health": health_pb2_grpc.HealthStub}
CALL_TIMEOUT_S = 120
UPLOAD_CHUNK = 1 << 20


def open_channel(address: str, token: str | None) -> grpc.Channel:
    """THE one place the corpus makes channels (admin, builder, agent or none)."""
    return bootstrap.channel(address, token=token)


@dataclasses.dataclass
class Env:
    """The running server and what cases use of it."""
    address: str
    data_dir: Path
    ctx: object
    channel: grpc.Channel            # authenticated as admin
    bare: grpc.Channel               # no token: cases send their own metadata
    tokens: dict[str, str]           # role -> secret
    scratch: Path
    tokenizer_dir: Path              # a real tokenizer (SmolLM2's) for the models that run
    memo: dict = dataclasses.field(default_factory=dict)

    def stub(self, service: str, bare: bool = False):
        return STUBS[service](self.bare if bare else self.channel)

    def put(self, data: bytes, kind: int = common_pb2.ARTIFACT_KIND_SOURCE_MODEL, display_name: str = "blob") -> str:
        """Uploads `data` (deduplicated by digest) and returns its artifact name."""
        store = self.stub("ArtifactStore")
        upload = store.CreateUpload(coordinator_pb2.CreateUploadRequest(
            kind=kind, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), display_name=display_name),
            timeout=CALL_TIMEOUT_S)
        if upload.state != coordinator_pb2.UPLOAD_STATE_SUCCEEDED:
            chunks = [coordinator_pb2.WriteUploadRequest(upload=upload.name, offset=0, data=data[:UPLOAD_CHUNK])] + \
                [coordinator_pb2.WriteUploadRequest(data=data[i:i + UPLOAD_CHUNK])
                 for i in range(UPLOAD_CHUNK, len(data), UPLOAD_CHUNK)]
            upload = store.WriteUpload(iter(chunks), timeout=CALL_TIMEOUT_S)
        assert upload.state == coordinator_pb2.UPLOAD_STATE_SUCCEEDED
        return upload.artifact.name

    def dataset(self, data: bytes, display_name: str = "data.txt") -> str:
        return self.put(data, common_pb2.ARTIFACT_KIND_DATASET, display_name)

    def once(self, key: str, make):
        """`make()` the first time `key` is asked for, then the same value (valid inputs shared by cases)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def snapshot(self) -> tuple[list[str], list[str]]:
        """(every artifact name, every file under the data directory) as the store shows them. Left out: the
        database files, the blob store's temp area, and the workers' unpacked copies of stored artifacts."""
        listed = self.stub("ArtifactStore").ListArtifacts(coordinator_pb2.ListArtifactsRequest(page_size=1000),
                                                          timeout=CALL_TIMEOUT_S)
        assert not listed.next_page_token
        names = sorted(a.name for a in listed.artifacts)
        stored = {name.removeprefix("artifacts/") for name in names}
        files = []
        for path in sorted(self.data_dir.rglob("*")):
            parts = path.relative_to(self.data_dir).parts
            if path.is_dir() or parts[0].startswith("edgeforge.db") or parts[:2] == ("blobs", "tmp"):
                continue
            if parts[0] == "cache" and len(parts) > 3 and parts[1] in ("models", "modules", "unpacked") \
                    and parts[2] in stored:
                continue
            files.append("/".join(parts))
        return names, files

    def assert_alive(self) -> None:
        """The server still answers: its health check, and a cheap real RPC."""
        health = self.stub("Health", bare=True).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        self.stub("Coordinator").ListBuilds(coordinator_pb2.ListBuildsRequest(page_size=1), timeout=10)


@pytest.fixture(scope="module")
def env(tmp_path_factory, smollm2_dir):
    from services.coordinator.server import create_server
    root = tmp_path_factory.mktemp("bad-inputs")
    server, port, ctx = create_server("127.0.0.1:0", root / "data", device_wait_s=0.5, lease_ttl_s=2.0, auth=True)
    ctx.store.max_upload_bytes = 1 << 30          # a 1 GiB limit, so a claimed 10 GB upload is over it
    tokens = {role: ctx.tokens.create(role, f"bad-inputs {role}")[1] for role in ("admin", "builder", "agent")}
    address = f"127.0.0.1:{port}"
    scratch = root / "scratch"
    scratch.mkdir()
    env = Env(address, root / "data", ctx, open_channel(address, tokens["admin"]),
              open_channel(address, None), tokens, scratch, smollm2_dir)
    bootstrap.wait_ready(address)
    yield env
    env.channel.close()
    env.bare.close()
    server.stop(0).wait()
