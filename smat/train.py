"""SMAT meta-training (Algorithm 1) and the ``python -m smat.train`` command.

With no argument, the command runs the built-in default end to end:
pre-train the small built-in ViT (once, cached), meta-tune it with SMAT on
the built-in ID domains, evaluate ProtoNet accuracy on the ID and OOD domains
against the pre-trained backbone, and write a report. Options:

    python -m smat.train [--config configs/X.yaml] [--resume] [--skip-eval] [key=value ...]

``key=value`` overrides any config entry (``train.tau=0.95``, ``output=runs/x``).
Under ``torchrun --nproc_per_node K`` the tasks of each meta-batch are split
over the K processes.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint, distributed, episodes, objective
from .backbone import BUILTIN, create_backbone
from .config import Config, ConfigError, load_config, save_config, validate
from .io import OutputError, ensure_writable_dir
from .lagrangian import SparsityMultipliers
from .model import SparseInterpolatedExperts
from .runlog import RunLog


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN)."""


# --------------------------------------------------------------------------
# Algorithm 1: the meta-loss of one meta-batch (this process's share of it)
# --------------------------------------------------------------------------


class MetaObjective(nn.Module):
    """Computes Algorithm 1's loop body for this process's tasks; DDP wraps it when K > 1."""

    def __init__(self, model: SparseInterpolatedExperts, config: Config, parallel: str):
        super().__init__()
        self.model, self.config, self.parallel = model, config, parallel

    def forward(self, tasks, first_task: int, step: int, temperature: float,
                multipliers: SparsityMultipliers) -> dict[str, torch.Tensor]:
        model, train = self.model, self.config.train
        autocast = _autocast(self.config, tasks[0].query_x.device)
        if not train.support_query_split:
            tasks = [task.pooled() for task in tasks]

        # α'_i ~ GumbelSigmoid(h_ζ(T_i^s)); α_i = α'_i / Σ_m α'_i,m
        with autocast:
            prototypes = model.pretrained_prototypes([t.support_x for t in tasks], [t.support_y for t in tasks],
                                                     [t.n_way for t in tasks])
        logits = model.expert_logits(prototypes)
        generators = [task_generator(self.config.seed, step, first_task + b) for b in range(len(tasks))]
        alpha = torch.cat([model.merging_weights(logits[b:b + 1], temperature, generators[b])
                           for b in range(len(tasks))])

        # z_m ~ q_φm; θ_i = θ_pre + θ_δ ⊙ Σ_m α_i,m z_m — all tasks in one kernel call
        theta = model.merge(alpha, mode=train.noise, seed=self.config.seed,
                            offset=mask_offset(model, step, train.meta_batch, first_task))
        measure_alignment = train.alignment_every > 0 and step % train.alignment_every == 0 and len(tasks) > 1
        if measure_alignment:
            theta.retain_grad()

        with autocast:
            # first-order support step, then the student's query predictions
            adapted = objective.gradient_steps(
                theta, lambda p: objective.support_loss(model, p, tasks, self.parallel), train.inner_lr,
                train.inner_steps)
            student = objective.query_logits(model, adapted, tasks, self.parallel)
            teachers = (objective.dense_teacher_logits(model, theta, tasks, train.teacher_lr, train.teacher_steps,
                                                       self.parallel) if train.teacher_steps else None)
            pretrained = None
            if train.kd_pretrained_share > 0:
                with torch.no_grad():
                    pretrained = objective.query_logits(model, None, tasks)

        ce = torch.stack([nn.functional.cross_entropy(s.float(), t.query_y) for s, t in zip(student, tasks)])
        kd = torch.zeros_like(ce)
        share = train.kd_pretrained_share
        for b, s in enumerate(student):
            if teachers is not None:
                kd[b] = kd[b] + (1 - share) * objective.distillation(s.float(), teachers[b].float(),
                                                                     train.kd_temperature)
            if pretrained is not None:
                kd[b] = kd[b] + share * objective.distillation(s.float(), pretrained[b].float(),
                                                               train.kd_temperature)
        has_kd = teachers is not None or pretrained is not None
        ce_weight = train.ce_weight if has_kd else 1.0
        task_loss = (ce_weight * ce + (1 - ce_weight) * kd).mean()

        # Σ_m λ_m C_m: the sparsity constraints, and the hypernetwork's logit penalty
        density = model.expected_density()
        loss = task_loss + multipliers.penalty(density) + train.hyper_penalty * (logits ** 2).mean()
        accuracy = torch.stack([(s.argmax(-1) == t.query_y).float().mean() for s, t in zip(student, tasks)])
        out = {"loss": loss, "task_loss": task_loss.detach(), "ce": ce.detach().mean(), "kd": kd.detach().mean(),
               "accuracy": accuracy.mean(), "alpha_sum": alpha.detach().sum(0), "density": density.detach(),
               "hard_density": 1 - model.hard_sparsity()}
        if measure_alignment:
            out.update(theta=theta, alpha=alpha)
        return out


