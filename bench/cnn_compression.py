"""Training-time compression of a CNN on real labelled data: the issue's acceptance numbers.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cnn_compression.py [--threads 2] [--dataset fashion-mnist]

The reference SmallCNN (channels 16, 32; hidden 64) is trained on Fashion-MNIST's 60,000 training
images (`train_reference_cnn`, seed 0); every accuracy is top-1 on the 10,000 test images. Every
fine-tuning below is AdamW, batch 128, cosine-decayed learning rate (`services/compressor/train/loop.py`).

1. Pruning, unstructured by |w| over every conv and linear weight (scope global by default). One-shot:
   cut the reference to the sparsity, measured as is and after fine-tuning for as many steps as the
   iterative run spent up to that sparsity. Iterative (`iterative_prune`): the schedule 0.5, 0.7, 0.8,
   0.9, 0.95 with `--finetune-steps` between cuts, each step measured after its fine-tuning. Masks are
   held during all fine-tuning, so the sparsities are exact.
2. INT4 weights, symmetric minmax, per channel and per tensor. PTQ is the compressor's RTN of the
   reference (what the exporter writes). QAT fine-tunes the reference with the same grid fake-quantized
   (STE) and finalizes onto the grid; the script checks that RTN of the finalized weights reproduces them
   bit for bit. recovered = (QAT − PTQ) / (float − PTQ), the issue asks for ≥ 0.5. Since QAT is also
   extra training, a control fine-tunes the float reference with the same budget and quantizes it after:
   recovered against it, (QAT − its PTQ) / (its float − its PTQ), is the stricter reading.
3. Distillation: the student is the reference structurally pruned (`prune_channels`, 75 % of every conv's
   channels and of the hidden neurons). From that same start it is trained with the KD loss or with
   cross-entropy on the labels alone, same steps, learning rate and batch order, for three seeds (the
   batch order; mean ± half-range (max − min)/2), on the whole training set and on its first 5,000
   images (a training-dataset artifact of the size a pipeline step usually gets).
   α = 1, T = 1 were chosen on held-out data, not on the test set: students trained on the first 55,000
   (or 5,000, or 1,000) training images and scored on the last 5,000 (which the teacher had seen, the
   students not; seed 0, 300 steps; α 1, T 1 best on two of the three, second on 1,000) gave labels-only
   0.8594 / 0.8542 / 0.8484; KD α 1, T 1: 0.8628 / 0.8604 / 0.8546; α 0.5, T 2: 0.8596 / 0.8558 / 0.8564;
   α 0.9, T 2: 0.8586 / 0.8556 / 0.8586; T 4 (α 0.5 / 0.9 / 0.9): 0.8532 / 0.8398 / 0.8462. The soft
   targets of T ≥ 4, the seed's "T = 2-5", cost this 6,800-parameter student accuracy.
Results: bench/results/cnn_compression.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

from clients.agent.profile import cpu_model  # noqa: E402  (after the path set-up)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from services.compressor.prune.masks import apply_masks, magnitude_masks, prunable_weights  # noqa: E402
from services.compressor.quant.rtn import quantize  # noqa: E402
from services.compressor.train.distill import distill  # noqa: E402
from services.compressor.train.iterative import iterative_prune  # noqa: E402
from services.compressor.train.loop import TrainingConfig, train  # noqa: E402
from services.compressor.train.qat import finalize_qat, on_grid, prepare_qat  # noqa: E402
from shared.models.cnn import accuracy, load_dataset, prune_channels, train_reference_cnn  # noqa: E402
from shared.quant.grids import Granularity, Grid  # noqa: E402

SCHEDULE = [0.5, 0.7, 0.8, 0.9, 0.95]
GRIDS = {"int4 per channel": Grid(4, Granularity.PER_CHANNEL), "int4 per tensor": Grid(4, Granularity.PER_TENSOR)}
SEEDS = (0, 1, 2)


def cross_entropy(model: nn.Module, batch: tuple) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def pruning(base: nn.Module, data, evaluate, args) -> dict:
    steps = args.finetune_steps
    one_shot = []
    for k, sparsity in enumerate(SCHEDULE, start=1):
        model = copy.deepcopy(base)
        masks = magnitude_masks(prunable_weights(model), sparsity, scope=args.scope)
        apply_masks(model, masks)
        cut = evaluate(model)
        config = TrainingConfig(steps=k * steps, batch_size=args.batch_size, learning_rate=args.finetune_lr)
        train(model, data, cross_entropy, config, masks=masks, device=args.device)
        one_shot.append({"sparsity": sparsity, "accuracy": cut, "finetuned_accuracy": evaluate(model),
                         "finetune_steps": k * steps})
    model = copy.deepcopy(base)
    config = TrainingConfig(steps=steps, batch_size=args.batch_size, learning_rate=args.finetune_lr)
    results = iterative_prune(model, SCHEDULE, config, data, cross_entropy, scope=args.scope, evaluate=evaluate,
                              device=args.device)
    iterative = [{"sparsity": r.sparsity, "achieved": r.achieved, "accuracy": r.quality,
                  "finetune_steps": (i + 1) * steps, "seconds": r.training.seconds} for i, r in enumerate(results)]
    return {"scope": args.scope, "finetune_steps_per_cut": steps, "one_shot": one_shot, "iterative": iterative}


def rtn_model(model: nn.Module, grid: Grid) -> nn.Module:
    """Every conv and linear weight replaced by the compressor's RTN at `grid`, dequantized (PTQ)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for weight in prunable_weights(model).values():
            weight.copy_(on_grid(weight, grid))
    return model


