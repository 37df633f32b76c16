"""`edgeforge store check` (shared/store/check.py): each kind of damage is found, --repair removes only
what holds no data, and the CLI's exit status and JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.errors import NotFound
from shared.store.artifacts import ArtifactStore
from shared.store.check import check_store
from shared.store.database import Database
from shared.store.records import ArtifactKind

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A store with two artifacts and an open upload, as a coordinator leaves it."""
    directory = tmp_path / "data"
    store = ArtifactStore(Database(directory / "edgeforge.db"), directory)
    for i in range(2):
        source = tmp_path / f"a{i}.bin"
        source.write_bytes(bytes([i]) * 1000)
        store.put_file(source, ArtifactKind.MODEL)
    upload = store.create_upload(ArtifactKind.DATASET, 10, "ab" * 32)
    store.write_upload(upload.upload_id, 0, [b"12345"])
    store.db.close()
    return directory


def _blob(data_dir: Path, index: int = 0) -> Path:
    return sorted((data_dir / "blobs" / "sha256").glob("*/*"))[index]


def _kinds(report) -> dict[str, int]:
    return report.counts()


def test_a_healthy_store_is_clean(data_dir):
    report = check_store(data_dir)
    assert report.clean and report.problems == []
    assert (report.artifacts, report.blobs, report.bytes_verified, report.uploads_open) == (2, 2, 2000, 1)


def test_a_corrupt_byte_is_reported(data_dir):
    blob = _blob(data_dir)
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[500] ^= 0x01
    blob.write_bytes(bytes(data))
    report = check_store(data_dir)
    (problem,) = report.problems
    assert problem.kind == "CORRUPT_BLOB" and problem.path == str(blob) and "hash to" in problem.detail


def test_a_deleted_blob_and_a_truncated_one_are_reported(data_dir):
    missing, short = _blob(data_dir, 0), _blob(data_dir, 1)
    missing.unlink()
    os.chmod(short, 0o644)
    short.write_bytes(b"x")
    report = check_store(data_dir, repair=True, grace_s=0)
    assert _kinds(report) == {"MISSING_BLOB": 1, "SIZE_MISMATCH": 1}
    assert "1000 bytes" in next(p for p in report.problems if p.kind == "SIZE_MISMATCH").detail
    assert report.repaired == []                                     # rows with data are never touched


def test_orphans_stale_temp_and_stray_parts_are_reported_and_repaired(data_dir):
    orphan = data_dir / "blobs" / "sha256" / "cd" / ("cd" * 32)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody's")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = data_dir / "blobs" / "tmp" / f"{dead.pid}@{os.uname().nodename.replace('.', '_')}.abc.gguf"
    stale.write_bytes(b"half a file")
    unknown_old = data_dir / "blobs" / "tmp" / "somebody-else.tmp"
    unknown_old.write_bytes(b"?")
    os.utime(unknown_old, (time.time() - 3 * 86400,) * 2)
    live = data_dir / "blobs" / "tmp" / f"{os.getpid()}@{os.uname().nodename.replace('.', '_')}.live"
    live.write_bytes(b"being written")
    stray = data_dir / "uploads" / "feedface.part"
    stray.write_bytes(b"?")
    stray_dir_file = data_dir / "blobs" / "sha256" / "README"
    stray_dir_file.write_text("not a blob")

    report = check_store(data_dir)
    assert _kinds(report) == {"ORPHAN_BLOB": 1, "STALE_TEMP": 2, "STRAY_PART": 1, "UNKNOWN_FILE": 1}
    assert report.temp_in_progress == 1                               # the live writer's file is no problem
    assert not check_store(data_dir, repair=True).clean               # young orphans are left alone...
    assert orphan.exists() and not stale.exists() and not unknown_old.exists()
    report = check_store(data_dir, repair=True, grace_s=0)            # ...until they are old enough
    assert {p.kind for p in report.repaired} == {"ORPHAN_BLOB", "STRAY_PART"}
    assert _kinds(report) == {"UNKNOWN_FILE": 1}                      # never removed: someone put it there
    assert not orphan.exists() and not stray.exists() and live.exists() and stray_dir_file.exists()
    assert check_store(data_dir).artifacts == 2


def test_uploads_that_lost_bytes_or_are_stuck(data_dir):
    (part,) = (data_dir / "uploads").glob("*.part")
    part.write_bytes(b"12")                                           # 5 were committed
    report = check_store(data_dir, stuck_after_s=-1)
    assert _kinds(report) == {"LOST_UPLOAD_BYTES": 1, "STUCK_UPLOAD": 1}


def test_a_directory_without_a_store_is_not_found(tmp_path):
    with pytest.raises(NotFound) as error:
        check_store(tmp_path)
    assert "edgeforge.db" in error.value.message and error.value.field == "data_dir"


def test_the_cli_reports_json_and_exit_status(data_dir):
    command = [sys.executable, "-m", "clients.cli.main", "store", "check", "--data-dir", str(data_dir), "--json"]
    clean = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["clean"] is True
    _blob(data_dir).unlink()
    broken = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1
    document = json.loads(broken.stdout)
    assert document["problem_counts"] == {"MISSING_BLOB": 1} and document["problems"][0]["repairable"] is False
    nowhere = subprocess.run(command[:-3] + ["--data-dir", str(data_dir / "nope")], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert nowhere.returncode == 2 and "edgeforge.db" in nowhere.stderr


def test_the_cli_checks_a_store_on_postgresql_and_s3(tmp_path, postgres_url, s3_url):
    """The coordinators' shared backends (docs/DEPLOY.md): rows in PostgreSQL, blobs in an S3 bucket, checked
    through --database/--blobs (the AWS_* credentials come from the environment, as for the coordinator)."""
    from shared.store.blobs import open_blobs
    from shared.store.database import open_database
    directory = tmp_path / "data"
    store = ArtifactStore(open_database(postgres_url), directory, open_blobs(s3_url, directory / "blob-cache"))
    source = tmp_path / "a.bin"
    source.write_bytes(b"edgeforge" * 500)
    record = store.put_file(source, ArtifactKind.MODEL)
    store.db.close()
    command = [sys.executable, "-m", "clients.cli.main", "store", "check", "--data-dir", str(directory),
               "--database", postgres_url, "--blobs", s3_url, "--json"]
    clean = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert clean.returncode == 0, clean.stderr
    document = json.loads(clean.stdout)
    assert document["clean"] is True
    store.blobs.delete(store.blobs.location(record.sha256))
    broken = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert broken.returncode == 1 and json.loads(broken.stdout)["problem_counts"] == {"MISSING_BLOB": 1}
    wrong = postgres_url.rsplit("/", 1)[0] + "/no_such_database"
    refused = subprocess.run(command[:7] + [wrong], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no_such_database" in refused.stderr and "Traceback" not in refused.stderr
