"""Dataset artifacts of the module families: images for classifiers, sentences for text encoders.

Images: an .npz (numpy's zip of arrays, read with allow_pickle=False) holding
  `images`  uint8, (N, H, W) gray or (N, H, W, 3) RGB;
  `labels`  optional integer class ids, (N,), stored as any integer dtype and read as int64.
Text: a JSON object {"sentences": [str, ...], "word_pairs": [[word, word, score], ...]} ("word_pairs"
optional: human similarity judgements such as WordSim-353), or plain UTF-8 text with one sentence per
line (blank lines skipped).

Every malformed file is an InvalidArgument naming the field and what is wrong, so a build fails when
the dataset is uploaded against a model, not halfway through an evaluation.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from shared.errors import InvalidArgument

IMAGE_TASK, TEXT_TASK = "image_classification", "text_embedding"
IMAGE_KEYS = ("images", "labels")
TEXT_KEYS = ("sentences", "word_pairs")
MAX_DECODED_BYTES = 4 << 30                    # an .npz member larger than this once decompressed is refused


@dataclasses.dataclass(frozen=True)
class Samples:
    """One dataset: images (uint8, (N, H, W) or (N, H, W, 3)) or sentences, with optional labels
    (int64 (N,)) and word pairs ((word, word, human score), independent of N)."""
    images: np.ndarray | None = None
    sentences: list[str] | None = None
    labels: np.ndarray | None = None
    word_pairs: list[tuple[str, str, float]] | None = None

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.sentences or ())

    def head(self, count: int) -> "Samples":
        """The first `count` samples (labels alike); word pairs are kept whole."""
        return dataclasses.replace(
            self, images=None if self.images is None else self.images[:count],
            sentences=None if self.sentences is None else self.sentences[:count],
            labels=None if self.labels is None else self.labels[:count])


def load_samples(path: Path, task: str, field: str = "dataset") -> Samples:
    """The dataset at `path` for a model of `task` ("image_classification" or "text_embedding")."""
    if task == IMAGE_TASK:
        return load_images(path, field)
    if task == TEXT_TASK:
        return load_sentences(path, field)
    raise InvalidArgument(f"task {task!r} has no module dataset format (expected {IMAGE_TASK} or {TEXT_TASK})",
                          field="task")


def load_images(path: Path, field: str = "dataset") -> Samples:
    if not zipfile.is_zipfile(path):
        raise InvalidArgument(f"{field} is not an .npz archive of images (no zip header); an image dataset is "
                              "an .npz with `images` uint8 (N, H, W) or (N, H, W, 3) and optional `labels`",
                              field=field)
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            unknown = [k for k in keys if k not in IMAGE_KEYS]
            if unknown:
                raise InvalidArgument(f"{field} has arrays {unknown}; an image dataset holds only {list(IMAGE_KEYS)}",
                                      field=field)
            if "images" not in keys:
                raise InvalidArgument(f"{field} has no `images` array (found {keys})", field=field)
            _check_sizes(path, field)
            images = archive["images"]
            labels = archive["labels"] if "labels" in keys else None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as error:   # pickled objects, truncated members
        raise InvalidArgument(f"{field} is not a readable .npz: {error}", field=field) from error
    if images.dtype != np.uint8:
        raise InvalidArgument(f"{field} `images` are {images.dtype}; expected uint8 pixels", field=field)
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise InvalidArgument(f"{field} `images` have shape {images.shape}; expected (N, H, W) gray or "
                              "(N, H, W, 3) RGB", field=field)
    if min(images.shape) == 0:
        raise InvalidArgument(f"{field} `images` have shape {images.shape}: no pixels", reason="INSUFFICIENT_DATA",
                              field=field)
    if labels is not None:
        labels = _checked_labels(labels, len(images), field)
    return Samples(images=images, labels=labels)


def _check_sizes(path: Path, field: str) -> None:
    """Refuses members whose decompressed size would exhaust memory (a zip bomb) before reading them."""
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size > MAX_DECODED_BYTES:
                raise InvalidArgument(f"{field} member {info.filename} decompresses to {info.file_size} bytes "
                                      f"(limit {MAX_DECODED_BYTES})", reason="TOO_LARGE", field=field)


def _checked_labels(labels: np.ndarray, count: int, field: str) -> np.ndarray:
    if not np.issubdtype(labels.dtype, np.integer):
        raise InvalidArgument(f"{field} `labels` are {labels.dtype}; expected integer class ids", field=field)
    if labels.shape != (count,):
        raise InvalidArgument(f"{field} `labels` have shape {labels.shape}; expected ({count},), one per image",
                              field=field)
    if count and labels.min() < 0:
        raise InvalidArgument(f"{field} `labels` include {int(labels.min())}; class ids are ≥ 0", field=field)
    return labels.astype(np.int64)


def load_sentences(path: Path, field: str = "dataset") -> Samples:
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        raise InvalidArgument(f"{field} is a zip (an image .npz?), not text: a text dataset is a JSON object "
                              "with `sentences` or one sentence per line", field=field)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"{field} is not UTF-8 text (byte {error.start})", field=field) from error
    if text.lstrip().startswith("{"):
        samples = _json_samples(text, field)
    else:
        samples = Samples(sentences=[line.strip() for line in text.splitlines() if line.strip()])
    if not samples.sentences:
        raise InvalidArgument(f"{field} holds no sentences", reason="INSUFFICIENT_DATA", field=field)
    return samples


def _json_samples(text: str, field: str) -> Samples:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{field} is not valid JSON: {error}", field=field) from error
    if not isinstance(document, dict):
        raise InvalidArgument(f"{field} is a JSON {type(document).__name__}; expected an object", field=field)
    unknown = sorted(set(document) - set(TEXT_KEYS))
    if unknown:
        raise InvalidArgument(f"{field} has keys {unknown}; a text dataset holds only {list(TEXT_KEYS)}", field=field)
    sentences = document.get("sentences")
    if not isinstance(sentences, list):
        raise InvalidArgument(f"{field} `sentences` must be a list of strings", field=f"{field}.sentences")
    for i, sentence in enumerate(sentences):
        if not isinstance(sentence, str) or not sentence.strip():
            raise InvalidArgument(f"{field} sentences[{i}] is {sentence!r:.60}; expected a non-empty string",
                                  field=f"{field}.sentences")
    pairs = document.get("word_pairs")
    return Samples(sentences=sentences, word_pairs=None if pairs is None else _word_pairs(pairs, field))


def _word_pairs(pairs, field: str) -> list[tuple[str, str, float]]:
    if not isinstance(pairs, list) or not pairs:
        raise InvalidArgument(f"{field} `word_pairs` must be a non-empty list of [word, word, score]",
                              field=f"{field}.word_pairs")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 3 and all(isinstance(w, str) and w.strip() for w in pair[:2])
                and isinstance(pair[2], (int, float)) and not isinstance(pair[2], bool) and np.isfinite(pair[2])):
            raise InvalidArgument(f"{field} word_pairs[{i}] is {json.dumps(pair)[:80]}; expected [word, word, "
                                  "finite score]", field=f"{field}.word_pairs")
        out.append((pair[0], pair[1], float(pair[2])))
    return out


# ---------------------------------------------------------------- writing (assets, tests)

def save_images(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> None:
    """Writes an image dataset atomically (compressed .npz), in the layout load_images reads."""
    arrays = {"images": np.ascontiguousarray(images, dtype=np.uint8)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    _write_atomic(path, buffer.getvalue())


def save_sentences(path: Path, sentences: list[str], word_pairs: list[tuple[str, str, float]] | None = None) -> None:
    document: dict = {"sentences": list(sentences)}
    if word_pairs is not None:
        document["word_pairs"] = [[a, b, float(score)] for a, b, score in word_pairs]
    _write_atomic(path, json.dumps(document, ensure_ascii=False, indent=0).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353 (Finkelstein et al. 2002) as shipped in gensim's test data: 353 word pairs with the
    mean human similarity score (0–10)."""
    import gensim
    path = Path(gensim.__file__).parent / "test" / "test_data" / "wordsim353.tsv"
    pairs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            first, second, score = line.split("\t")
            pairs.append((first, second, float(score)))
    return pairs


def fit_image(image: np.ndarray, size: int, short_side: int | None = None) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) -> (size, size[, C]): the short side resized to `short_side` (default
    `size`) with bilinear filtering, then the centre cropped — torchvision's Resize + CenterCrop.
    An image already size×size is returned unchanged."""
    from PIL import Image
    if image.shape[:2] == (size, size):
        return image
    picture = Image.fromarray(np.ascontiguousarray(image))
    short = short_side or size
    width, height = picture.size
    scale = short / min(width, height)
    picture = picture.resize((max(short, round(width * scale)), max(short, round(height * scale))), Image.BILINEAR)
    width, height = picture.size
    left, top = (width - size) // 2, (height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)))
