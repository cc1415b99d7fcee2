"""Plain-PyTorch reference of every smat op: the oracle of the tests and the
fallback where no compiled backend is available.

Everything here is written for clarity, not speed. The compiled backends
(``csrc/cpu``, ``csrc/cuda``, ``smat_kernels/triton``) implement the same
math; ``csrc/include/smat/elementwise.h`` mirrors the per-element functions
below one for one.

Randomness
----------
Mask noise is Philox4x32-10 with the constants and the uint32 → float
conversion of Triton's ``tl.rand``/``tl.randint4x``. One Philox call yields
four uint32 words, so expert m of element j in task b uses

    counter = offset + (b · N + j) · G + m // 4,   G = ceil(M / 4)
    word    = m % 4

with the 64-bit counter split into (c0, c1) = (low, high 32 bits), c2 = c3 = 0,
and the 64-bit seed split into the key (k0, k1) = (low, high 32 bits); this is
exactly ``tl.randint4x(seed, counter)``. :func:`philox_counter` is the single
definition of this map; every backend follows it. One merge consumes
``B · N · G`` counters (:func:`counters_per_call`): advance ``offset`` by that
much between calls for fresh noise.
"""

from __future__ import annotations

import math

import torch

from .packed import (
    BITMAP_WORD_BITS,
    PackedExperts,
    bitmap_words,
    expert_bits_dtype,
)

# Hard-concrete constants of Louizos et al. (2018), as used by SMAT.
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1

# Mask modes. ``near_noiseless`` is the reference code's training noise
# u ~ U(0.5 − 1e-6, 0.5 + 1e-6): masks are the deterministic ones sharpened by
# the temperature β.
MODES = ("deterministic", "sample", "near_noiseless")
NEAR_NOISELESS_LOW = 0.5 - 1e-6
NEAR_NOISELESS_WIDTH = 2e-6

PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_ROUNDS = 10
UINT32_TO_UNIFORM_SCALE = 4.6566127342e-10  # tl.rand: largest s with (2^31 − 1)·s < 1
MASK32 = 0xFFFFFFFF
WORDS_PER_PHILOX_CALL = 4


# --------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors holding uint32 values
# --------------------------------------------------------------------------


