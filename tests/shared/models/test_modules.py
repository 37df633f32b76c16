"""Module bundles: every family round-trips through its manifest (structure changes included), every
import source becomes a module directory, and malformed bundles are refused with the problem named."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shared.errors import FailedPrecondition, InvalidArgument
from shared.models import modules
from shared.models.cnn import SmallCNN, prune_channels
from shared.models.encoder import BertConfig, SentenceEncoder, load_encoder, minilm_dir
from shared.models.module_data import Samples
from shared.models.module_import import import_source
from shared.models.modules import ModuleDir, save_module_dir, write_module_dir

TEXTS = ["A man is playing a guitar.", "The stock market fell sharply today.", "Cats sleep a lot."]
CNN_INPUT = {"image": {"channels": 1, "size": 28, "mean": [0.286], "std": [0.353]}, "names": ["images"]}


@pytest.fixture
def cnn_dir(tmp_path) -> ModuleDir:
    torch.manual_seed(0)
    return write_module_dir(SmallCNN(channels=[4, 8], hidden=16), tmp_path / "cnn", architecture="small_cnn",
                            task="image_classification", input=CNN_INPUT, source={"format": "test"}, check=True)


def tiny_onnx(path, inputs=None):
    """GlobalAveragePool -> Flatten -> Gemm: (N, 3, 16, 16) float -> (N, 5) logits."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["logits"])], "tiny",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ---------------------------------------------------------------- families

