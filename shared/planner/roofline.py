"""The roofline model (seed chapter 4) applied to a transformer's prefill and decode.

Per layer, for n new tokens with c tokens already cached, d the model width (the seed's formula is the
c = 0 case with a standard layer of 12·d² weights):

    seed:    24·n·d² + 2·n²·d                    QKV 6nd², output 2nd², MLP (4d) 16nd²; attention 2n²d
    general: 2·n·(weights a token multiplies) + 2·n·(2c + n)·d_attn

2·n·W: every weight is one multiply-add per token. Attention: QKᵀ and the weighted sum of V are each
2·n·(c + n)·d_attn dense; the causal mask halves the new-token block, giving 2·n·(2c + n)·d_attn —
exactly the seed's 2n²d when c = 0. The output head (vocab × d) counts like any weight; the token
embedding is a look-up (no FLOPs) unless it is tied to the head.

Bytes moved: every weight a token multiplies is read once per step whatever the batch (that is why
decode at batch 1 is memory-bound); each sequence also reads its KV cache and writes the new
entries. Prefill reads the weights once for the whole prompt. Activations stay in caches and are
not counted.

    intensity = FLOPs / bytes;  ridge = peak FLOP/s / bandwidth;  memory-bound when intensity < ridge
    time = max(FLOPs / (η·peak), bytes / (η·bandwidth));  tokens/s = tokens / time

η (`efficiency`, default 1.0) scales both roofs: 1.0 gives the roof itself, an upper bound that
measured tokens/s approach from below.

The seed's slip: for one token of a 7B model (d = 4096, 32 layers) 24·1·4096²·32 = 12.9 GFLOP, not
"12.9 TFLOP"; against 14 GB of fp16 weights that is 0.92 FLOP/byte, far below an A100's ridge of 156:
memory-bound (the seed's own 0.04 ms of compute agrees with GFLOP).
"""
from __future__ import annotations

import dataclasses

from shared.planner.devices import DeviceProfile
from shared.planner.memory import KV_DTYPE_BYTES
from shared.planner.shape import ModelShape


def seed_layer_flops(tokens: int, width: int) -> int:
    """The seed's FLOPs of one transformer layer: 24·n·d² + 2·n²·d."""
    return 24 * tokens * width * width + 2 * tokens * tokens * width


@dataclasses.dataclass(frozen=True)
class Roofline:
    flops: float
    bytes_moved: float
    peak_flops: float                # FLOP/s
    bandwidth: float                 # bytes/s
    efficiency: float = 1.0

    @property
    def intensity(self) -> float:
        """FLOP per byte moved."""
        return self.flops / self.bytes_moved

    @property
    def ridge(self) -> float:
        return self.peak_flops / self.bandwidth

    @property
    def bound(self) -> str:
        return "memory" if self.intensity < self.ridge else "compute"

    @property
    def seconds(self) -> float:
        return max(self.flops / (self.efficiency * self.peak_flops),
                   self.bytes_moved / (self.efficiency * self.bandwidth))

    @property
    def achievable_flops(self) -> float:
        """min(peak, intensity × bandwidth), scaled by the efficiency: the height of the roof at this intensity."""
        return self.efficiency * min(self.peak_flops, self.intensity * self.bandwidth)

    def to_dict(self) -> dict:
        return {"flops": self.flops, "bytes": self.bytes_moved, "intensity_flops_per_byte": round(self.intensity, 3),
                "ridge_flops_per_byte": round(self.ridge, 2), "bound": self.bound, "seconds": self.seconds}


def matmul_parameters(shape: ModelShape) -> int:
    """Weights each token multiplies: all but an untied token embedding (a look-up)."""
    return shape.parameters - shape.embedding_parameters


def _weights_read(shape: ModelShape, weight_bytes: float) -> float:
    """Bytes of weights streamed per step: the stored weights in proportion to the ones multiplied."""
    return weight_bytes * matmul_parameters(shape) / shape.parameters


def _kv_bytes_per_token(shape: ModelShape, kv_dtype: str, context: float) -> float:
    """KV bytes one sequence reads at `context` (local layers read at most their window), per token of context."""
    if not shape.causal_lm or not shape.has_kv_shape:
        return 0.0
    per_layer = 2 * shape.kv_heads * shape.head_dim * KV_DTYPE_BYTES[kv_dtype]
    local = min(context, shape.sliding_window) if shape.sliding_window else context
    return per_layer * ((shape.layers - shape.sliding_layers) * context + shape.sliding_layers * local)


def attention_flops(shape: ModelShape, tokens: int, cached: float) -> float:
    """2·n·(2c + n)·d_attn per layer, over the layers (module docstring)."""
    return shape.layers * 2 * tokens * (2 * cached + tokens) * shape.attention_width


def prefill(shape: ModelShape, weight_bytes: float, device: DeviceProfile, *, prompt_tokens: int, batch: int = 1,
            kv_dtype: str = "f16", efficiency: float = 1.0) -> Roofline:
    """Processing a prompt of `prompt_tokens` for each of `batch` sequences from an empty cache."""
    flops = batch * (2 * prompt_tokens * matmul_parameters(shape) + attention_flops(shape, prompt_tokens, 0))
    written = batch * (_kv_bytes_per_token(shape, kv_dtype, prompt_tokens))
    return Roofline(flops, _weights_read(shape, weight_bytes) + written, device.peak_flops,
                    device.bandwidth_bytes_per_s, efficiency)


def decode(shape: ModelShape, weight_bytes: float, device: DeviceProfile, *, context: float, batch: int = 1,
           kv_dtype: str = "f16", efficiency: float = 1.0) -> Roofline:
    """One generation step of `batch` sequences, each with `context` tokens cached."""
    flops = batch * (2 * matmul_parameters(shape) + attention_flops(shape, 1, context))
    kv = batch * (_kv_bytes_per_token(shape, kv_dtype, context) + _kv_bytes_per_token(shape, kv_dtype, 1))
    return Roofline(flops, _weights_read(shape, weight_bytes) + kv, device.peak_flops, device.bandwidth_bytes_per_s,
                    efficiency)


def throughput(shape: ModelShape, weight_bytes: float, device: DeviceProfile, *, prompt_tokens: int,
               generation_tokens: int, batch: int = 1, kv_dtype: str = "f16", efficiency: float = 1.0) -> dict:
    """Prompt and generation tokens/s (all sequences together). Decode is taken at the mean context of the
    generated tokens, prompt + (generation + 1) / 2: its cost grows linearly with the context."""
    first = prefill(shape, weight_bytes, device, prompt_tokens=max(prompt_tokens, 1), batch=batch, kv_dtype=kv_dtype,
                    efficiency=efficiency)
    step = decode(shape, weight_bytes, device, context=prompt_tokens + (generation_tokens + 1) / 2, batch=batch,
                  kv_dtype=kv_dtype, efficiency=efficiency)
    return {"prompt_tokens_per_s": batch * max(prompt_tokens, 1) / first.seconds,
            "generation_tokens_per_s": batch / step.seconds, "prefill": first.to_dict(), "decode": step.to_dict(),
            "bound": step.bound}
