"""`edgeforge`: run edgeforge, submit builds, inspect results.

Exit codes:
  0  success
  1  the build or a call failed (the message says why)
  2  bad spec, bad argument or unknown model format (nothing was started)
  3  the build finished, but on some target no candidate met the constraints (the nearest misses
     are listed)
  4  the coordinator could not be reached
  5  the build was cancelled
  130  interrupted (Ctrl-C): a followed build was left running (re-attach with `edgeforge builds watch NAME`)

With --json, stdout holds only JSON and stderr is empty on success or holds exactly one JSON object,
{"error": {"code", "reason", "field", "message"}, "exit_code"}; no progress is drawn. --quiet drops the
progress bars and notes. Every command, its output and these codes: docs/CLI.md.

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

from clients.cli import plan as plan_cli
from clients.cli import completion, init as init_cli, progress, store as store_cli, tables
from clients.cli.argparser import Parser, UsageError
from clients.python import spec as spec_file, transfer
from clients.python.client import Client, build_name, resolve_token
from edgeforge.v1 import coordinator_pb2
from shared.grpc_status import error_details      # also registers google.rpc.ErrorInfo, which a failed build carries

OK, FAILED, BAD_INPUT, NO_CANDIDATE, UNREACHABLE, CANCELLED = 0, 1, 2, 3, 4, 5
INTERRUPTED = 130                 # 128 + SIGINT, as shells report a Ctrl-C
DEFAULT_ADDRESS = os.environ.get("EDGEFORGE_ADDRESS", "127.0.0.1:50051")
# The canonical code a JSON error carries when no RPC status gave one.
_STATUS_OF_EXIT = {FAILED: "UNKNOWN", BAD_INPUT: "INVALID_ARGUMENT", NO_CANDIDATE: "FAILED_PRECONDITION",
                   UNREACHABLE: "UNAVAILABLE", CANCELLED: "CANCELLED", INTERRUPTED: "CANCELLED"}


class _Errors:
    """How errors are written: a line of text, or (--json, set by main) one JSON object on stderr."""
    as_json = False


def _fail(message: str, code: int, *, status: str = "", reason: str = "", field: str = "") -> int:
    """Writes the error to stderr and returns `code`, the exit status."""
    if _Errors.as_json:
        print(json.dumps({"error": {"code": status or _STATUS_OF_EXIT.get(code, "UNKNOWN"), "reason": reason,
                                    "field": field, "message": message}, "exit_code": code}), file=sys.stderr)
    else:
        print(f"edgeforge: {message}", file=sys.stderr)
    return code


def _note(args, message: str) -> None:
    """A line for people on stderr (started, wrote, detached); none with --quiet or --json."""
    if not (getattr(args, "quiet", False) or getattr(args, "json", False)):
        print(message, file=sys.stderr)


def _rpc_exit(error: grpc.RpcError) -> int:
    reason, metadata = error_details(error)
    where = f" [{metadata['field']}]" if "field" in metadata else ""
    code = {grpc.StatusCode.INVALID_ARGUMENT: BAD_INPUT, grpc.StatusCode.UNAVAILABLE: UNREACHABLE,
            grpc.StatusCode.CANCELLED: CANCELLED}.get(error.code(), FAILED)
    hint = ""
    if error.code() == grpc.StatusCode.UNAUTHENTICATED:
        hint = ("\n  give a token: --token, $EDGEFORGE_TOKEN, --token-file, $EDGEFORGE_TOKEN_FILE, or run where "
                "./.edgeforge/admin.token is (the coordinator writes <data-dir>/admin.token)")
    if _Errors.as_json:
        return _fail(error.details() or "", code, status=error.code().name, reason=reason,
                     field=metadata.get("field", ""))
    return _fail(f"{error.code().name}{' ' + reason if reason else ''}{where}: {error.details()}{hint}", code)


def _client(args) -> Client:
    from shared.server import client_tls_from_files
    try:
        tls = client_tls_from_files(args.client_tls_ca, args.client_tls_cert, args.client_tls_key)
    except ValueError as error:
        raise UsageError(str(error), field="--tls-ca") from error
    except OSError as error:
        flag = {args.client_tls_ca: "--tls-ca", args.client_tls_cert: "--tls-cert"}.get(Path(error.filename or ""),
                                                                                         "--tls-key")
        raise UsageError(f"cannot read {flag} {error.filename}: {error.strerror}", field=flag) from error
    try:
        token = resolve_token(args.token, args.token_file)
    except OSError as error:
        raise UsageError(f"cannot read the token file {error.filename}: {error.strerror}", field="--token-file")
    return Client(args.address, token=token, tls=tls)


def local_agent_token(tokens, data_dir: Path) -> Path:
    """The token file of `edgeforge up`'s own agent: reused while it is live, replaced when revoked."""
    from shared.auth import ensure_token_file
    path = data_dir / "local-agent.token"
    ensure_token_file(tokens, path, "agent", "local agent of edgeforge up")
    return path


