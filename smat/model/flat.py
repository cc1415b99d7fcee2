"""One flat buffer for every backbone parameter that carries experts.

The merge kernel builds all B tasks' weights in one launch over one flat
buffer of N elements; the backbone then runs on views of row b, through
``torch.func.functional_call``. :class:`FlatLayout` records where each
parameter lives in the buffer.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ConfigError, short


@dataclass(frozen=True)
class Slot:
    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


def select_parameters(module: nn.Module, patterns) -> list[str]:
    """Names of ``module``'s parameters matching any fnmatch pattern, e.g. ``blocks.*.mlp.*``."""
    names = [name for name, _ in module.named_parameters()]
    chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    if not chosen:
        raise ConfigError(f"no backbone parameter matches model.expert_patterns={short(list(patterns))}; "
                         f"parameter names look like {', '.join(names[:4])} …")
    return chosen


class FlatLayout:
    """Where each selected parameter sits in a flat buffer of ``num_elements`` values."""

    def __init__(self, module: nn.Module, patterns=("*",)):
        parameters = dict(module.named_parameters())
        offset, slots = 0, []
        for name in select_parameters(module, patterns):
            shape = tuple(parameters[name].shape)
            slots.append(Slot(name, offset, shape))
            offset += slots[-1].numel
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.num_elements = offset

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self.slots]

    def flatten(self, module: nn.Module, dtype=torch.float32) -> torch.Tensor:
        parameters = dict(module.named_parameters())
        return torch.cat([parameters[s.name].detach().reshape(-1).to(dtype) for s in self.slots])

    def tie(self, module: nn.Module, flat: torch.Tensor) -> None:
        """Make the module's selected parameters views of ``flat`` (no second copy of the weights)."""
        parameters = dict(module.named_parameters())
        for slot, view in zip(self.slots, self.views(flat).values(), strict=True):
            parameters[slot.name].data = view

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{name: view} of a flat [N] buffer (or [..., N]: leading dimensions are kept)."""
        # one split (whose backward is one concatenation) rather than a slice per parameter, whose backward
        # would write a zero-filled gradient of the whole buffer for every parameter
        lead = tuple(flat.shape[:-1])
        pieces = flat.split([s.numel for s in self.slots], dim=-1)
        return {s.name: piece.view(*lead, *s.shape) for s, piece in zip(self.slots, pieces, strict=True)}

    def groups(self, key) -> dict[str, list[Slot]]:
        """Slots grouped by ``key(name)``, e.g. by layer type or depth (for analyses)."""
        grouped: dict[str, list[Slot]] = {}
        for slot in self.slots:
            grouped.setdefault(key(slot.name), []).append(slot)
        return grouped
