"""pack and packed_merge: the deployment format.

With binary masks (|log_α| ≥ 5, so that the deterministic z is exactly 0 or
1) the packed merge equals the dense deterministic merge bit for bit, on
every backend, and both backends pack identically. M covers the uint8,
int16 and int32 bit words and the table (M ≤ 8) and direct-sum paths.
"""

from __future__ import annotations

import io

import pytest
import torch

import smat_kernels
from smat_kernels import PackedExperts, reference

BACKENDS = ("cpu", "reference")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NUM_EXPERTS = (1, 3, 8, 9, 16, 17, 32)


def binary_log_alpha(n: int, num_experts: int, generator: torch.Generator, density: float = 0.3) -> torch.Tensor:
    """|log_α| in [5, 8]: z = clamp(sigmoid(log_α)·1.2 − 0.1) is exactly 0 or 1."""
    on = torch.rand(n, num_experts, generator=generator) < density
    magnitude = 5 + 3 * torch.rand(n, num_experts, generator=generator)
    return torch.where(on, magnitude, -magnitude)


def make_binary(n, num_experts, batch, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=generator).to(dtype), torch.randn(n, generator=generator).to(dtype),
            binary_log_alpha(n, num_experts, generator), torch.randn(batch, num_experts, generator=generator))


def assert_same_packed(first: PackedExperts, second: PackedExperts) -> None:
    assert (first.n, first.num_experts, first.rounded) == (second.n, second.num_experts, second.rounded)
    for name in ("support_bitmap", "word_offsets", "expert_bits", "delta"):
        a, b = getattr(first, name), getattr(second, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", (1, 4))
@pytest.mark.parametrize("num_experts", NUM_EXPERTS)
@pytest.mark.parametrize("n", (1, 97, 1025))
def test_packed_merge_equals_deterministic_merge(n, num_experts, batch, dtype, backend):
    theta_pre, delta, log_alpha, alpha = make_binary(n, num_experts, batch, dtype, seed=n + num_experts + batch)
    packed = smat_kernels.pack(delta, log_alpha, backend=backend)
    assert packed.rounded == 0
    dense = smat_kernels.merge(theta_pre, delta, log_alpha, alpha, mode="deterministic", backend=backend)
    merged = smat_kernels.packed_merge(theta_pre, packed, alpha, backend=backend)
    assert merged.dtype == dtype and torch.equal(merged, dense)
    # Every backend packs and merges the same bits.
    other = "reference" if backend == "cpu" else "cpu"
    assert_same_packed(packed, smat_kernels.pack(delta, log_alpha, backend=other))
    assert torch.equal(merged, smat_kernels.packed_merge(theta_pre, packed, alpha, backend=other))
    assert torch.equal(dense, smat_kernels.merge(theta_pre, delta, log_alpha, alpha, mode="deterministic",
                                                 backend=other))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_layout(backend):
    """The format of packed.py, built by hand for a known pattern."""
    n, num_experts = 70, 3
    on = torch.zeros(n, num_experts, dtype=torch.bool)
    on[0, 0] = on[5, 1] = on[5, 2] = on[33, 2] = on[69, 0] = on[69, 1] = on[69, 2] = True
    log_alpha = torch.where(on, 6.0, -6.0)
    delta = torch.arange(n, dtype=torch.float32)
    packed = smat_kernels.pack(delta, log_alpha, backend=backend)
    support = [0, 5, 33, 69]
    assert packed.support_bitmap.dtype == torch.int32 and packed.support_bitmap.tolist() == [
        (1 << 0) | (1 << 5), 1 << 1, 1 << 5]
    assert packed.word_offsets.tolist() == [0, 2, 3, 4]
    assert packed.expert_bits.dtype == torch.uint8 and packed.expert_bits.tolist() == [0b001, 0b110, 0b100, 0b111]
    assert packed.delta.tolist() == [float(j) for j in support]
    assert packed.support_size == 4 and packed.rounded == 0
    assert packed.nbytes() == 3 * 4 + 4 * 8 + 4 * 1 + 4 * 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("num_experts", "bits_dtype"), ((8, torch.uint8), (9, torch.int16), (16, torch.int16),
                                                         (17, torch.int32), (32, torch.int32)))
