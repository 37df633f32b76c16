"""Bad input to the ArtifactStore: sizes, digests, names, offsets, chunks, reused request ids."""
from __future__ import annotations

import hashlib
import os

from corpus import Case

from edgeforge.v1 import common_pb2, coordinator_pb2 as pb

DATASET = common_pb2.ARTIFACT_KIND_DATASET
BYTES = b"edgeforge bad-input corpus: a small blob\n" * 4
SHA = hashlib.sha256(BYTES).hexdigest()
GB = 10 ** 9


def _upload(data: bytes = BYTES, sha: str | None = None, **fields):
    """prepare: a fresh ACTIVE upload of `data` (its declared digest `sha`, by default the real one)."""
    def prepare(env):
        return env.stub("ArtifactStore").CreateUpload(pb.CreateUploadRequest(
            kind=DATASET, size_bytes=len(data), sha256=sha or hashlib.sha256(data).hexdigest(), **fields), timeout=60)
    return prepare


def _not_committed(env, upload) -> None:
    """check: the upload is still ACTIVE at offset 0 and its artifact does not exist."""
    state = env.stub("ArtifactStore").GetUpload(pb.GetUploadRequest(name=upload.name), timeout=60)
    assert state.state == pb.UPLOAD_STATE_ACTIVE and state.committed_bytes == 0, state
    part = env.data_dir / "uploads" / f"{upload.name.removeprefix('uploads/')}.part"
    assert part.stat().st_size == 0


def _write(upload_field: str = "", offset: int = 0, data: bytes = BYTES, more=()):
    return lambda env, upload: [pb.WriteUploadRequest(upload=upload_field or upload.name, offset=offset, data=data),
                                *more]


def _unique(salt: str) -> bytes:
    return BYTES + salt.encode()


def _stored(env):
    """prepare: a stored artifact of its own (cases that damage it use no one else's)."""
    return env.dataset(_unique(os.urandom(8).hex()))


def _corrupt_blob(env):
    name = _stored(env)
    sha = name.removeprefix("artifacts/")
    path = env.ctx.store.blobs.path(sha)
    os.chmod(path, 0o644)
    path.write_bytes(b"X" + path.read_bytes()[1:])       # same size, different bytes: bit rot
    os.utime(path, ns=(1, 1))
    return name


def _reused_request_id(env):
    env.stub("ArtifactStore").CreateUpload(pb.CreateUploadRequest(
        kind=DATASET, size_bytes=len(BYTES), sha256=SHA, request_id="bad-inputs-reused"), timeout=60)


