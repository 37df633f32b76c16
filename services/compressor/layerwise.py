"""Calibrated quantization one decoder block at a time (GPTQ sequential, AWQ, AWQ → GPTQ).

Only one block's float weights and the calibration hidden states (samples, tokens, hidden) are in
memory. For block k:
1. AWQ (when a step asks for it) scales and clips the block's float weights in place.
2. The block's linears are quantized: GPTQ in the block's own order (q/k/v, then o, then gate/up,
   then down), each group's Hessian accumulated from inputs that already pass through the
   quantized earlier groups ("true sequential"); otherwise round-to-nearest of the (scaled) weights.
3. The block's outputs — through the quantized weights for GPTQ, the scaled float weights for AWQ
   alone (as both papers do) — become block k+1's inputs.
Quantized tensors are yielded as soon as their block is done, so a streaming writer keeps peak
memory at one block. The output projection's importance (E[x²] of the final normed hidden states)
is known only after the last block; the plan order puts embeddings and the head last for that.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterator

import numpy as np
import torch

from services.compressor.histogram import WeightHistogram, weight_histogram
from services.compressor.quant.awq import attention_core, awq_block
from services.compressor.quant.gptq import GptqResult, gptq, relative_output_error
from services.compressor.quant.rtn import quantize
from shared.errors import FailedPrecondition
from shared.models import blockwise
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig
from shared.quant.grids import Grid, Method, QuantizationConfig
from shared.quant.qtensor import GgufTensor, QuantizedTensor

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerwiseReport:
    output_error: dict[str, float]           # weight -> relative output error on calibration inputs
    weight_error: dict[str, tuple[float, float]]   # weight -> (Σ(w−ŵ)², Σw²) against the weights quantized
    awq: dict[str, dict]                     # block prefix -> {"alphas", "clip_ratio", "skipped"}
    histograms: dict[str, WeightHistogram] = dataclasses.field(default_factory=dict)   # the model's weights


class HessianAccumulator:
    """H = XᵀX / N over batches of inputs (float64 sum, so long runs do not lose precision)."""

    def __init__(self, features: int, device):
        self.sum = torch.zeros((features, features), dtype=torch.float64, device=device)
        self.energy = torch.zeros(features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).double()
        self.energy += x.pow(2).sum(0).double()
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()

    def importance(self) -> np.ndarray:
        return (self.energy / max(self.count, 1)).float().cpu().numpy()


def check_architecture(config: DecoderConfig, steps: list[QuantizationConfig]) -> None:
    """FailedPrecondition (UNSUPPORTED_ARCH) for what calibrated quantization cannot run: the block-by-block
    methods and the calibrator's statistics drive llama/qwen2 blocks (shared/models/blockwise.py: one
    rotary table, pre-norm residuals, SiLU MLP), so not gemma3; and AWQ folds o_proj's input scales into
    v_proj's rows, which would also have to scale qwen2's v_proj bias."""
    methods = "+".join(step.method.value for step in steps)
    if config.architecture not in blockwise.BLOCKWISE_ARCHITECTURES:
        supported = ", ".join(blockwise.BLOCKWISE_ARCHITECTURES)
        raise FailedPrecondition(f"{methods} calibrates block by block, which supports {supported}, not "
                                 f"architecture {config.architecture!r}; use rtn", reason="UNSUPPORTED_ARCH",
                                 field="quantization")
    if config.qkv_bias and any(step.method is Method.AWQ for step in steps):
        raise FailedPrecondition(f"awq does not support architecture {config.architecture!r} (its v_proj bias); "
                                 "use gptq or rtn", reason="UNSUPPORTED_ARCH", field="quantization")


def _set_weight(linear: torch.nn.Linear, value: torch.Tensor) -> None:
    linear.weight.data = value.to(linear.weight.dtype)


@torch.inference_mode()
def sequential_groups(config: DecoderConfig, block, hidden: torch.Tensor, cos, sin,
                      process_group: Callable[[list[str], HessianAccumulator], None]) -> torch.Tensor:
    """Walks one block's linears group by group in the block's own order — q/k/v (sharing the normed
    input), o, gate/up, down — calling `process_group(names, statistics)` with each group's input
    statistics gathered through the groups already processed ("true sequential": GPTQ quantizes, SparseGPT
    and Wanda prune). Returns the block's outputs through the processed weights."""
    attn, mlp = block.self_attn, block.mlp
    parts = list(blockwise.batches(hidden.shape[0]))
    device = hidden.device
    acc = HessianAccumulator(config.hidden_size, device)
    for part in parts:
        acc.add(block.input_layernorm(hidden[part]))
    process_group(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], acc)
    y = torch.empty(hidden.shape[:2] + (attn.heads * attn.head_dim,), device=device)   # (S, T, heads·hd)
    acc = HessianAccumulator(y.shape[-1], device)
    for part in parts:
        y[part] = attention_core(attn, block.input_layernorm(hidden[part]), cos, sin)
        acc.add(y[part])
    process_group(["self_attn.o_proj"], acc)
    h2 = torch.empty_like(hidden)
    acc = HessianAccumulator(config.hidden_size, device)
    for part in parts:
        h2[part] = hidden[part] + attn.o_proj(y[part])
        acc.add(block.post_attention_layernorm(h2[part]))
    del y
    process_group(["mlp.gate_proj", "mlp.up_proj"], acc)
    activations = torch.empty(hidden.shape[:2] + (config.intermediate_size,), device=device)   # (S, T, ffn)
    acc = HessianAccumulator(config.intermediate_size, device)
    for part in parts:
        x2 = block.post_attention_layernorm(h2[part])
        activations[part] = torch.nn.functional.silu(mlp.gate_proj(x2)) * mlp.up_proj(x2)
        acc.add(activations[part])
    process_group(["mlp.down_proj"], acc)
    for part in parts:
        h2[part] += mlp.down_proj(activations[part])
    return h2



