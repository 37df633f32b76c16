"""The seed's compression decision tree (chapter 9), as a candidate a spec can take verbatim.

    no training compute → PTQ path:  INT8 fits? → INT8.  No → GPTQ/AWQ INT4.
    training compute    → QAT path:  accuracy critical? → QAT + distillation.  Memory only → QAT alone.
    need > 10× compression (below 3.2 bits a weight against FP32) → distill to a smaller architecture, then quantize.

Typical quality costs (the seed's cheat sheet; always measure on your own task): FP16 ~0%, INT8 PTQ
0.1–0.5%, INT4 AWQ 0.5–2%, INT4 GPTQ 1–3%, distillation 2–10%, QAT 0.5–1% better than PTQ.
Candidates use docs/SPEC.md's vocabulary; causal LMs have no `qat` step at this version, so their
QAT path is distillation towards the float model followed by quantization.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

FP32_BITS = 32
ARCHITECTURE_COMPRESSION = 10       # the seed: beyond 10× compression, change the architecture first
INT8_LOSS, AWQ_LOSS, GPTQ_LOSS = (0.1, 0.5), (0.5, 2.0), (1.0, 3.0)     # typical quality loss, % (seed ch. 9)


@dataclasses.dataclass(frozen=True)
class Recommendation:
    path: str                        # "ptq" | "qat" | "architecture" | "none"
    candidate_id: str                # the id the coordinator derives for `candidate` ("" when there is none)
    candidate: dict | None           # a `candidates[]` entry of a build spec
    why: str                         # one line

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _gguf(quantization: dict) -> dict:
    return {"format": "gguf", "quantization": quantization}


def recommend(fits: Callable[[str], bool], max_bits: float, *, quality_budget_pct: float, training_compute: bool,
              causal_lm: bool = True, free: Callable[[str], str] = lambda name: "") -> Recommendation:
    """`fits(recipe)`: whether the model at that recipe fits the device; `max_bits`: the most bits per weight
    that would still fit (all weights alike); `free(recipe)`: a short "x GiB free" phrase for the why."""
    if max_bits * ARCHITECTURE_COMPRESSION < FP32_BITS:
        return _architecture(max_bits, causal_lm)
    if training_compute:
        return _qat(fits, max_bits, quality_budget_pct, causal_lm)
    if quality_budget_pct < INT8_LOSS[0] and fits("f16"):
        return Recommendation("ptq", "gguf-f16", _gguf({"method": "none", "type": "f16"}),
                              f"FP16 fits ({free('f16')}) and the {quality_budget_pct:g}% quality budget is below "
                              f"INT8's typical {INT8_LOSS[0]}–{INT8_LOSS[1]}% loss")
    if fits("q8_0"):
        return Recommendation("ptq", "gguf-q8_0", _gguf({"method": "rtn", "type": "q8_0"}),
                              f"INT8 fits ({free('q8_0')}): PTQ INT8 typically costs {INT8_LOSS[0]}–{INT8_LOSS[1]}% "
                              "and needs no training")
    if fits("q4_k_m"):
        caveat = "" if quality_budget_pct >= AWQ_LOSS[0] else \
            f"; even AWQ typically loses ≥ {AWQ_LOSS[0]}%, over the budget: with training compute, distil " \
            "after quantizing"
        if quality_budget_pct < AWQ_LOSS[1]:
            return Recommendation("ptq", "gguf-q4_k-awq", _gguf({"method": "awq", "type": "q4_k"}),
                                  f"INT8 does not fit, INT4 does ({free('q4_k')}); AWQ's typical {AWQ_LOSS[0]}–"
                                  f"{AWQ_LOSS[1]}% loss suits a {quality_budget_pct:g}% budget better than GPTQ's "
                                  f"{GPTQ_LOSS[0]}–{GPTQ_LOSS[1]}%" + caveat)
        return Recommendation("ptq", "gguf-q4_k_m-gptq", _gguf({"method": "gptq", "type": "q4_k_m"}),
                              f"INT8 does not fit, INT4 does ({free('q4_k_m')}); GPTQ's typical {GPTQ_LOSS[0]}–"
                              f"{GPTQ_LOSS[1]}% loss is within the {quality_budget_pct:g}% budget")
    return _mixed(max_bits)


def _mixed(max_bits: float) -> Recommendation:
    """Below 4 bits but within 10×: GPTQ with a per-layer bit allocation under the budget that fits."""
    budget = math.floor(max_bits * 20) / 20                 # a 0.05-bit step below what fits
    options = ["q3_k", "q4_k", "q6_k"] if budget >= 3.4375 else ["q2_k", "q3_k", "q4_k"]
    quantization = {"method": "gptq", "type": "q4_k",
                    "mixed_precision": {"options": options, "max_bits_per_weight": budget}}
    return Recommendation("ptq", "gguf-q4_k-gptq-mixed", _gguf(quantization),
                          f"INT4 (q4_k_m, ~4.8 bits a weight) does not fit; {max_bits:.2f} bits a weight would: "
                          "GPTQ with mixed precision "
                          f"({'/'.join(options)}) under {budget:g} bits a weight")


def _qat(fits: Callable[[str], bool], max_bits: float, quality_budget_pct: float, causal_lm: bool) -> Recommendation:
    critical = quality_budget_pct < 1.0
    if causal_lm:
        grid = "q8_0" if fits("q8_0") else "q4_k_m" if fits("q4_k_m") else None
        if grid is None:
            return _mixed(max_bits)
        method = "rtn" if grid == "q8_0" else "gptq"
        steps = ([{"distill": {}}] if critical else []) + [{"quantize": {"method": method, "type": grid}}]
        if not critical:
            return Recommendation("qat", f"gguf-{grid}" + ("" if method == "rtn" else "-gptq"),
                                  _gguf({"method": method, "type": grid}),
                                  "memory is the only concern and causal LMs have no qat step here: quantize "
                                  f"post-training at {grid}")
        return Recommendation("qat", f"gguf-distill-{grid}" + ("" if method == "rtn" else "-gptq"),
                              {"format": "gguf", "steps": steps},
                              f"accuracy is critical ({quality_budget_pct:g}% budget) and there is training compute: "
                              f"distil towards the float model, then quantize at {grid} (causal LMs have no qat step)")
    bits = 8 if fits("int8-per_channel-sym") else 4
    grid = {"bits": bits, "granularity": "per_channel"}
    steps = ([{"distill": {}}] if critical else []) + [{"qat": {"quantization": grid}}]
    prefix = "distill-" if critical else ""
    return Recommendation("qat", f"onnx-{prefix}qat-int{bits}-per_channel-sym", {"format": "onnx", "steps": steps},
                          ("QAT + distillation: accuracy is critical" if critical else "QAT alone: memory is the "
                           "only concern") + f"; INT{bits} is the widest grid that fits")


def _architecture(max_bits: float, causal_lm: bool) -> Recommendation:
    if max_bits <= 0:
        return Recommendation("none", "", None, "the KV cache, activations and runtime alone exceed the device's "
                              "memory: shorten the context or the batch, or quantize the KV cache (--kv-dtype q8_0)")
    return Recommendation("architecture", "", None,
                          f"only {max_bits:.2f} bits a weight would fit: {FP32_BITS / max_bits:.0f}× compression "
                          f"against FP32 is past the seed's {ARCHITECTURE_COMPRESSION}×: distil into a smaller "
                          "architecture first (a structured-prune + distill pipeline, or a smaller released model), "
                          "then quantize")
