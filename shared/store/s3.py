"""Content-addressed blobs in an S3-compatible object store, behind BlobStore's interface.

Objects are keyed `<prefix>/sha256/ab/<64 hex>` in one bucket. What is visible when:
- A write goes to a local temp file (BlobStore's temp naming, so a dead writer's leftovers are swept the
  same way). `commit` hashes it, checks the declared digest, then uploads it with boto3's managed
  transfer (one PUT, or a multipart upload above `MULTIPART_BYTES`). S3 makes an object visible only when
  its PUT or CompleteMultipartUpload succeeds, so a reader sees the whole blob or none of it; a wrong
  digest never reaches the bucket. A name already stored with the same size is not uploaded again.
- Readers get a local file: `path`/`verified_path` return the blob's copy in the local cache (BlobStore's
  layout under `local_root`), downloading it to a temp file, hashing it and renaming it into the cache
  when it is missing. A download that does not hash to its name is DataLoss and is never cached. A cached
  copy is hashed once per process (as BlobStore does); one that no longer hashes is fetched again.
- `exists` answers from the cache first, then with a HEAD request.

Misconfiguration is a typed error naming the endpoint and the bucket, never a botocore traceback: bad
credentials and a missing bucket are FailedPrecondition (reason DEPENDENCY_FAILED), an unreachable
endpoint is Unavailable.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

import boto3
import botocore.exceptions
import botocore.loaders
import botocore.session
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from shared.errors import DataLoss, EdgeforgeError, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from shared.store.blobs import CHUNK_BYTES, BlobStore, StoredBlob, check_sha256, disk_full_is_resource_exhausted, \
    sha256_file

log = logging.getLogger(__name__)

MULTIPART_BYTES = 8 << 20          # boto3's default threshold and part size: larger blobs go up in 8 MiB parts
TRANSFER_THREADS = 4
URL_OPTIONS = ("endpoint_url", "region")
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")     # S3's rule for bucket names
CREDENTIALS_HELP = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key this server accepts"
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_BAD_KEY_CODES = {"InvalidAccessKeyId": "does not know the access key",
                  "SignatureDoesNotMatch": "rejected the secret key (the signature does not match)",
                  "AccessDenied": "denied access with these credentials",
                  "403": "refused these credentials (403 Forbidden)"}
# The parsed API models, shared by every store's session: parsing them again costs ~0.5 s per store. Each
# store still has a session of its own, so credentials are resolved afresh when a store opens.
_MODELS = botocore.loaders.create_loader()
_UNREACHABLE = (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
                botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError)


class S3BlobStore(BlobStore):
    def __init__(self, bucket: str, local_root: Path, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, create_bucket: bool = False):
        if not BUCKET_NAME.fullmatch(bucket):
            raise InvalidArgument(f"blobs: {bucket!r} is not an S3 bucket name (3-63 characters: lowercase letters, "
                                  "digits, dots and hyphens, starting and ending with a letter or digit)",
                                  field="blobs")
        super().__init__(local_root)      # the verified cache and the temp files
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region
        core = botocore.session.get_session()
        core.register_component("data_loader", _MODELS)
        session = boto3.session.Session(botocore_session=core)
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"}, connect_timeout=10,
                        read_timeout=120, retries={"max_attempts": 3, "mode": "standard"})
        try:
            self._client = session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        except ValueError as error:         # e.g. an endpoint_url that is not a URL
            raise InvalidArgument(f"blobs: S3 endpoint_url {endpoint_url!r} is not valid: {error}",
                                  field="blobs") from error
        self.endpoint = self._client.meta.endpoint_url
        self._transfer = TransferConfig(multipart_threshold=MULTIPART_BYTES, multipart_chunksize=MULTIPART_BYTES,
                                        max_concurrency=TRANSFER_THREADS)
        self._fetch_locks: dict[str, threading.Lock] = {}
        self.downloads = 0                  # objects fetched into the cache by this process
        self.uploads = 0                    # objects written to the bucket by this process
        self._open_bucket(create_bucket)

    @classmethod
    def from_url(cls, url: str, local_root: Path, *, create_bucket: bool = False) -> "S3BlobStore":
        """`s3://bucket[/prefix]?endpoint_url=http://host:port&region=us-east-1`."""
        parts = urllib.parse.urlsplit(url)
        if not parts.netloc:
            raise InvalidArgument(f"blobs {url!r}: no bucket; expected s3://bucket[/prefix]?endpoint_url=...",
                                  field="blobs")
        options = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        unknown = sorted(set(options) - set(URL_OPTIONS))
        if unknown:
            raise InvalidArgument(f"blobs {url!r}: unknown option {', '.join(unknown)}; allowed: "
                                  f"{', '.join(URL_OPTIONS)}", field="blobs")
        return cls(parts.netloc, local_root, prefix=parts.path, endpoint_url=options.get("endpoint_url") or None,
                   region=options.get("region") or None, create_bucket=create_bucket)

    # ------------------------------------------------------------------ names
    def key(self, sha256: str) -> str:
        check_sha256(sha256)
        return f"{self.prefix}/sha256/{sha256[:2]}/{sha256}" if self.prefix else f"sha256/{sha256[:2]}/{sha256}"

    def location(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def __repr__(self) -> str:
        return f"S3BlobStore(s3://{self.bucket}/{self.prefix} at {self.endpoint}, cache {self.root})"

    # ------------------------------------------------------------------ BlobStore's interface
    def exists(self, sha256: str) -> bool:
        return self._local_path(sha256).is_file() or self._head(self.key(sha256)) is not None

    def size(self, sha256: str) -> int | None:
        """The object's size in the bucket (a HEAD request), or None when it is not there."""
        return self._head(self.key(sha256))

    def verified_path(self, sha256: str) -> Path:
        """A local copy of the blob whose bytes hash to its name, downloaded into the cache if missing."""
        with self._fetch_lock(sha256):      # concurrent readers of one blob: one download, one hash
            try:
                return super().verified_path(sha256)
            except FileNotFoundError:
                pass
            except DataLoss as error:
                log.warning("cached copy of %s is corrupt (%s); fetching it again", self.location(sha256), error)
                self._local_path(sha256).unlink(missing_ok=True)
            return self._download(sha256)

    path = verified_path                    # a caller of path() opens the file: it must be here, whole

    def _publish(self, temp_path: Path, sha256: str, size: int) -> None:
        key = self.key(sha256)
        if self._head(key) != size:         # content-addressed: an object of this name and size holds these bytes
            with self._errors("upload", key):
                self._client.upload_file(str(temp_path), self.bucket, key, Config=self._transfer)
            with self._lock:
                self.uploads += 1
        self._remember_verified(sha256, self._install(temp_path, sha256, size))

    # ------------------------------------------------------------------ what `edgeforge store check` reads
    def hash_stored(self, sha256: str) -> str:
        """The sha256 of the object's bytes as stored in the bucket (streamed; the cache is not used)."""
        key = self.key(sha256)
        digest = hashlib.sha256()
        with self._errors("read", key):
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
            for chunk in body.iter_chunks(CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def list_blobs(self) -> Iterator[StoredBlob]:
        """Every object under `<prefix>/sha256/`, in key order."""
        base = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        with self._errors("list", base):
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(base):]
                    shard, _, sha = name.partition("/")
                    good = len(sha) == 64 and shard == sha[:2] and set(sha) <= set("0123456789abcdef")
                    yield StoredBlob(f"s3://{self.bucket}/{entry['Key']}", sha if good else None, entry["Size"],
                                     entry["LastModified"].timestamp())

    def delete(self, location: str) -> None:
        """Deletes the object at `location` (an s3://bucket/key that `list_blobs` gave)."""
        head = f"s3://{self.bucket}/"
        if not location.startswith(head):
            raise InvalidArgument(f"{location} is not in bucket {self.bucket}", field="location")
        key = location[len(head):]
        with self._errors("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)
        sha = key.rsplit("/", 1)[-1]
        if len(sha) == 64:
            with contextlib.suppress(InvalidArgument):
                self._local_path(sha).unlink(missing_ok=True)

    def unfinished_uploads(self) -> Iterator[StoredBlob]:
        """Multipart uploads under `<prefix>/sha256/` begun and never completed nor aborted (a writer that died
        mid-upload): no reader sees them, but their parts take space until aborted."""
        base = f"{self.prefix}/sha256/" if self.prefix else "sha256/"
        pages = self._client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=base)
        with self._errors("list uploads", base):
            for page in pages:
                for upload in page.get("Uploads", []):
                    yield StoredBlob(f"s3://{self.bucket}/{upload['Key']}?uploadId={upload['UploadId']}", None, 0,
                                     upload["Initiated"].timestamp())

    def abort_upload(self, location: str) -> None:
        """Aborts the unfinished multipart upload at `location` (as `unfinished_uploads` gave it)."""
        head = f"s3://{self.bucket}/"
        key, _, upload_id = location.removeprefix(head).partition("?uploadId=")
        if not location.startswith(head) or not upload_id:
            raise InvalidArgument(f"{location} is not a multipart upload in bucket {self.bucket}", field="location")
        with self._errors("abort upload", key):
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    # ------------------------------------------------------------------ internals
    def _open_bucket(self, create: bool) -> None:
        """Checks credentials and the bucket with one request that returns S3's error code in its body."""
        try:
            with self._errors("open", ""):
                self._client.list_objects_v2(Bucket=self.bucket, MaxKeys=1)
        except FailedPrecondition as error:
            if not (create and error.metadata.get("s3_error") == "NoSuchBucket"):
                raise
            arguments = {} if self.region in (None, "us-east-1") else {
                "CreateBucketConfiguration": {"LocationConstraint": self.region}}
            with self._errors("create bucket", ""):
                self._client.create_bucket(Bucket=self.bucket, **arguments)
            log.info("created bucket %s at %s", self.bucket, self.endpoint)

    def _head(self, key: str) -> int | None:
        """The object's size, or None when there is no such object."""
        try:
            with self._errors("head", key):
                return self._client.head_object(Bucket=self.bucket, Key=key)["ContentLength"]
        except NotFound:
            return None

    def _download(self, sha256: str) -> Path:
        key = self.key(sha256)
        handle, temp = self.temp_file()
        try:
            with handle, self._errors("download", key), disk_full_is_resource_exhausted(temp):
                self._client.download_fileobj(self.bucket, key, handle, Config=self._transfer)
            with self._lock:
                self.downloads += 1
            actual = sha256_file(temp)
            if actual != sha256:
                raise DataLoss(f"object {self.location(sha256)} at {self.endpoint} hashes to {actual}, not to its "
                               "name; it is corrupt", metadata=self._where(key))
            cached = self._install(temp, sha256, temp.stat().st_size)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        self._remember_verified(sha256, cached)
        return cached

    def _fetch_lock(self, sha256: str) -> threading.Lock:
        with self._lock:
            return self._fetch_locks.setdefault(sha256, threading.Lock())

    def _where(self, key: str) -> dict[str, str]:
        return {"endpoint": str(self.endpoint), "bucket": self.bucket} | ({"key": key} if key else {})

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        """Turns boto3/botocore failures inside the block into edgeforge's typed errors."""
        try:
            yield
        except EdgeforgeError:
            raise
        except S3UploadFailedError as error:    # boto3 wraps the ClientError of a failed upload
            cause = error.__context__
            if isinstance(cause, botocore.exceptions.ClientError):
                raise self._client_error(cause, action, key) from error
            raise Unavailable(f"S3 {action} of {key} at {self.endpoint} failed: {error}",
                              metadata=self._where(key)) from error
        except botocore.exceptions.ClientError as error:
            raise self._client_error(error, action, key) from error
        except botocore.exceptions.NoCredentialsError as error:
            raise FailedPrecondition(f"no S3 credentials for bucket {self.bucket} at {self.endpoint}: "
                                     f"{CREDENTIALS_HELP}", reason="DEPENDENCY_FAILED",
                                     metadata=self._where(key)) from error
        except botocore.exceptions.ParamValidationError as error:
            raise InvalidArgument(f"blobs: S3 {action} of {key or self.bucket!r} has invalid parameters: {error}",
                                  field="blobs") from error
        except _UNREACHABLE as error:
            raise Unavailable(f"the S3 endpoint {self.endpoint} (bucket {self.bucket}) is unreachable: {error}",
                              metadata=self._where(key)) from error
        except botocore.exceptions.BotoCoreError as error:
            raise Unavailable(f"S3 {action} at {self.endpoint} (bucket {self.bucket}) failed: {error}",
                              metadata=self._where(key)) from error

    def _client_error(self, error: botocore.exceptions.ClientError, action: str, key: str) -> EdgeforgeError:
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        metadata = self._where(key) | {"s3_error": code}
        what = f"s3://{self.bucket}/{key}" if key else f"bucket {self.bucket}"
        if code in _BAD_KEY_CODES:
            return FailedPrecondition(f"the S3 server at {self.endpoint} {_BAD_KEY_CODES[code]} ({code}) for "
                                      f"bucket {self.bucket}: {CREDENTIALS_HELP}", reason="DEPENDENCY_FAILED",
                                      metadata=metadata)
        if code == "NoSuchBucket":
            return FailedPrecondition(f"bucket {self.bucket} does not exist at {self.endpoint}; create it",
                                      reason="DEPENDENCY_FAILED", metadata=metadata)
        if code in _NOT_FOUND_CODES:
            return NotFound(f"{what} does not exist at {self.endpoint}", metadata=metadata)
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return Unavailable(f"S3 {action} of {what} at {self.endpoint} failed: {code} "
                               f"{error.response['Error'].get('Message', '')}".rstrip(), metadata=metadata)
        return FailedPrecondition(f"S3 {action} of {what} at {self.endpoint} was refused: {code} "
                                  f"{error.response['Error'].get('Message', '')}".rstrip(),
                                  reason="DEPENDENCY_FAILED", metadata=metadata)
