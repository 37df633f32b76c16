"""`edgeforge plan`: will this model fit, how fast will it run, and which recipe to build (shared/planner).

    edgeforge plan MODEL | --params 7e9 [shape flags] [--context N] [--batch B] [--recipe R ...]
                   [--device NAME ...] [--json]

MODEL is an HF directory, a GGUF file, an edgeforge bundle (.tar), a .safetensors file, or an artifact
in the store (artifacts/<sha256>, downloaded first). Devices are the coordinator's registered agents
plus the catalogue; with no coordinator (or --offline) the catalogue alone, said in one stderr line.
Exit status 0; 2 for bad input (the message names the flag or MODEL); for artifacts/…: 4 when the
coordinator cannot be reached, 1 when the download fails otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from shared.errors import EdgeforgeError
from shared.memory import GIB
from shared.planner import CATALOGUE, DEFAULT_RECIPES, KV_DTYPE_BYTES, ModelShape, Settings, catalogue_entry, \
    device_profile, plan

OK, FAILED, BAD_INPUT, UNREACHABLE = 0, 1, 2, 4          # clients/cli/main.py's exit codes
MIB = 1 << 20
_SHAPE_FLAGS = {"layers": "--layers", "hidden": "--hidden", "heads": "--heads", "kv_heads": "--kv-heads",
                "head_dim": "--head-dim", "vocab": "--vocab", "intermediate": "--intermediate",
                "max_context": "--max-context"}
_FLAGS = {**_SHAPE_FLAGS, "parameters": "--params", "context": "--context", "batch": "--batch",
          "prompt_tokens": "--prompt-tokens", "generation_tokens": "--generation-tokens", "kv_dtype": "--kv-dtype",
          "efficiency": "--efficiency", "overhead": "--overhead-mib", "max_quality_loss_pct": "--max-quality-loss-pct",
          "recipe": "--recipe", "model": "MODEL", "device": "--device"}


class PlanInputError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")


def _count(text: str) -> int:
    """'7e9', '7000000000', '7B', '135M' -> an integer parameter count."""
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}.get(text[-1:].lower(), 1)
    number = float(text[:-1] if scale != 1 else text)
    if not number == number or number in (float("inf"), float("-inf")):     # NaN, inf
        raise ValueError(text)
    value = number * scale
    if value != int(value):
        raise ValueError(text)
    return int(value)


def _shape(args, client_factory) -> ModelShape:
    overrides = {name: getattr(args, name) for name in _SHAPE_FLAGS if getattr(args, name) is not None}
    if args.model is None:
        if args.params is None:
            raise PlanInputError("MODEL", "give a model (a path or artifacts/<sha256>) or --params, e.g. --params 7e9")
        return ModelShape(parameters=args.params, source="--params", **overrides)
    if args.model.startswith("artifacts/"):
        shape = _from_store(args.model, client_factory)
    else:
        shape = ModelShape.from_path(Path(args.model))
    if args.params is not None:
        overrides["parameters"] = args.params
    if overrides:
        import dataclasses
        keep_decoder = not (set(overrides) - {"max_context"})     # a changed shape invalidates per-tensor sizes
        shape = dataclasses.replace(shape, **overrides, decoder=shape.decoder if keep_decoder else None)
    return shape


def _from_store(name: str, client_factory) -> ModelShape:
    client = client_factory()
    with tempfile.TemporaryDirectory(prefix="edgeforge-plan-") as scratch:
        path = client.download(name, Path(scratch) / name.removeprefix("artifacts/"))
        return ModelShape.from_path(path)


def _client(args):
    """A Client for the root flags (--address, --token, --token-file, --tls-*), as every other command makes."""
    from clients.python.client import Client, resolve_token
    from shared.server import client_tls_from_files
    tls = client_tls_from_files(getattr(args, "client_tls_ca", None), getattr(args, "client_tls_cert", None),
                                getattr(args, "client_tls_key", None))
    return Client(args.address, token=resolve_token(getattr(args, "token", None), getattr(args, "token_file", None)),
                  tls=tls)


def _registered(client_factory, offline: bool, address: str) -> list:
    """The coordinator's registered devices as profiles; [] with one stderr line when it cannot be asked."""
    if offline:
        return []
    import grpc
    from edgeforge.v1 import coordinator_pb2
    try:
        client = client_factory()
        devices = client.devices.ListDevices(coordinator_pb2.ListDevicesRequest(), timeout=5).devices
    except grpc.RpcError as error:
        print(f"edgeforge: no registered devices ({error.code().name} from the coordinator at {address}): "
              "planning against the catalogue only", file=sys.stderr)
        return []
    except (OSError, ValueError) as error:            # unreadable --tls-* files
        print(f"edgeforge: no registered devices ({error}): planning against the catalogue only", file=sys.stderr)
        return []
    profiles = []
    for device in devices:
        name = device.name.removeprefix("devices/")
        profiles.append(device_profile(dict(device.attributes), name=name))
    return profiles


