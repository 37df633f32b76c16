"""Bearer tokens: created once, shown once, stored only as their SHA-256, checked on every call.

A token is "ef_" + 32 random bytes (base64url). The database keeps its SHA-256, a short public id
(the first 8 characters after the prefix, for `tokens list` and `tokens revoke`), a role and a name.
Revoking sets revoke_time; the check reads the row on every call, so a revoked token stops working
at once — there is no cache to expire.

`AuthInterceptor` guards every gRPC method: `SERVICE_ROLES` names the roles that may call each
service (admin may call everything; a service missing from the table is admin-only, so a new
service is closed until someone opens it on purpose); only health checking is open (load balancers
probe it), and reflection needs a token of any role (the schema is public, but not to strangers).
The verified token travels to the handler in a context variable (`caller()`), which servicers use
for ownership checks (shared/store/grants.py). The verifier is a function secret -> Token: the
coordinator passes its TokenStore.verify; a standalone worker passes `RemoteVerifier`, which asks
the coordinator's Tokens.WhoAmI on every call (no cache, so a revocation reaches workers at once).
"""
from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import os
import secrets
import time
from pathlib import Path
from typing import Callable, Iterable

import grpc

from shared.errors import EdgeforgeError, InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from shared.handlers import rewrap
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

    def get(self, token_id: str) -> Token | None:
        rows = self.db.query("SELECT id, role, name, create_time, revoke_time FROM tokens WHERE id = ?", (token_id,))
        return Token(**dict(rows[0])) if rows else None

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
            raise Unauthenticated("unknown bearer token: no token of this coordinator has that secret "
                                  "(mistyped, or made by another coordinator)")
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
    raise Unauthenticated("this call needs the metadata 'authorization: Bearer <token>' (no token was sent)")


# Roles besides admin that may call each service; admin may call everything. Not listed: admin only.
SERVICE_ROLES: dict[str, tuple[str, ...]] = {
    "edgeforge.v1.Coordinator": ("builder",),
    "google.longrunning.Operations": ("builder",),
    "edgeforge.v1.ArtifactStore": ("builder",),
    "edgeforge.v1.DeviceRegistry": ("builder",),
    "edgeforge.v1.AgentGateway": ("agent",),
    "edgeforge.v1.Calibrator": (),
    "edgeforge.v1.Compressor": (),
    "edgeforge.v1.Exporter": (),
    "edgeforge.v1.Tokens": (),
}
# Single methods that differ from their service's row.
METHOD_ROLES: dict[str, tuple[str, ...]] = {"/edgeforge.v1.Tokens/WhoAmI": ("builder", "agent")}
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
# Any live token may call these (grpcurl's `list` and `describe` with -H "authorization: Bearer …").
ANY_ROLE_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"})

_CALLER: contextvars.ContextVar[Token | None] = contextvars.ContextVar("edgeforge_caller", default=None)


def caller() -> Token | None:
    """The verified token of the call this thread serves; None when the server runs without auth."""
    return _CALLER.get()


def is_admin(token: Token | None) -> bool:
    """Admins, and every caller of a server started without auth (a closed test network), see everything."""
    return token is None or token.role == "admin"


