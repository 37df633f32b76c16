"""Transform: a candidate's prune / distill / qat steps on a float model, with size and quality after each.

The output is a float model of the same family and format as the input (a decoder bundle for causal LMs,
a module bundle for image classifiers and encoders): what the step did is in its weights (zeros, fewer
units, values on a grid), so everything downstream — Compress, every exporter, every runtime — works on
it unchanged. Post-training quantization is not a Transform step (Compress or the exporter does it).

After every step the model is measured the same way:
- size: parameters, nonzero share of the prunable (linear/conv) weights, bytes stored densely at float32,
  and bytes at the best honest storage (services/compressor/prune/sparse.py: a tensor is stored as CSR or
  a bitmask only where that is smaller than dense — at 50% sparsity float32 CSR is *larger* than dense,
  a bitmask saves 47%);
- quality on the build's evaluation data, in torch: perplexity for LMs, top-1 accuracy / agreement or
  embedding cosine similarity for the other families (shared/models/module_quality.py).

Causal LMs stream block by block where the algorithm allows (services/compressor/prune/decoder.py);
distillation loads student and teacher whole (135M parameters: ~1.6 GB with AdamW state). Image and
encoder models are small and live in memory. Training runs on CUDA when present, else on the CPU.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeforge.v1 import common_pb2
from services.compressor.prune import masks as prune_masks
from services.compressor.prune.sparse import sparse_size
from services.compressor.steps import CAUSAL_LM, IMAGE_CLASSIFICATION, DistillStep, PruneStep, QatStep, \
    TransformStep, Training
from services.compressor.train.loop import TrainingConfig, resolve_device, train
from shared.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)
Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class TransformData:
    """The build's datasets as local files, and how much of them each use takes."""
    task: str
    calibration: Path | None
    calibration_samples: int
    sequence_length: int
    training: Path | None
    evaluation: Path
    max_tokens: int = 4096
    window_tokens: int = 512
    max_samples: int = 0


@dataclasses.dataclass(frozen=True)
class Size:
    parameters: int
    prunable: int
    nonzero: int
    dense_bytes: int
    stored_bytes: int
    sparse_tensors: int
    sparse_format: str

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.prunable if self.prunable else 0.0

    @property
    def storage(self) -> str:
        if not self.sparse_tensors:
            return "dense f32"
        return f"{self.sparse_format}+f32 for {self.sparse_tensors} sparse tensors, dense f32 for the rest"


def measure_size(tensors: Iterable[tuple[str, np.ndarray, bool]]) -> Size:
    """Sizes of (name, float32 array, prunable) tensors; sparse storage only where it is smaller."""
    parameters = prunable = nonzero = dense = stored = sparse = 0
    formats = set()
    for _, array, is_prunable in tensors:
        parameters += array.size
        size = sparse_size(array, 4)
        dense += size.dense_bytes
        stored += size.stored_bytes
        if size.format != "dense":
            sparse += 1
            formats.add(size.format)
        if is_prunable:
            prunable += array.size
            nonzero += size.nonzeros
    return Size(parameters, prunable, nonzero, dense, stored, sparse, "/".join(sorted(formats)))


def step_report(index: int, kind: str, description: str, size: Size, quality: dict, seconds: float,
                note: str = "") -> common_pb2.StepReport:
    return common_pb2.StepReport(
        index=index, kind=kind, description=description, parameter_count=size.parameters,
        nonzero_count=size.nonzero, sparsity=size.sparsity, dense_bytes=size.dense_bytes,
        stored_bytes=size.stored_bytes, storage=size.storage, quality=common_pb2.Quality(**quality),
        seconds=seconds, note=note)


def training_config(training: Training, task: str) -> TrainingConfig:
    resolved = training.resolved(task)
    return TrainingConfig(resolved.steps, resolved.batch_size, resolved.learning_rate, resolved.seed).validated()


# ======================================================================================= causal LMs

