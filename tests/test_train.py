"""Meta-training (Algorithm 1): the query loss falls, gradients reach every trained tensor, λ follows its
constraint, a NaN step is skipped, a killed run resumes bit-identically, two processes match one, and the
default command runs end to end.

Every test uses the built-in backbone pre-trained for one epoch (``pretrain.epochs=1``): the session
fixture trains it once per machine into the smat cache (keyed by the pre-training config), and every test
and subprocess then loads it from there. Subprocesses run with one OpenMP thread so that two of them share
a 2-core machine without oversubscribing it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from smat.config import load_config, validate
from smat.model import protonet
from smat.model.backbone import create_builtin
from smat.runtime.distributed import World
from smat.runtime.io import ensure_writable_dir
from smat.train import main
from smat.training import Trainer, TrainingError, objective
from smat.training.lagrangian import SparsityMultipliers
from smat.training.pretrain import pretrained_builtin

TINY = ["pretrain.epochs=1", "device=cpu", "train.tasks_per_epoch=8", "train.val_episodes=1"]
TIMEOUT = 600  # seconds a subprocess may take before the test fails (a tiny run takes well under a minute)


@pytest.fixture(scope="session")
def pretrained_backbone() -> Path:
    """The built-in backbone pre-trained for one epoch, in the cache every test and subprocess reads."""
    return pretrained_builtin(load_config(None, ["pretrain.epochs=1"]), log=lambda *args: None)


def make_trainer(run: Path, *overrides: str, log=lambda *args, **kwargs: None) -> Trainer:
    config = validate(load_config(None, [*TINY, f"output={run}", *overrides]))
    return Trainer(config, ensure_writable_dir(run), torch.device("cpu"), World(), log=log)


def first_batch(trainer: Trainer):
    return next(iter(trainer.batches()))


def trained_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.tensors().items()}


def is_power_iterate(name: str) -> bool:
    return name.endswith(("._u", "._v"))


# --------------------------------------------------------------------------
# one step of Algorithm 1
# --------------------------------------------------------------------------


def test_a_few_steps_reduce_the_query_loss(tmp_path):
    """Five calls on one fixed meta-batch with the step counter held at 0, so that every call draws the
    same Gumbel and mask noise and only the parameters change; each call reports the query CE before its
    update. θ_δ's learning rate is raised from 1e-3 to 3e-2 so that four updates move the loss clearly.

    The backbone is the built-in ViT at a seeded random initialisation with the linear patch embedding,
    whose features differ between images (mean cosine 0.73): one epoch of the built-in pre-training leaves
    the conv-stem backbone's features collinear (cosine 0.99996) and every prediction at ln 5, which no step
    can move (docs/results/builtin_pretraining.md). Measured: the CE falls 2.46 → 1.61; the test asks 0.3."""
    torch.manual_seed(0)
    arch = load_config(None, ["model.builtin.stem=patch"]).model
    weights = tmp_path / "random_patch_vit.safetensors"
    save_file(create_builtin(arch.builtin, arch.image_size).state_dict(), str(weights))
    trainer = make_trainer(tmp_path / "run", "train.delta_lr=3e-2", "train.warmup_fraction=0", "train.epochs=1",
                           "train.tasks_per_epoch=400", "train.alignment_every=0", "model.builtin.stem=patch",
                           f"model.weights={weights}")
    tasks = first_batch(trainer)
    records = [trainer.train_step(tasks) for _ in range(5)]
    losses = [record["ce"] for record in records]
    assert not any(record["skipped"] for record in records)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, f"query CE per step: {losses}"


def test_gradients_reach_delta_log_alpha_and_the_hypernetwork(tmp_path, pretrained_backbone):
    """With θ_δ = 0 (its initial value) the masks and α have no effect on θ_i, so θ_δ gets a small random
    value first. λ = 0 and no logit penalty: the only way to log_α, the keys and the tokens is through
    the merge θ_i = θ_pre + θ_δ ⊙ Σ_m α_i,m z_m."""
    trainer = make_trainer(tmp_path, "train.hyper_penalty=0", "train.alignment_every=0")
    model = trainer.model
    with torch.no_grad():
        model.delta.copy_(1e-3 * torch.randn(model.delta.shape, generator=torch.Generator().manual_seed(0)))
    out = trainer.objective(first_batch(trainer), 0, 1, trainer.temperature(), trainer.multipliers)
    out["loss"].backward()
    reached = {"delta": model.delta, "log_alpha": model.log_alpha, "hypernet.keys": model.hypernet.keys,
               "hypernet.tokens": model.hypernet.tokens,
               **{f"hypernet.{name}": p for name, p in model.hypernet.named_parameters()}}
    for name, parameter in reached.items():
        assert parameter.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(parameter.grad).all(), f"non-finite gradient of {name}"
        assert parameter.grad.abs().max() > 0, f"the gradient of {name} is 0"
    assert all(p.grad is None for p in model.backbone.parameters()), "θ_pre must stay frozen"


def test_without_the_split_the_support_step_and_the_loss_see_the_pooled_images(tmp_path, pretrained_backbone,
                                                                               monkeypatch):
    """Table 2's 'no split' ablation (train.support_query_split=false): the support step, the prototypes
    and the query loss all run on the union of each task's support and query images."""
    seen = {"support": [], "query": []}
    support_loss, query_logits = objective.support_loss, protonet.query_logits

    def recording_support_loss(model, parameters, tasks, *args):
        seen["support"].extend((len(t.support_y), len(t.query_y)) for t in tasks)
        return support_loss(model, parameters, tasks, *args)

    def recording_query_logits(model, parameters, tasks, *args):
        seen["query"].extend((len(t.support_y), len(t.query_y)) for t in tasks)
        return query_logits(model, parameters, tasks, *args)

    monkeypatch.setattr(objective, "support_loss", recording_support_loss)
    monkeypatch.setattr(protonet, "query_logits", recording_query_logits)
    trainer = make_trainer(tmp_path, "train.support_query_split=false", "train.alignment_every=0")
    tasks = first_batch(trainer)
    record = trainer.train_step(tasks)
    assert not record["skipped"] and torch.isfinite(torch.tensor(record["ce"]))
    pooled = [(len(t.support_y) + len(t.query_y),) * 2 for t in tasks]
    assert seen["support"] == pooled
    assert seen["query"][:len(tasks)] == pooled
    for task in tasks:
        union = task.pooled()
        assert torch.equal(union.support_x, union.query_x)
        assert torch.equal(union.support_y, torch.cat([task.support_y, task.query_y]))


