"""Leased ownership of builds, so that several coordinators can share one database.

A build runs on the one coordinator that holds its claim: a row of `build_claims` naming the owner, an
epoch and an expiry. The owner renews every claim it holds every ttl/3 (`renew`, called by the claimer
thread of services/coordinator/servicer.py); a coordinator that dies stops renewing, its claims lapse
after ttl, and another coordinator takes the build over (`claim_next`) and resumes it from the memo
(services/coordinator/pipeline.py).

Every claim — a new build's or a takeover — raises the epoch by one: it is a fencing token. Before each
stage runs and before its result is recorded, the runner asks `holds(build_id, epoch)`; a runner whose
coordinator was taken for dead (frozen, cut off from the database for longer than ttl) finds a higher
epoch there and stops without writing anything. Two live coordinators therefore never run the same stage:
while the owner renews, nobody else can claim the build, and once its claim lapsed the owner's next check
fails before it starts another stage.

Expiry times are wall-clock seconds (time.time()) written by each coordinator, so coordinators on several
hosts need clocks that agree to well within ttl (NTP does). On PostgreSQL `claim_next` locks the row it
takes with SELECT ... FOR UPDATE SKIP LOCKED, so coordinators looking for work at the same moment take
different builds instead of queueing behind one lock; on SQLite the transaction itself is exclusive.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid

from shared.store.database import Database

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 15.0

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS build_claims (
        build_id TEXT PRIMARY KEY, owner TEXT NOT NULL, epoch INTEGER NOT NULL, expire_time REAL NOT NULL)""",
]


class ClaimLost(Exception):
    """This coordinator no longer holds the build's claim: another one took the build over. Not an
    EdgeforgeError on purpose: the build did not fail, this runner must stop without recording anything."""

    def __init__(self, build_id: str, owner: str):
        super().__init__(f"builds/{build_id} is now run by coordinator {owner or '(none)'}")
        self.build_id, self.owner = build_id, owner


