"""Train the runs of a plan that are not finished, then evaluate every run on the same test tasks.

Training runs ``python -m smat.train`` in a subprocess per run (its output goes to
``<root>/logs/<name>.log``): a finished run is skipped, an interrupted one resumed from its checkpoint,
so a plan picks up where it stopped. Evaluation runs in this process and is cached in
``<root>/<name>/experiment_evaluation.json`` for the checkpoint and task count it was made with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..adapt import AdaptConfig
from ..analysis import AnalysisError, mask_overlap
from ..config import ConfigError
from ..data import DataError, episodes
from ..data.groups import in_group, record_group
from ..evaluation.modes import evaluate_mode, plan_run
from ..evaluation.runs import load_run
from ..runtime import checkpoint
from ..runtime.io import OutputError, atomic_write_json
from ..training import TrainingError
from .plan import ExperimentPlan, RunSpec

CACHE = "experiment_evaluation.json"


class ExperimentError(RuntimeError):
    """A run of the plan failed; the message names its log."""


@dataclass
class RunResult:
    """What the tables, figures and claims need from one evaluated run."""

    spec: RunSpec
    path: Path
    # {domain: {"role": "id" | "ood", "group": "id" | "near_ood" | "far_ood" | "ood", "accuracies": [per task]}},
    # the same tasks for every run
    domains: dict
    val_accuracy: float  # best validation accuracy (chooses among runs without looking at test tasks)
    sparsity: list[float] | None  # each expert's hard sparsity (masked methods)
    overlap: list[list[float]] | None  # IoU of the experts' hard masks [M, M] (masked methods)
    alpha: dict | None  # {domain: [[α per task]]}, evaluation-time merging weights (routed methods)
    mode: str = "protonet"

    @property
    def label(self) -> str:
        """The row's name in tables: the run, and its mode unless it is ProtoNet."""
        return self.spec.name if self.mode == "protonet" else f"{self.spec.name} + {self.mode}"

    def average(self, group: str) -> float:
        """Mean accuracy (%) over the domains of ``group`` ('id', 'near_ood', 'far_ood'; 'ood': every test-only
        domain), each domain weighted equally; NaN without such a domain."""
        means = [100 * sum(d["accuracies"]) / len(d["accuracies"]) for d in self.domains.values()
                 if in_group(record_group(d), group)]
        return sum(means) / len(means) if means else float("nan")


def training_state(run: Path) -> dict | None:
    """The latest checkpoint's state.json of a run folder; None before its first checkpoint."""
    try:
        return json.loads((checkpoint.resolve(run, "latest") / "state.json").read_text())
    except (checkpoint.CheckpointError, OSError, ValueError):
        return None


def is_trained(run: Path) -> bool:
    state = training_state(run)
    return state is not None and state["step"] >= state["total_steps"]


def train_run(plan: ExperimentPlan, spec: RunSpec, root: Path) -> None:
    """Train one run to its end: fresh, or resumed from its latest checkpoint."""
    run = root / spec.folder
    arguments = (["--resume", f"output={run}"] if training_state(run) is not None
                 else [*plan.arguments(spec), f"output={run}"])
    log = root / "logs" / f"{spec.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as stream:
        stream.write(f"$ python -m smat.train {' '.join(arguments)} --skip-eval\n")
        stream.flush()
        code = subprocess.call([sys.executable, "-m", "smat.train", *arguments, "--skip-eval"], stdout=stream,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-5:])
        raise ExperimentError(f"training run {spec.name} failed (exit {code}); its log is {log}:\n{tail}")


def check_reused(plan: ExperimentPlan, spec: RunSpec, root: Path) -> None:
    """A run already in the folder is reused only if it was trained with the config the plan would train: a run
    of the same name with other settings (another study's, older defaults) is an ExperimentError."""
    run = root / spec.folder
    recorded = (training_state(run) or {}).get("config")
    if not isinstance(recorded, dict):
        return
    expected = checkpoint.config_record(plan.config(spec, paths=False))
    differing = [f"{key}: {value!r} in the run, {expected.get(key)!r} in the plan" for key, value in recorded.items()
                 if key != "output" and expected.get(key, value) != value]
    if differing:
        raise ExperimentError(f"{run} holds a run trained with other settings than the plan's {spec.name} "
                              f"({'; '.join(differing[:3])}{' …' if len(differing) > 3 else ''}); give another "
                              f"--output folder, or move that run away")