@pytest.mark.parametrize("method", ["smat", "pmf"])
def test_the_reports_paired_pass_gives_each_models_own_accuracies(tmp_path, pretrained_backbone, method):
    """The report tests the model and the pre-trained backbone in one pass over the tasks, the router's
    prototypes taken from the pre-trained features of [support; query]: the same accuracies as testing each
    on its own. θ_δ is given a random value, so that the model is not the backbone."""
    trainer = make_trainer(tmp_path, f"method={method}")
    with torch.no_grad():
        trainer.model.delta.copy_(0.05 * torch.randn(trainer.model.delta.shape,
                                                     generator=torch.Generator().manual_seed(1)))
    tasks = first_batch(trainer)
    own, pretrained = protonet.paired_task_accuracies(trainer.model, tasks, 1.0)
    assert own == protonet.task_accuracies(trainer.model, tasks, 1.0)
    assert pretrained == protonet.task_accuracies(trainer.model, tasks, 1.0, pretrained=True)
    assert own != pretrained, "the random θ_δ should change some task's accuracy"


# --------------------------------------------------------------------------
# the Lagrange multipliers
# --------------------------------------------------------------------------


def test_lambda_rises_while_violated_weighted_by_mean_alpha_and_resets_once_met():
    multipliers = SparsityMultipliers(3, tau=0.9, lr=0.5)
    # violations g = density − (1 − τ): expert 0 +0.4, expert 1 +0.2 (too dense), expert 2 −0.05 (sparse enough)
    density = torch.tensor([0.5, 0.3, 0.05])
    mean_alpha = torch.tensor([0.6, 0.1, 0.3])
    multipliers.ascend(density, mean_alpha)
    torch.testing.assert_close(multipliers.value, torch.tensor([0.12, 0.01, 0.0], dtype=torch.float64))
    multipliers.ascend(density, mean_alpha)
    torch.testing.assert_close(multipliers.value, torch.tensor([0.24, 0.02, 0.0], dtype=torch.float64))
    multipliers.ascend(density, torch.tensor([0.0, 0.0, 1.0]))  # no task used experts 0 and 1: λ holds
    torch.testing.assert_close(multipliers.value, torch.tensor([0.24, 0.02, 0.0], dtype=torch.float64))

    multipliers.ascend(torch.tensor([0.05, 0.3, 0.05]), mean_alpha)  # expert 0 now meets its constraint
    torch.testing.assert_close(multipliers.value, torch.tensor([0.0, 0.03, 0.0], dtype=torch.float64))