def reproduces(model: nn.Module, grid: Grid) -> bool:
    """Whether RTN at `grid` gives back every weight bit for bit (what the exporter will write)."""
    for weight in prunable_weights(model).values():
        flat = weight.detach().reshape(weight.shape[0], -1).numpy()
        if not np.array_equal(quantize(flat, grid).dequantize(), flat):
            return False
    return True


def recovered(float_accuracy: float, ptq: float, qat: float) -> float | None:
    """Share of PTQ's accuracy loss that QAT wins back (None when PTQ lost nothing)."""
    lost = float_accuracy - ptq
    return (qat - ptq) / lost if lost > 0 else None


def quantization(base: nn.Module, float_accuracy: float, data, evaluate, args) -> dict:
    config = TrainingConfig(steps=args.qat_steps, batch_size=args.batch_size, learning_rate=args.qat_lr)
    rows = {}
    for label, grid in GRIDS.items():
        ptq = evaluate(rtn_model(base, grid))
        qat = prepare_qat(copy.deepcopy(base), grid)
        report = train(qat, data, cross_entropy, config, device=args.device)
        finalize_qat(qat)
        control = copy.deepcopy(base)
        train(control, data, cross_entropy, config, device=args.device)
        qat_accuracy, control_float, control_ptq = evaluate(qat), evaluate(control), evaluate(rtn_model(control, grid))
        rows[label] = {"grid": grid.name, "ptq_accuracy": ptq, "qat_accuracy": qat_accuracy,
                       "recovered": recovered(float_accuracy, ptq, qat_accuracy),
                       "finetuned_float_accuracy": control_float, "finetuned_float_then_ptq_accuracy": control_ptq,
                       "recovered_vs_finetuned": recovered(control_float, control_ptq, qat_accuracy),
                       "rtn_reproduces_qat_weights": reproduces(qat, grid), "qat_seconds": report.seconds}
    return {"steps": args.qat_steps, "learning_rate": args.qat_lr, "grids": rows}


def distillation(base: nn.Module, data, evaluate, args) -> dict:
    student = prune_channels(base, args.student_fraction)
    regimes = {f"{len(data[0])} images": data, f"{args.small_set} images": tuple(t[:args.small_set] for t in data)}
    out = {"student": student.structure(), "student_parameters": count(student), "teacher_parameters": count(base),
           "student_accuracy_before_training": evaluate(student), "alpha": args.alpha,
           "temperature": args.temperature, "steps": args.distill_steps, "learning_rate": args.distill_lr,
           "seeds": list(SEEDS), "regimes": {}}
    for regime, subset in regimes.items():
        runs = {"distilled": [], "labels_only": []}
        for seed in SEEDS:
            config = TrainingConfig(steps=args.distill_steps, batch_size=args.batch_size,
                                    learning_rate=args.distill_lr, seed=seed)
            distilled = copy.deepcopy(student)
            distill(distilled, base, subset, config, alpha=args.alpha, temperature=args.temperature,
                    device=args.device)
            runs["distilled"].append(evaluate(distilled))
            labels_only = copy.deepcopy(student)
            train(labels_only, subset, cross_entropy, config, device=args.device)
            runs["labels_only"].append(evaluate(labels_only))
        out["regimes"][regime] = {name: {"accuracy": values, "mean": statistics.fmean(values),
                                         "half_range": (max(values) - min(values)) / 2}
                                  for name, values in runs.items()}
    return out