def _token_store(args, *, create: bool = False):
    """The coordinator's token table, written directly: `--database` (or $EDGEFORGE_DATABASE, as the coordinator
    reads it) when given, else <data-dir>/edgeforge.db. `create` (tokens create --offline) may start a new SQLite
    database, so the first tokens exist before the first coordinator does (e.g. for its standalone workers)."""
    from shared.auth import TokenStore
    from shared.store.database import open_database
    if args.database:
        return TokenStore(open_database(args.database))
    data_dir = args.data_dir
    if not (data_dir / "edgeforge.db").is_file():
        if not create:
            raise UsageError(f"no coordinator database in {data_dir} (give the coordinator's --data-dir or "
                             "--database)", field="--data-dir")
        if not _Errors.as_json:
            print(f"edgeforge: created a new coordinator database in {data_dir}", file=sys.stderr)
    return TokenStore(open_database(data_dir / "edgeforge.db"))


def _token_row(token_id: str, role: str, name: str, revoked: bool) -> dict:
    return {"id": token_id, "role": role, "name": name, "revoked": revoked}


def cmd_tokens_create(args) -> int:
    """Over RPC with an admin token; --offline writes the database directly (bootstrap, on its host)."""
    from shared.errors import EdgeforgeError
    try:
        if args.offline:
            token, secret = _token_store(args, create=True).create(args.role, args.name)
            token_id = token.id
        else:
            token_id, secret = _client(args).create_token(args.role, args.name)
    except EdgeforgeError as error:
        return _fail(error.message, BAD_INPUT, reason=error.reason, field=error.field or "")
    print(json.dumps({"id": token_id, "role": args.role, "name": args.name, "token": secret}) if args.json
          else secret)
    _note(args, f"created {args.role} token {token_id} ({args.name}); it is shown only once")
    return OK


def cmd_tokens_list(args) -> int:
    from shared.auth import token_from_proto
    tokens = _token_store(args).list() if args.offline else \
        [token_from_proto(t) for t in _client(args).list_tokens()]
    rows = [_token_row(t.id, t.role, t.name, t.revoked) for t in tokens]
    print(json.dumps(rows, indent=2) if args.json else "\n".join(
        f"{r['id']}  {r['role']:<8} {'revoked' if r['revoked'] else 'live':<8} {r['name']}" for r in rows))
    return OK


def cmd_tokens_revoke(args) -> int:
    from shared.auth import token_from_proto
    from shared.errors import EdgeforgeError
    try:
        token = _token_store(args).revoke(args.id) if args.offline else \
            token_from_proto(_client(args).revoke_token(args.id))
    except EdgeforgeError as error:
        return _fail(error.message, BAD_INPUT, reason=error.reason, field=error.field or "")
    if args.json:
        print(json.dumps(_token_row(token.id, token.role, token.name, True)))
    _note(args, f"revoked {token.role} token {token.id} ({token.name})")
    return OK


