"""Meta-testing: accuracy per task on test episodes, mean ± 95% confidence interval, and the
``python -m smat.evaluate`` command.

ProtoNet (no adaptation): each task's weights are merged from the
hypernetwork's evaluation-time α (sigmoid(logits / T)) and the deterministic
masks; class prototypes are the support features' means; queries are
classified by cosine similarity. The B tasks of a batch are merged in one
kernel call. The other modes (Algorithm 2's expert selection, Algorithm 3's
full fine-tuning, LoRA) live in :mod:`smat.adapt`.

    python -m smat.evaluate --checkpoint RUN [RUN ...] [--datasets D ...]
        [--mode protonet|select|full|lora ...] [--episodes N] [--output DIR] [key=value ...]

``key=value`` overrides the runs' configs (``data.n_way=5``, ``device=cpu``)
or the adaptation options (``adapt.steps=50``, ``adapt.lr_grid=[0,1e-4]``,
see :class:`smat.adapt.AdaptConfig`). For full fine-tuning and LoRA the
learning rate is chosen per domain from ``adapt.lr_grid`` by mean query
accuracy on the first ``adapt.lr_tasks`` tasks of the domain's val split;
a domain without a val split (every OOD domain) uses its first test tasks,
which are then also among the tasks it is tested on (``lr_split`` in
results.json says which). Writes results.md/csv (Table 1), cost.md/csv
(Table 5) and results.json (every task's accuracy) into ``--output``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, episodes, methods, objective, tables
from .adapt import GRADIENT_MODES, MODES, AdaptConfig, validate_adapt
from .adapt.cost import PeakMemory, Stopwatch
from .adapt.finetune import backbone_accuracy, full_finetune
from .adapt.lora import lora_finetune, require_peft
from .adapt.select import select_experts, selection_accuracy
from .backbone import create_backbone
from .config import Config, ConfigError, from_dict, merge_values, parse_override, validate
from .io import OutputError, atomic_write_json, ensure_writable_dir


def confidence_interval(values) -> tuple[float, float]:
    """(mean, 1.96·std/√n) of per-task accuracies, both in the values' unit; n = 1 gives an interval of 0."""
    values = np.asarray(list(values), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no tasks to summarise")
    spread = values.std(ddof=1) if values.size > 1 else 0.0
    return float(values.mean()), float(1.96 * spread / math.sqrt(values.size))


def _autocast(device: torch.device, config):
    from .train import precision_dtype

    dtype = precision_dtype(config, device) if config is not None else None
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _accuracies(logits: list[torch.Tensor], tasks) -> list[float]:
    return [float((out.argmax(-1) == t.query_y).float().mean()) for out, t in zip(logits, tasks, strict=True)]


@torch.no_grad()
def protonet_accuracies(model, loader, temperature: float, device, config=None, pretrained: bool = False):
    """ProtoNet query accuracy of every task of ``loader`` (batches of tasks).

    The tasks' weights are ``model.task_parameters(tasks, temperature)`` ([B, N], one merge for the
    batch), or the pre-trained backbone's when ``pretrained`` (or when the model returns None)."""
    model.eval()
    results = []
    for batch in loader:
        tasks = [t.to(device) for t in (batch if isinstance(batch, list) else [batch])]
        with _autocast(device, config):
            theta = None if pretrained else model.task_parameters(tasks, temperature)
            results += _accuracies(objective.query_logits(model, theta, tasks), tasks)
    return results


# --------------------------------------------------------------------------
# a trained run
# --------------------------------------------------------------------------


@dataclass
class Run:
    """A run folder's model with its best checkpoint loaded, ready for meta-testing."""

    path: Path
    config: Config
    model: nn.Module
    state: dict  # the checkpoint's state.json
    device: torch.device

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def temperature(self) -> float:
        """The hypernetwork's temperature where the checkpoint was taken (its evaluation form uses it)."""
        return self.config.train.temperature.at(self.state.get("tasks_seen", 0))

    @property
    def parallel(self) -> str:
        """How the backbones of several weight rows run: 'loop' or 'vmap' (``train.task_parallel``)."""
        from .train import choose_parallel

        return choose_parallel(self.config)

    @property
    def precision(self) -> torch.dtype | None:
        from .train import precision_dtype

        return precision_dtype(self.config, self.device)


def read_run_config(run_dir: str | Path, overrides=()) -> Config:
    """The config a run was trained with (``<run>/config.yaml``), with ``key=value`` overrides applied."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise checkpoint.CheckpointError(f"run folder {run} does not exist; give the output folder of "
                                         f"`python -m smat.train` (its output=PATH)")
    path = run / "config.yaml"
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{run} has no config.yaml, so it is not a folder written by "
                                         f"`python -m smat.train`")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    config = from_dict(values)
    for text in overrides:
        merge_values(config, parse_override(text), "")  # the config's own rules: types, unknown-key hints
    return validate(config)


def resolve_device(config: Config) -> torch.device:
    from .distributed import World
    from .train import resolve_device as train_device

    return train_device(config, World())


def load_run(run_dir: str | Path, device: torch.device | str | None = None, overrides=()) -> Run:
    """Rebuild a run's model: backbone from ``<run>/backbone.safetensors``, the method's model over it,
    and the trained tensors of the ``best`` checkpoint. ``device=None``: the run config's device.

    A checkpoint that does not fit the config (another backbone, M, method or shapes) raises
    :class:`smat.checkpoint.CheckpointError` saying what differs."""
    from .train import check_compatible

    run = Path(run_dir).expanduser()
    config = read_run_config(run, overrides)
    device = torch.device(device) if device is not None else resolve_device(config)
    weights = run / "backbone.safetensors"
    if not weights.is_file():
        raise checkpoint.CheckpointError(f"{run} has no backbone.safetensors (θ_pre of the run); it is not a "
                                         f"complete training run")
    folder = checkpoint.resolve(run, "best")
    tensors, _, state = checkpoint.load(folder, map_location=device)
    model = methods.build(config, create_backbone(config.model, weights=weights)).to(device)
    check_compatible(state, model, config, folder)
    try:
        model.load_trainable_tensors(tensors)
    except (KeyError, RuntimeError, ValueError) as error:
        raise checkpoint.CheckpointError(f"checkpoint {folder} does not fit the model of {run / 'config.yaml'}: "
                                         f"{str(error).splitlines()[0]}") from None
    return Run(run, config, model.eval(), state, device)


# --------------------------------------------------------------------------
# the modes on a batch of tasks
# --------------------------------------------------------------------------


def task_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The random stream of task ``index``: the same whichever tasks run before it."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & ((1 << 63) - 1))


def _task_theta(run: Run, task) -> torch.Tensor | None:
    """θ_i [N] of one task (None where the model has no task weights: the pre-trained backbone)."""
    theta = run.model.task_parameters([task], run.temperature)
    return None if theta is None else theta[0]


def _protonet(run: Run, tasks, lr, options: AdaptConfig, indices) -> list[float]:
    theta = run.model.task_parameters(tasks, run.temperature)
    return _accuracies(objective.query_logits(run.model, theta, tasks, run.parallel), tasks)


def _select(run: Run, tasks, lr, options: AdaptConfig, indices) -> list[float]:
    accuracies = []
    for task, index in zip(tasks, indices, strict=True):
        selection = select_experts(run.model, task, run.temperature, options.select_rounds, options.select_rho,
                                   task_generator(options.seed, index, torch.device("cpu")), run.parallel)
        accuracies.append(selection_accuracy(run.model, task, selection, run.parallel))
    return accuracies


def _fine_tuning(method):
    def adapt(run: Run, tasks, lr, options: AdaptConfig, indices) -> list[float]:
        # a run trained without flips (glyphs: a mirrored character is another one) is not fine-tuned with them
        options = dataclasses.replace(options, augment_flip=options.augment_flip and run.config.data.train_flip)
        accuracies = []
        for task, index in zip(tasks, indices, strict=True):
            tuned = method(run.model, _task_theta(run, task), task, lr, options,
                           task_generator(options.seed, index, run.device), run.precision)
            accuracies.append(backbone_accuracy(tuned.backbone, task, run.model.protonet_scale, run.precision))
        return accuracies
    return adapt


# mode → f(run, tasks on the device, lr, options, task indices) → query accuracy per task
MODE_RUNNERS = {"protonet": _protonet, "select": _select, "full": _fine_tuning(full_finetune),
                "lora": _fine_tuning(lora_finetune)}


# Algorithm 2 searches α' ∈ {0, 1}^M from rounded sigmoid scores, merged as α = α' / Σ α': the methods whose
# hypernetwork scores experts that way (SoftMerge's softmax router and the expert-free baselines do not)
SELECTABLE_METHODS = ("smat", "smat_independent")


def check_mode(run: Run, mode: str) -> None:
    if mode == "lora":
        require_peft()
    if mode == "select" and run.method not in SELECTABLE_METHODS:
        raise ConfigError(f"mode select (Algorithm 2) chooses among sigmoid-scored sparse experts, which run "
                          f"{run.path} (method {run.method}) does not have; it applies to method "
                          f"{' or '.join(SELECTABLE_METHODS)}. Use --mode protonet, full or lora for this run.")


def run_tasks(run: Run, mode: str, dataset, lr: float | None, options: AdaptConfig, progress=None):
    """(query accuracy per task, seconds) of ``mode`` over every task of ``dataset``; the seconds cover
    adaptation and prediction only (not loading the episodes)."""
    batch = run.config.train.meta_batch if mode == "protonet" else 1
    watch = Stopwatch(run.device)
    accuracies: list[float] = []
    for tasks in episodes.loader(dataset, run.config, meta_batch=batch):
        tasks = [t.to(run.device) for t in tasks]
        indices = range(len(accuracies), len(accuracies) + len(tasks))
        with watch, _autocast(run.device, run.config):
            accuracies += MODE_RUNNERS[mode](run, tasks, lr, options, indices)
        if progress is not None:
            progress.update(len(tasks))
    return accuracies, watch.seconds


# --------------------------------------------------------------------------
# learning rates and a whole evaluation
# --------------------------------------------------------------------------


def lr_dataset(config: Config, source, domain: str, count: int):
    """(dataset, split) of the first ``count`` tasks that choose a domain's learning rate: its val split
    where it has one that can make tasks of the configured way and shot, else its first test tasks."""
    if source[domain].classes("val"):
        try:
            return episodes.eval_dataset(config, source, domain, "val", count,
                                         config.seed + episodes.VAL_SEED_OFFSET), "val"
        except ConfigError:
            pass  # too few val classes for the way: fall back to the test split
    return episodes.eval_dataset(config, source, domain, "test", count, config.evaluate.seed), "test"


def choose_lr(run: Run, mode: str, dataset, options: AdaptConfig, progress=None) -> tuple[float, dict]:
    """The rate of ``options.learning_rates(mode)`` with the highest mean query accuracy on ``dataset``
    (ties: the first, i.e. the smallest); returns (rate, {rate: mean accuracy})."""
    scores = {}
    for rate in options.learning_rates(mode):
        scores[rate] = float(np.mean(run_tasks(run, mode, dataset, rate, options, progress)[0]))
    return max(scores, key=scores.get), scores


@dataclass
class Plan:
    """What one run is evaluated on: its test datasets and, per domain, the tasks that choose the lr."""

    run: Run
    test: dict  # {domain: EpisodeDataset}
    lr_sets: dict  # {domain: (EpisodeDataset, split)}
    roles: dict  # {domain: 'id' | 'ood'}

    def tasks(self, modes, options: AdaptConfig) -> int:
        total = 0
        for mode in modes:
            searched = mode in GRADIENT_MODES and len(options.learning_rates(mode)) > 1
            for domain, dataset in self.test.items():
                total += len(dataset) + (len(options.learning_rates(mode)) * len(self.lr_sets[domain][0])
                                         if searched else 0)
        return total


def plan_run(run: Run, modes, options: AdaptConfig) -> Plan:
    """Everything a user can get wrong about a run (unknown domain, too few classes, a mode the method
    lacks) raises here, before any evaluation starts."""
    for mode in modes:
        check_mode(run, mode)
    source = episodes.open_source(run.config)
    test = episodes.test_datasets(run.config, source)
    lr_sets = {name: lr_dataset(run.config, source, name, options.lr_tasks) for name in test}
    roles = {name: episodes.domain_role(name, source) for name in test}
    return Plan(run, test, lr_sets, roles)


def evaluate_mode(plan: Plan, mode: str, options: AdaptConfig, progress=None):
    """([ModeResult per domain], ModeCost) of one run under one mode.

    The cost's seconds are those of the test tasks only; its peak memory covers the learning-rate
    search too (a task costs the same memory whichever split it comes from)."""
    run, results, seconds = plan.run, [], 0.0
    with PeakMemory(run.device) as memory:
        for domain, dataset in plan.test.items():
            lr, split, scores = None, None, {}
            if mode in GRADIENT_MODES:
                rates = options.learning_rates(mode)
                lr, split = rates[0], "fixed"
                if len(rates) > 1:
                    _describe(progress, run, mode, domain, "choosing lr")
                    lr_set, split = plan.lr_sets[domain]
                    lr, scores = choose_lr(run, mode, lr_set, options, progress)
            _describe(progress, run, mode, domain, "test")
            accuracies, elapsed = run_tasks(run, mode, dataset, lr, options, progress)
            seconds += elapsed
            results.append(tables.ModeResult(run.name, run.method, mode, domain, plan.roles[domain], accuracies,
                                              elapsed, lr, split, scores))
    tasks = sum(len(r.accuracies) for r in results)
    return results, tables.ModeCost(run.name, run.method, mode, tasks, seconds, memory.bytes, memory.kind)


def _describe(progress, run: Run, mode: str, domain: str, phase: str) -> None:
    if progress is not None:
        progress.set_description(f"{run.name} {mode} {domain}")
        progress.set_postfix_str(phase)


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smat.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="RUN",
                        help="run folders written by `python -m smat.train` (their best checkpoint is used)")
    parser.add_argument("--datasets", nargs="+", metavar="DOMAIN", help="test domains (default: the runs' "
                        "data.test_domains, else every ID and OOD domain of the source)")
    parser.add_argument("--mode", nargs="+", default=["protonet"], choices=MODES,
                        help="protonet: no adaptation; select: Algorithm 2; full: Algorithm 3; lora: LoRA")
    parser.add_argument("--episodes", type=int, metavar="N", help="test episodes per domain (evaluate.episodes)")
    parser.add_argument("--output", metavar="DIR", help="where the tables go (default: <first run>/evaluation)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides (data.n_way=5, device=cpu) and adaptation options (adapt.steps=50)")
    args = parser.parse_intermixed_args(argv)
    # `--checkpoint RUN key=value`: nargs="+" swallows the overrides that follow a list option
    for name in ("checkpoint", "datasets"):
        values = getattr(args, name) or []
        args.overrides = [v for v in values if OVERRIDE.match(v) and not Path(v).exists()] + args.overrides
        setattr(args, name, [v for v in values if not (OVERRIDE.match(v) and not Path(v).exists())] or None)
    if not args.checkpoint:
        parser.error("--checkpoint needs at least one run folder")
    if args.episodes is not None and args.episodes < 1:
        parser.error(f"--episodes must be a positive integer; got {args.episodes}")
    return args


def split_overrides(overrides) -> tuple[list[str], AdaptConfig]:
    """Config overrides for the runs, and the adaptation options built from the ``adapt.*`` ones."""
    options = AdaptConfig()
    rest = []
    for text in overrides:
        if text.startswith("adapt."):
            merge_values(options, parse_override(text.removeprefix("adapt.")), "adapt.")
        else:
            rest.append(text)
    return rest, validate_adapt(options)


def load_plans(args, overrides, options: AdaptConfig, log=print) -> list[Plan]:
    extra = list(overrides)
    if args.datasets:
        extra.append(f"data.test_domains={args.datasets!r}")
    if args.episodes:
        extra.append(f"evaluate.episodes={args.episodes}")
    plans = []
    for path in args.checkpoint:
        run = load_run(path, None, extra)
        log(f"{run.path}: method {run.method}, step {run.state.get('step')} (best checkpoint), on {run.device}")
        plans.append(plan_run(run, args.mode, options))
    return plans


def evaluate_plans(plans: list[Plan], modes, options: AdaptConfig):
    results, costs = [], []
    total = sum(plan.tasks(modes, options) for plan in plans)
    with tqdm(total=total, desc="evaluate", unit="task", dynamic_ncols=True) as progress:
        for plan in plans:
            for mode in modes:
                mode_results, cost = evaluate_mode(plan, mode, options, progress)
                results += mode_results
                costs.append(cost)
    return results, costs


def write_outputs(folder: Path, plans: list[Plan], results, costs, options: AdaptConfig) -> dict:
    paths = tables.write_tables(results, costs, folder)
    record = {"runs": {plan.run.name: {"path": str(plan.run.path), "method": plan.run.method,
                                       "checkpoint": plan.run.state, "config": plan.run.config.to_dict()}
                       for plan in plans},
              "adapt": asdict(options),
              "results": [{**asdict(r), "lr_scores": {str(k): v for k, v in r.lr_scores.items()}} for r in results],
              "costs": [{**asdict(c), "seconds_per_task": c.seconds_per_task} for c in costs]}
    paths["results.json"] = folder / "results.json"
    atomic_write_json(paths["results.json"], record)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides, options = split_overrides(args.overrides)
        plans = load_plans(args, overrides, options)
        folder = ensure_writable_dir(args.output or Path(args.checkpoint[0]).expanduser() / "evaluation")
        results, costs = evaluate_plans(plans, args.mode, options)
        paths = write_outputs(folder, plans, results, costs, options)
    except (ConfigError, OutputError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(tables.results_markdown(results))
    print(tables.cost_markdown(costs, results))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
