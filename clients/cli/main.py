"""`edgeforge`: run edgeforge, submit builds, inspect results.

Exit codes:
  0  success
  1  the build or a call failed (the message says why)
  2  bad spec, bad argument or unknown model format (nothing was started)
  3  the build finished, but on some target no candidate met the constraints (the nearest misses
     are listed)
  4  the coordinator could not be reached
  5  the build was cancelled

Every command but `up` calls the coordinator with a bearer token: --token, $EDGEFORGE_TOKEN,
--token-file, $EDGEFORGE_TOKEN_FILE, else ./.edgeforge/admin.token (written by `edgeforge up` and the
coordinator, mode 0600). --tls-ca (with --tls-cert/--tls-key for mutual TLS) speaks TLS.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
from google.protobuf import json_format

from clients.cli import progress, store as store_cli, tables
from clients.python import spec as spec_file, transfer
from clients.python.client import Client, build_name, resolve_token
from edgeforge.v1 import coordinator_pb2

OK, FAILED, BAD_INPUT, NO_CANDIDATE, UNREACHABLE, CANCELLED = 0, 1, 2, 3, 4, 5
DEFAULT_ADDRESS = os.environ.get("EDGEFORGE_ADDRESS", "127.0.0.1:50051")


def _fail(message: str, code: int) -> int:
    print(f"edgeforge: {message}", file=sys.stderr)
    return code


def _rpc_exit(error: grpc.RpcError) -> int:
    from shared.grpc_status import error_details
    reason, metadata = error_details(error)
    where = f" [{metadata['field']}]" if "field" in metadata else ""
    code = {grpc.StatusCode.INVALID_ARGUMENT: BAD_INPUT, grpc.StatusCode.UNAVAILABLE: UNREACHABLE,
            grpc.StatusCode.CANCELLED: CANCELLED}.get(error.code(), FAILED)
    hint = ""
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        hint = ("\n  give a token: --token, $EDGEFORGE_TOKEN, --token-file, $EDGEFORGE_TOKEN_FILE, or run where "
                "./.edgeforge/admin.token is (the coordinator writes <data-dir>/admin.token)")
    return _fail(f"{error.code().name}{' ' + reason if reason else ''}{where}: {error.details()}{hint}", code)


def _client(args) -> Client:
    from shared.server import client_tls_from_files
    try:
        tls = client_tls_from_files(args.client_tls_ca, args.client_tls_cert, args.client_tls_key)
    except ValueError as error:
        raise SystemExit(f"edgeforge: {error}") from error
    return Client(args.address, token=resolve_token(args.token, args.token_file), tls=tls)


def local_agent_token(tokens, data_dir: Path) -> Path:
    """The token file of `edgeforge up`'s own agent: reused while it is live, replaced when revoked."""
    from shared.auth import ensure_token_file
    path = data_dir / "local-agent.token"
    ensure_token_file(tokens, path, "agent", "local agent of edgeforge up")
    return path


def _token_store(data_dir: Path, *, create: bool = False):
    """The coordinator's token table, written directly. `create` (tokens create --offline) may start a new
    database, so the first tokens exist before the first coordinator does (e.g. for its standalone workers)."""
    from shared.auth import TokenStore
    from shared.store.database import Database
    if not (data_dir / "edgeforge.db").is_file():
        if not create:
            raise SystemExit(f"edgeforge: no coordinator database in {data_dir} (give the coordinator's --data-dir)")
        print(f"edgeforge: created a new coordinator database in {data_dir}", file=sys.stderr)
    return TokenStore(Database(data_dir / "edgeforge.db"))


def _token_row(token_id: str, role: str, name: str, revoked: bool) -> dict:
    return {"id": token_id, "role": role, "name": name, "revoked": revoked}


def cmd_tokens_create(args) -> int:
    """Over RPC with an admin token; --offline writes the database directly (bootstrap, on its host)."""
    from shared.errors import EdgeforgeError
    try:
        if args.offline:
            token, secret = _token_store(args.data_dir, create=True).create(args.role, args.name)
            token_id = token.id
        else:
            token_id, secret = _client(args).create_token(args.role, args.name)
    except EdgeforgeError as error:
        return _fail(error.message, BAD_INPUT)
    except grpc.RpcError as error:
        return _rpc_exit(error)
    print(json.dumps({"id": token_id, "role": args.role, "name": args.name, "token": secret}) if args.json
          else secret)
    if not args.json:
        print(f"created {args.role} token {token_id} ({args.name}); it is shown only once", file=sys.stderr)
    return OK


def cmd_tokens_list(args) -> int:
    from shared.auth import token_from_proto
    try:
        tokens = _token_store(args.data_dir).list() if args.offline else \
            [token_from_proto(t) for t in _client(args).list_tokens()]
    except grpc.RpcError as error:
        return _rpc_exit(error)
    rows = [_token_row(t.id, t.role, t.name, t.revoked) for t in tokens]
    print(json.dumps(rows, indent=2) if args.json else "\n".join(
        f"{r['id']}  {r['role']:<8} {'revoked' if r['revoked'] else 'live':<8} {r['name']}" for r in rows))
    return OK


