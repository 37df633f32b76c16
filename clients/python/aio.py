"""The edgeforge Python SDK for asyncio: `AsyncClient`, the calls of `Client` as coroutines on grpc.aio.

    import asyncio
    from clients.python.aio import AsyncClient

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051") as client:
            result = await client.build("build.yaml")
            print(result.passed, [(t.target, t.candidate_id) for t in result.targets])

    asyncio.run(main())

Everything that is not a call lives once in clients.python.client (token resolution, spec loading,
request building, progress de-duplication) and clients.python.results (typed results); uploads and
downloads share the retry policy and the `.part` bookkeeping of clients.python.transfer. Errors are
the same typed `ApiError` subclasses. Create the client inside the event loop that uses it.
"""
from __future__ import annotations

import asyncio
import contextlib
import tempfile
import types
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Sequence, cast

import grpc
import grpc.aio
from google.longrunning import operations_proto_pb2 as operations_pb2

from clients.python import transfer
from clients.python.client import (DEFAULT_POLL_S, ProgressCallback, SpecInput, Stubs, UploadCallback, check_deadline,
                                   create_build_request, create_token_request, dataset_media_type, deadline_after,
                                   load_spec, model_upload, parse_report, progress_key, progress_of, report_of,
                                   resolve_token, resource_name, spec_datasets, token_name, upload_progress,
                                   wait_request)
from clients.python.errors import translated, typed_errors_async
from clients.python.results import BuildResult, Report, build_name, build_result, operation_name
from clients.python.spec import SpecFile
from edgeforge.v1 import common_pb2, coordinator_pb2, tokens_pb2
from shared.server import CHANNEL_OPTIONS, ClientTls

__all__ = ["AsyncClient"]


def _with_token(details: Any, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    """The call's details with "authorization: Bearer <token>" added unless the call carries its own."""
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    if "authorization" not in metadata:
        metadata.add(*header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                      details.wait_for_ready)


# grpc.aio files an interceptor under the first call kind it implements, so each kind gets its own
# class (the coordinator has no stream-stream call a client makes). grpc-stubs declares these bases generic, grpc does not: they cannot be subscripted at runtime.
class _UnaryUnaryBearer(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, header: tuple[str, str]):
        self.header = header

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.header), request)


class _UnaryStreamBearer(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, header: tuple[str, str]):
        self.header = header

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.header), request)