def cmd_up(args) -> int:
    import logging
    from services.coordinator.cluster import cluster_options, storage_error_message
    from services.coordinator.server import create_server
    from shared import logs, server as bootstrap
    from shared.errors import EdgeforgeError
    logs.configure_from_args(args.up_parser, args, service="edgeforge")
    tls = bootstrap.server_tls_from_args(args.up_parser, args)
    if tls is not None and not args.no_agent:
        args.up_parser.error("with TLS, start agents yourself (--no-agent): the local agent speaks plain text")
    if args.no_auth:
        logging.warning("--no-auth: every call is accepted without a token (a closed test network only)")
    cluster = cluster_options(args.up_parser, args)
    try:
        server, port, ctx = create_server(f"{args.host}:{args.port}", args.data_dir, auth=not args.no_auth, tls=tls,
                                          metrics_address=args.metrics_address, **cluster)
    except (ValueError, OSError) as error:
        args.up_parser.error(str(error))
    except EdgeforgeError as error:       # a bad --database/--blobs, or a server there that refuses us
        args.up_parser.error(storage_error_message(args, error))
    address = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    agent = None
    if not args.no_agent:
        command = [sys.executable, "-m", "clients.agent.main", "--coordinator", address,
                   "--cache-dir", str(args.data_dir / "agent"),
                   "--token-file", str(local_agent_token(ctx.tokens, args.data_dir))]
        for label in args.agent_label:
            command += ["--label", label]
        command += ["--log-format", logs.parse_format(args.log_format)] + (["--log-level", args.log_level]
                                                                          if args.log_level else [])
        agent = subprocess.Popen(command)
    print(f"edgeforge up: listening on {address}" + ("" if agent is None else f" (local agent pid {agent.pid})")
          + (f", metrics on http://{ctx.metrics_endpoint.address}/metrics" if ctx.metrics_endpoint else "") + "\n",
          end="", flush=True)             # one write: log lines of other threads share the stream
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():      # timed: a wait() can miss a set() from a signal handler when two signals coincide
        stop.wait(0.5)
    if agent is not None:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            logging.error("the local agent (pid %d) did not stop within 30 s of SIGTERM; killing it", agent.pid)
            agent.kill()
            agent.wait()
    server.stop(5).wait()
    if ctx.metrics_endpoint is not None:
        ctx.metrics_endpoint.stop()
    return OK


def _report(client: Client, build: coordinator_pb2.Build) -> dict | None:
    return json.loads(client.read_text(build.report_json_artifact)) if build.report_json_artifact else None


def _state(build: coordinator_pb2.Build) -> str:
    return coordinator_pb2.BuildState.Name(build.state).removeprefix("BUILD_STATE_").lower()


def _finish(client: Client, build: coordinator_pb2.Build, as_json: bool) -> int:
    report = _report(client, build)
    if as_json:
        print(json.dumps(report if report else json_format.MessageToDict(build), indent=2))
    elif report:
        print(tables.candidate_table(report))
    if build.state == coordinator_pb2.BUILD_STATE_CANCELLED:
        return _fail(f"{build.name} was cancelled", CANCELLED, reason="BUILD_CANCELLED")
    if build.state == coordinator_pb2.BUILD_STATE_FAILED:
        return _fail(f"{build.name} failed: {build.error.message}", FAILED, status=_status_name(build.error.code),
                     reason="BUILD_FAILED")
    unmet = [d for d in (report or {}).get("devices", []) if d["chosen"] is None]
    if unmet:
        lines = []
        for device in unmet:
            misses = device.get("nearest_misses") or []
            lines.append(f"no candidate met the constraints on {device.get('target') or device['device']}"
                         + ("; nearest misses:\n  " + "\n  ".join(misses) if misses else ""))
        return _fail("\n".join(lines), NO_CANDIDATE, reason="NO_CANDIDATE_MET_CONSTRAINTS",
                     field=",".join(d.get("target") or d["device"] for d in unmet))
    return OK


def _operation_of(name: str) -> str:
    """"operations/b-42" of "builds/b-42" (a build and its long-running operation share the id)."""
    return "operations/" + name.removeprefix("builds/")


def _build_of(name: str) -> str:
    return name if name.startswith("builds/") else f"builds/{name}"


