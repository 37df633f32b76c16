"""SmallCNN and its data: the strict IDX parser, the real datasets, the structure round trip, and
structured channel pruning against zeroing the same channels in the full model."""
from __future__ import annotations

import copy
import gzip
import json
import struct

import numpy as np
import pytest
import torch

from shared.errors import DataLoss, InvalidArgument
from shared.models import cnn
from shared.models.cnn import SmallCNN, l1_scores, parse_idx, prune_channels, read_idx


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def random_cnn(seed: int = 0, **structure) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(**structure)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.3)             # non-zero biases everywhere: zeroing must zero them too
    return model.eval()


# ------------------------------------------------------------------------------------------ IDX

def test_idx_parses_well_formed_files_of_every_width(tmp_path):
    images = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(images, 0x08)), images)
    labels = np.array([7, -1, 1 << 20], dtype=">i4")
    parsed = parse_idx(idx_bytes(labels, 0x0C))
    assert parsed.dtype == np.int32 and parsed.tolist() == [7, -1, 1 << 20]
    values = np.array([[0.5, -2.25]], dtype=">f4")
    assert parse_idx(idx_bytes(values, 0x0D)).tolist() == [[0.5, -2.25]]
    path = tmp_path / "tiny-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images, 0x08)))
    assert np.array_equal(read_idx(path), images)


@pytest.mark.parametrize("data, error, message", [
    (b"\x00\x00", DataLoss, "truncated: 2 bytes, shorter than the 4-byte magic number"),
    (b"\x1f\x8b\x08\x03" + b"\x00" * 12, InvalidArgument, "not an IDX file: magic number 1f8b0803"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01x", InvalidArgument, "unknown IDX type code 0x07"),
    (b"\x00\x00\x08\x00", InvalidArgument, "declares 0 dimensions"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02\x00\x00", DataLoss, "truncated header: 3 dimensions need 16 bytes, "
                                                            "the file has 10"),
])
def test_idx_rejects_malformed_headers_precisely(data, error, message):
    with pytest.raises(error, match=message) as raised:
        parse_idx(data, "x.idx")
    assert raised.value.message.startswith("x.idx: ")
    assert raised.value.reason == "MALFORMED_ARTIFACT"


def test_idx_rejects_truncated_and_overlong_payloads():
    good = idx_bytes(np.zeros((2, 3), np.uint8), 0x08)
    with pytest.raises(DataLoss, match=r"truncated: the header declares 2×3 uint8 = 6 data bytes, the file has 5"):
        parse_idx(good[:-1], "t")
    with pytest.raises(DataLoss, match="trailing bytes: the header declares 2×3 uint8 = 6 data bytes, the file "
                                       "has 7"):
        parse_idx(good + b"\x00", "t")
    shorts = idx_bytes(np.zeros(3, ">i2"), 0x0B)
    with pytest.raises(DataLoss, match="3 int16 = 6 data bytes, the file has 4"):
        parse_idx(shorts[:-2], "t")


def test_read_idx_reports_a_corrupt_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 4), np.uint8), 0x08))[:-6])
    with pytest.raises(DataLoss, match="corrupt gzip stream"):
        read_idx(path)


# ----------------------------------------------------------------------------------------- data

