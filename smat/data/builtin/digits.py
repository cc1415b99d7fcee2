"""The handwritten digits scikit-learn ships (UCI optdigits: 1797 images, 8×8, 10 classes)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def generate_digits(size: int):
    """images uint8 [1797, size, size] (dark ink on white, bicubic upsampling), labels, names '0' … '9'."""
    digits = load_digits()
    small = np.clip(255 - digits.images * (255 / 16), 0, 255).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC)) for image in small])
    return images, digits.target.astype(np.int64), [str(d) for d in range(10)]
