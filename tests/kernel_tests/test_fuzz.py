"""Fuzzing: no input of any public op crashes the process.

Each case mutates one argument of a valid call (or one field of a valid
``PackedExperts``: its shape entries, dtypes, lengths, offsets, values,
strides, device) and requires either a ``TypeError``/``ValueError`` or a result
equal to the reference on the same inputs. The cases run in a subprocess
(this file run as a script), which prints each case's name before running it:
a segfault or an abort fails the test with the case that caused it, instead
of killing pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from functools import partial

import pytest
import torch

import smat_kernels
from smat_kernels import PackedExperts, reference

ACCEPTED_ERRORS = (TypeError, ValueError)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int16,
          torch.uint8, torch.bool)
RANDOM_CASES = 300


class CaseFailure(Exception):
    """A case that neither raised a clear error nor matched the reference."""


# --------------------------------------------------------------------------
# Mutations of one tensor
# --------------------------------------------------------------------------


def tensor_mutations(tensor: torch.Tensor) -> dict[str, object]:
    """Wrong dtypes, lengths, dimensions, strides, devices, layouts and types."""
    mutations: dict[str, object] = {f"dtype {str(d)[6:]}": tensor.to(d) for d in DTYPES if d != tensor.dtype}
    first = tensor.shape[0]
    for length in sorted({0, max(first - 1, 0), first + 1, 2 * first + 5} - {first}):
        mutations[f"length {length}"] = torch.zeros(length, *tensor.shape[1:], dtype=tensor.dtype)
    mutations["extra dimension"] = tensor.unsqueeze(-1)
    mutations["one dimension less"] = tensor.flatten()[:1].squeeze(0) if tensor.dim() == 1 else tensor.flatten()
    mutations["strided"] = torch.stack([tensor, tensor], dim=-1).select(-1, 0)
    if tensor.dim() == 2:
        mutations["transposed"] = tensor.t().contiguous().t()
    if tensor.numel():
        mutations["expanded"] = tensor.flatten()[:1].reshape((1,) * tensor.dim()).expand(tensor.shape)
    mutations["meta device"] = tensor.to("meta")
    mutations["sparse"] = tensor.to_sparse()
    mutations["list"] = tensor.tolist()
    mutations["None"] = None
    mutations["scalar"] = 3
    return mutations


def random_tensor(generator: torch.Generator, length: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return (torch.randn(length, generator=generator) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.rand(length, generator=generator) < 0.5
    info = torch.iinfo(dtype)
    low, high = max(info.min, -2**40), min(info.max, 2**40)
    return torch.randint(low, high, (length,), generator=generator, dtype=torch.int64).to(dtype)


# --------------------------------------------------------------------------
# Checking one case
# --------------------------------------------------------------------------


def same(kernel: torch.Tensor, oracle: torch.Tensor) -> None:
    if kernel.shape != oracle.shape or kernel.dtype != oracle.dtype:
        raise CaseFailure(f"{kernel.dtype} {tuple(kernel.shape)} but the reference gives "
                          f"{oracle.dtype} {tuple(oracle.shape)}")
    if kernel.device.type == "meta":
        return
    tolerance = 1e-5 if kernel.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(kernel.float().cpu(), oracle.float().cpu(), rtol=tolerance, atol=tolerance,
                               equal_nan=True)


def accept_any(result) -> None:
    """For calls whose only duty is to raise a clear error or succeed."""


def run_case(name: str, call, oracle) -> str:
    """'error' or 'ok'; raises CaseFailure for anything else."""
    print(f"case {name}", flush=True)
    try:
        result = call()
    except ACCEPTED_ERRORS as error:
        if not str(error):
            raise CaseFailure(f"{name}: {type(error).__name__} without a message") from None
        return "error"
    except Exception as error:  # noqa: BLE001 - any other exception is the finding
        raise CaseFailure(f"{name}: {type(error).__name__}: {error}") from error
    try:
        oracle(result)
    except (AssertionError, CaseFailure) as error:
        raise CaseFailure(f"{name}: accepted, but differs from the reference: {error}") from None
    return "ok"


# --------------------------------------------------------------------------
# PackedExperts
# --------------------------------------------------------------------------


def valid_packed(n: int, num_experts: int, device: str) -> tuple[PackedExperts, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(n * 40 + num_experts)
    log_alpha = torch.where(torch.rand(n, num_experts, generator=generator) < 0.3, 6.0, -6.0)
    delta = torch.randn(n, generator=generator)
    packed = smat_kernels.pack(delta.to(device), log_alpha.to(device), backend="reference")
    theta_pre = torch.randn(n, generator=generator).to(device)
    alpha = torch.softmax(torch.randn(2, num_experts, generator=generator), dim=1).to(device)
    return packed, theta_pre, alpha


def merge_packed_state(state, theta_pre, alpha, backend) -> tuple[PackedExperts, torch.Tensor]:
    packed = PackedExperts.from_state_dict(state)
    return packed, smat_kernels.packed_merge(theta_pre_for(packed, theta_pre), packed, alpha, backend=backend)


def theta_pre_for(packed: PackedExperts, theta_pre: torch.Tensor) -> torch.Tensor:
    """θ_pre of the packed N where that is affordable, so that a forged N
    reaches the checks of the packed fields (the issue's segfault)."""
    if packed.n != theta_pre.shape[0] and 0 <= packed.n <= 10**7:
        return torch.zeros(packed.n, dtype=packed.delta.dtype, device=theta_pre.device)
    return theta_pre


def packed_oracle(theta_pre, alpha):
    def check(result):
        packed, merged = result
        same(merged, reference.packed_merge(theta_pre_for(packed, theta_pre), packed, alpha))
    return check


def packed_state_cases(packed: PackedExperts, generator: torch.Generator) -> dict[str, dict]:
    """Valid state dicts with one entry changed."""
    state = packed.state_dict()
    n, num_experts, support = packed.n, packed.num_experts, packed.support_size
    cases: dict[str, dict] = {}
    for key in state:
        for what, value in tensor_mutations(state[key]).items():
            cases[f"{key} {what}"] = {**state, key: value}
        cases[f"{key} missing"] = {k: v for k, v in state.items() if k != key}
    for shape in ([10**7, num_experts, 0], [n + 1, num_experts, 0], [n - 1, num_experts, 0], [0, num_experts, 0],
                  [-1, num_experts, 0], [2**62, num_experts, 0], [n, 0, 0], [n, 33, 0], [n, num_experts + 1, 0],
                  [n, num_experts - 1, 0], [n, num_experts, -1], [n + 32, num_experts, 0]):
        cases[f"shape {shape}"] = {**state, "shape": torch.tensor(shape)}
    offsets = state["word_offsets"]
    for what, change in (("first +1", (0, 1)), ("middle +1", (len(offsets) // 2, 1)), ("last +1", (-1, 1)),
                         ("last -1", (-1, -1)), ("middle huge", (len(offsets) // 2, 2**40)),
                         ("middle negative", (len(offsets) // 2, -2**40))):
        changed = offsets.clone()
        changed[change[0]] += change[1]
        cases[f"word_offsets {what}"] = {**state, "word_offsets": changed}
    cases["word_offsets all zero"] = {**state, "word_offsets": torch.zeros_like(offsets)}
    bitmap = state["support_bitmap"]
    cases["support_bitmap all set"] = {**state, "support_bitmap": torch.full_like(bitmap, -1)}
    cases["support_bitmap cleared"] = {**state, "support_bitmap": torch.zeros_like(bitmap)}
    padded = bitmap.clone()
    padded[-1] |= -2**31  # bit 31 of the last word: past N = 97
    cases["support_bitmap padding bit"] = {**state, "support_bitmap": padded}
    moved = bitmap.clone()
    moved[0] ^= 0b11  # swap which of elements 0 and 1 is on: same count, consistent offsets
    cases["support_bitmap moved bits"] = {**state, "support_bitmap": moved}
    cases["expert_bits past M"] = {**state, "expert_bits": torch.full_like(state["expert_bits"], -1)}
    cases["expert_bits none set"] = {**state, "expert_bits": torch.zeros_like(state["expert_bits"])}
    cases["delta infinite"] = {**state, "delta": torch.full_like(state["delta"], float("inf"))}
    cases["delta bfloat16"] = {**state, "delta": state["delta"].to(torch.bfloat16)}
    for index in range(RANDOM_CASES):
        key = ("support_bitmap", "word_offsets", "expert_bits", "delta")[index % 4]
        dtype = DTYPES[int(torch.randint(len(DTYPES), (), generator=generator))] if index % 3 == 0 \
            else state[key].dtype
        length = int(torch.randint(0, 2 * max(support, len(bitmap)) + 3, (), generator=generator)) \
            if index % 5 == 0 else state[key].shape[0]
        cases[f"random {index}: {key} {str(dtype)[6:]} [{length}]"] = {
            **state, key: random_tensor(generator, length, dtype).to(state[key].device)}
    return cases


def fuzz_packed(backend: str, device: str) -> dict[str, int]:
    generator = torch.Generator().manual_seed(0)
    outcomes = {"ok": 0, "error": 0}
    for num_experts in (3, 12, 32):  # uint8, int16 and int32 expert bits
        packed, theta_pre, alpha = valid_packed(97, num_experts, device)
        for name, state in packed_state_cases(packed, generator).items():
            call = partial(merge_packed_state, state, theta_pre, alpha, backend)
            outcomes[run_case(f"M={num_experts} state {name}", call, packed_oracle(theta_pre, alpha))] += 1
        outcomes[fuzz_in_place(packed, theta_pre, alpha, backend, num_experts)] += 1
        for name, state in list(packed_state_cases(packed, generator).items())[:40]:
            fields = {key: value for key, value in state.items() if key != "shape"}
            call = partial(PackedExperts, 97, num_experts, rounded=0, **fields)
            outcomes[run_case(f"M={num_experts} constructor {name}", call, accept_any)] += 1
    return outcomes


def fuzz_in_place(packed, theta_pre, alpha, backend, num_experts) -> str:
    """Fields changed after construction are caught at the merge."""
    tampered = PackedExperts.from_state_dict({k: v.clone() for k, v in packed.state_dict().items()})
    tampered.word_offsets[len(tampered.word_offsets) // 2] += 10**9
    return run_case(f"M={num_experts} word_offsets changed in place",
                    lambda: (tampered, smat_kernels.packed_merge(theta_pre, tampered, alpha, backend=backend)),
                    packed_oracle(theta_pre, alpha))


def fuzz_files(device: str) -> dict[str, int]:
    """Truncated and damaged safetensors files."""
    packed, theta_pre, alpha = valid_packed(97, 3, device)
    outcomes = {"ok": 0, "error": 0}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "experts.safetensors")
        packed.save(path)
        data = open(path, "rb").read()
        generator = torch.Generator().manual_seed(1)
        variants = {f"truncated to {size}": data[:size] for size in (0, 7, 8, 100, len(data) - 1)}
        for position in torch.randint(len(data), (30,), generator=generator).tolist():
            flipped = bytes([data[position] ^ 0xFF])
            variants[f"byte {position} flipped"] = data[:position] + flipped + data[position + 1:]
        for name, content in variants.items():
            with open(path, "wb") as file:
                file.write(content)
            outcomes[run_case(f"file {name}", partial(PackedExperts.load, path, device=device), accept_any)] += 1
    return outcomes


# --------------------------------------------------------------------------
# The other public ops
# --------------------------------------------------------------------------


def op_calls(device: str) -> dict[str, tuple]:
    """op name → (function, valid keyword arguments)."""
    generator = torch.Generator().manual_seed(2)
    n, num_experts, batch = 97, 3, 2

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device)

    packed, theta_pre, alpha = valid_packed(n, num_experts, device)
    return {
        "merge": (smat_kernels.merge, {"theta_pre": tensor(n), "delta": tensor(n), "log_alpha": tensor(n, num_experts),
                                       "alpha": tensor(batch, num_experts), "mode": "sample", "seed": 3, "offset": 5}),
        "expected_density": (smat_kernels.expected_density, {"log_alpha": tensor(n, num_experts)}),
        "hard_density": (smat_kernels.hard_density, {"log_alpha": tensor(n, num_experts)}),
        "pack": (smat_kernels.pack, {"delta": tensor(n), "log_alpha": tensor(n, num_experts) * 8}),
        "packed_merge": (smat_kernels.packed_merge, {"theta_pre": theta_pre, "packed": packed, "alpha": alpha}),
    }


SCALAR_MUTATIONS = {
    "mode": ("sampled", None, 1, "DETERMINISTIC"),
    "seed": (-1, 2**63, 1.5, True, None, "1"),
    "offset": (-1, 2**64, 0.0, None),
    "beta": (0.0, -1.0, float("nan"), float("inf"), "x", None),
    "gamma": (0.0, 0.5, float("nan"), float("-inf"), None),
    "zeta": (1.0, 0.5, float("nan"), float("inf"), None),
    "backend": ("fastest", "", 3),
}


def op_result(op: str, function, arguments: dict):
    result = function(**arguments)
    if op == "merge" or op == "expected_density":
        differentiable = [value for value in arguments.values()
                          if isinstance(value, torch.Tensor) and value.dtype.is_floating_point]
        for value in differentiable:
            value.requires_grad_(True)
        out = function(**arguments)
        grads = torch.autograd.grad(out.float().sum(), differentiable, allow_unused=True)
        return result, grads
    return result, ()


def op_oracle(op: str, function, arguments: dict):
    def check(result):
        outputs, grads = result
        expected, expected_grads = op_result(op, function, {**detached(arguments), "backend": "reference"})
        if op == "pack":
            for name in ("support_bitmap", "word_offsets", "expert_bits", "delta"):
                if not torch.equal(getattr(outputs, name), getattr(expected, name)):
                    raise CaseFailure(f"packed {name} differs")
            return
        same(outputs, expected)
        for grad, expected_grad in zip(grads, expected_grads):
            if (grad is None) != (expected_grad is None):
                raise CaseFailure("a gradient is missing")
            if grad is not None:
                same(grad, expected_grad)
    return check


def run_op_case(name: str, op: str, function, arguments: dict) -> str:
    return run_case(name, lambda: op_result(op, function, detached(arguments)), op_oracle(op, function, arguments))


def detached(arguments: dict) -> dict:
    return {key: value.detach().clone() if isinstance(value, torch.Tensor) else value
            for key, value in arguments.items()}


def size_cases(device: str) -> dict[str, tuple]:
    """Valid extremes: N = 0 and 1, every width of expert bits, B = 1."""
    cases = {}
    for n in (0, 1, 33):
        for num_experts in (1, 8, 9, 17, 32):
            generator = torch.Generator().manual_seed(n + num_experts)
            log_alpha = (torch.randn(n, num_experts, generator=generator) * 8).to(device)
            theta_pre, delta = torch.randn(n, generator=generator).to(device), torch.randn(n).to(device)
            alpha = torch.randn(1, num_experts, generator=generator).to(device)
            common = f"N={n} M={num_experts}"
            cases[f"merge {common}"] = ("merge", {"theta_pre": theta_pre, "delta": delta, "log_alpha": log_alpha,
                                                  "alpha": alpha, "mode": "deterministic"})
            cases[f"expected_density {common}"] = ("expected_density", {"log_alpha": log_alpha})
            cases[f"hard_density {common}"] = ("hard_density", {"log_alpha": log_alpha})
            cases[f"pack {common}"] = ("pack", {"delta": delta, "log_alpha": log_alpha})
    return cases


def fuzz_ops(backend: str, device: str) -> dict[str, int]:
    outcomes = {"ok": 0, "error": 0}
    calls = op_calls(device)
    for op, (function, valid) in calls.items():
        for key, value in valid.items():
            mutations = tensor_mutations(value) if isinstance(value, torch.Tensor) else {}
            for what, mutated in mutations.items():
                arguments = {**detached(valid), key: mutated, "backend": backend}
                outcomes[run_op_case(f"{op} {key} {what}", op, function, arguments)] += 1
        for key, values in SCALAR_MUTATIONS.items():
            if key not in function.__kwdefaults__ and key not in valid:
                continue
            for value in values:
                arguments = {**detached(valid), "backend": backend, key: value}
                outcomes[run_op_case(f"{op} {key}={value!r}", op, function, arguments)] += 1
    for name, (op, arguments) in size_cases(device).items():
        outcomes[run_op_case(name, op, calls[op][0], {**arguments, "backend": backend})] += 1
    return outcomes


def main(target: str, backend: str, device: str) -> None:
    torch.set_num_threads(2)
    fuzz = {"packed": lambda: fuzz_packed(backend, device), "files": lambda: fuzz_files(device),
            "ops": lambda: fuzz_ops(backend, device)}[target]
    outcomes = fuzz()
    print(f"done: {outcomes['error']} clear errors, {outcomes['ok']} results equal to the reference", flush=True)


# --------------------------------------------------------------------------
# The tests: each runs one fuzz target in a subprocess
# --------------------------------------------------------------------------


def run_fuzz(target: str, backend: str, device: str) -> None:
    environment = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, __file__, target, backend, device], capture_output=True, text=True,
                            timeout=600, cwd=tempfile.gettempdir(), env=environment)
    lines = result.stdout.strip().splitlines()
    last_case = next((line for line in reversed(lines) if line.startswith("case ")), "before the first case")
    assert result.returncode == 0, (f"the fuzzing process ended with code {result.returncode} "
                                    f"(a negative code is a signal: {-result.returncode} = SIGSEGV when 11) in "
                                    f"{last_case!r}:\n{result.stderr[-3000:]}")
    assert lines and lines[-1].startswith("done:"), result.stdout[-2000:]


CPU_TARGETS = [("packed", "cpu"), ("packed", "reference"), ("ops", "cpu"), ("ops", "reference"),
               ("files", "cpu")]
GPU_TARGETS = [("packed", "cuda"), ("packed", "triton"), ("ops", "cuda"), ("ops", "triton")]


@pytest.mark.parametrize(("target", "backend"), CPU_TARGETS, ids=[f"{t}-{b}" for t, b in CPU_TARGETS])
def test_fuzz_cpu(target, backend):
    run_fuzz(target, backend, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize(("target", "backend"), GPU_TARGETS, ids=[f"{t}-{b}" for t, b in GPU_TARGETS])
def test_fuzz_gpu(target, backend):
    run_fuzz(target, backend, "cuda")


if __name__ == "__main__":
    main(*sys.argv[1:])
