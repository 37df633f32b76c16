"""Our GGUF files are llama.cpp's, byte for byte: for every type edgeforge writes (F32, F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, Q2_K … Q6_K, Q4_K_M, Q5_K_M) and each architecture, our round-to-nearest
export and `llama_model_quantize` of the same F16 GGUF hold the same tensors with the same types and
the same bytes — every block identical on x86-64.

Models: two-layer slices of the real SmolLM2 (llama) and Gemma 3 270M (gemma3) with their first 4096
vocabulary rows (the full vocabularies would only add minutes of embedding quantization: block
exactness does not depend on the row count), and a random qwen2 with 256-wide rows, so every K-quant
runs without llama.cpp's row-length fallback and the q/k/v biases and an untied head are covered.
The slices' tensors are real weights; their vocabulary is SmolLM2's tokenizer cut to its first 4096
tokens and the merges among them (block bytes do not depend on the vocabulary). Each F16 file is exported by us, imported back
(exactly: every F16 value is a float32), and both sides quantize from there.

Plain K types are "pure" in shared/quant/rules.py (every weight the type, the output projection Q6_K),
so llama.cpp runs with `pure` and a tensor-type override of the output projection to Q6_K (overrides
still take llama.cpp's row-length fallback); the legacy types and the mixes run llama.cpp's ordinary
per-tensor rules. Where ggml is built to contract a·b+c into FMA (aarch64 GCC's default) a few
K-quant blocks may round differently; there the bar is 99.9 % of blocks (tests/shared/quant/test_kquants.py
explains why).
"""
from __future__ import annotations

import ctypes
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import pytest

from services.compressor.compress import compress
from services.exporter.base import ExportInput, ExportOptions
from services.exporter.formats.gguf import GgufExporter, float32_to_bfloat16
from shared.models.bundle import ModelDir
from shared.models.decoder_config import DecoderConfig
from shared.models.gguf_import import import_gguf
from shared.models.gguf_reader import read_gguf
from shared.quant.compressed import CompressedModel
from shared.quant.grids import Method, QuantizationConfig
from shared.quant.rules import tensor_grid
from shared.tensors.safetensors_writer import write_safetensors

SHA = "0" * 64
VOCAB, LAYERS = 4096, 2
EXACT = platform.machine().lower() in ("x86_64", "amd64")
MIN_IDENTICAL = 1.0 if EXACT else 0.999
# type -> (LLAMA_FTYPE, pure): llama.cpp's file type that writes our recipe's tensor types
FTYPES = {"f32": (0, False), "f16": (1, False), "bf16": (32, False), "q8_0": (7, False), "q4_0": (2, False),
          "q4_1": (3, False), "q5_0": (8, False), "q5_1": (9, False), "q2_k": (10, True), "q3_k": (11, True),
          "q4_k": (14, True), "q5_k": (16, True), "q6_k": (18, True), "q4_k_m": (15, False), "q5_k_m": (17, False)}
GGML_Q6_K = 14
QWEN2 = DecoderConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                      max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, architecture="qwen2")


def cut_tokenizer(source: Path, out: Path) -> Path:
    """SmolLM2's tokenizer cut to its first VOCAB tokens and the merges among them: a small, valid
    vocabulary for the slices (the full one costs seconds of metadata per file)."""
    document = json.loads((source / "tokenizer.json").read_text())
    vocab = {token: i for token, i in document["model"]["vocab"].items() if i < VOCAB}
    merges = [m if isinstance(m, str) else " ".join(m) for m in document["model"]["merges"]]
    document["model"]["merges"] = [m for m in merges if m.replace(" ", "") in vocab
                                   and all(part in vocab for part in m.split(" "))]
    document["model"]["vocab"] = vocab
    document["added_tokens"] = [t for t in document.get("added_tokens", []) if t["id"] < VOCAB]
    out.mkdir(parents=True)
    (out / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False))
    shutil.copy(source / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def real_slice(source: Path, out: Path, tokenizer_dir: Path) -> Path:
    """The first LAYERS blocks and VOCAB embedding rows of a real model, its own weights."""
    model = ModelDir(source)
    raw = {**model.config.to_hf(), "num_hidden_layers": LAYERS, "vocab_size": VOCAB}
    if "layer_types" in raw:
        raw["layer_types"] = raw["layer_types"][:LAYERS]
    config = DecoderConfig.from_hf(raw)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config.to_hf()))
    shapes = config.tensor_shapes()
    tensors = ((name, model.rows(name, 0, shape[0]) if len(shape) == 2 else model.array(name))
               for name, shape in shapes.items())
    write_safetensors(out / "model.safetensors", {n: (s, "F32") for n, s in shapes.items()}, tensors)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3"])
def case(request, smollm2_dir, gemma3_dir, random_decoder, tmp_path_factory):
    """(architecture, F16 GGUF written by us, float32 directory imported back from it)."""
    work = tmp_path_factory.mktemp(f"bitexact-{request.param}")
    tokenizer = cut_tokenizer(smollm2_dir, work / "tokenizer")
    if request.param == "qwen2":
        model = random_decoder(QWEN2, tokenizer, seed=5)
    else:
        source = smollm2_dir if request.param == "llama" else gemma3_dir
        model = real_slice(source, work / "slice", tokenizer)
    f16 = work / "f16.gguf"
    GgufExporter().export(ExportInput(ModelDir(model), SHA, options=ExportOptions(float_type="f16")), f16)
    import_gguf(f16, work / "from-f16")
    return request.param, f16, ModelDir(work / "from-f16")


