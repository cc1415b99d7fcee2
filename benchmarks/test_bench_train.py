"""One meta-training step — Algorithm 1's loop body (MetaObjective forward, backward, the three
optimisers' step) on a meta-batch of 4 tasks — in tasks per second: smat_kernels' compiled backend
against ``model.backend="reference"``, with the tasks' backbones in a Python loop and under
torch.func.vmap (``train.task_parallel``), all measured in the same run.

    python -m pytest benchmarks/test_bench_train.py --benchmark-only

CPU: the built-in ViT (32 px, 0.7M parameters carrying the experts), and ViT-S ``vit_small_patch16_224``
at 128 px (22M parameters; the loop only, the reference measured once: one of its steps takes minutes).
GPU (marked gpu, skipped without CUDA): ViT-S at 128 px with bf16 autocast (``train.precision=auto``).
All start from a random initialisation, since the weights do not change the time of a step, and run on
random 5-way 5-shot tasks with 5 queries per class. On each backbone, PMF's step (dense θ_δ, no experts,
no merge: what SMAT's step costs on top of plain meta-tuning) is measured in the same run: SMAT rows carry
``pmf_over_smat`` = PMF's seconds / SMAT's.

Each row records the median seconds of a step, ``tasks_per_second``, ``speedup_vs_reference`` (the
backend against the reference in the same loop/vmap mode; the markdown's "speed-up vs eager" column)
and ``vmap_speedup`` (vmap against the loop with the same backend), and the peak memory of one step in
units of one [B, N] buffer of merged weights. GB/s counts only the bytes the merge moves (forward and
backward, bench_util.bytes_merge_*): a lower bound on the step's traffic, and its ratio to the copy
bandwidth says how little of a step the merge's memory traffic can be.

On the CPU, benchmarks/conftest.py has glibc map every allocation above 64 KiB afresh (so that the RSS
sees each temporary for the peak memory); every large temporary then pays its page faults, most of all
the reference merge's [B, N, M] ones, so the reference's time here is pessimistic against a training run.
"""

from __future__ import annotations

import pytest
import torch
from bench_util import bytes_merge_backward, bytes_merge_forward, run_case

from smat.config import load_config
from smat.data import Task
from smat.data.episode import labels_for
from smat.model import build
from smat.model.backbone import create_backbone
from smat.training.lagrangian import SparsityMultipliers
from smat.training.specs import SPECS, make_optimizers
from smat_kernels.dispatch import rejection

N_WAY, K_SHOT, Q_QUERY = 5, 5, 5
STEP = 1  # any step but 0, where the gradient alignment between tasks would be measured
# loop before vmap and the reference before a backend, so that each row finds the rows it is compared with
CPU_CASES = [("loop", "reference"), ("loop", "cpu"), ("vmap", "reference"), ("vmap", "cpu")]
VIT_S = ("vit_small_patch16_224", 128)
GPU_CASES = [(parallel, impl) for parallel in ("loop", "vmap") for impl in ("reference", "cuda", "triton")]
ROUNDS = {"cpu": {"reference": 3, "cpu": 5}, "cuda": {"reference": 5, "cuda": 10, "triton": 10}}
VIT_S_CPU_ROUNDS = {"reference": 1, "cpu": 3}


def random_tasks(count: int, image_size: int, device: str) -> list[Task]:
    generator = torch.Generator().manual_seed(0)
    labels = labels_for([range(K_SHOT)] * N_WAY)
    queries = labels_for([range(Q_QUERY)] * N_WAY)

    def images(n: int) -> torch.Tensor:
        return torch.randn(n, 3, image_size, image_size, generator=generator).to(device)

    return [Task(images(len(labels)), labels.to(device), images(len(queries)), queries.to(device), "random",
                 tuple(str(c) for c in range(N_WAY))) for _ in range(count)]


def make_step(backbone_name: str, image_size: int, impl: str, parallel: str, device: str, method: str = "smat"):
    """(one training step as a function, the model, the meta-batch size) for a fresh model of ``method`` with
    ``impl`` as its kernel backend."""
    config = load_config(None, [f"method={method}", f"model.backbone={backbone_name}",
                                f"model.image_size={image_size}", f"model.backend={impl}",
                                f"train.task_parallel={parallel}", "train.alignment_every=0"])
    torch.manual_seed(0)
    model = build(config, create_backbone(config.model, pretrained=False)).to(device).train()
    objective = SPECS[method].objective(model, config, parallel)  # PMF: the ProtoNet query loss
    optimizers = make_optimizers(SPECS[method], model, config.train)
    multipliers = SparsityMultipliers(model.num_experts, config.train.tau, config.train.lambda_lr, device)
    tasks = random_tasks(config.train.meta_batch, image_size, device)
    temperature = config.train.temperature.at(0)

    def step():
        out = objective(tasks, 0, STEP, temperature, multipliers)
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        for optimizer in optimizers.values():
            optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step, model, len(tasks)


