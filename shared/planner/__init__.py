"""`edgeforge plan`: the seed's deployment arithmetic as a tool — weight memory at a recipe (scales
included), KV cache, activations and runtime overhead against device profiles; the roofline's
prefill and decode tokens/s; and the seed's decision tree's recipe (docs/PLANNER.md).

    shape = ModelShape.from_path(Path("model.gguf"))          # or ModelShape(parameters=7_000_000_000)
    document = plan(shape, [CATALOGUE["rtx-4090"]], Settings(context=4096))
    predict_candidate(shape, size_bytes=…, attributes=device.attributes, prompt_tokens=512, generation_tokens=128)
"""
from shared.planner.devices import CATALOGUE, DeviceProfile, catalogue_entry, device_profile
from shared.planner.memory import KV_DTYPE_BYTES, Recipe, activation_bytes, estimate, kv_cache_bytes, parse_recipe, \
    weight_bytes
from shared.planner.plan import DEFAULT_RECIPES, Settings, fit, plan, predict_candidate, verdict
from shared.planner.roofline import Roofline, seed_layer_flops
from shared.planner.shape import ModelShape

__all__ = ["CATALOGUE", "DEFAULT_RECIPES", "DeviceProfile", "KV_DTYPE_BYTES", "ModelShape", "Recipe", "Roofline",
           "Settings", "activation_bytes", "catalogue_entry", "device_profile", "estimate", "fit", "kv_cache_bytes",
           "parse_recipe", "plan", "predict_candidate", "seed_layer_flops", "verdict", "weight_bytes"]
