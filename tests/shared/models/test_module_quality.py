"""Quality metrics of image classifiers and text encoders checked by hand on small arrays, evaluate()
on tiny real graphs, and the runtimes' runners agreeing with the torch reference."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from shared.errors import FailedPrecondition, InvalidArgument
from shared.models import module_quality as quality
from shared.models.cnn import SmallCNN
from shared.models.module_data import Samples
from shared.models.module_import import import_source
from shared.models.modules import write_module_dir

LOGITS = np.array([[2, 1, 0], [0, 3, 1], [1, 0, 5], [4, 4.5, 0]], np.float32)        # argmax 0, 1, 2, 1
REFERENCE = np.array([[5, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]], np.float32)       # argmax 0, 1, 2, 0
LABELS = np.array([0, 2, 2, 0])


def test_metrics_by_hand():
    assert quality.top1_accuracy(LOGITS, LABELS) == 0.5
    assert quality.top1_agreement(LOGITS, REFERENCE) == 0.75
    assert quality.topk_accuracy(LOGITS, LABELS, 2) == 1.0                   # 2 is second in row 1, 0 in row 3
    assert quality.topk_accuracy(LOGITS, np.array([2, 0, 0, 2]), 1) == 0.0
    assert np.allclose(quality.cosine(np.array([[1.0, 0], [1, 1], [2, 0]]), np.array([[0.0, 1], [3, 3], [-1, 0]])),
                       [0.0, 1.0, -1.0])
    # ranks of y: 1 2 4 3 -> sum d^2 = 2 -> 1 - 6·2 / (4·15) = 0.8
    assert quality.spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 40, 30])) == pytest.approx(0.8)
    assert quality.spearman(np.array([1, 2, 3]), np.array([3, 2, 1])) == pytest.approx(-1.0)


def _image_module(tmp_path):
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["x"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "W"], ["logits"])], "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    return import_source(tmp_path / "m.onnx", tmp_path / "module", "image_classification")


def test_evaluate_images_labelled_and_unlabelled(tmp_path):
    module_dir = _image_module(tmp_path)
    images = np.zeros((4, 8, 8, 3), np.uint8)
    run, reference = (lambda inputs: LOGITS[:len(inputs["x"])]), (lambda inputs: REFERENCE[:len(inputs["x"])])
    result = quality.evaluate("image_classification", run, reference, module_dir, Samples(images=images, labels=LABELS))
    assert result == {"metric": "top1_accuracy", "value": 0.5, "higher_is_better": True, "samples": 4,
                      "metrics": {"top1_accuracy": 0.5, "top1_agreement": 0.75, "samples": 4.0}}
    photos = quality.evaluate("image_classification", run, reference, module_dir, Samples(images=images), 3)
    assert (photos["metric"], photos["value"], photos["samples"]) == ("top1_agreement", 1.0, 3)
    with pytest.raises(InvalidArgument, match="a reference runner is required"):
        quality.evaluate("image_classification", run, None, module_dir, Samples(images=images))
    with pytest.raises(InvalidArgument, match="label 7; the model has 3 classes"):
        quality.evaluate("image_classification", run, None, module_dir,
                         Samples(images=images, labels=np.array([0, 1, 2, 7])))
    with pytest.raises(FailedPrecondition, match="NaN or Inf"):
        quality.evaluate("image_classification", lambda inputs: LOGITS * np.nan, None, module_dir,
                         Samples(images=images, labels=LABELS))
    with pytest.raises(FailedPrecondition, match=r"returned shape \(2, 3\); expected \(4, "):
        quality.evaluate("image_classification", lambda inputs: LOGITS[:2], None, module_dir,
                         Samples(images=images, labels=LABELS))
    with pytest.raises(InvalidArgument, match="task text_embedding does not match"):
        quality.evaluate("text_embedding", run, run, module_dir, Samples(sentences=["a"]))


def test_evaluate_text_pools_token_states_and_scores_word_pairs(tmp_path):
    table = np.random.default_rng(0).normal(size=(30522, 6)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("Gather", ["E", "input_ids"], ["states"])], "enc",
                              [helper.make_tensor_value_info(n, TensorProto.INT64, ["N", "T"])
                               for n in ("input_ids", "attention_mask")],
                              [helper.make_tensor_value_info("states", TensorProto.FLOAT, ["N", "T", 6])],
                              [numpy_helper.from_array(table, "E")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "e.onnx"))
    module_dir = import_source(tmp_path / "e.onnx", tmp_path / "module", "text_embedding")
    reference = quality.runner("reference", None, module_dir)
    sentences = ["the cat sat on the mat", "dogs bark", "a much longer sentence about the stock market today"]
    inputs = module_dir.prepare(Samples(sentences=sentences))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    expected = np.stack([table[ids[i, mask[i] == 1]].mean(0) for i in range(3)])       # masked mean of states
    assert np.allclose(reference(inputs), expected, atol=1e-6)

    pairs = [("cat", "dog", 8.0), ("cat", "market", 1.0), ("stock", "market", 7.0), ("dog", "stock", 0.5)]
    noisy = lambda inputs: reference(inputs) + 0.1 * np.random.default_rng(1).normal(size=(len(inputs["input_ids"]), 6))
    result = quality.evaluate("text_embedding", noisy, reference, module_dir,
                              Samples(sentences=sentences, word_pairs=pairs))
    words = module_dir.prepare(Samples(sentences=["cat", "dog", "market", "stock"]))
    vectors = dict(zip(["cat", "dog", "market", "stock"], noisy(words)))
    by_hand = quality.spearman(np.array([quality.cosine(vectors[a][None], vectors[b][None])[0] for a, b, _ in pairs]),
                               np.array([s for _, _, s in pairs]))
    cosines = quality.cosine(noisy(inputs), reference(inputs))
    assert result["metric"] == "cosine_similarity" and result["value"] == pytest.approx(cosines.mean())
    assert result["metrics"]["cosine_similarity_min"] == pytest.approx(cosines.min())
    assert result["metrics"]["wordsim_spearman"] == pytest.approx(by_hand) and result["metrics"]["word_pairs"] == 4


@pytest.fixture
def cnn_dir(tmp_path):
    torch.manual_seed(0)
    return write_module_dir(SmallCNN(channels=[4, 8], hidden=16), tmp_path / "cnn", architecture="small_cnn",
                            task="image_classification", source={},
                            input={"image": {"channels": 1, "size": 28, "mean": [0.286], "std": [0.353]},
                                   "names": ["images"]})


def test_onnx_runner_agrees_with_the_torch_reference_across_batches(cnn_dir, tmp_path):
    loaded = cnn_dir.load()
    torch.onnx.export(loaded.module, loaded.example_inputs, str(tmp_path / "cnn.onnx"), dynamo=False,
                      input_names=loaded.input_names, output_names=loaded.output_names,
                      dynamic_axes=loaded.dynamic_axes)
    inputs = cnn_dir.prepare(Samples(images=np.random.default_rng(0).integers(0, 256, (70, 28, 28), np.uint8)))
    ours = quality.runner("reference", None, cnn_dir)(inputs)
    theirs = quality.runner("onnx", tmp_path / "cnn.onnx", cnn_dir)(inputs)
    assert ours.shape == (70, 10) and np.abs(ours - theirs).max() < 1e-4
    with pytest.raises(InvalidArgument, match="format 'coreml' has no runner here"):
        quality.runner("coreml", tmp_path, cnn_dir)
    with pytest.raises(FailedPrecondition, match="onnxruntime could not load cnn.onnx"):
        (tmp_path / "cnn.onnx").write_bytes(b"\x08\x07broken")
        quality.runner("onnx", tmp_path / "cnn.onnx", cnn_dir)


def test_tflite_inputs_fit_fixed_signatures():
    detail = {"shape_signature": np.array([4, 6]), "dtype": np.int32, "quantization": (0.0, 0)}
    fitted = quality._fit(np.array([[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 0, 0, 0, 0, 0, 0]]), detail)
    assert fitted.dtype == np.int32 and fitted.tolist() == [[1, 2, 3, 4, 5, 6], [9, 9, 0, 0, 0, 0],
                                                            [9, 9, 0, 0, 0, 0], [9, 9, 0, 0, 0, 0]]
    short = quality._fit(np.array([[1, 2]]), {**detail, "shape_signature": np.array([-1, 4])})
    assert short.tolist() == [[1, 2, 0, 0]]
    int8 = {"shape_signature": np.array([-1, 2]), "dtype": np.int8, "quantization": (0.5, -3)}
    assert quality._fit(np.array([[1.0, -100.0]]), int8).tolist() == [[-1, -128]]
    assert quality._dequantized(np.array([[-1, 5]], np.int8), int8).tolist() == [[1.0, 4.0]]
    batches = list(quality._batches({"input_ids": np.arange(12).reshape(3, 4),
                                     "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]])}, 2))
    assert [b["input_ids"].shape for b in batches] == [(2, 2), (1, 3)]          # cut to each batch's longest


@pytest.mark.slow
def test_tflite_runner_agrees_with_the_torch_reference(cnn_dir, tmp_path):
    import litert_torch
    loaded = cnn_dir.load()
    litert_torch.convert(loaded.module, loaded.example_inputs).export(str(tmp_path / "cnn.tflite"))   # batch fixed: 2
    inputs = cnn_dir.prepare(Samples(images=np.random.default_rng(0).integers(0, 256, (5, 28, 28), np.uint8)))
    ours = quality.runner("reference", None, cnn_dir)(inputs)
    theirs = quality.runner("tflite", tmp_path / "cnn.tflite", cnn_dir)(inputs)
    assert theirs.shape == (5, 10) and np.abs(ours - theirs).max() < 1e-4
