"""Triton kernels of the packed sparse storage (smat_kernels.packed): the two
pack passes and the packed merge.

pack
    1. ``pack_support_kernel``: per bitmap word of 32 elements, the support
       bits and their count; per program, the number of rounded mask entries.
    2. torch.cumsum of the counts gives ``word_offsets``.
    3. ``pack_scatter_kernel``: recomputes each element's expert bits and
       writes them and θ_δ to slot word_offsets[word] + (support elements
       before it in its word).
packed merge
    ``packed_merge_kernel`` finds an element's slot from the bitmap and the
    word offsets (a popcount), and adds θ_δ · Σ_m α[b, m]·bit_m, looked up in a
    [B, 2^M] table for M ≤ 8 and summed bit by bit otherwise, both in order
    m = 0 … M−1 as the merge sums, so that it equals the deterministic merge
    exactly for binary masks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..packed import BITMAP_WORD_BITS, PackedExperts, bitmap_words, expert_bits_dtype
from . import autotune_configs, next_power_of_2, reduction_programs
from .merge import MAX_TILE, store_rounded

WORD_BITS = tl.constexpr(BITMAP_WORD_BITS)
# Bitmap words per program.
WORD_BLOCKS = (4, 8, 16)
INTERPRETER_WORDS = 16
MAX_TABLE_EXPERTS = 8


def _prune_word_tiles(configs, named_args, **kwargs):
    """Keep [BLOCK, 32, M] tiles that fit in registers."""
    experts = kwargs.get("EXPERTS_PADDED", named_args.get("EXPERTS_PADDED", 1))
    fitting = [config for config in configs if config.kwargs["BLOCK"] * BITMAP_WORD_BITS * experts <= MAX_TILE]
    return fitting or [min(configs, key=lambda config: config.kwargs["BLOCK"])]


@triton.jit
def _expert_bits(log_alpha_ptr, elements, in_range, gamma, stretch, NUM_EXPERTS: tl.constexpr,
                 EXPERTS_PADDED: tl.constexpr):
    """Bit m set when the deterministic mask of (element, m) is ≥ 0.5, as
    int64 [..., 1] tiles over ``elements``; also the number of masks that are
    neither 0 nor 1 (rounded by the pack)."""
    experts = tl.arange(0, EXPERTS_PADDED)
    valid = in_range[:, :, None] & (experts < NUM_EXPERTS)[None, None, :]
    log_alpha = tl.load(log_alpha_ptr + elements[:, :, None] * NUM_EXPERTS + experts[None, None, :], mask=valid,
                        other=0.0)
    stretched = stretch / (1.0 + tl.exp(-log_alpha)) + gamma
    mask = tl.where(stretched < 0.0, 0.0, tl.where(stretched > 1.0, 1.0, stretched))
    bit_values = tl.cast(1, tl.int64) << experts.to(tl.int64)
    bits = tl.sum(tl.where(valid & (mask >= 0.5), bit_values[None, None, :], 0), axis=2)
    rounded = tl.sum(tl.sum((valid & (mask > 0.0) & (mask < 1.0)).to(tl.int64), axis=2), axis=1)
    return bits, rounded


@triton.autotune(configs=autotune_configs(WORD_BLOCKS, interpreter_block=INTERPRETER_WORDS),
                 key=["n", "NUM_EXPERTS"], prune_configs_by={"early_config_prune": _prune_word_tiles})
@triton.jit
def pack_support_kernel(bitmap_ptr, counts_ptr, rounded_ptr, log_alpha_ptr, n, words, gamma, stretch,
                        NUM_EXPERTS: tl.constexpr, EXPERTS_PADDED: tl.constexpr, BLOCK: tl.constexpr):
    """Pass 1 of pack.

    Inputs: log_alpha fp32 [N, M]. Outputs: bitmap int32 [W] (bit i of word w:
    element 32·w + i is in the union support), counts int64 [W] (support
    elements per word), rounded int64 [P] (per program: mask entries neither
    0 nor 1). W = ceil(N / 32). Grid: (P,), striding over blocks of BLOCK words.
    """
    program = tl.program_id(0)
    lanes = tl.arange(0, WORD_BITS)
    rounded = tl.zeros([BLOCK], dtype=tl.int64)
    for block in range(program, tl.cdiv(words, BLOCK), tl.num_programs(0)):
        word_index = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        elements = word_index[:, None] * WORD_BITS + lanes[None, :]
        in_range = elements < n
        bits, block_rounded = _expert_bits(log_alpha_ptr, elements, in_range, gamma, stretch, NUM_EXPERTS,
                                           EXPERTS_PADDED)
        rounded += block_rounded
        support = (bits != 0).to(tl.int64)
        bitmap = tl.sum(support << lanes[None, :].to(tl.int64), axis=1)
        word_valid = word_index < words
        # Bit 31 set: the int64 value ≥ 2^31 wraps to a negative int32, as the format stores it.
        tl.store(bitmap_ptr + word_index, bitmap.to(tl.int32), mask=word_valid)
        tl.store(counts_ptr + word_index, tl.sum(support, axis=1), mask=word_valid)
    tl.store(rounded_ptr + program, tl.sum(rounded, axis=0))


@triton.autotune(configs=autotune_configs(WORD_BLOCKS, interpreter_block=INTERPRETER_WORDS),
                 key=["n", "NUM_EXPERTS"], prune_configs_by={"early_config_prune": _prune_word_tiles})
@triton.jit
def pack_scatter_kernel(expert_bits_ptr, packed_delta_ptr, delta_ptr, word_offsets_ptr, log_alpha_ptr, n, words,
                        gamma, stretch, NUM_EXPERTS: tl.constexpr, EXPERTS_PADDED: tl.constexpr,
                        BLOCK: tl.constexpr):
    """Pass 2 of pack.

    Inputs: delta [N] in θ's dtype; word_offsets int64 [W + 1] (exclusive
    prefix sum of pass 1's counts); log_alpha fp32 [N, M]. Outputs:
    expert_bits [S] (uint8/int16/int32 by M), packed_delta [S] in θ's dtype.
    Grid: (ceil(W / BLOCK),)."""
    word_index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    lanes = tl.arange(0, WORD_BITS)
    elements = word_index[:, None] * WORD_BITS + lanes[None, :]
    in_range = elements < n
    bits, _ = _expert_bits(log_alpha_ptr, elements, in_range, gamma, stretch, NUM_EXPERTS, EXPERTS_PADDED)
    support = bits != 0
    before_in_word = tl.cumsum(support.to(tl.int64), axis=1) - support.to(tl.int64)
    word_start = tl.load(word_offsets_ptr + word_index, mask=word_index < words, other=0)
    slots = word_start[:, None] + before_in_word
    tl.store(expert_bits_ptr + slots, bits.to(expert_bits_ptr.dtype.element_ty), mask=support)
    delta = tl.load(delta_ptr + elements, mask=support, other=0.0)
    tl.store(packed_delta_ptr + slots, delta, mask=support)


@triton.jit
def _popcount(x):
    """Set bits of x, an int64 tile holding values in [0, 2^32)."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24) & 0xFF


