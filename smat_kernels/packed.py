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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

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
        check_packed_structure(self)

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
                             f"{', '.join(sorted(map(str, state))) or 'nothing'}); {PACKED_FIX}")
        shape = check.check_tensor("PackedExperts state 'shape'", state["shape"], dims=1, dtypes=(torch.int64,))
        if shape.shape != (3,) or shape.device.type == "meta":
            raise ValueError(f"PackedExperts state 'shape' must hold [n, num_experts, rounded], got "
                             f"{tuple(shape.shape)} on {shape.device}; {PACKED_FIX}")
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
        check_packed_contents(packed)
        return packed

    def save(self, path: str | Path) -> None:
        """Write the packed experts to a safetensors file."""
        save_file({name: tensor.contiguous().cpu() for name, tensor in self.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> PackedExperts:
        """Read a file written by :meth:`save`, checked as by
        :meth:`from_state_dict`; a damaged file is a ``ValueError``."""
        try:
            state = load_file(str(path), device=str(device))
        except SafetensorError as error:
            raise ValueError(f"{path} is not a readable packed-experts file ({error}); it may be truncated or "
                             f"damaged: write it again with PackedExperts.save") from None
        return cls.from_state_dict(state)


# --------------------------------------------------------------------------
# Packed experts: every field is checked before a pointer reaches a kernel,
# which trusts the offsets and the bitmap to stay inside the packed buffers.
# --------------------------------------------------------------------------

PACKED_FIX = "re-create it with smat_kernels.pack, or load it with PackedExperts.load / from_state_dict"


def check_count(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"PackedExperts.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"PackedExperts.{name} must be ≥ {minimum}, got {value}")
    return value


def check_packed_tensor(name: str, value, dtypes: tuple[torch.dtype, ...], length: int | None) -> torch.Tensor:
    check.check_tensor(f"PackedExperts.{name}", value, dims=1, dtypes=dtypes)
    if length is not None and value.shape[0] != length:
        raise ValueError(f"PackedExperts.{name} has {value.shape[0]} entries but must have {length}: "
                         f"the packed experts are inconsistent; {PACKED_FIX}")
    return value


def check_packed_structure(packed) -> None:
    """Types, dtypes, shapes, contiguity and device of every field: metadata
    only, no data is read (cheap, and runs at construction)."""
    n = check_count("n", packed.n, minimum=0)
    num_experts = check_count("num_experts", packed.num_experts, minimum=1)
    check.check_num_experts(num_experts, "PackedExperts")
    check_count("rounded", packed.rounded, minimum=0)
    words = bitmap_words(n)
    check_packed_tensor("support_bitmap", packed.support_bitmap, (torch.int32,), words)
    check_packed_tensor("word_offsets", packed.word_offsets, (torch.int64,), words + 1)
    check_packed_tensor("delta", packed.delta, check.THETA_DTYPES, None)
    check_packed_tensor("expert_bits", packed.expert_bits, (expert_bits_dtype(num_experts),), packed.delta.shape[0])
    check.check_same_device(delta=packed.delta, support_bitmap=packed.support_bitmap, word_offsets=packed.word_offsets,
                      expert_bits=packed.expert_bits)


def popcount32(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word, as int64 (SWAR; torch has no popcount)."""
    x = words.to(torch.int64) & 0xFFFFFFFF
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) & 0xFFFFFFFF) >> 24


def check_packed_contents(packed) -> None:
    """The offsets and counts agree with the bitmap: word_offsets[0] = 0, each
    word's offset step is its popcount, the last offset is the support size,
    no bit is set past element N, and no expert bit past M. Reads the data
    (one host synchronisation on a GPU); skipped for meta tensors, which hold
    none."""
    if packed.delta.device.type == "meta":
        return
    bitmap, offsets, bits = packed.support_bitmap, packed.word_offsets, packed.expert_bits
    tail_lanes = packed.n % 32
    padding = (bitmap[-1:].to(torch.int64) & 0xFFFFFFFF) >> tail_lanes if tail_lanes else bitmap.new_zeros(0)
    unsigned_bits = bits.to(torch.int64) & ((1 << (8 * bits.element_size())) - 1)
    facts = torch.stack([
        offsets[0] != 0,
        (padding != 0).any(),
        (offsets[1:] - offsets[:-1] != popcount32(bitmap)).any(),
        offsets[-1] != packed.delta.shape[0],
        (unsigned_bits >> packed.num_experts != 0).any(),
    ]).tolist()
    problems = (
        f"word_offsets[0] must be 0, got {int(offsets[0])}",
        f"support_bitmap has bits set past element N = {packed.n}",
        "word_offsets do not match the bitmap: each step must be the number of set bits of its bitmap word",
        f"word_offsets end at {int(offsets[-1])} but delta holds {packed.delta.shape[0]} support elements",
        f"expert_bits has bits set for experts ≥ M = {packed.num_experts}",
    )
    for failed, problem in zip(facts, problems):
        if failed:
            raise ValueError(f"invalid PackedExperts: {problem}; {PACKED_FIX}")


def check_packed(packed) -> None:
    """Everything a packed merge relies on, re-checked at each call because
    the tensors may have been changed in place since construction."""
    if not isinstance(packed, PackedExperts):
        raise TypeError(f"packed must be a PackedExperts from smat_kernels.pack, got {type(packed).__name__}")
    check_packed_structure(packed)
    check_packed_contents(packed)
