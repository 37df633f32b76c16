"""Who owns what: builds, artifacts, uploads and devices, by token id.

Artifacts are content-addressed, so one blob may belong to several builders (two teams upload the
same base model; two builds export identical bytes). Ownership therefore cannot live on the artifact
row — it is a separate many-to-many table of grants (sha256, token id, source):

- "upload": the token completed an upload of these bytes (including one deduplicated at once because
  the blob was already stored: declaring the SHA-256 of content is taken as holding that content);
- "build": the artifact is named in a build the token owns (its spec's inputs, which were checked at
  CreateBuild, and every output the build records: float model, calibration statistics, compressed
  and exported candidates, reports).

Lineage is deliberately not used: it is written by whoever uploads (a client may claim any inputs),
and a content-addressed blob keeps only its first writer's lineage.

Builds, uploads and devices each have exactly one owner. A device belongs to the agent token that
registered it; a lease's artifact may be fetched only by that token while the lease is live. Admins
own nothing and see everything (the servicers check the role before asking this table).
"""
from __future__ import annotations

import time
from typing import Iterable

from shared.store.database import Database

SCHEMA = ["""CREATE TABLE IF NOT EXISTS build_owners (
    build_id TEXT PRIMARY KEY, token_id TEXT NOT NULL, create_time REAL NOT NULL, synced INTEGER NOT NULL)""",
          "CREATE INDEX IF NOT EXISTS build_owners_token ON build_owners (token_id, create_time)",
          """CREATE TABLE IF NOT EXISTS artifact_grants (
    sha256 TEXT NOT NULL, token_id TEXT NOT NULL, source TEXT NOT NULL, PRIMARY KEY (sha256, token_id))""",
          "CREATE INDEX IF NOT EXISTS artifact_grants_token ON artifact_grants (token_id)",
          "CREATE TABLE IF NOT EXISTS upload_owners (upload_id TEXT PRIMARY KEY, token_id TEXT NOT NULL)",
          "CREATE TABLE IF NOT EXISTS device_owners (device_id TEXT PRIMARY KEY, token_id TEXT NOT NULL)"]


class Grants:
    def __init__(self, db: Database):
        self.db = db
        db.migrate(SCHEMA)

    # ------------------------------------------------------------------ builds
    def own_build(self, build_id: str, token_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO build_owners VALUES (?, ?, ?, 0) ON CONFLICT (build_id) DO NOTHING",
                         (build_id, token_id, time.time()))

    def build_owner(self, build_id: str) -> str | None:
        rows = self.db.query("SELECT token_id FROM build_owners WHERE build_id = ?", (build_id,))
        return rows[0]["token_id"] if rows else None

    def owned_builds(self, token_id: str, limit: int | None = None, offset: int = 0) -> list[str]:
        """The token's build ids, newest first (the order of CoordinatorState.list_builds); all with no limit."""
        newest_first = "SELECT build_id FROM build_owners WHERE token_id = ? ORDER BY create_time DESC, build_id"
        if limit is None:               # SQLite has no OFFSET without LIMIT, PostgreSQL no negative LIMIT
            rows = self.db.query(newest_first, (token_id,))[offset:]
        else:
            rows = self.db.query(newest_first + " LIMIT ? OFFSET ?", (token_id, limit, offset))
        return [r["build_id"] for r in rows]

    def unsynced_builds(self, token_id: str) -> list[str]:
        rows = self.db.query("SELECT build_id FROM build_owners WHERE token_id = ? AND synced = 0", (token_id,))
        return [r["build_id"] for r in rows]

    def mark_synced(self, build_id: str) -> None:
        """A finished build's artifacts are all granted; it need not be read again."""
        with self.db.transaction() as conn:
            conn.execute("UPDATE build_owners SET synced = 1 WHERE build_id = ?", (build_id,))

    # ------------------------------------------------------------------ artifacts
    def grant(self, token_id: str, sha256s: Iterable[str], source: str) -> None:
        with self.db.transaction() as conn:
            conn.executemany("INSERT INTO artifact_grants VALUES (?, ?, ?) ON CONFLICT (sha256, token_id) DO NOTHING",
                             [(sha, token_id, source) for sha in set(sha256s)])

    def may_read(self, token_id: str, sha256: str) -> bool:
        return bool(self.db.query("SELECT 1 FROM artifact_grants WHERE sha256 = ? AND token_id = ?",
                                  (sha256, token_id)))

    def granted(self, token_id: str) -> set[str]:
        return {r["sha256"] for r in self.db.query("SELECT sha256 FROM artifact_grants WHERE token_id = ?",
                                                   (token_id,))}

    # ------------------------------------------------------------------ uploads
    def own_upload(self, upload_id: str, token_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO upload_owners VALUES (?, ?) ON CONFLICT (upload_id) DO NOTHING",
                         (upload_id, token_id))

    def upload_owner(self, upload_id: str) -> str | None:
        rows = self.db.query("SELECT token_id FROM upload_owners WHERE upload_id = ?", (upload_id,))
        return rows[0]["token_id"] if rows else None

    # ------------------------------------------------------------------ devices
    def device_owner(self, device_id: str) -> str | None:
        rows = self.db.query("SELECT token_id FROM device_owners WHERE device_id = ?", (device_id,))
        return rows[0]["token_id"] if rows else None

    def bind_device(self, device_id: str, token_id: str) -> None:
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO device_owners VALUES (?, ?) ON CONFLICT (device_id) DO UPDATE "
                         "SET token_id = excluded.token_id", (device_id, token_id))
