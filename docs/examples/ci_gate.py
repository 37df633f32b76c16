"""Gate a release on an edgeforge build: a CI step that builds, checks and summarises.

    python docs/examples/ci_gate.py build.yaml --max-quality-loss 2 --max-p90-ms 50 [--device pixel-8]
        [--max-size-mb 300] [--download dist/models] [--artifacts-json chosen.json]

Submits the build with the gate applied as constraints (so the coordinator picks the best candidate
inside it), follows its progress on stderr, prints a markdown summary on stdout (and appends it to
$GITHUB_STEP_SUMMARY when set), and writes the chosen artifacts' names (--artifacts-json, and
`artifacts=` in $GITHUB_OUTPUT when set) or downloads the files (--download DIR).

Exit codes: 0 every target has a chosen artifact within the gate; 1 it has not, the build failed,
or the coordinator could not be used (the message says which and why); 2 bad input (spec, arguments).

The coordinator is $EDGEFORGE_ADDRESS (default 127.0.0.1:50051) or --address; the token is
$EDGEFORGE_TOKEN or $EDGEFORGE_TOKEN_FILE (a builder token is enough).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from clients.python.client import Client
from clients.python.errors import ApiError, InvalidArgument
from clients.python.results import BuildResult, TargetResult, device_label, progress_line
from clients.python.spec import SpecError, SpecFile, load
from clients.python.transfer import TransferError
from edgeforge.v1 import coordinator_pb2
from shared.server import client_tls_from_files

PASSED, FAILED, BAD_INPUT = 0, 1, 2
EXTENSIONS = {"gguf": ".gguf", "onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage.tar"}


@dataclasses.dataclass(frozen=True)
class Gate:
    """Release budgets; None leaves a budget to the spec."""
    max_quality_loss_pct: float | None = None
    max_p90_latency_ms: float | None = None
    max_size_bytes: int | None = None

    def constraints(self) -> dict[str, float]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    def violations(self, target: TargetResult) -> list[str]:
        """What the chosen candidate of `target` breaks (the coordinator should never choose one that does)."""
        measured = {"max_quality_loss_pct": target.quality_delta_pct, "max_p90_latency_ms": target.p90_ms,
                    "max_size_bytes": target.size_bytes}
        broken = []
        for key, limit in self.constraints().items():
            value = measured[key]
            if value is None or value > limit:
                broken.append(f"{key}: {value} > {limit:g}")
        return broken

    def describe(self) -> str:
        units = {"max_quality_loss_pct": ("quality loss", "%"), "max_p90_latency_ms": ("p90 latency", " ms"),
                 "max_size_bytes": ("size", " bytes")}
        return ", ".join(f"{units[key][0]} ≤ {value:g}{units[key][1]}" for key, value in self.constraints().items()
                         ) or "the spec's own constraints"


def apply_gate(spec: coordinator_pb2.BuildSpec, gate: Gate) -> None:
    """Tightens the build's budgets, and every target's own (which would replace the build's), to the gate."""
    for constraints in [spec.constraints, *(t.constraints for t in spec.targets)]:
        for key, limit in gate.constraints().items():
            if constraints is spec.constraints or constraints.HasField(key):
                current = getattr(constraints, key) if constraints.HasField(key) else limit
                setattr(constraints, key, min(current, limit))


def select_targets(spec: coordinator_pb2.BuildSpec, names: list[str]) -> None:
    """Keeps the targets named `names` (by target name, device name or selector "device"); SpecError else."""
    aliases = [{target.name or f"targets-{i}", target.device.removeprefix("devices/"),
                target.selector.get("device", "")} - {""} for i, target in enumerate(spec.targets)]
    known = set().union(*aliases)
    if missing := set(names) - known:
        raise SpecError("targets", f"no target named {', '.join(sorted(missing))} (the spec has: "
                                   f"{', '.join(sorted(known))})")
    kept = []
    for i, target in enumerate(spec.targets):
        if aliases[i] & set(names):
            copy = coordinator_pb2.Target()
            copy.CopyFrom(target)
            copy.name = target.name or f"targets-{i}"         # its default name, kept once others are gone
            kept.append(copy)
    del spec.targets[:]
    spec.targets.extend(kept)


def summary(result: BuildResult, gate: Gate, failures: list[str]) -> str:
    verdict = "passed ✅" if not failures else "failed ❌"
    lines = [f"## edgeforge {result.build}: {verdict}", "", f"Gate: {gate.describe()}.", "",
             "| target | device | chosen | format | size | p90 latency | quality loss |",
             "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for t in result.targets:
        if t.chosen:
            lines.append(f"| {t.target} | {device_label(t)} | `{t.candidate_id}` | {t.format} | "
                         f"{(t.size_bytes or 0) / 1e6:.2f} MB | {t.p90_ms:.2f} ms | {t.quality_delta_pct:+.2f} % |")
        else:
            lines.append(f"| {t.target} | {device_label(t)} | none | | | | |")
    if failures:
        lines += ["", "Why it failed:", *[f"- {line}" for line in failures]]
    return "\n".join(lines) + "\n"


def gate_failures(result: BuildResult, gate: Gate) -> list[str]:
    failures = result.failures()
    for t in result.targets:
        if t.chosen and (broken := gate.violations(t)):
            failures.append(f"{t.target} ({device_label(t)}): {t.candidate_id} breaks the gate: {'; '.join(broken)}")
    return failures


def publish(result: BuildResult, args: argparse.Namespace, client: Client) -> None:
    """Writes the chosen artifacts' names, or downloads the files."""
    chosen = {t.target: t.artifact for t in result.targets if t.artifact}
    if args.artifacts_json:
        args.artifacts_json.write_text(json.dumps(chosen, indent=2) + "\n")
    if os.environ.get("GITHUB_OUTPUT"):
        with open(os.environ["GITHUB_OUTPUT"], "a") as out:
            out.write(f"artifacts={json.dumps(chosen)}\n")
    for t in result.targets if args.download else ():
        if t.artifact:
            path = args.download / f"{t.target.replace('/', '-')}{EXTENSIONS.get(t.format or '', '')}"
            client.download(t.artifact, path)
            print(f"downloaded {t.target}: {path}", file=sys.stderr)


def positive(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="the build spec (YAML, docs/SPEC.md)")
    parser.add_argument("--max-quality-loss", type=positive, metavar="PCT",
                        help="largest quality loss against the float32 source, in percent")
    parser.add_argument("--max-p90-ms", type=positive, metavar="MS", help="largest p90 latency on the device, in ms")
    parser.add_argument("--max-size-mb", type=positive, metavar="MB", help="largest file, in MB (10^6 bytes)")
    parser.add_argument("--device", action="append", default=[], metavar="NAME",
                        help="gate only this target (its name, device name or selector 'device'); repeatable")
    parser.add_argument("--download", type=Path, metavar="DIR", help="download the chosen files into DIR")
    parser.add_argument("--artifacts-json", type=Path, metavar="FILE", help="write {target: artifact} to FILE")
    parser.add_argument("--address", default=os.environ.get("EDGEFORGE_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--tls-ca", type=Path, help="speak TLS; the CA of the coordinator's certificate")
    parser.add_argument("--timeout", type=positive, default=3600.0, metavar="S", help="give up after S seconds")
    return parser.parse_args(argv)


def report_upload(what: str, done: int, total: int) -> None:
    if done == total:
        print(f"uploaded {what} ({total / 1e6:.1f} MB)", file=sys.stderr)


def prepare(args: argparse.Namespace) -> tuple[SpecFile, Gate]:
    spec_file = load(args.spec)
    gate = Gate(args.max_quality_loss, args.max_p90_ms,
                int(args.max_size_mb * 1e6) if args.max_size_mb is not None else None)
    if args.device:
        select_targets(spec_file.spec, args.device)
    apply_gate(spec_file.spec, gate)
    return spec_file, gate


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec_file, gate = prepare(args)
    except SpecError as error:
        print(f"ci_gate: {args.spec}: {error}", file=sys.stderr)
        return BAD_INPUT
    try:
        with Client(args.address, tls=client_tls_from_files(args.tls_ca)) as client:
            operation = client.create_build(spec_file, on_upload=report_upload)
            print(f"ci_gate: {operation.name.replace('operations/', 'builds/')} started", file=sys.stderr)
            for progress in client.watch(operation.name, timeout=args.timeout):
                print(progress_line(progress), file=sys.stderr)
            result = client.result(operation.name)
            failures = gate_failures(result, gate)
            text = summary(result, gate, failures)
            print(text)
            if os.environ.get("GITHUB_STEP_SUMMARY"):
                with open(os.environ["GITHUB_STEP_SUMMARY"], "a") as out:
                    out.write(text)
            publish(result, args, client)
    except SpecError as error:
        print(f"ci_gate: {args.spec}: {error}", file=sys.stderr)
        return BAD_INPUT
    except InvalidArgument as error:
        print(f"ci_gate: the coordinator refused the spec: {error}", file=sys.stderr)
        return BAD_INPUT
    except (ApiError, TransferError) as error:
        print(f"ci_gate: {error}", file=sys.stderr)
        return FAILED
    for line in failures:
        print(f"ci_gate: {line}", file=sys.stderr)
    return FAILED if failures else PASSED


if __name__ == "__main__":
    sys.exit(main())
