"""`edgeforge store check`: verify the artifact store on the coordinator's host (shared/store/check.py).

    edgeforge store check [--data-dir D] [--database URL] [--blobs URL] [--json] [--repair] [--grace-s S]

Exit status 0 when the store is clean (or --repair left nothing wrong), 1 when problems remain, 2 when
there is no store at --data-dir or the database / blob store cannot be opened. Reads the store directly:
the data directory where the coordinator keeps its data (beside a live coordinator is fine), or the
coordinators' PostgreSQL database and S3 bucket given as --database / --blobs (or $EDGEFORGE_DATABASE /
$EDGEFORGE_BLOBS, as the coordinator reads them; docs/DEPLOY.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from shared.errors import EdgeforgeError, NotFound
from shared.store.check import REPAIR_GRACE_S, check_store


def cmd_store_check(args: argparse.Namespace) -> int:
    try:
        report = check_store(args.data_dir, database=args.database, blobs=args.blobs, repair=args.repair,
                             grace_s=args.grace_s)
    except EdgeforgeError as error:
        field = "--data-dir" if isinstance(error, NotFound) else f"--{error.field}" if error.field else ""
        print(json.dumps({"error": {"code": error.code, "reason": error.reason, "field": field,
                                    "message": error.message}, "exit_code": 2}) if args.json
              else f"edgeforge: {error.message}", file=sys.stderr)           # as clients/cli/main.py writes errors
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
    return 0 if report.clean else 1


def add_parser(subparsers) -> None:
    """Adds `store check` to the `edgeforge` command's subparsers."""
    store = subparsers.add_parser("store", help="the artifact store on this host (reads --data-dir)"
                                  ).add_subparsers(dest="verb", required=True)
    check = store.add_parser("check", help="verify every blob against its digest and every row against its blob")
    check.add_argument("--data-dir", type=Path, default=Path(".edgeforge"), help="the coordinator's --data-dir")
    check.add_argument("--database", default=os.environ.get("EDGEFORGE_DATABASE"),
                       help="the coordinator's --database (default <data-dir>/edgeforge.db; postgresql://... for PostgreSQL)")
    check.add_argument("--blobs", default=os.environ.get("EDGEFORGE_BLOBS"),
                       help="the coordinator's --blobs (default <data-dir>/blobs; s3://bucket[/prefix]?endpoint_url=...)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--repair", action="store_true",
                       help="remove orphan blobs, stale temp files and stray upload parts (never a row)")
    check.add_argument("--grace-s", type=float, default=REPAIR_GRACE_S,
                       help="--repair leaves orphans younger than this alone; a live coordinator may be "
                            f"writing them (default {REPAIR_GRACE_S:.0f})")
    check.set_defaults(run=cmd_store_check)


def main(argv: list[str] | None = None) -> None:
    """`python -m clients.cli.store check ...`: the same command without the rest of the CLI."""
    root = argparse.ArgumentParser(prog="edgeforge")
    add_parser(root.add_subparsers(dest="command", required=True))
    args = root.parse_args(["store", *(sys.argv[1:] if argv is None else argv)])
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