class _StreamUnaryBearer(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    def __init__(self, header: tuple[str, str]):
        self.header = header

    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(_with_token(details, self.header), request_iterator)


def aio_channel(address: str, *, token: str | None = None, tls: ClientTls | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel with the sync client's message limits, bearer token and TLS."""
    # grpc-stubs types interceptors as "cast or ignore": the aio interceptor classes are not a Union there.
    header = ("authorization", f"Bearer {token}")
    interceptors = cast(Sequence[Any], [_UnaryUnaryBearer(header), _UnaryStreamBearer(header),
                                        _StreamUnaryBearer(header)]) if token else None
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.credentials(), options=CHANNEL_OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS, interceptors=interceptors)


class AsyncClient(Stubs):
    """An asyncio connection to a coordinator; the same calls as `Client`, awaited.

    Use `async with AsyncClient(...)`, or `await client.close()`. Arguments as for `Client`.
    """

    def __init__(self, address: str, *, token: str | None = None, tls: ClientTls | None = None,
                 token_file: Path | None = None):
        token = resolve_token(token, token_file)
        super().__init__(address, token, aio_channel(address, token=token, tls=tls))

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled."""
        await self.channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: types.TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ artifacts
    @typed_errors_async
    async def upload(self, path: Path, kind: common_pb2.ArtifactKind, *, display_name: str = "",
                     media_type: str = "", progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """Uploads a file as an artifact of `kind` (resumable, deduplicated by sha256). Returns the Artifact."""
        return await transfer.upload_file_async(self.artifacts, path, kind, display_name=display_name or path.name,
                                                media_type=media_type, progress=progress)

    async def upload_model(self, path: Path, progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """`Client.upload_model`: a model directory is packed into a tar in a worker thread."""
        with contextlib.ExitStack() as stack:
            file, display_name, media_type = await asyncio.to_thread(stack.enter_context, model_upload(path))
            return await self.upload(file, common_pb2.ARTIFACT_KIND_SOURCE_MODEL, display_name=display_name,
                                     media_type=media_type, progress=progress)

    async def upload_dataset(self, path: Path, progress: transfer.Progress | None = None) -> common_pb2.Artifact:
        """Uploads text, JSON sentences or .npz images; the media type follows the suffix."""
        return await self.upload(path, common_pb2.ARTIFACT_KIND_DATASET, media_type=dataset_media_type(path),
                                 progress=progress)

    @typed_errors_async
    async def download(self, name: str, dest: Path, progress: transfer.Progress | None = None) -> Path:
        """Downloads artifact `name` to `dest`, resuming and checking the digest. Returns `dest`.
        Raises NotFound, TransferError (digest mismatch)."""
        artifact = await self.artifacts.GetArtifact(coordinator_pb2.GetArtifactRequest(name=name), timeout=60)

        def read(offset: int) -> AsyncIterator[coordinator_pb2.ReadArtifactResponse]:
            return self.artifacts.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name=name, offset=offset),
                                               timeout=3600)
        return await transfer.download_async(read, dest, artifact.sha256, artifact.size_bytes, progress=progress)

    async def read_text(self, name: str) -> str:
        """An artifact's content as text (for small ones: reports, logs)."""
        with tempfile.TemporaryDirectory() as scratch:
            return (await self.download(name, Path(scratch) / "blob")).read_text()

    # ------------------------------------------------------------------ builds
    @typed_errors_async
    async def create_build(self, spec_file: SpecFile | coordinator_pb2.BuildSpec, *, request_id: str | None = None,
                           on_upload: UploadCallback | None = None) -> operations_pb2.Operation:
        """`Client.create_build`: uploads the spec's files, starts the build, returns its Operation."""
        if isinstance(spec_file, coordinator_pb2.BuildSpec):
            request = coordinator_pb2.CreateBuildRequest(spec=spec_file, request_id=request_id or uuid.uuid4().hex)
        else:
            model = (await self.upload_model(spec_file.model_path, upload_progress(on_upload, "model"))).name
            datasets = {section: (await self.upload_dataset(path, upload_progress(on_upload, section))).name
                        for section, path in spec_datasets(spec_file)}
            request = create_build_request(spec_file, model, datasets, request_id)
        return await self.coordinator.CreateBuild(request, timeout=120)

    async def _poll(self, operation_name: str, poll_s: float,
                    deadline: float | None) -> AsyncIterator[operations_pb2.Operation]:
        while True:
            operation: operations_pb2.Operation = await self.operations.WaitOperation(
                wait_request(operation_name, poll_s), timeout=poll_s + 30)
            yield operation
            if operation.done:
                return
            check_deadline(deadline, operation_name)

    @typed_errors_async
    async def wait(self, operation_name: str, on_progress: ProgressCallback | None = None,
                   poll_s: float = DEFAULT_POLL_S, *, timeout: float | None = None) -> operations_pb2.Operation:
        """`Client.wait`: returns the finished Operation; DeadlineExceeded after `timeout` seconds."""
        async for operation in self._poll(operation_name, poll_s, deadline_after(timeout)):
            if on_progress:
                on_progress(progress_of(operation))
            if operation.done:
                return operation
        raise AssertionError("unreachable: _poll ends on a done operation")

    async def watch(self, operation_name: str, *, poll_s: float = DEFAULT_POLL_S,
                    timeout: float | None = None) -> AsyncIterator[coordinator_pb2.BuildProgress]:
        """`Client.watch`: yields the build's progress each time it changes, the last one when it is done."""
        last = None
        with translated():
            async for operation in self._poll(operation_name, poll_s, deadline_after(timeout)):
                progress = progress_of(operation)
                if progress_key(progress) != last or operation.done:
                    last = progress_key(progress)
                    yield progress

    @typed_errors_async
    async def get_operation(self, operation_name: str) -> operations_pb2.Operation:
        """The operation now, done or not. Raises NotFound."""
        return await self.operations.GetOperation(operations_pb2.GetOperationRequest(name=operation_name),
                                                  timeout=60)

    @typed_errors_async
    async def get_build(self, name: str) -> coordinator_pb2.Build:
        """The Build resource ("builds/{build}"). Raises NotFound."""
        return await self.coordinator.GetBuild(coordinator_pb2.GetBuildRequest(name=resource_name("builds", name)),
                                               timeout=60)

    @typed_errors_async
    async def list_builds(self, page_size: int = 50) -> list[coordinator_pb2.Build]:
        """The caller's most recent builds, newest first (at most `page_size`)."""
        reply = await self.coordinator.ListBuilds(coordinator_pb2.ListBuildsRequest(page_size=page_size),
                                                  timeout=60)
        return list(reply.builds)

    @typed_errors_async
    async def cancel(self, operation_name: str) -> None:
        """Asks the coordinator to cancel a running build."""
        await self.operations.CancelOperation(operations_pb2.CancelOperationRequest(name=operation_name),
                                              timeout=30)

    @typed_errors_async
    async def list_devices(self, selector: dict[str, str] | None = None) -> list[coordinator_pb2.Device]:
        """Registered devices whose attributes match `selector` (all without one)."""
        reply = await self.devices.ListDevices(coordinator_pb2.ListDevicesRequest(selector=selector or {}),
                                               timeout=30)
        return list(reply.devices)

    async def result(self, build: str) -> BuildResult:
        """`Client.result`: the typed result of a finished build. Raises NotFound."""
        operation = await self.get_operation(operation_name(build))
        found = await self.get_build(build_name(operation.name))
        report = (await self.report(found)).document if found.report_json_artifact else None
        return build_result(operation, found, report)

    async def report(self, build: str | coordinator_pb2.Build) -> Report:
        """`Client.report`: report.json parsed. Raises NotFound, FailedPrecondition (no report yet)."""
        found = await self.get_build(build) if isinstance(build, str) else build
        return parse_report(found, await self.read_text(report_of(found)))

    async def build(self, spec: SpecInput, on_progress: ProgressCallback | None = None,
                    timeout: float | None = None, *, request_id: str | None = None,
                    on_upload: UploadCallback | None = None, poll_s: float = DEFAULT_POLL_S) -> BuildResult:
        """`Client.build`: submit, wait, return the BuildResult. A spec path is parsed in a worker thread."""
        parsed = await asyncio.to_thread(load_spec, spec)
        operation = await self.create_build(parsed, request_id=request_id, on_upload=on_upload)
        await self.wait(operation.name, on_progress, poll_s, timeout=timeout)
        return await self.result(operation.name)

    # ------------------------------------------------------------------ tokens (admin)
    @typed_errors_async
    async def create_token(self, role: str, name: str) -> tuple[str, str]:
        """A new token of `role`; returns (token id, secret). Raises ValueError, PermissionDenied."""
        reply = await self.tokens.CreateToken(create_token_request(role, name), timeout=30)
        return str(reply.token.name).removeprefix("tokens/"), str(reply.secret)

    @typed_errors_async
    async def list_tokens(self) -> list[tokens_pb2.Token]:
        """Every token (never their secrets). Raises PermissionDenied."""
        return list((await self.tokens.ListTokens(tokens_pb2.ListTokensRequest(), timeout=30)).tokens)

    @typed_errors_async
    async def revoke_token(self, token_id: str) -> tokens_pb2.Token:
        """Revokes a token; returns it. Raises NotFound, PermissionDenied."""
        return await self.tokens.RevokeToken(tokens_pb2.RevokeTokenRequest(name=token_name(token_id)), timeout=30)

    @typed_errors_async
    async def whoami(self) -> tokens_pb2.Token:
        """The caller's own token (id, role, name). Raises Unauthenticated."""
        return await self.tokens.WhoAmI(tokens_pb2.WhoAmIRequest(), timeout=30)
