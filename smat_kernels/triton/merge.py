"""Triton kernels of the merge θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m] and
its backward, with the per-element math of ``csrc/include/smat/elementwise.h``.

One program owns BLOCK elements and all B tasks: the tasks form the first
axis of a [TASKS, BLOCK] tile (TASKS = B rounded up to a power of two), so
log_α and the expert factor exp(−log_α/T) of an (element, expert) are loaded
and computed once and shared by the B tasks, and one Philox call serves four
experts. Experts are accumulated one after the other, m = 0 … M−1, in fp32,
like every backend, so that the packed merge reproduces the deterministic
merge bit for bit. Element offsets are 64-bit.

Noise: expert m of element j in task b takes word m % 4 of
``tl.randint4x(seed, offset + (b·N + j)·G + m // 4)``, G = ceil(M / 4)
(reference.philox_counter), converted by ``tl.rand``'s own
``uint_to_uniform_float``, so the uniforms are bit-identical to the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRET, autotune_configs, next_power_of_2, reduction_programs

# Mode codes (reference.MODES): deterministic, sample, near_noiseless.
# Globals read inside kernels must be tl.constexpr.
DETERMINISTIC = tl.constexpr(0)
SAMPLE = tl.constexpr(1)
NEAR_NOISELESS = tl.constexpr(2)
NEAR_NOISELESS_LOW = tl.constexpr(0.5 - 1e-6)
NEAR_NOISELESS_WIDTH = tl.constexpr(2e-6)
WORDS_PER_PHILOX_CALL = tl.constexpr(4)
DEFAULT_INVERSE_TEMPERATURE = 1.5  # β = 2/3, where x^(1/β) = x·sqrt(x)

# Registers per program grow with TASKS · BLOCK; above this the GPU spills.
MAX_TILE = 8192


def _prune_tiles(configs, named_args, **kwargs):
    """Drop configurations whose [TASKS, BLOCK] tile would spill; keep the
    smallest block if every one would."""
    tasks = kwargs.get("TASKS", named_args.get("TASKS", 1))
    fitting = [config for config in configs if config.kwargs["BLOCK"] * tasks <= MAX_TILE]
    return fitting or [min(configs, key=lambda config: config.kwargs["BLOCK"])]


# --------------------------------------------------------------------------
# Per-element math (elementwise.h)
# --------------------------------------------------------------------------


@triton.jit
def _select_word(word0, word1, word2, word3, INDEX: tl.constexpr):
    word = word0
    if INDEX == 1:
        word = word1
    if INDEX == 2:
        word = word2
    if INDEX == 3:
        word = word3
    return word


@triton.jit
def _noise_factor(word, inverse_temperature, MODE: tl.constexpr, DEFAULT_TEMPERATURE: tl.constexpr):
    """((1 − u)/u)^(1/T) of the uniform u that Philox ``word`` maps to;
    +inf at u = 0, which makes s = 0 as log(0) = −inf does."""
    u = tl.random.uint_to_uniform_float(word)
    if MODE == NEAR_NOISELESS:
        u = NEAR_NOISELESS_LOW + u * NEAR_NOISELESS_WIDTH
    ratio = (1.0 - u) / u
    if DEFAULT_TEMPERATURE:
        factor = ratio * tl.sqrt_rn(ratio)
    else:
        factor = tl.exp(inverse_temperature * tl.log(ratio))
    return factor


@triton.jit
def _mask_entry(noise, expert, inverse_temperature, gamma, stretch):
    """z = clamp(s·(ζ − γ) + γ, 0, 1) with s = 1/(1 + noise·expert), and
    dz/dlog_α = (ζ − γ)·s(1 − s)/T inside the clamp's closed range, else 0."""
    # An infinite noise factor wins over an expert factor that underflowed to 0.
    product = tl.where(noise == float("inf"), noise, noise * expert)
    s = 1.0 / (1.0 + product)
    stretched = s * stretch + gamma
    inside = (stretched >= 0.0) & (stretched <= 1.0)
    derivative = tl.where(inside, stretch * (s * (1.0 - s)) * inverse_temperature, 0.0)
    mask = tl.where(stretched < 0.0, 0.0, tl.where(stretched > 1.0, 1.0, stretched))
    return mask, derivative


