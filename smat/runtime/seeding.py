"""Random streams keyed by what they are for, so that a draw never depends on which process or in which
order it runs."""

from __future__ import annotations

import numpy as np
import torch


def keyed_generator(*key: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from the integers ``key`` (e.g. (seed, step, task) for a training task's
    Gumbel noise, (seed, task) for a meta-test task's augmentations): the same stream wherever it is made."""
    state = np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))
