"""Run folders written by an earlier smat (tests/data/old_runs/, made with commit b23e1bf, before the method
layer was laid out in floors) still load and give the same task weights and logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from smat.data import Task
from smat.evaluation.runs import load_run
from smat.model import protonet

OLD_RUNS = Path(__file__).parent / "data" / "old_runs"
RECORDED = json.loads((OLD_RUNS / "logits.json").read_text())


def synthetic_tasks() -> list[Task]:
    """The two 3-way 2-shot tasks of 16 px noise images that the recorded logits were computed on."""
    generator = torch.Generator().manual_seed(1234)
    tasks = []
    for _ in range(2):
        support = torch.randn(6, 3, 16, 16, generator=generator)
        query = torch.randn(6, 3, 16, 16, generator=generator)
        labels = torch.arange(3).repeat_interleave(2)
        tasks.append(Task(support, labels, query, labels.clone(), "synthetic", ("a", "b", "c")))
    return tasks


@pytest.mark.parametrize("method", sorted(RECORDED))
def test_an_old_run_folder_loads_and_gives_the_same_logits(method, tmp_path):
    run = shutil.copytree(OLD_RUNS / method, tmp_path / method)
    loaded = load_run(run, "cpu")
    assert loaded.method == method and loaded.temperature == pytest.approx(RECORDED[method]["temperature"])
    tasks = synthetic_tasks()
    with torch.no_grad():
        theta = loaded.model.task_parameters(tasks, loaded.temperature)
        logits = protonet.query_logits(loaded.model, theta, tasks)
    for got, expected in zip(logits, RECORDED[method]["logits"], strict=True):
        torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)
