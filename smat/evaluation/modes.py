"""The meta-test modes over a run's test episodes, and the choice of their learning rate.

ProtoNet (no adaptation): each task's weights are merged from the
hypernetwork's evaluation-time α and the deterministic masks; the B tasks of a
batch are merged in one kernel call. The other modes (Algorithm 2's expert
selection, Algorithm 3's full fine-tuning, LoRA) live in :mod:`smat.adapt`.

The learning rate of full fine-tuning and LoRA (``adapt.lr_choice``, PMF's
protocol by default): one per domain from the first tasks of its val split;
where a domain has none, one per task from that task's support set alone
(:func:`smat.adapt.finetune.choose_task_lr`). No test query is seen before it
is scored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from ..adapt import GRADIENT_MODES, AdaptConfig
from ..adapt.cost import PeakMemory, Stopwatch
from ..adapt.finetune import backbone_accuracy, choose_task_lr, full_finetune, head_of
from ..adapt.lora import lora_finetune, require_peft
from ..adapt.select import select_experts, selection_accuracy
from ..config import Config, ConfigError
from ..data import episodes
from ..model import MASKED_METHODS, protonet
from ..runtime.device import autocast
from ..runtime.seeding import keyed_generator
from . import tables
from .runs import Run


def _task_theta(run: Run, task) -> torch.Tensor | None:
    """θ_i [N] of one task (None where the model has no task weights: the pre-trained backbone)."""
    theta = run.model.task_parameters([task], run.temperature)
    return None if theta is None else theta[0]


def _protonet(run: Run, tasks, lr, options: AdaptConfig, indices, chosen) -> list[float]:
    return protonet.task_accuracies(run.model, tasks, run.temperature, parallel=run.parallel)


def _select(run: Run, tasks, lr, options: AdaptConfig, indices, chosen) -> list[float]:
    accuracies = []
    for task, index in zip(tasks, indices, strict=True):
        selection = select_experts(run.model, task, run.temperature, options.select_rounds, options.select_rho,
                                   keyed_generator(options.seed, index), run.parallel)
        accuracies.append(selection_accuracy(run.model, task, selection, run.parallel))
    return accuracies


# the key of a task's learning-rate choice draws (augmentations of the probe), apart from its fine-tuning's
LR_CHOICE_STREAM = 1


def _fine_tuning(method, mode: str):
    def adapt(run: Run, tasks, lr, options: AdaptConfig, indices, chosen) -> list[float]:
        # a run trained without flips (glyphs: a mirrored character is another one) is not fine-tuned with them
        options = dataclasses.replace(options, augment_flip=options.augment_flip and run.config.data.train_flip)
        scale, bias = head_of(run.model)
        accuracies = []
        for task, index in zip(tasks, indices, strict=True):
            theta = _task_theta(run, task)
            rate = lr
            if rate is None:  # per task, from its support set alone
                rate, _ = choose_task_lr(method, run.model, theta, task, options.learning_rates(mode), options,
                                         keyed_generator(options.seed, index, LR_CHOICE_STREAM, device=run.device),
                                         run.precision)
                chosen.append(rate)
            tuned = method(run.model, theta, task, rate, options,
                           keyed_generator(options.seed, index, device=run.device), run.precision)
            accuracies.append(backbone_accuracy(tuned.backbone, task, scale, run.precision, bias))
        return accuracies
    return adapt


# mode → f(run, tasks on the device, lr (None: chosen per task), options, task indices, list that collects
# the rates chosen per task) → query accuracy per task
MODE_RUNNERS = {"protonet": _protonet, "select": _select, "full": _fine_tuning(full_finetune, "full"),
                "lora": _fine_tuning(lora_finetune, "lora")}


def check_mode(run: Run, mode: str) -> None:
    if mode == "lora":
        require_peft()
    # Algorithm 2 searches α' ∈ {0, 1}^M from rounded sigmoid scores, merged as α = α' / Σ α': only the
    # masked methods' hypernetworks score experts that way (SoftMerge's softmax router does not)
    if mode == "select" and not run.model.masked:
        raise ConfigError(f"mode select (Algorithm 2) chooses among sigmoid-scored sparse experts, which run "
                          f"{run.path} (method {run.method}) does not have; it applies to method "
                          f"{' or '.join(MASKED_METHODS)}. Use --mode protonet, full or lora for this run.")


def run_tasks(run: Run, mode: str, dataset, lr: float | None, options: AdaptConfig, progress=None,
              chosen: list | None = None):
    """(query accuracy per task, seconds) of ``mode`` over every task of ``dataset``; the seconds cover
    adaptation (a per-task learning-rate choice included) and prediction only (not loading the episodes).
    ``lr`` None: each task of a gradient mode chooses its own, appended to ``chosen``."""
    batch = run.config.train.meta_batch if mode == "protonet" else 1
    watch = Stopwatch(run.device)
    accuracies: list[float] = []
    chosen = [] if chosen is None else chosen
    for tasks in episodes.loader(dataset, run.config, meta_batch=batch):
        tasks = [t.to(run.device) for t in tasks]
        indices = range(len(accuracies), len(accuracies) + len(tasks))
        with watch, autocast(run.config, run.device):
            accuracies += MODE_RUNNERS[mode](run, tasks, lr, options, indices, chosen)
        if progress is not None:
            progress.update(len(tasks))
    return accuracies, watch.seconds


# --------------------------------------------------------------------------
# learning rates and a whole evaluation
# --------------------------------------------------------------------------


def lr_dataset(config: Config, source, domain: str, count: int):
    """(dataset, split) of the first ``count`` tasks that choose a domain's learning rate under
    ``lr_choice=val_else_test``: its val split where it has one that can make tasks of the configured way
    and shot, else its first test tasks."""
    if source[domain].classes("val"):
        try:
            return episodes.eval_dataset(config, source, domain, "val", count,
                                         config.seed + episodes.VAL_SEED_OFFSET), "val"
        except ConfigError:
            pass  # too few val classes for the way: fall back to the test split
    return episodes.eval_dataset(config, source, domain, "test", count, config.evaluate.seed), "test"


def lr_plan(config: Config, source, domain: str, options: AdaptConfig):
    """(dataset, split) that chooses a domain's learning rate under ``options.lr_choice``; (None, 'support')
    where each task chooses its own from its support set."""
    if options.lr_choice == "support":
        return None, "support"
    dataset, split = lr_dataset(config, source, domain, options.lr_tasks)
    if split == "test" and options.lr_choice == "val_else_support":
        return None, "support"
    return dataset, split


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
    lr_sets: dict  # {domain: (EpisodeDataset, split)}; (None, 'support'): each task chooses from its support
    roles: dict  # {domain: 'id' | 'ood'}
    groups: dict = field(default_factory=dict)  # {domain: 'id' | 'near_ood' | 'far_ood' | 'ood'} (smat.data.groups)

    def tasks(self, modes, options: AdaptConfig) -> int:
        total = 0
        for mode in modes:
            searched = mode in GRADIENT_MODES and len(options.learning_rates(mode)) > 1
            for domain, dataset in self.test.items():
                lr_set = self.lr_sets[domain][0]
                total += len(dataset) + (len(options.learning_rates(mode)) * len(lr_set)
                                         if searched and lr_set is not None else 0)
        return total


def plan_run(run: Run, modes, options: AdaptConfig) -> Plan:
    """Everything a user can get wrong about a run (unknown domain, too few classes, a mode the method
    lacks) raises here, before any evaluation starts."""
    for mode in modes:
        check_mode(run, mode)
    source = episodes.open_source(run.config)
    test = episodes.test_datasets(run.config, source)
    lr_sets = {name: lr_plan(run.config, source, name, options) for name in test}
    roles = {name: episodes.domain_role(name, source) for name in test}
    groups = {name: episodes.domain_group(name, source) for name in test}
    return Plan(run, test, lr_sets, roles, groups)


def evaluate_mode(plan: Plan, mode: str, options: AdaptConfig, progress=None):
    """([ModeResult per domain], ModeCost) of one run under one mode.

    The cost's seconds are those of the test tasks only; its peak memory covers the learning-rate
    search too (a task costs the same memory whichever split it comes from)."""
    run, results, seconds = plan.run, [], 0.0
    with PeakMemory(run.device) as memory:
        for domain, dataset in plan.test.items():
            lr, split, scores, chosen = None, None, {}, []
            if mode in GRADIENT_MODES:
                rates = options.learning_rates(mode)
                lr, split = rates[0], "fixed"
                if len(rates) > 1:
                    lr_set, split = plan.lr_sets[domain]
                    lr = None  # split 'support': each task chooses its own while it is adapted
                    if lr_set is not None:
                        _describe(progress, run, mode, domain, "choosing lr")
                        lr, scores = choose_lr(run, mode, lr_set, options, progress)
            _describe(progress, run, mode, domain, "test")
            accuracies, elapsed = run_tasks(run, mode, dataset, lr, options, progress, chosen)
            if chosen:  # per-task choice: {lr: share of the tasks that chose it}
                scores = {rate: chosen.count(rate) / len(chosen) for rate in dict.fromkeys(chosen)}
            seconds += elapsed
            results.append(tables.ModeResult(run.name, run.method, mode, domain, plan.roles[domain], accuracies,
                                              elapsed, lr, split, scores, plan.groups.get(domain, "")))
    tasks = sum(len(r.accuracies) for r in results)
    return results, tables.ModeCost(run.name, run.method, mode, tasks, seconds, memory.bytes, memory.kind)


def _describe(progress, run: Run, mode: str, domain: str, phase: str) -> None:
    if progress is not None:
        progress.set_description(f"{run.name} {mode} {domain}")
        progress.set_postfix_str(phase)
