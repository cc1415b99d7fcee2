"""Regenerate tests/kernel_tests/data/philox_golden.json from Triton's own Philox.

The golden vectors are Triton's ``tl.randint4x(seed, counter)`` words and
``tl.rand4x(seed, counter)`` uniforms, computed in Triton's interpreter (no
GPU needed) for seeds above 2^32 and 64-bit counters that cross 2^32, so that
the key split (k0, k1) and the counter split (c0, c1) are both exercised.
test_philox.py only reads the JSON and does not need triton.

    TRITON_INTERPRET=1 python tests/kernel_tests/make_philox_golden.py
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

# Triton picks interpreter or compiler when a kernel is defined: set it first.
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

OUTPUT = pathlib.Path(__file__).parent / "data" / "philox_golden.json"

SEEDS = [0, 1, 0x1234_5678, 2**32 - 1, 2**32, 2**32 + 7, 0xDEAD_BEEF_CAFE_F00D & (2**63 - 1), 2**63 - 1]

COUNTERS = [
    *range(0, 8),
    *range(2**31 - 2, 2**31 + 2),
    *range(2**32 - 4, 2**32 + 4),
    *range(3 * 2**32 - 2, 3 * 2**32 + 2),
    2**40 + 12345,
    2**62 + 1,
    2**63 - 2,
    2**63 - 1,
]


@triton.jit
def _philox_kernel(seed, counters, words, uniforms, count, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    valid = index < count
    counter = tl.load(counters + index, mask=valid, other=0)
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    u0, u1, u2, u3 = tl.rand4x(seed, counter)
    tl.store(words + 4 * index + 0, w0.to(tl.int32, bitcast=True), mask=valid)
    tl.store(words + 4 * index + 1, w1.to(tl.int32, bitcast=True), mask=valid)
    tl.store(words + 4 * index + 2, w2.to(tl.int32, bitcast=True), mask=valid)
    tl.store(words + 4 * index + 3, w3.to(tl.int32, bitcast=True), mask=valid)
    tl.store(uniforms + 4 * index + 0, u0, mask=valid)
    tl.store(uniforms + 4 * index + 1, u1, mask=valid)
    tl.store(uniforms + 4 * index + 2, u2, mask=valid)
    tl.store(uniforms + 4 * index + 3, u3, mask=valid)


@triton.jit
def _rand_kernel(seed, counters, uniforms, count, BLOCK: tl.constexpr):
    index = tl.arange(0, BLOCK)
    valid = index < count
    counter = tl.load(counters + index, mask=valid, other=0)
    tl.store(uniforms + index, tl.rand(seed, counter), mask=valid)


def float_bits(value: float) -> int:
    return struct.unpack("<I", struct.pack("<f", value))[0]


def draw(seed: int) -> dict:
    counters = torch.tensor(COUNTERS, dtype=torch.int64)
    count = counters.numel()
    block = triton.next_power_of_2(count)
    words = torch.empty(count, 4, dtype=torch.int32)
    uniforms = torch.empty(count, 4, dtype=torch.float32)
    rand = torch.empty(count, dtype=torch.float32)
    _philox_kernel[(1,)](seed, counters, words, uniforms, count, BLOCK=block)
    _rand_kernel[(1,)](seed, counters, rand, count, BLOCK=block)
    # tl.rand is the first word of tl.rand4x; keep both so that a change in either shows.
    assert torch.equal(rand, uniforms[:, 0])
    return {
        "seed": seed,
        "counters": COUNTERS,
        "words": [[w & 0xFFFFFFFF for w in row] for row in words.tolist()],
        "uniform_bits": [[float_bits(u) for u in row] for row in uniforms.tolist()],
        "uniforms": [[repr(u) for u in row] for row in uniforms.tolist()],
    }


def main() -> None:
    golden = {
        "source": f"triton {triton.__version__}, tl.randint4x / tl.rand4x / tl.rand under TRITON_INTERPRET=1, "
                  f"regenerate with tests/kernel_tests/make_philox_golden.py",
        "cases": [draw(seed) for seed in SEEDS],
    }
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    # One case per line: small diffs when the vectors are regenerated.
    cases = ",\n  ".join(json.dumps(case) for case in golden["cases"])
    OUTPUT.write_text(f'{{"source": {json.dumps(golden["source"])},\n "cases": [\n  {cases}\n ]\n}}\n')
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
