"""Glyph domains: characters of different scripts rendered from the fonts matplotlib ships.

Like Omniglot's alphabets: a domain is a script or script group, a class is
one character, and its instances are that character in the DejaVu and STIX
fonts that cover it, each with a random affine distortion and stroke weight.
Coverage comes from each font's character map; glyphs that still render
blank, and characters that look the same as one already taken by an earlier
domain (or class) are rejected, so classes are disjoint across domains.
"""

from __future__ import annotations

import functools
import os
import unicodedata

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont

CANVAS = 64
FONT_SIZE = 42
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)

# Code point ranges per glyph domain, in the order used to reject look-alikes.
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0xFF)),
    "greek_cyrillic": ((0x391, 0x3A9), (0x3B1, 0x3C9), (0x400, 0x45F)),
    "math_symbols": ((0x2200, 0x22FF),),
    "arrows_technical": ((0x2190, 0x21FF), (0x2300, 0x23FF)),
    "armenian_georgian": ((0x531, 0x556), (0x561, 0x587), (0x10A0, 0x10FF)),
    "hebrew_arabic": ((0x5D0, 0x5EA), (0x620, 0x64A)),
    "braille": ((0x2801, 0x28FF),),
    "pretrain_glyphs": ((0x1401, 0x166C), (0x250, 0x2AF), (0x25A0, 0x25FF), (0x2600, 0x26FF),
                        (0x2700, 0x27BF), (0x2500, 0x257F), (0xA4D0, 0xA4F7), (0x2D30, 0x2D6F),
                        (0x7C0, 0x7FF)),
}
# Character categories that draw a standalone shape (no combining marks, spaces or controls).
DRAWABLE = ("L", "N", "S", "P")
PRETRAIN = "pretrain_glyphs"
# Pre-training glyphs must not be a test class under another code point: no digit (the digits domain: ➊ is
# the digit one) and no character named after a test shape family (▲ is 'triangle (filled)', ➔ an arrow).
SHAPE_WORDS = ("TRIANGLE", "SQUARE", "PENTAGON", "HEXAGON", "OCTAGON", "STAR", "CIRCLE", "ELLIPSE", "RING",
               "CRESCENT", "HEART", "PLUS", "CROSS", "ARROW", "BAR", "RECTANGLE", "TRAPEZIUM", "TRAPEZOID",
               "PARALLELOGRAM", "DIAMOND", "LOZENGE", "MOON")


def shape_or_digit(character: str) -> bool:
    """True for a digit in any script, or a character whose name has a word of a test shape family."""
    if unicodedata.digit(character, None) is not None or unicodedata.numeric(character, None) is not None:
        return True
    words = set(unicodedata.name(character, "").replace("-", " ").split())
    return any(word in words or word + "S" in words for word in SHAPE_WORDS)
DUPLICATE_INK = 0.05


def font_dir() -> str:
    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf")