def _select(profiles: list, wanted: list[str]) -> list:
    if not wanted:
        return profiles
    chosen = []
    for name in wanted:
        entry = next((p for p in profiles if p.name in (name, name.removeprefix("devices/"))), None) or \
            catalogue_entry(name)
        if entry is None:
            known = [p.name for p in profiles if p.basis.startswith(("measured", "assumed"))] + list(CATALOGUE)
            raise PlanInputError("--device", f"no device {name!r}; known: {', '.join(known)}")
        chosen.append(entry)
    return chosen


def cmd_plan(args: argparse.Namespace) -> int:
    import grpc
    client_factory = lambda: _client(args)           # noqa: E731  (made only when a coordinator is needed)
    try:
        if args.overhead_mib is not None and args.overhead_mib < 0:
            raise PlanInputError("--overhead-mib", f"{args.overhead_mib} is negative")
        recipes = list(args.recipe or DEFAULT_RECIPES)
        if args.bits is not None:
            recipes.append(f"int{args.bits}-{f'g{args.group_size}' if args.group_size else 'per_channel'}-"
                           f"{'asym' if args.asym else 'sym'}")
        elif args.group_size or args.asym:
            raise PlanInputError("--bits", "--group-size and --asym describe a generic grid; give --bits too")
        shape = _shape(args, client_factory)
        context = min(4096, shape.max_context or 4096) if args.context is None else args.context
        settings = Settings(context=context, batch=args.batch,
                            prompt_tokens=args.prompt_tokens, generation_tokens=args.generation_tokens,
                            kv_dtype=args.kv_dtype, efficiency=args.efficiency,
                            overhead_bytes=None if args.overhead_mib is None else int(args.overhead_mib * MIB),
                            quality_budget_pct=args.max_quality_loss_pct, training_compute=args.training_compute)
        registered = _registered(client_factory, args.offline, getattr(args, "address", ""))
        devices = _select([*registered, *CATALOGUE.values()], args.device)
        document = plan(shape, devices, settings, recipes)
    except PlanInputError as error:
        print(f"edgeforge: plan: {error}", file=sys.stderr)
        return BAD_INPUT
    except (OSError, ValueError) as error:            # unreadable model file, bad --tls-* files
        print(f"edgeforge: plan: MODEL: {error}", file=sys.stderr)
        return BAD_INPUT
    except grpc.RpcError as error:
        print(f"edgeforge: plan: MODEL: {args.model}: {error.code().name}: {error.details()}", file=sys.stderr)
        return {grpc.StatusCode.UNAVAILABLE: UNREACHABLE, grpc.StatusCode.NOT_FOUND: BAD_INPUT,
                grpc.StatusCode.INVALID_ARGUMENT: BAD_INPUT}.get(error.code(), FAILED)
    except EdgeforgeError as error:
        flag = _FLAGS.get(error.field or "", error.field or "MODEL")
        print(f"edgeforge: plan: {flag}: {error.message}", file=sys.stderr)
        return BAD_INPUT
    print(json.dumps(document, indent=2) if args.json else render(document))
    return OK


def _gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def render(document: dict) -> str:
    """The plan as text: model, memory per recipe, fit per device, roofline and recommendation per device."""
    model, settings = document["model"], document["settings"]
    lines = [f"model     {model['source']}: {model['parameters'] / 1e9:.3f}B parameters, {model['layers']} layers, "
             f"d={model['hidden']}, {model['heads']} heads ({model['kv_heads']} KV) × {model['head_dim']}, "
             f"vocab {model['vocab']}" + (f", trained context {model['max_context']}" if model["max_context"] else ""),
             f"settings  context {settings['context']} · batch {settings['batch']} · KV {settings['kv_dtype']} · "
             f"prompt {settings['prompt_tokens']} / generation {settings['generation_tokens']} tokens · "
             f"efficiency {settings['efficiency']:g}"]
    lines += [f"note      {note}" for note in document["notes"]]
    lines += ["", "memory (GiB = 2^30 bytes, as nvidia-smi shows)",
              f"  {'recipe':<16}{'bits/w':>7}{'weights':>12}{'of it scales':>14}{'KV cache':>12}{'activations':>13}"
              f"{'total':>12}"]
    for row in document["memory"]:
        lines.append(f"  {row['recipe']:<16}{row['bits_per_weight']:>7.3f}{_gib(row['weights_bytes']):>12}"
                     f"{_gib(row['scales_bytes']):>14}{_gib(row['kv_cache_bytes']):>12}"
                     f"{_gib(row['activations_bytes']):>13}{_gib(row['model_bytes']):>12}")
    recipes = [row["recipe"] for row in document["memory"]]
    lines += ["", "fit (after the model and the runtime's overhead: fits ≥ 10% free, tight < 10%)",
              f"  {'device':<26}{'budget':>11}  " + "".join(f"{r:<28}" for r in recipes) + "basis"]
    for device in document["devices"]:
        cells = "".join(f"{_fit_cell(device['fit'][r]):<28}" for r in recipes)
        lines.append(f"  {device['name'][:25]:<26}{_gib(device['memory_bytes']):>11}  {cells}{device['basis']}")
    lines += ["", "roofline (at the recommended recipe; decode at the mean context; η = efficiency)",
              f"  {'device':<26}{'recipe':<17}{'GB/s':>8}{'TFLOP/s':>9}{'ridge':>8}{'prefill tok/s':>15}"
              f"{'decode tok/s':>14}{'FLOP/B':>9}  bound"]
    for device in document["devices"]:
        r = device["roofline"][device["roofline_recipe"]]
        lines.append(f"  {device['name'][:25]:<26}{device['roofline_recipe'][:16]:<17}{device['bandwidth_gbps']:>8.1f}"
                     f"{device['peak_gflops'] / 1e3:>9.2f}{device['ridge_flops_per_byte']:>8.1f}"
                     f"{r['prompt_tokens_per_s']:>15.1f}{r['generation_tokens_per_s']:>14.1f}"
                     f"{r['decode']['intensity_flops_per_byte']:>9.2f}  {r['bound']}")
    lines += ["", "recommendation (the seed's decision tree; paste the candidate into a spec's candidates:)"]
    for device in document["devices"]:
        rec = device["recommendation"]
        candidate = json.dumps(rec["candidate"]) if rec["candidate"] else "—"
        lines.append(f"  {device['name'][:25]:<26}{rec['candidate_id'] or rec['path']:<22}{candidate}\n"
                     f"  {'':<26}why: {rec['why']}")
    return "\n".join(lines)