class _LiveTable:
    """Candidates as the coordinator makes them (size and quality; devices measure them later), one row
    each, printed above the progress bar as they arrive."""

    def __init__(self, client: Client, name: str, bar: progress.Bar):
        self.client, self.name, self.bar = client, name, bar
        self.shown: set[str] = set()
        self.last: tuple = ()

    def update(self, status: coordinator_pb2.BuildProgress) -> None:
        if (status.stage, status.percent, status.message) == self.last:
            return                                  # nothing moved: no GetBuild
        self.last = (status.stage, status.percent, status.message)
        build = self.client.get_build(self.name)
        for candidate in build.candidates:
            if candidate.id not in self.shown:
                if not self.shown:
                    self.bar.println(tables.LIVE_HEADER)
                self.shown.add(candidate.id)
                self.bar.println(tables.live_row(json_format.MessageToDict(candidate, preserving_proto_field_name=True)))


def _follow(client: Client, name: str, args, *, live: bool) -> int:
    """Follows a running build to its end and prints its result. Ctrl-C: --cancel-on-interrupt cancels it;
    on a terminal a prompt asks; otherwise the build is left running (exit 130) with how to re-attach."""
    bar = progress.Bar(quiet=args.quiet or args.json)
    table = _LiveTable(client, name, bar) if live and not bar.quiet else None
    stage = progress.build_progress(bar)

    def on_progress(status: coordinator_pb2.BuildProgress) -> None:
        stage(status)
        if table is not None:
            table.update(status)
    while True:
        try:
            client.wait(_operation_of(name), on_progress)
            break
        except KeyboardInterrupt:
            bar.done()
            choice = "cancel" if args.cancel_on_interrupt else _ask_on_interrupt(name, args)
            if choice == "detach":
                return _fail(f"detached; {name} keeps running. Re-attach: edgeforge builds watch {name}",
                             INTERRUPTED, reason="DETACHED", field=name)
            if choice == "cancel":
                client.cancel(_operation_of(name))
                _note(args, f"cancelling {name} ...")
    bar.done()
    return _finish(client, client.get_build(name), args.json)


def _ask_on_interrupt(name: str, args) -> str:
    """"detach", "cancel" or "watch": asked on a terminal, "detach" without one (CI) or on a second Ctrl-C."""
    if args.json or not (sys.stdin.isatty() and sys.stderr.isatty()):
        return "detach"
    try:
        print(f"\nDetach from {name} and leave it running? [Y]es, detach / [c]ancel the build / [n]o, keep "
              "watching: ", end="", file=sys.stderr, flush=True)              # stderr: stdout is for results
        answer = input().strip().lower()
    except (KeyboardInterrupt, EOFError):
        return "detach"
    return {"c": "cancel", "cancel": "cancel", "n": "watch", "no": "watch"}.get(answer, "detach")


def cmd_build(args) -> int:
    parsed = spec_file.load(args.spec)
    client = _client(args)
    bar = progress.Bar(quiet=args.quiet or args.json)
    try:
        operation = client.create_build(parsed, on_upload=progress.upload_progress(bar))
    except transfer.TransferError as error:
        return _fail(str(error), FAILED, reason="TRANSFER_FAILED")
    bar.done()
    name = build_name(operation.name)
    if not (args.wait or args.watch):
        print(json.dumps({"operation": operation.name, "build": name}) if args.json else
              f"started {name} (operation {operation.name})")
        return OK
    _note(args, f"started {name}")
    return _follow(client, name, args, live=args.watch)


def cmd_builds_get(args) -> int:
    client = _client(args)
    build = client.get_build(_build_of(args.name))
    if build.state == coordinator_pb2.BUILD_STATE_RUNNING:
        print(json.dumps(json_format.MessageToDict(build), indent=2) if args.json else
              f"{build.name} is running")
        return OK
    return _finish(client, build, args.json)


def cmd_builds_watch(args) -> int:
    client = _client(args)
    build = client.get_build(_build_of(args.name))
    if build.state != coordinator_pb2.BUILD_STATE_RUNNING:
        return _finish(client, build, args.json)
    _note(args, f"watching {build.name} (Ctrl-C leaves it running)")
    return _follow(client, build.name, args, live=True)


