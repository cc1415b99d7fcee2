"""Procedural domains: geometric shapes and textures, drawn with numpy and PIL.

Shapes: a class is a shape family in a fill style (filled or outline); its
instances vary position, size, rotation (±25°, so a square stays unlike a
diamond), stroke width and colours. Textures: a class is a pattern family at
a spatial frequency; instances vary orientation, phase and colours.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CANVAS = 64


def _polygon(n: int) -> np.ndarray:
    angles = np.pi / 2 + 2 * np.pi * np.arange(n) / n
    return np.stack([np.cos(angles), -np.sin(angles)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    outer = _polygon(2 * points)
    radius = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return outer * radius[:, None]


def _ellipse(aspect: float, start: float = 0.0, stop: float = 2 * np.pi) -> np.ndarray:
    angles = np.linspace(start, stop, 48, endpoint=stop - start < 2 * np.pi)
    return np.stack([np.cos(angles), aspect * np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2], axis=1) / 17


def _outline(points) -> np.ndarray:
    return np.asarray(points, dtype=np.float64)


# Each family: a list of (polygon in [-1, 1]², ink) drawn in order; ink 0 cuts a hole.
FAMILIES: dict[str, list[tuple[np.ndarray, int]]] = {
    "triangle": [(_polygon(3), 1)],
    "square": [(_polygon(4) @ np.array([[np.sqrt(.5), np.sqrt(.5)], [-np.sqrt(.5), np.sqrt(.5)]]), 1)],
    "pentagon": [(_polygon(5), 1)],
    "hexagon": [(_polygon(6), 1)],
    "octagon": [(_polygon(8), 1)],
    "star4": [(_star(4, 0.4), 1)],
    "star5": [(_star(5, 0.45), 1)],
    "star6": [(_star(6, 0.55), 1)],
    "star8": [(_star(8, 0.7), 1)],
    "circle": [(_ellipse(1.0), 1)],
    "ellipse": [(_ellipse(0.5), 1)],
    "ring": [(_ellipse(1.0), 1), (_ellipse(1.0) * 0.55, 0)],
    "crescent": [(_ellipse(1.0), 1), (_ellipse(1.0) * 0.85 + [0.4, -0.1], 0)],
    "semicircle": [(_ellipse(1.0, 0, np.pi) * [1, -1] + [0, 0.4], 1)],
    "heart": [(_heart(), 1)],
    "plus": [(_outline([(-.3, -1), (.3, -1), (.3, -.3), (1, -.3), (1, .3), (.3, .3), (.3, 1), (-.3, 1),
                        (-.3, .3), (-1, .3), (-1, -.3), (-.3, -.3)]), 1)],
    "arrow": [(_outline([(-1, -.25), (.2, -.25), (.2, -.7), (1, 0), (.2, .7), (.2, .25), (-1, .25)]), 1)],
    "l_shape": [(_outline([(-.7, -1), (-.2, -1), (-.2, .5), (.7, .5), (.7, 1), (-.7, 1)]), 1)],
    "t_shape": [(_outline([(-1, -1), (1, -1), (1, -.5), (.25, -.5), (.25, 1), (-.25, 1), (-.25, -.5),
                           (-1, -.5)]), 1)],
    "bar": [(_outline([(-1, -.35), (1, -.35), (1, .35), (-1, .35)]), 1)],
    "trapezoid": [(_outline([(-.5, -.6), (.5, -.6), (1, .6), (-1, .6)]), 1)],
    "parallelogram": [(_outline([(-.5, -.6), (1, -.6), (.5, .6), (-1, .6)]), 1)],
}
STYLES = ("filled", "outline")


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colours at least 90 grey levels apart."""
    while True:
        foreground, background = rng.integers(0, 256, size=(2, 3))
        if abs(foreground @ [0.299, 0.587, 0.114] - background @ [0.299, 0.587, 0.114]) > 90:
            return foreground, background


def _shape_mask(parts, style: str, rng: np.random.Generator) -> np.ndarray:
    angle = np.deg2rad(rng.uniform(-25, 25))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    radius = rng.uniform(0.5, 0.8) * CANVAS / 2
    centre = CANVAS / 2 + rng.uniform(-0.12, 0.12, size=2) * CANVAS
    mask = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    for polygon, ink in parts:
        points = polygon @ rotation.T * radius + centre
        draw.polygon([tuple(p) for p in points], fill=255 * ink)
    if style == "outline":
        width = 2 * int(rng.integers(1, 3)) + 1
        mask = Image.fromarray(np.asarray(mask) - np.asarray(mask.filter(ImageFilter.MinFilter(width))))
    return np.asarray(mask, dtype=np.float32) / 255


