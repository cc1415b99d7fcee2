"""Triton kernels of smat: merge (+ backward), densities, pack and packed merge.

Each module holds the kernels of one op and their launch helpers; the
:class:`smat_kernels.backends.triton.TritonBackend` calls the helpers with
validated, contiguous tensors.

Triton decides between compiling a kernel and interpreting it in Python when
the kernel is *defined*, that is when these modules are imported: with
``TRITON_INTERPRET=1`` set before the import, every kernel runs on CPU tensors
through the interpreter (how CI tests them), otherwise they compile for the
GPU. :data:`INTERPRET` records which, and :func:`autotune_configs` is the one
place that turns autotuning down to a single small configuration under the
interpreter, where benchmarking candidate configurations would take minutes.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Block sizes and warp counts that the autotuner tries on a GPU.
GPU_BLOCKS = (256, 512, 1024)
GPU_WARPS = (4, 8)
# The interpreter's single configuration: small enough that N = 1025 spans
# several blocks (so block boundaries are tested), large enough to keep the
# number of interpreted programs low.
INTERPRETER_BLOCK = 512

# Programs of the reduction kernels (merge backward, densities, pack) under the
# interpreter: a few, so that the grid-stride loops run more than once.
INTERPRETER_PROGRAMS = 4
PROGRAMS_PER_MULTIPROCESSOR = 8


def autotune_configs(blocks: tuple[int, ...] = GPU_BLOCKS, warps: tuple[int, ...] = GPU_WARPS,
                     interpreter_block: int = INTERPRETER_BLOCK) -> list[triton.Config]:
    """Autotuning candidates ``{"BLOCK": b}`` x num_warps; one small config
    under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK": interpreter_block}, num_warps=1)]
    return [triton.Config({"BLOCK": block}, num_warps=num_warps) for block in blocks for num_warps in warps]


def reduction_programs(device, items: int, blocks: tuple[int, ...] = GPU_BLOCKS,
                       interpreter_block: int = INTERPRETER_BLOCK) -> int:
    """How many programs a grid-stride reduction kernel launches: enough to
    fill the GPU, never more than the blocks of its smallest configuration.
    The count does not depend on the autotuned block size, so the buffer of
    per-program partial sums is allocated before the launch."""
    if INTERPRET or device.type != "cuda":
        cap, smallest = INTERPRETER_PROGRAMS, interpreter_block
    else:
        cap = torch.cuda.get_device_properties(device).multi_processor_count * PROGRAMS_PER_MULTIPROCESSOR
        smallest = min(blocks)
    return max(1, min(cap, triton.cdiv(items, smallest)))


def next_power_of_2(value: int) -> int:
    return triton.next_power_of_2(value)
