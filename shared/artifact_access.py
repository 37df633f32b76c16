"""How a worker service reads and writes artifacts: straight from the store when it runs inside the
coordinator's process (embedded default), or over gRPC with a local verified cache when it runs
alone. The worker code is the same either way. Alone, it calls the coordinator with an admin token
(an admin may read and write every artifact; see shared/store/grants.py for everyone else).

A standalone worker may know several coordinators (replicas on one database and one blob store):
every call goes to the current one and fails over to the next when it is unavailable
(shared/failover.py); a download cut off mid-stream resumes at the same offset on the next one,
and an upload cut off is started again there (the store deduplicates by digest).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import grpc

from edgeforge.v1 import coordinator_pb2, coordinator_pb2_grpc
from shared.artifact_convert import artifact_from_proto, kind_to_proto, lineage_to_proto
from shared.errors import InvalidArgument
from shared.failover import Failover, parse_addresses, transport_failure
from shared.grpc_status import from_rpc_error
from shared.models import bundle
from shared.models.bundle import ModelDir
from shared.server import ClientTls, channel
from shared.store.artifacts import ArtifactStore
from shared.store.records import ArtifactKind, ArtifactRecord, Lineage, parse_artifact_name


class ArtifactAccess(Protocol):
    cache_dir: Path

    def get(self, name: str) -> ArtifactRecord: ...

    def local_path(self, name: str) -> Path:
        """A local file with the artifact's verified bytes."""
        ...

    def put(self, path: Path, kind: ArtifactKind, *, display_name: str, media_type: str,
            lineage: Lineage, labels: dict[str, str] | None = None) -> ArtifactRecord:
        """Stores a finished file (which may be moved away)."""
        ...


class LocalArtifacts:
    def __init__(self, store: ArtifactStore, cache_dir: Path):
        self.store, self.cache_dir = store, cache_dir

    def get(self, name: str) -> ArtifactRecord:
        return self.store.get(parse_artifact_name(name))

    def local_path(self, name: str) -> Path:
        return self.store.path(parse_artifact_name(name))

    def put(self, path, kind, *, display_name, media_type, lineage, labels=None) -> ArtifactRecord:
        return self.store.put_file(path, kind, display_name=display_name, media_type=media_type,
                                   lineage=lineage, labels=labels, move=True)


class RemoteArtifacts:
    """Artifacts through a coordinator's ArtifactStore service, cached under cache_dir/blobs. `address` is
    one coordinator or several ("a:1,b:2" or a list), tried in order when one is unavailable."""

    def __init__(self, address: str | Sequence[str], cache_dir: Path, *, token: str | None = None,
                 tls: ClientTls | None = None):
        from clients.python import transfer
        self._transfer = transfer
        self.cache_dir = cache_dir
        addresses = parse_addresses(address, "coordinator")
        self._coordinators = Failover(addresses, [coordinator_pb2_grpc.ArtifactStoreStub(
            channel(one, token=token, tls=tls)) for one in addresses], "coordinator")
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, name: str) -> ArtifactRecord:
        parse_artifact_name(name)
        request = coordinator_pb2.GetArtifactRequest(name=name)
        try:
            return artifact_from_proto(self._coordinators.call(lambda stub: stub.GetArtifact(request, timeout=60)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error

    def local_path(self, name: str) -> Path:
        record = self.get(name)
        dest = self.cache_dir / "blobs" / record.sha256
        with self._guard:
            lock = self._locks.setdefault(record.sha256, threading.Lock())
        with lock:
            if dest.is_file() and dest.stat().st_size == record.size_bytes:
                return dest
            try:
                return self._transfer.download(lambda offset: self._read(name, offset), dest, record.sha256,
                                               record.size_bytes)
            except grpc.RpcError as error:
                raise from_rpc_error(error) from error

    def _read(self, name: str, offset: int) -> Iterator[coordinator_pb2.ReadArtifactResponse]:
        """ReadArtifact from `offset`; a stream cut off by a coordinator's death goes on from where it stopped on
        the next coordinator, so the caller sees one uninterrupted stream."""
        last: grpc.RpcError | None = None
        for address, stub in self._coordinators.rotation():
            try:
                for message in stub.ReadArtifact(coordinator_pb2.ReadArtifactRequest(name=name, offset=offset),
                                                 timeout=3600):
                    yield message
                    offset += len(message.data)
                return
            except grpc.RpcError as error:
                if not transport_failure(error):
                    raise
                self._coordinators.failed(address, error)
                last = error
        assert last is not None
        raise last

    def put(self, path, kind, *, display_name, media_type, lineage, labels=None) -> ArtifactRecord:
        upload = lambda stub: self._transfer.upload_file(
            stub, path, kind_to_proto(kind), display_name=display_name, media_type=media_type, labels=labels,
            lineage=lineage_to_proto(lineage))
        try:
            artifact = self._coordinators.call(upload)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from error
        path.unlink(missing_ok=True)
        return artifact_from_proto(artifact)


_unpack_lock = threading.Lock()


def open_model(access: ArtifactAccess, name: str, field: str = "model") -> tuple[ModelDir, str]:
    """The float model bundle `name`, unpacked once into the cache. Returns (ModelDir, sha256)."""
    record = access.get(name)
    if record.kind not in (ArtifactKind.MODEL, ArtifactKind.SOURCE_MODEL):
        raise InvalidArgument(f"{field} {name} is a {record.kind.value}, not a model", reason="UNKNOWN_MODEL_FORMAT",
                              field=field)
    path = access.local_path(name)
    if not bundle.is_bundle(path):                          # judged by content, not by the declared media type
        raise InvalidArgument(f"{field} {name} ({record.display_name}) is not a model bundle (tar of an HF "
                              "directory)", reason="UNKNOWN_MODEL_FORMAT", field=field)
    with _unpack_lock:
        directory = bundle.unpack(path, access.cache_dir / "models" / record.sha256)
    return ModelDir(directory), record.sha256
