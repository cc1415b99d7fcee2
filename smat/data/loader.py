"""Episodes as a torch Dataset, loaded in DataLoader worker processes.

Episode ``i`` of an :class:`EpisodeDataset` is drawn from
``numpy.random.default_rng([seed, i])``: the same seed and index give the
same task in any process, with any number of workers, in any order. A fixed
validation set is just a dataset with its own seed and a fixed length.

An unreadable image (damaged, or over the pixel limit) is replaced by an
unused image of its class, with a warning, and counted. A class without
enough readable images for an episode is excluded from it with a warning and
the episode is drawn again from ``[seed, index, attempt]``: still a function
of the seed, the index and the data only.
"""

from __future__ import annotations

import itertools
import warnings
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .episode import EpisodeSpec, Task, labels_for
from .source import UnreadableImageError

# Errors a broken image file can raise from PIL, h5py or numpy decoding
# (UnreadableImageError is a ValueError; it is named for the reader).
UNREADABLE = (OSError, ValueError, KeyError, IndexError, SyntaxError, EOFError, UnreadableImageError,
              Image.DecompressionBombError)


class UnusableClass(Exception):
    """A class of an episode has too few readable images for it."""

    def __init__(self, class_index: int):
        super().__init__(class_index)
        self.class_index = class_index


class EpisodeDataset(Dataset):
    """Maps an episode index to a :class:`Task`.

    source: a :class:`~smat.data.source.Source`; sampler: any object with
    ``sample(rng) -> EpisodeSpec``; transform: ``(images, rng) -> [B, 3, H, W]``
    (support and query go through it separately); num_episodes: the length
    reported to DataLoader (indices beyond it work too, see :func:`episode_loader`).
    """

    def __init__(self, source, sampler, transform, num_episodes: int = 1000, seed: int = 0,
                 query_transform=None):
        self.source, self.sampler, self.transform = source, sampler, transform
        self.query_transform = query_transform or transform
        self.num_episodes, self.seed = num_episodes, seed
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return self.num_episodes

    def spec(self, index: int) -> EpisodeSpec:
        return self.sampler.sample(self._rng(index))

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(index)])

    def __getitem__(self, index: int) -> Task:
        excluded: set[tuple[str, int]] = set()
        skipped: list[str] = []  # over all attempts, so that the loader counts every unreadable image
        for attempt in itertools.count():
            rng = self._rng(index) if attempt == 0 else np.random.default_rng([self.seed, int(index), attempt])
            spec = self.sampler.sample(rng, frozenset(excluded)) if excluded else self.sampler.sample(rng)
            try:
                return self._build(spec, rng, skipped)
            except UnusableClass as unusable:
                # Each attempt excludes one more class: the sampler raises once too few are left.
                excluded.add((spec.domain, unusable.class_index))

    def _build(self, spec: EpisodeSpec, rng: np.random.Generator, skipped: list[str]) -> Task:
        domain = self.source[spec.domain]
        used = {c: set(s) | set(q) for c, s, q in zip(spec.classes, spec.support, spec.query, strict=True)}
        support = [self._load_class(domain, c, items, used[c], rng, skipped)
                   for c, items in zip(spec.classes, spec.support, strict=True)]
        query = [self._load_class(domain, c, items, used[c], rng, skipped)
                 for c, items in zip(spec.classes, spec.query, strict=True)]
        return Task(
            support_x=self.transform([image for images in support for image in images], rng),
            support_y=labels_for(spec.support),
            query_x=self.query_transform([image for images in query for image in images], rng),
            query_y=labels_for(spec.query),
            domain=spec.domain,
            class_names=tuple(domain.class_names[c] for c in spec.classes),
            skipped=tuple(skipped),
        )

    def _load_class(self, domain, class_index, items, used, rng, skipped):
        """Load items; an unreadable one is replaced by an unused item of the same class."""
        images = []
        spare = None
        for item in items:
            while True:
                try:
                    images.append(domain.load(class_index, item))
                    break
                except UNREADABLE as error:
                    where = domain.describe(class_index, item)
                    skipped.append(where)
                    if where not in self._warned:
                        self._warned.add(where)
                        warnings.warn(f"skipping unreadable image {where}: {error}", stacklevel=2)
                    if spare is None:
                        spare = [i for i in rng.permutation(domain.num_items(class_index)).tolist()
                                 if i not in used]
                    if not spare:
                        self._warn_excluded(domain, class_index, error)
                        raise UnusableClass(class_index) from error
                    item = spare.pop(0)
                    used.add(item)
        return images


    def _warn_excluded(self, domain, class_index: int, error: Exception) -> None:
        key = f"class:{domain.name}/{class_index}"
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"excluding class {domain.class_names[class_index]!r} of domain {domain.name!r} from "
                          f"episodes that need more of its images than can be read (last error: {error}); fix "
                          f"or remove the broken images", stacklevel=3)


def _as_list(tasks):
    return tasks


def _worker_init(_worker_id: int) -> None:
    # Workers each decode and resize; several intra-op threads per worker only oversubscribe the cores.
    torch.set_num_threads(1)


class EpisodeLoader:
    """Iterates tasks (or lists of ``meta_batch`` tasks) and keeps a summary of skipped images."""

    def __init__(self, dataset: EpisodeDataset, num_episodes: int | None = None, start: int = 0,
                 meta_batch: int | None = None, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int = 2, indices=None):
        """Episodes ``start … start + num_episodes − 1``, or exactly ``indices`` when given (e.g. one
        process's share of every meta-batch)."""
        self.dataset = dataset
        if indices is None:
            self.num_episodes = len(dataset) if num_episodes is None else num_episodes
            indices = range(start, start + self.num_episodes)
        else:
            self.num_episodes = len(indices)
        self.skipped: Counter[str] = Counter()
        options = {"prefetch_factor": prefetch_factor, "worker_init_fn": _worker_init} if num_workers else {}
        self._loader = DataLoader(dataset, batch_size=meta_batch, sampler=indices, num_workers=num_workers,
                                  collate_fn=_as_list, pin_memory=pin_memory, **options)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self):
        for batch in self._loader:
            for task in batch if isinstance(batch, list) else (batch,):
                self.skipped.update(task.skipped)
            yield batch

    def summary(self) -> str:
        if not self.skipped:
            return "no unreadable images"
        return (f"{len(self.skipped)} unreadable images skipped ({sum(self.skipped.values())} times): "
                + ", ".join(sorted(self.skipped)[:10]) + (" …" if len(self.skipped) > 10 else ""))

