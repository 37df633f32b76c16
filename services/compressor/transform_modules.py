"""Transform steps on image classifiers and encoders (module bundles, shared/models/modules.py), in memory:
magnitude / N:M / Wanda / SparseGPT / structured / iterative pruning, fine-tuning with the zeros held,
distillation (logits with labels, embeddings without) and QAT."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.compressor.histogram import (LARGEST_PRUNED, MAGNITUDE, WeightHistogram, global_threshold,
                                           pruning_histogram, removal_histogram)
from services.compressor.prune import masks as prune_masks
from services.compressor.steps import IMAGE_CLASSIFICATION, DistillStep, PruneStep, QatStep, Training, TransformStep
from services.compressor.train.loop import train
from services.compressor.transform import Progress, Size, TransformData, loss_note, measure_size, training_config
from shared.errors import FailedPrecondition


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

    def student(self) -> nn.Module:
        """The student starts as a copy of the source model (the teacher stays untouched)."""
        student = copy.deepcopy(self.teacher)
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        return student

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
    def run(self, index: int, step: TransformStep, module: nn.Module
            ) -> tuple[nn.Module, str, list[WeightHistogram]]:
        """The model after `step`, a note for humans, and (prune steps) the pruned tensors' histograms."""
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
            return *self.distill(step, module), []
        return *self.qat(step, module), []

    def prune(self, step: PruneStep, module: nn.Module) -> tuple[nn.Module, str, list[WeightHistogram]]:
        # The prunable weights as they were, for the histograms: these models live in memory and are
        # small (MobileNetV2: 3.5M parameters), and one snapshot serves every method alike.
        original = {name: w.detach().clone() for name, w in prune_masks.prunable_weights(module).items()}
        note = ""
        if step.method == "structured":
            from services.compressor.prune.structured import prune_structured
            before = sum(p.numel() for p in module.parameters())
            module = prune_structured(module, step.unit, step.sparsity)
            note = f"{before:,} → {sum(p.numel() for p in module.parameters()):,} parameters"
        elif step.schedule:
            module, note = self.iterative(step, module)
            return module, note, _pruning_histograms(step, original, module)
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
        histograms = _pruning_histograms(step, original, module)     # before fine-tuning moves the kept weights
        if step.finetune:
            report = self.finetune(module, step.finetune)
            note = "; ".join(filter(None, [note, f"fine-tuned: {loss_note(report.losses)}"]))
        return module, note, histograms

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
        return module, "; ".join(f"{100 * r.sparsity:g}%: {loss_note(r.training.losses)}" for r in results)

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
        return module, f"α={alpha:g}, T={step.temperature:g}: {loss_note(report.losses)}"

    def qat(self, step: QatStep, module: nn.Module) -> tuple[nn.Module, str]:
        from services.compressor.train.qat import finalize_qat, prepare_qat
        grid = step.quantization.grid()
        masks = {name: w.detach() != 0 for name, w in prune_masks.prunable_weights(module).items()
                 if bool((w.detach() == 0).any())}
        module = prepare_qat(module, grid, activations=step.activations)
        report = train(module, self.training_data(), self.loss(alpha=self.finetune_alpha),
                       training_config(step.training, self.data.task), masks=masks or None, device=str(self.device))
        finalize_qat(module)
        return module, f"weights on {grid.name}: {loss_note(report.losses)}"

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


def _pruning_histograms(step: PruneStep, before: dict[str, torch.Tensor],
                        module: nn.Module) -> list[WeightHistogram]:
    """Histograms of the tensors the step pruned, from their weights `before` it: what is zero in the
    pruned module was pruned. The cut is one |w| only for one-shot unstructured magnitude pruning."""
    after = {name: w.detach() for name, w in prune_masks.prunable_weights(module).items()}
    if step.method == "structured":
        histograms = [removal_histogram(name, w, after[name].numel() if name in after else 0)
                      for name, w in before.items()]
        return [h for h in histograms if h.pruned_fraction > 0]
    cut = MAGNITUDE if step.method == "magnitude" and not step.m and not step.schedule else LARGEST_PRUNED
    histograms = [pruning_histogram(name, w, after[name] != 0, cut) for name, w in before.items()]
    histograms = [h for h in histograms if h.pruned_fraction > 0]             # e.g. layers N:M had to skip
    return global_threshold(histograms) if cut == MAGNITUDE and step.scope == "global" else histograms


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
