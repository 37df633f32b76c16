"""shared/planner: the seed's worked examples as requirements, its slips corrected, real models by path.

Units: the seed's table says "GB" and means 10⁹ bytes (70B × 4 bytes = 280 GB); its code and nvidia-smi
use GiB (2³⁰: 260.8). Both are checked. Every number below is derived in the test from first principles.
"""
from __future__ import annotations

import json
import shutil

import pytest

from shared.errors import InvalidArgument
from shared.memory import GIB, group_overhead_bits
from shared.planner import CATALOGUE, ModelShape, Roofline, Settings, device_profile, estimate, kv_cache_bytes, \
    parse_recipe, plan, predict_candidate, seed_layer_flops, weight_bytes
from shared.planner import roofline
from shared.planner.recipe import recommend

LLAMA2_7B = ModelShape(parameters=6_738_415_616, layers=32, hidden=4096, heads=32, kv_heads=32, vocab=32000,
                       max_context=4096, intermediate=11008)
LLAMA2_13B = ModelShape(parameters=13_015_864_320, layers=40, hidden=5120, heads=40, kv_heads=40, vocab=32000,
                        max_context=4096, intermediate=13824)


def _weights(parameters: float, recipe: str) -> int:
    return weight_bytes(ModelShape(parameters=int(parameters)), parse_recipe(recipe)).total


# ------------------------------------------------------------------ memory: the seed's chapter 0

@pytest.mark.parametrize("recipe, decimal_gb, binary_gib", [
    ("f32", 280, 260.8), ("f16", 140, 130.4), ("int8-per_tensor-sym", 70, 65.2), ("int4-per_tensor-sym", 35, 32.6)])
def test_seed_70b_table_in_both_units(recipe, decimal_gb, binary_gib):
    """The seed's table (decimal GB: 280/140/70/35) and its code's output (GiB: 260.8/130.4/65.2/32.6)."""
    total = _weights(70e9, recipe)
    assert total == decimal_gb * 10**9
    assert round(total / GIB, 1) == binary_gib


def test_7b_fp16_is_13_04_gib():
    assert round(_weights(7e9, "f16") / GIB, 2) == 13.04          # 14 GB decimal, as nvidia-smi shows it


def test_group_scale_overhead():
    """One fp16 scale per 128 weights = 16/128 = 0.125 bit/weight; edgeforge's asymmetric grids add a uint8
    zero point (24/128); llama.cpp's blocks carry theirs: q4_0 18 bytes/32 = 4.5 bit, q8_0 8.5, q4_k 4.5,
    q6_k 210 bytes/256 = 6.5625."""
    assert group_overhead_bits(128) == 0.125
    parameters = 10**9
    assert _weights(parameters, "int4-g128-sym") == parameters * 4.125 / 8
    assert _weights(parameters, "int4-g128-asym") == parameters * (4 + 24 / 128) / 8
    for recipe, bits in (("q4_0", 4.5), ("q8_0", 8.5), ("q4_1", 5.0), ("q4_k", 4.5), ("q5_k", 5.5), ("q6_k", 6.5625),
                         ("q2_k", 2.625), ("q3_k", 3.4375)):
        assert _weights(parameters, recipe) == parameters * bits / 8, recipe
    scales = weight_bytes(ModelShape(parameters=parameters), parse_recipe("int4-g128-sym")).scales
    assert scales == parameters * 0.125 / 8


def test_seed_slip_13b_int4_g128_scales_are_0_2_gb_not_1_gb():
    """Seed ch. 9 design challenge: "AWQ INT4 g128 → ~7.5 GB weights + ~1 GB scales". The fp16 scales of
    13B weights in groups of 128 are 13e9 × 0.125 / 8 = 0.20 GB, five times less; codes 6.5 GB."""
    parameters = 13e9
    bytes_ = weight_bytes(ModelShape(parameters=int(parameters)), parse_recipe("int4-g128-sym"))
    assert bytes_.scales == pytest.approx(0.203e9, rel=0.01)
    assert bytes_.total - bytes_.scales == 6.5e9


