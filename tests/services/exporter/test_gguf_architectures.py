"""GGUF export of every architecture, loaded and run by llama.cpp against the torch reference:
- llama:  the real SmolLM2-135M;
- qwen2:  a small random model (no real qwen2 ships here) with q/k/v biases and an untied head;
- gemma3: the real Gemma 3 270M imported from its Q4_K_M GGUF, and a small random gemma3 whose
          8-token sliding window the prompts exceed (local/global layers, local rotary base), with
          Gemma 3's real SentencePiece vocabulary and a chat template.
Each float32 file matches the reference's logits (top-1 on every position), generates text, and
carries the source's vocabulary and chat template. Variants llama.cpp cannot run fail in check()."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from services.exporter.base import ExportInput, ExportOptions
from services.exporter.formats.gguf import GgufExporter
from services.exporter.quality import VALIDATION_PROMPTS
from services.exporter.runtimes import LlamaCppRuntime, ReferenceRuntime
from shared.errors import FailedPrecondition
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig
from shared.models.gguf_import import import_gguf
from shared.models.gguf_reader import read_gguf
from shared.models.tokenizer import TextTokenizer

SHA = "0" * 64
# A chat template of our own (Gemma's turn markers), to check the template travels with the vocabulary.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
            "else 'user' }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
QWEN2 = DecoderConfig(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, architecture="qwen2")
GEMMA3 = DecoderConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=7,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=2,
                       eos_token_id=1, architecture="gemma3", sliding_window=8)
# max |Δlogit| allowed between llama.cpp and the reference, both float32: summation order differs, and
# ggml's GELU reads a float16 table (gemma3). For scale: the random gemma3's logits reach ±2, and running
# its reference without the sliding window, or with the global rotary base on local layers, moves them
# by 2.2 and 1.3; the real models' logits reach ±30.
MAX_DIFF = {"llama": 6e-2, "qwen2": 3e-3, "gemma3-random": 1e-2, "gemma3": 6e-2}


@pytest.fixture(scope="module")
def models(smollm2_dir, gemma3_dir, random_decoder) -> dict:
    gemma_random = random_decoder(GEMMA3, gemma3_dir, seed=3)
    settings = json.loads((gemma_random / "tokenizer_config.json").read_text())
    (gemma_random / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": TEMPLATE}))
    return {"llama": smollm2_dir, "qwen2": random_decoder(QWEN2, smollm2_dir, seed=2),
            "gemma3-random": gemma_random, "gemma3": gemma3_dir}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory) -> dict:
    out = {}
    for name, directory in models.items():
        path = tmp_path_factory.mktemp("arch") / f"{name}-f32.gguf"
        GgufExporter().export(ExportInput(ModelDir(directory), SHA, options=ExportOptions(float_type="f32")), path)
        out[name] = path
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3-random", "gemma3"])
def test_float32_export_matches_the_reference(name, models, exported, record_property):
    model = ModelDir(models[name])
    tokenizer = TextTokenizer(model.tokenizer_path, model.tokenizer_config())
    prompts = [[tokenizer.bos_id] + tokenizer.encode(text) for text in VALIDATION_PROMPTS]
    reference = ReferenceRuntime(model.path)
    expected = [reference.logits(p) for p in prompts]
    reference.close()
    runtime = LlamaCppRuntime(exported[name], 128)
    actual = [runtime.logits(p) for p in prompts]
    runtime.close()
    if name == "gemma3-random":
        assert min(map(len, prompts)) > 2 * GEMMA3.sliding_window        # the window really slides
    diff = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
    top1 = np.mean(np.concatenate([a.argmax(-1) == e.argmax(-1) for a, e in zip(actual, expected)]))
    record_property("max_abs_diff", diff)
    record_property("top1_agreement", top1)
    print(f"{name}: {sum(map(len, prompts))} positions, top-1 agreement {top1:.4f}, max |Δlogit| {diff:.2e}")
    assert top1 == 1.0 and diff < MAX_DIFF[name]


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3-random", "gemma3"])
def test_export_generates_text(name, exported):
    import llama_cpp
    llm = llama_cpp.Llama(str(exported[name]), n_ctx=256, verbose=False)
    reply = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
    llm.close()
    assert reply["usage"]["completion_tokens"] > 0 and reply["choices"][0]["text"].strip(), reply


def test_chat_templates_travel_with_the_vocabulary(models, exported):
    import llama_cpp
    for name in ("llama", "gemma3-random"):
        fields = read_gguf(exported[name]).fields
        template = ModelDir(models[name]).tokenizer_config()["chat_template"]
        assert fields["tokenizer.chat_template"].value == template
    llm = llama_cpp.Llama(str(exported["gemma3-random"]), n_ctx=256, verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
    formatted = llm.tokenize(b"<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
                             add_bos=False, special=True)
    llm.close()
    assert reply["usage"]["prompt_tokens"] == len(formatted)                          # formatted by TEMPLATE


def test_gemma3_round_trips_the_source(gemma3_gguf, exported):
    """Imported and exported again, Gemma 3 keeps every tokenizer.* key of the original GGUF
    (SentencePiece tokens, scores, token types, special ids and flags: same value, same GGUF type), its
    hyperparameters, and its float32 tensors (the norms, stored as weight + 1) byte for byte."""
    source, ours = read_gguf(gemma3_gguf), read_gguf(exported["gemma3"])
    vocabulary = {k: v for k, v in source.fields.items() if k.startswith("tokenizer.")}
    assert vocabulary["tokenizer.ggml.model"].value == "llama" and len(vocabulary["tokenizer.ggml.scores"].value) == 262144
    assert {k: ours.fields.get(k) for k in vocabulary} == vocabulary
    hyperparameters = {k: v for k, v in source.fields.items() if k.startswith("gemma3.")}
    assert {k: ours.fields.get(k) for k in hyperparameters} == hyperparameters
    norms = [name for name, info in source.tensors.items() if info.type == 0]         # F32
    assert len(norms) == 18 * 6 + 1
    for name in norms:
        assert np.array_equal(ours.read(name), source.read(name)), name


def test_qwen2_and_gemma3_names_and_layout(exported, models):
    """qwen2 carries its q/k/v biases as F32; gemma3 its four norms per block and q/k norms; neither
    permutes Q/K rows (NEOX rotary), gemma3 stores its norms as weight + 1."""
    qwen = read_gguf(exported["qwen2"])
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias", "output.weight"} <= qwen.tensors.keys()
    model = ModelDir(models["qwen2"])
    q = np.frombuffer(qwen.read("blk.1.attn_q.weight").tobytes(), np.float32).reshape(128, 128)
    np.testing.assert_array_equal(q, model.array("model.layers.1.self_attn.q_proj.weight"))
    gemma = read_gguf(exported["gemma3-random"])
    for suffix in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm"):
        assert f"blk.6.{suffix}.weight" in gemma.tensors
    model = ModelDir(models["gemma3-random"])
    norm = np.frombuffer(gemma.read("blk.0.attn_q_norm.weight").tobytes(), np.float32)
    np.testing.assert_array_equal(norm, model.array("model.layers.0.self_attn.q_norm.weight") + np.float32(1))


@pytest.mark.parametrize("name", ["qwen2", "gemma3-random"])
def test_import_undoes_the_export(name, models, exported, tmp_path):
    """GGUF -> HF directory gives back every tensor (biases, unpermuted Q/K, norms − 1) and the config."""
    config = import_gguf(exported[name], tmp_path / "back")
    original = ModelDir(models[name])
    eps = float(np.float32(original.config.rms_norm_eps))                  # GGUF stores it as float32
    assert config == dataclasses.replace(original.config, rms_norm_eps=eps)
    back = ModelDir(tmp_path / "back")
    for tensor in original.tensor_names():
        # gemma3 norms pass through float32 w + 1 and back: exact to half a unit in the last place of 1
        tolerance = 2.0 ** -24 if tensor.endswith("norm.weight") and name.startswith("gemma3") else 0.0
        np.testing.assert_allclose(back.array(tensor), original.array(tensor), rtol=0, atol=tolerance,
                                   err_msg=tensor)


@pytest.mark.parametrize("change", [{"query_pre_attn_scalar": 128}, {"sliding_window_pattern": 4},
                                    {"rope_local_base_freq": 20000.0}])
def test_gemma3_variants_llama_cpp_cannot_run_fail_before_export(change, random_decoder, smollm2_dir, tmp_path):
    directory = random_decoder(DecoderConfig(**{**GEMMA3.__dict__, "vocab_size": 512, "num_hidden_layers": 6,
                                                "layer_types": ()}), smollm2_dir)
    raw = json.loads((directory / "config.json").read_text())
    if "sliding_window_pattern" in change:
        raw.pop("layer_types")
    (directory / "config.json").write_text(json.dumps({**raw, **change}))
    with pytest.raises(FailedPrecondition) as error:
        GgufExporter().export(ExportInput(ModelDir(directory), SHA), tmp_path / "out.gguf")
    assert error.value.reason == "UNSUPPORTED_ARCH" and "gemma3" in error.value.message
    assert next(iter(change)).replace("sliding_window_pattern", "layer_types") in error.value.message
    assert not (tmp_path / "out.gguf").exists()


def test_a_vocabulary_gguf_cannot_carry_fails_in_check(random_decoder, smollm2_dir, tmp_path):
    directory = random_decoder(QWEN2, smollm2_dir)
    shutil.move(directory / "tokenizer.json", tmp_path / "elsewhere.json")
    with pytest.raises(FailedPrecondition) as error:
        GgufExporter().check(ExportInput(ModelDir(directory), SHA))
    assert "tokenizer" in error.value.message
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(FailedPrecondition) as error:          # an HF SentencePiece tokenizer.json
        GgufExporter().check(ExportInput(ModelDir(directory), SHA))
    assert "Unigram" in error.value.message


@pytest.mark.parametrize("name,float_type", [("qwen2", "bf16"), ("gemma3-random", "bf16"), ("gemma3-random", "f16")])
def test_chunked_export_is_byte_identical(name, float_type, models, tmp_path, monkeypatch):
    """The streaming writer (one row chunk in flight) writes the same bytes for the new paths: biases,
    norms + 1, bfloat16 rounding, the carried vocabulary."""
    from services.exporter.formats import gguf as gguf_format
    source = ExportInput(ModelDir(models[name]), SHA, options=ExportOptions(float_type=float_type))
    GgufExporter().export(source, tmp_path / "whole.gguf")
    monkeypatch.setattr(gguf_format, "CHUNK_BYTES", 1 << 16)
    GgufExporter().export(source, tmp_path / "chunked.gguf")
    assert (tmp_path / "whole.gguf").read_bytes() == (tmp_path / "chunked.gguf").read_bytes()
