"""The interface every image source implements, and an in-memory implementation.

A source is a set of named domains. A domain has classes, a train/val/test
split of its classes, and for each class a number of items that ``load``
turns into a uint8 image (H×W greyscale or H×W×3 RGB). Samplers only need
``splits`` and ``num_items``; only the episode builder calls ``load``.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence

import numpy as np

SPLITS = ("train", "val", "test")


class DataError(ValueError):
    """A problem with the user's data, saying what is wrong and how to fix it.
    The command-line tools print it as one ``error:`` line."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file or folder that should exist does not."""


class UnreadableImageError(DataError):
    """One image that cannot be used (damaged, or over the pixel limit): the
    episode builder skips it, warns and counts it, as any unreadable image."""


class Domain(abc.ABC):
    """One domain: classes, their split, and lazily loaded images."""

    def __init__(self, name: str, class_names: Sequence[str], splits: Mapping[str, Sequence[int]]):
        unknown = set(splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"domain {name!r}: unknown split names {sorted(unknown)}; use {SPLITS}")
        self.name = name
        self.class_names = list(class_names)
        self.splits = {split: list(splits.get(split, ())) for split in SPLITS}

    def classes(self, split: str) -> list[int]:
        """Class indices of ``split`` ('train', 'val', 'test' or 'all')."""
        if split == "all":
            return list(range(len(self.class_names)))
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} or 'all', got {split!r}")
        return self.splits[split]

    @abc.abstractmethod
    def num_items(self, class_index: int) -> int:
        """How many images class ``class_index`` has."""

    @abc.abstractmethod
    def load(self, class_index: int, item: int) -> np.ndarray:
        """Image ``item`` of a class as uint8 H×W or H×W×3; raises on unreadable data."""

    def describe(self, class_index: int, item: int) -> str:
        """Where an item lives, for warnings about unreadable images."""
        return f"{self.name}/{self.class_names[class_index]}/{item}"

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={len(self.splits[split])}" for split in SPLITS)
        return f"{type(self).__name__}({self.name!r}, classes: {sizes})"


class ArrayDomain(Domain):
    """A domain held in memory: ``images`` [N, H, W(, 3)] uint8 and ``labels`` [N]."""

    def __init__(self, name, images: np.ndarray, labels: np.ndarray, class_names, splits):
        super().__init__(name, class_names, splits)
        labels = np.asarray(labels)
        if len(images) != len(labels):
            raise ValueError(f"domain {name!r}: {len(images)} images but {len(labels)} labels")
        self.images = images
        order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=len(self.class_names))
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._order = order

    def num_items(self, class_index: int) -> int:
        return int(self._offsets[class_index + 1] - self._offsets[class_index])

    def load(self, class_index: int, item: int) -> np.ndarray:
        if not 0 <= item < self.num_items(class_index):
            raise IndexError(f"{self.describe(class_index, item)}: no such item")
        return self.images[self._order[self._offsets[class_index] + item]]

    def arrays(self, split: str = "all") -> tuple[np.ndarray, np.ndarray]:
        """All images of ``split``'s classes and their class indices, for plain classification."""
        labels = np.repeat(np.arange(len(self.class_names)), np.diff(self._offsets))
        wanted = np.isin(labels, self.classes(split))
        return self.images[self._order[wanted]], labels[wanted]


class Source:
    """A named collection of domains."""

    def __init__(self, domains: Mapping[str, Domain] | Sequence[Domain]):
        if not isinstance(domains, Mapping):
            domains = {domain.name: domain for domain in domains}
        self.domains = dict(domains)

    def __getitem__(self, name: str) -> Domain:
        try:
            return self.domains[name]
        except KeyError:
            raise KeyError(f"no domain {name!r}; available: {sorted(self.domains)}") from None

    def __iter__(self):
        return iter(self.domains)

    def __len__(self) -> int:
        return len(self.domains)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.domains)})"
