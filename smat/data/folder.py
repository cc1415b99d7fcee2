"""Image folders: ``<root>/<domain>/<class>/<image>``, any format PIL reads.

Class splits come from an optional JSON splits file::

    {"<domain>": {"train": ["class", ...], "val": [...], "test": [...]},
     "<ood domain>": {"test": "all"}}

Domains missing from it are split at random by ``fractions`` with ``seed``.

Images are decoded lazily and near the size they are used at, so that memory
stays bounded: JPEGs in draft mode (decoded at 1/2 … 1/8 scale), other
formats shrunk by an integer factor (``Image.reduce``) right after decoding,
to a short side of at least ``size_hint`` (default ``DECODE_SIZE``) times
two. An image of more than ``max_pixels`` pixels (default ``MAX_PIXELS``,
2^27 ≈ 11585², below Pillow's decompression-bomb limit) is not decoded at
all: like a damaged file it is skipped with a warning and counted.
"""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .source import SPLITS, DataError, DataNotFoundError, Domain, Source, UnreadableImageError

LAYOUT = "<root>/<domain>/<class>/<image> (e.g. root/birds/cardinal/001.jpg)"
# The model input size assumed when the caller gives no size_hint: the largest
# of the usual ViTs'. Images are decoded at twice it, so a crop keeps its detail.
DECODE_SIZE = 384
# Decoding an image takes up to 4 bytes per pixel (Pillow's RGB): 2^27 pixels
# bound one decode to 512 MiB.
MAX_PIXELS = 2**27


def image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def random_class_split(num_classes: int, fractions, seed: int | str) -> dict[str, list[int]]:
    """Seeded class split by fractions (train, val, test); val and test get at least one class."""
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three numbers (train, val, test) summing to 1, got {fractions}")
    order = np.random.default_rng(_seed_of(seed)).permutation(num_classes).tolist()
    n_val = max(1, round(fractions[1] * num_classes)) if fractions[1] > 0 else 0
    n_test = max(1, round(fractions[2] * num_classes)) if fractions[2] > 0 else 0
    n_train = num_classes - n_val - n_test
    return {"train": sorted(order[:n_train]), "val": sorted(order[n_train:n_train + n_val]),
            "test": sorted(order[n_train + n_val:])}


def _seed_of(seed: int | str) -> int:
    return zlib.crc32(seed.encode()) if isinstance(seed, str) else int(seed)


class FolderDomain(Domain):
    def __init__(self, name: str, directory: Path, class_dirs: list[Path], files: list[list[Path]], splits,
                 size_hint: int | None, max_pixels: int = MAX_PIXELS):
        super().__init__(name, [d.name for d in class_dirs], splits)
        self.directory, self.files, self.size_hint = directory, files, size_hint
        self.max_pixels = max_pixels

    def num_items(self, class_index: int) -> int:
        return len(self.files[class_index])

    def describe(self, class_index: int, item: int) -> str:
        return str(self.files[class_index][item])

    def load(self, class_index: int, item: int) -> np.ndarray:
        return decode_image(self.files[class_index][item], self.size_hint or DECODE_SIZE, self.max_pixels)


