"""The mask noise: Philox4x32-10 with Triton's constants and conversion.

* The reference's generator against golden vectors taken from Triton's own
  ``tl.randint4x``/``tl.rand4x``/``tl.rand`` (checked in; regenerate with
  make_philox_golden.py): exact uint32 words and exact float32 uniforms, for
  seeds above 2^32 and 64-bit counters that cross 2^32.
* The counter map (task, element, expert) → (counter, word) of the reference.
* The C++ kernels draw the same uniforms: seen through the op, with settings
  that make the merged value a near-identity function of u.
"""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

import smat_kernels
from smat_kernels import reference

GOLDEN = json.loads((pathlib.Path(__file__).parent / "data" / "philox_golden.json").read_text())
CASES = GOLDEN["cases"]


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"seed={case['seed']}")
def test_reference_philox_matches_triton_words(case):
    counters = torch.tensor(case["counters"], dtype=torch.int64)
    words = torch.stack(reference.philox4x32(counters, case["seed"]), dim=1)
    assert torch.equal(words, torch.tensor(case["words"], dtype=torch.int64))


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"seed={case['seed']}")
def test_reference_uniforms_match_triton_rand(case):
    uniforms = reference.uint32_to_uniform(torch.tensor(case["words"], dtype=torch.int64))
    assert uniforms.dtype == torch.float32
    bits = uniforms.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(bits, torch.tensor(case["uniform_bits"], dtype=torch.int64))


def test_golden_vectors_cover_the_64_bit_splits():
    seeds = [case["seed"] for case in CASES]
    counters = CASES[0]["counters"]
    assert any(seed > 2**32 for seed in seeds) and any(0 < seed < 2**32 for seed in seeds)
    assert any(c < 2**32 for c in counters) and any(c >= 2**32 for c in counters) and max(counters) == 2**63 - 1


def test_uniform_conversion_edges():
    words = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    uniforms = reference.uint32_to_uniform(words)
    # Negative int32 words fold by bitwise not: 2^31 ↦ 2^31 − 1, 2^32 − 1 ↦ 0.
    assert uniforms[0] == 0 and uniforms[4] == 0 and uniforms[2] == uniforms[3]
    assert 0 < uniforms[1] < 1e-9
    assert uniforms[2] < 1, "u must stay below 1 so that log(1 − u) is finite"


def test_reference_counter_map():
    """uniforms[b, j, m] is word m % 4 of counter offset + (b·N + j)·ceil(M/4) + m // 4."""
    seed, offset, batch, n, num_experts = 2**33 + 5, 2**32 - 7, 3, 11, 6
    uniforms = reference.uniforms(seed, offset, batch, n, num_experts)
    groups = math.ceil(num_experts / 4)
    for task, element, expert in ((0, 0, 0), (0, 0, 5), (1, 3, 2), (2, 10, 4), (2, 10, 5)):
        counter = offset + (task * n + element) * groups + expert // 4
        word = reference.philox4x32(torch.tensor([counter]), seed)[expert % 4]
        assert uniforms[task, element, expert] == reference.uint32_to_uniform(word)[0]
    assert reference.counters_per_call(batch, n, num_experts) == batch * n * groups
    assert smat_kernels.counters_per_call is reference.counters_per_call


# --------------------------------------------------------------------------
# The C++ kernels draw the reference's uniforms
# --------------------------------------------------------------------------

# β = 1 and log_α = 0 make s = 1/(1 + (1 − u)/u) = u, and a stretch interval
# of width 1 + 2^-19 keeps the clamp off except within 2^-20 of u = 0: the
# merged value is z = u·(ζ − γ) + γ up to a few float32 ulps.
IDENTITY = {"beta": 1.0, "gamma": -(2.0**-20), "zeta": 1.0 + 2.0**-20}
SEED = 2**45 + 99
OFFSET = 2**32 - 5000


def uniforms_through_merge(batch: int, n: int, num_experts: int, expert: int, seed: int, offset: int,
                           backend: str) -> torch.Tensor:
    """[B, N]: the mask of expert `expert`, which with IDENTITY is its uniform."""
    alpha = torch.zeros(batch, num_experts)
    alpha[:, expert] = 1.0
    return smat_kernels.merge(torch.zeros(n), torch.ones(n), torch.zeros(n, num_experts), alpha, mode="sample",
                              seed=seed, offset=offset, backend=backend, **IDENTITY)