def test_seed_slip_70b_int4_g128_scales_are_1_1_gb_not_5_gb():
    """Seed ch. 7 scenario: "INT4 GPTQ (group=128) 35 GB + 5 GB scales": 70e9 × 0.125 / 8 = 1.09 GB."""
    assert weight_bytes(ModelShape(parameters=70 * 10**9), parse_recipe("int4-g128-sym")).scales == 1.09375e9


def test_kv_cache_llama2_7b_4096_fp16_is_2_gib():
    """2 × 32 layers × 32 KV heads × 128 × 4096 tokens × 2 bytes = 2³¹ bytes."""
    assert kv_cache_bytes(LLAMA2_7B, 4096, 1, "f16") == 2 * GIB
    assert kv_cache_bytes(LLAMA2_7B, 4096, 4, "f16") == 8 * GIB
    assert kv_cache_bytes(LLAMA2_7B, 4096, 1, "q8_0") == 2 * GIB * 34 / 32 / 2


def test_seed_slip_13b_kv_for_8k_context():
    """Seed ch. 9: 15.5 GB left "supporting ~8K context at FP16". Llama-2-13B keeps 2 × 40 × 40 × 128 × 2 =
    819,200 bytes a token, so 8K tokens take 6.25 GiB and 15.5 GB holds ~18.9K tokens."""
    per_token = kv_cache_bytes(LLAMA2_13B, 1)
    assert per_token == 819_200
    assert kv_cache_bytes(LLAMA2_13B, 8192) == 6.25 * GIB
    assert 15.5e9 // per_token == 18920


def test_gqa_and_sliding_window_shrink_the_cache():
    shape = ModelShape(parameters=268_098_176, layers=18, hidden=640, heads=4, kv_heads=1, head_dim=256,
                       sliding_window=512, sliding_layers=15)
    # 3 global layers keep the whole context, 15 local ones only 512 tokens
    assert kv_cache_bytes(shape, 4096) == 2 * 1 * 256 * 2 * (3 * 4096 + 15 * 512)


# ------------------------------------------------------------------ roofline: the seed's chapter 4

def test_seed_slip_one_token_of_7b_is_12_9_gflop_and_memory_bound():
    """The seed writes "12.9 TFLOP"; 24·1·4096²·32 = 12.88e9 FLOP (GFLOP). Against 14 GB of fp16 weights:
    0.92 FLOP/byte, below the A100's ridge of 312/2 = 156 FLOP/byte: memory-bound, 7 ms of reading vs
    0.041 ms of arithmetic (the seed's own 0.04 ms agrees with GFLOP, not TFLOP)."""
    flops = 32 * seed_layer_flops(1, 4096) - 32 * 2 * 4096      # drop the n²d term: the seed's 24nd² alone
    assert flops == 12_884_901_888
    point = Roofline(flops, 14e9, 312e12, 2e12)
    assert round(point.intensity, 2) == 0.92 and point.ridge == 156
    assert point.bound == "memory"
    assert point.seconds == pytest.approx(7e-3)
    assert flops / 312e12 == pytest.approx(0.0413e-3, rel=1e-3)
    # the seed's code as printed, with 12.9e12, is compute-bound at 921 FLOP/byte: not its printed output
    assert Roofline(12.9e12, 14e9, 312e12, 2e12).bound == "compute"


def test_seed_quiz_is_compute_bound():
    """10 TFLOP over 5 GB = 2000 FLOP/byte > ridge 156 → compute-bound."""
    point = Roofline(10e12, 5e9, 312e12, 2e12)
    assert point.intensity == 2000 and point.bound == "compute"
    assert point.achievable_flops == 312e12


def test_seed_slip_300_flop_per_byte_is_the_h100_not_the_a100():
    """Seed ch. 4: "Modern GPUs can do ~300 FLOPS/byte" — the H100 SXM's ridge (989.4 / 3.35 = 295); the A100 the
    chapter computes with has 312 / 2.039 = 153."""
    assert round(CATALOGUE["h100-sxm-80gb"].ridge_flops_per_byte) == 295
    assert round(CATALOGUE["a100-80gb"].ridge_flops_per_byte) == 153


