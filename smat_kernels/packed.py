"""Packed sparse storage of SMAT experts: the deployment format.

After meta-training the masks are (nearly) binary, so the M experts of an
element are M bits. ``PackedExperts`` keeps

* ``support_bitmap``: int32 [ceil(N / 32)], bit i of word w set when element
  32·w + i is switched on by at least one expert (the union support);
* ``word_offsets``: int64 [ceil(N / 32) + 1], the number of support elements
  before each bitmap word, so that any element finds its packed slot in O(1);
* ``expert_bits``: [S] one word per support element, bit m set when expert m
  keeps the element (uint8 for M ≤ 8, int16 for M ≤ 16, int32 for M ≤ 32);
* ``delta``: [S] θ_δ on the support only, in θ's dtype.

``rounded`` counts the mask entries that were not already exactly 0 or 1 and
were rounded by the pack step; the packed merge equals the dense
deterministic merge exactly when it is 0.

The kernels trust the offsets to stay inside the packed buffers, so nothing
reaches them unchecked: construction checks every field's type, dtype, shape,
contiguity and device; ``from_state_dict``, ``load`` and every packed merge
also check that the offsets and counts agree with the bitmap. A bad field is
a ``TypeError`` or ``ValueError`` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import _validation as check

BITMAP_WORD_BITS = 32
STATE_KEYS = ("support_bitmap", "word_offsets", "expert_bits", "delta", "shape")


def expert_bits_dtype(num_experts: int) -> torch.dtype:
    """The narrowest integer dtype that holds one bit per expert."""
    if num_experts <= 8:
        return torch.uint8
    if num_experts <= 16:
        return torch.int16
    return torch.int32


def bitmap_words(n: int) -> int:
    return (n + BITMAP_WORD_BITS - 1) // BITMAP_WORD_BITS


@dataclass(frozen=True)
class PackedExperts:
    n: int
    num_experts: int
    support_bitmap: torch.Tensor
    word_offsets: torch.Tensor
    expert_bits: torch.Tensor
    delta: torch.Tensor
    rounded: int

    def __post_init__(self):
        check.check_packed_structure(self)

    @property
    def support_size(self) -> int:
        return int(self.delta.numel())

    @property
    def device(self) -> torch.device:
        return self.delta.device

    def nbytes(self) -> int:
        """Bytes held by the packed tensors (what a deployment stores)."""
        tensors = (self.support_bitmap, self.word_offsets, self.expert_bits, self.delta)
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> PackedExperts:
        return PackedExperts(
            n=self.n,
            num_experts=self.num_experts,
            support_bitmap=self.support_bitmap.to(device),
            word_offsets=self.word_offsets.to(device),
            expert_bits=self.expert_bits.to(device),
            delta=self.delta.to(device),
            rounded=self.rounded,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors for safetensors; ``n``, ``num_experts`` and ``rounded`` are
        recovered from their shapes and a 0-dim tensor."""
        return {
            "support_bitmap": self.support_bitmap,
            "word_offsets": self.word_offsets,
            "expert_bits": self.expert_bits,
            "delta": self.delta,
            "shape": torch.tensor([self.n, self.num_experts, self.rounded], dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> PackedExperts:
        """The inverse of :meth:`state_dict`, checked field by field (a
        ``ValueError`` or ``TypeError`` for a damaged or foreign state)."""
        if not isinstance(state, dict):
            raise TypeError(f"a PackedExperts state must be a dict of tensors, got {type(state).__name__}")
        missing = sorted(set(STATE_KEYS) - set(state))
        if missing:
            raise ValueError(f"not a PackedExperts state: {', '.join(missing)} missing (it holds "
                             f"{', '.join(sorted(map(str, state))) or 'nothing'}); {check.PACKED_FIX}")
        shape = check.check_tensor("PackedExperts state 'shape'", state["shape"], dims=1, dtypes=(torch.int64,))
        if shape.shape != (3,) or shape.device.type == "meta":
            raise ValueError(f"PackedExperts state 'shape' must hold [n, num_experts, rounded], got "
                             f"{tuple(shape.shape)} on {shape.device}; {check.PACKED_FIX}")
        n, num_experts, rounded = (int(v) for v in shape.tolist())
        packed = cls(
            n=n,
            num_experts=num_experts,
            support_bitmap=state["support_bitmap"],
            word_offsets=state["word_offsets"],
            expert_bits=state["expert_bits"],
            delta=state["delta"],
            rounded=rounded,
        )
        check.check_packed_contents(packed)
        return packed

    def save(self, path: str | Path) -> None:
        """Write the packed experts to a safetensors file."""
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous().cpu() for name, tensor in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> PackedExperts:
        """Read a file written by :meth:`save`, checked as by
        :meth:`from_state_dict`; a damaged file is a ``ValueError``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(device))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable packed-experts file ({error}); it may be truncated or "
                             f"damaged: write it again with PackedExperts.save") from None
        return cls.from_state_dict(state)