def _compose(mask: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    foreground, background = _colours(rng)
    image = mask[:, :, None] * foreground + (1 - mask[:, :, None]) * background
    image = image + rng.normal(0, 6, size=image.shape)
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    return np.asarray(picture.resize((size, size), Image.BOX))


def generate_shapes(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names '<family> (<style>)'."""
    rng = np.random.default_rng(seed)
    names, images = [], []
    for family, parts in FAMILIES.items():
        for style in STYLES:
            names.append(f"{family} ({style})")
            images.extend(_compose(_shape_mask(parts, style, rng), rng, size) for _ in range(per_class))
    return np.stack(images), np.repeat(np.arange(len(names)), per_class), names


def _coordinates(rng: np.random.Generator):
    """Pixel grid in [−1, 1]², rotated by a random angle: (x', y')."""
    axis = np.linspace(-1, 1, CANVAS)
    x, y = np.meshgrid(axis, axis)
    angle = rng.uniform(0, np.pi)
    return x * np.cos(angle) + y * np.sin(angle), -x * np.sin(angle) + y * np.cos(angle)


def _smooth_noise(rng: np.random.Generator, cutoff: float) -> np.ndarray:
    spectrum = np.fft.fft2(rng.normal(size=(CANVAS, CANVAS)))
    frequency = np.hypot(*np.meshgrid(np.fft.fftfreq(CANVAS), np.fft.fftfreq(CANVAS)))
    field = np.real(np.fft.ifft2(spectrum * np.exp(-(frequency / cutoff) ** 2)))
    return (field - field.mean()) / (field.std() + 1e-8)


def _cells(rng: np.random.Generator, count: int, x, y) -> np.ndarray:
    points = rng.uniform(-1, 1, size=(count, 2))
    distance = np.sort(np.hypot(x[..., None] - points[:, 0], y[..., None] - points[:, 1]), axis=-1)
    return (distance[..., 1] - distance[..., 0] < 0.06).astype(np.float64)


def _pattern(family: str, frequency: float, rng: np.random.Generator) -> np.ndarray:
    """A texture in [0, 1] on the CANVAS grid; ``frequency`` in cycles across the image."""
    x, y = _coordinates(rng)
    phase = rng.uniform(0, 2 * np.pi)
    f = np.pi * frequency
    radius, angle = np.hypot(x, y), np.arctan2(y, x)
    patterns = {
        "stripes": lambda: np.sin(f * x + phase) > 0,
        "waves": lambda: 0.5 + 0.5 * np.sin(f * x + 2 * np.sin(f / 2 * y) + phase),
        "checker": lambda: np.sin(f * x + phase) * np.sin(f * y) > 0,
        "dots": lambda: np.hypot(np.sin(f * x + phase), np.sin(f * y)) > 1.2,
        "grid": lambda: (np.abs(np.sin(f * x + phase)) < 0.25) | (np.abs(np.sin(f * y)) < 0.25),
        "rings": lambda: np.sin(2 * f * np.hypot(x - rng.uniform(-.5, .5), y - rng.uniform(-.5, .5)) + phase) > 0,
        "sectors": lambda: np.sin(round(frequency) * angle + phase) > 0,
        "spiral": lambda: np.sin(3 * angle + f * radius + phase) > 0,
        "zigzag": lambda: np.sin(f * y + 2.5 * np.abs(((f / 2 * x + phase) / np.pi) % 2 - 1)) > 0,
        "blobs": lambda: _smooth_noise(rng, frequency / 160) > 0,
        "cells": lambda: _cells(rng, int(frequency * 3), x, y),
        "speckle": lambda: rng.uniform(size=x.shape) < frequency / 60,
        "plaid": lambda: 0.5 + 0.25 * (np.sin(f * x + phase) + np.sin(f * y + 1.3 * phase)),
        "noise_lines": lambda: 0.5 + 0.5 * np.sin(f * x + 3 * _smooth_noise(rng, 0.04)),
    }
    return patterns[family]().astype(np.float32)


TEXTURES = ("stripes", "waves", "checker", "dots", "grid", "rings", "sectors", "spiral", "zigzag", "blobs",
            "cells", "speckle", "plaid", "noise_lines")
FREQUENCIES = {"coarse": 4.0, "fine": 10.0}


def generate_textures(per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size, 3], labels, class names '<pattern> (<coarse|fine>)'."""
    rng = np.random.default_rng(seed)
    names, images = [], []
    for family in TEXTURES:
        for scale, frequency in FREQUENCIES.items():
            names.append(f"{family} ({scale})")
            images.extend(_compose(_pattern(family, frequency, rng), rng, size) for _ in range(per_class))
    return np.stack(images), np.repeat(np.arange(len(names)), per_class), names
