"""The edgeforge Python SDK, synchronous client: upload inputs, run builds, follow them, read results.

    from clients.python.client import Client

    with Client("127.0.0.1:50051") as client:     # token: $EDGEFORGE_TOKEN, $EDGEFORGE_TOKEN_FILE, ...
        result = client.build("build.yaml", on_progress=lambda p: print(p.percent, p.message))
        for target in result.targets:
            print(target.target, target.candidate_id, target.artifact, target.p90_ms, target.quality_delta_pct)
        if not result.passed:
            raise SystemExit("\\n".join(result.failures()))

`build` is submit + wait + fetch the result in one call; `create_build`, `wait`, `watch`, `result` and
`report` are the steps on their own. Low-level calls (`get_build`, `list_builds`, `list_devices`,
tokens) return the protos of proto/edgeforge/v1. Every failed call raises a typed
`clients.python.errors.ApiError` (`InvalidArgument`, `NotFound`, `Unauthenticated`, `Unavailable`,
...), itself a `grpc.RpcError`; a bad spec file raises `clients.python.spec.SpecError` before
anything is sent. `clients.python.aio.AsyncClient` offers the same calls for asyncio.

Every call carries a bearer token (`resolve_token`: the argument, $EDGEFORGE_TOKEN, a token file from
$EDGEFORGE_TOKEN_FILE, else ./.edgeforge/admin.token when present); `tls=ClientTls(...)` speaks TLS.
docs/SDK.md is the guide.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import types
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from google.longrunning import operations_proto_pb2 as operations_pb2
from google.longrunning import operations_pb2_grpc
from google.protobuf import duration_pb2

from clients.python import spec as spec_module
from clients.python import transfer
from clients.python.errors import DeadlineExceeded, FailedPrecondition, translated, typed_errors
from clients.python.results import BuildResult, Report, build_name, build_result, operation_name
from clients.python.spec import SpecError, SpecFile
from edgeforge.v1 import agent_pb2_grpc, common_pb2, coordinator_pb2, coordinator_pb2_grpc, tokens_pb2, tokens_pb2_grpc
from shared.server import ClientTls, channel

__all__ = ["Client", "resolve_token", "build_name", "SpecInput", "ProgressCallback", "UploadCallback"]

DATASET_MEDIA_TYPES = {".npz": "application/x-npz", ".json": "application/json", ".jsonl": "application/jsonl"}
# Single-file source models besides GGUF, by suffix; the compressor's ImportModel checks the content.
MODEL_MEDIA_TYPES = {".onnx": "application/x-onnx", ".pt2": "application/x-torch-exported-program",
                     ".pth": "application/x-torch-state-dict", ".tar": "application/x-tar"}
DEFAULT_TOKEN_FILE = Path(".edgeforge") / "admin.token"
ROLES = {"admin": tokens_pb2.TOKEN_ROLE_ADMIN, "builder": tokens_pb2.TOKEN_ROLE_BUILDER,
         "agent": tokens_pb2.TOKEN_ROLE_AGENT}
DEFAULT_POLL_S = 2.0

# A build spec: a YAML file's path, a parsed SpecFile (its local files are uploaded), or a BuildSpec
# proto whose artifact fields already name uploaded artifacts (sent as it is).
SpecInput = Union[SpecFile, coordinator_pb2.BuildSpec, Path, str]
ProgressCallback = Callable[[coordinator_pb2.BuildProgress], None]
UploadCallback = Callable[[str, int, int], None]       # (what: "model", "calibration", ...; bytes done; total)


def resolve_token(token: str | None = None, token_file: Path | None = None) -> str | None:
    """The first of: `token`, $EDGEFORGE_TOKEN, `token_file`, $EDGEFORGE_TOKEN_FILE, ./.edgeforge/admin.token."""
    if token:
        return token.strip()
    if os.environ.get("EDGEFORGE_TOKEN"):
        return os.environ["EDGEFORGE_TOKEN"].strip()
    path = token_file or (Path(os.environ["EDGEFORGE_TOKEN_FILE"]) if os.environ.get("EDGEFORGE_TOKEN_FILE")
                          else DEFAULT_TOKEN_FILE if DEFAULT_TOKEN_FILE.is_file() else None)
    return path.read_text().strip() if path is not None else None


# ---------------------------------------------------------------------- shared by Client and AsyncClient
@contextlib.contextmanager
def model_upload(path: Path) -> Iterator[tuple[Path, str, str]]:
    """(file to send, display name, media type) for a source model: an HF or edgeforge module directory
    (packed into a deterministic tar for the duration), a GGUF, ONNX, .pt2/.pth or .tar file.
    Raises SpecError("model.path") for anything else."""
    if path.is_dir():
        from shared.errors import InvalidArgument as BadModel
        from shared.models import bundle, modules
        pack = modules.pack if modules.is_module_dir(path) else bundle.pack
        with tempfile.TemporaryDirectory() as scratch:
            tar = Path(scratch) / f"{path.name}.tar"
            try:
                pack(path, tar)
            except BadModel as error:
                raise SpecError("model.path", error.message) from error
            yield tar, path.name, bundle.MEDIA_TYPE
        return
    if path.suffix.lower() in MODEL_MEDIA_TYPES:
        yield path, path.name, MODEL_MEDIA_TYPES[path.suffix.lower()]
        return
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise SpecError("model.path", f"cannot read {path}: {error.strerror}") from error
    if magic != b"GGUF":
        raise SpecError("model.path", f"{path.name} is neither a model directory, a GGUF file (its first bytes "
                                      f"are {magic!r}, not b'GGUF'), nor one of {', '.join(MODEL_MEDIA_TYPES)}")
    yield path, path.name, "application/x-gguf"


def dataset_media_type(path: Path) -> str:
    """Text, JSON sentences or .npz images: the media type follows the suffix."""
    return DATASET_MEDIA_TYPES.get(path.suffix.lower(), "text/plain")


def load_spec(spec: SpecInput) -> SpecFile | coordinator_pb2.BuildSpec:
    """A path is read and validated (SpecError names the bad field); a SpecFile or BuildSpec passes."""
    if isinstance(spec, (str, Path)):
        return spec_module.load(Path(spec))
    return spec


def spec_datasets(spec_file: SpecFile) -> list[tuple[str, Path]]:
    """The spec's local data files to upload, by section: ("calibration", path), ("evaluation", ...)."""
    files = [("calibration", spec_file.calibration_path), ("evaluation", spec_file.evaluation_path),
             ("training", spec_file.training_path)]
    return [(section, path) for section, path in files if path is not None]


