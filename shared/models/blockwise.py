"""Running a llama one decoder block at a time over calibration sequences.

Calibration (statistics) and the calibrated quantizers (GPTQ, AWQ) never hold the whole model or
the whole model's activations: the hidden states of every calibration sequence after block k,
(samples, tokens, hidden), are all that is kept, and only block k's weights are loaded. For GPTQ
the hidden states come from the already-quantized blocks (sequential calibration).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from shared.models.bundle import ModelDir
from shared.models.llama import DecoderLayer
from shared.models.decoder_config import DecoderConfig

BLOCKWISE_ARCHITECTURES = ("llama", "qwen2")      # blocks this module runs (gemma3: sliding windows, 4 norms)
BATCH = 8                       # sequences per forward pass


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


def load_block(config: DecoderConfig, index: int, read: Callable[[str], torch.Tensor],
               device: str | torch.device = "cpu") -> DecoderLayer:
    """Decoder block `index` with float32 weights from `read(hf_name)`."""
    with torch.device("meta"):
        block = DecoderLayer(config)
    prefix = block_prefix(index)
    state = {name: read(prefix + name).to(device) for name, _ in block.named_parameters()}
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval()


def rotary(config: DecoderConfig, tokens: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (tokens, head_dim) as the reference computes them."""
    inv_freq = (1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float64)
                                             / config.head_dim))).float()
    angles = torch.outer(torch.arange(tokens, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def embed(model: ModelDir, sequences: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """(samples, tokens) int64 -> input hidden states of block 0, (samples, tokens, hidden) float32."""
    table = model.tensor("model.embed_tokens.weight")
    return torch.nn.functional.embedding(sequences, table).to(device)


def batches(count: int, batch: int = BATCH) -> Iterator[slice]:
    for start in range(0, count, batch):
        yield slice(start, min(count, start + batch))


@torch.inference_mode()
def run_block(block: torch.nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              batch: int = BATCH) -> torch.Tensor:
    """Block outputs for every sequence, computed `batch` sequences at a time."""
    out = torch.empty_like(hidden)
    for part in batches(hidden.shape[0], batch):
        out[part] = block(hidden[part], cos, sin)
    return out


class InputCapture:
    """Forward pre-hooks on named submodules that hand each input (flattened to (tokens, features))
    to `observe(name, x)`; use as a context manager around forward passes."""

    def __init__(self, block: torch.nn.Module, names: list[str], observe: Callable[[str, torch.Tensor], None]):
        modules = dict(block.named_modules())
        self.handles = [modules[name].register_forward_pre_hook(self._hook(name)) for name in names]
        self.observe = observe

    def _hook(self, name: str):
        def hook(_module, inputs):
            x = inputs[0]
            self.observe(name, x.detach().reshape(-1, x.shape[-1]))
        return hook

    def __enter__(self) -> "InputCapture":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


# Linear layers of a block grouped by the input they share, with the op that produces that input.
# AWQ folds scales into `producer`; GPTQ accumulates one Hessian per group.
INPUT_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
PRODUCERS = {"self_attn.q_proj": "input_layernorm", "self_attn.o_proj": "self_attn.v_proj",
             "mlp.gate_proj": "post_attention_layernorm", "mlp.down_proj": "mlp.up_proj"}