def cmd_tokens_revoke(args) -> int:
    from shared.auth import token_from_proto
    from shared.errors import EdgeforgeError
    try:
        token = _token_store(args.data_dir).revoke(args.id) if args.offline else \
            token_from_proto(_client(args).revoke_token(args.id))
    except EdgeforgeError as error:
        return _fail(error.message, BAD_INPUT)
    except grpc.RpcError as error:
        return _rpc_exit(error)
    print(f"revoked {token.role} token {token.id} ({token.name})", file=sys.stderr)
    return OK


def cmd_up(args) -> int:
    import logging
    from services.coordinator.server import create_server
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from shared import server as bootstrap
    tls = bootstrap.server_tls_from_args(args.up_parser, args)
    if tls is not None and not args.no_agent:
        args.up_parser.error("with TLS, start agents yourself (--no-agent): the local agent speaks plain text")
    if args.no_auth:
        logging.warning("--no-auth: every call is accepted without a token (a closed test network only)")
    server, port, ctx = create_server(f"{args.host}:{args.port}", args.data_dir, auth=not args.no_auth, tls=tls)
    address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    agent = None
    if not args.no_agent:
        command = [sys.executable, "-m", "clients.agent.main", "--coordinator", address,
                   "--cache-dir", str(args.data_dir / "agent"),
                   "--token-file", str(local_agent_token(ctx.tokens, args.data_dir))]
        for label in args.agent_label:
            command += ["--label", label]
        agent = subprocess.Popen(command)
    print(f"edgeforge up: listening on {address}" + ("" if agent is None else f" (local agent pid {agent.pid})"),
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    if agent is not None:
        agent.terminate()
        agent.wait(timeout=30)
    server.stop(5).wait()
    return OK


def _report(client: Client, build: coordinator_pb2.Build) -> dict | None:
    return json.loads(client.read_text(build.report_json_artifact)) if build.report_json_artifact else None


def _finish(client: Client, build: coordinator_pb2.Build, as_json: bool) -> int:
    report = _report(client, build)
    if as_json:
        print(json.dumps(report if report else json_format.MessageToDict(build), indent=2))
    elif report:
        print(tables.candidate_table(report))
    if build.state == coordinator_pb2.BUILD_STATE_CANCELLED:
        return _fail(f"{build.name} was cancelled", CANCELLED)
    if build.state == coordinator_pb2.BUILD_STATE_FAILED:
        return _fail(f"{build.name} failed: {build.error.message}", FAILED)
    if report and any(d["chosen"] is None for d in report["devices"]):
        for device in report["devices"]:
            if device["chosen"] is None:
                misses = device.get("nearest_misses") or []
                print(f"edgeforge: no candidate met the constraints on {device.get('target') or device['device']}"
                      + ("; nearest misses:\n  " + "\n  ".join(misses) if misses else ""), file=sys.stderr)
        return NO_CANDIDATE
    return OK


def cmd_build(args) -> int:
    try:
        parsed = spec_file.load(args.spec)
    except spec_file.SpecError as error:
        return _fail(f"invalid spec: {error}", BAD_INPUT)
    client = _client(args)
    bar = progress.Bar()
    try:
        operation = client.create_build(parsed, on_upload=None if args.json else progress.upload_progress(bar))
        name = build_name(operation.name)
        if not args.wait:
            print(json.dumps({"operation": operation.name, "build": name}) if args.json else
                  f"started {name} (operation {operation.name})")
            return OK
        if not args.json:
            print(f"started {name}", file=sys.stderr)
        client.wait(operation.name, None if args.json else progress.build_progress(bar))
        bar.done()
        return _finish(client, client.get_build(name), args.json)
    except spec_file.SpecError as error:
        return _fail(f"invalid spec: {error}", BAD_INPUT)
    except grpc.RpcError as error:
        return _rpc_exit(error)
    except transfer.TransferError as error:
        return _fail(str(error), FAILED)


def cmd_builds_get(args) -> int:
    client = _client(args)
    try:
        build = client.get_build(args.name if args.name.startswith("builds/") else f"builds/{args.name}")
        if build.state == coordinator_pb2.BUILD_STATE_RUNNING:
            print(json.dumps(json_format.MessageToDict(build), indent=2) if args.json else
                  f"{build.name} is running")
            return OK
        return _finish(client, build, args.json)
    except grpc.RpcError as error:
        return _rpc_exit(error)


def cmd_builds_list(args) -> int:
    client = _client(args)
    try:
        builds = client.list_builds()
    except grpc.RpcError as error:
        return _rpc_exit(error)
    rows = [{"build": b.name, "name": b.spec.display_name,
             "state": coordinator_pb2.BuildState.Name(b.state).removeprefix("BUILD_STATE_").lower()} for b in builds]
    print(json.dumps(rows, indent=2) if args.json else "\n".join(f"{r['build']}  {r['state']:<10} {r['name']}"
                                                                  for r in rows))
    return OK


def cmd_devices(args) -> int:
    client = _client(args)
    try:
        devices = client.list_devices()
    except grpc.RpcError as error:
        return _rpc_exit(error)
    if args.json:
        print(json.dumps([json_format.MessageToDict(d, preserving_proto_field_name=True) for d in devices], indent=2))
    for d in ([] if args.json else devices):
        state = coordinator_pb2.DeviceState.Name(d.state).removeprefix("DEVICE_STATE_").lower()
        a = d.attributes
        print(f"{d.name}  {state:<8} {a.get('os', '?')}/{a.get('arch', '?')}  {a.get('cpu', '?')}  "
              f"{a.get('cores', '?')} cores  " + " ".join(f"{k}@{v}" for k, v in sorted(a.items())
                                                           if k.startswith("runtime:")))
    return OK


def cmd_artifacts_get(args) -> int:
    client = _client(args)
    name = args.name if args.name.startswith("artifacts/") else f"artifacts/{args.name}"
    bar = progress.Bar()
    try:
        client.download(name, args.output, progress=lambda d, t: bar.show("download", d / t if t else 1,
                                                                          f"{d / 1e6:.1f} MB", key=4 * d // max(t, 1)))
    except grpc.RpcError as error:
        return _rpc_exit(error)
    bar.done()
    print(f"wrote {args.output}", file=sys.stderr)
    return OK


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="edgeforge", description=__doc__.split("\n\n")[0],
                                   epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument("--address", default=DEFAULT_ADDRESS, help=f"coordinator host:port (default {DEFAULT_ADDRESS}, "
                                                                  "or $EDGEFORGE_ADDRESS)")
    root.add_argument("--token", help="bearer token (prefer --token-file or $EDGEFORGE_TOKEN)")
    root.add_argument("--token-file", type=Path, help="file holding the bearer token (default: $EDGEFORGE_TOKEN_FILE, "
                                                      "else ./.edgeforge/admin.token)")
    root.add_argument("--tls-ca", dest="client_tls_ca", type=Path, help="speak TLS; the CA of the server's certificate")
    root.add_argument("--tls-cert", dest="client_tls_cert", type=Path, help="client certificate for mutual TLS")
    root.add_argument("--tls-key", dest="client_tls_key", type=Path, help="key of --tls-cert")
    sub = root.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="serve all four services on one port with a local agent")
    up.add_argument("--no-auth", action="store_true", help="accept calls without a token (a closed test network only)")
    from shared.server import add_server_tls_args
    add_server_tls_args(up)
    up.set_defaults(up_parser=up)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    up.add_argument("--data-dir", type=Path, default=Path(".edgeforge"))
    up.add_argument("--no-agent", action="store_true", help="do not start a local agent")
    up.add_argument("--agent-label", action="append", default=[], help="label for the local agent, key=value")
    up.set_defaults(run=cmd_up)
    build = sub.add_parser("build", help="submit a build spec (YAML)")
    build.add_argument("spec", type=Path)
    build.add_argument("--wait", action="store_true", help="follow progress until the build ends")
    build.add_argument("--json", action="store_true", help="print machine-readable JSON (the report, with --wait)")
    build.set_defaults(run=cmd_build)
    builds = sub.add_parser("builds", help="inspect builds").add_subparsers(dest="verb", required=True)
    get = builds.add_parser("get", help="show one build")
    get.add_argument("name")
    get.add_argument("--json", action="store_true")
    get.set_defaults(run=cmd_builds_get)
    listing = builds.add_parser("list", help="list builds")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_builds_list)
    devices = sub.add_parser("devices", help="list registered devices")
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(run=cmd_devices)
    tokens = sub.add_parser("tokens", help="tokens, over RPC with an admin token (or --offline on the coordinator's "
                            "host)").add_subparsers(dest="verb", required=True)
    create = tokens.add_parser("create", help="create a token; prints it once")
    create.add_argument("--role", default="agent", choices=("agent", "builder", "admin"))
    create.add_argument("--name", required=True, help="who or what uses it, e.g. the device or the team")
    create.add_argument("--json", action="store_true")
    create.set_defaults(run=cmd_tokens_create)
    listing = tokens.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=cmd_tokens_list)
    revoke = tokens.add_parser("revoke", help="revoke a token by id; it stops working at once")
    revoke.add_argument("id")
    revoke.set_defaults(run=cmd_tokens_revoke)
    for verb in (create, listing, revoke):
        verb.add_argument("--offline", action="store_true",
                          help="write the coordinator's database directly (bootstrap; on its host, no RPC)")
        verb.add_argument("--data-dir", type=Path, default=Path(".edgeforge"), help="with --offline: its --data-dir")
    artifacts = sub.add_parser("artifacts", help="artifacts").add_subparsers(dest="verb", required=True)
    fetch = artifacts.add_parser("get", help="download an artifact")
    fetch.add_argument("name")
    fetch.add_argument("-o", "--output", type=Path, required=True)
    fetch.set_defaults(run=cmd_artifacts_get)
    store_cli.add_parser(sub)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