@functools.cache
def font_coverage(font_file: str) -> frozenset[int]:
    with TTFont(os.path.join(font_dir(), font_file), lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.cache
def _font(font_file: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(font_dir(), font_file), size)


def covering_fonts(code_point: int) -> list[str]:
    return [f for f in FONT_FILES if code_point in font_coverage(f)]


def render(character: str, font_file: str) -> Image.Image | None:
    """White-on-black CANVAS×CANVAS rendering, shrunk until no ink touches the border; None if blank."""
    size = FONT_SIZE
    while size >= 12:
        image = Image.new("L", (CANVAS, CANVAS), 0)
        ImageDraw.Draw(image).text((CANVAS / 2, CANVAS / 2), character, fill=255,
                                   font=_font(font_file, size), anchor="mm")
        box = image.getbbox()
        if box is None:
            return None
        if box[0] > 1 and box[1] > 1 and box[2] < CANVAS - 1 and box[3] < CANVAS - 1:
            return image
        size = int(size * 0.8)
    return None


def _canonical(character: str) -> np.ndarray | None:
    fonts = covering_fonts(ord(character))
    image = render(character, fonts[0]) if fonts else None
    if image is None:
        return None
    array = np.asarray(image.resize((32, 32), Image.BOX), dtype=np.float32) / 255
    return array if array.sum() >= 4 else None


@functools.cache
def script_characters() -> dict[str, tuple[str, ...]]:
    """Accepted characters per glyph domain, look-alikes of earlier ones removed.

    Two characters look alike when the squared difference of their canonical
    renderings (ink in [0, 1]) is under DUPLICATE_INK of the larger one's
    squared ink (Latin A and Greek Alpha: 0; A and À: the accent, about a tenth).
    """
    candidates, owners, renders = [], [], []
    for domain, ranges in SCRIPTS.items():
        for start, stop in ranges:
            for code_point in range(start, stop + 1):
                character = chr(code_point)
                if unicodedata.category(character)[0] not in DRAWABLE:
                    continue
                if domain == PRETRAIN and shape_or_digit(character):
                    continue
                canonical = _canonical(character)
                if canonical is not None:
                    candidates.append(character)
                    owners.append(domain)
                    renders.append(canonical.ravel())
    flat = np.stack(renders).astype(np.float64)
    ink = (flat * flat).sum(axis=1)
    # All pairwise squared distances in one matrix product instead of a Python loop over pairs.
    distance = ink[:, None] + ink[None, :] - 2 * flat @ flat.T
    alike = distance < DUPLICATE_INK * np.maximum(ink[:, None], ink[None, :])
    accepted: dict[str, list[str]] = {domain: [] for domain in SCRIPTS}
    kept = np.zeros(len(candidates), dtype=bool)
    for index, (character, domain) in enumerate(zip(candidates, owners, strict=True)):
        if not (alike[index, :index] & kept[:index]).any():
            kept[index] = True
            accepted[domain].append(character)
    return {domain: tuple(characters) for domain, characters in accepted.items()}


def distort(bases: np.ndarray, choice: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Random affine distortion and stroke weight of bases[choice]; white ink on black, uint8 [B, size, size].

    bases: uint8 [F, CANVAS, CANVAS]; choice: [B] indices into bases. One batched
    grid_sample per class: about twenty times faster than PIL image by image.
    """
    count = len(choice)
    angle = np.deg2rad(rng.uniform(-12, 12, count))
    shear = rng.uniform(-0.25, 0.25, count)
    scale = rng.uniform(0.8, 1.05, (count, 2))
    shift = rng.uniform(-4, 4, (count, 2)) / (CANVAS / 2)
    thicken = rng.uniform(size=count) < 0.3
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    shearing = np.tile(np.eye(2), (count, 1, 1))
    shearing[:, 0, 1] = shear
    forward = rotation @ shearing @ (np.eye(2) * scale[:, None, :])
    inverse = np.linalg.inv(forward)
    # affine_grid maps output to input coordinates: x_in = inverse (x_out − shift).
    theta = np.concatenate([inverse, -(inverse @ shift[:, :, None])], axis=2)
    images = torch.from_numpy(bases[choice]).float()[:, None] / 255
    grid = F.affine_grid(torch.from_numpy(theta).float(), list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    bolder = F.max_pool2d(images, 3, stride=1, padding=1)
    images = torch.where(torch.from_numpy(thicken)[:, None, None, None], bolder, images)
    images = F.interpolate(images, size=(size, size), mode="area")
    return (images[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def generate(domain: str, per_class: int, size: int, seed: int):
    """images uint8 [C·per_class, size, size] (dark ink on white), labels [C·per_class], class names [C]."""
    characters = script_characters()[domain]
    rng = np.random.default_rng(seed)
    images = np.empty((len(characters) * per_class, size, size), dtype=np.uint8)
    for label, character in enumerate(characters):
        fonts = covering_fonts(ord(character))
        bases = np.stack([np.asarray(b) for b in (render(character, f) for f in fonts) if b is not None])
        choice = rng.permutation(per_class) % len(bases)
        images[label * per_class:(label + 1) * per_class] = 255 - distort(bases, choice, rng, size)
    labels = np.repeat(np.arange(len(characters)), per_class)
    names = [f"U+{ord(c):04X} {unicodedata.name(c, '?').lower()}" for c in characters]
    return images, labels, names
