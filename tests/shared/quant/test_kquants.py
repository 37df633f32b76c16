"""K-quant codecs (shared/quant/kquants.py): byte layout, scale semantics and bit-exactness with
llama.cpp — against the ggml library's own quantize_qN_K and end to end through llama_model_quantize
on SmolLM2's real ffn_down weights (1536 columns), with and without an importance matrix."""
from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import numpy as np
import pytest

from shared.quant.grids import GGUF_BLOCKS, GGUF_GRIDS, Method, QuantizationConfig
from shared.quant.kquants import kquant_codec

KINDS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
PURE_FTYPE = {"q2_k": 10, "q3_k": 11, "q4_k": 14, "q5_k": 16, "q6_k": 18}     # LLAMA_FTYPE_MOSTLY_*(_S)
MIX_FTYPE = {"q4_k_m": 15, "q5_k_m": 17}
KEEP_LAYERS = 8                      # end-to-end runs prune SmolLM2 to its first 8 layers
# llama.cpp's quantizers are sequential float32 C; the x86-64 ggml-base build has no FMA contraction, so
# every block is identical. A build that contracts a*b+c into FMA (aarch64 GCC's default) may round a
# few intermediate sums differently.
EXACT = platform.machine().lower() in ("x86_64", "amd64")
MIN_IDENTICAL = 1.0 if EXACT else 0.999
SHA = "0" * 64