@pytest.mark.skipif(not cnn.FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_test_split_is_the_real_one():
    images, labels = cnn.load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    mean, std = cnn.NORMALISATION["fashion-mnist"]
    assert abs(images.mean() / 255 - mean) < 0.01 and abs(images.std() / 255 - std) < 0.01


def test_digits_splits_and_normalisation():
    train_x, train_y = cnn.load_dataset("digits", "train")
    test_x, test_y = cnn.load_dataset("digits", "test")
    assert train_x.shape == (1437, 1, 8, 8) and test_x.shape == (360, 1, 8, 8)
    assert train_y.dtype == torch.int64 and set(test_y.tolist()) == set(range(10))
    assert abs(float(train_x.mean())) < 1e-3 and abs(float(train_x.std()) - 1.0) < 1e-3
    with pytest.raises(InvalidArgument, match="dataset must be one of"):
        cnn.load_dataset("cifar", "train")
    with pytest.raises(InvalidArgument, match="split must be"):
        cnn.load_dataset("digits", "validation")


def test_train_reference_cnn_on_digits_learns_and_repeats():
    shape = {"channels": [8, 16], "hidden": 32, "image_size": 8}
    model, accuracy = cnn.train_reference_cnn("digits", seed=1, epochs=5, batch_size=64, structure=shape)
    again, same = cnn.train_reference_cnn("digits", seed=1, epochs=5, batch_size=64, structure=shape)
    assert accuracy > 0.75 and same == accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not model.training


# -------------------------------------------------------------------------------- model, pruning

def test_structure_round_trips_through_json():
    model = random_cnn(channels=(5, 7, 9), hidden=11, classes=4, image_size=16, in_channels=3)
    structure = json.loads(json.dumps(model.structure()))
    assert structure == {"channels": [5, 7, 9], "hidden": 11, "classes": 4, "image_size": 16, "in_channels": 3}
    rebuilt = SmallCNN(**structure)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(rebuilt.eval()(x), model(x))
    assert model(x).shape == (2, 4)


def test_structure_is_validated():
    with pytest.raises(InvalidArgument, match="too small for 3 2×2 max-pools"):
        SmallCNN(channels=(4, 4, 4), image_size=7)
    with pytest.raises(InvalidArgument, match="positive channels"):
        SmallCNN(channels=(4, 0))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 0.9])
def test_prune_channels_equals_zeroing_those_channels(fraction):
    model = random_cnn(channels=(8, 12), hidden=20, image_size=12, in_channels=2)
    pruned = prune_channels(model, fraction)
    zeroed = copy.deepcopy(model)
    keep = {name: cnn.kept_units(score, fraction) for name, score in l1_scores(model).items()}
    with torch.no_grad():
        for name in keep:
            layer = zeroed.get_submodule(name)
            dropped = torch.ones(len(layer.bias), dtype=torch.bool)
            dropped[keep[name]] = False
            layer.weight[dropped] = 0.0
            layer.bias[dropped] = 0.0
    x = torch.randn(6, 2, 12, 12)
    torch.testing.assert_close(pruned(x), zeroed(x), rtol=1e-5, atol=1e-5)
    expected = [8 - round(fraction * 8), 12 - round(fraction * 12)]
    assert pruned.structure()["channels"] == expected and pruned.hidden == 20 - round(fraction * 20)
    if fraction:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_prune_channels_drops_the_lowest_scores_and_keeps_one():
    model = random_cnn(channels=(4, 4), hidden=6, image_size=8)
    scores = {"convs.0": torch.tensor([3.0, 0.0, 2.0, 1.0]), "fc": torch.arange(6.0)}
    pruned = prune_channels(model, 0.5, scores)
    torch.testing.assert_close(pruned.convs[0].weight, model.convs[0].weight[[0, 2]])
    torch.testing.assert_close(pruned.fc.bias, model.fc.bias[[3, 4, 5]])
    assert prune_channels(model, 0.99).structure()["channels"] == [1, 1]


def test_prune_channels_validates_its_arguments():
    model = random_cnn(channels=(4, 4), hidden=6, image_size=8)
    with pytest.raises(InvalidArgument, match=r"prune.sparsity must be in \[0, 1\), got 1.0"):
        prune_channels(model, 1.0)
    with pytest.raises(InvalidArgument, match=r"unknown layers \['head'\]"):
        prune_channels(model, 0.5, {"head": torch.ones(10)})
    with pytest.raises(InvalidArgument, match=r"scores for fc have shape \(5,\), expected \(6,\)"):
        prune_channels(model, 0.5, {"fc": torch.ones(5)})
