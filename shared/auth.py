"""Bearer tokens: created once, shown once, stored only as their SHA-256, checked on every call.

A token is "ef_" + 32 random bytes (base64url). The database keeps its SHA-256, a short public id
(the first 8 characters after the prefix, for `tokens list` and `tokens revoke`), a role and a name.
Revoking sets revoke_time; the check reads the row on every call, so a revoked token stops working
at once — there is no cache to expire.

`AuthInterceptor` guards gRPC methods by service: each protected service names the roles that may
call it; health checking and reflection stay open. Today the AgentGateway requires the agent role
(issue 7 extends the same table to every service and the admin/builder roles).
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
import time
from typing import Iterable

import grpc

from shared.errors import EdgeforgeError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from shared.store.database import Database

ROLES = ("admin", "builder", "agent")
PREFIX = "ef_"
SCHEMA = ["""CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL,
    create_time REAL NOT NULL, revoke_time REAL)"""]


@dataclasses.dataclass(frozen=True)
class Token:
    id: str
    role: str
    name: str
    create_time: float
    revoke_time: float | None

    @property
    def revoked(self) -> bool:
        return self.revoke_time is not None


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, db: Database):
        self.db = db
        db.migrate(SCHEMA)

    def create(self, role: str, name: str) -> tuple[Token, str]:
        """A new token; returns (its record, the secret). The secret is not stored and cannot be shown again."""
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}, got {role!r}", field="role")
        if not name or len(name) > 128:
            raise InvalidArgument("a token needs a name of 1-128 characters (who or what uses it)", field="name")
        secret = PREFIX + secrets.token_urlsafe(32)
        token = Token(secret[len(PREFIX):len(PREFIX) + 8], role, name, time.time(), None)
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, NULL)",
                         (token.id, _hash(secret), role, name, token.create_time))
        return token, secret

    def list(self) -> list[Token]:
        rows = self.db.query("SELECT id, role, name, create_time, revoke_time FROM tokens ORDER BY create_time")
        return [Token(**dict(r)) for r in rows]

    def revoke(self, token_id: str) -> Token:
        with self.db.transaction() as conn:
            if not conn.execute("UPDATE tokens SET revoke_time = ? WHERE id = ? AND revoke_time IS NULL",
                                (time.time(), token_id)).rowcount:
                row = conn.execute("SELECT revoke_time FROM tokens WHERE id = ?", (token_id,)).fetchone()
                if row is None:
                    raise NotFound(f"no token has id {token_id!r} (see `edgeforge tokens list`)")
        return next(t for t in self.list() if t.id == token_id)

    def verify(self, secret: str) -> Token:
        """The live token for `secret`; UNAUTHENTICATED when it is unknown or revoked."""
        if not secret.startswith(PREFIX):
            raise Unauthenticated("the bearer token is not an edgeforge token (they start with 'ef_')")
        rows = self.db.query("SELECT id, role, name, create_time, revoke_time FROM tokens WHERE sha256 = ?",
                             (_hash(secret),))
        if not rows:
            raise Unauthenticated("unknown bearer token")
        token = Token(**dict(rows[0]))
        if token.revoked:
            raise Unauthenticated(f"token {token.id} ({token.name}) was revoked")
        return token


def bearer(metadata: Iterable[tuple[str, str]]) -> str:
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, secret = value.partition(" ")
            if scheme.lower() != "bearer" or not secret:
                raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
            return secret.strip()
    raise Unauthenticated("this call needs the metadata 'authorization: Bearer <token>'")


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls to guarded services without a live token of an allowed role."""

    def __init__(self, store: TokenStore, roles_by_service: dict[str, tuple[str, ...]]):
        self.store, self.roles_by_service = store, roles_by_service

    def intercept_service(self, continuation, handler_call_details):
        service = handler_call_details.method.lstrip("/").split("/", 1)[0]
        allowed = self.roles_by_service.get(service)
        if allowed is None:
            return continuation(handler_call_details)
        try:
            token = self.store.verify(bearer(handler_call_details.invocation_metadata))
            if token.role not in allowed and token.role != "admin":
                raise PermissionDenied(f"a {token.role} token may not call {service}; it needs role "
                                       f"{' or '.join(allowed)}")
        except EdgeforgeError as error:
            return _refusal(continuation(handler_call_details), error)
        return continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler | None, error: EdgeforgeError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that aborts with `error`'s rich status."""
    from shared.grpc_status import _abort

    def deny(request, context):
        _abort(context, error)

    def deny_stream(request, context):
        _abort(context, error)
        yield from ()
    if handler is None:
        return grpc.unary_unary_rpc_method_handler(deny)
    factory = {(False, False): (grpc.unary_unary_rpc_method_handler, deny),
               (False, True): (grpc.unary_stream_rpc_method_handler, deny_stream),
               (True, False): (grpc.stream_unary_rpc_method_handler, deny),
               (True, True): (grpc.stream_stream_rpc_method_handler, deny_stream)}
    make, behaviour = factory[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, handler.request_deserializer, handler.response_serializer)