def create_build_request(spec_file: SpecFile, model: str, datasets: dict[str, str],
                         request_id: str | None) -> coordinator_pb2.CreateBuildRequest:
    """The request for a spec whose files were uploaded as `model` and `datasets` {section: artifact}."""
    spec = coordinator_pb2.BuildSpec()
    spec.CopyFrom(spec_file.spec)
    spec.model.artifact = model
    for section, artifact in datasets.items():
        getattr(spec, section).dataset = artifact
    return coordinator_pb2.CreateBuildRequest(spec=spec, request_id=request_id or uuid.uuid4().hex)


def upload_progress(on_upload: UploadCallback | None, what: str) -> transfer.Progress | None:
    if on_upload is None:
        return None
    return lambda done, total: on_upload(what, done, total)


def wait_request(name: str, poll_s: float) -> operations_pb2.WaitOperationRequest:
    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(int(poll_s * 1e9))
    return operations_pb2.WaitOperationRequest(name=name, timeout=timeout)


def progress_of(operation: operations_pb2.Operation) -> coordinator_pb2.BuildProgress:
    progress = coordinator_pb2.BuildProgress()
    operation.metadata.Unpack(progress)
    return progress


def progress_key(progress: coordinator_pb2.BuildProgress) -> tuple[int, str, float, str]:
    """What `watch` compares to report a progress only when it changed."""
    return progress.stage, progress.candidate_id, progress.percent, progress.message