def default_coordinator_id() -> str:
    """host:pid:random — unique per process, and it says where the process runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ClaimStore:
    def __init__(self, db: Database, coordinator_id: str | None = None, ttl_s: float = DEFAULT_TTL_S):
        if ttl_s <= 0:
            raise ValueError(f"the claim ttl must be positive, got {ttl_s} s")
        if coordinator_id is not None and not coordinator_id.strip():
            raise ValueError("the coordinator id must not be empty")
        self.db, self.ttl_s = db, ttl_s
        self.coordinator_id = coordinator_id or default_coordinator_id()
        self._held: dict[str, int] = {}          # build_id -> epoch, the claims this coordinator renews
        self._lock = threading.Lock()
        db.migrate(SCHEMA)
        if coordinator_id is not None:
            # A coordinator restarted under its own id: the claims under that id are its previous life's,
            # whose process is gone (ids are unique among live coordinators), so they lapse now instead of
            # after ttl and the restart resumes those builds at once (with new epochs).
            with db.transaction() as conn:
                conn.execute("UPDATE build_claims SET expire_time = 0 WHERE owner = ?", (self.coordinator_id,))

    # ------------------------------------------------------------------ taking builds
    def claim(self, build_id: str) -> int | None:
        """Claims `build_id` (a new build, or one whose claim lapsed or was released); returns the epoch,
        or None while another coordinator holds a live claim."""
        now = time.time()
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO build_claims (build_id, owner, epoch, expire_time) VALUES (?, ?, 1, ?) "
                         "ON CONFLICT (build_id) DO UPDATE SET owner = excluded.owner, "
                         "epoch = build_claims.epoch + 1, expire_time = excluded.expire_time "
                         "WHERE build_claims.expire_time < ?",
                         (build_id, self.coordinator_id, now + self.ttl_s, now))
            row = conn.execute("SELECT owner, epoch, expire_time FROM build_claims WHERE build_id = ?",
                               (build_id,)).fetchone()
        if row["owner"] != self.coordinator_id or row["expire_time"] <= now:
            return None
        self._hold(build_id, row["epoch"])
        return row["epoch"]

    def claim_next(self) -> tuple[str, int] | None:
        """Takes one unfinished build that nobody holds (never claimed, released, or its owner's claim
        lapsed) and returns (build_id, epoch); None when there is none."""
        now = time.time()
        self._adopt_unclaimed()
        # SQLite has no row locks: its exclusive transaction serializes takers. PostgreSQL locks the one row
        # taken and lets the other takers skip it.
        with self.db.transaction(exclusive=not self.db.skip_locked) as conn:
            row = conn.execute("SELECT build_id, owner, epoch FROM build_claims WHERE expire_time < ? AND build_id IN "
                               "(SELECT id FROM builds WHERE done = 0) ORDER BY expire_time, build_id LIMIT 1"
                               + self.db.skip_locked, (now,)).fetchone()
            if row is None:
                return None
            epoch = row["epoch"] + 1
            taken = conn.execute("UPDATE build_claims SET owner = ?, epoch = ?, expire_time = ? "
                                 "WHERE build_id = ? AND epoch = ?",
                                 (self.coordinator_id, epoch, now + self.ttl_s, row["build_id"], row["epoch"])).rowcount
        if taken != 1:            # only without row locks: someone else bumped the epoch first
            return None
        if row["owner"]:
            log.info("took over builds/%s from coordinator %s (its claim lapsed); epoch %d",
                     row["build_id"], row["owner"], epoch)
        self._hold(row["build_id"], epoch)
        return row["build_id"], epoch

    def _adopt_unclaimed(self) -> None:
        """Gives every unfinished build without a claim row an unowned, lapsed one (builds created before
        claims existed, or whose creator died between creating and claiming it)."""
        missing = self.db.query("SELECT id FROM builds WHERE done = 0 AND id NOT IN "
                                "(SELECT build_id FROM build_claims)")
        if missing:
            with self.db.transaction() as conn:
                for row in missing:
                    conn.execute("INSERT INTO build_claims (build_id, owner, epoch, expire_time) VALUES (?, '', 0, 0) "
                                 "ON CONFLICT (build_id) DO NOTHING", (row["id"],))

    # ------------------------------------------------------------------ holding them
    def holds(self, build_id: str, epoch: int) -> bool:
        """Whether this coordinator still holds `build_id` at `epoch`, with its claim not lapsed."""
        rows = self.db.query("SELECT owner, epoch, expire_time FROM build_claims WHERE build_id = ?", (build_id,))
        return bool(rows) and rows[0]["owner"] == self.coordinator_id and rows[0]["epoch"] == epoch \
            and rows[0]["expire_time"] > time.time()

    def owner(self, build_id: str) -> str:
        """The coordinator holding `build_id` now ("" when nobody does)."""
        rows = self.db.query("SELECT owner FROM build_claims WHERE build_id = ?", (build_id,))
        return rows[0]["owner"] if rows else ""

    def held(self) -> dict[str, int]:
        with self._lock:
            return dict(self._held)

    def renew(self) -> list[str]:
        """Extends every claim this coordinator holds by one ttl; returns the builds whose claim it lost
        (taken over after a lapse), which it stops renewing."""
        held = self.held()
        if not held:
            return []
        now, lost = time.time(), []
        with self.db.transaction() as conn:
            for build_id, epoch in held.items():
                if not conn.execute("UPDATE build_claims SET expire_time = ? WHERE build_id = ? AND owner = ? "
                                    "AND epoch = ?", (now + self.ttl_s, build_id, self.coordinator_id, epoch)).rowcount:
                    lost.append(build_id)
        for build_id in lost:
            log.warning("lost the claim on builds/%s (now held by %s); its runner stops at its next stage",
                        build_id, self.owner(build_id) or "nobody")
            self._forget(build_id, held[build_id])
        return lost

    def release(self, build_id: str, epoch: int) -> None:
        """Gives up `build_id` (its runner ended). A finished build's claim is deleted; an unfinished one's
        is left lapsed, keeping its epoch, so another coordinator takes it at once."""
        self._forget(build_id, epoch)
        with self.db.transaction() as conn:
            conn.execute("DELETE FROM build_claims WHERE build_id = ? AND owner = ? AND epoch = ? AND build_id IN "
                         "(SELECT id FROM builds WHERE done = 1)", (build_id, self.coordinator_id, epoch))
            conn.execute("UPDATE build_claims SET owner = '', expire_time = 0 WHERE build_id = ? AND owner = ? "
                         "AND epoch = ?", (build_id, self.coordinator_id, epoch))

    def _hold(self, build_id: str, epoch: int) -> None:
        with self._lock:
            self._held[build_id] = epoch

    def _forget(self, build_id: str, epoch: int) -> None:
        with self._lock:
            if self._held.get(build_id) == epoch:
                del self._held[build_id]
