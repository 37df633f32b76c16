"""Quality of an image classifier or text encoder, in any runtime, against its float32 source model.

A runner is `run(inputs: dict[str, np.ndarray]) -> np.ndarray`: model inputs as ModuleDir.prepare makes
them -> logits (N, classes) or sentence embeddings (N, d) (an encoder graph that returns token states
(N, T, d) is mean-pooled over the attention mask). `runner(format, path, module_dir)` builds one for the
torch reference, onnxruntime or LiteRT; each batches inside.

`evaluate` compares a runner with the float model's (`reference_run`) on a dataset:
- labelled images: top1_accuracy (metrics add top1_agreement with the reference, top5_accuracy);
- unlabelled images (photos): top1_agreement — how often the top-1 class equals the float model's;
- sentences: cosine_similarity, the mean cosine of each sentence's embedding to the float model's
  (metrics add its minimum) and, when the dataset has word pairs, wordsim_spearman: Spearman's rank
  correlation between the cosine of the two words' embeddings (each word embedded as a one-word
  sentence) and the human similarity scores (WordSim-353, Finkelstein et al. 2002).
All are higher-is-better.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from shared.errors import FailedPrecondition, InvalidArgument
from shared.models.module_data import Samples
from shared.models.modules import IMAGE_TASK, ONNX_MODEL, TEXT_TASK, ModuleDir

Run = Callable[[dict[str, np.ndarray]], np.ndarray]
BATCH = 32                                  # samples per runtime call
FORMATS = ("reference", "onnx", "tflite")


# ---------------------------------------------------------------- metrics

def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == labels))


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    best = np.argpartition(-logits, k - 1, axis=-1)[:, :k]                  # (N, k), any order
    return float(np.mean((best == labels[:, None]).any(-1)))


def top1_agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    return float(np.mean(logits.argmax(-1) == reference.argmax(-1)))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (N, d) batches, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    from scipy.stats import spearmanr
    return float(spearmanr(x, y).statistic)


# ---------------------------------------------------------------- evaluation

def evaluate(task: str, run: Run, reference_run: Run | None, module_dir: ModuleDir, samples: Samples,
             max_samples: int | None = None) -> dict:
    """{"metric", "value", "higher_is_better", "samples", "metrics": {name: number}} of `run` on the
    first `max_samples` samples (all when None)."""
    if task != module_dir.task:
        raise InvalidArgument(f"task {task} does not match the model's {module_dir.task}", field="task")
    samples = samples.head(max_samples) if max_samples else samples
    if not len(samples):
        raise InvalidArgument("the evaluation dataset holds no samples", reason="INSUFFICIENT_DATA",
                              field="evaluation_dataset")
    inputs = module_dir.prepare(samples)
    outputs = _checked(run(inputs), len(samples), "candidate")
    reference = None if reference_run is None else _checked(reference_run(inputs), len(samples), "reference")
    if reference is not None and reference.shape != outputs.shape:
        raise FailedPrecondition(f"the candidate returns {outputs.shape}, the float model {reference.shape}",
                                 reason="VALIDATION_FAILED")
    if task == IMAGE_TASK:
        metric, metrics = _image_metrics(outputs, reference, samples.labels)
    elif task == TEXT_TASK:
        metric, metrics = _text_metrics(outputs, reference, run, module_dir, samples)
    else:
        raise InvalidArgument(f"task {task} is not evaluated here", field="task")
    return {"metric": metric, "value": metrics[metric], "higher_is_better": True, "samples": len(samples),
            "metrics": {**metrics, "samples": float(len(samples))}}


def _checked(outputs: np.ndarray, count: int, who: str) -> np.ndarray:
    outputs = np.asarray(outputs, dtype=np.float32)
    if outputs.ndim != 2 or outputs.shape[0] != count:
        raise FailedPrecondition(f"the {who} returned shape {outputs.shape}; expected ({count}, classes or "
                                 "dimensions)", reason="VALIDATION_FAILED")
    if not np.isfinite(outputs).all():
        raise FailedPrecondition(f"the {who} returned NaN or Inf", reason="VALIDATION_FAILED")
    return outputs


def _image_metrics(logits: np.ndarray, reference: np.ndarray | None,
                   labels: np.ndarray | None) -> tuple[str, dict[str, float]]:
    metrics = {} if reference is None else {"top1_agreement": top1_agreement(logits, reference)}
    if labels is None:
        if reference is None:
            raise InvalidArgument("unlabelled images are scored by agreement with the float model: a reference "
                                  "runner is required", field="reference")
        return "top1_agreement", metrics
    if labels.max() >= logits.shape[1]:
        raise InvalidArgument(f"the dataset has label {int(labels.max())}; the model has {logits.shape[1]} classes",
                              field="evaluation_dataset")
    metrics["top1_accuracy"] = top1_accuracy(logits, labels)
    if logits.shape[1] > 5:
        metrics["top5_accuracy"] = topk_accuracy(logits, labels, 5)
    return "top1_accuracy", metrics


def _text_metrics(embeddings: np.ndarray, reference: np.ndarray | None, run: Run, module_dir: ModuleDir,
                  samples: Samples) -> tuple[str, dict[str, float]]:
    if reference is None:
        raise InvalidArgument("sentence embeddings are scored by cosine similarity to the float model's: a "
                              "reference runner is required", field="reference")
    similarity = cosine(embeddings, reference)
    metrics = {"cosine_similarity": float(similarity.mean()), "cosine_similarity_min": float(similarity.min())}
    if samples.word_pairs:
        metrics["wordsim_spearman"] = wordsim_spearman(run, module_dir, samples.word_pairs)
        metrics["word_pairs"] = float(len(samples.word_pairs))
    return "cosine_similarity", metrics


def wordsim_spearman(run: Run, module_dir: ModuleDir, pairs: list[tuple[str, str, float]]) -> float:
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    vectors = run(module_dir.prepare(Samples(sentences=words)))              # (W, d)
    index = {w: i for i, w in enumerate(words)}
    first = vectors[[index[a] for a, _, _ in pairs]]
    second = vectors[[index[b] for _, b, _ in pairs]]
    return spearman(cosine(first, second), np.array([score for _, _, score in pairs]))


# ---------------------------------------------------------------- runners

def runner(format: str, path: Path | None, module_dir: ModuleDir) -> Run:
    """A batched runner: "reference" (the bundle's torch module; an ONNX bundle's own model.onnx),
    "onnx" (onnxruntime on `path`: a .onnx file or an export directory holding model.onnx) or
    "tflite" (ai-edge-litert on `path`)."""
    if format == "reference":
        if module_dir.architecture == "onnx":
            return _onnx_runner(module_dir.path / ONNX_MODEL, module_dir)
        return _torch_runner(module_dir)
    if format == "onnx":
        return _onnx_runner(Path(path) / ONNX_MODEL if Path(path).is_dir() else Path(path), module_dir)
    if format == "tflite":
        return _tflite_runner(Path(path), module_dir)
    raise InvalidArgument(f"format {format!r} has no runner here (expected one of {list(FORMATS)})", field="format")


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def _batches(inputs: dict[str, np.ndarray], size: int):
    """Consecutive slices of every input; token inputs are cut to the longest sentence of the slice."""
    count = len(next(iter(inputs.values())))
    for start in range(0, count, size):
        batch = {name: value[start:start + size] for name, value in inputs.items()}
        if "attention_mask" in batch:
            length = max(1, int(batch["attention_mask"].sum(1).max()))
            batch = {name: value[:, :length] for name, value in batch.items()}
        yield batch


def _pooled(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Token states (N, T, d) -> their mean over the attention mask (N, d); other outputs unchanged."""
    if output.ndim != 3 or mask is None:
        return output
    weights = mask[:, :output.shape[1], None].astype(np.float32)
    return (output * weights).sum(1) / np.maximum(weights.sum(1), 1.0)