def assert_same_uniforms(merged: torch.Tensor, u: torch.Tensor) -> None:
    """merged (the op's output) is z(u) within 16·2^-24 relative (measured: below 8), plus 2^-40."""
    gamma, zeta = IDENTITY["gamma"], IDENTITY["zeta"]
    expected = (u.double() * (zeta - gamma) + gamma).clamp(0, 1)
    difference = (merged.double() - expected).abs()
    bound = 16 * 2.0**-24 * expected + 2.0**-40
    assert (difference <= bound).all(), f"max difference {difference.max():.3g} ({(difference / bound).max():.3g}×)"


@pytest.mark.parametrize("num_experts", (1, 3, 4, 5, 8, 32))
def test_cpu_draws_the_reference_uniforms(num_experts):
    batch, n = 3, 4099  # counters cross 2^32 within the call
    assert reference.counters_per_call(batch, n, num_experts) > 2**32 - OFFSET
    expected_all = reference.uniforms(SEED, OFFSET, batch, n, num_experts)
    for expert in sorted({0, num_experts // 2, num_experts - 1}):
        cpu = uniforms_through_merge(batch, n, num_experts, expert, SEED, OFFSET, "cpu")
        assert_same_uniforms(cpu, expected_all[:, :, expert])
        # The same settings through the reference op: the identity holds there too.
        assert_same_uniforms(uniforms_through_merge(batch, n, num_experts, expert, SEED, OFFSET, "reference"),
                             expected_all[:, :, expert])


def test_identity_check_tells_uniforms_apart():
    """The comparison above fails for the uniforms of any other key, task,
    element or expert: it would catch a counter-map or word-order mistake."""
    batch, n, num_experts = 2, 4099, 8
    cpu = uniforms_through_merge(batch, n, num_experts, 5, SEED, OFFSET, "cpu")
    wrong_keys = {
        "seed low word": reference.uniforms(SEED ^ 1, OFFSET, batch, n, num_experts)[:, :, 5],
        "seed high word": reference.uniforms(SEED ^ 2**40, OFFSET, batch, n, num_experts)[:, :, 5],
        "offset": reference.uniforms(SEED, OFFSET + 1, batch, n, num_experts)[:, :, 5],
        "offset high word": reference.uniforms(SEED, OFFSET + 2**32, batch, n, num_experts)[:, :, 5],
        "expert (word)": reference.uniforms(SEED, OFFSET, batch, n, num_experts)[:, :, 4],
        "expert (group)": reference.uniforms(SEED, OFFSET, batch, n, num_experts)[:, :, 1],
        "task": reference.uniforms(SEED, OFFSET, batch, n, num_experts)[:, :, 5].flip(0),
        "element": reference.uniforms(SEED, OFFSET, batch, n, num_experts)[:, :, 5].roll(1, dims=1),
    }
    for name, wrong in wrong_keys.items():
        far = (cpu - wrong).abs() > 1e-2
        assert far.float().mean() > 0.9, f"the uniforms of a wrong {name} are not told apart"


def test_cpu_default_temperature_draws_the_same_masks():
    """At the default β = 2/3 the kernels take the x·sqrt(x) path: the masks
    still agree with the reference entry by entry, clamps included."""
    batch, n, num_experts = 4, 8191, 5
    generator = torch.Generator().manual_seed(0)
    log_alpha = torch.randn(n, num_experts, generator=generator)
    masks = reference.masks(log_alpha, batch, "sample", SEED, OFFSET)
    for expert in range(num_experts):
        alpha = torch.zeros(batch, num_experts)
        alpha[:, expert] = 1.0
        cpu = smat_kernels.merge(torch.zeros(n), torch.ones(n), log_alpha, alpha, seed=SEED, offset=OFFSET,
                                 backend="cpu")
        expected = masks[:, :, expert]
        assert ((cpu - expected).abs() <= 1e-6).all()
        assert torch.equal(cpu == 0, expected == 0) and torch.equal(cpu == 1, expected == 1)


def test_tasks_are_consecutive_counter_ranges():
    """Task b of one call draws what a one-task call at offset + b·counters_per_call(1, N, M) draws."""
    n, num_experts = 1025, 6
    generator = torch.Generator().manual_seed(1)
    theta_pre, delta = torch.randn(n, generator=generator), torch.randn(n, generator=generator)
    log_alpha = torch.randn(n, num_experts, generator=generator)
    alpha = torch.randn(3, num_experts, generator=generator)
    together = smat_kernels.merge(theta_pre, delta, log_alpha, alpha, seed=SEED, offset=OFFSET, backend="cpu")
    step = smat_kernels.counters_per_call(1, n, num_experts)
    for task in range(3):
        alone = smat_kernels.merge(theta_pre, delta, log_alpha, alpha[task:task + 1], seed=SEED,
                                   offset=OFFSET + task * step, backend="cpu")
        assert torch.equal(alone[0], together[task])
