"""Misuse is a clear Python error naming the argument, never a crash; the
dispatcher explains why a backend cannot run."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch

import smat_kernels


def good(n: int = 10, num_experts: int = 3, batch: int = 2) -> dict:
    return {"theta_pre": torch.zeros(n), "delta": torch.ones(n), "log_alpha": torch.zeros(n, num_experts),
            "alpha": torch.ones(batch, num_experts)}


def call_merge(**changes):
    arguments = good()
    options = {key: changes.pop(key) for key in list(changes) if key not in arguments}
    arguments.update(changes)
    return smat_kernels.merge(**arguments, backend="cpu", **options)


MERGE_MISUSE = [
    # (what, changes, error type, words the message must contain)
    ("theta_pre on another device", {"theta_pre": torch.zeros(10, device="meta")}, ValueError, ["delta", "theta_pre"]),
    ("alpha on another device", {"alpha": torch.ones(2, 3, device="meta")}, ValueError, ["alpha", "meta"]),
    ("log_alpha on another device", {"log_alpha": torch.zeros(10, 3, device="meta")}, ValueError, ["log_alpha"]),
    ("theta_pre float64", {"theta_pre": torch.zeros(10, dtype=torch.float64)}, TypeError, ["theta_pre", "float64"]),
    ("theta_pre int", {"theta_pre": torch.zeros(10, dtype=torch.int32)}, TypeError, ["theta_pre"]),
    ("delta dtype differs", {"delta": torch.ones(10, dtype=torch.bfloat16)}, TypeError, ["delta"]),
    ("log_alpha bf16", {"log_alpha": torch.zeros(10, 3, dtype=torch.bfloat16)}, TypeError, ["log_alpha"]),
    ("alpha fp16", {"alpha": torch.ones(2, 3, dtype=torch.float16)}, TypeError, ["alpha"]),
    ("theta_pre a list", {"theta_pre": [0.0] * 10}, TypeError, ["theta_pre", "torch.Tensor"]),
    ("theta_pre 2-D", {"theta_pre": torch.zeros(10, 1)}, ValueError, ["theta_pre", "1-D"]),
    ("delta shorter", {"delta": torch.ones(9)}, ValueError, ["delta"]),
    ("log_alpha rows", {"log_alpha": torch.zeros(9, 3)}, ValueError, ["log_alpha", "[N, M]"]),
    ("log_alpha 1-D", {"log_alpha": torch.zeros(10)}, ValueError, ["log_alpha", "2-D"]),
    ("alpha 1-D", {"alpha": torch.ones(3)}, ValueError, ["alpha", "2-D"]),
    ("alpha with wrong M", {"alpha": torch.ones(2, 4)}, ValueError, ["alpha", "M = 3"]),
    ("alpha without tasks", {"alpha": torch.ones(0, 3)}, ValueError, ["alpha", "B ≥ 1"]),
    ("M = 33", {"log_alpha": torch.zeros(10, 33), "alpha": torch.ones(2, 33)}, ValueError, ["log_alpha", "33", "32"]),
    ("M = 0", {"log_alpha": torch.zeros(10, 0), "alpha": torch.ones(2, 0)}, ValueError, ["log_alpha", "M = 0"]),
    ("theta_pre strided", {"theta_pre": torch.zeros(20)[::2]}, ValueError, ["theta_pre", ".contiguous()"]),
    ("delta strided", {"delta": torch.ones(20)[::2]}, ValueError, ["delta", ".contiguous()"]),
    ("log_alpha transposed", {"log_alpha": torch.zeros(3, 10).t()}, ValueError, ["log_alpha", ".contiguous()"]),
    ("alpha transposed", {"alpha": torch.ones(3, 2).t()}, ValueError, ["alpha", ".contiguous()"]),
    ("negative seed", {"seed": -1}, ValueError, ["seed", "2^63"]),
    ("seed too large", {"seed": 2**63}, ValueError, ["seed"]),
    ("negative offset", {"offset": -5}, ValueError, ["offset"]),
    ("float seed", {"seed": 1.0}, TypeError, ["seed", "int"]),
    ("bool offset", {"offset": True}, TypeError, ["offset", "int"]),
    ("bad mode", {"mode": "sampled"}, ValueError, ["mode", "deterministic", "sample", "near_noiseless"]),
    ("beta ≤ 0", {"beta": 0.0}, ValueError, ["beta"]),
    ("gamma ≥ 0", {"gamma": 0.1}, ValueError, ["gamma"]),
    ("zeta ≤ 1", {"zeta": 1.0}, ValueError, ["zeta"]),
]


@pytest.mark.parametrize(("what", "changes", "error", "words"), MERGE_MISUSE, ids=[m[0] for m in MERGE_MISUSE])
def test_merge_misuse(what, changes, error, words):
    with pytest.raises(error) as raised:
        call_merge(**changes)
    assert type(raised.value) is error
    for word in words:
        assert word in str(raised.value), f"{what}: {word!r} not in {str(raised.value)!r}"


def test_errors_come_before_any_kernel_runs():
    """The largest valid M and any valid key still run: the checks reject only misuse."""
    out = call_merge(log_alpha=torch.zeros(10, 32), alpha=torch.ones(2, 32), seed=2**63 - 1, offset=2**63 - 10**6)
    assert out.shape == (2, 10)


@pytest.mark.parametrize("op", ("expected_density", "hard_density"))
def test_density_misuse(op):
    function = getattr(smat_kernels, op)
    with pytest.raises(TypeError, match="log_alpha"):
        function(torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"log_alpha.*\.contiguous\(\)"):
        function(torch.zeros(3, 4).t())
    with pytest.raises(ValueError, match="33"):
        function(torch.zeros(4, 33))
    with pytest.raises(ValueError, match="2-D"):
        function(torch.zeros(4))
    with pytest.raises(ValueError, match="zeta"):
        function(torch.zeros(4, 3), zeta=0.5)


def test_pack_misuse():
    with pytest.raises(ValueError, match="log_alpha has 9 rows"):
        smat_kernels.pack(torch.ones(10), torch.zeros(9, 3))
    with pytest.raises(TypeError, match="delta"):
        smat_kernels.pack(torch.ones(10, dtype=torch.float64), torch.zeros(10, 3))
    with pytest.raises(ValueError, match="log_alpha is on meta"):
        smat_kernels.pack(torch.ones(10), torch.zeros(10, 3, device="meta"))
    with pytest.raises(ValueError, match="33"):
        smat_kernels.pack(torch.ones(10), torch.zeros(10, 33))


def test_packed_merge_misuse():
    packed = smat_kernels.pack(torch.ones(10), torch.full((10, 3), 6.0))
    with pytest.raises(TypeError, match="PackedExperts"):
        smat_kernels.packed_merge(torch.zeros(10), packed.state_dict(), torch.ones(2, 3))
    with pytest.raises(ValueError, match="N = 11"):
        smat_kernels.packed_merge(torch.zeros(11), packed, torch.ones(2, 3))
    with pytest.raises(TypeError, match="bfloat16"):
        smat_kernels.packed_merge(torch.zeros(10, dtype=torch.bfloat16), packed, torch.ones(2, 3))
    with pytest.raises(ValueError, match="alpha"):
        smat_kernels.packed_merge(torch.zeros(10), packed, torch.ones(2, 4))
    with pytest.raises(ValueError, match="alpha is on meta"):
        smat_kernels.packed_merge(torch.zeros(10), packed, torch.ones(2, 3, device="meta"))


# --------------------------------------------------------------------------
# Backends and dispatch
# --------------------------------------------------------------------------


def test_backends_reports_every_backend_with_a_reason():
    report = smat_kernels.backends()
    assert set(report) == {"reference", "cpu", "cuda", "triton"}
    assert report["reference"] == "available" and report["cpu"].startswith("available")
    assert all(isinstance(reason, str) and reason for reason in report.values())


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        smat_kernels.merge(**good(), backend="fastest")


@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_forcing_a_backend_that_cannot_run_lists_the_reasons(backend, monkeypatch):
    """On CPU tensors the GPU backends cannot run: the error says why, for every backend."""
    # A backend may be unusable here for a reason other than the device: compare with what backends() says.
    with pytest.raises(ValueError) as raised:
        smat_kernels.merge(**good(), backend=backend)
    message = str(raised.value)
    assert f"backend {backend!r} (from the backend argument) cannot run on cpu" in message
    for name in ("reference: ok", "cpu: ok", "cuda:", "triton:"):
        assert name in message
    monkeypatch.setenv("SMAT_BACKEND", backend)
    with pytest.raises(ValueError, match=f"SMAT_BACKEND={backend}"):
        smat_kernels.merge(**good())


def test_environment_variable_chooses_the_backend(monkeypatch):
    inputs = good(num_experts=2)
    monkeypatch.setenv("SMAT_BACKEND", "reference")
    from smat_kernels import dispatch

    assert dispatch.resolve(torch.device("cpu")).name == "reference"
    monkeypatch.delenv("SMAT_BACKEND")
    assert dispatch.resolve(torch.device("cpu")).name == "cpu"
    assert torch.equal(smat_kernels.merge(**inputs, mode="deterministic"),
                       smat_kernels.merge(**inputs, mode="deterministic", backend="reference"))


def test_missing_compiled_module_warns_once_and_falls_back():
    script = textwrap.dedent("""
        import sys, warnings
        sys.modules["smat_kernels._cpu"] = None  # the compiled module cannot be imported
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import smat_kernels
            import smat_kernels.ops
        import torch
        messages = [str(w.message) for w in caught if "smat_kernels" in str(w.message)]
        assert len(messages) == 1, messages
        assert "falling back" in messages[0] and "reference" in messages[0], messages[0]
        report = smat_kernels.backends()
        assert report["cpu"].startswith("the compiled module smat_kernels._cpu could not be imported"), report
        from smat_kernels import dispatch
        assert dispatch.resolve(torch.device("cpu")).name == "reference"
        n = 5
        out = smat_kernels.merge(torch.zeros(n), torch.ones(n), torch.zeros(n, 2), torch.ones(1, 2))
        assert out.shape == (1, n)
        try:
            smat_kernels.merge(torch.zeros(n), torch.ones(n), torch.zeros(n, 2), torch.ones(1, 2), backend="cpu")
        except ValueError as error:
            assert "smat_kernels._cpu" in str(error), error
        else:
            raise AssertionError("forcing the missing cpu backend did not raise")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