def check_deadline(deadline: float | None, operation: str) -> None:
    """Raises DeadlineExceeded once `deadline` (time.monotonic()) has passed; the build goes on."""
    if deadline is not None and time.monotonic() > deadline:
        raise DeadlineExceeded(f"{build_name(operation)} is still running at the timeout; it goes on: wait "
                               f"again with wait({operation!r}) or cancel({operation!r})")


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def report_of(build: coordinator_pb2.Build) -> str:
    """The report.json artifact of a build; FailedPrecondition when it has none (yet)."""
    if not build.report_json_artifact:
        state = coordinator_pb2.BuildState.Name(build.state).removeprefix("BUILD_STATE_").lower()
        raise FailedPrecondition(f"{build.name} has no report ({state}); reports are written when a build "
                                 "succeeds", reason="NO_REPORT")
    return build.report_json_artifact


def parse_report(build: coordinator_pb2.Build, text: str) -> Report:
    return Report(build=build.name, document=json.loads(text), json_artifact=build.report_json_artifact,
                  html_artifact=build.report_html_artifact)


def create_token_request(role: str, name: str) -> tokens_pb2.CreateTokenRequest:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    return tokens_pb2.CreateTokenRequest(role=ROLES[role], display_name=name)


def token_name(token_id: str) -> str:
    return token_id if token_id.startswith("tokens/") else f"tokens/{token_id}"


def resource_name(collection: str, name: str) -> str:
    """"b-42" or "builds/b-42" -> "builds/b-42"."""
    return name if name.startswith(f"{collection}/") else f"{collection}/{name}"


class Stubs:
    """The coordinator's services on one channel (blocking or grpc.aio): what both clients call."""

    def __init__(self, address: str, token: str | None, channel: Any):
        self.address = address
        self.token = token
        self.channel = channel
        self.coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
        self.operations = operations_pb2_grpc.OperationsStub(channel)
        self.artifacts = coordinator_pb2_grpc.ArtifactStoreStub(channel)
        self.devices = coordinator_pb2_grpc.DeviceRegistryStub(channel)
        self.agents = agent_pb2_grpc.AgentGatewayStub(channel)
        self.tokens = tokens_pb2_grpc.TokensStub(channel)


