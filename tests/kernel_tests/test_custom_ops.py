"""The torch.library custom ops: torch.library.opcheck on every op and
backend (schema, fake kernels, autograd registration, AOT dispatch), and
torch.compile(fullgraph=True) through the public ops."""

from __future__ import annotations

import pytest
import torch

import smat_kernels
from smat_kernels import ops, reference

BACKENDS = ("cpu", "reference")
HARD_CONCRETE = (reference.BETA, reference.GAMMA, reference.ZETA)
SEED, OFFSET = 2**35 + 1, 2**32 - 10


def merge_inputs(dtype=torch.float32, n=37, num_experts=5, batch=3, requires_grad=False):
    generator = torch.Generator().manual_seed(0)
    theta_pre, delta = torch.randn(n, generator=generator).to(dtype), torch.randn(n, generator=generator).to(dtype)
    log_alpha = 2 * torch.randn(n, num_experts, generator=generator)
    tensors = (theta_pre, delta, log_alpha, torch.randn(batch, num_experts, generator=generator))
    return tuple(t.requires_grad_(requires_grad) for t in tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("mode", range(len(reference.MODES)), ids=reference.MODES)
def test_opcheck_merge(backend, dtype, mode):
    inputs = merge_inputs(dtype, requires_grad=True)
    torch.library.opcheck(ops._merge, (*inputs, mode, SEED, OFFSET, *HARD_CONCRETE, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("needs", ([True, True, True, True], [False, True, False, True]))
def test_opcheck_merge_backward(backend, needs):
    inputs = merge_inputs()
    grad = torch.randn(3, 37, generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(ops._merge_backward, (grad, *inputs, 1, SEED, OFFSET, *HARD_CONCRETE, backend, needs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_densities(backend):
    log_alpha = torch.randn(37, 5, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(ops._expected_density, (log_alpha.clone().requires_grad_(), *HARD_CONCRETE, backend))
    torch.library.opcheck(ops._expected_density_backward, (torch.randn(5), log_alpha, *HARD_CONCRETE, backend))
    torch.library.opcheck(ops._hard_density, (log_alpha, reference.GAMMA, reference.ZETA, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_experts", (3, 12, 20))
def test_opcheck_pack_and_packed_merge(backend, num_experts):
    generator = torch.Generator().manual_seed(num_experts)
    n = 77
    delta = torch.randn(n, generator=generator)
    log_alpha = torch.where(torch.rand(n, num_experts, generator=generator) < 0.3, 6.0, -6.0)
    torch.library.opcheck(ops._pack, (delta, log_alpha, reference.GAMMA, reference.ZETA, backend))
    packed = smat_kernels.pack(delta, log_alpha, backend=backend)
    tensors = (packed.support_bitmap, packed.word_offsets, packed.expert_bits, packed.delta)
    alpha = torch.randn(2, num_experts, generator=generator)
    torch.library.opcheck(ops._packed_merge, (torch.randn(n, generator=generator), *tensors, alpha, backend))


@pytest.mark.parametrize(("backend", "mode", "compiler"), [
    *((backend, mode, "aot_eager") for backend in BACKENDS for mode in reference.MODES),
    ("cpu", "sample", "inductor"),
])
def test_compiled_merge_matches_eager(backend, mode, compiler):
    """fullgraph=True: the ops must compile without a graph break, and give
    the eager values and gradients."""
    torch._dynamo.reset()

    def step(theta_pre, delta, log_alpha, alpha):
        merged = smat_kernels.merge(theta_pre, delta, log_alpha, alpha, mode=mode, seed=SEED, offset=OFFSET,
                                    backend=backend)
        density = smat_kernels.expected_density(log_alpha, backend=backend)
        return (merged * merged).sum() + density.sum()

    eager_inputs = merge_inputs(requires_grad=True)
    compiled_inputs = tuple(t.detach().clone().requires_grad_() for t in eager_inputs)
    eager = step(*eager_inputs)
    eager.backward()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)(*compiled_inputs)
    compiled.backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for eager_input, compiled_input in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(compiled_input.grad, eager_input.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_packed_merge_matches_eager_and_checks_the_contents(backend):
    """packed_merge compiles with fullgraph=True (issue 22, item 10: the contents check read the tensors
    while tracing); the check runs in the op's body, so a PackedExperts changed in place after compiling
    is still refused. pack's output size depends on the data: it is called before, not traced."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(3)
    theta_pre = torch.randn(70, generator=generator)
    packed = smat_kernels.pack(torch.randn(70, generator=generator), torch.randn(70, 4, generator=generator),
                               backend=backend)
    alpha = torch.softmax(torch.randn(3, 4, generator=generator), 1)
    compiled = torch.compile(lambda t, a: smat_kernels.packed_merge(t, packed, a, backend=backend),
                             fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(theta_pre, alpha), smat_kernels.packed_merge(theta_pre, packed, alpha,
                                                                             backend=backend))
    packed.word_offsets[1] += 1
    with pytest.raises(ValueError, match="word_offsets do not match the bitmap"):
        compiled(theta_pre, alpha)
