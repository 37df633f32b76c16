"""SmallCNN, the image classifier edgeforge trains itself on real labelled data, and its data.

Data (both read offline):
- Fashion-MNIST (Xiao et al. 2017): 60,000 training and 10,000 test 28×28 grey images of 10 kinds of
  clothing, in the IDX files of the Debian package `dataset-fashion-mnist`. The IDX format (LeCun's
  MNIST page): a big-endian header — two zero bytes, a type code, the number of dimensions, then each
  dimension as uint32 — followed by exactly prod(dims) values. `parse_idx` checks all of it.
- scikit-learn's `load_digits` (UCI optical digits): 1,797 8×8 images, pixel values 0–16; the first
  1,437 (80 %, in file order) are the training split, the last 360 the test split.

Pixels are scaled to [0, 1] and then normalised with the training split's own mean and standard
deviation (`NORMALISATION`, computed once over every training pixel).

`prune_channels` removes whole output channels of every convolution (with the matching input channels
of the next one, or the matching flattened columns of the first linear) and whole hidden neurons (with
the matching columns of the classifier): the result is a smaller dense SmallCNN whose `structure()`
round-trips through a model bundle.
"""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from shared.errors import DataLoss, InvalidArgument

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
DATASETS = ("fashion-mnist", "digits")
# (mean, std) of the training split's pixels after scaling to [0, 1].
NORMALISATION = {"fashion-mnist": (0.2860, 0.3530), "digits": (0.3054, 0.3755)}
DIGITS_TRAIN = 1437
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------------------------------------- data

def parse_idx(data: bytes, name: str = "IDX file") -> np.ndarray:
    """An IDX file's bytes -> its array. A wrong magic number or type code is InvalidArgument; a
    header or payload shorter or longer than the header declares is DataLoss; both name `name`."""
    if len(data) < 4:
        raise DataLoss(f"{name}: truncated: {len(data)} bytes, shorter than the 4-byte magic number",
                       reason="MALFORMED_ARTIFACT")
    if data[0] or data[1]:
        raise InvalidArgument(f"{name}: not an IDX file: magic number {data[:4].hex()} does not start with "
                              "two zero bytes", reason="MALFORMED_ARTIFACT", field="dataset")
    code, ndim = data[2], data[3]
    if code not in IDX_TYPES:
        raise InvalidArgument(f"{name}: unknown IDX type code 0x{code:02x} (known: "
                              f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)})", reason="MALFORMED_ARTIFACT",
                              field="dataset")
    if ndim == 0:
        raise InvalidArgument(f"{name}: the IDX header declares 0 dimensions", reason="MALFORMED_ARTIFACT",
                              field="dataset")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataLoss(f"{name}: truncated header: {ndim} dimensions need {header} bytes, the file has "
                       f"{len(data)}", reason="MALFORMED_ARTIFACT")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    dtype = np.dtype(IDX_TYPES[code])
    expected = math.prod(dims) * dtype.itemsize
    if len(data) - header != expected:
        shape = "×".join(map(str, dims))
        what = "truncated" if len(data) - header < expected else "trailing bytes"
        raise DataLoss(f"{name}: {what}: the header declares {shape} {dtype.name} = {expected} data bytes, "
                       f"the file has {len(data) - header}", reason="MALFORMED_ARTIFACT")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file, gzip-compressed when its name ends in .gz."""
    path = Path(path)
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as error:
            raise DataLoss(f"{path}: corrupt gzip stream: {error}", reason="MALFORMED_ARTIFACT") from error
    return parse_idx(raw, str(path))


def load_fashion_mnist(split: str, root: Path = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of the 'train' or 'test' split."""
    if split not in FASHION_MNIST_FILES:
        raise InvalidArgument(f"split must be one of {list(FASHION_MNIST_FILES)}, got {split!r}", field="split")
    image_file, label_file = (root / name for name in FASHION_MNIST_FILES[split])
    for path in (image_file, label_file):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; install the Debian package dataset-fashion-mnist "
                                    "(`make setup`)")
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataLoss(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} do not pair up",
                       reason="MALFORMED_ARTIFACT")
    if labels.max(initial=0) >= 10:
        raise DataLoss(f"Fashion-MNIST {split}: label {int(labels.max())} is outside 0–9",
                       reason="MALFORMED_ARTIFACT")
    return images, labels


def load_dataset(name: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, S, S) float32 normalised, labels (N,) int64) of a dataset's split."""
    if name == "fashion-mnist":
        images, labels = load_fashion_mnist(split)
        pixels = images.astype(np.float32) / 255.0
    elif name == "digits":
        if split not in ("train", "test"):
            raise InvalidArgument(f"split must be 'train' or 'test', got {split!r}", field="split")
        from sklearn.datasets import load_digits
        digits = load_digits()
        part = slice(None, DIGITS_TRAIN) if split == "train" else slice(DIGITS_TRAIN, None)
        pixels, labels = digits.images[part].astype(np.float32) / 16.0, digits.target[part]
    else:
        raise InvalidArgument(f"dataset must be one of {list(DATASETS)}, got {name!r}", field="dataset")
    mean, std = NORMALISATION[name]
    x = torch.from_numpy((pixels - np.float32(mean)) / np.float32(std)).unsqueeze(1)   # (N, 1, S, S)
    return x.contiguous(), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------- model

