"""DecoderConfig and the torch reference for llama, qwen2 and gemma3: HF config.json round trips, Gemma 3
270M's published config, refusals of what the reference does not implement, and — where the
`transformers` package is installed — logits equal to Hugging Face's own LlamaForCausalLM,
Qwen2ForCausalLM and Gemma3ForCausalLM on random weights."""
from __future__ import annotations

import json

import pytest
import torch

from shared.errors import InvalidArgument
from shared.models.decoder_config import FULL, SLIDING, DecoderConfig, is_linear_weight
from shared.models.llama import build_reference

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
             num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "llama": DecoderConfig(**SMALL),
    "qwen2": DecoderConfig(**SMALL, rope_theta=1e6, architecture="qwen2"),
    # a 5-token window on 23-token inputs, a non-default query scaling and soft-capping: every gemma3 term
    "gemma3": DecoderConfig(**SMALL, rope_theta=1e6, tie_word_embeddings=True, architecture="gemma3", head_dim=32,
                            sliding_window=5, query_pre_attn_scalar=24.0, final_logit_softcapping=30.0),
}
# google/gemma-3-270m's config.json as published (transformers 4.55 layout)
GEMMA3_270M = {
    "_sliding_window_pattern": 6, "architectures": ["Gemma3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "attn_logit_softcapping": None, "bos_token_id": 2, "eos_token_id": 1,
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 640,
    "initializer_range": 0.02, "intermediate_size": 2048,
    "layer_types": ([SLIDING] * 5 + [FULL]) * 3, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0,
    "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 512, "torch_dtype": "bfloat16", "use_bidirectional_attention": False,
    "use_cache": True, "vocab_size": 262144}


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_config_round_trips_through_config_json(architecture):
    config = CONFIGS[architecture]
    raw = json.loads(json.dumps(config.to_hf()))
    assert DecoderConfig.from_hf(raw) == config
    assert raw["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                     "gemma3": "Gemma3ForCausalLM"}[architecture]]


def test_llama_config_json_is_unchanged():
    """What llama bundles have always held: twelve fields and four constants, nothing new."""
    assert CONFIGS["llama"].to_hf() == {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                        "torch_dtype": "float32", "hidden_act": "silu", **{
                                            k: v for k, v in SMALL.items()}, "rope_theta": 10000.0,
                                        "tie_word_embeddings": False}


def test_tensor_names_per_architecture():
    qwen2 = CONFIGS["qwen2"].tensor_shapes()
    assert qwen2["model.layers.0.self_attn.q_proj.bias"] == (64,) and qwen2["model.layers.0.self_attn.k_proj.bias"] == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen2
    gemma = CONFIGS["gemma3"].tensor_shapes()
    assert gemma["model.layers.0.self_attn.q_proj.weight"] == (128, 64)          # 4 heads × head_dim 32
    assert gemma["model.layers.0.self_attn.o_proj.weight"] == (64, 128)
    assert gemma["model.layers.0.self_attn.q_norm.weight"] == (32,)
    assert "model.layers.0.pre_feedforward_layernorm.weight" in gemma and "lm_head.weight" not in gemma
    linear = [n for n in {**qwen2, **gemma} if is_linear_weight(n)]
    assert len(linear) == 7 * 7 and not any(n.endswith((".bias", "norm.weight")) for n in linear)


def test_gemma3_270m_published_config():
    config = DecoderConfig.from_hf(GEMMA3_270M)
    assert (config.architecture, config.head_dim, config.query_pre_attn_scalar, config.sliding_window) == \
        ("gemma3", 256, 256.0, 512)
    assert config.layer_types == ((SLIDING,) * 5 + (FULL,)) * 3
    assert (config.rope_theta, config.rope_local_base_freq, config.tie_word_embeddings) == (1e6, 1e4, True)
    assert config.parameter_count() == 268_098_176
    no_layer_types = {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"}
    assert DecoderConfig.from_hf(no_layer_types) == config                        # HF's 5:1 default


def test_transformers_5_rope_parameters():
    raw = {k: v for k, v in GEMMA3_270M.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling")}
    raw["rope_parameters"] = {FULL: {"rope_type": "default", "rope_theta": 1e6},
                              SLIDING: {"rope_type": "default", "rope_theta": 1e4}}
    assert DecoderConfig.from_hf(raw) == DecoderConfig.from_hf(GEMMA3_270M)
    raw["rope_parameters"][FULL] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}
    with pytest.raises(InvalidArgument) as error:
        DecoderConfig.from_hf(raw)
    assert error.value.reason == "UNSUPPORTED_OP"


@pytest.mark.parametrize("change,reason", [
    ({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}, "UNKNOWN_MODEL_FORMAT"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "UNKNOWN_MODEL_FORMAT"),
    ({"attn_logit_softcapping": 50.0}, "UNSUPPORTED_OP"),
    ({"hidden_activation": "gelu"}, "UNSUPPORTED_OP"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 8.0}}, "UNSUPPORTED_OP"),
    ({"layer_types": [SLIDING] * 17}, "MALFORMED_MODEL"),
])
def test_refusals(change, reason):
    with pytest.raises(InvalidArgument) as error:
        DecoderConfig.from_hf({**GEMMA3_270M, **change})
    assert error.value.reason == reason


def test_llama_and_qwen2_refusals():
    for raw in ({**CONFIGS["llama"].to_hf(), "attention_bias": True},
                {**CONFIGS["qwen2"].to_hf(), "use_sliding_window": True},
                {**CONFIGS["llama"].to_hf(), "head_dim": 8}):
        with pytest.raises(InvalidArgument):
            DecoderConfig.from_hf(raw)


@pytest.mark.parametrize("architecture", list(CONFIGS))
def test_reference_equals_hugging_face(architecture):
    """Our reference and transformers' own model class, same random weights, same logits."""
    transformers = pytest.importorskip("transformers")
    config = CONFIGS[architecture]
    raw = json.loads(json.dumps(config.to_hf()))
    hf_config = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    generator = torch.Generator().manual_seed(0)
    state = {name: torch.randn(p.shape, generator=generator) * (0.1 if "norm" in name or "bias" in name else 0.05)
             for name, p in hf_model.state_dict().items()}
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf_model.load_state_dict(state)
    ours = build_reference(config, lambda name: state[name])
    tokens = torch.randint(0, config.vocab_size, (2, 23), generator=generator)
    with torch.inference_mode():
        expected, actual = hf_model(tokens).logits, ours(tokens)
    assert (actual - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))
