"""Procedural pre-training families, disjoint by construction from the test shapes and textures.

The built-in backbone is pre-trained on glyphs only in grey; the shapes and
textures domains ask for colour-invariant features of geometry and of
texture. These families give them, without reusing any test family:

- ``harmonic_outline``: a class is one random star-shaped outline r(θ) = 1 + Σ_k a_k cos(kθ + φ_k)
  (k = 2 … 6, coefficients drawn per class) in a fill style. A candidate whose
  canonical mask overlaps any test shape family (``shapes.FAMILIES``, any
  rotation) with IoU ≥ ``MAX_SHAPE_IOU`` is rejected, so no class is a circle,
  ellipse, polygon or star of the test set.
- ``scribble``: a class is a fixed set of 2–3 random quadratic Bézier strokes,
  a line drawing; instances jitter the control points and the stroke width
  and are drawn dark on white like the glyphs.
- ``wave_mixture``: a class is a texture of 2–3 plane waves with its own
  frequencies (``WAVE_FREQUENCIES``, never the test textures' 4 or 10 cycles),
  relative angles kept 20° away from parallel and perpendicular (no stripes,
  checkers, plaids or grids) and its own non-linearity.
- ``bandpass_noise``: a class is Gaussian noise filtered to a ring or an oriented
  lobe of the spectrum (centre frequency and bandwidth per class), levelled
  or thresholded.

Instances of every class vary position, size, rotation and colours, the same
nuisances as the test domains, so that what is learnt is the form.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .shapes import CANVAS, FAMILIES, FREQUENCIES, _compose

MAX_SHAPE_IOU = 0.8
WAVE_FREQUENCIES = (5.5, 7.0, 8.5, 12.5, 14.0)  # cycles across the image; the test textures use 4 and 10
BANDPASS_CENTRES = (3.0, 5.5, 7.0, 8.5, 12.5)
KINDS = ("harmonic_outline", "scribble", "wave_mixture", "bandpass_noise")  # none is a test family name
assert not set(WAVE_FREQUENCIES + BANDPASS_CENTRES) & set(FREQUENCIES.values())


def polygon_mask(polygons, rotation: float = 0.0, radius: float = CANVAS * 0.4, centre=(CANVAS / 2, CANVAS / 2)):
    """Filled mask of [(points in [-1, 1]², ink)] on the CANVAS grid, as bool."""
    cos, sin = np.cos(rotation), np.sin(rotation)
    turn = np.array([[cos, -sin], [sin, cos]])
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(image)
    for points, ink in polygons:
        draw.polygon([tuple(p) for p in points @ turn.T * radius + np.asarray(centre)], fill=255 * ink)
    return np.asarray(image) > 127


def _test_family_masks() -> list[np.ndarray]:
    """Every test shape family at rotations of 10°, each scaled to fit the same box as a blob."""
    masks = []
    for parts in FAMILIES.values():
        for degrees in range(0, 360, 10):
            masks.append(polygon_mask(parts, np.deg2rad(degrees)))
    return masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def blob_outline(rng: np.random.Generator) -> np.ndarray:
    """A random star-shaped outline in [-1, 1]²: r(θ) = 1 + Σ_k a_k cos(kθ + φ_k), scaled to max radius 1."""
    theta = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    harmonics = np.arange(2, 7)
    amplitude = rng.uniform(0, 0.45, len(harmonics)) * (rng.uniform(size=len(harmonics)) < 0.6) / np.sqrt(harmonics - 1)
    phase = rng.uniform(0, 2 * np.pi, len(harmonics))
    radius = 1 + (amplitude[:, None] * np.cos(harmonics[:, None] * theta + phase[:, None])).sum(0)
    radius = np.maximum(radius, 0.25)
    radius = radius / radius.max()
    return np.stack([radius * np.cos(theta), radius * np.sin(theta)], axis=1)


def blob_classes(count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` blob outlines, none of which overlaps a test shape family (any rotation) at IoU ≥ MAX_SHAPE_IOU."""
    tests = _test_family_masks()
    outlines = []
    while len(outlines) < count:
        outline = blob_outline(rng)
        mask = polygon_mask([(outline, 1)])
        if max(iou(mask, t) for t in tests) < MAX_SHAPE_IOU:
            outlines.append(outline)
    return outlines


def _blob_image(outline: np.ndarray, outline_style: bool, rng: np.random.Generator, size: int) -> np.ndarray:
    angle = np.deg2rad(rng.uniform(-25, 25))
    radius = rng.uniform(0.5, 0.8) * CANVAS / 2
    centre = CANVAS / 2 + rng.uniform(-0.12, 0.12, size=2) * CANVAS
    mask = Image.fromarray((polygon_mask([(outline, 1)], angle, radius, centre) * 255).astype(np.uint8))
    if outline_style:
        width = 2 * int(rng.integers(1, 3)) + 1
        mask = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(width))))
    return _compose(np.asarray(mask, dtype=np.float32) / 255, rng, size)


