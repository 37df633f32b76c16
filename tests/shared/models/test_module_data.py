"""Dataset artifacts of the module families: round trips, and malformed files refused with the field
and the problem named."""
from __future__ import annotations

import json

import numpy as np
import pytest

from shared.errors import InvalidArgument
from shared.models.module_data import (fit_image, load_images, load_samples, load_sentences, save_images,
                                       save_sentences, wordsim353)


def test_images_round_trip_with_and_without_labels(tmp_path):
    rng = np.random.default_rng(0)
    gray, rgb = rng.integers(0, 256, (5, 28, 28), np.uint8), rng.integers(0, 256, (2, 9, 7, 3), np.uint8)
    save_images(tmp_path / "gray.npz", gray, np.array([0, 1, 2, 3, 9], np.uint8))
    save_images(tmp_path / "rgb.npz", rgb)
    samples = load_samples(tmp_path / "gray.npz", "image_classification")
    assert np.array_equal(samples.images, gray) and samples.labels.dtype == np.int64 and len(samples) == 5
    assert samples.labels.tolist() == [0, 1, 2, 3, 9] and samples.sentences is None
    photos = load_images(tmp_path / "rgb.npz")
    assert np.array_equal(photos.images, rgb) and photos.labels is None
    head = samples.head(2)
    assert len(head) == 2 and head.labels.tolist() == [0, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray.npz", "rgb.npz"]       # no staging files left


@pytest.mark.parametrize("arrays, words", [
    (dict(images=np.zeros((2, 4, 4), np.float32)), "`images` are float32; expected uint8"),
    (dict(images=np.zeros((2, 4, 4, 4), np.uint8)), "shape (2, 4, 4, 4); expected (N, H, W) gray"),
    (dict(images=np.zeros((0, 4, 4), np.uint8)), "no pixels"),
    (dict(pixels=np.zeros((2, 4, 4), np.uint8)), "has arrays ['pixels']"),
    (dict(labels=np.zeros(2, np.int64)), "has no `images` array"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3, np.int64)), "shape (3,); expected (2,)"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0.0, 1.0])), "float64; expected integer"),
    (dict(images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1])), "include -1"),
    (dict(images=np.array([{"a": 1}, None], dtype=object)), "not a readable .npz"),
])
def test_malformed_image_datasets_are_refused(tmp_path, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InvalidArgument) as error:
        load_samples(path, "image_classification", field="evaluation_dataset")
    assert words in error.value.message and error.value.field == "evaluation_dataset", error.value.message


def test_an_image_task_refuses_text(tmp_path):
    (tmp_path / "a.txt").write_text("one sentence\n")
    with pytest.raises(InvalidArgument, match="not an .npz archive of images"):
        load_samples(tmp_path / "a.txt", "image_classification")
    with pytest.raises(InvalidArgument, match="task 'causal_lm' has no module dataset format"):
        load_samples(tmp_path / "a.txt", "causal_lm")


def test_sentences_from_json_and_plain_text(tmp_path):
    save_sentences(tmp_path / "s.json", ["A cat.", "Ein Hund läuft."], [("tiger", "cat", 7.35)])
    samples = load_samples(tmp_path / "s.json", "text_embedding")
    assert samples.sentences == ["A cat.", "Ein Hund läuft."] and samples.word_pairs == [("tiger", "cat", 7.35)]
    (tmp_path / "s.txt").write_text("First line.\n\n  Second line.  \n")
    assert load_sentences(tmp_path / "s.txt").sentences == ["First line.", "Second line."]


@pytest.mark.parametrize("content, words", [
    (b"{\"sentences\": [\"a\"", "not valid JSON"),
    (b"{\"sentences\": \"a\"}", "`sentences` must be a list of strings"),
    (b"{\"sentences\": [\"a\", \"  \"]}", "sentences[1] is '  '; expected a non-empty string"),
    (b"{\"sentences\": [\"a\"], \"labels\": [1]}", "has keys ['labels']"),
    (b"{\"sentences\": [\"a\"], \"word_pairs\": [[\"a\", \"b\"]]}", "word_pairs[0] is [\"a\", \"b\"]"),
    (b"{\"sentences\": [\"a\"], \"word_pairs\": [[\"a\", \"b\", \"high\"]]}", "expected [word, word, finite score]"),
    (b"{\"sentences\": [\"a\"], \"word_pairs\": []}", "non-empty list"),
    (b"{\"sentences\": []}", "holds no sentences"),
    (b"\n \n", "holds no sentences"),
    (b"caf\xe9\n", "not UTF-8 text (byte 3)"),
    (b"PK\x03\x04rest", "is a zip (an image .npz?)"),
])
def test_malformed_text_datasets_are_refused(tmp_path, content, words):
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(InvalidArgument) as error:
        load_samples(path, "text_embedding", field="dataset")
    assert words in error.value.message and error.value.field.startswith("dataset"), error.value.message


def test_wordsim353_and_fit_image():
    pairs = wordsim353()
    assert len(pairs) == 353 and pairs[1] == ("tiger", "cat", 7.35)
    json.dumps(pairs)
    image = np.zeros((300, 451, 3), np.uint8)
    assert fit_image(image, 224, short_side=256).shape == (224, 224, 3)
    assert fit_image(np.zeros((10, 20), np.uint8), 8).shape == (8, 8)
    same = np.ones((8, 8), np.uint8)
    assert fit_image(same, 8) is same
