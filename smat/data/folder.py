"""Image folders: ``<root>/<domain>/<class>/<image>``, any format PIL reads.

Class splits come from an optional JSON splits file::

    {"<domain>": {"train": ["class", ...], "val": [...], "test": [...]},
     "<ood domain>": {"test": "all"}}

Domains missing from it are split at random by ``fractions`` with ``seed``.
Images are decoded lazily (JPEGs in draft mode near the target size).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .source import SPLITS, Domain, Source

LAYOUT = "<root>/<domain>/<class>/<image> (e.g. root/birds/cardinal/001.jpg)"


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
                 size_hint: int | None):
        super().__init__(name, [d.name for d in class_dirs], splits)
        self.directory, self.files, self.size_hint = directory, files, size_hint

    def num_items(self, class_index: int) -> int:
        return len(self.files[class_index])

    def describe(self, class_index: int, item: int) -> str:
        return str(self.files[class_index][item])

    def load(self, class_index: int, item: int) -> np.ndarray:
        with Image.open(self.files[class_index][item]) as image:
            if self.size_hint:
                # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale: several times faster for large photos.
                image.draft("RGB", (self.size_hint, self.size_hint))
            return np.asarray(image.convert("RGB"))


class ImageFolderSource(Source):
    """Domains from ``<root>/<domain>/<class>/<image>``.

    root: the folder; splits_file: optional JSON as in the module docstring;
    fractions/seed: the random split of classes for domains not in it;
    domains: names to use (default: every sub-folder); size_hint: decode
    JPEGs near this size (set it to the model's image size).
    """

    def __init__(self, root, splits_file=None, domains=None, fractions=(0.7, 0.15, 0.15), seed: int = 0,
                 size_hint: int | None = None):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist; expected {LAYOUT}")
        splits = _read_splits(splits_file) if splits_file is not None else {}
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if domains is not None:
            missing = sorted(set(domains) - set(names))
            if missing:
                raise FileNotFoundError(f"domains {missing} not found under {root}; found {names}; "
                                        f"expected {LAYOUT}")
            names = list(domains)
        built = [self._domain(root / name, splits.get(name), fractions, seed, size_hint) for name in names]
        built = [domain for domain in built if domain is not None]
        if not built:
            raise FileNotFoundError(f"no domain with images under {root}; expected {LAYOUT}")
        super().__init__(built)

    @staticmethod
    def _domain(directory: Path, split_names, fractions, seed, size_hint):
        extensions = image_extensions()
        class_dirs, files = [], []
        for class_dir in sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith(".")):
            images = sorted(f for f in class_dir.iterdir() if f.is_file() and f.suffix.lower() in extensions)
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
        return FolderDomain(directory.name, directory, class_dirs, files, splits, size_hint)


def _read_splits(path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"splits file {path} does not exist; expected JSON "
                                '{"<domain>": {"train": [classes], "val": [...], "test": [...]}}')
    with open(path) as handle:
        return json.load(handle)


def _named_splits(directory: Path, names: list[str], split_names: dict) -> dict[str, list[int]]:
    index = {name: i for i, name in enumerate(names)}
    splits = {}
    for split, classes in split_names.items():
        if split not in SPLITS:
            raise ValueError(f"splits file: domain {directory.name!r} has split {split!r}; use {SPLITS}")
        if classes == "all":
            classes = names
        missing = [c for c in classes if c not in index]
        if missing:
            raise ValueError(f"splits file names classes {missing[:5]} of domain {directory.name!r} "
                             f"that have no images under {directory}")
        splits[split] = [index[c] for c in classes]
    return splits