def _fit_cell(fit: dict) -> str:
    return f"{fit['verdict']} {fit['free_bytes'] / GIB:+.1f} ({fit['free_pct']:+.0f}%)"


def add_parser(subparsers) -> None:
    """Adds `plan` to the `edgeforge` command's subparsers."""
    p = subparsers.add_parser("plan", help="memory, fit, roofline tokens/s and a recipe for a model on devices",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", help="HF directory, .gguf, bundle .tar, .safetensors, or artifacts/<sha256>")
    p.add_argument("--params", type=_count, help="parameter count (7e9, 7B, 135M); overrides the model's")
    shape = p.add_argument_group("shape (override or complete what the model gives)")
    for name, flag in _SHAPE_FLAGS.items():
        shape.add_argument(flag, dest=name, type=int, metavar="N")
    p.add_argument("--context", type=int, help="tokens the KV cache holds (default: min(4096, the model's))")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prefill length for tokens/s (default 512)")
    p.add_argument("--generation-tokens", type=int, default=128, help="generated tokens for tokens/s (default 128)")
    p.add_argument("--kv-dtype", default="f16", choices=list(KV_DTYPE_BYTES), help="KV cache element type")
    p.add_argument("--recipe", action="append", metavar="R",
                   help=f"f32, f16, q8_0, q4_0, q4_k_m, … or int4-g128-sym (repeatable; default "
                        f"{', '.join(DEFAULT_RECIPES)})")
    p.add_argument("--bits", type=int, help="add a generic grid of this many bits (with --group-size, --asym)")
    p.add_argument("--group-size", type=int, help="weights per fp16 scale for --bits (default: one per row)")
    p.add_argument("--asym", action="store_true", help="--bits grid with a zero point per group")
    p.add_argument("--device", action="append", default=[], metavar="NAME",
                   help="a registered device or a catalogue id (repeatable): " + ", ".join(CATALOGUE))
    p.add_argument("--efficiency", type=float, default=1.0,
                   help="share of peak bandwidth and compute reached (default 1.0: the roofline's upper bound)")
    p.add_argument("--overhead-mib", type=float, help="runtime overhead (default GPU 512, CPU 128 MiB)")
    p.add_argument("--max-quality-loss-pct", type=float, default=1.0, help="quality budget for the recipe (default 1)")
    p.add_argument("--training-compute", action="store_true", help="QAT/distillation is affordable (the QAT path)")
    p.add_argument("--offline", action="store_true", help="do not ask the coordinator; the catalogue only")
    p.add_argument("--json", action="store_true", help="print the whole plan as JSON")
    p.set_defaults(run=cmd_plan)


def main(argv: list[str] | None = None) -> None:
    """`python -m clients.cli.plan ...`: the same command without the rest of the CLI (offline unless
    --address is given)."""
    root = argparse.ArgumentParser(prog="edgeforge")
    root.add_argument("--address", default="127.0.0.1:50051")
    root.add_argument("--token")
    root.add_argument("--token-file", type=Path)
    add_parser(root.add_subparsers(dest="command", required=True))
    args = root.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    sys.exit(args.run(args))


if __name__ == "__main__":
    main()