def scribble_strokes(rng: np.random.Generator) -> np.ndarray:
    """2–3 quadratic Bézier strokes, [S, 3, 2] control points in [-0.8, 0.8]²."""
    return rng.uniform(-0.8, 0.8, size=(int(rng.integers(2, 4)), 3, 2))


def _scribble_image(strokes: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    points = strokes + rng.normal(0, 0.06, strokes.shape)
    angle = np.deg2rad(rng.uniform(-12, 12))
    turn = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    scale = rng.uniform(0.8, 1.05) * CANVAS / 2
    shift = CANVAS / 2 + rng.uniform(-3, 3, size=2)
    t = np.linspace(0, 1, 24)[:, None]
    image = Image.new("L", (CANVAS, CANVAS), 255)
    draw = ImageDraw.Draw(image)
    width = int(rng.integers(3, 7))
    for p0, p1, p2 in points:
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
        draw.line([tuple(p) for p in curve @ turn.T * scale + shift], fill=0, width=width, joint="curve")
    return np.asarray(image.resize((size, size), Image.BOX))


def _grid(rng: np.random.Generator):
    axis = np.linspace(-1, 1, CANVAS)
    x, y = np.meshgrid(axis, axis)
    angle = rng.uniform(0, 2 * np.pi)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def mixture_params(rng: np.random.Generator) -> dict:
    """Plane waves at class-specific frequencies and relative angles (20° from parallel and perpendicular)."""
    waves = int(rng.integers(2, 4))
    angles = [0.0]
    for _ in range(waves - 1):
        angles.append(angles[-1] + np.deg2rad(rng.choice([rng.uniform(20, 70), rng.uniform(110, 160)])))
    return {"frequencies": rng.choice(WAVE_FREQUENCIES, waves), "angles": np.asarray(angles),
            "combine": str(rng.choice(["threshold", "smooth", "min"]))}


def _mixture_texture(params: dict, rng: np.random.Generator) -> np.ndarray:
    x, y = _grid(rng)
    waves = [np.sin(np.pi * f * (x * np.cos(a) + y * np.sin(a)) + rng.uniform(0, 2 * np.pi))
             for f, a in zip(params["frequencies"], params["angles"], strict=True)]
    if params["combine"] == "threshold":
        return (np.sum(waves, axis=0) > 0).astype(np.float32)
    if params["combine"] == "smooth":
        return (0.5 + 0.5 * np.sum(waves, axis=0) / len(waves)).astype(np.float32)
    return (np.min(waves, axis=0) > -0.3).astype(np.float32)


def bandpass_params(rng: np.random.Generator) -> dict:
    return {"centre": float(rng.choice(BANDPASS_CENTRES)), "width": float(rng.uniform(0.15, 0.4)),
            "lobe": bool(rng.uniform() < 0.5), "threshold": bool(rng.uniform() < 0.5)}


def _bandpass_texture(params: dict, rng: np.random.Generator) -> np.ndarray:
    fx, fy = np.meshgrid(np.fft.fftfreq(CANVAS) * CANVAS, np.fft.fftfreq(CANVAS) * CANVAS)
    radius = np.hypot(fx, fy) / 2  # cycles across the [-1, 1] image
    gain = np.exp(-((radius - params["centre"]) / (params["width"] * params["centre"])) ** 2)
    if params["lobe"]:
        angle = rng.uniform(0, np.pi)
        gain = gain * np.abs(np.cos(np.arctan2(fy, fx) - angle)) ** 8
    field = np.real(np.fft.ifft2(np.fft.fft2(rng.normal(size=(CANVAS, CANVAS))) * gain))
    field = (field - field.mean()) / (field.std() + 1e-8)
    return ((field > 0) if params["threshold"] else np.clip(0.5 + 0.25 * field, 0, 1)).astype(np.float32)


def generate_pretrain_procedural(classes_per_kind: int, per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names '<kind> <index> (…)'."""
    rng = np.random.default_rng(seed)
    names, images = [], []
    for index, outline in enumerate(blob_classes(classes_per_kind // 2, rng)):
        for style in ("filled", "outline"):
            names.append(f"harmonic_outline {index} ({style})")
            images.extend(_blob_image(outline, style == "outline", rng, size) for _ in range(per_class))
    for index in range(classes_per_kind):
        strokes = scribble_strokes(rng)
        names.append(f"scribble {index}")
        images.extend(np.repeat(_scribble_image(strokes, rng, size)[:, :, None], 3, axis=2)
                      for _ in range(per_class))
    for index in range(classes_per_kind):
        params = mixture_params(rng)
        names.append(f"wave_mixture {index} ({params['combine']})")
        images.extend(_compose(_mixture_texture(params, rng), rng, size) for _ in range(per_class))
    for index in range(classes_per_kind):
        params = bandpass_params(rng)
        names.append(f"bandpass_noise {index}")
        images.extend(_compose(_bandpass_texture(params, rng), rng, size) for _ in range(per_class))
    return np.stack(images), np.repeat(np.arange(len(names)), per_class), names

