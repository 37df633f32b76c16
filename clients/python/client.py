"""The edgeforge Python SDK: upload inputs, create builds, follow them, fetch results.

    client = Client("127.0.0.1:50051", token=secret)   # or $EDGEFORGE_TOKEN / $EDGEFORGE_TOKEN_FILE
    operation = client.create_build(spec.load(Path("build.yaml")))
    operation = client.wait(operation.name, on_progress=print)
    build = client.get_build(f"builds/{operation.name.split('/')[1]}")

Every call carries a bearer token (`resolve_token`: the argument, $EDGEFORGE_TOKEN, a token file from
$EDGEFORGE_TOKEN_FILE, else ./.edgeforge/admin.token when present); `tls=ClientTls(...)` speaks TLS.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Callable

from google.longrunning import operations_pb2_grpc, operations_proto_pb2 as operations_pb2
from google.protobuf import duration_pb2

from clients.python import transfer
from clients.python.spec import SpecError, SpecFile
from edgeforge.v1 import agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc, tokens_pb2, tokens_pb2_grpc
from shared.server import ClientTls, channel

DATASET_MEDIA_TYPES = {".npz": "application/x-npz", ".json": "application/json", ".jsonl": "application/jsonl"}
# Single-file source models besides GGUF, by suffix; the compressor's ImportModel checks the content.
MODEL_MEDIA_TYPES = {".onnx": "application/x-onnx", ".pt2": "application/x-torch-exported-program",
                     ".pth": "application/x-torch-state-dict", ".tar": "application/x-tar"}
DEFAULT_TOKEN_FILE = Path(".edgeforge") / "admin.token"
ROLES = {"admin": tokens_pb2.TOKEN_ROLE_ADMIN, "builder": tokens_pb2.TOKEN_ROLE_BUILDER,
         "agent": tokens_pb2.TOKEN_ROLE_AGENT}


def resolve_token(token: str | None = None, token_file: Path | None = None) -> str | None:
    """The first of: `token`, $EDGEFORGE_TOKEN, `token_file`, $EDGEFORGE_TOKEN_FILE, ./.edgeforge/admin.token."""
    if token:
        return token.strip()
    if os.environ.get("EDGEFORGE_TOKEN"):
        return os.environ["EDGEFORGE_TOKEN"].strip()
    path = token_file or (Path(os.environ["EDGEFORGE_TOKEN_FILE"]) if os.environ.get("EDGEFORGE_TOKEN_FILE")
                          else DEFAULT_TOKEN_FILE if DEFAULT_TOKEN_FILE.is_file() else None)
    return path.read_text().strip() if path is not None else None


class Client:
    def __init__(self, address: str, *, token: str | None = None, tls: ClientTls | None = None):
        self.address = address
        self.token = resolve_token(token)
        self.channel = channel(address, token=self.token, tls=tls)
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.operations = operations_pb2_grpc.OperationsStub(self.channel)
        self.artifacts = coordinator_pb2_grpc.ArtifactStoreStub(self.channel)
        self.devices = coordinator_pb2_grpc.DeviceRegistryStub(self.channel)
        self.agents = agent_pb2_grpc.AgentGatewayStub(self.channel)
        self.tokens = tokens_pb2_grpc.TokensStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------------ artifacts
    def upload(self, path: Path, kind: int, *, display_name: str = "", media_type: str = "",
               progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        return transfer.upload_file(self.artifacts, path, kind, display_name=display_name or path.name,
                                    media_type=media_type, progress=progress)

    def upload_model(self, path: Path, progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """An HF directory or an edgeforge module directory (sent as a deterministic tar bundle), a GGUF file,
        an ONNX file or a torch ExportedProgram (.pt2)."""
        if path.is_dir():
            from shared.models import bundle, modules
            from shared.errors import InvalidArgument
            pack = modules.pack if modules.is_module_dir(path) else bundle.pack
            with tempfile.TemporaryDirectory() as scratch:
                tar = Path(scratch) / f"{path.name}.tar"
                try:
                    pack(path, tar)
                except InvalidArgument as error:
                    raise SpecError("model.path", error.message) from error
                return self.upload(tar, common_pb2.ARTIFACT_KIND_SOURCE_MODEL, display_name=path.name,
                                   media_type=bundle.MEDIA_TYPE, progress=progress)
        if path.suffix.lower() in MODEL_MEDIA_TYPES:
            return self.upload(path, common_pb2.ARTIFACT_KIND_SOURCE_MODEL,
                               media_type=MODEL_MEDIA_TYPES[path.suffix.lower()],
                               progress=progress)
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise SpecError("model.path", f"{path.name} is neither a model directory, a GGUF file (its first bytes "
                                          f"are {magic!r}, not b'GGUF'), nor one of {', '.join(MODEL_MEDIA_TYPES)}")
        return self.upload(path, common_pb2.ARTIFACT_KIND_SOURCE_MODEL, media_type="application/x-gguf",
                           progress=progress)

    def upload_dataset(self, path: Path, progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """Text, JSON sentences or .npz images; the media type follows the suffix."""
        media_type = DATASET_MEDIA_TYPES.get(path.suffix.lower(), "text/plain")
        return self.upload(path, common_pb2.ARTIFACT_KIND_DATASET, media_type=media_type, progress=progress)

    def download(self, name: str, dest: Path, progress: transfer.Progress | None = None) -> Path:
        artifact = self.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=name), timeout=60)
        read = lambda offset: self.artifacts.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name=name, offset=offset),
                                                          timeout=3600)
        return transfer.download(read, dest, artifact.sha256, artifact.size_bytes, progress=progress)

    def read_text(self, name: str) -> str:
        with tempfile.TemporaryDirectory() as scratch:
            return self.download(name, Path(scratch) / "blob").read_text()

    # ------------------------------------------------------------------ builds
    def create_build(self, spec_file: SpecFile, *, request_id: str | None = None,
                     on_upload: Callable[[str, int, int], None] | None = None) -> operations_pb2.Operation:
        """Uploads the spec's model and text files (deduplicated by digest), then starts the build."""
        spec = coordinator_pb2.BuildSpec()
        spec.CopyFrom(spec_file.spec)
        report = (lambda what: (lambda done, total: on_upload(what, done, total))) if on_upload else (lambda what: None)
        spec.model.artifact = self.upload_model(spec_file.model_path, report("model")).name
        if spec_file.calibration_path is not None:
            spec.calibration.dataset = self.upload_dataset(spec_file.calibration_path, report("calibration")).name
        spec.evaluation.dataset = self.upload_dataset(spec_file.evaluation_path, report("evaluation")).name
        if spec_file.training_path is not None:
            spec.training.dataset = self.upload_dataset(spec_file.training_path, report("training")).name
        return self.coordinator.CreateBuild(
            coordinator_pb2.CreateBuildRequest(spec=spec, request_id=request_id or uuid.uuid4().hex), timeout=120)

    def wait(self, operation_name: str, on_progress: Callable[[coordinator_pb2.BuildProgress], None] | None = None,
             poll_s: float = 2.0) -> operations_pb2.Operation:
        while True:
            timeout = duration_pb2.Duration()
            timeout.FromNanoseconds(int(poll_s * 1e9))
            operation = self.operations.WaitOperation(operations_pb2.WaitOperationRequest(name=operation_name,
                                                                                         timeout=timeout),
                                                      timeout=poll_s + 30)
            if on_progress:
                progress = coordinator_pb2.BuildProgress()
                operation.metadata.Unpack(progress)
                on_progress(progress)
            if operation.done:
                return operation

    def get_build(self, name: str) -> coordinator_pb2.Build:
        return self.coordinator.GetBuild(coordinator_pb2.GetBuildRequest(name=name), timeout=60)

    def list_builds(self, page_size: int = 50) -> list[coordinator_pb2.Build]:
        return list(self.coordinator.ListBuilds(coordinator_pb2.ListBuildsRequest(page_size=page_size),
                                                timeout=60).builds)

    def cancel(self, operation_name: str) -> None:
        self.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation_name), timeout=30)

    def list_devices(self, selector: dict[str, str] | None = None) -> list[coordinator_pb2.Device]:
        return list(self.devices.ListDevices(coordinator_pb2.ListDevicesRequest(selector=selector or {}),
                                             timeout=30).devices)

    # ------------------------------------------------------------------ tokens (admin)
    def create_token(self, role: str, name: str) -> tuple[str, str]:
        """A new token of `role` ("admin", "builder", "agent"); returns (token id, secret), the secret only here."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        reply = self.tokens.CreateToken(tokens_pb2.CreateTokenRequest(role=ROLES[role], display_name=name), timeout=30)
        return reply.token.name.removeprefix("tokens/"), reply.secret

    def list_tokens(self) -> list[tokens_pb2.Token]:
        return list(self.tokens.ListTokens(tokens_pb2.ListTokensRequest(), timeout=30).tokens)

    def revoke_token(self, token_id: str) -> tokens_pb2.Token:
        name = token_id if token_id.startswith("tokens/") else f"tokens/{token_id}"
        return self.tokens.RevokeToken(tokens_pb2.RevokeTokenRequest(name=name), timeout=30)

    def whoami(self) -> tokens_pb2.Token:
        return self.tokens.WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=30)


def build_name(operation_name: str) -> str:
    return "builds/" + operation_name.removeprefix("operations/")