def decode_image(path: Path, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 H×W×3 with a short side of at least 2·``size`` where the file has
    that many pixels, decoded without ever holding the full-size RGB copies.
    Raises UnreadableImageError for an image of more than ``max_pixels``."""
    with warnings.catch_warnings():
        # smat's own limit (checked below, before any pixel is decoded) replaces Pillow's warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except Image.DecompressionBombError as error:
            raise UnreadableImageError(f"{path}: over Pillow's decompression-bomb limit ({error}); "
                                       f"shrink the image or remove it") from None
    with image:
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise UnreadableImageError(f"{path}: {image.width}×{image.height} = {pixels} pixels is over the "
                                       f"limit of {max_pixels}; shrink the image or remove it")
        target = 2 * size
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: less memory, and several times faster.
        image.draft("RGB", (target, target))
        factor = min(image.width, image.height) // target
        if factor >= 2:
            image = image.reduce(factor)
        return np.asarray(image.convert("RGB"))


class ImageFolderSource(Source):
    """Domains from ``<root>/<domain>/<class>/<image>``.

    root: the folder; splits_file: optional JSON as in the module docstring;
    fractions/seed: the random split of classes for domains not in it;
    domains: names to use (default: every sub-folder); size_hint: decode
    images near this size (set it to the model's image size; default
    ``DECODE_SIZE``); max_pixels: larger images are skipped and counted.
    """

    def __init__(self, root, splits_file=None, domains=None, fractions=(0.7, 0.15, 0.15), seed: int = 0,
                 size_hint: int | None = None, max_pixels: int = MAX_PIXELS):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"image folder root {root} does not exist; expected {LAYOUT}")
        splits = _read_splits(splits_file) if splits_file is not None else {}
        names = sorted(d.name for d in _listing(root, "image folder root") if d.is_dir()
                       and not d.name.startswith("."))
        if domains is not None:
            missing = sorted(set(domains) - set(names))
            if missing:
                raise DataNotFoundError(f"domains {missing} not found under {root}; found {names}; "
                                        f"expected {LAYOUT}")
            names = list(domains)
        built = [self._domain(root / name, splits.get(name), fractions, seed, size_hint, max_pixels)
                 for name in names]
        built = [domain for domain in built if domain is not None]
        if not built:
            raise DataNotFoundError(f"no domain with images under {root}; expected {LAYOUT}")
        super().__init__(built)

    @staticmethod
    def _domain(directory: Path, split_names, fractions, seed, size_hint, max_pixels):
        extensions = image_extensions()
        class_dirs, files = [], []
        for class_dir in sorted(d for d in _listing(directory, "domain folder") if d.is_dir()
                                and not d.name.startswith(".")):
            images = sorted(f for f in _listing(class_dir, "class folder")
                            if f.is_file() and f.suffix.lower() in extensions)
            if images:
                class_dirs.append(class_dir)
                files.append(images)
        if not class_dirs:
            return None
        names = [d.name for d in class_dirs]
        if split_names is None:
            splits = random_class_split(len(names), fractions, f"{seed}:{directory.name}")
        else:
            splits = _named_splits(directory, names, split_names)
        return FolderDomain(directory.name, directory, class_dirs, files, splits, size_hint, max_pixels)


def _listing(directory: Path, what: str) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError as error:
        raise DataError(f"cannot read the {what} {directory} ({error.strerror or error}); make it readable "
                        f"(chmod u+rx) or move it out of the data root") from None


SPLITS_FORMAT = '{"<domain>": {"train": [classes], "val": [...], "test": [...]}}'


def _read_splits(path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataNotFoundError(f"splits file {path} does not exist; expected JSON {SPLITS_FORMAT}")
    try:
        splits = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read the splits file {path} ({error}); expected JSON {SPLITS_FORMAT}") from None
    if not isinstance(splits, dict) or not all(isinstance(value, dict) for value in splits.values()):
        raise DataError(f"splits file {path} must map each domain to its splits: {SPLITS_FORMAT}")
    return splits


def _named_splits(directory: Path, names: list[str], split_names: dict) -> dict[str, list[int]]:
    index = {name: i for i, name in enumerate(names)}
    splits = {}
    for split, classes in split_names.items():
        if split not in SPLITS:
            raise DataError(f"splits file: domain {directory.name!r} has split {split!r}; use {SPLITS}")
        if classes == "all":
            classes = names
        if not isinstance(classes, list):
            raise DataError(f"splits file: split {split!r} of domain {directory.name!r} must be a list of class "
                            f"names or \"all\", got {classes!r}")
        missing = [c for c in classes if c not in index]
        if missing:
            raise DataError(f"splits file names classes {missing[:5]} of domain {directory.name!r} "
                            f"that have no images under {directory}")
        splits[split] = [index[c] for c in classes]
    return splits
