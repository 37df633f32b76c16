"""Chunked, resumable artifact transfer over gRPC, with sha256 checked end to end.

Uploads declare size and digest first (the server deduplicates), then stream 1 MiB chunks from
the committed offset; a dropped connection resumes from the server's committed_bytes. Downloads
write to `<dest>.part`, resume from its length, and rename only after the digest matches.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterator

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


def upload_file(stub, path: Path, kind: int, *, display_name: str = "", media_type: str = "",
                labels: dict[str, str] | None = None, lineage: common_pb2.Lineage | None = None,
                request_id: str = "", progress: Progress | None = None, attempts: int = 5,
                timeout_s: float = 3600.0) -> common_pb2.Artifact:
    """Uploads `path` through an ArtifactStoreStub, resuming after transient failures."""
    size = path.stat().st_size
    upload = stub.CreateUpload(coordinator_pb2.CreateUploadRequest(
        kind=kind, size_bytes=size, sha256=sha256_file(path), media_type=media_type,
        display_name=display_name or path.name, labels=labels or {}, request_id=request_id,
        lineage=lineage), timeout=60)
    for attempt in range(attempts):
        if upload.state == coordinator_pb2.UPLOAD_STATE_SUCCEEDED:
            if progress:
                progress(size, size)
            return upload.artifact
        try:
            upload = stub.WriteUpload(_chunks(path, upload.name, upload.committed_bytes, progress, size),
                                      timeout=timeout_s)
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(min(2 ** attempt, 10))
            upload = stub.GetUpload(coordinator_pb2.GetUploadRequest(name=upload.name), timeout=60)
    raise TransferError(f"upload of {path.name} did not complete after {attempts} attempts")


def download(read: Callable[[int], Iterator], dest: Path, sha256: str, size_bytes: int, *,
             progress: Progress | None = None, attempts: int = 5) -> Path:
    """Downloads to `dest` via `read(offset)` (a server-streaming call of ReadArtifactResponse)."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        offset = part.stat().st_size if part.exists() else 0
        if offset > size_bytes:
            part.unlink()
            offset = 0
        try:
            if offset < size_bytes:
                with open(part, "ab") as f:
                    for message in read(offset):
                        if message.offset != offset:
                            raise TransferError(f"server sent offset {message.offset}, expected {offset}")
                        f.write(message.data)
                        offset += len(message.data)
                        if progress:
                            progress(offset, size_bytes)
            break
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            time.sleep(min(2 ** attempt, 10))
    else:
        raise TransferError(f"download of {dest.name} did not complete after {attempts} attempts")
    part.touch()
    actual = sha256_file(part)
    if actual != sha256 or part.stat().st_size != size_bytes:
        part.unlink()
        raise TransferError(f"downloaded bytes hash to {actual}, expected {sha256}; discarded")
    os.replace(part, dest)
    return dest