def measure(benchmark, results, copy_gbps: float, *, backbone_name: str, image_size: int, impl: str,
            parallel: str, device: str, dtype: str, rounds: int, method: str = "smat", warmup: int = 1) -> dict:
    step, model, batch = make_step(backbone_name, image_size, impl, parallel, device, method)
    n, num_experts = model.layout.num_elements, model.num_experts
    op = f"train step ({parallel})" if method == "smat" else f"{method} train step ({parallel})"
    row = run_case(benchmark, results, copy_gbps, op=op, impl=impl, fn=step,
                   nbytes=bytes_merge_forward(n, batch, num_experts, torch.float32)
                   + bytes_merge_backward(n, batch, num_experts, torch.float32),
                   output_bytes=0, n=n, batch=batch, num_experts=num_experts, dtype=torch.float32, rounds=rounds,
                   warmup_rounds=warmup, device=device)
    row.update(dtype=dtype, backbone=backbone_name, image_size=image_size, method=method,
               tasks_per_second=batch / row["seconds"])
    comparisons = [("speedup_vs_reference", op, "reference"), ("vmap_speedup", "train step (loop)", impl)]
    if method == "smat":
        comparisons.append(("pmf_over_smat", f"pmf train step ({parallel})", impl))
    for key, other_op, other_impl in comparisons:
        other = [r["seconds"] for r in results.rows if (r["op"], r["impl"], r.get("backbone"), r["dtype"]) ==
                 (other_op, other_impl, backbone_name, dtype) and r is not row]
        if other:
            row[key] = other[0] / row["seconds"]
    benchmark.extra_info.update(row)
    return row


def test_pmf_step_cpu(benchmark, results, copy_bandwidth):
    """PMF's step on the built-in backbone, before the SMAT rows of the same backbone are compared with it."""
    measure(benchmark, results, copy_bandwidth, backbone_name="builtin", image_size=32, impl="cpu",
            parallel="loop", device="cpu", dtype="float32", rounds=ROUNDS["cpu"]["cpu"], method="pmf")


@pytest.mark.parametrize("parallel,impl", CPU_CASES, ids=[f"{p}-{i}" for p, i in CPU_CASES])
def test_train_step_cpu(benchmark, results, copy_bandwidth, parallel, impl):
    reason = rejection(impl, torch.device("cpu")) if impl != "reference" else None
    if reason is not None:
        pytest.skip(f"backend {impl} cannot run: {reason}")
    measure(benchmark, results, copy_bandwidth, backbone_name="builtin", image_size=32, impl=impl,
            parallel=parallel, device="cpu", dtype="float32", rounds=ROUNDS["cpu"][impl])


@pytest.mark.parametrize("method,impl", [("pmf", "cpu"), ("smat", "reference"), ("smat", "cpu")],
                         ids=["pmf", "smat-reference", "smat-cpu"])
def test_train_step_vit_small_cpu(benchmark, results, copy_bandwidth, method, impl):
    reason = rejection(impl, torch.device("cpu")) if impl != "reference" else None
    if reason is not None:
        pytest.skip(f"backend {impl} cannot run: {reason}")
    measure(benchmark, results, copy_bandwidth, backbone_name=VIT_S[0], image_size=VIT_S[1], impl=impl,
            parallel="loop", device="cpu", dtype="float32", rounds=VIT_S_CPU_ROUNDS[impl], method=method,
            warmup=0 if impl == "reference" else 1)  # the reference's step takes minutes: measured once, cold


@pytest.mark.gpu
@pytest.mark.parametrize("parallel,impl", GPU_CASES, ids=[f"{p}-{i}" for p, i in GPU_CASES])
def test_train_step_gpu(benchmark, results, cuda_copy_bandwidth, parallel, impl):
    reason = rejection(impl, torch.device("cuda")) if impl != "reference" else None
    if reason is not None:
        pytest.skip(f"backend {impl} cannot run: {reason}")
    measure(benchmark, results, cuda_copy_bandwidth, backbone_name="vit_small_patch16_224", image_size=128,
            impl=impl, parallel=parallel, device="cuda", dtype="bf16 autocast", rounds=ROUNDS["cuda"][impl])