def test_the_penalty_pushes_each_expert_with_its_lambda():
    multipliers = SparsityMultipliers(3, tau=0.9, lr=1.0)
    multipliers.load_state_dict({"lambda": torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)})
    density = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)
    penalty = multipliers.penalty(density)
    torch.testing.assert_close(penalty, torch.tensor(0.5 * 0.4 + 2.0 * 0.1))
    penalty.backward()
    torch.testing.assert_close(density.grad, torch.tensor([0.5, 0.0, 2.0]))


def test_lambda_becomes_positive_in_a_run_with_a_high_tau(tmp_path, pretrained_backbone):
    """τ = 0.99 while the experts start at density ≈ 0.8: every constraint is violated from step 0."""
    trainer = make_trainer(tmp_path, "train.tau=0.99", "train.epochs=1")
    assert bool((trainer.model.expected_density() > 0.01).all())
    trainer.fit()
    assert trainer.step == 2
    assert bool((trainer.multipliers.value > 0).all()), trainer.multipliers.value
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(value > 0 for value in [r for r in logged if r["kind"] == "train"][-1]["lambda"])
    saved = load_file(str(tmp_path / "checkpoints" / "step-0000002" / "trainable.safetensors"))
    assert torch.equal(saved["lambda"], trainer.multipliers.value)


# --------------------------------------------------------------------------
# NaN and inf
# --------------------------------------------------------------------------


def poison(trainer: Trainer, monkeypatch, value: float) -> None:
    """From now on the objective's loss is ``loss + value`` (NaN or inf): the gradients stay finite, so
    only the check on the loss can catch it."""
    objective = trainer.objective

    def forward(*args):
        out = objective(*args)
        out["loss"] = out["loss"] + value
        return out

    monkeypatch.setattr(trainer, "objective", forward)


def test_a_nonfinite_loss_skips_the_step_and_counts_it(tmp_path, pretrained_backbone, monkeypatch):
    messages: list[str] = []
    trainer = make_trainer(tmp_path, "train.alignment_every=0", log=messages.append)
    tasks = first_batch(trainer)
    before = trained_tensors(trainer)
    with monkeypatch.context() as patch:
        poison(trainer, patch, float("nan"))
        assert trainer.train_step(tasks)["skipped"]
    after = trained_tensors(trainer)
    # the spectral norm's power iteration (its _u, _v buffers) advances in every training-mode forward;
    # what the optimisers and λ hold must not move
    changed = [name for name in before if not torch.equal(before[name], after[name]) and not is_power_iterate(name)]
    assert not changed, f"a skipped step changed {changed}"
    assert all(not optimizer.state for optimizer in trainer.optimizers.values())
    assert trainer.schedules["delta"].last_epoch == 0
    assert (trainer.nonfinite_total, trainer.nonfinite_run) == (1, 1)
    assert messages and "loss is nan; step skipped" in messages[-1]

    assert not trainer.train_step(tasks)["skipped"]  # the objective is clean again
    assert not torch.equal(before["delta"], trainer.model.delta.detach())
    assert (trainer.nonfinite_total, trainer.nonfinite_run) == (1, 0)
    assert trainer.state()["nonfinite_total"] == 1


def test_a_persistent_nonfinite_loss_stops_training(tmp_path, pretrained_backbone, monkeypatch):
    trainer = make_trainer(tmp_path, "train.max_nonfinite=3", "train.epochs=3", "train.alignment_every=0")
    poison(trainer, monkeypatch, float("inf"))
    with pytest.raises(TrainingError, match="NaN or infinite for 3 steps in a row") as error:
        trainer.fit()
    assert "train.delta_lr" in str(error.value) and "precision=fp32" in str(error.value)
    assert str(tmp_path / "checkpoints") in str(error.value)
    assert trainer.nonfinite_total == 3


# --------------------------------------------------------------------------
# the command, in subprocesses
# --------------------------------------------------------------------------


@pytest.fixture
def processes():
    """Subprocesses a test starts; any still running when it ends (a failure) are killed."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def start(processes: list, command: list[str], log: Path, threads: int | None = 1) -> subprocess.Popen:
    # the environment as it is, and a working folder outside the source tree: the subprocess imports the
    # package the tests import (the installed one in CI, whose compiled kernels the source tree lacks)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    with log.open("w") as file:
        process = subprocess.Popen(command, stdout=file, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    process.log = log
    processes.append(process)
    return process


def finish(process: subprocess.Popen) -> None:
    try:
        code = process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        pytest.fail(f"{' '.join(process.args)} ran for more than {TIMEOUT} s:\n{tail(process.log)}")
    assert code == 0, f"{' '.join(process.args)} exited with {code}:\n{tail(process.log)}"


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def train_command(run: Path, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "smat.train", *arguments, f"output={run}"]


def final_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "trainable.safetensors"))


def replayable_records(run: Path) -> list[dict]:
    """metrics.jsonl without its timings, which differ between any two runs."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tasks_per_second"} for record in records]


