"""A plan: the memory of a model at several recipes, its fit on each device with the headroom left,
the roofline's tokens/s, and the recommended recipe per device. `predict_candidate` is the same
arithmetic for one built artifact, for the report's predicted-beside-measured columns.

Verdicts: fits when at least TIGHT_SHARE of the device's budget stays free, tight when less (a longer
prompt or a second batch may not fit), does not fit when the total exceeds the budget.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

from shared.errors import InvalidArgument
from shared.memory import GIB
from shared.planner import recipe as decision
from shared.planner import roofline
from shared.planner.devices import DeviceProfile, device_profile
from shared.planner.memory import KV_DTYPE_BYTES, MemoryEstimate, activation_bytes, estimate, \
    kv_cache_bytes, parse_recipe, with_assumed_shape
from shared.planner.shape import ModelShape

TIGHT_SHARE = 0.10
DEFAULT_RECIPES = ("f16", "q8_0", "q4_k_m")


@dataclasses.dataclass(frozen=True)
class Settings:
    context: int = 4096              # tokens the KV cache is allocated for
    batch: int = 1                   # sequences decoded together
    prompt_tokens: int = 512         # llama-bench's pp512
    generation_tokens: int = 128     # llama-bench's tg128
    kv_dtype: str = "f16"
    efficiency: float = 1.0          # η: the share of both roofs reached (1.0: the roof, an upper bound)
    overhead_bytes: int | None = None   # runtime overhead; None: the device's default (GPU 512 MiB, CPU 128 MiB)
    quality_budget_pct: float = 1.0  # acceptable quality loss, as a spec's max_quality_loss_pct
    training_compute: bool = False   # whether QAT / distillation is affordable

    def __post_init__(self):
        for name, upper in (("context", 1 << 26), ("batch", 1 << 16), ("prompt_tokens", 1 << 26),
                            ("generation_tokens", 1 << 26)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
                raise InvalidArgument(f"{name} is {str(value)[:40]}; expected a whole number in [1, {upper}]",
                                      field=name)
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise InvalidArgument(f"kv_dtype {self.kv_dtype[:20]!r} is not one of {', '.join(KV_DTYPE_BYTES)}",
                                  field="kv_dtype")
        if not 0 < self.efficiency <= 1:
            raise InvalidArgument(f"efficiency is {self.efficiency}; expected a share in (0, 1]", field="efficiency")
        if self.overhead_bytes is not None and not 0 <= self.overhead_bytes <= 1 << 50:
            raise InvalidArgument(f"overhead is {self.overhead_bytes} bytes; expected 0 or more", field="overhead")
        if not 0 <= self.quality_budget_pct <= 100:
            raise InvalidArgument(f"quality budget {self.quality_budget_pct}% is not in [0, 100]",
                                  field="max_quality_loss_pct")


def verdict(free_bytes: int, budget: int) -> str:
    if free_bytes < 0:
        return "does not fit"
    return "fits" if free_bytes >= TIGHT_SHARE * budget else "tight"


def fit(total_bytes: int, device: DeviceProfile) -> dict:
    free = device.memory_bytes - total_bytes
    return {"total_bytes": total_bytes, "free_bytes": free,
            "free_pct": round(100 * free / device.memory_bytes, 1) if device.memory_bytes else -100.0,
            "verdict": verdict(free, device.memory_bytes)}


class _Device:
    """One device's view of the plan: estimates per recipe (computed on demand), fit, roofline."""

    def __init__(self, shape: ModelShape, device: DeviceProfile, settings: Settings):
        self.shape, self.device, self.settings = shape, device, settings
        self.overhead = device.overhead_bytes if settings.overhead_bytes is None else settings.overhead_bytes
        self._estimates: dict[str, MemoryEstimate] = {}

    def estimate(self, name: str) -> MemoryEstimate:
        if name not in self._estimates:
            s = self.settings
            self._estimates[name] = estimate(self.shape, parse_recipe(name), context=s.context, batch=s.batch,
                                             prompt_tokens=s.prompt_tokens, kv_dtype=s.kv_dtype)
        return self._estimates[name]

    def fit(self, name: str) -> dict:
        return fit(self.estimate(name).model_bytes + self.overhead, self.device)

    def fits(self, name: str) -> bool:
        return self.fit(name)["verdict"] != "does not fit"

    def free(self, name: str) -> str:
        result = self.fit(name)
        return f"{result['free_bytes'] / GIB:.1f} GiB, {result['free_pct']:.0f}% free"

    def max_bits(self) -> float:
        """The most bits a weight (all alike) that leave the KV cache, activations and overhead room."""
        any_estimate = self.estimate("f16")
        room = self.device.memory_bytes - self.overhead - any_estimate.kv_cache - any_estimate.activations
        return 8 * room / self.shape.parameters

    def roofline(self, name: str, weight_bytes: float | None = None) -> dict:
        """Tokens/s at recipe `name`, or for `weight_bytes` of weights when given (a mixed-precision budget)."""
        s = self.settings
        weights = self.estimate(name).weights.total if weight_bytes is None else weight_bytes
        return roofline.throughput(self.shape, weights, self.device, prompt_tokens=s.prompt_tokens,
                                   generation_tokens=s.generation_tokens, batch=s.batch, kv_dtype=s.kv_dtype,
                                   efficiency=s.efficiency)

    def recommend(self) -> decision.Recommendation:
        s = self.settings
        return decision.recommend(self.fits, self.max_bits(), quality_budget_pct=s.quality_budget_pct,
                                  training_compute=s.training_compute, causal_lm=self.shape.causal_lm, free=self.free)