def cmd_builds_cancel(args) -> int:
    client = _client(args)
    name = _build_of(args.name)
    client.cancel(_operation_of(name))
    print(json.dumps({"build": name, "cancel_requested": True}) if args.json else f"cancel requested for {name}")
    return OK


def cmd_builds_list(args) -> int:
    builds = _client(args).list_builds()
    rows = [{"build": b.name, "name": b.spec.display_name, "state": _state(b)} for b in builds]
    print(json.dumps(rows, indent=2) if args.json else "\n".join(f"{r['build']}  {r['state']:<10} {r['name']}"
                                                                  for r in rows))
    return OK


def cmd_devices(args) -> int:
    devices = _client(args).list_devices()
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
    bar = progress.Bar(quiet=args.quiet or args.json)
    try:
        path = client.download(name, args.output, progress=progress.download_progress(bar))
    except transfer.TransferError as error:
        return _fail(str(error), FAILED, reason="TRANSFER_FAILED", field=name)
    bar.done()
    sha256 = name.removeprefix("artifacts/")              # the download checked the bytes against it
    if args.json:
        print(json.dumps({"artifact": name, "path": str(path), "sha256": sha256, "size_bytes": path.stat().st_size}))
    _note(args, f"wrote {path} ({progress.human_bytes(path.stat().st_size)}, sha256 {sha256[:12]}…)")
    return OK


def cmd_init(args) -> int:
    try:
        path = init_cli.write(args.task, args.output, force=args.force, assets=args.assets)
    except init_cli.InitError as error:
        return _fail(str(error), BAD_INPUT, reason="FILE_EXISTS" if args.output.exists() else "CANNOT_WRITE",
                     field="--output")
    print(json.dumps({"path": str(path), "task": args.task}) if args.json else str(path))
    _note(args, f"wrote a {args.task} example; edit the lines marked CHANGE ME, then: "
                f"edgeforge build {path} --watch")
    return OK


def cmd_completion(args) -> int:
    sys.stdout.write(completion.SCRIPTS[args.shell](parser()))
    return OK


def _status_name(code: int) -> str:
    """The canonical name of a google.rpc.Status code (5 -> "NOT_FOUND")."""
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")