def _torch_runner(module_dir: ModuleDir) -> Run:
    import torch
    loaded = module_dir.load()

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        outputs = []
        with torch.no_grad():
            for batch in _batches(inputs, BATCH):
                output = loaded.module(*(torch.from_numpy(batch[name]) for name in loaded.input_names)).numpy()
                outputs.append(_pooled(output, batch.get("attention_mask")))
        return np.concatenate(outputs)
    return run


def _onnx_runner(path: Path, module_dir: ModuleDir) -> Run:
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:       # onnxruntime raises its own exception classes, not exported stably
        raise FailedPrecondition(f"onnxruntime could not load {path.name}: {error}", reason="VALIDATION_FAILED") \
            from error
    names = [i.name for i in session.get_inputs()]

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        outputs = []
        for batch in _batches(inputs, BATCH):
            feeds = _by_name(names, batch, module_dir)
            output = session.run(None, feeds)[0]
            outputs.append(_pooled(output, batch.get("attention_mask")))
        return np.concatenate(outputs)
    return run


def _by_name(names: list[str], batch: dict[str, np.ndarray], module_dir: ModuleDir) -> dict[str, np.ndarray]:
    """The graph's inputs from the prepared ones: by name, else in the bundle's input order."""
    if set(names) <= set(batch):
        return {name: batch[name] for name in names}
    if len(names) == len(module_dir.input_names):
        return {name: batch[ours] for name, ours in zip(names, module_dir.input_names)}
    raise FailedPrecondition(f"the graph takes inputs {names}; the model's are {module_dir.input_names}",
                             reason="VALIDATION_FAILED")


