"""Chunked, resumable artifact transfer over gRPC, with sha256 checked end to end.

Uploads declare size and digest first (the server deduplicates), then stream 1 MiB chunks from
the committed offset; a dropped connection resumes from the server's committed_bytes. Downloads
write to `<dest>.part`, resume from its length, and rename only after the digest matches.

`upload_file`/`download` take a blocking ArtifactStore stub; `upload_file_async`/`download_async`
the same for grpc.aio. Both pairs share the requests, the retry policy and the `.part` bookkeeping
below and differ only in how they call.
"""
from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import grpc

from edgeforge.v1 import common_pb2, coordinator_pb2
from shared.store.blobs import sha256_file

CHUNK_BYTES = 1 << 20
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.CANCELLED)
Progress = Callable[[int, int], None]          # (bytes done, bytes total)


class TransferError(Exception):
    """A transfer that cannot complete (digest mismatch after download, retries exhausted)."""


def _chunks(path: Path, upload: str, offset: int, progress: Progress | None, total: int
            ) -> Iterator[coordinator_pb2.WriteUploadRequest]:
    with open(path, "rb") as f:
        f.seek(offset)
        first = True
        while chunk := f.read(CHUNK_BYTES):
            if first:
                yield coordinator_pb2.WriteUploadRequest(upload=upload, offset=offset, data=chunk)
                first = False
            else:
                yield coordinator_pb2.WriteUploadRequest(data=chunk)
            offset += len(chunk)
            if progress:
                progress(offset, total)
        if first:                                      # empty remainder: still send the header
            yield coordinator_pb2.WriteUploadRequest(upload=upload, offset=offset)


def _create_upload_request(path: Path, sha256: str, kind: common_pb2.ArtifactKind, display_name: str,
                           media_type: str, labels: dict[str, str] | None, lineage: common_pb2.Lineage | None,
                           request_id: str) -> coordinator_pb2.CreateUploadRequest:
    return coordinator_pb2.CreateUploadRequest(
        kind=kind, size_bytes=path.stat().st_size, sha256=sha256, media_type=media_type,
        display_name=display_name or path.name, labels=labels or {}, request_id=request_id, lineage=lineage)


def _retry_after_s(error: grpc.RpcError, attempt: int, attempts: int) -> float:
    """Seconds to wait before retrying a failed transfer call; re-raises `error` when it is final."""
    if error.code() not in RETRYABLE or attempt == attempts - 1:
        raise error
    return float(min(2 ** attempt, 10))


def _finished(upload: coordinator_pb2.Upload, size: int, progress: Progress | None) -> bool:
    if upload.state != coordinator_pb2.UPLOAD_STATE_SUCCEEDED:
        return False
    if progress:
        progress(size, size)
    return True


def upload_file(stub: Any, path: Path, kind: common_pb2.ArtifactKind, *, display_name: str = "", media_type: str = "",
                labels: dict[str, str] | None = None, lineage: common_pb2.Lineage | None = None,
                request_id: str = "", progress: Progress | None = None, attempts: int = 5,
                timeout_s: float = 3600.0) -> common_pb2.Artifact:
    """Uploads `path` through an ArtifactStoreStub, resuming after transient failures."""
    size = path.stat().st_size
    request = _create_upload_request(path, sha256_file(path), kind, display_name, media_type, labels, lineage,
                                     request_id)
    upload: coordinator_pb2.Upload = stub.CreateUpload(request, timeout=60)
    for attempt in range(attempts):
        if _finished(upload, size, progress):
            return upload.artifact
        try:
            upload = stub.WriteUpload(_chunks(path, upload.name, upload.committed_bytes, progress, size),
                                      timeout=timeout_s)
        except grpc.RpcError as error:
            time.sleep(_retry_after_s(error, attempt, attempts))
            upload = stub.GetUpload(coordinator_pb2.GetUploadRequest(name=upload.name), timeout=60)
    raise TransferError(f"upload of {path.name} did not complete after {attempts} attempts")