class DecoderTransform:
    """Steps on a decoder bundle (shared/models/bundle.ModelDir); each step writes a new directory."""

    def __init__(self, source: Path, data: TransformData, work: Path, device: torch.device, progress: Progress):
        from shared.models.bundle import ModelDir
        self.source, self.data, self.work, self.device, self.progress = ModelDir(source), data, work, device, progress
        self._sequences: dict[str, torch.Tensor] = {}
        self._windows: list[list[int]] | None = None

    def sequences(self, which: str) -> torch.Tensor:
        """(samples, tokens) token ids of the calibration or training text, cut as the calibrator cuts them."""
        if which not in self._sequences:
            from services.compressor.servicer import calibration_sequences
            path = self.data.calibration if which == "calibration" else (self.data.training or self.data.calibration)
            if path is None:
                raise FailedPrecondition(f"{which} data is required by this step", reason="MISSING_CALIBRATION",
                                         field=f"{which}_dataset")
            self._sequences[which] = calibration_sequences(self.source, path, self.data.calibration_samples,
                                                           self.data.sequence_length)
        return self._sequences[which]

    def size(self, model) -> Size:
        def tensors():
            for name in model.tensor_names():
                yield name, model.array(name), _is_block_linear(name)
        return measure_size(tensors())

    def windows(self) -> list[list[int]]:
        """The evaluation windows, exactly as Exporter.Evaluate cuts them (tokenized once per Transform)."""
        if self._windows is None:
            from services.exporter.quality import windows
            from shared.datasets import load_text
            from shared.models.tokenizer import TextTokenizer
            tokenizer = TextTokenizer(self.source.tokenizer_path, self.source.tokenizer_config())
            text = load_text(self.data.evaluation, "evaluation_dataset")
            self._windows = windows(tokenizer.encode(text), tokenizer.bos_id, self.data.window_tokens,
                                    self.data.max_tokens)
        return self._windows

    def quality(self, model) -> dict:
        from services.exporter.quality import perplexity
        from services.exporter.runtimes import ReferenceRuntime
        runtime = ReferenceRuntime(model.path)
        try:
            result = perplexity(runtime, self.windows())
        finally:
            runtime.close()
        return {"metric": "perplexity", "value": result.value, "tokens": result.tokens}

    def run(self, index: int, step: TransformStep, current) -> tuple[object, str]:
        from shared.models.bundle import ModelDir
        out = self.work / f"step{index}"
        if isinstance(step, PruneStep):
            sequences = self.sequences("calibration") if step.calibrated else None
            if step.method == "structured":
                from services.compressor.prune.decoder import prune_decoder_neurons
                report = prune_decoder_neurons(current, fraction=step.sparsity, sequences=sequences, out_dir=out,
                                               device=self.device, progress=self.progress)
                note = (f"intermediate_size {report.intermediate_size_before} → {report.intermediate_size_after}, "
                        f"{report.parameters_before:,} → {report.parameters_after:,} parameters")
            else:
                from services.compressor.prune.decoder import prune_decoder
                report = prune_decoder(current, method=step.method, sparsity=step.sparsity, n=step.n, m=step.m,
                                       scope=step.scope, sequences=sequences, out_dir=out, device=self.device,
                                       progress=self.progress)
                errors = list(report.output_error.values())
                note = f"mean relative output error {np.mean(errors):.4f}" if errors else ""
            return ModelDir(out), note
        if isinstance(step, DistillStep):
            return self.distill(step, current, out)
        raise FailedPrecondition(f"{step.kind} is not available for causal LMs", reason="UNSUPPORTED_OP")

    def distill(self, step: DistillStep, current, out: Path):
        """Logit distillation on the training text: KL(teacher ‖ student) at temperature T, times T²."""
        from shared.models.bundle import ModelDir, write_model_dir
        from shared.models.llama import build_reference
        config = training_config(step.training, CAUSAL_LM)
        teacher = build_reference(self.source.config, self.source.tensor).to(self.device)
        student = build_reference(current.config, current.tensor)
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        from services.compressor.train.distill import distill
        kept = {name: p.detach() != 0 for name, p in student.named_parameters() if _is_block_linear(name)
                and bool((p.detach() == 0).any())}             # pruned weights stay pruned
        report = distill(student, teacher, (self.sequences("training"),), config, alpha=1.0,
                         temperature=step.temperature, masks=kept or None, device=str(self.device))
        state = {name: tensor.detach().cpu().float().numpy() for name, tensor in student.state_dict().items()}
        names = list(current.config.tensor_shapes())
        tokenizer = current.path / "tokenizer.json"
        write_model_dir(out, current.config, ((name, state[name]) for name in names),
                        tokenizer.read_text() if tokenizer.is_file() else None, current.tokenizer_config())
        for extra in current.path.iterdir():                  # e.g. a carried tokenizer.gguf
            if extra.is_file() and not (out / extra.name).exists():
                shutil.copy(extra, out / extra.name)
        return ModelDir(out), _loss_note(report.losses)

    def save(self, current, out: Path) -> None:
        shutil.copytree(current.path, out)


