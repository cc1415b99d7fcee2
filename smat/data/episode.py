"""Tasks (support and query sets) and the index-level plan an episode is built from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class EpisodeSpec:
    """Which images make one episode, before anything is loaded.

    ``classes[label]`` is the domain's class index that gets episode label
    ``label``; ``support[label]`` and ``query[label]`` are item indices within
    that class. Support and query items of one class never overlap.
    """

    domain: str
    classes: tuple[int, ...]
    support: tuple[tuple[int, ...], ...]
    query: tuple[tuple[int, ...], ...]

    @property
    def n_way(self) -> int:
        return len(self.classes)

    @property
    def support_size(self) -> int:
        return sum(len(items) for items in self.support)

    @property
    def query_size(self) -> int:
        return sum(len(items) for items in self.query)


@dataclass
class Task:
    """One few-shot task: labels are 0 … n_way−1 in both sets.

    support_x: float [S, 3, H, W]; support_y: int64 [S];
    query_x: float [Q, 3, H, W]; query_y: int64 [Q].
    ``class_names[label]`` names the source class behind each label;
    ``skipped`` lists unreadable images that were replaced while building it.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    domain: str
    class_names: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def n_way(self) -> int:
        return len(self.class_names)

    def pooled(self) -> Task:
        """The task without its support/query split: both sets are the union
        of the two (Table 2's 'no split' ablation)."""
        x = torch.cat([self.support_x, self.query_x])
        y = torch.cat([self.support_y, self.query_y])
        return replace(self, support_x=x, support_y=y, query_x=x, query_y=y)

    def to(self, device, non_blocking: bool = False) -> Task:
        move = {name: getattr(self, name).to(device, non_blocking=non_blocking)
                for name in ("support_x", "support_y", "query_x", "query_y")}
        return replace(self, **move)

    def pin_memory(self) -> Task:
        """Called by DataLoader(pin_memory=True) on custom batch types."""
        pinned = {name: getattr(self, name).pin_memory()
                  for name in ("support_x", "support_y", "query_x", "query_y")}
        return replace(self, **pinned)


def labels_for(items_per_class) -> torch.Tensor:
    """Episode labels for items grouped by class: class ``label`` repeated len(items) times."""
    counts = torch.tensor([len(items) for items in items_per_class], dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)