def test_mobilenet_v2_state_dict_imports_folded_and_recognises_the_cat(tmp_path):
    from shared.models.vision import IMAGENET_EGYPTIAN_CAT, IMAGENET_TABBY, imagenet_weights, mobilenet_v2, photos
    module_dir = import_source(imagenet_weights(), tmp_path / "mobilenet", None)
    assert (module_dir.architecture, module_dir.task) == ("mobilenet_v2", "image_classification")
    assert module_dir.structure["classes"] == 1000 and len(module_dir.structure["hidden"]) == 17
    loaded = module_dir.load()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.module.modules())      # folded
    with torch.no_grad():
        ours = loaded.module(torch.from_numpy(photos(("chelsea", "coffee"))))
        reference = mobilenet_v2()(torch.from_numpy(photos(("chelsea", "coffee"))))
    assert torch.allclose(ours, reference, atol=1e-4)
    assert IMAGENET_TABBY <= int(ours[0].argmax()) <= IMAGENET_EGYPTIAN_CAT
    assert loaded.input_names == ["images"] and loaded.output_names == ["logits"]
    assert loaded.dynamic_axes == {"images": {0: "batch"}, "logits": {0: "batch"}}

    hidden = [module_dir.structure["hidden"][0]] + [h // 2 for h in module_dir.structure["hidden"][1:]]
    from shared.models.vision import MobileNetV2
    torch.manual_seed(0)
    narrower = MobileNetV2(classes=1000, hidden=hidden).eval()             # BatchNorm: folded on saving
    saved = save_module_dir(narrower, module_dir, tmp_path / "narrow", note={"step": "structured"})
    assert saved.structure["hidden"] == hidden and saved.manifest["history"] == [{"step": "structured"}]
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(saved.load().module(x), narrower(x), atol=1e-4)


def test_small_cnn_round_trips_its_structure(cnn_dir, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    model = cnn_dir.load().module
    pruned = prune_channels(model, 0.5)
    saved = save_module_dir(pruned, cnn_dir, tmp_path / "pruned")
    assert saved.structure == {**cnn_dir.structure, "channels": [2, 4], "hidden": 8}
    x = torch.from_numpy(saved.prepare(Samples(images=images))["images"])
    with torch.no_grad():
        assert torch.equal(saved.load().module(x), pruned(x))
    assert saved.load().parameter_count() < cnn_dir.load().parameter_count()


def test_bert_family_round_trips_a_pruned_structure(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    config = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
    (source / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "vocab.txt"):
        (source / name).write_bytes((minilm_dir() / name).read_bytes())
    torch.manual_seed(0)
    from safetensors.torch import save_file
    save_file(SentenceEncoder(BertConfig.from_hf(config)).state_dict(), str(source / "model.safetensors"))
    module_dir = import_source(source, tmp_path / "bert", None)
    assert module_dir.input["text"]["max_tokens"] == 64                       # capped by the positions
    narrower = SentenceEncoder(BertConfig.from_hf(config), intermediate=[16, 64], heads=[2, 4]).eval()
    saved = save_module_dir(narrower, module_dir, tmp_path / "pruned")
    assert saved.structure == {"intermediate": [16, 64], "heads": [2, 4]}
    assert (saved.path / "vocab.txt").is_file() and (saved.path / "config.json").is_file()
    ids, mask = saved.tokenizer()(TEXTS)
    with torch.no_grad():
        assert torch.equal(saved.load().module(torch.from_numpy(ids), torch.from_numpy(mask)),
                           narrower(torch.from_numpy(ids), torch.from_numpy(mask)))


def test_real_minilm_directory_imports_as_is(tmp_path):
    module_dir = import_source(minilm_dir(), tmp_path / "minilm", None)
    assert (module_dir.architecture, module_dir.task) == ("bert", "text_embedding")
    assert module_dir.input == {"text": {"max_tokens": 256}, "names": ["input_ids", "attention_mask"]}
    inputs = [torch.from_numpy(a) for a in module_dir.prepare(Samples(sentences=TEXTS)).values()]
    reference, loaded = load_encoder(), module_dir.load()
    with torch.no_grad():
        assert torch.equal(loaded.module(*inputs), reference(*inputs))
    assert loaded.dynamic_axes["input_ids"] == {0: "batch", 1: "tokens"}
    assert loaded.parameter_count() == sum(p.numel() for p in reference.parameters())


# ---------------------------------------------------------------- ONNX and ExportedProgram

def test_onnx_file_imports_with_its_task_and_packs(tmp_path):
    path = tiny_onnx(tmp_path / "tiny.onnx")
    with pytest.raises(InvalidArgument, match="task is required") as error:
        import_source(path, tmp_path / "none", None)
    assert error.value.field == "task" and not (tmp_path / "none").exists()
    with pytest.raises(InvalidArgument, match=r"takes integer \(N, T\) inputs input_ids.*x float32 \['\?', 3, 16, 16\]"):
        import_source(path, tmp_path / "text", "text_embedding")
    module_dir = import_source(path, tmp_path / "onnx", "image_classification")
    assert module_dir.input["image"]["size"] == 16 and module_dir.input["names"] == ["x"]
    assert module_dir.parameter_count() == 15
    with pytest.raises(FailedPrecondition, match="no torch module") as error:
        module_dir.load()
    assert error.value.reason == "UNSUPPORTED_ARCH"
    modules.pack(module_dir.path, tmp_path / "bundle.tar")
    assert modules.tar_family(tmp_path / "bundle.tar") == "module"
    again = ModuleDir(modules.unpack(tmp_path / "bundle.tar", tmp_path / "unpacked"))
    assert again.manifest == module_dir.manifest
    assert (again.path / "model.onnx").read_bytes() == (module_dir.path / "model.onnx").read_bytes()


def test_onnx_text_encoder_gets_a_tokenizer_when_its_vocabulary_fits(tmp_path):
    def encoder(rows: int):
        table = numpy_helper.from_array(np.zeros((rows, 4), np.float32), "E")
        graph = helper.make_graph([helper.make_node("Gather", ["E", "input_ids"], ["h"])], "enc",
                                  [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", 12])
                                   for n in ("input_ids", "attention_mask")],
                                  [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", 12, 4])], [table])
        path = tmp_path / f"enc{rows}.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return path
    module_dir = import_source(encoder(30522), tmp_path / "fits", "text_embedding")
    assert module_dir.input["text"] == {"max_tokens": 12, "length": 12}
    assert "WordPiece" in module_dir.source["tokenizer"]
    assert module_dir.prepare(Samples(sentences=TEXTS))["input_ids"].shape == (3, 12)
    with pytest.raises(FailedPrecondition, match="token embedding has 1000 rows"):
        import_source(encoder(1000), tmp_path / "other", "text_embedding")


class _Tiny(torch.nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv, self.norm, self.head = torch.nn.Conv2d(1, width, 3), torch.nn.BatchNorm2d(width), \
            torch.nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).mean((2, 3)))


def _program(path):
    torch.manual_seed(0)
    program = torch.export.export(_Tiny().eval(), (torch.rand(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def test_exported_program_imports_and_saves_new_weights_only(tmp_path):
    module_dir = import_source(_program(tmp_path / "tiny.pt2"), tmp_path / "program", "image_classification")
    assert module_dir.input == {"image": {"channels": 1, "size": 8, "mean": [0.0], "std": [1.0]}, "names": ["x"]}
    loaded = module_dir.load()
    assert loaded.dynamic_axes == {"x": {0: "batch"}, "logits": {0: "batch"}}
    with torch.no_grad():
        loaded.module.head.weight.mul_(2)
    saved = save_module_dir(loaded.module, module_dir, tmp_path / "scaled")
    assert sorted(p.name for p in saved.path.iterdir()) == ["edgeforge-module.json", "model.safetensors", "program.pt2"]
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(saved.load().module(x), loaded.module(x))
    with pytest.raises(FailedPrecondition, match=r"fixes its shapes.*conv.bias changed from \(4,\) to \(6,\)"):
        save_module_dir(_Tiny(6), module_dir, tmp_path / "refused")         # same names, other shapes
    assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------- refusals

def _edit_manifest(module_dir: ModuleDir, edit) -> None:
    manifest = json.loads((module_dir.path / modules.MANIFEST).read_text())
    edit(manifest)
    (module_dir.path / modules.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(version=2), "version is 2"),
    (lambda m: m.update(colour="blue"), "unknown keys ['colour']"),
    (lambda m: m.pop("input"), "lacks ['input']"),
    (lambda m: m.update(architecture="resnet"), "architecture is 'resnet'"),
    (lambda m: m.update(task="causal_lm"), "task is 'causal_lm'"),
    (lambda m: m["input"]["image"].update(mean=[0.1, 0.2]), "one number per channel"),
    (lambda m: m.update(input={"text": {"max_tokens": 8}, "names": ["input_ids", "attention_mask"]}),
     "holds 'image' and 'names'"),
    (lambda m: m["structure"].update(wings=2), "does not build a small_cnn"),
    (lambda m: m["structure"].update(channels=[]), "needs positive channels"),
])
def test_malformed_manifests_are_refused_precisely(cnn_dir, edit, words):
    _edit_manifest(cnn_dir, edit)
    with pytest.raises(InvalidArgument) as error:
        ModuleDir(cnn_dir.path).load()
    assert error.value.reason == "UNKNOWN_MODEL_FORMAT" and words in error.value.message, error.value.message


def test_broken_files_are_refused_precisely(cnn_dir, tmp_path):
    (cnn_dir.path / modules.MANIFEST).write_text("{not json")
    with pytest.raises(InvalidArgument, match="edgeforge-module.json is not JSON") as error:
        ModuleDir(cnn_dir.path)
    assert error.value.reason == "UNKNOWN_MODEL_FORMAT"

    torch.manual_seed(0)
    other = write_module_dir(SmallCNN(channels=[4, 8], hidden=16), tmp_path / "b", architecture="small_cnn",
                             task="image_classification", input=CNN_INPUT, source={})
    (other.path / "model.safetensors").unlink()
    with pytest.raises(InvalidArgument, match="small_cnn module b lacks model.safetensors"):
        ModuleDir(other.path)

    from safetensors.torch import save_file
    state = SmallCNN(channels=[4, 8], hidden=16).state_dict()
    save_file({**state, "fc.weight": torch.zeros(16, 8 * 7 * 7 + 1)}, str(other.path / "model.safetensors"))
    with pytest.raises(InvalidArgument, match=r"fc.weight has shape \(16, 393\); the structure implies \(16, 392\)") \
            as error:
        ModuleDir(other.path).load()
    assert error.value.reason == "MALFORMED_MODEL"
    save_file({k: v for k, v in state.items() if k != "head.bias"}, str(other.path / "model.safetensors"))
    with pytest.raises(InvalidArgument, match=r"1 tensors missing \(e.g. head.bias\)"):
        ModuleDir(other.path).load()
    save_file({**state, "head.bias": torch.full((10,), float("nan"))}, str(other.path / "model.safetensors"))
    with pytest.raises(InvalidArgument, match="head.bias contains NaN"):
        ModuleDir(other.path).load()


def test_unrecognised_sources_and_unsafe_tars(tmp_path, tiny_model_dir):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"hello, not a model" * 10)
    assert import_source(garbage, tmp_path / "a", None) is None
    assert import_source(tiny_model_dir, tmp_path / "b", None) is None             # a decoder directory
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_onnx(tmp_path / "ok.onnx").read_bytes()[:40])
    with pytest.raises(InvalidArgument, match="starts like an ONNX model but does not parse") as error:
        import_source(truncated, tmp_path / "c", "image_classification")
    assert error.value.reason == "UNKNOWN_MODEL_FORMAT" and not (tmp_path / "c").exists()
    with pytest.raises(InvalidArgument, match="task 'causal_lm' is not a module task"):
        import_source(truncated, tmp_path / "c", "causal_lm")

    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        tar.add(garbage, arcname="../escape.json")
    with pytest.raises(InvalidArgument, match="member '../escape.json' is not a plain file with a simple name"):
        modules.unpack(evil, tmp_path / "d")
    assert not (tmp_path / "d").exists() and modules.tar_family(evil) is None


def test_prepare_converts_layout_channels_and_size(cnn_dir):
    rgb = np.zeros((2, 3, 56, 56), np.uint8)                                   # (N, C, H, W), twice the size
    rgb[:, 0] = 255
    pixels = cnn_dir.prepare(Samples(images=rgb))["images"]
    assert pixels.shape == (2, 1, 28, 28) and pixels.dtype == np.float32
    luma = round(0.299 * 255) / 255
    assert np.allclose(pixels, (luma - 0.286) / 0.353, atol=1e-6)
    with pytest.raises(InvalidArgument, match="needs an image dataset"):
        cnn_dir.prepare(Samples(sentences=["a"]))
