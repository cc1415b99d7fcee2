"""Pictures of episodes: one row per class, support images, a gap, then query images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .episode import Task
from .transforms import denormalize

BACKGROUND = (255, 255, 255)


def _pixels(batch) -> np.ndarray:
    return (denormalize(batch).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def episode_grid(task: Task, max_per_row: int = 10, label_width: int = 150, gap: int = 12) -> Image.Image:
    """One row per class: its name, up to ``max_per_row`` support then query images."""
    support, query = _pixels(task.support_x), _pixels(task.query_x)
    size = support.shape[1]
    rows = []
    for label in range(task.n_way):
        shots = support[(task.support_y == label).numpy()][:max_per_row]
        queries = query[(task.query_y == label).numpy()][:max_per_row]
        rows.append((task.class_names[label], shots, queries))
    n_support = max(len(r[1]) for r in rows)
    n_query = max(len(r[2]) for r in rows)
    pad = 2
    width = label_width + (n_support + n_query) * (size + pad) + gap
    height = 16 + task.n_way * (size + pad)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((label_width, 2), "support", fill=(0, 0, 0))
    draw.text((label_width + n_support * (size + pad) + gap, 2), "query", fill=(0, 0, 0))
    for row, (name, shots, queries) in enumerate(rows):
        top = 16 + row * (size + pad)
        draw.text((2, top + size // 2 - 5), name[:24], fill=(0, 0, 0))
        for column, image in enumerate(shots):
            canvas.paste(Image.fromarray(image), (label_width + column * (size + pad), top))
        for column, image in enumerate(queries):
            left = label_width + n_support * (size + pad) + gap + column * (size + pad)
            canvas.paste(Image.fromarray(image), (left, top))
    return canvas


def domain_strip(name: str, images: np.ndarray, size: int, label_width: int = 130) -> Image.Image:
    """A labelled row of uint8 images (H×W or H×W×3) resized to ``size``."""
    pad = 2
    strip = Image.new("RGB", (label_width + len(images) * (size + pad), size + pad), BACKGROUND)
    ImageDraw.Draw(strip).text((2, size // 2 - 5), name, fill=(0, 0, 0))
    for column, image in enumerate(images):
        tile = Image.fromarray(image).convert("RGB").resize((size, size), Image.NEAREST)
        strip.paste(tile, (label_width + column * (size + pad), 0))
    return strip


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), BACKGROUND)
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height
    return canvas
