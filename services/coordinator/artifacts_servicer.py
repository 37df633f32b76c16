"""ArtifactStore gRPC servicer: resumable uploads, metadata, and chunked digest-checked reads.

Authorization per resource goes through `Ownership` (services/coordinator/ownership.py): a builder
reads only the artifacts it uploaded or its builds name, and touches only its own uploads.
"""
from __future__ import annotations

from typing import Iterator

from edgeforge.v1 import coordinator_pb2, coordinator_pb2_grpc
from shared.artifact_convert import artifact_to_proto, kind_from_proto, lineage_from_proto
from services.coordinator.ownership import Ownership
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.grpc_status import rpc, rpc_stream
from shared.paging import next_token, page
from shared.store.artifacts import ArtifactStore
from shared.store.blobs import CHUNK_BYTES
from shared.store.records import ArtifactRecord, UploadRecord, parse_artifact_name

SERVICE_NAME = "edgeforge.v1.ArtifactStore"
MAX_CHUNK_BYTES = 4 << 20


def parse_upload_name(name: str) -> str:
    upload_id = name.removeprefix("uploads/")
    if not name.startswith("uploads/") or not upload_id.isalnum() or len(upload_id) > 64:
        raise InvalidArgument(f"upload must look like 'uploads/{{id}}', got {name[:100]!r}", field="upload")
    return upload_id


def read_chunks(store: ArtifactStore, sha256: str, offset: int, chunk_size: int
                ) -> Iterator[coordinator_pb2.ReadArtifactResponse]:
    """ReadArtifactResponse messages from `offset`; the first carries the whole blob's size and digest."""
    if chunk_size < 0 or chunk_size > MAX_CHUNK_BYTES:
        raise InvalidArgument(f"chunk_size_bytes must be in [0, {MAX_CHUNK_BYTES}], got {chunk_size}",
                              field="chunk_size_bytes")
    record = store.get(sha256)
    first = True
    for position, data in store.read(sha256, offset, chunk_size or CHUNK_BYTES):
        message = coordinator_pb2.ReadArtifactResponse(offset=position, data=data)
        if first:
            message.size_bytes, message.sha256, first = record.size_bytes, record.sha256, False
        yield message
    if first:                                   # offset == size: nothing left, still say what it is
        yield coordinator_pb2.ReadArtifactResponse(offset=offset, size_bytes=record.size_bytes, sha256=record.sha256)


class ArtifactStoreServicer(coordinator_pb2_grpc.ArtifactStoreServicer):
    def __init__(self, store: ArtifactStore, ownership: Ownership):
        self.store, self.ownership = store, ownership

    def _upload(self, record: UploadRecord) -> coordinator_pb2.Upload:
        upload = coordinator_pb2.Upload(
            name=record.name, committed_bytes=record.committed_bytes, size_bytes=record.size_bytes,
            sha256=record.sha256,
            state=coordinator_pb2.UPLOAD_STATE_SUCCEEDED if record.succeeded else coordinator_pb2.UPLOAD_STATE_ACTIVE)
        if record.succeeded:
            upload.artifact.CopyFrom(artifact_to_proto(self.store.get(record.sha256)))
        return upload

    @rpc
    def CreateUpload(self, request, context):
        kind = kind_from_proto(request.kind)
        record = self.store.create_upload(kind, request.size_bytes, request.sha256, media_type=request.media_type,
                                          display_name=request.display_name, labels=dict(request.labels),
                                          request_id=request.request_id,
                                          lineage=lineage_from_proto(request.lineage),
                                          dedupe=self.ownership.may_read_artifact(request.sha256))
        self.ownership.record_upload(record.upload_id, record.succeeded, record.sha256)
        return self._upload(record)

    @rpc
    def WriteUpload(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("WriteUpload stream was empty; the first message must name the upload",
                                  field="upload")
        upload_id = parse_upload_name(first.upload)
        self.ownership.check_upload(upload_id)

        def chunks() -> Iterator[bytes]:
            message = first
            while message is not None:
                if len(message.data) > MAX_CHUNK_BYTES:
                    raise ResourceExhausted(f"chunk of {len(message.data)} bytes exceeds {MAX_CHUNK_BYTES}",
                                            field="data")
                if message is not first and message.upload and message.upload != first.upload:
                    raise InvalidArgument("every message of a WriteUpload stream must name the same upload",
                                          field="upload")
                if message.data:
                    yield message.data
                message = next(request_iterator, None)
        record = self.store.write_upload(upload_id, first.offset, chunks())
        self.ownership.record_upload(upload_id, record.succeeded, record.sha256)
        return self._upload(record)

    @rpc
    def GetUpload(self, request, context):
        upload_id = parse_upload_name(request.name)
        self.ownership.check_upload(upload_id)
        record = self.store.get_upload(upload_id)
        self.ownership.record_upload(upload_id, record.succeeded, record.sha256)
        return self._upload(record)

    @rpc
    def GetArtifact(self, request, context):
        sha256 = parse_artifact_name(request.name)
        self.ownership.check_artifact(sha256)
        return artifact_to_proto(self.store.get(sha256))

    @rpc
    def ListArtifacts(self, request, context):
        size, offset = page(request.page_size, request.page_token, 100)
        kind = kind_from_proto(request.kind) if request.kind else None
        visible = self.ownership.visible_artifacts()
        records = (self.store.list(kind, size + 1, offset) if visible is None
                   else _visible_page(self.store, visible, kind, size + 1, offset))
        return coordinator_pb2.ListArtifactsResponse(artifacts=[artifact_to_proto(r) for r in records[:size]],
                                                     next_page_token=next_token(offset, size, len(records)))

    @rpc_stream
    def ReadArtifact(self, request, context):
        sha256 = parse_artifact_name(request.name)
        self.ownership.check_artifact(sha256)
        yield from read_chunks(self.store, sha256, request.offset, request.chunk_size_bytes)


def _visible_page(store: ArtifactStore, visible: set[str], kind, limit: int, offset: int) -> list[ArtifactRecord]:
    """A page of the caller's artifacts, newest first like ArtifactStore.list."""
    records = []
    for sha256 in visible:
        try:
            records.append(store.get(sha256))
        except NotFound:                            # named by a build spec but never stored
            continue
    records = [r for r in records if kind is None or r.kind == kind]
    records.sort(key=lambda r: (-r.create_time, r.sha256))
    return records[offset:offset + limit]


def registration(store: ArtifactStore, ownership: Ownership):
    return (coordinator_pb2_grpc.add_ArtifactStoreServicer_to_server, ArtifactStoreServicer(store, ownership),
            SERVICE_NAME)