def test_general_flops_reduce_to_the_seeds_formula():
    """A standard layer holds 12·d² weights; with no vocabulary the planner's 2·n·W + 2·n²·d_attn is the seed's
    24nd² + 2n²d."""
    d, layers = 4096, 32
    shape = ModelShape(parameters=12 * d * d * layers, layers=layers, hidden=d, heads=32)
    for n in (1, 7, 512):
        point = roofline.prefill(shape, 2 * shape.parameters, CATALOGUE["a100-80gb"], prompt_tokens=n)
        assert point.flops == layers * seed_layer_flops(n, d)


def test_decode_is_memory_bound_at_batch_1_and_batching_moves_it_up_the_roof():
    weights = _weights(LLAMA2_7B.parameters, "f16")
    a100 = CATALOGUE["a100-80gb"]
    single = roofline.decode(LLAMA2_7B, weights, a100, context=512)
    many = roofline.decode(LLAMA2_7B, weights, a100, context=512, batch=256)
    assert single.bound == "memory" and single.intensity < 1.0
    # 256 sequences share each weight read, but every one reads its own 256 MiB of KV cache (MHA, 512 tokens):
    # intensity grows ~43×, not 256×
    assert 40 * single.intensity < many.intensity < 256 * single.intensity
    short = roofline.decode(LLAMA2_7B, weights, a100, context=8, batch=256)
    assert short.intensity > 200 * single.intensity and short.bound == "compute"
    # at batch 1 the bandwidth roof gives tokens/s ≈ bandwidth / bytes read (weights less the embedding look-up)
    speed = roofline.throughput(LLAMA2_7B, weights, a100, prompt_tokens=1, generation_tokens=1)
    assert speed["generation_tokens_per_s"] < a100.bandwidth_bytes_per_s / (weights * 0.9)
    assert speed["prompt_tokens_per_s"] > 0


# ------------------------------------------------------------------ real models by path

def test_real_models_give_their_true_parameter_count(smollm2_dir, gemma3_gguf):
    from shared.assets import smollm2_gguf
    from_dir = ModelShape.from_path(smollm2_dir)
    from_gguf = ModelShape.from_path(smollm2_gguf())
    assert from_dir.parameters == from_gguf.parameters == 134_515_008      # SmolLM2-135M, tied embeddings
    assert (from_gguf.layers, from_gguf.hidden, from_gguf.heads, from_gguf.kv_heads, from_gguf.head_dim) == \
        (30, 576, 9, 3, 64)
    assert from_dir.stored_bytes == 4 * 134_515_008                         # float32 on disk
    gemma = ModelShape.from_path(gemma3_gguf)
    assert gemma.parameters == 268_098_176 and gemma.sliding_window == 512 and gemma.sliding_layers == 15


def test_per_tensor_recipe_bytes_equal_the_released_files(gemma3_gguf):
    """The planner's q4_k_m of Gemma 3 270M and q4_1 of SmolLM2 are byte for byte the tensor data of the released
    GGUF files (llama.cpp's per-tensor rules: norms F32, the tied 640-wide embedding Q6_K → Q8_0, ...)."""
    from shared.assets import smollm2_gguf
    gemma = ModelShape.from_path(gemma3_gguf)
    assert weight_bytes(gemma, parse_recipe("q4_k_m")).total == gemma.stored_bytes == 246_587_904
    smollm = ModelShape.from_path(smollm2_gguf())
    assert weight_bytes(smollm, parse_recipe("q4_1")).total == smollm.stored_bytes == 96_576_768


def test_bundle_tar_reads_like_its_directory(tiny_model_dir, tmp_path):
    from shared.models import bundle
    tar = tmp_path / "tiny.tar"
    bundle.pack(tiny_model_dir, tar)
    assert ModelShape.from_path(tar).parameters == ModelShape.from_path(tiny_model_dir).parameters > 0


