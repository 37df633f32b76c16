"""Transform steps on a causal LM (a decoder bundle, shared/models/bundle.ModelDir): pruning block by
block (services/compressor/prune/decoder.py) and logit distillation; each step writes a new directory."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from services.compressor.steps import CAUSAL_LM, DistillStep, PruneStep, TransformStep
from services.compressor.transform import Progress, Size, TransformData, loss_note, measure_size, training_config
from shared.errors import FailedPrecondition


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

    def run(self, index: int, step: TransformStep, current) -> tuple[object, str, list]:
        """The model after `step`, a note for humans, and (prune steps) the pruned tensors' histograms."""
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
            return ModelDir(out), note, report.histograms
        if isinstance(step, DistillStep):
            return *self.distill(step, current, out), []
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
        return ModelDir(out), loss_note(report.losses)

    def save(self, current, out: Path) -> None:
        shutil.copytree(current.path, out)


def _is_block_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