CASES = [
    # ---- CreateUpload
    Case("upload_claims_10_gb", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=10 * GB, sha256=SHA),
         "RESOURCE_EXHAUSTED", r"size_bytes 10000000000 exceeds .*limit of 1073741824 bytes"),
    Case("upload_size_negative", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=-1, sha256=SHA), "INVALID_ARGUMENT", r"size_bytes must be >= 0"),
    Case("upload_size_int64_max", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=2 ** 63 - 1, sha256=SHA), "RESOURCE_EXHAUSTED",
         r"size_bytes 9223372036854775807 exceeds"),
    Case("upload_sha256_uppercase", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=len(BYTES), sha256=SHA.upper()), "INVALID_ARGUMENT",
         r"sha256 must be 64 lowercase hex"),
    Case("upload_sha256_short", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=len(BYTES), sha256="abc"), "INVALID_ARGUMENT",
         r"sha256 must be 64 lowercase hex"),
    Case("upload_kind_unknown_enum", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=99, size_bytes=len(BYTES), sha256=SHA), "INVALID_ARGUMENT",
         r"kind 99 is not a known ArtifactKind"),
    Case("upload_kind_unspecified", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(size_bytes=len(BYTES), sha256=SHA), "INVALID_ARGUMENT", r"kind must be set"),
    Case("upload_request_id_reused_other_body", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=len(BYTES) + 1, sha256=SHA, request_id="bad-inputs-reused"),
         "ALREADY_EXISTS", r"request_id 'bad-inputs-reused' was already used", prepare=_reused_request_id),
    Case("upload_display_name_1_mb", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=len(BYTES), sha256=SHA, display_name="x" * (1 << 20)),
         "INVALID_ARGUMENT", r"display_name is 1048576 characters; the limit is 1024"),
    Case("upload_labels_10k_entries", "ArtifactStore.CreateUpload",
         pb.CreateUploadRequest(kind=DATASET, size_bytes=len(BYTES), sha256=SHA,
                                labels={f"k{i}": "v" for i in range(10_000)}),
         "INVALID_ARGUMENT", r"labels has 10000 entries; the limit is 256"),
    # ---- WriteUpload
    Case("write_empty_stream", "ArtifactStore.WriteUpload", [], "INVALID_ARGUMENT", r"stream was empty"),
    Case("write_upload_name_traversal", "ArtifactStore.WriteUpload",
         [pb.WriteUploadRequest(upload="uploads/../../blobs/x", data=BYTES)], "INVALID_ARGUMENT",
         r"upload must look like 'uploads/\{id\}'"),
    Case("write_unknown_upload", "ArtifactStore.WriteUpload",
         [pb.WriteUploadRequest(upload="uploads/0123456789abcdef0123456789abcdef", data=BYTES)], "NOT_FOUND",
         r"upload uploads/0123456789abcdef0123456789abcdef does not exist"),
    Case("write_offset_ahead", "ArtifactStore.WriteUpload", _write(offset=7), "OUT_OF_RANGE",
         r"write at offset 7, but upload .* has 0 bytes committed", prepare=_upload(), check=_not_committed),
    Case("write_offset_negative", "ArtifactStore.WriteUpload", _write(offset=-1), "OUT_OF_RANGE",
         r"write at offset -1", prepare=_upload(), check=_not_committed),
    Case("write_more_than_declared", "ArtifactStore.WriteUpload", _write(data=BYTES + b"!"), "INVALID_ARGUMENT",
         rf"declared {len(BYTES)} bytes but {len(BYTES) + 1} arrived", prepare=_upload(), check=_not_committed),
    Case("write_wrong_digest", "ArtifactStore.WriteUpload", _write(), "INVALID_ARGUMENT",
         rf"content sha256 is {SHA}, but {'ab' * 32} was declared", prepare=_upload(sha="ab" * 32),
         check=_not_committed),
    Case("write_second_message_other_upload", "ArtifactStore.WriteUpload",
         _write(data=BYTES[:10], more=[pb.WriteUploadRequest(upload="uploads/ffff", data=BYTES[10:])]),
         "INVALID_ARGUMENT", r"every message of a WriteUpload stream must name the same upload",
         prepare=_upload(_unique("other-upload"))),
    Case("write_chunk_over_4_mib", "ArtifactStore.WriteUpload",
         lambda env, upload: [pb.WriteUploadRequest(upload=upload.name, data=b"\0" * ((4 << 20) + 1))],
         "RESOURCE_EXHAUSTED", r"chunk of 4194305 bytes exceeds 4194304",
         prepare=_upload(b"\0" * (5 << 20)), check=_not_committed),
    Case("write_after_success", "ArtifactStore.WriteUpload", _write(), "FAILED_PRECONDITION", r"already succeeded",
         prepare=lambda env: (env.dataset(_unique("done")), _upload(_unique("done"))(env))[1]),
    Case("write_claimed_10_gb_then_skip_ahead", "ArtifactStore.WriteUpload",
         lambda env, upload: [pb.WriteUploadRequest(upload=upload.name, offset=5 * GB // 10, data=b"x")],
         "OUT_OF_RANGE", r"write at offset 500000000",
         prepare=lambda env: env.stub("ArtifactStore").CreateUpload(pb.CreateUploadRequest(
             kind=DATASET, size_bytes=GB // 2, sha256="cd" * 32), timeout=60),
         check=_not_committed),
    # ---- GetUpload, GetArtifact, ListArtifacts, ReadArtifact
    Case("get_upload_bad_name", "ArtifactStore.GetUpload", pb.GetUploadRequest(name="uploads/a/b"),
         "INVALID_ARGUMENT", r"upload must look like"),
    Case("get_upload_unknown", "ArtifactStore.GetUpload", pb.GetUploadRequest(name="uploads/feedbeef"), "NOT_FOUND",
         r"upload uploads/feedbeef does not exist"),
    Case("get_artifact_traversal", "ArtifactStore.GetArtifact", pb.GetArtifactRequest(name="artifacts/../../etc/passwd"),
         "INVALID_ARGUMENT", r"name must be 64 lowercase hex characters"),
    Case("get_artifact_wrong_prefix", "ArtifactStore.GetArtifact", pb.GetArtifactRequest(name=f"blobs/{SHA}"),
         "INVALID_ARGUMENT", r"name must look like 'artifacts/\{sha256\}'"),
    Case("get_artifact_unknown", "ArtifactStore.GetArtifact", pb.GetArtifactRequest(name=f"artifacts/{'0' * 64}"),
         "NOT_FOUND", r"artifact artifacts/0{64} does not exist"),
    Case("list_artifacts_page_token_forged", "ArtifactStore.ListArtifacts",
         pb.ListArtifactsRequest(page_token="-1; DROP TABLE artifacts"), "INVALID_ARGUMENT",
         r"page_token .* is not one this server issued"),
    Case("list_artifacts_page_size_negative", "ArtifactStore.ListArtifacts", pb.ListArtifactsRequest(page_size=-5),
         "INVALID_ARGUMENT", r"page_size must be in \[1, 1000\], got -5"),
    Case("list_artifacts_kind_unknown_enum", "ArtifactStore.ListArtifacts", pb.ListArtifactsRequest(kind=42),
         "INVALID_ARGUMENT", r"kind 42 is not a known ArtifactKind"),
    Case("read_offset_past_end", "ArtifactStore.ReadArtifact",
         lambda env, name: pb.ReadArtifactRequest(name=name, offset=10 ** 12), "OUT_OF_RANGE",
         r"offset 1000000000000 is outside artifact of \d+ bytes", prepare=_stored),
    Case("read_offset_negative", "ArtifactStore.ReadArtifact",
         lambda env, name: pb.ReadArtifactRequest(name=name, offset=-1), "OUT_OF_RANGE", r"offset -1 is outside",
         prepare=_stored),
    Case("read_chunk_size_over_limit", "ArtifactStore.ReadArtifact",
         lambda env, name: pb.ReadArtifactRequest(name=name, chunk_size_bytes=64 << 20), "INVALID_ARGUMENT",
         r"chunk_size_bytes must be in \[0, 4194304\], got 67108864", prepare=_stored),
    Case("read_stored_blob_corrupted", "ArtifactStore.ReadArtifact",
         lambda env, name: pb.ReadArtifactRequest(name=name), "DATA_LOSS", r"stored blob [0-9a-f]{64} now hashes to",
         prepare=_corrupt_blob),
]