@triton.jit
def _expert_mask(word0, word1, word2, word3, log_alpha_ptr, alpha_ptr, elements, in_range, tasks, task_valid,
                 inverse_temperature, gamma, stretch, EXPERT: tl.constexpr, WORD_INDEX: tl.constexpr,
                 NUM_EXPERTS: tl.constexpr, MODE: tl.constexpr, DEFAULT_TEMPERATURE: tl.constexpr):
    """α[:, m] [TASKS], and the mask z[:, :, m] with its derivative
    [TASKS, BLOCK] of expert m = EXPERT on a tile; word WORD_INDEX of the
    Philox words is its noise (unused in deterministic mode)."""
    log_alpha = tl.load(log_alpha_ptr + elements * NUM_EXPERTS + EXPERT, mask=in_range, other=0.0)
    alpha = tl.load(alpha_ptr + tasks * NUM_EXPERTS + EXPERT, mask=task_valid, other=0.0)
    # exp(−log_α/T): once per (element, expert), shared by the B tasks.
    expert_factor = tl.exp(-log_alpha * inverse_temperature)[None, :]
    if MODE == DETERMINISTIC:
        mask, derivative = _mask_entry(1.0, expert_factor, inverse_temperature, gamma, stretch)
    else:
        word = _select_word(word0, word1, word2, word3, WORD_INDEX)
        noise = _noise_factor(word, inverse_temperature, MODE, DEFAULT_TEMPERATURE)
        mask, derivative = _mask_entry(noise, expert_factor, inverse_temperature, gamma, stretch)
    return alpha, mask, derivative


@triton.jit
def _philox_words(seed, counters, MODE: tl.constexpr):
    """tl.randint4x(seed, counters); deterministic masks draw no noise, so
    there the counters stand in for the four (unused) words."""
    if MODE == DETERMINISTIC:
        word0, word1, word2, word3 = counters, counters, counters, counters
    else:
        word0, word1, word2, word3 = tl.randint4x(seed, counters)
    return word0, word1, word2, word3


# Triton's interpreter (3.9) casts fp32 → bf16 by truncation; compiled
# kernels round to nearest even, like torch. Under the interpreter the
# rounding is done by hand so that both agree with torch.
ROUND_BFLOAT16_BY_HAND = tl.constexpr(INTERPRET)


