"""The agent's configuration: command-line flags over an optional TOML/JSON file (`--config`).

Every long option may appear in the file by name (`coordinator = "..."`, `labels = {device = "x"}`,
`drivers = ["local", "adb"]`, `cache_max_bytes = "20G"`, ...); flags override the file, and an
unknown key in the file is an error naming it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from pathlib import Path

from . import __version__

DEFAULT_CACHE = Path.home() / ".cache" / "edgeforge-agent"


@dataclasses.dataclass
class AgentConfig:
    coordinator: str
    token: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    cache_dir: Path = DEFAULT_CACHE
    cache_max_bytes: int = 20 << 30
    drivers: tuple[str, ...] = ("local",)
    runtimes: frozenset[str] | None = None          # None: every runtime installed here
    slots: int = 1
    device_id: str = ""
    adb: str = "adb"
    adb_tools: Path | None = None
    measure_timeout_s: float = 1800.0
    lease_wait_ms: int = 10_000
    host_lock: Path | None = None                    # one measurement at a time across agents sharing it
    tls_ca: Path | None = None                       # PEM CA that signed the coordinator's certificate: TLS on
    tls_cert: Path | None = None                     # this agent's PEM certificate and key, for mutual TLS
    tls_key: Path | None = None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(i?[bB])?\s*$")


def parse_size(value) -> int:
    """Bytes from 123, "500M", "20G", "1.5TiB" (binary multiples)."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (write e.g. 20G or 500M)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * (1 << (10 * " KMGT".index(unit or " "))))


def _labels(values) -> dict[str, str]:
    if isinstance(values, dict):
        return {str(k): str(v) for k, v in values.items()}
    labels = {}
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise ValueError(f"a label must be key=value, got {value!r}")
        labels[key] = item
    return labels


def _csv(value) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return tuple(item.strip() for item in items if item.strip())


def load_config(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    import tomllib                                        # Python 3.11+; JSON works everywhere
    return tomllib.loads(text)


def parser(usage: str) -> argparse.ArgumentParser:
    """The command line; `usage` is the command's docstring (first paragraph: description; from the
    third: the epilog)."""
    parser = argparse.ArgumentParser(prog="edgeforge-agent", description=usage.split("\n\n")[0],
                                     epilog=usage.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"edgeforge-agent {__version__}")
    parser.add_argument("--config", type=Path, help="TOML or JSON file with any of these options")
    parser.add_argument("--coordinator", help="coordinator address host:port")
    parser.add_argument("--token", help="agent token (prefer --token-file or $EDGEFORGE_AGENT_TOKEN)")
    parser.add_argument("--token-file", type=Path, help="file holding the agent token")
    parser.add_argument("--label", action="append", default=None, help="extra attribute key=value (repeatable)")
    parser.add_argument("--device-id", help="stable device id (default: hostname + random suffix, persisted)")
    parser.add_argument("--cache-dir", type=Path, help=f"artifact cache (default {DEFAULT_CACHE})")
    parser.add_argument("--cache-max-bytes", help="cache size cap, e.g. 20G (default 20G)")
    parser.add_argument("--drivers", help="local, adb or local,adb (default local)")
    parser.add_argument("--runtimes", help="offer only these runtimes, e.g. onnxruntime,litert (default: all here)")
    parser.add_argument("--slots", type=int, help="jobs this host runs at once (default 1: measurements never overlap)")
    parser.add_argument("--adb", help="the adb binary (default: adb on PATH)")
    parser.add_argument("--adb-tools", type=Path, help="host directory of arm64 benchmark binaries to push to phones")
    parser.add_argument("--measure-timeout-s", type=float, help="longest one measurement may take (default 1800)")
    parser.add_argument("--host-lock", type=Path, help="lock file shared by agents on one machine: they measure "
                                                       "one at a time (emulated devices on one host)")
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of the coordinator's certificate (connects with TLS)")
    parser.add_argument("--tls-cert", type=Path, help="this agent's PEM certificate, for a coordinator requiring mTLS")
    parser.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def config_from(args: argparse.Namespace) -> AgentConfig:
    file = load_config(args.config) if args.config else {}
    unknown = set(file) - {f.name for f in dataclasses.fields(AgentConfig)} - {"token_file"}
    if unknown:
        raise ValueError(f"{args.config}: unknown option(s) {', '.join(sorted(unknown))}")

    def pick(name, default=None):
        value = getattr(args, name, None)
        return value if value is not None else file.get(name, default)
    token = pick("token") or os.environ.get("EDGEFORGE_AGENT_TOKEN", "")
    token_file = pick("token_file")
    if not token and token_file:
        token = Path(token_file).read_text().strip()
    coordinator = pick("coordinator")
    if not coordinator:
        raise ValueError("--coordinator HOST:PORT is required (flag or config file)")
    drivers = _csv(pick("drivers", "local"))
    if not drivers or set(drivers) - {"local", "adb"}:
        raise ValueError(f"--drivers takes local and/or adb, got {','.join(drivers)!r}")
    runtimes = pick("runtimes")
    slots = int(pick("slots", 1))
    if not 1 <= slots <= 64:
        raise ValueError(f"--slots must be in [1, 64], got {slots}")
    tools = pick("adb_tools")
    if bool(pick("tls_cert")) != bool(pick("tls_key")) or (pick("tls_cert") and not pick("tls_ca")):
        raise ValueError("--tls-cert and --tls-key go together, and need --tls-ca")
    return AgentConfig(coordinator=coordinator, token=token, labels=_labels(pick("label") or file.get("labels") or {}),
                       cache_dir=Path(pick("cache_dir", DEFAULT_CACHE)),
                       cache_max_bytes=parse_size(pick("cache_max_bytes", 20 << 30)), drivers=drivers,
                       runtimes=frozenset(_csv(runtimes)) if runtimes else None, slots=slots,
                       device_id=pick("device_id", "") or "", adb=pick("adb", "adb"),
                       adb_tools=Path(tools) if tools else None,
                       measure_timeout_s=float(pick("measure_timeout_s", 1800.0)),
                       host_lock=Path(pick("host_lock")) if pick("host_lock") else None,
                       **{name: Path(pick(name)) if pick(name) else None for name in ("tls_ca", "tls_cert", "tls_key")})
