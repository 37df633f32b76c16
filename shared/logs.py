"""Process logging for every edgeforge server and the agent: plain text for people, JSON lines for machines.

`configure(format, level, service=...)` installs one stderr handler on the root logger. With "json"
every record is one JSON object on one line (docs/OPERATIONS.md lists the fields):

    {"ts": "2026-11-27T22:33:55.123Z", "level": "INFO", "logger": "services.coordinator.pipeline",
     "message": "builds/b-1 done", "service": "coordinator", "rpc": "/edgeforge.v1.Coordinator/CreateBuild",
     "request_id": "9f0c…", "build": "builds/b-1", "candidate": "gguf-q4_0"}

Context fields come from a context variable: the RPC interceptor (shared/metrics.py) binds `rpc` and
`request_id` for the length of each call, a build thread binds `build` and `candidate`, the scheduler
binds `device`. `bind()` adds fields to the current context; `fields()` scopes them to a `with` block.
Extra attributes passed with `log.info(..., extra={"code": "OK"})` are written too.

Secrets never reach the output: anything shaped like an edgeforge token (`ef_` + 20 or more
characters) or an HTTP bearer credential (16 or more characters after "Bearer ") is replaced by
"<redacted>" in messages, extra fields and tracebacks: a second line of defence behind code that never
logs them.

Standard library only: the agent ships without the rest of shared/, so its wheel carries this file
(clients/agent/logs.py is a link to it).
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import datetime
import json
import logging
import os
import re
import sys
from typing import Iterator

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMAT_ENV = "EDGEFORGE_LOG_FORMAT"
LEVEL_ENV = "EDGEFORGE_LOG_LEVEL"
# Order of the context fields in a JSON line (others bound by callers follow, sorted).
CONTEXT_FIELDS = ("service", "rpc", "request_id", "build", "candidate", "device")

_FIELDS: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("edgeforge_log_fields", default={})
# An edgeforge token, or an RFC 6750 bearer credential (token68) long enough to be one ("bearer token" is prose).
_SECRETS = re.compile(r"\bef_[A-Za-z0-9_-]{20,}|(?i:\bbearer\s+)[A-Za-z0-9._~+/=-]{16,}")
# Attributes every LogRecord has; anything else on a record came from `extra=` and is written out.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    """`text` with token-shaped secrets replaced by "<redacted>"."""
    return _SECRETS.sub(lambda m: "Bearer <redacted>" if m.group(0)[:1] in "bB" else "ef_<redacted>", text)


def current() -> dict[str, str]:
    """The context fields bound in this thread (or task) right now."""
    return dict(_FIELDS.get())


def bind(**values: str | None) -> None:
    """Adds fields to the current context (a value of None removes the field). In a thread of its own (a
    build) this lasts for the thread; in an RPC, the interceptor restores the caller's fields afterwards."""
    merged = dict(_FIELDS.get())
    for key, value in values.items():
        if value is None or value == "":
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    _FIELDS.set(merged)


@contextlib.contextmanager
def fields(**values: str | None) -> Iterator[None]:
    """Binds `values` for the `with` block, then restores the fields as they were."""
    saved = _FIELDS.get()
    bind(**values)
    try:
        yield
    finally:
        _FIELDS.set(saved)


def restore(saved: dict[str, str]) -> None:
    """Sets the fields back to `saved` (a `current()` snapshot); for code that cannot use `with`."""
    _FIELDS.set(saved)


class ContextFilter(logging.Filter):
    """Copies the context fields (and the process's service name) onto each record as it is emitted, in
    the thread that emitted it."""

    def __init__(self, service: str = ""):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        context = {"service": self.service} if self.service else {}
        context.update(_FIELDS.get())
        record.edgeforge_context = context
        return True


def _extra(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k != "edgeforge_context"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts (RFC 3339, UTC), level, logger, message, the context
    fields, extra attributes, and `exception` (the formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, object] = {"ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                                  "level": record.levelname, "logger": record.name,
                                  "message": redact(record.getMessage())}
        context = getattr(record, "edgeforge_context", {})
        for key in CONTEXT_FIELDS:
            if key in context:
                out[key] = context[key]
        out.update({k: context[k] for k in sorted(context) if k not in out})
        for key, value in _extra(record).items():
            out.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None
                           else redact(str(value)))
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-11-27 22:33:55,123 coordinator INFO message build=builds/b-1 rpc=…`: one line for people,
    the traceback (if any) below it."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = dict(getattr(record, "edgeforge_context", {}))
        service = context.pop("service", "") or record.name
        pairs = " ".join(f"{k}={v}" for k, v in {**context, **_extra(record)}.items())
        line = f"{self.formatTime(record)} {service} {record.levelname} {record.getMessage()}"
        if pairs:
            line += f" [{pairs}]"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


def parse_format(value: str | None) -> str:
    """The log format `value` names, or $EDGEFORGE_LOG_FORMAT, or "text"; ValueError for anything else."""
    chosen = (value or os.environ.get(FORMAT_ENV) or "text").strip().lower()
    if chosen not in FORMATS:
        source = "--log-format" if value else f"${FORMAT_ENV}"
        raise ValueError(f"{source} must be one of {', '.join(FORMATS)}, got {chosen!r}")
    return chosen


def parse_level(value: str | int | None) -> int:
    """The level `value` names (debug … critical, any case), or $EDGEFORGE_LOG_LEVEL, or INFO."""
    if isinstance(value, int):
        return value
    chosen = (value or os.environ.get(LEVEL_ENV) or "info").strip().lower()
    if chosen not in LEVELS:
        source = "--log-level" if value else f"${LEVEL_ENV}"
        raise ValueError(f"{source} must be one of {', '.join(LEVELS)}, got {chosen!r}")
    return getattr(logging, chosen.upper())


def configure(format: str | None = None, level: str | int | None = None, *, service: str = "",
              stream=None) -> None:
    """Sends every log record of this process to `stream` (stderr) in `format` ("text" or "json"; default
    $EDGEFORGE_LOG_FORMAT, else text) at `level` (default $EDGEFORGE_LOG_LEVEL, else info). Replaces the
    handlers installed before, so calling it twice is harmless. Python warnings are logged too, so in JSON
    mode every line on stderr is JSON."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if parse_format(format) == "json" else TextFormatter())
    handler.addFilter(ContextFilter(service))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(parse_level(level))
    logging.captureWarnings(True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--log-format and --log-level, defaulting to $EDGEFORGE_LOG_FORMAT and $EDGEFORGE_LOG_LEVEL."""
    parser.add_argument("--log-format", choices=FORMATS, default=None,
                        help=f"text for people, json for log shippers: one JSON object per line "
                             f"(default ${FORMAT_ENV}, else text)")
    parser.add_argument("--log-level", type=str.lower, choices=LEVELS, default=None,
                        help=f"the least severe level logged (default ${LEVEL_ENV}, else info)")


def configure_from_args(parser: argparse.ArgumentParser, args, *, service: str) -> None:
    """`configure` with the flags of `add_arguments`; a bad environment variable is a usage error."""
    try:
        configure(args.log_format, args.log_level, service=service)
    except ValueError as error:
        parser.error(str(error))