def _is_block_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _loss_note(losses: list[float]) -> str:
    if not losses:
        return ""
    head, tail = np.mean(losses[:max(1, len(losses) // 10)]), np.mean(losses[-max(1, len(losses) // 10):])
    return f"{len(losses)} steps, loss {head:.4f} → {tail:.4f}"


# ================================================================================ image and encoder models

class ModuleTransform:
    """Steps on a module bundle (shared/models/modules.ModuleDir), in memory."""

    def __init__(self, source: Path, data: TransformData, work: Path, device: torch.device, progress: Progress):
        from shared.models.modules import ModuleDir
        self.like, self.data, self.work, self.device, self.progress = ModuleDir(source), data, work, device, progress
        loaded = self.like.load()
        self.input_names = loaded.input_names
        self.teacher = loaded.module.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self._inputs: dict[str, tuple[torch.Tensor, ...]] = {}
        self._labels: dict[str, torch.Tensor | None] = {}
        self._reference: np.ndarray | None = None
        self.evaluation = None

    # ------------------------------------------------------------------ data
    def _load(self, which: str) -> None:
        from shared.models.module_data import load_samples
        path = {"calibration": self.data.calibration, "training": self.data.training or self.data.calibration,
                "evaluation": self.data.evaluation}[which]
        if path is None:
            raise FailedPrecondition(f"{which} data is required by this step", reason="MISSING_CALIBRATION",
                                     field=f"{which}_dataset")
        samples = load_samples(path, self.data.task, f"{which}_dataset")
        if which == "evaluation":
            self.evaluation = samples
            return
        if which == "calibration":
            samples = samples.head(self.data.calibration_samples)
        prepared = self.like.prepare(samples)
        self._inputs[which] = tuple(torch.as_tensor(prepared[name]) for name in self.input_names)
        labels = getattr(samples, "labels", None)
        self._labels[which] = torch.as_tensor(labels, dtype=torch.int64) if labels is not None else None

    def inputs(self, which: str) -> tuple[torch.Tensor, ...]:
        if which not in self._inputs:
            self._load(which)
        return self._inputs[which]

    def labels(self, which: str) -> torch.Tensor | None:
        self.inputs(which)
        return self._labels[which]

    # ------------------------------------------------------------------ measurement
    def size(self, module: nn.Module) -> Size:
        prunable = set(prune_masks.prunable_weights(module))
        return measure_size((name, tensor.detach().float().cpu().numpy(), name in prunable)
                            for name, tensor in module.state_dict().items() if tensor.is_floating_point())

    def quality(self, module: nn.Module) -> dict:
        from shared.models import module_quality
        if self.evaluation is None:
            self._load("evaluation")
        result = module_quality.evaluate(self.data.task, _runner(module, self.input_names),
                                         _runner(self.teacher, self.input_names), self.like, self.evaluation,
                                         self.data.max_samples)
        return {key: result[key] for key in ("metric", "value", "higher_is_better", "metrics")} | {
            "tokens": int(result.get("samples", 0))}

    # ------------------------------------------------------------------ steps
    def run(self, index: int, step: TransformStep, module: nn.Module) -> tuple[nn.Module, str]:
        trains = not isinstance(step, PruneStep) or step.finetune is not None
        if self.like.architecture == "exported_program" and (trains or step.method == "structured"):
            raise FailedPrecondition(
                f"step {index} ({step.describe()}): an ExportedProgram has a fixed graph — fixed shapes and no "
                "training mode — so it can be pruned (magnitude, N:M, wanda, sparsegpt) but not trained or "
                "structurally pruned; import a torch family (MobileNetV2, SmallCNN, BERT) for that",
                reason="UNSUPPORTED_ARCH", field=f"steps[{index - 1}]")
        if isinstance(step, PruneStep):
            return self.prune(step, module)
        if isinstance(step, DistillStep):
            return self.distill(step, module)
        return self.qat(step, module)

    def prune(self, step: PruneStep, module: nn.Module) -> tuple[nn.Module, str]:
        note = ""
        if step.method == "structured":
            from services.compressor.prune.structured import prune_structured
            before = sum(p.numel() for p in module.parameters())
            module = prune_structured(module, step.unit, step.sparsity)
            note = f"{before:,} → {sum(p.numel() for p in module.parameters()):,} parameters"
        elif step.schedule:
            return self.iterative(step, module)
        elif step.method == "magnitude":
            weights = prune_masks.prunable_weights(module)
            if step.m:
                masks, skipped = _n_m_masks({n: w.detach().abs() for n, w in weights.items()}, step.n, step.m)
                note = _skipped_note(skipped, step)
            else:
                masks = prune_masks.magnitude_masks({n: w.detach() for n, w in weights.items()}, step.sparsity,
                                                    scope=step.scope)
            prune_masks.apply_masks(module, masks)
        else:
            note = self.calibrated_prune(step, module)
        if step.finetune:
            report = self.finetune(module, step.finetune)
            note = "; ".join(filter(None, [note, f"fine-tuned: {_loss_note(report.losses)}"]))
        return module, note

    def calibrated_prune(self, step: PruneStep, module: nn.Module) -> str:
        """Wanda / SparseGPT from one pass of the calibration inputs through the float model: each layer's
        XᵀX (Linear inputs; Conv2d inputs unfolded into the weight's in·kh·kw columns). Grouped
        (depthwise) convolutions have no shared input columns and fall back to magnitude."""
        from services.compressor.prune.sparsegpt import sparsegpt
        from services.compressor.prune.wanda import wanda_mask
        stats = collect_input_statistics(module, self.inputs("calibration"), hessians=step.method == "sparsegpt")
        masks, skipped, fallback, errors = {}, [], [], []
        with torch.no_grad():
            for name, weight in prune_masks.prunable_weights(module).items():
                matrix = weight.detach().reshape(weight.shape[0], -1)
                if step.m and matrix.shape[1] % step.m:
                    skipped.append(name)
                    continue
                layer_stats = stats.get(name)
                if layer_stats is None:
                    fallback.append(name)
                    mask = (prune_masks.n_m_mask(matrix.abs(), step.n, step.m) if step.m else
                            prune_masks.magnitude_masks({name: matrix}, step.sparsity)[name])
                elif step.method == "wanda":
                    mask = wanda_mask(matrix, layer_stats, sparsity=step.sparsity, n=step.n, m=step.m)
                else:
                    result = sparsegpt(matrix.float(), layer_stats, sparsity=step.sparsity, n=step.n, m=step.m)
                    weight.copy_(result.weight.reshape(weight.shape).to(weight.dtype))
                    mask, _ = result.mask, errors.append(result.output_error)
                masks[name] = mask.reshape(weight.shape)
        prune_masks.apply_masks(module, masks)
        notes = [_skipped_note(skipped, step)]
        if fallback:
            notes.append(f"{len(fallback)} grouped convolutions pruned by magnitude")
        if errors:
            notes.append(f"mean relative output error {np.mean(errors):.4f}")
        return "; ".join(filter(None, notes))

    def iterative(self, step: PruneStep, module: nn.Module) -> tuple[nn.Module, str]:
        """Gradual magnitude pruning: each sparsity of the schedule in turn, fine-tuned with the zeros held."""
        from services.compressor.train.iterative import iterative_prune
        results = iterative_prune(module, list(step.schedule), training_config(step.finetune, self.data.task),
                                  self.training_data(), self.loss(alpha=self.finetune_alpha), scope=step.scope,
                                  device=str(self.device))
        return module, "; ".join(f"{100 * r.sparsity:g}%: {_loss_note(r.training.losses)}" for r in results)

    def loss(self, temperature: float = 1.0, alpha: float = 0.0) -> Callable[[nn.Module, tuple], torch.Tensor]:
        """The training loss of the task: labelled images take α·KD + (1−α)·CE; encoders (no labels) learn the
        teacher's embeddings (1 − cosine similarity, the loss embedding distillation uses)."""
        count = len(self.input_names)
        if self.data.task == IMAGE_CLASSIFICATION:
            from services.compressor.train.distill import distillation_loss

            def classifier_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
                inputs, labels = batch[:count], batch[count]
                logits = model(*inputs)
                if alpha == 0.0:
                    return F.cross_entropy(logits, labels)
                with torch.no_grad():
                    target = self.teacher(*inputs)
                return distillation_loss(logits, target, labels, alpha=alpha, temperature=temperature)
            return classifier_loss

        def embedding_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
            inputs = batch[:count]
            with torch.no_grad():
                target = self.teacher(*inputs)
            return (1.0 - F.cosine_similarity(model(*inputs), target, dim=-1)).mean()
        return embedding_loss

    def training_data(self) -> tuple[torch.Tensor, ...]:
        inputs = self.inputs("training")
        if self.data.task != IMAGE_CLASSIFICATION:
            return inputs
        labels = self.labels("training")
        if labels is None:
            raise FailedPrecondition("training images have no labels (an .npz with `labels` is needed to fine-tune "
                                     "or distill an image classifier)", reason="MISSING_CALIBRATION",
                                     field="training_dataset")
        return (*inputs, labels)

    @property
    def finetune_alpha(self) -> float:
        """Fine-tuning (after pruning, in QAT) learns from labels where there are some, else from the teacher."""
        return 0.0 if self.data.task == IMAGE_CLASSIFICATION else 1.0

    def finetune(self, module: nn.Module, training: Training):
        masks = {name: w.detach() != 0 for name, w in prune_masks.prunable_weights(module).items()}
        return train(module, self.training_data(), self.loss(alpha=self.finetune_alpha),
                     training_config(training, self.data.task), masks=masks, device=str(self.device))

    def distill(self, step: DistillStep, module: nn.Module) -> tuple[nn.Module, str]:
        masks = {name: w.detach() != 0 for name, w in prune_masks.prunable_weights(module).items()
                 if bool((w.detach() == 0).any())}
        alpha = step.resolved_alpha(self.data.task)
        report = train(module, self.training_data(), self.loss(step.temperature, alpha),
                       training_config(step.training, self.data.task), masks=masks or None, device=str(self.device))
        return module, f"α={alpha:g}, T={step.temperature:g}: {_loss_note(report.losses)}"

    def qat(self, step: QatStep, module: nn.Module) -> tuple[nn.Module, str]:
        from services.compressor.train.qat import finalize_qat, prepare_qat
        grid = step.quantization.grid()
        masks = {name: w.detach() != 0 for name, w in prune_masks.prunable_weights(module).items()
                 if bool((w.detach() == 0).any())}
        module = prepare_qat(module, grid, activations=step.activations)
        report = train(module, self.training_data(), self.loss(alpha=self.finetune_alpha),
                       training_config(step.training, self.data.task), masks=masks or None, device=str(self.device))
        finalize_qat(module)
        return module, f"weights on {grid.name}: {_loss_note(report.losses)}"

    def save(self, module: nn.Module, out: Path) -> None:
        from shared.models.modules import save_module_dir
        structure = module.structure() if hasattr(module, "structure") else None
        save_module_dir(module, self.like, out, structure=structure)


def _runner(module: nn.Module, input_names: list[str], batch: int = 64) -> Callable[[dict], np.ndarray]:
    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        module.eval()
        count = len(inputs[input_names[0]])
        outputs = []
        with torch.inference_mode():
            for start in range(0, count, batch):
                args = [torch.as_tensor(inputs[name][start:start + batch]) for name in input_names]
                outputs.append(module(*args).float().numpy())
        return np.concatenate(outputs)
    return run


def _n_m_masks(scores: dict[str, torch.Tensor], n: int, m: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """N:M keep-masks along each weight's flattened input columns; layers whose columns do not split into
    groups of m (a 3×3 depthwise kernel has 9) are left dense and named."""
    masks, skipped = {}, []
    for name, score in scores.items():
        matrix = score.reshape(score.shape[0], -1)
        if matrix.shape[1] % m:
            skipped.append(name)
            continue
        masks[name] = prune_masks.n_m_mask(matrix, n, m).reshape(score.shape)
    return masks, skipped


def _skipped_note(skipped: list[str], step: PruneStep) -> str:
    if not skipped:
        return ""
    return (f"{len(skipped)} layers left dense: their {step.m}-wide groups do not divide the input columns "
            f"({', '.join(skipped[:3])}{', …' if len(skipped) > 3 else ''})")


def collect_input_statistics(module: nn.Module, inputs: tuple[torch.Tensor, ...], *, hessians: bool,
                             batch: int = 32) -> dict[str, torch.Tensor]:
    """Per prunable weight name: Σx_j² over every input row (Wanda), or XᵀX (SparseGPT), from forward hooks."""
    stats: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(name: str, layer: nn.Module):
        def hook(_module, args):
            x = args[0].detach().float()
            if isinstance(layer, nn.Conv2d):
                x = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                             stride=layer.stride).transpose(1, 2)
            rows = x.reshape(-1, x.shape[-1])
            value = rows.T @ rows if hessians else (rows * rows).sum(0)
            stats[name] = stats[name] + value if name in stats else value
        return hook

    for module_name, layer in module.named_modules():
        if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1):
            handles.append(layer.register_forward_pre_hook(hook_for(f"{module_name}.weight", layer)))
    try:
        module.eval()
        with torch.inference_mode():
            for start in range(0, len(inputs[0]), batch):
                module(*(t[start:start + batch] for t in inputs))
    finally:
        for handle in handles:
            handle.remove()
    prunable = set(prune_masks.prunable_weights(module))
    return {name: value for name, value in stats.items() if name in prunable}


# ======================================================================================= the runner

def run_transform(source: Path, steps: tuple[TransformStep, ...], data: TransformData, work: Path, out: Path, *,
                  device: str | None = None, progress: Progress | None = None
                  ) -> tuple[list[common_pb2.StepReport], int]:
    """Runs `steps` on the float model at `source`, writes the result to `out`; returns the step reports
    (index 0: the source) and the resulting parameter count."""
    progress = progress or (lambda message: log.info("%s", message))
    target = resolve_device(device)
    family = DecoderTransform if data.task == CAUSAL_LM else ModuleTransform
    runner = family(source, data, work, target, progress)
    current = runner.source if data.task == CAUSAL_LM else _copy_module(runner)
    size = runner.size(current)
    reports = [step_report(0, "source", "float32 source model", size, runner.quality(current), 0.0)]
    previous_dir = None
    for index, step in enumerate(steps, start=1):
        progress(f"step {index}/{len(steps)}: {step.describe()}")
        started = time.perf_counter()
        current, note = runner.run(index, step, current)
        seconds = time.perf_counter() - started
        size = runner.size(current)
        reports.append(step_report(index, step.kind, step.describe(), size, runner.quality(current), seconds, note))
        log.info("transform step %d %s: sparsity %.3f, %d parameters, %s %.4f (%.1f s)", index, step.describe(),
                 size.sparsity, size.parameters, reports[-1].quality.metric, reports[-1].quality.value, seconds)
        if data.task == CAUSAL_LM:
            if previous_dir is not None:
                shutil.rmtree(previous_dir, ignore_errors=True)   # one intermediate LM on disk at a time
            previous_dir = current.path
    _check_finite(reports)
    runner.save(current, out)
    return reports, size.parameters


def _copy_module(runner: ModuleTransform) -> nn.Module:
    """The student starts as the source model (the teacher stays untouched)."""
    import copy
    student = copy.deepcopy(runner.teacher)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    return student


def _check_finite(reports: list[common_pb2.StepReport]) -> None:
    last = reports[-1]
    if not math.isfinite(last.quality.value):
        raise FailedPrecondition(f"the model after step {last.index} ({last.description}) gives non-finite "
                                 f"{last.quality.metric}; training diverged (lower the learning rate)",
                                 reason="VALIDATION_FAILED")


def check_inputs(data: TransformData, steps: tuple[TransformStep, ...]) -> None:
    """Datasets the steps need, before any work."""
    if any(step.calibrated for step in steps) and data.calibration is None:
        raise InvalidArgument("calibration_dataset is required by wanda, sparsegpt and structured pruning",
                              field="calibration_dataset")
