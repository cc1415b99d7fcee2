"""Specialise and predict one 5-way 5-shot task (15 queries per class): ``Model.specialize_batch`` in ProtoNet
mode (the hypernetwork's α from the support set under θ_pre, one merge, the support set under θ_i for the
prototypes) then ``Specialist.predict_batch`` on the 75 queries.

Backbones: the built-in ViT (32 px) and ViT-S/16 at 224 px with random weights (timings do not depend on
the values), M = 8 experts with binary masks of 10% density each (τ = 0.9), on the CPU. The merge is the
packed one (what ``smat.load`` uses for binary masks) or the dense deterministic one. Images are
preprocessed beforehand: decoding is not timed. Rows go to benchmarks/results/specialize_<date>.json with
machine, versions and the load average, with the size of the packed experts against dense θ_δ + log_α.

Each row also counts the task's floating-point work (torch.utils.flop_counter: matmuls and convolutions, one
multiply-add = 2 FLOP) and reports the achieved GFLOP/s against the rate torch's own matmul reaches on this
CPU in the same run (``matmul_gflops``: a 2048² fp32 ``torch.mm``, the best of 5): ``fraction_of_matmul`` says
how close a task comes to the machine's dense-math rate.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from bench_util import PeakMemory, write_rows
from torch.utils.flop_counter import FlopCounterMode

from smat import model as methods
from smat.config import load_config
from smat.inference import Model
from smat.inference.export import pack_experts
from smat.model.backbone import create_backbone

RESULTS = Path(__file__).parent / "results"
BACKBONES = {"builtin": ["model.image_size=32"],
             "vit_small_patch16_224": ["model.backbone=vit_small_patch16_224", "model.image_size=224"]}
WAY, SHOT, QUERY = 5, 5, 15


@pytest.fixture(scope="module")
def rows():
    collected: list[dict] = []
    yield collected
    if collected:
        write_rows(RESULTS, "specialize", collected, load_average=os.getloadavg())


MATMUL_SIZE = 2048


@pytest.fixture(scope="module")
def matmul_gflops() -> float:
    """GFLOP/s of a 2048² fp32 torch.mm on this CPU (best of 5 after a warm-up): the dense-math rate."""

    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * MATMUL_SIZE ** 3 / best / 1e9


@pytest.fixture(scope="module", params=list(BACKBONES))
def meta_tuned(request):
    config = load_config(None, ["device=cpu", *BACKBONES[request.param]])
    torch.manual_seed(0)
    task_model = methods.build(config, create_backbone(config.model, pretrained=False))
    with torch.no_grad():
        task_model.delta.normal_(0.0, 1e-3)
        task_model.log_alpha.copy_(torch.where(torch.rand_like(task_model.log_alpha) < 0.1, 10.0, -10.0))
    packed = pack_experts(task_model)
    dense_bytes = 4 * (task_model.delta.numel() + task_model.log_alpha.numel())
    return request.param, config, task_model, packed.nbytes() / dense_bytes


@pytest.mark.parametrize("merge", ["packed", "dense"])
def test_specialize_and_predict(benchmark, rows, meta_tuned, merge, matmul_gflops):
    name, config, task_model, export_ratio = meta_tuned
    model = Model(task_model, config, temperature=0.5, merge=merge)
    assert model.merge_kind == merge
    size = config.model.image_size
    generator = torch.Generator().manual_seed(1)
    support_x = torch.randn(WAY * SHOT, 3, size, size, generator=generator)
    support_y = torch.arange(WAY).repeat_interleave(SHOT)
    query_x = torch.randn(WAY * QUERY, 3, size, size, generator=generator)
    classes = [f"class{c}" for c in range(WAY)]

    def task():
        return model.specialize_batch(support_x, support_y, classes).predict_batch(query_x)

    rounds = 5 if name == "builtin" else 2
    benchmark.pedantic(task, rounds=rounds, iterations=1, warmup_rounds=1)
    with PeakMemory("cpu") as memory:
        predictions = task()
    assert predictions.probabilities.shape == (WAY * QUERY, WAY)
    with FlopCounterMode(display=False) as counter:
        task()
    seconds = statistics.median(benchmark.stats.stats.data)
    gflop = counter.get_total_flops() / 1e9
    row = {"backbone": name, "image_size": size, "merge": merge, "N": task_model.layout.num_elements,
           "M": task_model.num_experts, "way": WAY, "shot": SHOT, "queries": WAY * QUERY,
           "ms_per_task": 1e3 * seconds, "gflop_per_task": gflop, "gflops": gflop / seconds,
           "matmul_gflops": matmul_gflops, "fraction_of_matmul": gflop / seconds / matmul_gflops,
           "peak_extra_mib": memory.peak_bytes / 2**20, "packed_over_dense_experts": export_ratio,
           "threads": torch.get_num_threads(), "load_average": os.getloadavg()}
    benchmark.extra_info.update(row)
    rows.append(row)