def _mul_hi_lo(a: torch.Tensor, constant: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product a · constant (both uint32).

    The product can exceed the int64 range; torch's int64 multiply wraps
    modulo 2^64 (two's complement, on CPU and CUDA), which keeps all 64 bits
    of the unsigned product, and the shift and mask read them back. One
    product per call, not a split into 16-bit halves: each round then uses
    its inputs once or twice, which keeps torch.compile's lowering of the ten
    unrolled rounds small (a split made it grow about 400-fold and take more
    than 20 minutes). The golden vectors of tl.rand in the tests check the
    result bit for bit."""
    product = a * constant
    return (product >> 32) & MASK32, product & MASK32


def philox4x32(counter: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of the 64-bit ``counter`` (int64 tensor) under ``seed``.

    Returns the four output words as int64 tensors with values in [0, 2^32),
    identical to ``tl.randint4x(seed, counter)``."""
    counter = counter.to(torch.int64)
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = seed & MASK32
    k1 = (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mul_hi_lo(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(word: torch.Tensor) -> torch.Tensor:
    """``tl.rand``'s conversion: read the word as int32, fold negatives with
    bitwise not, scale in float32. Result in [0, 1)."""
    folded = torch.where(word >= 2**31, MASK32 - word, word)
    return folded.to(torch.float32) * torch.tensor(UINT32_TO_UNIFORM_SCALE, dtype=torch.float32)


def counters_per_call(batch: int, n: int, num_experts: int) -> int:
    """Philox counters consumed by one sampled merge of B tasks."""
    return batch * n * math.ceil(num_experts / WORDS_PER_PHILOX_CALL)


def philox_counter(offset: int, task: torch.Tensor, element: torch.Tensor, group: int,
                   n: int, num_experts: int) -> torch.Tensor:
    """The counter of (task, element, expert group): the one map of the docs."""
    groups = math.ceil(num_experts / WORDS_PER_PHILOX_CALL)
    return offset + (task * n + element) * groups + group


def uniforms(seed: int, offset: int, batch: int, n: int, num_experts: int,
             device: torch.device | str = "cpu") -> torch.Tensor:
    """All mask uniforms of one merge: float32 [B, N, M]."""
    task = torch.arange(batch, dtype=torch.int64, device=device)[:, None]
    element = torch.arange(n, dtype=torch.int64, device=device)[None, :]
    out = torch.empty(batch, n, num_experts, dtype=torch.float32, device=device)
    for group in range(math.ceil(num_experts / WORDS_PER_PHILOX_CALL)):
        words = philox4x32(philox_counter(offset, task, element, group, n, num_experts), seed)
        for word_index, word in enumerate(words):
            expert = group * WORDS_PER_PHILOX_CALL + word_index
            if expert < num_experts:
                out[:, :, expert] = uint32_to_uniform(word)
    return out


# --------------------------------------------------------------------------
# Hard-concrete masks
# --------------------------------------------------------------------------


def stretch_and_clamp(s: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """z = min(1, max(0, s·(ζ − γ) + γ))."""
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def deterministic_mask(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Evaluation mask z = clamp(sigmoid(log_α)(ζ − γ) + γ, 0, 1): [N, M]."""
    return stretch_and_clamp(torch.sigmoid(log_alpha), gamma, zeta)


def sampled_mask(log_alpha: torch.Tensor, u: torch.Tensor, beta: float = BETA,
                 gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Hard-concrete sample s = sigmoid((log u − log(1 − u) + log_α)/β),
    stretched and clamped; ``u`` broadcasts against ``log_alpha``."""
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return stretch_and_clamp(s, gamma, zeta)


def _noise_and_temperature(log_alpha: torch.Tensor, batch: int, mode: str, seed: int, offset: int,
                           beta: float) -> tuple[torch.Tensor | None, float]:
    """The logistic noise log u − log(1 − u) [B, N, M] of a mode (None in
    deterministic mode) and the mode's temperature."""
    if mode == "deterministic":
        return None, 1.0
    n, num_experts = log_alpha.shape
    with torch.no_grad():
        u = uniforms(seed, offset, batch, n, num_experts, log_alpha.device)
        if mode == "near_noiseless":
            u = NEAR_NOISELESS_LOW + u * NEAR_NOISELESS_WIDTH
        return torch.log(u) - torch.log1p(-u), beta


def masks(log_alpha: torch.Tensor, batch: int, mode: str, seed: int, offset: int,
          beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """The masks of one merge: [N, M] in deterministic mode, else [B, N, M]."""
    noise, temperature = _noise_and_temperature(log_alpha, batch, mode, seed, offset, beta)
    if noise is None:
        return deterministic_mask(log_alpha, gamma, zeta)
    return stretch_and_clamp(torch.sigmoid((noise + log_alpha) / temperature), gamma, zeta)


def masks_and_derivatives(log_alpha: torch.Tensor, batch: int, mode: str, seed: int, offset: int,
                          beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of :func:`masks` and dz/dlog_α = (ζ − γ)·s(1 − s)/T inside
    the clamp's closed range [0, 1] (as torch.clamp's gradient), else 0."""
    noise, temperature = _noise_and_temperature(log_alpha, batch, mode, seed, offset, beta)
    logits = log_alpha if noise is None else noise + log_alpha
    s = torch.sigmoid(logits / temperature)
    stretched = s * (zeta - gamma) + gamma
    inside = (stretched >= 0) & (stretched <= 1)
    derivative = torch.where(inside, (zeta - gamma) * s * (1 - s) / temperature, torch.zeros_like(s))
    return stretched.clamp(0.0, 1.0), derivative


# --------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------


def merge(theta_pre: torch.Tensor, delta: torch.Tensor, log_alpha: torch.Tensor,
          alpha: torch.Tensor, mode: str = "sample", seed: int = 0, offset: int = 0,
          beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m], computed in float32.

    theta_pre, delta: [N] (fp32/bf16/fp16, same dtype); log_alpha: fp32 [N, M];
    alpha: fp32 [B, M]. Returns [B, N] in θ's dtype. Experts are summed in
    order m = 0 … M−1, as every backend does, so that the packed merge can
    reproduce the deterministic merge bit for bit."""
    batch, num_experts = alpha.shape
    z = masks(log_alpha, batch, mode, seed, offset, beta, gamma, zeta)
    weight = torch.zeros(batch, theta_pre.shape[0], dtype=torch.float32, device=theta_pre.device)
    for m in range(num_experts):
        z_m = z[:, m] if z.dim() == 2 else z[:, :, m]
        weight = weight + alpha[:, m, None] * z_m
    merged = theta_pre.float() + delta.float() * weight
    return merged.to(theta_pre.dtype)


def merge_backward(grad: torch.Tensor, theta_pre: torch.Tensor, delta: torch.Tensor, log_alpha: torch.Tensor,
                   alpha: torch.Tensor, mode: str = "sample", seed: int = 0, offset: int = 0, beta: float = BETA,
                   gamma: float = GAMMA, zeta: float = ZETA) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`merge` to (θ_pre, θ_δ, log_α, α), written out:

        ∂θ_pre = Σ_b g[b]                 ∂θ_δ = Σ_b g[b] ⊙ w[b]
        ∂α[b, m] = Σ_j g[b, j] θ_δ[j] z[b, j, m]
        ∂log_α[j, m] = Σ_b g[b, j] θ_δ[j] α[b, m] ∂z[b, j, m]/∂log_α[j, m]

    with w[b] = Σ_m α[b, m] z[b, :, m]; masks recomputed from their key.
    The tests check it against torch.autograd of :func:`merge`."""
    batch, num_experts = alpha.shape
    z, dz = masks_and_derivatives(log_alpha, batch, mode, seed, offset, beta, gamma, zeta)
    g = grad.float()
    g_delta = g * delta.float()
    weight = torch.zeros_like(g)
    grad_log_alpha = torch.empty_like(log_alpha)
    grad_alpha = torch.empty_like(alpha)
    for m in range(num_experts):
        z_m, dz_m = (z[:, m], dz[:, m]) if z.dim() == 2 else (z[:, :, m], dz[:, :, m])
        weight = weight + alpha[:, m, None] * z_m
        grad_alpha[:, m] = (g_delta * z_m).sum(dim=1)
        grad_log_alpha[:, m] = (g_delta * alpha[:, m, None] * dz_m).sum(dim=0)
    grad_delta = (g * weight).sum(dim=0)
    return g.sum(dim=0).to(theta_pre.dtype), grad_delta.to(delta.dtype), grad_log_alpha, grad_alpha


def expected_density(log_alpha: torch.Tensor, beta: float = BETA, gamma: float = GAMMA,
                     zeta: float = ZETA) -> torch.Tensor:
    """Mean over elements of P(z ≠ 0) = sigmoid(log_α − β·log(−γ/ζ)): fp32 [M].
    One minus this is the expected sparsity of each expert (the L0 term)."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta)).mean(dim=0)


def expected_density_backward(grad: torch.Tensor, log_alpha: torch.Tensor, beta: float = BETA,
                              gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """∂/∂log_α[j, m] = grad[m] / N · p(1 − p): fp32 [N, M]."""
    p = torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))
    return grad.float()[None, :] / log_alpha.shape[0] * p * (1 - p)


def hard_density(log_alpha: torch.Tensor, gamma: float = GAMMA, zeta: float = ZETA) -> torch.Tensor:
    """Fraction of elements whose deterministic mask is > 0: fp32 [M]."""
    return (deterministic_mask(log_alpha, gamma, zeta) > 0).to(torch.float32).mean(dim=0)


def pack(delta: torch.Tensor, log_alpha: torch.Tensor, gamma: float = GAMMA,
         zeta: float = ZETA) -> PackedExperts:
    """Binarise the deterministic masks (z ≥ 0.5 → 1) and keep θ_δ on their
    union support. See :mod:`smat_kernels.packed` for the format."""
    n, num_experts = log_alpha.shape
    z = deterministic_mask(log_alpha, gamma, zeta)
    rounded = int(((z > 0) & (z < 1)).sum())
    bit_values = torch.tensor([1 << m for m in range(num_experts)], dtype=torch.int64, device=z.device)
    words = ((z >= 0.5).to(torch.int64) * bit_values).sum(dim=1)
    support = words != 0

    padded = torch.zeros(bitmap_words(n) * BITMAP_WORD_BITS, dtype=torch.int64, device=z.device)
    padded[:n] = support.to(torch.int64)
    per_word = padded.view(-1, BITMAP_WORD_BITS)
    bit_weights = torch.tensor([1 << i for i in range(BITMAP_WORD_BITS)], dtype=torch.int64, device=z.device)
    bitmap = (per_word * bit_weights).sum(dim=1)
    bitmap = torch.where(bitmap >= 2**31, bitmap - 2**32, bitmap).to(torch.int32)
    word_offsets = torch.zeros(bitmap_words(n) + 1, dtype=torch.int64, device=z.device)
    word_offsets[1:] = per_word.sum(dim=1).cumsum(dim=0)

    bits = words[support]
    bits_dtype = expert_bits_dtype(num_experts)
    if bits_dtype != torch.uint8:
        sign_bit = 1 << (torch.iinfo(bits_dtype).bits - 1)
        bits = torch.where(bits >= sign_bit, bits - 2 * sign_bit, bits)
    return PackedExperts(
        n=n,
        num_experts=num_experts,
        support_bitmap=bitmap,
        word_offsets=word_offsets,
        expert_bits=bits.to(bits_dtype),
        delta=delta[support].clone(),
        rounded=rounded,
    )


def unpack_support(packed: PackedExperts) -> torch.Tensor:
    """Boolean [N]: which elements are in the union support."""
    shifts = torch.arange(BITMAP_WORD_BITS, dtype=torch.int64, device=packed.device)
    bits = (packed.support_bitmap.to(torch.int64)[:, None] >> shifts) & 1
    return bits.flatten()[: packed.n].bool()


def packed_merge(theta_pre: torch.Tensor, packed: PackedExperts, alpha: torch.Tensor) -> torch.Tensor:
    """θ[b] = θ_pre + θ_δ · Σ_m α[b, m]·bit_m on the support, θ_pre elsewhere:
    [B, N] in θ's dtype; alpha fp32 [B, M]."""
    batch, num_experts = alpha.shape
    support = unpack_support(packed)
    bits = packed.expert_bits.to(torch.int64)
    weight = torch.zeros(batch, bits.shape[0], dtype=torch.float32, device=alpha.device)
    for m in range(num_experts):
        weight = weight + alpha[:, m, None] * ((bits >> m) & 1).to(torch.float32)
    merged = theta_pre.float().expand(batch, -1).clone()
    merged[:, support] = theta_pre[support].float() + packed.delta.float() * weight
    return merged.to(theta_pre.dtype)