async def upload_file_async(stub: Any, path: Path, kind: common_pb2.ArtifactKind, *, display_name: str = "",
                            media_type: str = "", progress: Progress | None = None, attempts: int = 5,
                            timeout_s: float = 3600.0) -> common_pb2.Artifact:
    """`upload_file` through a grpc.aio ArtifactStoreStub; hashing runs in a worker thread."""
    size = path.stat().st_size
    sha256 = await asyncio.to_thread(sha256_file, path)
    request = _create_upload_request(path, sha256, kind, display_name, media_type, None, None, "")
    upload: coordinator_pb2.Upload = await stub.CreateUpload(request, timeout=60)
    for attempt in range(attempts):
        if _finished(upload, size, progress):
            return upload.artifact
        try:
            upload = await stub.WriteUpload(_chunks(path, upload.name, upload.committed_bytes, progress, size),
                                            timeout=timeout_s)
        except grpc.RpcError as error:
            await asyncio.sleep(_retry_after_s(error, attempt, attempts))
            upload = await stub.GetUpload(coordinator_pb2.GetUploadRequest(name=upload.name), timeout=60)
    raise TransferError(f"upload of {path.name} did not complete after {attempts} attempts")


def _part_file(dest: Path) -> Path:
    """Where a download of `dest` accumulates until its digest is checked."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return dest.with_name(dest.name + ".part")


def _part_offset(part: Path, size_bytes: int) -> int:
    """Bytes already downloaded into `part` (a longer, stale file is discarded)."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > size_bytes:
        part.unlink()
        return 0
    return offset


def _append(f: Any, message: coordinator_pb2.ReadArtifactResponse, offset: int, size_bytes: int,
            progress: Progress | None) -> int:
    if message.offset != offset:
        raise TransferError(f"server sent offset {message.offset}, expected {offset}")
    f.write(message.data)
    offset += len(message.data)
    if progress:
        progress(offset, size_bytes)
    return offset


def _commit(part: Path, dest: Path, sha256: str, size_bytes: int) -> Path:
    """Renames `part` to `dest` once its digest and size match; discards it otherwise."""
    part.touch()
    actual = sha256_file(part)
    if actual != sha256 or part.stat().st_size != size_bytes:
        part.unlink()
        raise TransferError(f"downloaded bytes hash to {actual}, expected {sha256}; discarded")
    os.replace(part, dest)
    return dest


def download(read: Callable[[int], Iterator[coordinator_pb2.ReadArtifactResponse]], dest: Path, sha256: str,
             size_bytes: int, *, progress: Progress | None = None, attempts: int = 5) -> Path:
    """Downloads to `dest` via `read(offset)` (a server-streaming call of ReadArtifactResponse)."""
    part = _part_file(dest)
    for attempt in range(attempts):
        offset = _part_offset(part, size_bytes)
        try:
            if offset < size_bytes:
                with open(part, "ab") as f:
                    for message in read(offset):
                        offset = _append(f, message, offset, size_bytes, progress)
            return _commit(part, dest, sha256, size_bytes)
        except grpc.RpcError as error:
            time.sleep(_retry_after_s(error, attempt, attempts))
    raise TransferError(f"download of {dest.name} did not complete after {attempts} attempts")


async def download_async(read: Callable[[int], AsyncIterator[coordinator_pb2.ReadArtifactResponse]], dest: Path,
                         sha256: str, size_bytes: int, *, progress: Progress | None = None,
                         attempts: int = 5) -> Path:
    """`download` with `read(offset)` a grpc.aio server-streaming call; the digest check runs in a thread.
    (The loop mirrors `download`'s: only the iteration and the sleep are awaited.)"""
    part = _part_file(dest)
    for attempt in range(attempts):
        offset = _part_offset(part, size_bytes)
        try:
            if offset < size_bytes:
                with open(part, "ab") as f:
                    async for message in read(offset):
                        offset = _append(f, message, offset, size_bytes, progress)
            return await asyncio.to_thread(_commit, part, dest, sha256, size_bytes)
        except grpc.RpcError as error:
            await asyncio.sleep(_retry_after_s(error, attempt, attempts))
    raise TransferError(f"download of {dest.name} did not complete after {attempts} attempts")