def realistic(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """Normal weights with per-row scales, a few large outliers, all-zero and constant super-blocks."""
    W = rng.normal(0, 0.02, (rows, columns)) * rng.lognormal(0, 0.4, (rows, 1))
    outliers = rng.random(W.shape) < 0.002
    W[outliers] *= rng.uniform(10, 40, outliers.sum())
    W[1, :256] = 0.0                                    # an all-zero super-block
    W[2, 256:512] = 0.0125                              # a constant one
    W[3, 16:48] = 0.0                                   # zero sub-blocks inside a live super-block
    W[4, :256] = np.abs(W[4, :256])                     # all positive (the min clamps to 0)
    return W.astype(np.float32)


def stress(rng: np.random.Generator, rows: int, columns: int) -> dict[str, np.ndarray]:
    shape = (rows, columns)
    sub_scales = np.repeat(10.0 ** rng.uniform(-4, 2, (rows, columns // 16)), 16, axis=1)
    return {k: v.astype(np.float32) for k, v in {
        "realistic": realistic(rng, rows, columns),
        "tiny": rng.normal(0, 1e-6, shape),
        "huge": rng.normal(0, 1e3, shape),
        "positive": rng.uniform(0.5, 1.0, shape),
        "negative": rng.uniform(-1.0, -0.5, shape),
        "sparse": rng.normal(0, 1, shape) * (rng.random(shape) < 0.05),
        "integers": rng.integers(-3, 4, shape).astype(float),
        "mixed_scales": rng.normal(0, 1, shape) * sub_scales,
        "float16": rng.normal(0, 0.05, shape).astype(np.float16).astype(float),
    }.items()}


def blocks(W: np.ndarray, importance: np.ndarray | None = None):
    """(rows, columns) -> (rows·nblocks, 256) super-blocks and their broadcast importance."""
    rows, columns = W.shape
    flat = W.reshape(-1, 256)
    if importance is None:
        return flat, None
    return flat, np.broadcast_to(importance.reshape(1, -1, 256), (rows, columns // 256, 256)).reshape(-1, 256)


def qtype(kind: str):
    import gguf
    return getattr(gguf.GGMLQuantizationType, kind.upper())


# ------------------------------------------------------------------------------- layout, semantics

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_importance", [False, True])
def test_encoded_blocks_decode_to_the_codec_dequantization(kind, with_importance):
    """gguf-py decodes our bytes to exactly codec.dequantize(codes, fit): the layout is llama.cpp's and
    fit.scale/offset are what a reader of the file computes from the stored values."""
    import gguf
    rng = np.random.default_rng(7)
    W = realistic(rng, 48, 1024)
    importance = rng.gamma(0.5, 1.0, 1024).astype(np.float32) if with_importance else None
    codec = kquant_codec(GGUF_GRIDS[kind])
    flat, weights = blocks(W, importance)
    fit, codes = codec.rtn(flat, weights)
    data = codec.encode(fit, codes)
    assert data.shape == (flat.shape[0], GGUF_BLOCKS[kind][1]) and data.dtype == np.uint8
    assert codes.dtype == np.uint8 and codes.max() <= codec.qmax
    assert fit.scale.shape == fit.offset.shape == (flat.shape[0], 256 // codec.sub)
    decoded = gguf.quants.dequantize(data, qtype(kind))
    ours = codec.dequantize(codes, fit)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(decoded, ours)
    assert np.abs(decoded[4]).max() == 0.0                         # row 1's all-zero first super-block
    rel = np.linalg.norm(decoded - flat) / np.linalg.norm(flat)
    assert rel < {"q2_k": 0.5, "q3_k": 0.3, "q4_k": 0.15, "q5_k": 0.08, "q6_k": 0.04}[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_fit_stands_alone_for_gptq(kind):
    """GPTQ fits a block, then rounds it column by column: `nearest` per column equals `nearest` on the
    block, equals the reference codes wherever a sub-block's scale is non-zero, and encodes exactly."""
    import gguf
    rng = np.random.default_rng(11)
    flat = realistic(rng, 16, 512).reshape(-1, 256)
    codec = kquant_codec(GGUF_GRIDS[kind])
    fit = codec.fit(flat)
    whole = codec.nearest(flat, fit)
    by_column = np.stack([codec.nearest(flat[:, j], fit, j // codec.sub) for j in range(256)], axis=1)
    np.testing.assert_array_equal(whole, by_column)
    ref_fit, ref_codes = codec.rtn(flat)
    np.testing.assert_array_equal(fit.scale, ref_fit.scale)
    np.testing.assert_array_equal(fit.offset, ref_fit.offset)
    live = np.repeat(fit.scale != 0, codec.sub, axis=1)
    np.testing.assert_array_equal(whole[live], ref_codes[live])
    np.testing.assert_array_equal(gguf.quants.dequantize(codec.encode(fit, whole), qtype(kind)),
                                  codec.dequantize(whole, fit))


def test_stored_values_follow_the_format():
    rng = np.random.default_rng(5)
    flat = realistic(rng, 8, 512).reshape(-1, 256)
    for kind in KINDS:
        fit = kquant_codec(GGUF_GRIDS[kind]).fit(flat)
        assert fit.stored["d"].dtype == np.float16 and fit.stored["d"].shape == (len(flat),)
        if kind in ("q2_k", "q4_k", "q5_k"):
            assert fit.stored["dmin"].dtype == np.float16
            top = 15 if kind == "q2_k" else 63
            assert fit.stored["scales"].max() <= top and fit.stored["mins"].max() <= top
        elif kind == "q3_k":
            assert fit.stored["scales"].dtype == np.uint8 and fit.stored["scales"].max() <= 63
        else:
            assert fit.stored["scales"].dtype == np.int8


# ------------------------------------------------------------------------------ against llama.cpp

def _ggml_base():
    import llama_cpp
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml-base.*"))
    if not found:
        pytest.skip(f"no libggml-base in {lib_dir}")
    return ctypes.CDLL(str(found[0]))


def ggml_quantize(kind: str, W: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """llama.cpp's own quantize_qN_K (what llama_model_quantize calls) on a (rows, columns) float32."""
    fn = getattr(_ggml_base(), "quantize_" + kind.replace("_k", "_K"))
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    rows, columns = W.shape
    W = np.ascontiguousarray(W, dtype=np.float32)
    out = np.zeros((rows, columns // 256 * GGUF_BLOCKS[kind][1]), dtype=np.uint8)
    qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    fn(W.ctypes.data, out.ctypes.data, rows, columns, None if qw is None else qw.ctypes.data)
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_importance", [False, True])
def test_bit_identical_to_ggml_quantizer(kind, with_importance):
    """Byte for byte against the ggml library's quantize_qN_K, over hard value distributions."""
    rng = np.random.default_rng(2024)
    codec = kquant_codec(GGUF_GRIDS[kind])
    same = total = 0
    for name, W in stress(rng, 24, 1024).items():
        importance = None
        if with_importance:
            importance = rng.gamma(0.4, 1.0, W.shape[1]).astype(np.float32)
            importance[rng.random(W.shape[1]) < 0.05] = 0.0          # never-active inputs
        flat, weights = blocks(W, importance)
        fit, codes = codec.rtn(flat, weights)
        ours = codec.encode(fit, codes)
        theirs = ggml_quantize(kind, W, importance).reshape(ours.shape)
        identical = (ours == theirs).all(axis=1)
        if EXACT:
            assert identical.all(), f"{name}: {(~identical).sum()} of {len(identical)} blocks differ"
        same, total = same + identical.sum(), total + len(identical)
    assert same / total >= MIN_IDENTICAL


_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}     # GGUFValueType sizes


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (type name, (rows, columns) or (n,), the stored bytes/values) of a GGUF file.
    A minimal reader: gguf-py's GGUFReader parses every token of the 49k-word vocabulary into numpy
    fields, seconds per file; this skips the metadata and maps the tensors."""
    import mmap
    import struct

    import gguf
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, _, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
    assert magic == b"GGUF"
    pos, alignment = 24, 32

    def string(pos):
        (n,) = struct.unpack_from("<Q", buf, pos)
        return bytes(buf[pos + 8:pos + 8 + n]).decode(), pos + 8 + n

    def skip(kind, pos):
        if kind == 8:
            return string(pos)[1]
        if kind == 9:
            item, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item in _SCALAR:
                return pos + _SCALAR[item] * count
            for _ in range(count):
                pos = skip(item, pos)
            return pos
        return pos + _SCALAR[kind]

    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        if key == "general.alignment":
            (alignment,) = struct.unpack_from("<I", buf, pos + 4)
        pos = skip(kind, pos + 4)
    infos = []
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, tuple(reversed(dims)), gguf.GGMLQuantizationType(ggml_type), offset))
    start = (pos + alignment - 1) // alignment * alignment
    tensors = {}
    for name, shape, qt, offset in infos:
        block, nbytes = gguf.GGML_QUANT_SIZES[qt]
        row_bytes = shape[-1] // block * nbytes
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = np.frombuffer(buf, np.uint8, rows * row_bytes, start + offset).reshape(rows, row_bytes)
        if qt == gguf.GGMLQuantizationType.F32:
            raw = raw.view(np.float32).reshape(shape)
        tensors[name] = (qt.name.lower(), shape, raw)
    return tensors


@pytest.fixture(scope="module")
def smollm2_f32_gguf(smollm2_dir, tmp_path_factory) -> Path:
    """SmolLM2 as an F32 GGUF written by our exporter: llama.cpp's quantizer input."""
    from services.exporter.base import ExportInput, ExportOptions
    from services.exporter.formats.gguf import GgufExporter
    from shared.models.bundle import ModelDir
    path = tmp_path_factory.mktemp("kquant-gguf") / "smollm2-f32.gguf"
    GgufExporter().export(ExportInput(ModelDir(smollm2_dir), SHA, options=ExportOptions(float_type="f32")), path)
    return path


def llama_quantize(source: Path, out: Path, ftype: int, *, pure: bool = False,
                   importance: dict[str, np.ndarray] | None = None, keep_layers: int | None = None,
                   layers: int = 30) -> Path:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure = ftype, 2, pure
    keep = []                                               # the ctypes buffers must outlive the call
    if importance:
        entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
        for i, (name, values) in enumerate(importance.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entries[i].name = name.encode()
            entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = values.size
        entries[len(importance)].name = None
        params.imatrix = entries
    if keep_layers is not None:
        prune = (ctypes.c_int32 * (layers - keep_layers + 1))(*range(keep_layers, layers), -1)
        params.prune_layers = prune
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_bit_identical_to_llama_model_quantize_on_smollm2(kind, smollm2_f32_gguf, tmp_path):
    """llama.cpp quantizes SmolLM2 (first 8 layers, --pure so every weight asks for `kind`) with an
    importance matrix for the even layers' ffn_down; our rtn of the same float32 rows, through the
    compressor's driver, writes the same bytes for every ffn_down, and llama.cpp's per-tensor fallback
    for the 576-column tensors is the one in shared/quant/rules.py."""
    from services.compressor.quant.rtn import quantize
    from shared.quant.rules import fits
    source = gguf_tensors(smollm2_f32_gguf)
    rng = np.random.default_rng(1)
    importance = {f"blk.{i}.ffn_down.weight": rng.gamma(0.7, 1.0, 1536).astype(np.float32)
                  for i in range(0, KEEP_LAYERS, 2)}
    layers = len({name.split(".")[1] for name in source if name.startswith("blk.")})
    out = llama_quantize(smollm2_f32_gguf, tmp_path / f"pure-{kind}.gguf", PURE_FTYPE[kind], pure=True,
                         importance=importance, keep_layers=KEEP_LAYERS, layers=layers)
    compared = {True: 0, False: 0}
    same = total = 0
    for name, (type_name, shape, data) in gguf_tensors(out).items():
        if len(shape) == 1:
            assert type_name == "f32"
            continue
        assert type_name == fits(kind, shape[1]), name
        if type_name != kind:
            continue
        ours = quantize(np.asarray(source[name][2]), GGUF_GRIDS[kind], importance.get(name)).data
        nbytes = GGUF_BLOCKS[kind][1]
        identical = (ours.reshape(-1, nbytes) == data.reshape(-1, nbytes)).all(axis=1)
        if EXACT:
            assert identical.all(), f"{name}: {(~identical).sum()} of {len(identical)} blocks differ"
        same, total = same + identical.sum(), total + len(identical)
        compared[name in importance] += 1
    assert compared == {True: KEEP_LAYERS // 2, False: KEEP_LAYERS // 2}     # every ffn_down, both paths
    assert same / total >= MIN_IDENTICAL


@pytest.mark.parametrize("mix", sorted(MIX_FTYPE))
def test_mix_rules_match_llama_cpp_on_smollm2(mix, smollm2_dir, smollm2_f32_gguf, tmp_path):
    """shared/quant/rules.py picks, for every tensor of SmolLM2, the type llama.cpp writes for
    LLAMA_FTYPE_MOSTLY_Q4_K_M / Q5_K_M (upgrades, output rule and row-length fallbacks included)."""
    from shared.models.bundle import ModelDir
    from shared.models.gguf_import import hf_to_gguf_names
    from shared.quant.rules import tensor_grid
    config = ModelDir(smollm2_dir).config
    out = llama_quantize(smollm2_f32_gguf, tmp_path / f"{mix}.gguf", MIX_FTYPE[mix],
                         layers=config.num_hidden_layers)
    theirs = {name: type_name for name, (type_name, _, _) in gguf_tensors(out).items()}
    names = hf_to_gguf_names(config)
    recipe = QuantizationConfig(Method.RTN, gguf_type=mix)
    ours = {}
    for name, shape in config.tensor_shapes().items():
        grid = tensor_grid(name, shape, config, recipe)
        ours[names[name]] = grid.gguf_type if grid is not None else "f32"
    assert ours.keys() == theirs.keys()
    different = {n: (ours[n], theirs[n]) for n in ours if ours[n] != theirs[n]}
    assert different == {}
    assert "q6_k" in ours.values() and mix[:4] in ours.values()          # the mix really is mixed


# -------------------------------------------------------------------------- imatrix, bad input

@pytest.mark.parametrize("kind", KINDS)
def test_importance_lowers_the_weighted_error(kind):
    rng = np.random.default_rng(3)
    W = (rng.normal(0, 0.02, (128, 1024)) * rng.lognormal(0, 0.3, (128, 1))).astype(np.float32)
    importance = rng.gamma(0.5, 1.0, 1024).astype(np.float32)
    flat, weights = blocks(W, importance)
    codec = kquant_codec(GGUF_GRIDS[kind])
    errors = []
    for w in (None, weights):
        fit, codes = codec.rtn(flat, w)
        errors.append(((codec.dequantize(codes, fit) - flat) ** 2 * weights).sum(axis=1))
    plain, weighted = errors
    assert weighted.sum() < 0.9 * plain.sum()
    assert (weighted < plain).mean() > 0.9


def test_row_length_not_a_multiple_of_256_is_rejected():
    from services.compressor.quant.rtn import quantize
    from shared.errors import InvalidArgument
    W = np.random.default_rng(0).normal(0, 0.02, (8, 576)).astype(np.float32)
    with pytest.raises(InvalidArgument) as info:
        quantize(W, GGUF_GRIDS["q4_k"])
    assert "q4_k" in info.value.message and "576" in info.value.message
    assert info.value.field == "quantization.type"


def test_codec_rejects_a_block_that_is_not_a_super_block():
    with pytest.raises(ValueError):
        kquant_codec(GGUF_GRIDS["q4_k"]).fit(np.zeros((4, 32), np.float32))
    with pytest.raises(ValueError):
        kquant_codec(GGUF_GRIDS["q8_0"])


def test_empty_input():
    for kind in KINDS:
        codec = kquant_codec(GGUF_GRIDS[kind])
        fit, codes = codec.rtn(np.zeros((0, 256), np.float32))
        assert codec.encode(fit, codes).shape == (0, GGUF_BLOCKS[kind][1])