class LayerwiseQuantizer:
    def __init__(self, model: ModelDir, grids: dict[str, Grid | None], steps: list[QuantizationConfig],
                 sequences: torch.Tensor, device: str | torch.device = "cpu",
                 progress: Callable[[str], None] | None = None):
        self.model, self.grids, self.steps = model, grids, steps
        self.final = steps[-1]
        self.sequences = sequences
        self.device = torch.device(device)
        self.progress = progress or (lambda message: None)
        self.report = LayerwiseReport({}, {}, {})

    def grid_of(self, name: str) -> Grid:
        return self.grids[name]

    def _quantize(self, name: str, W: torch.Tensor, H: torch.Tensor | None,
                  importance: np.ndarray | None = None) -> tuple[QuantizedTensor | GgufTensor, torch.Tensor]:
        grid = self.grids[name]
        if self.final.method is Method.GPTQ:
            result: GptqResult = gptq(W, H, grid, self.final.gptq, name)
            self.report.output_error[name] = result.output_error
            tensor, dequantized = result.tensor, result.dequantized
        else:
            use = importance if self.final.method is Method.IMATRIX else None
            tensor = quantize(W.detach().cpu().numpy(), grid, use)
            dequantized = torch.from_numpy(tensor.dequantize()).to(self.device)
            if H is not None:
                self.report.output_error[name] = relative_output_error(W.float(), dequantized, H)
        self.report.weight_error[name] = (float((W.float() - dequantized).pow(2).sum()), float(W.float().pow(2).sum()))
        return tensor, dequantized

    # ------------------------------------------------------------------------------- one block
    @torch.inference_mode()
    def _block(self, index: int, hidden: torch.Tensor, cos, sin) -> tuple[dict, torch.Tensor]:
        config = self.model.config
        prefix = blockwise.block_prefix(index)
        block = blockwise.load_block(config, index, self.model.tensor, self.device)
        for name, parameter in block.named_parameters():     # the model's weights, before AWQ rescales them
            if self.grids.get(prefix + name) is not None:
                self.report.histograms[prefix + name] = weight_histogram(prefix + name, parameter.data)
        for step in self.steps:
            if step.method is Method.AWQ:
                options = step.awq
                if self.final.method is Method.GPTQ:        # GPTQ compensates rounding itself; weights clipped
                    options = dataclasses.replace(options, clip=False)   # for RTN would be its (wrong) target
                report = awq_block(block, hidden, cos, sin, lambda n: self.grids[n], options, prefix)
                self.report.awq[prefix] = dataclasses.asdict(report)
        propagate_float = self.final.method is not Method.GPTQ      # AWQ/RTN: the next block sees float outputs
        float_weights = {k: v.clone() for k, v in block.state_dict().items()} if propagate_float else None
        out: dict[str, object] = {}

        def quantize_group(suffixes: list[str], accumulator: HessianAccumulator | None) -> None:
            H = accumulator.hessian() if accumulator is not None else None
            importance = accumulator.importance() if accumulator is not None else None
            for suffix in suffixes:
                linear = dict(block.named_modules())[suffix]
                name = f"{prefix}{suffix}.weight"
                tensor, dequantized = self._quantize(name, linear.weight.data, H, importance)
                out[name] = tensor
                _set_weight(linear, dequantized)

        h2 = sequential_groups(config, block, hidden, cos, sin, quantize_group)
        for name, parameter in block.named_parameters():     # norms (AWQ may have scaled them), qwen2's biases
            if f"{prefix}{name}" not in out:
                out[f"{prefix}{name}"] = parameter.data.cpu().numpy().copy()
        if float_weights is not None:                   # AWQ/RTN: the next block sees the float block's outputs
            block.load_state_dict(float_weights, assign=True)
            return out, blockwise.run_block(block, hidden, cos, sin)
        return out, h2                                  # GPTQ: outputs through every quantized linear

    # ------------------------------------------------------------------------------- whole model
    def tensors(self, order: list[str]) -> Iterator[tuple[str, np.ndarray | QuantizedTensor | GgufTensor]]:
        """Yields every tensor of `order` (blocks first, then embeddings, final norm and head)."""
        config = self.model.config
        T = self.sequences.shape[1]
        cos, sin = blockwise.rotary(config, T, self.device)
        hidden = blockwise.embed(self.model, self.sequences, self.device)
        produced: dict[str, object] = {}
        position = 0
        for index in range(config.num_hidden_layers):
            self.progress(f"block {index + 1}/{config.num_hidden_layers}")
            out, hidden = self._block(index, hidden, cos, sin)
            produced.update(out)
            while position < len(order) and order[position] in produced:
                yield order[position], produced.pop(order[position])
                position += 1
        norm = torch.from_numpy(self.model.array("model.norm.weight")).to(self.device)
        final = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * norm
        head_importance = final.reshape(-1, final.shape[-1]).double().pow(2).mean(0).float().cpu().numpy()
        del hidden, final
        for name in order[position:]:
            grid = self.grids.get(name)
            weight = self.model.array(name)
            if grid is None:
                yield name, weight
                continue
            is_head = name == "lm_head.weight" or (config.tie_word_embeddings and name == "model.embed_tokens.weight")
            use = head_importance if is_head and self.final.method in (Method.IMATRIX, Method.GPTQ) else None
            yield name, quantize(weight, grid, use)