@triton.autotune(configs=autotune_configs(), key=["n", "NUM_EXPERTS", "TASKS"])
@triton.jit
def packed_merge_kernel(out_ptr, theta_pre_ptr, bitmap_ptr, word_offsets_ptr, expert_bits_ptr, packed_delta_ptr,
                        alpha_ptr, table_ptr, batch, n, NUM_EXPERTS: tl.constexpr, TASKS: tl.constexpr,
                        USE_TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """θ[b, j] = θ_pre[j] + θ_δ[slot(j)] · Σ_m α[b, m]·bit_m(j) on the support,
    θ_pre[j] elsewhere.

    Inputs: theta_pre [N] in θ's dtype; bitmap int32 [W]; word_offsets int64
    [W + 1]; expert_bits [S] (uint8/int16/int32); packed_delta [S] in θ's
    dtype; alpha fp32 [B, M]; table fp32 [B, 2^M] (read when USE_TABLE, M ≤ 8).
    Output: out [B, N] in θ's dtype. Grid: (ceil(N / BLOCK),)."""
    elements = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = elements < n
    tasks = tl.arange(0, TASKS)
    task_valid = tasks < batch
    word_index = elements // WORD_BITS
    lane = elements % WORD_BITS
    bitmap = tl.load(bitmap_ptr + word_index, mask=in_range, other=0).to(tl.int64) & 0xFFFFFFFF
    in_support = in_range & (((bitmap >> lane) & 1) != 0)
    below = bitmap & ((tl.cast(1, tl.int64) << lane) - 1)
    slots = tl.load(word_offsets_ptr + word_index, mask=in_range, other=0) + _popcount(below)
    bits = tl.load(expert_bits_ptr + slots, mask=in_support, other=0).to(tl.int64) & ((1 << NUM_EXPERTS) - 1)
    tile_valid = task_valid[:, None] & in_support[None, :]
    if USE_TABLE:
        weight = tl.load(table_ptr + tasks[:, None] * (1 << NUM_EXPERTS) + bits[None, :], mask=tile_valid,
                         other=0.0)
    else:
        weight = tl.zeros([TASKS, BLOCK], dtype=tl.float32)
        for expert in tl.static_range(NUM_EXPERTS):
            alpha = tl.load(alpha_ptr + tasks * NUM_EXPERTS + expert, mask=task_valid, other=0.0)
            weight = weight + alpha[:, None] * ((bits >> expert) & 1).to(tl.float32)[None, :]
    theta_pre = tl.load(theta_pre_ptr + elements, mask=in_range, other=0.0).to(tl.float32)
    delta = tl.load(packed_delta_ptr + slots, mask=in_support, other=0.0).to(tl.float32)
    merged = tl.where(in_support[None, :], theta_pre[None, :] + delta[None, :] * weight, theta_pre[None, :])
    out_offsets = tasks[:, None].to(tl.int64) * n + elements[None, :]
    store_rounded(out_ptr + out_offsets, merged, task_valid[:, None] & in_range[None, :])


# --------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------


def pack(delta: torch.Tensor, log_alpha: torch.Tensor, gamma: float, zeta: float) -> PackedExperts:
    """The two pack passes around a torch.cumsum of the per-word counts."""
    n, num_experts = log_alpha.shape
    device = log_alpha.device
    words = bitmap_words(n)
    experts_padded = next_power_of_2(num_experts)
    bitmap = torch.empty(words, dtype=torch.int32, device=device)
    counts = torch.empty(words, dtype=torch.int64, device=device)
    programs = reduction_programs(device, words, WORD_BLOCKS, INTERPRETER_WORDS)
    rounded = torch.zeros(programs, dtype=torch.int64, device=device)
    stretch = zeta - gamma
    if words:
        pack_support_kernel[(programs,)](bitmap, counts, rounded, log_alpha, n, words, gamma, stretch,
                                         NUM_EXPERTS=num_experts, EXPERTS_PADDED=experts_padded)
    word_offsets = torch.zeros(words + 1, dtype=torch.int64, device=device)
    torch.cumsum(counts, dim=0, out=word_offsets[1:])
    support = int(word_offsets[-1])
    bits = torch.empty(support, dtype=expert_bits_dtype(num_experts), device=device)
    packed_delta = torch.empty(support, dtype=delta.dtype, device=device)
    if support:

        def grid(meta):
            return (triton.cdiv(words, meta["BLOCK"]),)

        pack_scatter_kernel[grid](bits, packed_delta, delta, word_offsets, log_alpha, n, words, gamma, stretch,
                                  NUM_EXPERTS=num_experts, EXPERTS_PADDED=experts_padded)
    return PackedExperts(n, num_experts, bitmap, word_offsets, bits, packed_delta, int(rounded.sum()))


def weight_table(alpha: torch.Tensor) -> torch.Tensor:
    """fp32 [B, 2^M]: table[b, k] = Σ_m α[b, m]·bit_m(k), accumulated in order
    m = 0 … M−1 with the merge's own operations (w + α·z), so that each entry
    is bitwise the weight the deterministic merge computes for binary masks."""
    batch, num_experts = alpha.shape
    keys = torch.arange(1 << num_experts, device=alpha.device)
    table = torch.zeros(batch, 1 << num_experts, dtype=torch.float32, device=alpha.device)
    for expert in range(num_experts):
        table = table + alpha[:, expert, None] * ((keys >> expert) & 1).to(torch.float32)
    return table


def packed_merge(theta_pre: torch.Tensor, packed: PackedExperts, alpha: torch.Tensor) -> torch.Tensor:
    """Launch :func:`packed_merge_kernel`: [B, N] in θ's dtype."""
    batch, num_experts = alpha.shape
    n = packed.n
    out = torch.empty(batch, n, dtype=theta_pre.dtype, device=theta_pre.device)
    if n == 0:
        return out
    use_table = num_experts <= MAX_TABLE_EXPERTS
    table = weight_table(alpha) if use_table else alpha

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    # An empty support leaves nothing to read in expert_bits/delta: any tensor stands in for them.
    expert_bits = packed.expert_bits if packed.support_size else packed.word_offsets
    packed_delta = packed.delta if packed.support_size else theta_pre
    packed_merge_kernel[grid](out, theta_pre, packed.support_bitmap, packed.word_offsets, expert_bits, packed_delta,
                              alpha, table, batch, n, NUM_EXPERTS=num_experts, TASKS=next_power_of_2(batch),
                              USE_TABLE=use_table)
    return out
