"""Who may see which build, artifact, upload and device: the coordinator's authorization rules.

Roles are checked by shared.auth.AuthInterceptor before a handler runs; this module adds the
per-resource rules for the caller it verified (`shared.auth.caller()`), with the facts kept in
shared/store/grants.py:

- admin (and every caller of a server started with auth=False) sees everything;
- a builder sees the builds it created and the artifacts it uploaded or its builds name;
- an agent acts only for the devices it registered, and fetches only its live leases' artifacts.

Per AIP-211, a builder asking for a build or an artifact it may not see gets PERMISSION_DENIED
whether or not the resource exists, so names cannot be probed; lists leave such resources out.
"""
from __future__ import annotations

import re

from google.protobuf.message import Message

from shared.auth import Token, caller, is_admin
from shared.errors import NotFound, PermissionDenied
from shared.store.grants import Grants

_ARTIFACT_NAME = re.compile(r"^artifacts/([0-9a-f]{64})$")


def artifact_shas(message: Message) -> set[str]:
    """The sha256 of every "artifacts/{sha256}" string anywhere in `message` (nested, repeated, maps)."""
    found: set[str] = set()

    def visit(value) -> None:
        if isinstance(value, str):
            match = _ARTIFACT_NAME.match(value)
            if match:
                found.add(match.group(1))
        elif isinstance(value, Message):
            for _, field_value in value.ListFields():
                visit(field_value)
        elif not isinstance(value, (bytes, int, float, bool)):    # repeated fields and maps
            for item in (value.values() if hasattr(value, "values") else value):
                visit(item)
    visit(message)
    return found


def _who(token: Token) -> str:
    return f"{token.role} token {token.id} ({token.name})"


class Ownership:
    def __init__(self, grants: Grants, state, tokens):
        self.grants, self.state, self.tokens = grants, state, tokens

    # ------------------------------------------------------------------ builds
    def record_build(self, build_id: str, created: bool) -> None:
        """After CreateBuild: a new build belongs to the caller; a replayed request_id must be the caller's."""
        token = caller()
        if token is None:
            return
        if created:
            self.grants.own_build(build_id, token.id)
        elif not is_admin(token):
            self.check_build(build_id)

    def check_build(self, build_id: str) -> None:
        token = caller()
        if is_admin(token) or self.grants.build_owner(build_id) == token.id:
            return
        raise PermissionDenied(f"builds/{build_id} is not visible to the {_who(token)}: a builder sees only the "
                               "builds it created", reason="NOT_OWNER", field="name")

    def list_builds(self, limit: int, offset: int) -> list[str]:
        token = caller()
        if is_admin(token):
            return self.state.list_builds(limit, offset)
        return self.grants.owned_builds(token.id, limit, offset)

    # ------------------------------------------------------------------ artifacts
    def _sync(self, token: Token) -> None:
        """Grants the artifacts named by the caller's builds; a finished build is read only once."""
        for build_id in self.grants.unsynced_builds(token.id):
            try:
                build, _, done, _ = self.state.load_build(build_id)
            except NotFound:                          # deleted: nothing more to grant
                self.grants.mark_synced(build_id)
                continue
            self.grants.grant(token.id, artifact_shas(build), "build")
            if done:
                self.grants.mark_synced(build_id)

    def may_read_artifact(self, sha256: str) -> bool:
        token = caller()
        if is_admin(token):
            return True
        if token.role != "builder":
            return False
        if self.grants.may_read(token.id, sha256):
            return True
        self._sync(token)
        return self.grants.may_read(token.id, sha256)

    def check_artifact(self, sha256: str, field: str = "name") -> None:
        if not self.may_read_artifact(sha256):
            token = caller()
            raise PermissionDenied(f"artifacts/{sha256} is not visible to the {_who(token)}: a builder sees the "
                                   "artifacts it uploaded and those its builds name", reason="NOT_OWNER", field=field)

    def visible_artifacts(self) -> set[str] | None:
        """The caller's readable sha256s; None for all (admin)."""
        token = caller()
        if is_admin(token):
            return None
        if token.role != "builder":
            return set()
        self._sync(token)
        return self.grants.granted(token.id)

    def record_upload(self, upload_id: str, succeeded: bool, sha256: str) -> None:
        """The caller's new upload (or a replay of its own); a completed one grants its bytes."""
        token = caller()
        if token is None:
            return
        self.grants.own_upload(upload_id, token.id)
        self.check_upload(upload_id)
        if succeeded and not is_admin(token):
            self.grants.grant(token.id, [sha256], "upload")

    def check_upload(self, upload_id: str) -> None:
        token = caller()
        if is_admin(token) or self.grants.upload_owner(upload_id) == token.id:
            return
        raise PermissionDenied(f"uploads/{upload_id} is not visible to the {_who(token)}: it belongs to another "
                               "token", reason="NOT_OWNER", field="upload")

    # ------------------------------------------------------------------ devices and leases
    def claim_device(self, device_id: str) -> None:
        """RegisterAgent: binds the device to the caller; another live token's device is refused."""
        token = caller()
        if token is None:
            return
        owner = self.grants.device_owner(device_id)
        if owner not in (None, token.id) and not is_admin(token):
            holder = self.tokens.get(owner)
            if holder is not None and not holder.revoked:
                raise PermissionDenied(f"devices/{device_id} is registered by another live agent token ({owner}); "
                                       "revoke that token or choose another device_id", reason="NOT_OWNER",
                                       field="device_id")
        if not is_admin(token):
            self.grants.bind_device(device_id, token.id)

    def check_device(self, device_id: str, field: str = "device") -> None:
        token = caller()
        if is_admin(token):
            return
        owner = self.grants.device_owner(device_id)
        if owner is None:                             # unknown here: the agent registers (again) on NOT_FOUND
            raise NotFound(f"devices/{device_id} is not registered with this token; call RegisterAgent first",
                           field=field)
        if owner != token.id:
            raise PermissionDenied(f"devices/{device_id} was registered by another agent token; the {_who(token)} "
                                   "may act only for the devices it registered", reason="NOT_OWNER", field=field)

    def check_lease(self, lease_name: str) -> None:
        """The lease's device must be the caller's (its artifact and result belong to that device)."""
        if is_admin(caller()):
            return
        rows = self.state.db.query("SELECT device_id FROM leases WHERE id = ?", (lease_name.removeprefix("leases/"),))
        if not rows:
            raise NotFound(f"lease {lease_name} does not exist", field="lease")
        self.check_device(rows[0]["device_id"], field="lease")