def train_plan(plan: ExperimentPlan, root: Path, log=print) -> None:
    """Train every run of the plan that has not reached its last step (after checking that the runs already
    there were trained with the plan's settings)."""
    trained = plan.trained()
    for spec in trained:
        check_reused(plan, spec, root)
    missing = [spec for spec in trained if not is_trained(root / spec.folder)]
    if len(missing) < len(trained):
        log(f"{len(trained) - len(missing)} of {len(trained)} runs already trained; skipped")
    with tqdm(missing, desc=f"{plan.name}: train", unit="run", dynamic_ncols=True) as progress:
        for spec in progress:
            progress.set_postfix_str(spec.name)
            train_run(plan, spec, root)


@torch.no_grad()
def alpha_by_domain(run, datasets: dict) -> dict:
    """{domain: [α per test task]}: the hypernetwork's evaluation-time merging weights."""
    alphas = {}
    for name, dataset in datasets.items():
        rows = []
        for tasks in episodes.loader(dataset, run.config, meta_batch=run.config.train.meta_batch):
            rows += run.model.task_alpha([t.to(run.device) for t in tasks], run.temperature).cpu().tolist()
        alphas[name] = rows
    return alphas


def evaluate_run(plan: ExperimentPlan, spec: RunSpec, root: Path, device, progress=None,
                 mode: str = "protonet") -> RunResult:
    """Accuracy of one run's checkpoint (``spec.checkpoint``, default the best) under ``mode`` on
    ``plan.episodes`` test tasks per domain (of ``plan.test_domains``, default the run's); cached."""
    path = root / spec.folder
    state = training_state(path) or {}
    # "groups": evaluations cached before the test domains had groups (and the far-OOD domains) are redone
    key = {"episodes": plan.episodes, "step": state.get("step"),
           "best": checkpoint.resolve(path, spec.checkpoint).name, "groups": 1}
    overrides = [f"evaluate.episodes={plan.episodes}"]
    if plan.test_domains is not None:
        key["domains"] = list(plan.test_domains)
        overrides.append(f"data.test_domains={list(plan.test_domains)!r}")
    suffix = "".join(f"_{part}" for part in (mode if mode != "protonet" else "", plan.cache_tag,
                                               spec.checkpoint if spec.checkpoint != "best" else "") if part)
    cache = path / CACHE.replace(".json", f"{suffix}.json")
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            if progress is not None:
                progress.update(sum(len(d["accuracies"]) for d in stored["domains"].values()))
            return RunResult(spec, path, **{k: v for k, v in stored.items() if k != "key"}, mode=mode)
    run = load_run(path, device, overrides, spec.checkpoint)
    options = AdaptConfig()
    evaluation = plan_run(run, [mode], options)
    results, _ = evaluate_mode(evaluation, mode, options, progress)
    model = run.model
    record = {
        "domains": {r.domain: {"role": r.role, "group": r.domain_group, "accuracies": r.accuracies}
                    for r in results},
        "val_accuracy": float(run.state.get("best_val", float("nan"))),
        "sparsity": model.hard_sparsity().tolist() if model.masked else None,
        "overlap": mask_overlap(model.hard_masks().cpu()).tolist() if model.masked else None,
        "alpha": alpha_by_domain(run, evaluation.test) if model.routed and mode == "protonet" else None,
    }
    atomic_write_json(cache, {"key": key, **record})
    return RunResult(spec, path, **record, mode=mode)


def evaluate_plan(plan: ExperimentPlan, root: Path, device=None) -> list[RunResult]:
    """Every run of the plan under each of its modes, on the same test tasks, in plan order."""
    with tqdm(desc=f"{plan.name}: evaluate", unit="task", dynamic_ncols=True) as progress:
        return [evaluate_run(plan, spec, root, device, progress, mode) for spec in plan.runs for mode in spec.modes]


# what a plan's command reports as one `error:` line (a user's data, config, disk or a failed run)
USER_ERRORS = (AnalysisError, ConfigError, DataError, ExperimentError, OutputError, TrainingError,
               checkpoint.CheckpointError)


def run_command(work, output: str) -> int:
    """Exit code of a plan's command: 0, 2 with one `error:` line, or 130 on Ctrl-C with how to resume."""
    try:
        work()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume (finished runs are kept in {output})",
              file=sys.stderr)
        return 130
    return 0