def test_hostile_and_unknown_files_are_refused_with_the_field(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(InvalidArgument, match="header length"):
        ModelShape.from_path(bad)
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(InvalidArgument) as error:
        ModelShape.from_path(other)
    assert error.value.field == "model"
    with pytest.raises(InvalidArgument) as error:
        ModelShape(parameters=0)
    assert error.value.field == "parameters"
    with pytest.raises(InvalidArgument, match="kv_heads"):
        ModelShape(parameters=10, heads=4, kv_heads=8)


def test_per_tensor_rules_match_the_exporters(smollm2_dir):
    """SmolLM2 at q8_0: every 2-D weight Q8_0 (8.5 bit), the 30 × 2 + 1 norms float32."""
    shape = ModelShape.from_path(smollm2_dir)
    norms = (30 * 2 + 1) * 576
    assert weight_bytes(shape, parse_recipe("q8_0")).total == (shape.parameters - norms) * 8.5 / 8 + norms * 4


# ------------------------------------------------------------------ devices, fit, recommendation

def test_device_profiles_say_where_numbers_come_from():
    measured = device_profile({"os": "linux", "arch": "x86_64", "ram_bytes": str(16 * GIB),
                               "mem_bandwidth_gbps": "19.8", "fp32_gflops": "210"})
    assert measured.basis == "measured by the agent: 19.8 GB/s, 210 GFLOP/s"
    assert measured.memory_bytes == 15 * GIB                                # less 1 GiB for the OS
    assert device_profile({"catalogue": "raspberry-pi-5-8gb"}).basis == "catalogue: Raspberry Pi 5 8GB"
    phone = device_profile({"os": "android", "ram_bytes": str(8 * GIB)})
    assert phone.basis.startswith("assumed") and phone.memory_bytes == 4 * GIB
    with pytest.raises(InvalidArgument) as error:
        device_profile({"catalogue": "nokia-3310"})
    assert error.value.field == "attributes.catalogue"


def test_seed_deployment_claims_as_fit_verdicts():
    """70B: INT8 on one A100 is "tight, but possible" (at 8K context: under 10% free), INT4 fits "with room to
    spare" (ch. 0); 13B FP16 does
    not fit an RTX 4090 (ch. 7), INT8 does; a 7B model in FP32 (28 GB) fits an A100 80GB easily."""
    devices = [CATALOGUE["a100-80gb"], CATALOGUE["rtx-4090"]]
    document = plan(ModelShape(parameters=70 * 10**9), devices[:1], Settings(context=8192),
                    ["f32", "q8_0", "q4_k_m"])
    fit = document["devices"][0]["fit"]
    assert (fit["q8_0"]["verdict"], fit["q4_k_m"]["verdict"]) == ("tight", "fits")
    fit = plan(LLAMA2_13B, devices[1:], Settings(context=4096), ["f16", "q8_0"])["devices"][0]["fit"]
    assert (fit["f16"]["verdict"], fit["q8_0"]["verdict"]) == ("does not fit", "fits")
    fit = plan(ModelShape(parameters=7 * 10**9), devices[:1], Settings(), ["f32"])["devices"][0]["fit"]
    assert fit["f32"]["verdict"] == "fits"
    assert fit["f32"]["free_bytes"] == document["devices"][0]["memory_bytes"] - fit["f32"]["total_bytes"]


def test_decision_tree_paths():
    always, never = (lambda name: True), (lambda name: False)
    assert recommend(always, 16, quality_budget_pct=1, training_compute=False).candidate_id == "gguf-q8_0"
    assert recommend(always, 16, quality_budget_pct=0.05, training_compute=False).candidate_id == "gguf-f16"
    int4_only = lambda name: name.startswith("q4")                                     # noqa: E731
    assert recommend(int4_only, 5, quality_budget_pct=1, training_compute=False).candidate_id == "gguf-q4_k-awq"
    assert recommend(int4_only, 5, quality_budget_pct=3, training_compute=False).candidate_id == "gguf-q4_k_m-gptq"
    mixed = recommend(never, 3.6, quality_budget_pct=1, training_compute=False)
    assert mixed.candidate["quantization"]["mixed_precision"]["max_bits_per_weight"] == 3.6
    assert recommend(never, 2.0, quality_budget_pct=1, training_compute=False).path == "architecture"  # 16× > 10×
    assert recommend(always, 16, quality_budget_pct=0.5, training_compute=True).candidate == \
        {"format": "gguf", "steps": [{"distill": {}}, {"quantize": {"method": "rtn", "type": "q8_0"}}]}


def test_recommended_candidates_are_valid_spec_entries(tmp_path):
    """Each recommended candidate parses as a spec's candidates[] entry and the coordinator derives its id."""
    import yaml

    from clients.python import spec
    from services.coordinator.spec import plan as plan_candidates
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "text.txt").write_text("calibration")
    always, int4_only = (lambda name: True), (lambda name: name.startswith("q4"))     # noqa: E731
    cases = [recommend(always, 16, quality_budget_pct=1, training_compute=False),
             recommend(int4_only, 5, quality_budget_pct=1, training_compute=False),
             recommend(int4_only, 5, quality_budget_pct=3, training_compute=False),
             recommend(lambda name: False, 3.6, quality_budget_pct=1, training_compute=False),
             recommend(always, 16, quality_budget_pct=0.5, training_compute=True)]
    raw = {"model": {"path": "model.gguf"}, "calibration": {"file": "text.txt"}, "evaluation": {"file": "text.txt"},
           "targets": [{"device": "d"}], "candidates": [case.candidate for case in cases]}
    parsed = spec.parse(yaml.safe_load(json.dumps(raw)), tmp_path)
    assert [c.id for c in plan_candidates(parsed.spec)] == [case.candidate_id for case in cases]