def plan(shape: ModelShape, devices: Iterable[DeviceProfile], settings: Settings = Settings(),
         recipes: Iterable[str] = DEFAULT_RECIPES) -> dict:
    """The whole plan as a JSON-ready dict (what `edgeforge plan --json` prints)."""
    names = list(dict.fromkeys(parse_recipe(name).name for name in recipes))
    if not names:
        raise InvalidArgument("no recipe to plan; give at least one --recipe", field="recipe")
    notes = []
    planned, assumed = with_assumed_shape(shape)
    if assumed:
        notes.append(assumed)
    if planned.decoder is not None and any(name.startswith("int") for name in names):
        notes.append("generic grids (int…) quantize the transformer blocks' linear weights only; embeddings and the "
                     "output head stay float32, as edgeforge's ONNX export stores them")
    if planned.max_context and settings.context > planned.max_context:
        notes.append(f"context {settings.context} exceeds the {planned.max_context} tokens the model was trained for")
    rows = []
    for device in devices:
        view = _Device(planned, device, settings)
        recommendation = view.recommend()
        speeds = {name: view.roofline(name) for name in names}
        shown = _shown_recipe(recommendation) or names[-1]
        if shown.startswith("mixed"):             # GPTQ under a bits-per-weight budget: weights at that budget
            bits = recommendation.candidate["quantization"]["mixed_precision"]["max_bits_per_weight"]
            speeds[shown] = view.roofline(names[-1], planned.parameters * bits / 8)
        elif shown not in speeds:
            speeds[shown] = view.roofline(shown)
        rows.append({**device.to_dict(), "overhead_bytes": view.overhead,
                     "fit": {name: view.fit(name) for name in names}, "roofline": speeds, "roofline_recipe": shown,
                     "max_bits_per_weight": round(view.max_bits(), 3), "recommendation": recommendation.to_dict()})
    memory = [estimate(planned, parse_recipe(name), context=settings.context, batch=settings.batch,
                       prompt_tokens=settings.prompt_tokens, kv_dtype=settings.kv_dtype).to_dict(planned.parameters)
              for name in names]
    return {"model": planned.to_dict(), "settings": dataclasses.asdict(settings), "memory": memory, "devices": rows,
            "notes": notes}


def _shown_recipe(recommendation: decision.Recommendation) -> str:
    """The storage recipe a recommended candidate ends at (what its roofline is computed for)."""
    candidate = recommendation.candidate or {}
    quantization = candidate.get("quantization") or next(
        (step.get("quantize") for step in candidate.get("steps", []) if "quantize" in step), None)
    if quantization is None:
        qat = next((step["qat"]["quantization"] for step in candidate.get("steps", []) if "qat" in step), None)
        return f"int{qat['bits']}-per_channel-sym" if qat else ""
    if quantization.get("mixed_precision"):
        return f"mixed {quantization['mixed_precision']['max_bits_per_weight']:g} bpw"
    return quantization.get("type", "")


def predict_candidate(shape: ModelShape, *, size_bytes: int, attributes: dict[str, str], prompt_tokens: int,
                      generation_tokens: int, batch: int = 1) -> dict:
    """Predicted memory and tokens/s of one built artifact of `size_bytes` on the device with `attributes`.
    memory_bytes = size_bytes + the KV cache for prompt + generation tokens (f16) + activations + the
    device's runtime overhead."""
    if isinstance(size_bytes, bool) or not isinstance(size_bytes, int) or size_bytes <= 0:
        raise InvalidArgument(f"size_bytes is {str(size_bytes)[:40]}; expected a positive whole number",
                              field="size_bytes")
    settings = Settings(context=prompt_tokens + generation_tokens, batch=batch, prompt_tokens=prompt_tokens,
                        generation_tokens=generation_tokens)
    planned, _ = with_assumed_shape(shape)
    device = device_profile(attributes)
    memory = size_bytes + kv_cache_bytes(planned, settings.context, batch) + \
        activation_bytes(planned, prompt_tokens, settings.context, batch) + device.overhead_bytes
    speed = roofline.throughput(planned, size_bytes, device, prompt_tokens=prompt_tokens,
                                generation_tokens=generation_tokens, batch=batch)
    return {"memory_bytes": int(memory), "generation_tokens_per_s": speed["generation_tokens_per_s"],
            "prompt_tokens_per_s": speed["prompt_tokens_per_s"], "bound": speed["bound"], "basis": device.basis}