def table(result: dict) -> str:
    lines = [f"reference SmallCNN: {result['reference']['accuracy']:.4f} test accuracy "
             f"({result['reference']['parameters']} parameters, {result['reference']['seconds']:.0f} s)", "",
             f"magnitude pruning ({result['pruning']['scope']}), test accuracy",
             "sparsity  one-shot  one-shot+FT (steps)  iterative (steps)"]
    for shot, it in zip(result["pruning"]["one_shot"], result["pruning"]["iterative"]):
        lines.append(f"{shot['sparsity']:8.2f}  {shot['accuracy']:8.4f}  {shot['finetuned_accuracy']:11.4f} "
                     f"({shot['finetune_steps']:4d})  {it['accuracy']:9.4f} ({it['finetune_steps']:4d})")
    q = result["quantization"]
    lines += ["", f"INT4 weights ({q['steps']} fine-tuning steps), test accuracy",
              "                  reference        same budget in float",
              "grid              float   PTQ     float   PTQ     QAT     recovered (vs ref, vs same budget)"]

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}"
    for label, row in q["grids"].items():
        lines.append(f"{label:16s}  {result['reference']['accuracy']:.4f}  {row['ptq_accuracy']:.4f}  "
                     f"{row['finetuned_float_accuracy']:.4f}  {row['finetuned_float_then_ptq_accuracy']:.4f}  "
                     f"{row['qat_accuracy']:.4f}  {share(row['recovered'])}, {share(row['recovered_vs_finetuned'])}"
                     f"   RTN reproduces QAT weights: {row['rtn_reproduces_qat_weights']}")
    d = result["distillation"]
    lines += ["", f"distillation: student {d['student']['channels']}/{d['student']['hidden']} "
                  f"({d['student_parameters']} of {d['teacher_parameters']} parameters; "
                  f"{d['student_accuracy_before_training']:.4f} before training), {d['steps']} steps, "
                  f"alpha {d['alpha']}, T {d['temperature']}, seeds {d['seeds']}"]
    lines.append("training set    distilled                          labels only")
    for regime, runs in d["regimes"].items():
        cells = [f"{runs[name]['mean']:.4f} ± {runs[name]['half_range']:.4f} "
                 f"({' '.join(f'{v:.4f}' for v in runs[name]['accuracy'])})" for name in ("distilled", "labels_only")]
        lines.append(f"{regime:14s}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "digits"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the loop's default picks CUDA when present)")
    parser.add_argument("--epochs", type=int, default=3, help="reference training epochs")
    parser.add_argument("--scope", default="global", choices=("global", "per_layer"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--finetune-steps", type=int, default=80)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--qat-steps", type=int, default=200)
    parser.add_argument("--qat-lr", type=float, default=5e-4)
    parser.add_argument("--student-fraction", type=float, default=0.75)
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--small-set", type=int, default=5000, help="the small training set: its first N images")
    parser.add_argument("--distill-lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cnn_compression.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()
    base, base_accuracy = train_reference_cnn(args.dataset, seed=0, epochs=args.epochs)
    reference_seconds = time.perf_counter() - started
    print(f"reference: {base_accuracy:.4f} in {reference_seconds:.0f} s", file=sys.stderr, flush=True)
    data = load_dataset(args.dataset, "train")
    test_x, test_y = load_dataset(args.dataset, "test")

    def evaluate(model: nn.Module) -> float:
        return accuracy(model, test_x, test_y)

    result = {"machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "torch_threads": args.threads,
                          "python": platform.python_version(), "torch": torch.__version__,
                          "device": args.device, "load_average_before": load_before},
              "dataset": args.dataset, "test_images": len(test_x),
              "reference": {"structure": base.structure(), "parameters": count(base), "accuracy": base_accuracy,
                            "epochs": args.epochs, "seconds": reference_seconds}}
    timings = {}
    for name, run in (("pruning", lambda: pruning(base, data, evaluate, args)),
                      ("quantization", lambda: quantization(base, base_accuracy, data, evaluate, args)),
                      ("distillation", lambda: distillation(base, data, evaluate, args))):
        section = time.perf_counter()
        result[name] = run()
        timings[name] = time.perf_counter() - section
        print(f"{name}: {timings[name]:.0f} s", file=sys.stderr, flush=True)
    result["seconds"] = {"reference": reference_seconds, **timings, "total": time.perf_counter() - started}
    result["machine"]["load_average_after"] = os.getloadavg()
    print(table(result))
    print(f"\ntotal {result['seconds']['total']:.0f} s; results: {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