def _tflite_runner(path: Path, module_dir: ModuleDir) -> Run:
    """LiteRT's single signature. Dynamic dimensions (-1 in the signature) are resized to each batch;
    a fixed batch size is filled by repeating the last sample (those outputs are dropped), a fixed token
    count by padding with masked-out zeros (or cutting). int64 inputs become the signature's int32;
    full-int8 inputs are quantized and int8 outputs dequantized with their scale and zero point."""
    from ai_edge_litert.interpreter import Interpreter
    try:
        interpreter = Interpreter(str(path), num_threads=_threads())
        signatures = list(interpreter.get_signature_list())
        if len(signatures) != 1:
            raise ValueError(f"expected one signature, found {signatures}")
        signature = interpreter.get_signature_runner(signatures[0])
    except (ValueError, RuntimeError) as error:
        raise FailedPrecondition(f"ai-edge-litert could not load {path.name}: {error}",
                                 reason="VALIDATION_FAILED") from error
    order = lambda details: sorted(details.items(), key=lambda item: int(item[0].rpartition("_")[2] or 0))
    inputs_detail, (output_name, output_detail) = order(signature.get_input_details()), \
        order(signature.get_output_details())[0]
    if len(inputs_detail) != len(module_dir.input_names):
        raise FailedPrecondition(f"{path.name} takes {len(inputs_detail)} inputs; the model has "
                                 f"{module_dir.input_names}", reason="VALIDATION_FAILED")
    fixed_batch = int(inputs_detail[0][1]["shape_signature"][0])

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        outputs = []
        for batch in _batches(inputs, fixed_batch if fixed_batch > 0 else BATCH):
            count = len(next(iter(batch.values())))
            feeds = {name: _fit(batch[ours], detail) for (name, detail), ours in zip(inputs_detail,
                                                                                     module_dir.input_names)}
            output = _dequantized(signature(**feeds)[output_name], output_detail)[:count]
            mask = batch.get("attention_mask")
            outputs.append(_pooled(output, None if mask is None else _fit(mask, inputs_detail[0][1])[:count]))
        return np.concatenate(outputs)
    return run


def _fit(value: np.ndarray, detail: dict) -> np.ndarray:
    """`value` shaped to the signature's fixed dimensions and cast to its dtype."""
    signature = [int(d) for d in detail["shape_signature"]]
    if signature[0] > 0 and len(value) < signature[0]:                        # fill a fixed batch
        value = np.concatenate([value, np.repeat(value[-1:], signature[0] - len(value), axis=0)])
    if value.ndim == 2 and len(signature) == 2 and signature[1] > 0 and value.shape[1] != signature[1]:
        padded = np.zeros((len(value), signature[1]), dtype=value.dtype)    # token ids: pad with masked zeros
        padded[:, :min(signature[1], value.shape[1])] = value[:, :signature[1]]
        value = padded
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail["quantization"]
    if scale and value.dtype.kind == "f" and dtype.kind in "iu":
        limits = np.iinfo(dtype)
        value = np.clip(np.round(value / scale) + zero, limits.min, limits.max)
    return value.astype(dtype)


def _dequantized(value: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if scale and np.dtype(detail["dtype"]).kind in "iu":
        return (value.astype(np.float32) - np.float32(zero)) * np.float32(scale)
    return value.astype(np.float32, copy=False)