def test_a_killed_run_resumes_bit_identically(tmp_path, pretrained_backbone, processes, capsys):
    """Run A trains 3 epochs of 2 steps without a break; run B is SIGKILLed once its first checkpoint
    exists, then resumed with --resume. Both run at once (one thread each) on the same config."""
    options = [*TINY, "train.epochs=3", "train.log_every=1", "--skip-eval"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    tmp_path.joinpath("logs").mkdir()
    run_a = start(processes, train_command(straight, *options), tmp_path / "logs" / "a.log")
    run_b = start(processes, train_command(killed, *options), tmp_path / "logs" / "b.log")

    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + TIMEOUT
    while not latest.exists():
        assert run_b.poll() is None, f"run B ended before its first checkpoint:\n{tail(run_b.log)}"
        assert time.monotonic() < deadline, f"no checkpoint after {TIMEOUT} s:\n{tail(run_b.log)}"
        time.sleep(0.02)
    assert run_b.poll() is None, "run B finished before it could be killed"
    run_b.kill()
    assert run_b.wait() == -signal.SIGKILL
    interrupted_at = latest.read_text().strip()
    assert interrupted_at != "step-0000006", "run B was killed after its last checkpoint"

    resumed = start(processes, train_command(killed, "--resume", *options), tmp_path / "logs" / "resumed.log")
    finish(resumed)
    finish(run_a)
    assert f"resumed from {killed / 'checkpoints' / interrupted_at}" in resumed.log.read_text()

    expected, found = final_tensors(straight, 6), final_tensors(killed, 6)
    assert sorted(found) == sorted(expected)
    different = [name for name in expected if not torch.equal(found[name], expected[name])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    assert replayable_records(killed) == replayable_records(straight)

    # the finished run is not started again by accident
    assert main(train_command(killed, *options)[3:]) == 2
    assert "already holds a run; resume it with --resume" in capsys.readouterr().err


def test_two_processes_match_one(tmp_path, pretrained_backbone, processes):
    """torchrun with 2 processes (gloo) against one process, 2 steps of a meta-batch of 4 tasks.

    Each process sums the gradients of its 2 tasks and gloo adds the two halves, where one process adds
    the 4 tasks in another order (and runs the hypernetwork on a batch of 4, not 2): float32 rounding,
    ~1e-7 of each value, which the second step amplifies through α, the masks (log_α's learning rate is
    1e6) and AdamW's normalisation; the largest difference seen is 1.5e-5 of a tensor's largest magnitude
    (θ_δ). The tolerance, 1e-4 of that magnitude, leaves a factor of 7 and still fails for a task that is
    dropped or counted twice, which changes the update by about a quarter."""
    options = [*TINY, "train.epochs=1", "--skip-eval"]
    tmp_path.joinpath("logs").mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "smat.train"]
    two = start(processes, [*torchrun, *options, f"output={tmp_path / 'two'}"], tmp_path / "logs" / "two.log")
    one = start(processes, train_command(tmp_path / "one", *options), tmp_path / "logs" / "one.log")
    finish(two)
    finish(one)
    expected, found = final_tensors(tmp_path / "one", 2), final_tensors(tmp_path / "two", 2)
    assert sorted(found) == sorted(expected)
    for name, tensor in expected.items():
        scale = float(tensor.abs().max())
        torch.testing.assert_close(found[name], tensor, rtol=0, atol=1e-4 * scale,
                                   msg=lambda message, name=name: f"{name}: {message}")
    assert not torch.equal(expected["delta"], torch.zeros_like(expected["delta"]))


def test_the_default_command_end_to_end(tmp_path, pretrained_backbone, processes):
    run = tmp_path / "run"
    command = train_command(run, "train.epochs=1", "train.tasks_per_epoch=8", "train.val_episodes=2",
                            "evaluate.episodes=2", "pretrain.epochs=1")
    finish(start(processes, command, tmp_path / "train.log", threads=None))
    for name in ("report.md", "report.json", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), f"{name} is missing from {run}"
    assert sorted(p.name for p in (run / "plots").glob("*.png")), "no plots"
    report = json.loads((run / "report.json").read_text())
    assert set(report["summary"]["averages"]) == {"id", "near_ood", "far_ood", "ood"}
    assert report["groups"]["digits"] == "far_ood" and report["groups"]["braille"] == "near_ood"
    assert "| digits | far-OOD |" in (run / "report.md").read_text()
    kinds = {record["kind"] for record in replayable_records(run)}
    assert {"train", "val"} <= kinds
