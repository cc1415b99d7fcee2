"""Meta-testing: the confidence interval, result tables, loading a run and ``python -m smat.evaluate``.

The run folder is written the way ``python -m smat.train`` writes one (config.yaml, backbone.safetensors,
the Trainer's checkpoint), around an untrained tiny SMAT model: no pre-training, no meta-training.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smat import evaluate
from smat import model as methods
from smat.adapt import AdaptConfig
from smat.config import ConfigError, load_config, validate
from smat.evaluation import metrics, modes, runs
from smat.evaluation.tables import (
    ModeCost,
    ModeResult,
    cost_markdown,
    learning_rates_markdown,
    results_csv,
    results_markdown,
    write_tables,
)
from smat.model.backbone import create_builtin
from smat.runtime import checkpoint
from smat.runtime.distributed import World
from smat.runtime.io import save_config
from smat.training import Trainer

TINY = ["data.n_way=3", "data.k_shot=2", "data.q_query=2", "train.val_episodes=1", "train.tasks_per_epoch=4",
        "train.epochs=1", "device=cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "tiny"
    config = validate(load_config(None, TINY + [f"output={run}"]))
    torch.manual_seed(0)
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    with torch.no_grad():
        model.delta.normal_(0.0, 0.1)
    trainer = Trainer(config, run, torch.device("cpu"), World(), lambda *args, **kwargs: None, model=model)
    save_config(config, run / "config.yaml")
    checkpoint.save_backbone(run, model.backbone.state_dict())
    trainer.save(best=True)
    return run


def copy_run(run: Path, tmp_path: Path, **changes) -> Path:
    """A copy of ``run`` whose config.yaml has ``changes`` ({'model.num_experts': 4}) applied."""
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    values = yaml.safe_load((copy / "config.yaml").read_text())
    for key, value in changes.items():
        *path, last = key.split(".")
        section = values
        for part in path:
            section = section[part]
        section[last] = value
    (copy / "config.yaml").write_text(yaml.safe_dump(values))
    return copy


# ---------------------------------------------------------------- confidence interval


def test_confidence_interval_by_hand():
    values = [0.2, 0.4, 0.9]
    mean = (0.2 + 0.4 + 0.9) / 3
    std = math.sqrt(((0.2 - mean) ** 2 + (0.4 - mean) ** 2 + (0.9 - mean) ** 2) / (3 - 1))  # sample std
    assert metrics.confidence_interval(values) == pytest.approx((mean, 1.96 * std / math.sqrt(3)))
    assert metrics.confidence_interval([0.7]) == (pytest.approx(0.7), 0.0)
    with pytest.raises(ValueError):
        metrics.confidence_interval([])


# ---------------------------------------------------------------- tables


def _result(method, mode, domain, role, accuracies, run="r1"):
    return ModeResult(run, method, mode, domain, role, accuracies, seconds=1.0)


def test_results_table_cells_and_averages():
    results = [_result("smat", "protonet", "latin", "id", [0.5, 0.7]),
               _result("smat", "protonet", "shapes", "id", [0.9, 0.9]),
               _result("smat", "protonet", "digits", "ood", [0.4, 0.6]),
               _result("smat", "full", "latin", "id", [0.8, 0.8]),
               _result("smat", "full", "digits", "ood", [0.6, 0.6])]
    mean, ci = metrics.confidence_interval([0.5, 0.7])
    text = results_markdown(results)
    assert f"| latin | ID | {100 * mean:.2f} ± {100 * ci:.2f} | 80.00 ± 0.00 |" in text
    assert "| **ID average** | | **75.00** | **80.00** |" in text  # mean of the domains' means
    assert "| **OOD average** | | **50.00** | **60.00** |" in text
    assert "| shapes | ID | 90.00 ± 0.00 | — |" in text  # no full fine-tuning result for shapes
    rows = list(csv.reader(results_csv(results).splitlines()))
    assert rows[0] == ["domain", "role", "smat + protonet mean", "smat + protonet ci95", "smat + full mean",
                       "smat + full ci95", "group"]
    assert [row[0] for row in rows[1:]] == ["latin", "shapes", "digits", "id average", "ood average"]
    assert float(rows[1][2]) == pytest.approx(100 * mean, abs=1e-3)


def test_runs_of_the_same_method_get_their_folder_in_the_column():
    results = [_result("smat", "protonet", "latin", "id", [0.5], run="a"),
               _result("smat", "protonet", "latin", "id", [0.6], run="b"),
               _result("pmf", "protonet", "latin", "id", [0.7], run="c")]
    header = results_markdown(results).splitlines()[0]
    assert "smat [a] + protonet" in header and "smat [b] + protonet" in header and "| pmf + protonet |" in header


def test_learning_rates_are_listed_with_the_split_that_chose_them():
    results = [ModeResult("r1", "smat", "full", "latin", "id", [0.5], 1.0, lr=1e-3, lr_split="val"),
               ModeResult("r1", "smat", "lora", "digits", "ood", [0.5], 1.0, lr=1e-2, lr_split="test"),
               _result("smat", "protonet", "latin", "id", [0.5])]
    text = learning_rates_markdown(results)
    assert text.splitlines()[0] == "| domain | smat + full | smat + lora |"
    assert "| latin | 0.001 (val) | — |" in text and "| digits | — | 0.01 (test) |" in text


def test_cost_table_and_atomic_files(tmp_path):
    results = [_result("smat", "select", "latin", "id", [0.5, 0.7]), _result("smat", "select", "digits", "ood", [1.0])]
    costs = [ModeCost("r1", "smat", "select", tasks=3, seconds=1.5, peak_memory_bytes=3 * 2 ** 20,
                      memory_kind="cpu peak RSS increase")]
    assert "| smat + select | 0.500 | 3.0 | 80.00 | 3 | cpu peak RSS increase |" in cost_markdown(costs, results)
    paths = write_tables(results, costs, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == ["cost.csv", "cost.md", "results.csv", "results.md"]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary left


# ---------------------------------------------------------------- loading a run


def test_load_run_restores_the_best_checkpoint(run_dir):
    run = runs.load_run(run_dir, "cpu")
    tensors, _, state = checkpoint.load(checkpoint.resolve(run_dir, "best"))
    assert run.method == "smat" and run.state == state
    torch.testing.assert_close(run.model.delta.detach(), tensors["delta"])
    torch.testing.assert_close(run.model.log_alpha.detach(), tensors["log_alpha"])
    assert run.temperature == run.config.train.temperature.at(state["tasks_seen"])


def test_load_run_rejects_a_checkpoint_of_another_config(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path, **{"model.num_experts": 4})
    with pytest.raises(checkpoint.CheckpointError, match="num_experts"):
        runs.load_run(other, "cpu")


def test_load_run_rejects_a_backbone_of_another_shape(run_dir, tmp_path):
    other = copy_run(run_dir, tmp_path, **{"model.builtin.embed_dim": 64})
    with pytest.raises(checkpoint.CheckpointError, match="model.builtin.embed_dim: 64 there, 128 in the checkpoint"):
        runs.load_run(other, "cpu")  # the config as trained is recorded in the checkpoint: named before loading
    for state in other.glob("checkpoints/*/state.json"):  # a checkpoint written before the config was recorded
        values = json.loads(state.read_text())
        values.pop("config")
        state.write_text(json.dumps(values))
    with pytest.raises(checkpoint.CheckpointError, match="does not fit backbone"):
        runs.load_run(other, "cpu")  # the tensors' shapes are still checked


def test_load_run_names_a_missing_folder(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        runs.load_run(tmp_path / "nothing", "cpu")


# ---------------------------------------------------------------- learning-rate selection


def test_learning_rate_tasks_come_from_val_else_test(run_dir):
    from smat.data import episodes

    config = runs.read_run_config(run_dir)
    source = episodes.open_source(config)
    dataset, split = modes.lr_dataset(config, source, "latin", 2)
    assert split == "val" and len(dataset) == 2
    assert modes.lr_dataset(config, source, "digits", 2)[1] == "test"  # OOD: no val split


def test_choose_lr_takes_the_best_and_the_smallest_of_ties(monkeypatch):
    scores = {0.0: [0.5], 1e-3: [0.7, 0.7], 1e-2: [0.6, 0.8]}
    monkeypatch.setattr(modes, "run_tasks", lambda run, mode, dataset, lr, options, progress: (scores[lr], 0.0))
    lr, found = modes.choose_lr(None, "full", None, AdaptConfig(lr_grid=[0.0, 1e-3, 1e-2]))
    assert lr == 1e-3 and found == pytest.approx({0.0: 0.5, 1e-3: 0.7, 1e-2: 0.7})


def test_gradient_mode_searches_the_grid_per_domain(run_dir):
    run = runs.load_run(run_dir, "cpu", ["evaluate.episodes=1", "data.test_domains=[latin]"])
    options = AdaptConfig(steps=1, lr_grid=[0.0, 1e-3], lr_tasks=1)
    plan = modes.plan_run(run, ["full"], options)
    assert plan.tasks(["full"], options) == 1 + 2 * 1
    (result,), cost = modes.evaluate_mode(plan, "full", options)
    assert result.lr_split == "val" and set(result.lr_scores) == {0.0, 1e-3} and result.lr in result.lr_scores
    assert cost.tasks == 1 and cost.seconds > 0


def test_select_is_refused_for_a_method_without_sigmoid_scored_experts(tmp_path):
    config = validate(load_config(None, TINY + ["method=pretrained"]))
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size))
    run = runs.Run(tmp_path, config, model, {"tasks_seen": 0}, torch.device("cpu"))
    with pytest.raises(ConfigError, match="method pretrained"):
        modes.check_mode(run, "select")
    modes.check_mode(run, "full")


# ---------------------------------------------------------------- command line


def test_override_after_a_list_option_is_an_override():
    args = evaluate.parse_args(["--checkpoint", "runs/a", "adapt.steps=2", "--mode", "select", "full"])
    assert args.checkpoint == ["runs/a"] and args.overrides == ["adapt.steps=2"] and args.mode == ["select", "full"]


def test_cli_end_to_end(run_dir, tmp_path, capsys):
    out = tmp_path / "evaluation"
    code = evaluate.main(["--checkpoint", str(run_dir), "--datasets", "latin", "digits", "--mode", "protonet",
                          "select", "full", "lora", "--episodes", "1", "--output", str(out), "adapt.steps=1",
                          "adapt.lr=1e-3", "adapt.select_rounds=1"])
    assert code == 0
    assert "smat + lora" in capsys.readouterr().out
    rows = {row["domain"]: row for row in csv.DictReader((out / "results.csv").open())}
    assert set(rows) == {"latin", "digits", "id average", "far_ood average"}  # digits: far-OOD, the only OOD group
    for mode in ("protonet", "select", "full", "lora"):
        assert 0.0 <= float(rows["latin"][f"smat + {mode} mean"]) <= 100.0
    record = json.loads((out / "results.json").read_text())
    lora = [r for r in record["results"] if r["mode"] == "lora"]
    assert [r["lr"] for r in lora] == pytest.approx([1e-2, 1e-2])  # adapt.lr × 10
    assert {r["lr_split"] for r in lora} == {"fixed"}
    assert {c["mode"] for c in record["costs"]} == {"protonet", "select", "full", "lora"}
    assert "seconds per task" in (out / "cost.md").read_text()


@pytest.mark.parametrize("arguments, message", [
    (["--datasets", "no_such_domain"], "no domain 'no_such_domain'"),
    (["data.n_way=500"], "cannot draw 500-way"),
    (["adapt.select_rho=3"], "adapt.select_rho"),
    (["train.no_such_key=1"], "unknown config key"),
])
def test_cli_user_errors_exit_2_with_one_message(run_dir, tmp_path, capsys, arguments, message):
    code = evaluate.main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "out"), *arguments])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_module_entry_point_reports_a_missing_run(tmp_path):
    completed = subprocess.run([sys.executable, "-m", "smat.evaluate", "--checkpoint", str(tmp_path / "missing")],
                               capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
    assert completed.returncode == 2
    assert "does not exist" in completed.stderr and "Traceback" not in completed.stderr


def test_learning_rate_table_shows_per_task_choices():
    results = [ModeResult("a", "smat", "full", "latin", "id", [0.5], 1.0, 1e-3, "val", {}),
               ModeResult("a", "smat", "full", "digits", "ood", [0.5], 1.0, None, "support", {1e-3: 0.75, 0.0: 0.25})]
    table = learning_rates_markdown(results)
    assert "| latin | 0.001 (val) |" in table
    assert "| digits | per task (support): 0.001 × 75%, 0 × 25% |" in table
