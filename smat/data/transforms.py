"""Image transforms in plain torch: the protocol's train and test transforms and DiffAugment.

Episode transforms map a list of uint8 images (H×W or H×W×3, any sizes) and a
``numpy.random.Generator`` to a float tensor [B, 3, size, size] normalised
with ImageNet statistics. Geometry (crop, resize, flip) is per image, one
resize each; colour jitter and normalisation run once on the stacked batch.
All randomness comes from the generator passed in, so results are fixed by
the episode's seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Meta-Dataset protocol (PMF): resize to 146 then centre-crop 128, i.e. keep 128/146 of the short side.
TEST_CROP_FRACTION = 128 / 146


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 H×W, H×W×1, H×W×3 or H×W×4 → float [3, H, W] in [0, 1] (grey replicated, alpha dropped)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an H×W or H×W×{{1,3,4}} image, got shape {array.shape}")
    array = array[:, :, :3]
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = np.ascontiguousarray(array) if array.flags.writeable else array.copy()
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    tensor = tensor.to(torch.float32).div_(255.0)
    return tensor.expand(3, -1, -1) if tensor.shape[0] == 1 else tensor


def normalize(batch: torch.Tensor) -> torch.Tensor:
    mean = batch.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = batch.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


def denormalize(batch: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] (for pictures)."""
    mean = batch.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = batch.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch * std + mean).clamp_(0, 1)


def crop_resize(image: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop (top, left, height, width) from [3, H, W] and resize to size×size with antialiasing."""
    top, left, height, width = box
    patch = image[:, top:top + height, left:left + width]
    if patch.shape[1:] == (size, size):
        return patch
    return F.interpolate(patch[None], size=(size, size), mode="bilinear",
                         antialias=True, align_corners=False)[0]


def center_box(height: int, width: int, fraction: float) -> tuple[int, int, int, int]:
    side = max(1, round(min(height, width) * fraction))
    return (height - side) // 2, (width - side) // 2, side, side


def random_resized_box(height: int, width: int, rng: np.random.Generator,
                       scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box: 10 tries of area and log-aspect, else the centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_jitter(batch: torch.Tensor, rng: np.random.Generator, strength: float) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 − s, 1 + s], one set per image."""
    factors = torch.from_numpy(rng.uniform(1 - strength, 1 + strength, size=(3, len(batch), 1, 1, 1)))
    brightness, contrast, saturation = factors.to(batch.dtype)
    batch = (batch * brightness).clamp_(0, 1)
    mean = _grey(batch).mean(dim=(1, 2, 3), keepdim=True)
    batch = ((batch - mean) * contrast + mean).clamp_(0, 1)
    grey = _grey(batch)
    return (grey + (batch - grey) * saturation).clamp_(0, 1)


def _grey(batch: torch.Tensor) -> torch.Tensor:
    weights = batch.new_tensor((0.299, 0.587, 0.114)).view(1, 3, 1, 1)
    return (batch * weights).sum(dim=1, keepdim=True)


class EvalTransform:
    """Resize the short side to size·146/128 and centre-crop size×size; normalise."""

    def __init__(self, size: int = 128, crop_fraction: float = TEST_CROP_FRACTION, normalized: bool = True):
        self.size, self.crop_fraction, self.normalized = size, crop_fraction, normalized

    def __call__(self, images, rng: np.random.Generator | None = None) -> torch.Tensor:
        tensors = []
        for image in images:
            tensor = to_tensor(image)
            box = center_box(tensor.shape[1], tensor.shape[2], self.crop_fraction)
            tensors.append(crop_resize(tensor, box, self.size))
        batch = torch.stack(tensors)
        return normalize(batch) if self.normalized else batch


class TrainTransform:
    """RandomResizedCrop(size, scale), colour jitter (0.4), horizontal flip (p=½); normalise."""

    def __init__(self, size: int = 128, scale=(0.08, 1.0), jitter: float = 0.4, flip: bool = True,
                 normalized: bool = True):
        self.size, self.scale, self.jitter, self.flip = size, tuple(scale), jitter, flip
        self.normalized = normalized

    def __call__(self, images, rng: np.random.Generator) -> torch.Tensor:
        tensors = []
        for image in images:
            tensor = to_tensor(image)
            box = random_resized_box(tensor.shape[1], tensor.shape[2], rng, self.scale)
            tensor = crop_resize(tensor, box, self.size)
            if self.flip and rng.uniform() < 0.5:
                tensor = tensor.flip(-1)
            tensors.append(tensor)
        batch = torch.stack(tensors)
        if self.jitter > 0:
            batch = color_jitter(batch, rng, self.jitter)
        return normalize(batch) if self.normalized else batch


def diff_augment(x: torch.Tensor, generator: torch.Generator | None = None, probability: float = 0.9,
                 translation: float = 1 / 8, flip: bool = True) -> torch.Tensor:
    """DiffAugment-style augmentation of a support batch [B, C, H, W] for test-time fine-tuning.

    With ``probability`` per image: horizontal flip (p=½; ``flip=False`` for data where a mirrored image
    is another class, e.g. glyphs), brightness + U(−½, ½),
    saturation × U(0, 2), contrast × U(½, 3/2), and an integer translation of
    up to ``translation``·size pixels with zero fill. Differentiable in x;
    runs on x's device; draws from ``generator`` (on x's device) if given.
    """
    b, _, h, w = x.shape

    def uniform(*shape):
        return torch.rand(shape, generator=generator, device=x.device, dtype=x.dtype)

    mirror = uniform(b, 1, 1, 1) < (0.5 if flip else 0.0)
    out = torch.where(mirror, x.flip(-1), x)
    out = out + (uniform(b, 1, 1, 1) - 0.5)
    mean = out.mean(dim=1, keepdim=True)
    out = (out - mean) * (uniform(b, 1, 1, 1) * 2) + mean
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * (uniform(b, 1, 1, 1) + 0.5) + mean
    out = _translate(out, uniform, translation)
    apply = uniform(b, 1, 1, 1) < probability
    return torch.where(apply, out, x)


def _translate(x: torch.Tensor, uniform, ratio: float) -> torch.Tensor:
    b, c, h, w = x.shape
    shift_h, shift_w = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = (uniform(b) * (2 * shift_h + 1)).long() - shift_h
    dx = (uniform(b) * (2 * shift_w + 1)).long() - shift_w
    rows = torch.arange(h, device=x.device)[None, :] - dy[:, None]
    cols = torch.arange(w, device=x.device)[None, :] - dx[:, None]
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    gathered = x[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return gathered.permute(0, 3, 1, 2) * valid[:, None].to(x.dtype)