@triton.jit
def store_rounded(pointer, value, mask):
    """Store fp32 ``value`` in the pointer's dtype, rounded to nearest even."""
    if ROUND_BFLOAT16_BY_HAND and pointer.dtype.element_ty == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        value = bits.to(tl.float32, bitcast=True)
    tl.store(pointer, value.to(pointer.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------


@triton.autotune(configs=autotune_configs(), key=["n", "NUM_EXPERTS", "TASKS"],
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["seed", "offset"])
def merge_forward_kernel(out_ptr, theta_pre_ptr, delta_ptr, log_alpha_ptr, alpha_ptr, batch, n, seed, offset,
                         inverse_temperature, gamma, stretch, NUM_EXPERTS: tl.constexpr, TASKS: tl.constexpr,
                         MODE: tl.constexpr, DEFAULT_TEMPERATURE: tl.constexpr, BLOCK: tl.constexpr):
    """θ[b, j] = θ_pre[j] + θ_δ[j] · Σ_m α[b, m] z[b, j, m].

    Inputs: theta_pre, delta [N] (fp32/bf16/fp16); log_alpha fp32 [N, M]
    (expert-minor); alpha fp32 [B, M]; seed, offset: the 64-bit Philox key;
    inverse_temperature = 1/β (1 in deterministic mode), gamma, stretch = ζ − γ.
    Output: out [B, N] in θ's dtype. Grid: (ceil(N / BLOCK),).
    """
    elements = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = elements < n
    tasks = tl.arange(0, TASKS)
    task_valid = tasks < batch
    tile_valid = task_valid[:, None] & in_range[None, :]
    groups: tl.constexpr = (NUM_EXPERTS + WORDS_PER_PHILOX_CALL - 1) // WORDS_PER_PHILOX_CALL
    counter_base = offset + (tasks[:, None].to(tl.int64) * n + elements[None, :]) * groups
    weight = tl.zeros([TASKS, BLOCK], dtype=tl.float32)
    for group in tl.static_range(groups):
        word0, word1, word2, word3 = _philox_words(seed, counter_base + group, MODE)
        for word_index in tl.static_range(WORDS_PER_PHILOX_CALL):
            expert = group * WORDS_PER_PHILOX_CALL + word_index
            if expert < NUM_EXPERTS:
                alpha, mask, _ = _expert_mask(word0, word1, word2, word3, log_alpha_ptr, alpha_ptr, elements,
                                              in_range, tasks, task_valid, inverse_temperature, gamma, stretch,
                                              expert, word_index, NUM_EXPERTS, MODE, DEFAULT_TEMPERATURE)
                weight = weight + alpha[:, None] * mask
    theta_pre = tl.load(theta_pre_ptr + elements, mask=in_range, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + elements, mask=in_range, other=0.0).to(tl.float32)
    merged = theta_pre[None, :] + delta[None, :] * weight
    out_offsets = tasks[:, None].to(tl.int64) * n + elements[None, :]
    store_rounded(out_ptr + out_offsets, merged, tile_valid)


# --------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------


@triton.autotune(configs=autotune_configs(), key=["n", "NUM_EXPERTS", "TASKS"],
                 prune_configs_by={"early_config_prune": _prune_tiles})
@triton.jit(do_not_specialize=["seed", "offset"])
def merge_backward_kernel(grad_ptr, delta_ptr, log_alpha_ptr, alpha_ptr, grad_theta_pre_ptr, grad_delta_ptr,
                          grad_log_alpha_ptr, alpha_partials_ptr, batch, n, seed, offset, inverse_temperature, gamma,
                          stretch, NUM_EXPERTS: tl.constexpr, TASKS: tl.constexpr, EXPERTS_PADDED: tl.constexpr,
                          MODE: tl.constexpr, DEFAULT_TEMPERATURE: tl.constexpr, NEED_THETA_PRE: tl.constexpr,
                          NEED_DELTA: tl.constexpr, NEED_LOG_ALPHA: tl.constexpr, NEED_ALPHA: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Gradients of the merge, masks recomputed from their Philox key:

        ∂θ_pre[j] = Σ_b g[b, j]          ∂θ_δ[j] = Σ_b g[b, j] w[b, j]
        ∂log_α[j, m] = Σ_b g[b, j] θ_δ[j] α[b, m] ∂z[b, j, m]/∂log_α[j, m]
        alpha_partials[p, b, m] = Σ_{j of program p} g[b, j] θ_δ[j] z[b, j, m]

    Inputs: grad [B, N] and delta [N] in θ's dtype; log_alpha fp32 [N, M];
    alpha fp32 [B, M]; key and hard-concrete settings as the forward.
    Outputs (each written only when its NEED_* flag is set): grad_theta_pre,
    grad_delta [N] in θ's dtype; grad_log_alpha fp32 [N, M]; alpha_partials
    fp32 [P, B, M], P = the number of programs, to be summed over P by the
    caller (deterministic: no atomics, no [B, N, M] buffer).
    Grid: (P,); each program strides over the element blocks.
    """
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    tasks = tl.arange(0, TASKS)
    task_valid = tasks < batch
    expert_columns = tl.arange(0, EXPERTS_PADDED)
    groups: tl.constexpr = (NUM_EXPERTS + WORDS_PER_PHILOX_CALL - 1) // WORDS_PER_PHILOX_CALL
    alpha_partial = tl.zeros([TASKS, EXPERTS_PADDED], dtype=tl.float32)
    for block in range(program, tl.cdiv(n, BLOCK), programs):
        elements = tl.cast(block, tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        in_range = elements < n
        tile_valid = task_valid[:, None] & in_range[None, :]
        tile_offsets = tasks[:, None].to(tl.int64) * n + elements[None, :]
        grad = tl.load(grad_ptr + tile_offsets, mask=tile_valid, other=0.0).to(tl.float32)
        delta = tl.load(delta_ptr + elements, mask=in_range, other=0.0).to(tl.float32)
        grad_delta_product = grad * delta[None, :]
        counter_base = offset + tile_offsets * groups
        weight = tl.zeros([TASKS, BLOCK], dtype=tl.float32)
        for group in tl.static_range(groups):
            word0, word1, word2, word3 = _philox_words(seed, counter_base + group, MODE)
            for word_index in tl.static_range(WORDS_PER_PHILOX_CALL):
                expert = group * WORDS_PER_PHILOX_CALL + word_index
                if expert < NUM_EXPERTS:
                    alpha, mask, derivative = _expert_mask(
                        word0, word1, word2, word3, log_alpha_ptr, alpha_ptr, elements, in_range, tasks, task_valid,
                        inverse_temperature, gamma, stretch, expert, word_index, NUM_EXPERTS, MODE,
                        DEFAULT_TEMPERATURE)
                    if NEED_DELTA:
                        weight = weight + alpha[:, None] * mask
                    if NEED_ALPHA:
                        column = tl.sum(grad_delta_product * mask, axis=1)
                        alpha_partial += tl.where(expert_columns[None, :] == expert, column[:, None], 0.0)
                    if NEED_LOG_ALPHA:
                        grad_log_alpha = tl.sum(grad_delta_product * alpha[:, None] * derivative, axis=0)
                        tl.store(grad_log_alpha_ptr + elements * NUM_EXPERTS + expert, grad_log_alpha,
                                 mask=in_range)
        if NEED_THETA_PRE:
            grad_theta_pre = tl.sum(grad, axis=0)
            store_rounded(grad_theta_pre_ptr + elements, grad_theta_pre, in_range)
        if NEED_DELTA:
            grad_delta = tl.sum(grad * weight, axis=0)
            store_rounded(grad_delta_ptr + elements, grad_delta, in_range)
    if NEED_ALPHA:
        partial_offsets = (program * batch + tasks[:, None]) * NUM_EXPERTS + expert_columns[None, :]
        tl.store(alpha_partials_ptr + partial_offsets, alpha_partial,
                 mask=task_valid[:, None] & (expert_columns[None, :] < NUM_EXPERTS))


# --------------------------------------------------------------------------
# Uniforms (the self-test's bit-identity check)
# --------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed", "offset"])
def uniforms_kernel(out_ptr, seed, offset, total, NUM_EXPERTS: tl.constexpr, GROUPS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """out fp32 [B, N, M]: the uniforms of one sampled merge, through the
    merge kernels' own _philox_words and tl.rand conversion. Program p
    draws the BLOCK counters p·BLOCK … of the B·N·G in the call."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = index < total
    word0, word1, word2, word3 = _philox_words(seed, offset + index, SAMPLE)
    row = index // GROUPS
    first_expert = (index % GROUPS) * WORDS_PER_PHILOX_CALL
    for word_index in tl.static_range(4):
        word = _select_word(word0, word1, word2, word3, word_index)
        expert = first_expert + word_index
        tl.store(out_ptr + row * NUM_EXPERTS + expert, tl.random.uint_to_uniform_float(word),
                 mask=valid & (expert < NUM_EXPERTS))


# --------------------------------------------------------------------------
# Launch helpers
# --------------------------------------------------------------------------


def _settings(mode: int, beta: float, gamma: float, zeta: float) -> dict:
    """Kernel arguments shared by the forward and the backward."""
    inverse_temperature = 1.0 if mode == DETERMINISTIC.value else 1.0 / beta
    return dict(inverse_temperature=inverse_temperature, gamma=gamma, stretch=zeta - gamma, MODE=mode,
                DEFAULT_TEMPERATURE=inverse_temperature == DEFAULT_INVERSE_TEMPERATURE)


def merge(theta_pre: torch.Tensor, delta: torch.Tensor, log_alpha: torch.Tensor, alpha: torch.Tensor, mode: int,
          seed: int, offset: int, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """Launch :func:`merge_forward_kernel`: [B, N] in θ's dtype."""
    batch, num_experts = alpha.shape
    n = theta_pre.shape[0]
    out = torch.empty(batch, n, dtype=theta_pre.dtype, device=theta_pre.device)
    if n == 0:
        return out

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK"]),)

    merge_forward_kernel[grid](out, theta_pre, delta, log_alpha, alpha, batch, n, seed, offset,
                               NUM_EXPERTS=num_experts, TASKS=next_power_of_2(batch),
                               **_settings(mode, beta, gamma, zeta))
    return out


def merge_backward(grad: torch.Tensor, theta_pre: torch.Tensor, delta: torch.Tensor, log_alpha: torch.Tensor,
                   alpha: torch.Tensor, mode: int, seed: int, offset: int, beta: float, gamma: float, zeta: float,
                   needs: tuple[bool, bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
    """Launch :func:`merge_backward_kernel`; gradients to (θ_pre, θ_δ, log_α, α),
    None where ``needs`` is False. ∂α is the sum over programs of the
    per-program partial sums (torch.sum over a [P, B, M] buffer)."""
    batch, num_experts = alpha.shape
    n = theta_pre.shape[0]
    device = theta_pre.device
    grad = grad.to(theta_pre.dtype).contiguous()
    programs = reduction_programs(device, n)
    outputs = (
        torch.empty(n, dtype=theta_pre.dtype, device=device) if needs[0] else None,
        torch.empty(n, dtype=theta_pre.dtype, device=device) if needs[1] else None,
        torch.empty(n, num_experts, dtype=torch.float32, device=device) if needs[2] else None,
    )
    alpha_partials = torch.zeros(programs, batch, num_experts, dtype=torch.float32, device=device)
    # An output that is not needed is never written: any tensor can stand in for its pointer.
    placeholders = [t if t is not None else alpha_partials for t in outputs]
    merge_backward_kernel[(programs,)](
        grad, delta, log_alpha, alpha, *placeholders, alpha_partials, batch, n, seed, offset,
        NUM_EXPERTS=num_experts, TASKS=next_power_of_2(batch), EXPERTS_PADDED=next_power_of_2(num_experts),
        NEED_THETA_PRE=needs[0], NEED_DELTA=needs[1], NEED_LOG_ALPHA=needs[2], NEED_ALPHA=needs[3],
        **_settings(mode, beta, gamma, zeta))
    grad_alpha = alpha_partials.sum(dim=0) if needs[3] else None
    return (*outputs, grad_alpha)


UNIFORMS_BLOCK = 256


def uniforms(seed: int, offset: int, batch: int, n: int, num_experts: int, device: torch.device) -> torch.Tensor:
    """Launch :func:`uniforms_kernel`: fp32 [B, N, M]."""
    groups = triton.cdiv(num_experts, WORDS_PER_PHILOX_CALL.value)
    out = torch.empty(batch, n, num_experts, dtype=torch.float32, device=device)
    total = batch * n * groups
    if total:
        uniforms_kernel[(triton.cdiv(total, UNIFORMS_BLOCK),)](out, seed, offset, total, NUM_EXPERTS=num_experts,
                                                              GROUPS=groups, BLOCK=UNIFORMS_BLOCK)
    return out