@pytest.mark.parametrize("op", ("expected_density", "hard_density"))
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_density_of_no_elements_is_an_error_not_nan(op, backend):
    """A mean over N = 0 elements is undefined (it was NaN): an empty log_α is
    an error naming the fix, on every backend."""
    with pytest.raises(ValueError, match=r"log_alpha has no rows \(N = 0\)"):
        getattr(smat_kernels, op)(torch.zeros(0, 3), backend=backend)


# --------------------------------------------------------------------------
# PackedExperts: every field is checked before a kernel sees a pointer
# --------------------------------------------------------------------------


def test_forged_packed_shape_is_an_error_not_a_segfault():
    """The issue's reproduction: a state whose N is forged to 10^7 over a
    1000-element bitmap ended in signal 11 inside the CPU kernel."""
    script = textwrap.dedent("""
        import torch, smat_kernels as sk
        p = sk.pack(torch.randn(1000), torch.randn(1000, 8))
        sd = p.state_dict()
        sd["shape"] = torch.tensor([10**7, 8, 0])
        try:
            q = sk.PackedExperts.from_state_dict(sd)
            sk.packed_merge(torch.randn(10**7), q, torch.softmax(torch.randn(2, 8), 1))
        except ValueError as error:
            print("ValueError:", error)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert "ValueError: PackedExperts.support_bitmap has 32 entries but must have 312500" in result.stdout


def valid_packed_state() -> dict:
    generator = torch.Generator().manual_seed(0)
    log_alpha = torch.where(torch.rand(100, 3, generator=generator) < 0.3, 6.0, -6.0)
    return smat_kernels.pack(torch.randn(100, generator=generator), log_alpha).state_dict()


def changed(state: dict, key: str, change) -> dict:
    state = {name: value.clone() for name, value in state.items()}
    state[key] = change(state[key])
    return state


def add_to_middle(value: torch.Tensor, amount: int) -> torch.Tensor:
    value[len(value) // 2] += amount
    return value


PACKED_MISUSE = [
    ("float bitmap", "support_bitmap", lambda t: t.float(), TypeError, "support_bitmap must have dtype int32"),
    ("strided delta", "delta", lambda t: torch.stack([t, t], 1)[:, 0], ValueError, "delta must be contiguous"),
    ("int32 offsets", "word_offsets", lambda t: t.int(), TypeError, "word_offsets must have dtype int64"),
    ("short offsets", "word_offsets", lambda t: t[:-1], ValueError, "word_offsets has 4 entries but must have 5"),
    ("offset moved", "word_offsets", lambda t: add_to_middle(t, 1), ValueError, "word_offsets do not match the bitmap"),
    ("offset far out", "word_offsets", lambda t: add_to_middle(t, 10**12), ValueError, "do not match the bitmap"),
    ("first offset", "word_offsets", lambda t: t + 1, ValueError, "word_offsets[0] must be 0"),
    ("bit cleared", "support_bitmap", lambda t: t & ~t[:1], ValueError, "do not match the bitmap"),
    ("padding bit", "support_bitmap", lambda t: t | torch.tensor([0, 0, 0, 1 << 20], dtype=torch.int32), ValueError,
     "bits set past element N = 100"),
    ("bits past M", "expert_bits", lambda t: t | 8, ValueError, "experts ≥ M = 3"),
    ("int16 bits for M = 3", "expert_bits", lambda t: t.to(torch.int16), TypeError,
     "expert_bits must have dtype uint8"),
    ("delta shorter", "delta", lambda t: t[1:], ValueError, "expert_bits has"),
    ("delta float64", "delta", lambda t: t.double(), TypeError, "delta must have dtype"),
    ("delta 2-D", "delta", lambda t: t[:, None], ValueError, "delta must be 1-D"),
    ("bitmap on meta", "support_bitmap", lambda t: t.to("meta"), ValueError, "support_bitmap is on meta"),
    ("sparse delta", "delta", lambda t: t.to_sparse(), ValueError, "dense tensor"),
    ("N forged", "shape", lambda t: t + torch.tensor([32, 0, 0]), ValueError, "has 4 entries but must have 5"),
    ("M = 33", "shape", lambda t: t + torch.tensor([0, 30, 0]), ValueError, "M = 33"),
    ("negative rounded", "shape", lambda t: t - torch.tensor([0, 0, 1]), ValueError, "rounded must be ≥ 0"),
    ("float shape", "shape", lambda t: t.float(), TypeError, "'shape' must have dtype int64"),
]


@pytest.mark.parametrize(("what", "key", "change", "error", "words"), PACKED_MISUSE, ids=[m[0] for m in PACKED_MISUSE])
def test_packed_state_misuse(what, key, change, error, words):
    with pytest.raises(error) as raised:
        smat_kernels.PackedExperts.from_state_dict(changed(valid_packed_state(), key, change))
    assert words in str(raised.value)


def test_packed_state_missing_entry():
    state = valid_packed_state()
    del state["word_offsets"]
    with pytest.raises(ValueError, match="word_offsets missing"):
        smat_kernels.PackedExperts.from_state_dict(state)


def test_packed_changed_in_place_is_caught_at_the_merge():
    packed = smat_kernels.PackedExperts.from_state_dict(valid_packed_state())
    packed.word_offsets[2] += 10**9
    with pytest.raises(ValueError, match="word_offsets do not match the bitmap"):
        smat_kernels.packed_merge(torch.zeros(100), packed, torch.ones(1, 3), backend="cpu")


def test_packed_file_round_trip_and_damage(tmp_path):
    packed = smat_kernels.PackedExperts.from_state_dict(valid_packed_state())
    path = tmp_path / "experts.safetensors"
    packed.save(path)
    loaded = smat_kernels.PackedExperts.load(path)
    alpha = torch.softmax(torch.randn(2, 3), 1)
    assert torch.equal(smat_kernels.packed_merge(torch.zeros(100), loaded, alpha),
                       smat_kernels.packed_merge(torch.zeros(100), packed, alpha))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="experts.safetensors is not a readable packed-experts file"):
        smat_kernels.PackedExperts.load(path)


def test_the_backend_modules_import_under_their_dotted_names():
    """`import smat_kernels.backends.cpu as cpu` works beside `smat_kernels.backends()` (issue 22, item 10:
    the function of that name hid the package, so the dotted import failed)."""
    script = ("import smat_kernels.backends.cpu as cpu, smat_kernels.backends.reference as reference\n"
              "import smat_kernels\n"
              "report = smat_kernels.backends()\n"
              "assert isinstance(report, dict) and report['reference'] == 'available', report\n"
              "assert cpu.CpuBackend.name == 'cpu' and reference.ReferenceBackend.name == 'reference'\n")
    with tempfile.TemporaryDirectory() as folder:  # outside the checkout: the installed package
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                                cwd=folder, env=dict(os.environ, SMAT_SELFTEST="0"))
    assert result.returncode == 0, result.stderr
