"""AWQ on a real decoder block (SmolLM2's block 0 with real calibration text): folding the scales into the
preceding ops leaves the float block unchanged, the search lowers the quantized block's output error, and
the clipping search never makes a linear's output error worse."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from services.compressor.quant.awq import awq_block, clip_search, qdq
from shared.models import blockwise
from shared.models.bundle import ModelDir
from shared.models.tokenizer import TextTokenizer
from shared.quant.grids import AwqOptions, Granularity, Grid

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def block0(smollm2_dir, assets):
    model = ModelDir(smollm2_dir)
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    ids = tokenizer.encode((Path(assets) / "data" / "calib.txt").read_text()[:40_000])
    T = 128
    sequences = torch.tensor([[tokenizer.bos_id] + ids[i * (T - 1):(i + 1) * (T - 1)] for i in range(8)])
    hidden = blockwise.embed(model, sequences)
    cos, sin = blockwise.rotary(model.config, T)
    return blockwise.load_block(model.config, 0, model.tensor), hidden, cos, sin


def _quantized(block, grid):
    q = copy.deepcopy(block)
    modules = dict(q.named_modules())
    for name in LINEARS:
        modules[name].weight.data = qdq(modules[name].weight.data, grid)
    return q


def _error(block, reference, hidden, cos, sin) -> float:
    with torch.inference_mode():
        return float((block(hidden, cos, sin) - reference).pow(2).mean())


def test_folded_scales_leave_the_float_block_unchanged(block0):
    block, hidden, cos, sin = block0
    scaled = copy.deepcopy(block)
    awq_block(scaled, hidden, cos, sin, lambda name: Grid(4, Granularity.PER_GROUP, 64), AwqOptions(clip=False),
              "model.layers.0.")
    with torch.inference_mode():
        before, after = block(hidden, cos, sin), scaled(hidden, cos, sin)
    assert not torch.equal(scaled.input_layernorm.weight, block.input_layernorm.weight)   # something was folded
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("grid", [Grid(4, Granularity.PER_GROUP, 64), Grid(3, Granularity.PER_GROUP, 64)],
                         ids=lambda g: g.name)
def test_awq_lowers_the_quantized_block_output_error(block0, grid):
    block, hidden, cos, sin = block0
    with torch.inference_mode():
        reference = block(hidden, cos, sin)
    scaled = copy.deepcopy(block)
    report = awq_block(scaled, hidden, cos, sin, lambda name: grid, AwqOptions(), "model.layers.0.")
    rtn_error = _error(_quantized(block, grid), reference, hidden, cos, sin)
    awq_error = _error(_quantized(scaled, grid), reference, hidden, cos, sin)
    assert awq_error < rtn_error
    assert set(report.alphas) >= {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}
    assert any("grouped-query" in reason for reason in report.skipped)   # SmolLM2: 9 heads share 3 KV heads


def test_clip_search_never_worse_than_no_clipping(block0):
    block, hidden, _, _ = block0
    W = block.mlp.up_proj.weight.data
    x = block.post_attention_layernorm(hidden).reshape(-1, W.shape[1])[:256]
    grid = Grid(3, Granularity.PER_GROUP, 64)
    clipped, ratio = clip_search(W, x, grid)
    plain = (x @ qdq(W, grid).T - x @ W.T).pow(2).mean()
    after = (x @ qdq(clipped, grid).T - x @ W.T).pow(2).mean()
    assert after <= plain and 0.5 <= ratio <= 1.0