def require_admin(what: str) -> None:
    token = caller()
    if not is_admin(token):
        raise PermissionDenied(f"{what} needs an admin token; this call carries the {token.role} token {token.id}")


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a live token of an allowed role; hands the token to the handler."""

    def __init__(self, verify: Callable[[str], Token], roles_by_service: dict[str, tuple[str, ...]] | None = None):
        self.verify = verify
        self.roles_by_service = SERVICE_ROLES if roles_by_service is None else roles_by_service

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        service = method.lstrip("/").split("/", 1)[0]
        if service in OPEN_SERVICES:
            return continuation(handler_call_details)
        allowed = (("builder", "agent") if service in ANY_ROLE_SERVICES
                   else METHOD_ROLES.get(method, self.roles_by_service.get(service, ())))
        try:
            token = self.verify(bearer(handler_call_details.invocation_metadata))
            if token.role != "admin" and token.role not in allowed:
                needed = " or ".join(("admin", *allowed))
                raise PermissionDenied(f"a {token.role} token may not call {service}: it needs role {needed} "
                                       f"(token {token.id}, {token.name})")
        except EdgeforgeError as error:
            return _refusal(continuation(handler_call_details), error)
        return _as_caller(continuation(handler_call_details), token)


def _as_caller(handler: grpc.RpcMethodHandler | None, token: Token) -> grpc.RpcMethodHandler | None:
    """`handler` with `caller()` set to `token` while its behaviour runs (in the pool's thread)."""
    if handler is None:
        return None

    def unary(behaviour):
        def run(request, context):
            reset = _CALLER.set(token)
            try:
                return behaviour(request, context)
            finally:
                _CALLER.reset(reset)
        return run

    def streaming(behaviour):
        def run(request, context):
            _CALLER.set(token)            # the generator runs on this pool thread; every guarded call sets it anew
            yield from behaviour(request, context)
        return run
    return rewrap(handler, unary, streaming)


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


class RemoteVerifier:
    """Verifies a secret by asking a coordinator's Tokens.WhoAmI with it, on every call (no cache). Given several
    coordinators ({address: channel}), an unavailable one is skipped for the next (shared/failover.py)."""

    def __init__(self, channel: grpc.Channel | dict[str, grpc.Channel], timeout_s: float = 10.0):
        from edgeforge.v1 import tokens_pb2_grpc
        from shared.failover import Failover
        channels = channel if isinstance(channel, dict) else {"coordinator": channel}
        self.coordinators = Failover(list(channels), [tokens_pb2_grpc.TokensStub(c) for c in channels.values()],
                                     "coordinator")
        self.timeout_s = timeout_s

    def __call__(self, secret: str) -> Token:
        from edgeforge.v1 import tokens_pb2
        from shared.errors import Unavailable
        ask = lambda stub: stub.WhoAmI(tokens_pb2.WhoAmIRequest(), metadata=(("authorization", f"Bearer {secret}"),),
                                       timeout=self.timeout_s)
        try:
            reply = self.coordinators.call(ask)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(f"the coordinator refused the bearer token: {error.details()}") from error
            raise Unavailable(f"cannot check the bearer token with the coordinator: {error.code().name} "
                              f"{error.details()}") from error
        return token_from_proto(reply)


ROLE_TO_PROTO = {"admin": 1, "builder": 2, "agent": 3}          # edgeforge.v1.TokenRole values


def token_from_proto(message) -> Token:
    role = {v: k for k, v in ROLE_TO_PROTO.items()}.get(message.role, "")
    revoke = message.revoke_time.ToNanoseconds() / 1e9 if message.HasField("revoke_time") else None
    return Token(message.name.removeprefix("tokens/"), role, message.display_name,
                 message.create_time.ToNanoseconds() / 1e9, revoke)


def token_to_proto(token: Token):
    from edgeforge.v1 import tokens_pb2
    message = tokens_pb2.Token(name=f"tokens/{token.id}", role=ROLE_TO_PROTO[token.role], display_name=token.name)
    message.create_time.FromNanoseconds(int(token.create_time * 1e9))
    if token.revoke_time is not None:
        message.revoke_time.FromNanoseconds(int(token.revoke_time * 1e9))
    return message


def write_secret(path: Path, secret: str) -> None:
    """Writes a token file readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")    # two processes may write it at once
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(scratch, path)


def ensure_token_file(store: TokenStore, path: Path, role: str, name: str) -> str:
    """The secret in `path` while it is a live token of `role`; otherwise a new token written there (0600)."""
    if path.is_file():
        try:
            token = store.verify(path.read_text().strip())
            if token.role == role:
                return path.read_text().strip()
        except Unauthenticated:
            pass
    _, secret = store.create(role, name)
    write_secret(path, secret)
    return secret