def test_predict_candidate_api():
    attributes = {"os": "linux", "arch": "arm64", "ram_bytes": str(8 * GIB), "mem_bandwidth_gbps": "17.1",
                  "fp32_gflops": "150"}
    shape = ModelShape(parameters=134_515_008, layers=30, hidden=576, heads=9, kv_heads=3, vocab=49152,
                       intermediate=1536)
    size = 145_000_000
    result = predict_candidate(shape, size_bytes=size, attributes=attributes, prompt_tokens=512, generation_tokens=128)
    assert set(result) == {"memory_bytes", "generation_tokens_per_s", "prompt_tokens_per_s", "bound", "basis"}
    kv = kv_cache_bytes(shape, 640)
    assert kv == 2 * 30 * 3 * 64 * 640 * 2
    assert result["memory_bytes"] > size + kv
    assert result["bound"] == "memory"
    assert result["generation_tokens_per_s"] < 17.1e9 / size                # can't beat streaming the file once
    assert result["generation_tokens_per_s"] > 0.8 * 17.1e9 / size
    assert result["basis"] == "measured by the agent: 17.1 GB/s, 150 GFLOP/s"
    assert predict_candidate(shape, size_bytes=size, attributes={"catalogue": "rtx-4090"}, prompt_tokens=512,
                             generation_tokens=128)["basis"] == "catalogue: GeForce RTX 4090"
    with pytest.raises(InvalidArgument) as error:
        predict_candidate(shape, size_bytes=0, attributes={}, prompt_tokens=1, generation_tokens=1)
    assert error.value.field == "size_bytes"


def test_bad_settings_name_the_field():
    for kwargs, field in (({"context": 0}, "context"), ({"kv_dtype": "q3"}, "kv_dtype"),
                          ({"efficiency": 1.5}, "efficiency"), ({"batch": -1}, "batch")):
        with pytest.raises(InvalidArgument) as error:
            Settings(**kwargs)
        assert error.value.field == field
    with pytest.raises(InvalidArgument) as error:
        parse_recipe("int9-g128-sym")
    assert error.value.field == "recipe"


def test_estimate_adds_the_parts():
    shape = LLAMA2_7B
    parts = estimate(shape, parse_recipe("q4_0"), context=4096, batch=1, prompt_tokens=512)
    assert parts.model_bytes == parts.weights.total + parts.kv_cache + parts.activations
    assert parts.kv_cache == 2 * GIB


def test_copy_of_a_model_dir_without_config_is_refused(smollm2_dir, tmp_path):
    directory = tmp_path / "no-config"
    directory.mkdir()
    shutil.copy(smollm2_dir / "tokenizer_config.json", directory)
    with pytest.raises(InvalidArgument, match="no config.json"):
        ModelShape.from_path(directory)
