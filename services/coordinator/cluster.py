"""How a coordinator joins a deployment: where its metadata and blobs live, its id among the coordinators
sharing them, and how long its claim on a build outlives its last renewal. The flags are shared by
`python -m services.coordinator.server` and `edgeforge up`; docs/DEPLOY.md shows them in topologies.

    --database URL       <data-dir>/edgeforge.db, a path, sqlite:///abs/path or postgresql://user:pw@host:port/db
    --blobs URL          <data-dir>/blobs, a directory or s3://bucket[/prefix]?endpoint_url=...&region=...
    --coordinator-id ID  host:data-dir while this coordinator is alone on its data dir (a lock says so), else
                         host:pid:random; unique among the live coordinators sharing the database
    --claim-ttl-s S      15; another coordinator takes a dead one's builds over within about 4/3 of it

This module stays light (argparse only): the CLI builds its parser from it without importing the servers.
"""
from __future__ import annotations

import argparse
import fcntl
import math
import os
import socket
from pathlib import Path

from services.coordinator.claims import DEFAULT_TTL_S

DATABASE_ENV = "EDGEFORGE_DATABASE"
BLOBS_ENV = "EDGEFORGE_BLOBS"
MIN_CLAIM_TTL_S = 1.0          # renewed every ttl/3: shorter claims would lapse under an ordinary load spike
IDENTITY_LOCK = "coordinator.lock"
_identity_locks: dict[Path, int] = {}    # data dir -> the open lock file, held until the process exits


def data_dir_identity(data_dir: Path) -> str | None:
    """`host:/abs/data-dir` when this process is the only coordinator on `data_dir`, else None.

    Exclusivity is an flock on data_dir/coordinator.lock, held for the rest of the process's life; the kernel
    drops it when the process dies, however it dies. So a coordinator restarted on its data dir (kill -9
    included) gets its previous life's id back and resumes that life's builds at once — their owner is
    provably gone — instead of waiting for the claims to lapse. A second live coordinator on the same
    data dir (one host, a shared SQLite database) does not get the lock and takes a random id instead."""
    data_dir = data_dir.resolve()
    if data_dir in _identity_locks:                 # this process already is that coordinator
        return None
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / IDENTITY_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    _identity_locks[data_dir] = fd
    return f"{socket.gethostname()}:{data_dir}"


def release_identity(data_dir: Path) -> None:
    """Gives up `data_dir_identity`'s lock (the coordinator stopped serving; in-process restarts in tests)."""
    fd = _identity_locks.pop(data_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage and replication")
    group.add_argument("--database", help=f"the metadata database: a SQLite file path, sqlite:///abs/path or "
                                          f"postgresql://user:password@host:port/dbname (default: ${DATABASE_ENV}, "
                                          "else <data-dir>/edgeforge.db)")
    group.add_argument("--blobs", help=f"the blob store: a directory or s3://bucket[/prefix]?endpoint_url=http://"
                                       f"host:port&region=REGION, credentials from the AWS environment variables "
                                       f"(default: ${BLOBS_ENV}, else <data-dir>/blobs)")
    group.add_argument("--coordinator-id", help="this coordinator's name among those sharing the database, unique "
                                                "among the live ones; the stages it ran carry it, and restarted "
                                                "under the same id it resumes its builds at once instead of after "
                                                "their claims lapse (default: host:data-dir while it is the only "
                                                "coordinator on its --data-dir, else host:pid:random)")
    group.add_argument("--claim-ttl-s", type=float, default=DEFAULT_TTL_S,
                       help="how long a coordinator's claim on a build lasts after its last renewal (renewed every "
                            "third of it); a dead coordinator's builds are taken over after about this long "
                            f"(default: {DEFAULT_TTL_S:g})")


def cluster_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """create_server's keyword arguments from the flags (and their environment variables); a bad value is
    a usage error naming the flag."""
    if not math.isfinite(args.claim_ttl_s) or args.claim_ttl_s < MIN_CLAIM_TTL_S:
        parser.error(f"--claim-ttl-s must be at least {MIN_CLAIM_TTL_S:g} s (claims are renewed every third of it), "
                     f"got {args.claim_ttl_s:g}")
    if args.coordinator_id is not None and not args.coordinator_id.strip():
        parser.error("--coordinator-id must not be empty (leave it out for host:pid:random)")
    return {"database": args.database or os.environ.get(DATABASE_ENV) or None,
            "blobs": args.blobs or os.environ.get(BLOBS_ENV) or None,
            "coordinator_id": args.coordinator_id, "claim_ttl_s": args.claim_ttl_s}


def storage_error_message(args: argparse.Namespace, error) -> str:
    """A storage error (an EdgeforgeError whose field is "database" or "blobs") as a usage message that
    names where the bad value came from: its flag, or the environment variable standing in for it."""
    environment = {"database": DATABASE_ENV, "blobs": BLOBS_ENV}.get(error.field or "")
    if environment is None:
        return error.message
    if getattr(args, error.field, None) is None and os.environ.get(environment):
        return f"${environment} (for --{error.field}): {error.message}"
    return f"--{error.field}: {error.message}"