def _output_options() -> argparse.ArgumentParser:
    """--json and --quiet, shared by every command that prints something."""
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true",
                        help="machine-readable JSON on stdout; errors as one JSON object on stderr; no progress")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes on stderr")
    return output


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="edgeforge", description=__doc__.split("\n\n")[0],
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
    from shared.server import add_observability_args
    add_observability_args(up)
    from services.coordinator.cluster import add_cluster_args
    add_cluster_args(up)
    up.set_defaults(run=cmd_up)
    output = [_output_options()]
    build = sub.add_parser("build", parents=output, help="submit a build spec (YAML)")
    build.add_argument("spec", type=Path)
    follow = build.add_mutually_exclusive_group()
    follow.add_argument("--wait", action="store_true", help="follow progress until the build ends, then print the "
                                                             "result table (or the report, with --json)")
    follow.add_argument("--watch", action="store_true", help="like --wait, live: stage bars and each candidate's "
                                                              "size and quality as it is made")
    _interrupt_option(build)
    build.set_defaults(run=cmd_build)
    builds = sub.add_parser("builds", help="inspect, follow and cancel builds").add_subparsers(dest="verb",
                                                                                              required=True)
    get = builds.add_parser("get", parents=output, help="show one build (the result table once it has ended)")
    get.add_argument("name", help="builds/{id} or {id}")
    get.set_defaults(run=cmd_builds_get)
    watch = builds.add_parser("watch", parents=output, help="re-attach to a build: follow it live to its end")
    watch.add_argument("name", help="builds/{id} or {id}")
    _interrupt_option(watch)
    watch.set_defaults(run=cmd_builds_watch)
    cancel = builds.add_parser("cancel", parents=output, help="cancel a running build")
    cancel.add_argument("name", help="builds/{id} or {id}")
    cancel.set_defaults(run=cmd_builds_cancel)
    listing = builds.add_parser("list", parents=output, help="list builds")
    listing.set_defaults(run=cmd_builds_list)
    devices = sub.add_parser("devices", parents=output, help="list registered devices")
    devices.set_defaults(run=cmd_devices)
    tokens = sub.add_parser("tokens", help="tokens, over RPC with an admin token (or --offline on the coordinator's "
                            "host)").add_subparsers(dest="verb", required=True)
    create = tokens.add_parser("create", parents=output, help="create a token; prints it once")
    create.add_argument("--role", default="agent", choices=("agent", "builder", "admin"))
    create.add_argument("--name", required=True, help="who or what uses it, e.g. the device or the team")
    create.set_defaults(run=cmd_tokens_create)
    listing = tokens.add_parser("list", parents=output, help="list tokens (never their secrets)")
    listing.set_defaults(run=cmd_tokens_list)
    revoke = tokens.add_parser("revoke", parents=output, help="revoke a token by id; it stops working at once")
    revoke.add_argument("id")
    revoke.set_defaults(run=cmd_tokens_revoke)
    for verb in (create, listing, revoke):
        verb.add_argument("--offline", action="store_true",
                          help="write the coordinator's database directly (bootstrap; on its host, no RPC)")
        verb.add_argument("--data-dir", type=Path, default=Path(".edgeforge"), help="with --offline: its --data-dir")
        verb.add_argument("--database", default=os.environ.get("EDGEFORGE_DATABASE"),
                          help="with --offline: the coordinator's --database (postgresql://...; default "
                               "<data-dir>/edgeforge.db)")
    artifacts = sub.add_parser("artifacts", help="artifacts").add_subparsers(dest="verb", required=True)
    fetch = artifacts.add_parser("get", parents=output, help="download an artifact (resumable, sha256-checked)")
    fetch.add_argument("name", help="artifacts/{sha256} or {sha256}")
    fetch.add_argument("-o", "--output", type=Path, required=True)
    fetch.set_defaults(run=cmd_artifacts_get)
    init_cli.add_parser(sub, output).set_defaults(run=cmd_init)
    shells = sub.add_parser("completion", help="print a shell completion script (install: docs/CLI.md)")
    shells.add_argument("shell", choices=completion.SHELLS)
    shells.set_defaults(run=cmd_completion)
    store_cli.add_parser(sub)
    plan_cli.add_parser(sub)
    return root


def _interrupt_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--cancel-on-interrupt", action="store_true",
                         help="Ctrl-C cancels the build (default: ask on a terminal, else leave it running)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _Errors.as_json = "--json" in argv                   # until parsing says otherwise: argparse errors too
    try:
        args = parser().parse_args(argv)
        _Errors.as_json = bool(getattr(args, "json", False))
        code = args.run(args)
    except UsageError as error:
        hint = f"\n  {error.hint}" if error.hint and not _Errors.as_json else ""
        code = _fail(error.message + hint, BAD_INPUT, reason=error.reason, field=error.field)
    except spec_file.SpecError as error:
        where = f"{getattr(args, 'spec', '')}:{error.line}: " if error.line else ""
        code = _fail(f"invalid spec {where}{error.field}: {error.message}" if not _Errors.as_json else
                     error.message, BAD_INPUT, reason="INVALID_SPEC", field=error.field)
    except grpc.RpcError as error:
        code = _rpc_exit(error)
    except transfer.TransferError as error:
        code = _fail(str(error), FAILED, reason="TRANSFER_FAILED")
    except OSError as error:                           # e.g. -o into a directory that cannot be written
        code = _fail(f"{error.filename or 'a file'}: {error.strerror or error}", FAILED, status="FAILED_PRECONDITION",
                     reason="OS_ERROR", field=str(error.filename or ""))
    except KeyboardInterrupt:
        code = _fail("interrupted", INTERRUPTED, reason="INTERRUPTED")
    sys.exit(code)


if __name__ == "__main__":
    main()