class SmallCNN(nn.Module):
    """(B, in_channels, S, S) -> (B, classes) logits: [conv3×3 → ReLU → maxpool 2] per entry of
    `channels`, then flatten → linear(hidden) → ReLU → linear(classes)."""

    def __init__(self, channels: tuple[int, ...] | list[int] = (16, 32), hidden: int = 64, classes: int = 10,
                 image_size: int = 28, in_channels: int = 1):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1 or min(hidden, classes, in_channels) < 1:
            raise InvalidArgument(f"SmallCNN needs positive channels, hidden, classes and in_channels; got "
                                  f"channels={list(channels)}, hidden={hidden}, classes={classes}, "
                                  f"in_channels={in_channels}", field="structure")
        self.side = image_size >> len(channels)                       # every maxpool halves (floor) the side
        if self.side < 1:
            raise InvalidArgument(f"image_size {image_size} is too small for {len(channels)} 2×2 max-pools",
                                  field="structure.image_size")
        self.channels, self.hidden, self.classes = channels, hidden, classes
        self.image_size, self.in_channels = image_size, in_channels
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1)
                                   for a, b in zip((in_channels,) + channels, channels))
        self.fc = nn.Linear(channels[-1] * self.side * self.side, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            # stride given explicitly: coremltools maps max_pool2d only with its stride argument present
            x = F.max_pool2d(F.relu(conv(x)), 2, 2)                    # (B, C, S/2, S/2)
        return self.head(F.relu(self.fc(x.flatten(1))))

    def structure(self) -> dict:
        """The constructor's keyword arguments, JSON-serialisable: SmallCNN(**structure()) is this shape."""
        return {"channels": list(self.channels), "hidden": self.hidden, "classes": self.classes,
                "image_size": self.image_size, "in_channels": self.in_channels}


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy on (images, labels), in eval mode, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start:start + batch_size].to(device))
        correct += int((logits.argmax(-1).cpu() == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(images)


def train_reference_cnn(dataset: str = "fashion-mnist", seed: int = 0, *, epochs: int = 3, batch_size: int = 256,
                        learning_rate: float = 3e-3, structure: dict | None = None) -> tuple[SmallCNN, float]:
    """Trains the reference SmallCNN on the dataset's training split on the CPU; returns it (eval mode)
    and its test accuracy. The seed fixes the initial weights and the batch order, so a run is
    repeatable on the same machine and thread count. Fashion-MNIST: about a minute on 2 cores.

    AdamW with a cosine-decayed learning rate. This is a plain loop of its own rather than
    services.compressor.train.loop because shared code does not import the services."""
    train_x, train_y = load_dataset(dataset, "train")
    test_x, test_y = load_dataset(dataset, "test")
    shape = dict(structure or {"image_size": train_x.shape[-1]})
    with torch.random.fork_rng(devices=[]):                           # leaves the caller's RNG untouched
        torch.manual_seed(seed)
        model = SmallCNN(**shape)
    order = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), generator=order).split(batch_size):
            loss = F.cross_entropy(model(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    return model, accuracy(model, test_x, test_y)


# ------------------------------------------------------------------------------ structured pruning

def l1_scores(model: SmallCNN) -> dict[str, torch.Tensor]:
    """Each prunable unit's L1 weight norm (Li et al. 2017, "Pruning Filters for Efficient ConvNets"):
    one score per output channel of every convolution ("convs.i") and per hidden neuron ("fc")."""
    scores = {f"convs.{i}": conv.weight.detach().abs().sum(dim=(1, 2, 3)) for i, conv in enumerate(model.convs)}
    scores["fc"] = model.fc.weight.detach().abs().sum(dim=1)
    return scores


def kept_units(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices (ascending) of the units that stay: round(fraction·n) lowest scores go, at least one stays;
    among equal scores the later unit goes first."""
    count = len(scores)
    keep = max(1, count - round(fraction * count))
    best = torch.argsort(scores.detach().float().cpu(), descending=True, stable=True)[:keep]
    return best.sort().values


def prune_channels(model: SmallCNN, fraction: float, scores: dict[str, torch.Tensor] | None = None) -> SmallCNN:
    """A new, smaller SmallCNN without `fraction` of each convolution's output channels and of the hidden
    neurons. `scores` (keys "convs.0", …, "fc"; higher = more important) default to `l1_scores`. Its
    outputs equal the full model's with those channels' and neurons' weights and biases set to zero."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidArgument(f"prune.sparsity must be in [0, 1), got {fraction}", field="prune.sparsity")
    given = dict(scores or {})
    defaults = l1_scores(model)
    if unknown := sorted(set(given) - set(defaults)):
        raise InvalidArgument(f"scores for unknown layers {unknown}; SmallCNN's are {sorted(defaults)}",
                              field="prune.scores")
    keep = {}
    for name, default in defaults.items():
        score = given.get(name, default)
        if score.shape != default.shape:
            raise InvalidArgument(f"scores for {name} have shape {tuple(score.shape)}, expected "
                                  f"{tuple(default.shape)}", field="prune.scores")
        keep[name] = kept_units(score, fraction)
    structure = model.structure()
    structure["channels"] = [len(keep[f"convs.{i}"]) for i in range(len(model.convs))]
    structure["hidden"] = len(keep["fc"])
    pruned = SmallCNN(**structure).to(model.fc.weight.device)
    with torch.no_grad():
        inputs = torch.arange(model.in_channels)
        for i, (old, new) in enumerate(zip(model.convs, pruned.convs)):
            outputs = keep[f"convs.{i}"]
            new.weight.copy_(old.weight[outputs][:, inputs])            # (C_out', C_in', 3, 3)
            new.bias.copy_(old.bias[outputs])
            inputs = outputs
        area = model.side * model.side                                 # flatten is channel-major
        columns = (inputs[:, None] * area + torch.arange(area)).reshape(-1)
        neurons = keep["fc"]
        pruned.fc.weight.copy_(model.fc.weight[neurons][:, columns])
        pruned.fc.bias.copy_(model.fc.bias[neurons])
        pruned.head.weight.copy_(model.head.weight[:, neurons])
        pruned.head.bias.copy_(model.head.bias)
    return pruned.train(model.training)