# ---------------------------------------------------------------------- the synchronous client
class Client(Stubs):
    """A blocking connection to a coordinator. Use it as a context manager, or call `close()`.

    `address` is "host:port"; `token` (else $EDGEFORGE_TOKEN, `token_file`, $EDGEFORGE_TOKEN_FILE,
    ./.edgeforge/admin.token) authenticates every call; `tls` speaks TLS (mutual TLS with a client
    certificate). Nothing is sent until the first call: a wrong address surfaces as `Unavailable` then.
    """

    def __init__(self, address: str, *, token: str | None = None, tls: ClientTls | None = None,
                 token_file: Path | None = None):
        token = resolve_token(token, token_file)
        super().__init__(address, token, channel(address, token=token, tls=tls))

    def close(self) -> None:
        """Closes the channel; calls after this fail."""
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: types.TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ artifacts
    @typed_errors
    def upload(self, path: Path, kind: common_pb2.ArtifactKind, *, display_name: str = "", media_type: str = "",
               progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """Uploads a file as an artifact of `kind` (resumable, deduplicated by sha256). Returns the Artifact."""
        return transfer.upload_file(self.artifacts, path, kind, display_name=display_name or path.name,
                                    media_type=media_type, progress=progress)

    def upload_model(self, path: Path, progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """Uploads a source model: an HF directory or an edgeforge module directory (sent as a deterministic
        tar bundle), a GGUF file, an ONNX file or a torch ExportedProgram (.pt2). Raises SpecError
        ("model.path") for anything else, ApiError when the upload fails."""
        with model_upload(path) as (file, display_name, media_type):
            return self.upload(file, common_pb2.ARTIFACT_KIND_SOURCE_MODEL, display_name=display_name,
                               media_type=media_type, progress=progress)

    def upload_dataset(self, path: Path, progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """Uploads text, JSON sentences or .npz images; the media type follows the suffix."""
        return self.upload(path, common_pb2.ARTIFACT_KIND_DATASET, media_type=dataset_media_type(path),
                           progress=progress)

    @typed_errors
    def download(self, name: str, dest: Path, progress: transfer.Progress | None = None) -> Path:
        """Downloads artifact `name` ("artifacts/{sha256}") to `dest`, resuming a partial `dest.part` and
        checking the digest. Returns `dest`. Raises NotFound, TransferError (digest mismatch)."""
        artifact = self.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=name), timeout=60)

        def read(offset: int) -> Iterator[coordinator_pb2.ReadArtifactResponse]:
            return self.artifacts.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name=name, offset=offset),
                                               timeout=3600)
        return transfer.download(read, dest, artifact.sha256, artifact.size_bytes, progress=progress)

    def read_text(self, name: str) -> str:
        """An artifact's content as text (for small ones: reports, logs)."""
        with tempfile.TemporaryDirectory() as scratch:
            return self.download(name, Path(scratch) / "blob").read_text()

    # ------------------------------------------------------------------ builds
    @typed_errors
    def create_build(self, spec_file: SpecFile | coordinator_pb2.BuildSpec, *, request_id: str | None = None,
                     on_upload: UploadCallback | None = None) -> operations_pb2.Operation:
        """Uploads the spec's model and data files (deduplicated by digest), then starts the build. A
        BuildSpec proto is sent as it is. Returns the long-running Operation ("operations/{build}").
        Raises SpecError (a local file is not a model), InvalidArgument (the server refused a field:
        `.field` names it), AlreadyExists (request_id reused with another spec)."""
        if isinstance(spec_file, coordinator_pb2.BuildSpec):
            request = coordinator_pb2.CreateBuildRequest(spec=spec_file, request_id=request_id or uuid.uuid4().hex)
        else:
            model = self.upload_model(spec_file.model_path, upload_progress(on_upload, "model")).name
            datasets = {section: self.upload_dataset(path, upload_progress(on_upload, section)).name
                        for section, path in spec_datasets(spec_file)}
            request = create_build_request(spec_file, model, datasets, request_id)
        return self.coordinator.CreateBuild(request, timeout=120)

    def _poll(self, operation_name: str, poll_s: float, deadline: float | None) -> Iterator[operations_pb2.Operation]:
        """The operation after each WaitOperation (which returns early when it finishes), until done."""
        while True:
            operation: operations_pb2.Operation = self.operations.WaitOperation(
                wait_request(operation_name, poll_s), timeout=poll_s + 30)
            yield operation
            if operation.done:
                return
            check_deadline(deadline, operation_name)

    @typed_errors
    def wait(self, operation_name: str, on_progress: ProgressCallback | None = None, poll_s: float = DEFAULT_POLL_S,
             *, timeout: float | None = None) -> operations_pb2.Operation:
        """Blocks until the operation is done; calls `on_progress` after every poll. Returns the finished
        Operation (its `error` set when the build failed or was cancelled). Raises NotFound,
        DeadlineExceeded after `timeout` seconds (the build keeps running)."""
        for operation in self._poll(operation_name, poll_s, deadline_after(timeout)):
            if on_progress:
                on_progress(progress_of(operation))
            if operation.done:
                return operation
        raise AssertionError("unreachable: _poll ends on a done operation")

    def watch(self, operation_name: str, *, poll_s: float = DEFAULT_POLL_S,
              timeout: float | None = None) -> Iterator[coordinator_pb2.BuildProgress]:
        """Yields the build's progress each time it changes, the last one when the operation is done.
        Raises NotFound, DeadlineExceeded after `timeout` seconds (the build keeps running)."""
        last = None
        with translated():
            for operation in self._poll(operation_name, poll_s, deadline_after(timeout)):
                progress = progress_of(operation)
                if progress_key(progress) != last or operation.done:
                    last = progress_key(progress)
                    yield progress

    @typed_errors
    def get_operation(self, operation_name: str) -> operations_pb2.Operation:
        """The operation now ("operations/{build}"): done or not, its progress in `metadata`. Raises NotFound."""
        return self.operations.GetOperation(
            operations_pb2.GetOperationRequest(name=operation_name), timeout=60)

    @typed_errors
    def get_build(self, name: str) -> coordinator_pb2.Build:
        """The Build resource ("builds/{build}"): spec, state, candidates, per-device results. Raises NotFound."""
        return self.coordinator.GetBuild(
            coordinator_pb2.GetBuildRequest(name=resource_name("builds", name)), timeout=60)

    @typed_errors
    def list_builds(self, page_size: int = 50) -> list[coordinator_pb2.Build]:
        """The caller's most recent builds, newest first (at most `page_size`)."""
        reply = self.coordinator.ListBuilds(coordinator_pb2.ListBuildsRequest(page_size=page_size), timeout=60)
        return list(reply.builds)

    @typed_errors
    def cancel(self, operation_name: str) -> None:
        """Asks the coordinator to cancel a running build; `wait` then returns it with a CANCELLED error."""
        self.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation_name), timeout=30)

    @typed_errors
    def list_devices(self, selector: dict[str, str] | None = None) -> list[coordinator_pb2.Device]:
        """Registered devices whose attributes match `selector` (all without one)."""
        reply = self.devices.ListDevices(coordinator_pb2.ListDevicesRequest(selector=selector or {}), timeout=30)
        return list(reply.devices)

    def result(self, build: str) -> BuildResult:
        """The typed result of a finished build ("builds/{build}" or "operations/{build}"): state, per
        target the chosen candidate, report.json. Raises NotFound."""
        operation = self.get_operation(operation_name(build))
        found = self.get_build(build_name(operation.name))
        report = self.report(found).document if found.report_json_artifact else None
        return build_result(operation, found, report)

    def report(self, build: str | coordinator_pb2.Build) -> Report:
        """The build's report.json, parsed, with both report artifacts' names (download the HTML one with
        `download(report.html_artifact, path)`). Raises NotFound, FailedPrecondition (no report yet)."""
        found = self.get_build(build) if isinstance(build, str) else build
        return parse_report(found, self.read_text(report_of(found)))

    def build(self, spec: SpecInput, on_progress: ProgressCallback | None = None, timeout: float | None = None,
              *, request_id: str | None = None, on_upload: UploadCallback | None = None,
              poll_s: float = DEFAULT_POLL_S) -> BuildResult:
        """Submits `spec` (a YAML path, a SpecFile, or a BuildSpec of uploaded artifacts), waits for the build
        and returns its BuildResult; a failed or cancelled build is returned too (`state`, `error`).
        Raises SpecError (bad spec file, nothing sent), InvalidArgument, Unauthenticated, Unavailable,
        DeadlineExceeded after `timeout` seconds (the build keeps running)."""
        operation = self.create_build(load_spec(spec), request_id=request_id, on_upload=on_upload)
        self.wait(operation.name, on_progress, poll_s, timeout=timeout)
        return self.result(operation.name)

    # ------------------------------------------------------------------ tokens (admin)
    @typed_errors
    def create_token(self, role: str, name: str) -> tuple[str, str]:
        """A new token of `role` ("admin", "builder", "agent"); returns (token id, secret), the secret only here.
        Raises ValueError (unknown role), PermissionDenied (the caller is not an admin)."""
        reply = self.tokens.CreateToken(create_token_request(role, name), timeout=30)
        return str(reply.token.name).removeprefix("tokens/"), str(reply.secret)

    @typed_errors
    def list_tokens(self) -> list[tokens_pb2.Token]:
        """Every token (never their secrets). Raises PermissionDenied (the caller is not an admin)."""
        return list(self.tokens.ListTokens(tokens_pb2.ListTokensRequest(), timeout=30).tokens)

    @typed_errors
    def revoke_token(self, token_id: str) -> tokens_pb2.Token:
        """Revokes a token ("tok-…" or "tokens/tok-…"); returns it. Raises NotFound, PermissionDenied."""
        return self.tokens.RevokeToken(
            tokens_pb2.RevokeTokenRequest(name=token_name(token_id)), timeout=30)

    @typed_errors
    def whoami(self) -> tokens_pb2.Token:
        """The caller's own token (id, role, name). Raises Unauthenticated."""
        return self.tokens.WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=30)