def task_generator(seed: int, step: int, task: int) -> torch.Generator:
    """The Gumbel noise of global task ``task`` of step ``step``: the same in whichever process runs it."""
    state = np.random.SeedSequence([seed, step, task]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def mask_offset(model: SparseInterpolatedExperts, step: int, meta_batch: int, first_task: int) -> int:
    """Philox offset of this process's first task: every (step, task) gets its own counters."""
    return (step * meta_batch + first_task) * model.counters_per_task()


def _autocast(config: Config, device: torch.device):
    dtype = precision_dtype(config, device)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def precision_dtype(config: Config, device: torch.device):
    choice = config.train.precision
    if choice == "fp32" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[choice]


# --------------------------------------------------------------------------
# building a run
# --------------------------------------------------------------------------


def build_model(config: Config, world: distributed.World, log=print, weights=None) -> SparseInterpolatedExperts:
    """The SMAT model over the configured backbone with its pre-trained weights."""
    if config.model.backbone == BUILTIN and weights is None and config.model.weights is None:
        from .pretrain import cached_weights, pretrained_builtin

        if world.is_main:
            pretrained_builtin(config, log)
        distributed.barrier(world)
        weights = cached_weights(config)
    torch.manual_seed(config.seed)
    backbone = create_backbone(config.model, weights)
    from .methods import build

    return build(config, backbone)


def make_optimizers(model: SparseInterpolatedExperts, config: Config) -> dict[str, torch.optim.Optimizer]:
    """The reference code's optimisers: SGD+momentum for θ_δ, plain SGD for log_α, AdamW for h_ζ."""
    train = config.train
    return {
        "delta": torch.optim.SGD([model.delta], lr=train.delta_lr, momentum=train.delta_momentum,
                                 weight_decay=train.delta_weight_decay),
        "mask": torch.optim.SGD([model.log_alpha], lr=train.mask_lr),
        "hypernet": torch.optim.AdamW(model.hypernet.parameters(), lr=train.hyper_lr,
                                      weight_decay=train.hyper_weight_decay),
    }


def cosine_with_warmup(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def choose_parallel(config: Config) -> str:
    """``auto`` is the loop over tasks: benchmarks/test_bench_train.py measured torch.func.vmap no faster
    on the CPU (1.0× at one thread; slower at two, as PyTorch has no vmap rule for CPU attention).
    ``vmap`` stays available (it needs tasks of equal shapes: the fixed protocol)."""
    choice = config.train.task_parallel
    return "loop" if choice == "auto" else choice


# --------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------


class Trainer:
    def __init__(self, config: Config, run: Path, device: torch.device, world: distributed.World,
                 log=print, model: SparseInterpolatedExperts | None = None):
        self.config, self.run, self.device, self.world, self.log = config, Path(run), device, world, log
        train = config.train
        if train.meta_batch % world.size:
            raise ConfigError(f"train.meta_batch ({train.meta_batch}) must be divisible by the number of "
                              f"processes ({world.size})")
        self.local_batch = train.meta_batch // world.size
        self.source = episodes.open_source(config)
        self.train_set = episodes.train_dataset(config, self.source)
        self.val_sets = episodes.val_datasets(config, self.source)
        self.model = (model or build_model(config, world, log)).to(device)
        self.parallel = choose_parallel(config)
        objective_module = self.build_objective()
        self.objective = objective_module
        if world.active:
            self.objective = nn.parallel.DistributedDataParallel(
                objective_module, device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False)
        self.optimizers = self.build_optimizers()
        self.steps_per_epoch = max(1, train.tasks_per_epoch // train.meta_batch)
        self.total_steps = train.epochs * self.steps_per_epoch
        factor = cosine_with_warmup(self.total_steps, train.warmup_fraction)
        self.schedules = {name: torch.optim.lr_scheduler.LambdaLR(opt, factor)
                          for name, opt in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision_dtype(config, device) == torch.float16)
        self.multipliers = SparsityMultipliers(getattr(self.model, "num_experts", 1), train.tau, train.lambda_lr,
                                               device)
        self.step = 0
        self.best_val = -1.0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.runlog = RunLog(self.run, enabled=world.is_main)

    # ------------------------------------------------------------ what a method changes (SMAT's here;
    # the baselines of smat/baselines.py override these)

    def build_objective(self) -> nn.Module:
        """A module whose forward(tasks, first_task, step, temperature, multipliers) returns a dict with
        'loss' and the metrics 'task_loss', 'ce', 'kd', 'accuracy', 'alpha_sum' [M]."""
        return MetaObjective(self.model, self.config, self.parallel)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return make_optimizers(self.model, self.config)

    def clip_gradients(self) -> None:
        train = self.config.train
        torch.nn.utils.clip_grad_norm_([self.model.log_alpha], train.mask_clip)
        torch.nn.utils.clip_grad_norm_(self.model.hypernet.parameters(), train.hyper_clip)

    def after_step(self, out: dict, alpha_mean: torch.Tensor) -> None:
        """After the optimisers' step: project log_α; λ_m ascends (weighted by the batch's mean α_·,m)
        while constraint m is violated and resets once it holds.

        ``train.constraint_on``: 'expected' judges the constraint on the expected density E[L0]/N, as the
        paper; 'hard' on the density of the deterministic masks that meta-testing uses (a proxy-Lagrangian,
        Cotter et al. 2019: the model still descends on the differentiable expected density). The two agree
        once log_α has saturated; in short runs it has not, and only 'hard' lands the deployed sparsity on τ."""
        self.model.project_log_alpha()
        measured = out["density"] if self.config.train.constraint_on == "expected" else out["hard_density"]
        self.multipliers.ascend(measured, alpha_mean)

    def extra_metrics(self) -> dict:
        """Logged with every training record: each expert's hard and expected sparsity, and λ."""
        return {"hard_sparsity": self.model.hard_sparsity().tolist(),
                "expected_sparsity": (1 - self.model.expected_density().detach()).tolist(),
                "lambda": self.multipliers.value.tolist()}

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {"lambda": self.multipliers.value}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.multipliers.load_state_dict({"lambda": tensors["lambda"]})

    # ------------------------------------------------------------ state

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.model.trainable_tensors(), **self.extra_tensors()}

    def state(self) -> dict:
        return {"method": self.config.method, "step": self.step, "total_steps": self.total_steps,
                "tasks_seen": self.step * self.config.train.meta_batch, "best_val": self.best_val,
                "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "backbone": self.config.model.backbone,
                "num_elements": self.model.layout.num_elements,
                "num_experts": getattr(self.model, "num_experts", None)}

    def save(self, best: bool = False) -> None:
        if not self.world.is_main:
            return
        optimizer_state = {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                           "schedules": {k: s.state_dict() for k, s in self.schedules.items()},
                           "scaler": self.scaler.state_dict()}
        checkpoint.save(self.run, self.step, self.tensors(), optimizer_state, self.state(), best=best,
                        keep=self.config.keep_checkpoints)

    def restore(self, folder: Path) -> None:
        tensors, optimizer_state, state = checkpoint.load(folder, map_location=self.device)
        check_compatible(state, self.model, self.config, folder)
        self.model.load_trainable_tensors(tensors)
        self.load_extra_tensors(tensors)
        for name, opt in self.optimizers.items():
            opt.load_state_dict(optimizer_state["optimizers"][name])
        for name, schedule in self.schedules.items():
            schedule.load_state_dict(optimizer_state["schedules"][name])
        self.scaler.load_state_dict(optimizer_state["scaler"])
        self.step, self.best_val = state["step"], state["best_val"]
        self.nonfinite_total, self.nonfinite_run = state["nonfinite_total"], state["nonfinite_run"]
        self.runlog.truncate(self.step)
        self.log(f"resumed from {folder} at step {self.step}/{self.total_steps}")

    # ------------------------------------------------------------ one step

    def temperature(self) -> float:
        return self.config.train.temperature.at(self.step * self.config.train.meta_batch)

    def train_step(self, tasks) -> dict:
        train = self.config.train
        tasks = [t.to(self.device) for t in tasks]
        self.model.train()
        first = self.world.rank * self.local_batch
        out = self.objective(tasks, first, self.step, self.temperature(), self.multipliers)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        loss = distributed.all_reduce_sum(out["loss"].detach().float(), self.world) / self.world.size
        alpha_sum = distributed.all_reduce_sum(out["alpha_sum"].float(), self.world)
        metrics = {name: float(distributed.all_reduce_sum(out[name].float(), self.world) / self.world.size)
                   for name in ("task_loss", "ce", "kd", "accuracy")}
        if not torch.isfinite(loss):
            self._skip(float(loss))
            return {"skipped": True, **metrics}
        self.nonfinite_run = 0
        if "theta" in out:
            self.runlog.write("alignment", {"step": self.step, **gradient_alignment(self.model, out)})
        for opt in self.optimizers.values():
            self.scaler.unscale_(opt)
        self.clip_gradients()
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        for schedule in self.schedules.values():
            schedule.step()
        self.after_step(out, alpha_sum / train.meta_batch)
        return {"skipped": False, "loss": float(loss), **metrics,
                "alpha_mean": (alpha_sum / train.meta_batch).tolist()}

    def _skip(self, value: float) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.log(f"step {self.step}: loss is {value}; step skipped ({self.nonfinite_run} in a row, "
                 f"{self.nonfinite_total} in all)")
        if self.nonfinite_run >= self.config.train.max_nonfinite:
            raise TrainingError(f"the loss was NaN or infinite for {self.nonfinite_run} steps in a row (step "
                                f"{self.step}); training stopped. Lower the learning rates (train.delta_lr, "
                                f"train.mask_lr, train.hyper_lr) or use train.precision=fp32; the last good "
                                f"checkpoint is in {checkpoint.checkpoint_dir(self.run)}")

    # ------------------------------------------------------------ the loop

    def batches(self):
        """This process's share of every remaining meta-batch, from the current step on."""
        train = self.config.train
        indices = [step * train.meta_batch + self.world.rank * self.local_batch + b
                   for step in range(self.step, self.total_steps) for b in range(self.local_batch)]
        return episodes.loader(self.train_set, self.config, indices=indices, meta_batch=self.local_batch)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to the end (or for ``stop_after`` more steps); returns the last logged metrics."""
        train = self.config.train
        progress = tqdm(total=self.total_steps, initial=self.step, desc="meta-train", unit="step",
                        disable=not self.world.is_main, dynamic_ncols=True)
        last: dict = {}
        start_step, start_time = self.step, time.perf_counter()
        with progress:  # closed on errors too, so no stray bar is left behind
            for tasks in self.batches():
                metrics = self.train_step(tasks)
                self.step += 1
                progress.update()
                if self.step % train.log_every == 0 or self.step == self.total_steps:
                    last = self._log(metrics, start_step, start_time)
                    progress.set_postfix_str(_postfix(last))
                if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                    self.end_of_epoch()
                if stop_after is not None and self.step - start_step >= stop_after:
                    break
        return last

    def _log(self, metrics: dict, start_step: int, start_time: float) -> dict:
        elapsed = time.perf_counter() - start_time
        record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                  "tasks_seen": self.step * self.config.train.meta_batch, "temperature": self.temperature(),
                  **{k: v for k, v in metrics.items() if k != "skipped"}, **self.extra_metrics(),
                  "nonfinite_total": self.nonfinite_total,
                  "tasks_per_second": (self.step - start_step) * self.config.train.meta_batch / max(elapsed, 1e-9),
                  "lr_delta": self.schedules["delta"].get_last_lr()[0]}
        self.runlog.write("train", record)
        return record

    def end_of_epoch(self) -> None:
        accuracy = self.validate()
        best = accuracy > self.best_val
        if best:
            self.best_val = accuracy
        self.runlog.write("val", {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "val_accuracy": accuracy, "best": best})
        self.save(best=best)
        distributed.barrier(self.world)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean ProtoNet accuracy on the fixed validation episodes of every training domain."""
        from .evaluate import protonet_accuracies

        if not self.val_sets:
            return 0.0
        accuracies = []
        for dataset in self.val_sets.values():
            share = range(self.world.rank, len(dataset), self.world.size)
            loader = episodes.loader(dataset, self.config, indices=list(share),
                                     meta_batch=self.config.train.meta_batch)
            accuracies += protonet_accuracies(self.model, loader, self.temperature(), self.device, self.config)
        gathered = [a for part in distributed.all_gather_objects(accuracies, self.world) for a in part]
        return float(np.mean(gathered))


def _postfix(record: dict) -> str:
    text = f"loss {record.get('loss', float('nan')):.3f} acc {record.get('accuracy', float('nan')):.3f}"
    if "hard_sparsity" in record:
        text += " sparsity [" + " ".join(f"{s:.2f}" for s in record["hard_sparsity"]) + "]"
    return text


@torch.no_grad()
def gradient_alignment(model: SparseInterpolatedExperts, out: dict) -> dict:
    """Mean cosine between the meta-gradients of this process's tasks (the paper's Fig. 4).

    With g_i = ∂L/∂θ_i (task i's row of the merged weights): the meta-gradient of task i with respect to
    θ_δ is g_i ⊙ Σ_m α_i,m z_m, and with respect to expert m's parameters z_m ⊙ θ_δ it is α_i,m·g_i on
    the support of z_m (deterministic masks); α_i,m > 0 does not change a cosine."""
    grads = out["theta"].grad
    if grads is None or grads.shape[0] < 2:
        return {}
    masks = model.hard_masks()
    alpha = out["alpha"].detach()
    overall = grads * (masks.float() @ alpha.t()).t()
    pairs = torch.triu_indices(grads.shape[0], grads.shape[0], 1)

    def mean_cosine(rows: torch.Tensor) -> float:
        unit = torch.nn.functional.normalize(rows.double(), dim=-1)
        return float((unit[pairs[0]] * unit[pairs[1]]).sum(-1).mean())
    return {"overall": mean_cosine(overall),
            "experts": [mean_cosine(grads[:, masks[:, m]]) if bool(masks[:, m].any()) else float("nan")
                        for m in range(masks.shape[1])]}


def check_compatible(state: dict, model: nn.Module, config: Config, folder: Path) -> None:
    expected = {"method": config.method, "backbone": config.model.backbone,
                "num_elements": model.layout.num_elements, "num_experts": getattr(model, "num_experts", None)}
    found = {key: state.get(key) for key in expected}
    if found != expected:
        diff = ", ".join(f"{k}: checkpoint {found[k]!r} vs config {expected[k]!r}" for k in expected
                         if found[k] != expected[k])
        raise checkpoint.CheckpointError(f"checkpoint {folder} was written for another backbone or config ({diff}); "
                                         f"use the config it was trained with (the run's config.yaml)")


# --------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------


def resolve_device(config: Config, world: distributed.World) -> torch.device:
    if config.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", world.local_rank)
        return torch.device("cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    return device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/); default: the built-in default run")
    parser.add_argument("--resume", action="store_true", help="continue the run in `output` from its latest "
                        "checkpoint")
    parser.add_argument("--skip-eval", action="store_true", help="meta-train only; no test evaluation or report")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.tau=0.95")
    return parser.parse_intermixed_args(argv)


def prepare(args) -> tuple[Config, Path]:
    config = validate(load_config(args.config, args.overrides))
    run = Path(config.output).expanduser()
    latest = checkpoint.checkpoint_dir(run) / "latest"
    if latest.exists() and not args.resume:
        raise ConfigError(f"{run} already holds a run; resume it with --resume, or choose another folder with "
                          f"output=PATH")
    return config, ensure_writable_dir(run)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config, run = prepare(args)
    except (ConfigError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(config.seed)
    world = distributed.World()
    try:
        device = resolve_device(config, world)
        world = distributed.init(device)
        log = print if world.is_main else (lambda *a, **k: None)
        if world.is_main:
            save_config(config, run / "config.yaml")
        if config.method != "smat":
            from .baselines import run_baseline

            return run_baseline(config, run, device, world, log, resume=args.resume, evaluate=not args.skip_eval)
        trainer = Trainer(config, run, device, world, log)
        log(trainer.model.describe())
        if args.resume:
            trainer.restore(checkpoint.resolve(run))
        elif world.is_main:
            checkpoint.save_backbone(run, trainer.model.backbone.state_dict())
        trainer.fit()
        if world.is_main and not args.skip_eval:
            from .report import evaluate_and_report

            evaluate_and_report(config, run, trainer.model, device, log)
    except (ConfigError, OutputError, TrainingError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
