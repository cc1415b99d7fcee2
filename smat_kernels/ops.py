"""The public ops of smat_kernels.

Each op is a ``torch.library`` custom op (so ``torch.compile`` sees one opaque
node, with a fake kernel for tracing) whose autograd is a
``torch.autograd.Function``'s ``setup_context``/``backward`` pair, registered
with ``register_autograd``. The backend is resolved in eager Python before the
op is called (``smat_kernels.dispatch``) and travels as a string argument.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as check
from . import dispatch, reference
from .packed import PackedExperts, bitmap_words, check_packed_contents, check_packed_structure, expert_bits_dtype

# --------------------------------------------------------------------------
# merge
# --------------------------------------------------------------------------


@torch.library.custom_op("smat::merge", mutates_args=())
def _merge(theta_pre: Tensor, delta: Tensor, log_alpha: Tensor, alpha: Tensor, mode: int, seed: int, offset: int,
           beta: float, gamma: float, zeta: float, backend: str) -> Tensor:
    return dispatch.get_backend(backend).merge(theta_pre, delta, log_alpha, alpha, mode, seed, offset,
                                               beta, gamma, zeta)


@_merge.register_fake
def _merge_fake(theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, backend):
    return theta_pre.new_empty(alpha.shape[0], theta_pre.shape[0])


@torch.library.custom_op("smat::merge_backward", mutates_args=())
def _merge_backward(grad: Tensor, theta_pre: Tensor, delta: Tensor, log_alpha: Tensor, alpha: Tensor, mode: int,
                    seed: int, offset: int, beta: float, gamma: float, zeta: float, backend: str,
                    needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.get_backend(backend).merge_backward(grad.contiguous(), theta_pre, delta, log_alpha, alpha, mode,
                                                         seed, offset, beta, gamma, zeta, tuple(needs))
    # A custom op returns tensors only: an unneeded gradient is an empty one.
    return tuple(g if g is not None else like.new_empty(0)
                 for g, like in zip(grads, (theta_pre, delta, log_alpha, alpha)))


@_merge_backward.register_fake
def _merge_backward_fake(grad, theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, backend,
                         needs):
    likes = (theta_pre, delta, log_alpha, alpha)
    return tuple(torch.empty_like(like) if need else like.new_empty(0) for like, need in zip(likes, needs))


class MergeFunction(torch.autograd.Function):
    """Autograd of merge. Saves only the inputs; the masks are recomputed
    from their Philox key (seed, offset) in the backward instead of being
    stored, which saves a [B, N, M] buffer."""

    @staticmethod
    def forward(theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, backend):
        return _merge(theta_pre, delta, log_alpha, alpha, mode, seed, offset, beta, gamma, zeta, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta_pre, delta, log_alpha, alpha, *settings = inputs
        ctx.save_for_backward(theta_pre, delta, log_alpha, alpha)
        ctx.settings = settings

    @staticmethod
    def backward(ctx, grad):
        needs = list(ctx.needs_input_grad[:4])
        grads = _merge_backward(grad, *ctx.saved_tensors, *ctx.settings, needs)
        return (*(g if need else None for g, need in zip(grads, needs)), *([None] * len(ctx.settings)))


_merge.register_autograd(MergeFunction.backward, setup_context=MergeFunction.setup_context)


def merge(theta_pre: Tensor, delta: Tensor, log_alpha: Tensor, alpha: Tensor, *, mode: str = "sample",
          seed: int = 0, offset: int = 0, beta: float = reference.BETA, gamma: float = reference.GAMMA,
          zeta: float = reference.ZETA, backend: str | None = None) -> Tensor:
    """Merge the experts for B tasks: θ[b] = θ_pre + θ_δ ⊙ Σ_m α[b, m] z[b, :, m].

    Args:
        theta_pre: [N] frozen pre-trained parameters (fp32, bf16 or fp16).
        delta: [N] the shared dense delta θ_δ, same dtype as ``theta_pre``.
        log_alpha: fp32 [N, M] mask logits, expert-minor; 1 ≤ M ≤ 32.
        alpha: fp32 [B, M] merging weights of the B tasks.
        mode: ``"sample"`` (hard-concrete samples, training), ``"deterministic"``
            (evaluation masks) or ``"near_noiseless"`` (the reference code's
            u ~ U(0.5 ± 1e-6) training noise).
        seed, offset: the Philox key of the noise, ints in [0, 2^63). One call
            uses ``counters_per_call(B, N, M)`` counters from ``offset``.
        beta, gamma, zeta: hard-concrete temperature and stretch interval.
        backend: force ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"``.

    Returns:
        [B, N] merged parameters in θ's dtype (fp32 accumulation).
        Differentiable with respect to theta_pre, delta, log_alpha and alpha.
    """
    n = check.check_theta_pair(theta_pre, delta)
    _, num_experts = check.check_log_alpha(log_alpha, n)
    check.check_alpha(alpha, num_experts)
    device = check.check_same_device(theta_pre=theta_pre, delta=delta, log_alpha=log_alpha, alpha=alpha)
    if mode not in reference.MODES:
        raise ValueError(f"mode must be one of {', '.join(reference.MODES)}; got {mode!r}")
    check.check_key(seed, offset)
    check.check_hard_concrete(beta, gamma, zeta)
    chosen = dispatch.resolve(device, backend).name
    return _merge(theta_pre, delta, log_alpha, alpha, reference.MODES.index(mode), seed, offset,
                  float(beta), float(gamma), float(zeta), chosen)


# --------------------------------------------------------------------------
# expected density (the L0 term) and hard density
# --------------------------------------------------------------------------


@torch.library.custom_op("smat::expected_density", mutates_args=())
def _expected_density(log_alpha: Tensor, beta: float, gamma: float, zeta: float, backend: str) -> Tensor:
    return dispatch.get_backend(backend).expected_density(log_alpha, beta, gamma, zeta)


@_expected_density.register_fake
def _expected_density_fake(log_alpha, beta, gamma, zeta, backend):
    return log_alpha.new_empty(log_alpha.shape[1])


@torch.library.custom_op("smat::expected_density_backward", mutates_args=())
def _expected_density_backward(grad: Tensor, log_alpha: Tensor, beta: float, gamma: float, zeta: float,
                               backend: str) -> Tensor:
    return dispatch.get_backend(backend).expected_density_backward(grad.contiguous(), log_alpha, beta, gamma, zeta)


@_expected_density_backward.register_fake
def _expected_density_backward_fake(grad, log_alpha, beta, gamma, zeta, backend):
    return torch.empty_like(log_alpha)


class ExpectedDensityFunction(torch.autograd.Function):
    """Autograd of the expected density: d/dlog_α = grad[m]/N · p(1 − p)."""

    @staticmethod
    def forward(log_alpha, beta, gamma, zeta, backend):
        return _expected_density(log_alpha, beta, gamma, zeta, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        log_alpha, *settings = inputs
        ctx.save_for_backward(log_alpha)
        ctx.settings = settings

    @staticmethod
    def backward(ctx, grad):
        (log_alpha,) = ctx.saved_tensors
        return _expected_density_backward(grad, log_alpha, *ctx.settings), None, None, None, None


_expected_density.register_autograd(ExpectedDensityFunction.backward,
                                    setup_context=ExpectedDensityFunction.setup_context)


def expected_density(log_alpha: Tensor, *, beta: float = reference.BETA, gamma: float = reference.GAMMA,
                     zeta: float = reference.ZETA, backend: str | None = None) -> Tensor:
    """Expected fraction of non-zero mask entries of each expert,
    mean_j P(z[j, m] ≠ 0) = mean_j sigmoid(log_α[j, m] − β·log(−γ/ζ)).

    Args:
        log_alpha: fp32 [N, M] mask logits.
    Returns:
        fp32 [M], differentiable with respect to log_alpha. One minus it is
        the expected sparsity that SMAT's Lagrangian constrains to ≥ τ.
    Raises:
        ValueError for N = 0: a mean over no elements is undefined.
    """
    rows, _ = check.check_log_alpha(log_alpha)
    check.check_density_rows(rows)
    check.check_hard_concrete(beta, gamma, zeta)
    chosen = dispatch.resolve(log_alpha.device, backend).name
    return _expected_density(log_alpha, float(beta), float(gamma), float(zeta), chosen)


@torch.library.custom_op("smat::hard_density", mutates_args=())
def _hard_density(log_alpha: Tensor, gamma: float, zeta: float, backend: str) -> Tensor:
    return dispatch.get_backend(backend).hard_density(log_alpha, gamma, zeta)


@_hard_density.register_fake
def _hard_density_fake(log_alpha, gamma, zeta, backend):
    return log_alpha.new_empty(log_alpha.shape[1])


def hard_density(log_alpha: Tensor, *, gamma: float = reference.GAMMA, zeta: float = reference.ZETA,
                 backend: str | None = None) -> Tensor:
    """Fraction of elements whose deterministic mask is > 0, per expert.

    Args:
        log_alpha: fp32 [N, M] mask logits.
    Returns:
        fp32 [M] (not differentiable): the achieved density of each expert.
    Raises:
        ValueError for N = 0: a mean over no elements is undefined.
    """
    rows, _ = check.check_log_alpha(log_alpha)
    check.check_density_rows(rows)
    check.check_hard_concrete(reference.BETA, gamma, zeta)
    chosen = dispatch.resolve(log_alpha.device, backend).name
    return _hard_density(log_alpha.detach(), float(gamma), float(zeta), chosen)


# --------------------------------------------------------------------------
# packed sparse storage
# --------------------------------------------------------------------------


@torch.library.custom_op("smat::pack", mutates_args=())
def _pack(delta: Tensor, log_alpha: Tensor, gamma: float, zeta: float,
          backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    packed = dispatch.get_backend(backend).pack(delta, log_alpha, gamma, zeta)
    rounded = torch.tensor(packed.rounded, dtype=torch.int64, device=delta.device)
    return packed.support_bitmap, packed.word_offsets, packed.expert_bits, packed.delta, rounded


@_pack.register_fake
def _pack_fake(delta, log_alpha, gamma, zeta, backend):
    n, num_experts = log_alpha.shape
    support = torch.library.get_ctx().new_dynamic_size()
    words = bitmap_words(n)
    return (delta.new_empty(words, dtype=torch.int32), delta.new_empty(words + 1, dtype=torch.int64),
            delta.new_empty(support, dtype=expert_bits_dtype(num_experts)), delta.new_empty(support),
            delta.new_empty((), dtype=torch.int64))


def pack(delta: Tensor, log_alpha: Tensor, *, gamma: float = reference.GAMMA, zeta: float = reference.ZETA,
         backend: str | None = None) -> PackedExperts:
    """Pack the experts for deployment: binarise the deterministic masks
    (z ≥ 0.5 → 1) and keep θ_δ on their union support.

    Args:
        delta: [N] θ_δ (fp32, bf16 or fp16).
        log_alpha: fp32 [N, M] mask logits.
    Returns:
        PackedExperts; its ``rounded`` counts mask entries that were neither 0
        nor 1. With ``rounded == 0``, ``packed_merge`` equals the
        deterministic ``merge`` exactly.
    """
    check.check_tensor("delta", delta, dims=1, dtypes=check.THETA_DTYPES)
    n, num_experts = check.check_log_alpha(log_alpha, delta.shape[0])
    check.check_same_device(delta=delta, log_alpha=log_alpha)
    check.check_hard_concrete(reference.BETA, gamma, zeta)
    chosen = dispatch.resolve(delta.device, backend).name
    bitmap, word_offsets, bits, packed_delta, rounded = _pack(delta.detach(), log_alpha.detach(), float(gamma),
                                                              float(zeta), chosen)
    return PackedExperts(n, num_experts, bitmap, word_offsets, bits, packed_delta, int(rounded))


@torch.library.custom_op("smat::packed_merge", mutates_args=())
def _packed_merge(theta_pre: Tensor, support_bitmap: Tensor, word_offsets: Tensor, expert_bits: Tensor,
                  delta: Tensor, alpha: Tensor, backend: str) -> Tensor:
    packed = PackedExperts(theta_pre.shape[0], alpha.shape[1], support_bitmap, word_offsets, expert_bits, delta, 0)
    # The contents are read here, in the op's body, so that the check also runs inside a torch.compile'd
    # graph (the op is opaque to it); the kernels index delta by them.
    check_packed_contents(packed)
    return dispatch.get_backend(backend).packed_merge(theta_pre, packed, alpha)


@_packed_merge.register_fake
def _packed_merge_fake(theta_pre, support_bitmap, word_offsets, expert_bits, delta, alpha, backend):
    return theta_pre.new_empty(alpha.shape[0], theta_pre.shape[0])


def packed_merge(theta_pre: Tensor, packed: PackedExperts, alpha: Tensor, *, backend: str | None = None) -> Tensor:
    """Merge packed experts for B tasks: θ[b] = θ_pre + θ_δ · Σ_m α[b, m]·bit_m
    on the support and θ_pre elsewhere.

    Args:
        theta_pre: [N] in the packed θ_δ's dtype.
        packed: the output of :func:`pack`.
        alpha: fp32 [B, M].
    Returns:
        [B, N] in θ's dtype (not differentiable).

    Raises ValueError where a gradient is asked for (``alpha`` or ``theta_pre`` requires grad while grad
    mode is on): the packed form is for deployment; train with :func:`merge`.
    """
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (alpha, theta_pre)):
        raise ValueError("packed_merge is not differentiable, but alpha or theta_pre requires grad: pass "
                         "alpha.detach() or call it under torch.no_grad() for inference, or use merge() to train")
    if not isinstance(packed, PackedExperts):
        raise TypeError(f"packed must be a PackedExperts from smat_kernels.pack, got {type(packed).__name__}")
    check_packed_structure(packed)  # shapes and dtypes here; the contents in the op (_packed_merge)
    check.check_tensor("theta_pre", theta_pre, dims=1, dtypes=check.THETA_DTYPES)
    if theta_pre.shape[0] != packed.n:
        raise ValueError(f"theta_pre has N = {theta_pre.shape[0]} elements but the packed experts were made "
                         f"for N = {packed.n}")
    if packed.delta.dtype != theta_pre.dtype:
        raise TypeError(f"theta_pre has dtype {theta_pre.dtype} but the packed delta has {packed.delta.dtype}")
    check.check_alpha(alpha, packed.num_experts)
    device = check.check_same_device(theta_pre=theta_pre, alpha=alpha, packed=packed.delta)
    chosen = dispatch.resolve(device, backend).name
    return _packed_merge(theta_pre.detach(), packed.support_bitmap, packed.word_offsets, packed.expert_bits,
                         packed.delta, alpha.detach(), chosen)