def llama_quantize(source: Path, out: Path, type_name: str, output_name: str) -> Path:
    import llama_cpp
    ftype, pure = FTYPES[type_name]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, 2, pure
    if pure:                                     # our pure K types keep llama.cpp's Q6_K output projection
        overrides = (llama_cpp.llama_model_tensor_override * 2)()
        overrides[0].pattern, overrides[0].type = f"^{output_name}$".replace(".", r"\.").encode(), GGML_Q6_K
        overrides[1].pattern = None
        params.tt_overrides = overrides
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return out


def ours(model: ModelDir, type_name: str, work: Path) -> Path:
    out = work / f"ours-{type_name}.gguf"
    if type_name in ("f32", "f16", "bf16"):
        GgufExporter().export(ExportInput(model, SHA, options=ExportOptions(float_type=type_name)), out)
        return out
    compress(model, SHA, QuantizationConfig(Method.RTN, gguf_type=type_name), work / f"{type_name}.safetensors")
    GgufExporter().export(ExportInput(model, SHA, CompressedModel(work / f"{type_name}.safetensors")), out)
    return out


def identical_blocks(a, b, name: str) -> tuple[int, int]:
    """(identical, total) blocks of tensor `name` in two GgufFiles (a float element is a block)."""
    import gguf
    block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(a.tensors[name].type)][1]
    x, y = a.read(name).reshape(-1, block_bytes), b.read(name).reshape(-1, block_bytes)
    return int((x == y).all(axis=1).sum()), len(x)


@pytest.mark.parametrize("type_name", list(FTYPES))
def test_every_block_equals_llama_cpp(case, type_name, tmp_path):
    import gguf
    import llama_cpp
    architecture, f16, model = case
    output_name = "token_embd.weight" if model.config.tie_word_embeddings else "output.weight"
    theirs = read_gguf(llama_quantize(f16, tmp_path / f"llama-cpp-{type_name}.gguf", type_name, output_name))
    path = ours(model, type_name, tmp_path)
    mine = read_gguf(path)
    assert mine.tensors.keys() == theirs.tensors.keys()
    types = {n: (gguf.GGMLQuantizationType(mine.tensors[n].type).name,
                 gguf.GGMLQuantizationType(theirs.tensors[n].type).name) for n in mine.tensors}
    assert {n: t for n, t in types.items() if t[0] != t[1]} == {}, "tensor types differ"
    by_type: dict[str, list[int]] = {}                  # GGML type -> [identical, total] blocks
    for name in mine.tensors:
        s, t = identical_blocks(mine, theirs, name)
        if EXACT:
            assert s == t, f"{name}: {t - s} of {t} blocks differ"
        counts = by_type.setdefault(types[name][0], [0, 0])
        counts[0], counts[1] = counts[0] + s, counts[1] + t
    print(f"{architecture} {type_name}: " + ", ".join(f"{t} {s}/{n} ({s / n:.2%})" for t, (s, n) in by_type.items()))
    assert all(s / n >= MIN_IDENTICAL for s, n in by_type.values())
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False)     # and it runs (slices and random weights
    reply = llm.create_completion("The capital of France is", max_tokens=4, temperature=0.0)   # may pick
    llm.close()                                                                # special tokens, empty text)
    assert reply["usage"]["completion_tokens"] > 0, reply


def test_bfloat16_rounding_is_ggml_s():
    """float32_to_bfloat16 against ggml's own ggml_fp32_to_bf16_row_ref (what llama_model_quantize
    calls for BF16) on every rounding case: ties to even, carries into the exponent, overflow to
    infinity, subnormals, signed zeros, infinities, NaN."""
    import llama_cpp
    lib = ctypes.CDLL(str(sorted((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))[0]))
    convert = lib.ggml_fp32_to_bf16_row_ref
    convert.argtypes, convert.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64], None
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 200_000, dtype=np.uint64).astype(np.uint32),
                           np.array([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x7F7FFFFF, 0x7F7F8000, 0x00000001,
                                     0x80008000, 0x00000000, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000,
                                     0x7F800001, 0xFFFFFFFF], dtype=np.uint32)])
    values = bits.view(np.float32)
    theirs = np.zeros(len(values), dtype=np.uint16)
    convert(values.ctypes.data, theirs.ctypes.data, len(values))
    np.testing.assert_array_equal(float32_to_bfloat16(values), theirs)


def test_mix_rules_reproduce_the_real_gemma3_q4_k_m(gemma3_gguf, gemma3_dir):
    """shared/quant/rules.py gives every tensor of Gemma 3 270M the type llama.cpp's Q4_K_M wrote in the
    released file: Q8_0 for the tied embeddings (640 columns take no Q6_K), Q6_K/Q4_K for ffn_down,
    Q8_0 for the upgraded attn_v (Q6_K's fallback), Q5_0 for the 640-column rest (Q4_K's fallback)."""
    import gguf
    from shared.models.gguf_import import hf_to_gguf_names
    config = ModelDir(gemma3_dir).config
    theirs = {name: gguf.GGMLQuantizationType(info.type).name.lower()
              for name, info in read_gguf(gemma3_gguf).tensors.items()}
    names = hf_to_gguf_names(config)
    recipe = QuantizationConfig(Method.RTN, gguf_type="q4_k_m")
    mine = {}
    for name, shape in config.tensor_shapes().items():
        grid = tensor_grid(name, shape, config, recipe)
        mine[names[name]] = grid.gguf_type if grid is not None else "f32"
    assert mine == theirs
    assert set(mine.values()) == {"f32", "q8_0", "q6_k", "q4_k", "q5_0"}