def test_pack_uses_the_top_bit(backend, num_experts, bits_dtype):
    """An element kept by every expert sets the word's sign bit in int16/int32."""
    log_alpha = torch.full((33, num_experts), -6.0)
    log_alpha[32] = 6.0
    packed = smat_kernels.pack(torch.ones(33), log_alpha, backend=backend)
    assert packed.expert_bits.dtype == bits_dtype
    word = int(packed.expert_bits[0]) & ((1 << num_experts) - 1)
    assert word == (1 << num_experts) - 1 and packed.support_bitmap.tolist() == [0, 1]
    alpha = torch.randn(2, num_experts, generator=torch.Generator().manual_seed(num_experts))
    merged = smat_kernels.packed_merge(torch.zeros(33), packed, alpha, backend=backend)
    expected = smat_kernels.merge(torch.zeros(33), torch.ones(33), log_alpha, alpha, mode="deterministic",
                                  backend=backend)
    assert torch.equal(merged, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_counts_rounded_entries(backend):
    generator = torch.Generator().manual_seed(7)
    n, num_experts = 1025, 9
    log_alpha = binary_log_alpha(n, num_experts, generator)
    # Fractional deterministic masks: log_α = 0.5 → z ≈ 0.65 (rounded up), −0.5 → z ≈ 0.35 (rounded down).
    up = [(3, 0), (100, 8), (1024, 4)]
    down = [(3, 1), (512, 2)]
    for row, expert in up:
        log_alpha[row, expert] = 0.5
    for row, expert in down:
        log_alpha[row, expert] = -0.5
    # Saturated ones (z clamped to exactly 0 or 1) are not rounded.
    log_alpha[7, 0], log_alpha[8, 0] = 2.5, -2.5
    theta_pre, delta = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    alpha = torch.randn(4, num_experts, generator=generator)
    packed = smat_kernels.pack(delta, log_alpha, backend=backend)
    assert packed.rounded == len(up) + len(down)
    assert packed.rounded == int(((reference.deterministic_mask(log_alpha) > 0)
                                  & (reference.deterministic_mask(log_alpha) < 1)).sum())
    merged = smat_kernels.packed_merge(theta_pre, packed, alpha, backend=backend)
    dense = smat_kernels.merge(theta_pre, delta, log_alpha, alpha, mode="deterministic", backend=backend)
    rounded_rows = sorted({row for row, _ in up + down})
    differs = (merged != dense).any(dim=0)
    assert differs[rounded_rows].all() and differs.sum() == len(rounded_rows)
    binarised = torch.where(reference.deterministic_mask(log_alpha) >= 0.5, 8.0, -8.0)
    assert torch.equal(merged, smat_kernels.merge(theta_pre, delta, binarised, alpha, mode="deterministic",
                                                  backend=backend))


def test_hard_density_of_binary_masks_matches_the_pack():
    generator = torch.Generator().manual_seed(3)
    log_alpha = binary_log_alpha(4097, 5, generator)
    packed = smat_kernels.pack(torch.ones(4097), log_alpha, backend="cpu")
    bits = packed.expert_bits.to(torch.int64)
    kept = torch.stack([((bits >> m) & 1).sum() for m in range(5)]).float() / 4097
    torch.testing.assert_close(smat_kernels.hard_density(log_alpha, backend="cpu"), kept, rtol=0, atol=1e-7)


def test_state_dict_round_trip():
    theta_pre, delta, log_alpha, alpha = make_binary(1025, 17, 4, torch.bfloat16, seed=1)
    log_alpha[0, 0] = 0.5
    packed = smat_kernels.pack(delta, log_alpha, backend="cpu")
    assert packed.rounded == 1
    state = packed.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = PackedExperts.from_state_dict(torch.load(buffer, weights_only=True))
    assert_same_packed(packed, restored)
    assert restored.device == torch.device("cpu") and restored.nbytes() == packed.nbytes()
    assert torch.equal(smat_kernels.packed_merge(theta_pre, restored, alpha),
                       smat_kernels.packed_merge(theta_pre, packed, alpha))
    assert_same_packed(packed, packed.to("cpu"))


def test_packed_merge_refuses_to_drop_a_gradient():
    """packed_merge has no backward: an alpha that requires grad is an error, not a result without one
    (issue 22, item 10); under no_grad, or detached, it merges."""
    delta, log_alpha = torch.randn(40), torch.randn(40, 3)
    packed = smat_kernels.pack(delta, log_alpha)
    alpha = torch.softmax(torch.randn(2, 3), 1).requires_grad_()
    with pytest.raises(ValueError, match="not differentiable.*alpha.detach"):
        smat_kernels.packed_merge(torch.zeros(40), packed, alpha)
    with torch.no_grad():
        merged = smat_kernels.packed_merge(torch.zeros(40), packed, alpha)
    assert torch.equal(merged, smat_kernels.packed_merge(torch.zeros(40), packed, alpha.detach()))
