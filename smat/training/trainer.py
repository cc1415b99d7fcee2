"""The meta-training loop around Algorithm 1: optimisers, schedules, the Lagrangian, validation,
checkpoints and the training log. What differs between methods comes from their
:class:`~smat.training.specs.TrainingSpec`."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import Config, ConfigError, TrainConfig
from ..data import episodes
from ..model import TaskModel, build, check_compatible
from ..model.backbone import BUILTIN, create_backbone
from ..model.protonet import loader_accuracies
from ..runtime import checkpoint, distributed
from ..runtime.device import precision_dtype, task_parallel
from ..runtime.runlog import RunLog
from .alignment import gradient_alignment
from .lagrangian import SparsityMultipliers
from .pretrain import cached_weights, pretrained_builtin, shipped_weights
from .specs import SPECS, clip_gradients, make_optimizers


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss stays NaN)."""


def build_model(config: Config, world: distributed.World, log=print, weights=None) -> TaskModel:
    """The model of the run's method over the configured backbone with its pre-trained weights (the built-in
    backbone is pre-trained first, once, by the main process)."""
    if config.model.backbone == BUILTIN and weights is None and config.model.weights is None:
        weights = shipped_weights(config)
        if weights is None:
            if world.is_main:
                pretrained_builtin(config, log)
            distributed.barrier(world)
            weights = cached_weights(config)
        elif world.is_main:
            log(f"pre-trained built-in backbone: {weights} (shipped with smat)")
    torch.manual_seed(config.seed)
    return build(config, create_backbone(config.model, weights))


def cosine_with_warmup(total_steps: int, warmup_fraction: float):
    warmup = max(1, int(round(total_steps * warmup_fraction)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def cosine_over_epochs(steps_per_epoch: int, warmup_epochs: int, schedule_epochs: int):
    """The reference code's schedule, set once per epoch e: e / warmup_epochs while warming up (0 in the first
    epoch), then 0.5·(1 + cos(π·(e − warmup_epochs) / (schedule_epochs − warmup_epochs)))."""
    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        if epoch < warmup_epochs:
            return epoch / warmup_epochs
        progress = (epoch - warmup_epochs) / max(1, schedule_epochs - warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


# the optimisers whose first epoch runs at train.first_epoch_lr (λ too: Trainer.lambda_lr); the reference code
# sets it on its main optimiser (θ_δ, masks, λ), not on the hypernetwork's
FIRST_EPOCH_OPTIMIZERS = ("delta", "mask")


def learning_rate_factors(train: TrainConfig, total_steps: int, steps_per_epoch: int, optimizers: dict):
    """(schedule factor of step s, {optimiser name: its LambdaLR factor})."""
    if train.lr_schedule == "epochs":
        schedule = cosine_over_epochs(steps_per_epoch, train.warmup_epochs, train.schedule_epochs)
    else:
        schedule = cosine_with_warmup(total_steps, train.warmup_fraction)
    factors = {name: schedule for name in optimizers}
    if train.first_epoch_lr is not None:
        for name in FIRST_EPOCH_OPTIMIZERS:
            if name in optimizers:
                factors[name] = _first_epoch_at(schedule, steps_per_epoch, train.first_epoch_lr,
                                                optimizers[name].param_groups[0]["lr"])
    return schedule, factors


def _first_epoch_at(schedule, steps_per_epoch: int, lr: float, base_lr: float):
    def factor(step: int) -> float:
        return lr / base_lr if step < steps_per_epoch else schedule(step)
    return factor


class Trainer:
    def __init__(self, config: Config, run: Path, device: torch.device, world: distributed.World,
                 log=print, model: TaskModel | None = None):
        self.config, self.run, self.device, self.world, self.log = config, Path(run), device, world, log
        train = config.train
        if train.meta_batch % world.size:
            raise ConfigError(f"train.meta_batch ({train.meta_batch}) must be divisible by the number of "
                              f"processes ({world.size})")
        self.spec = SPECS[config.method]
        self.local_batch = train.meta_batch // world.size
        self.source = episodes.open_source(config)
        self.train_set = episodes.train_dataset(config, self.source)
        self.val_sets = episodes.val_datasets(config, self.source)
        self.model = (model or build_model(config, world, log)).to(device)
        self.parallel = task_parallel(config)
        self.objective = self.spec.objective(self.model, config, self.parallel) if self.spec.objective else None
        if world.active and self.objective is not None:
            self.objective = distributed.data_parallel(self.objective, device)
        self.optimizers = make_optimizers(self.spec, self.model, train)
        self.steps_per_epoch = max(1, train.tasks_per_epoch // train.meta_batch)
        self.total_steps = train.epochs * self.steps_per_epoch if self.objective is not None else 0
        self.lr_factor, factors = learning_rate_factors(train, self.total_steps, self.steps_per_epoch,
                                                        self.optimizers)
        self.schedules = {name: torch.optim.lr_scheduler.LambdaLR(opt, factors[name])
                          for name, opt in self.optimizers.items()}
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision_dtype(config, device) == torch.float16)
        self.multipliers = SparsityMultipliers(self.model.num_experts, train.tau, train.lambda_lr, device)
        self.step = 0
        self.best_val = -1.0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.runlog = RunLog(self.run, enabled=world.is_main)

    # ------------------------------------------------------------ state

    def tensors(self) -> dict[str, torch.Tensor]:
        extra = {"lambda": self.multipliers.value} if self.spec.constrained else {}
        return {**self.model.trainable_tensors(), **extra}

    def state(self) -> dict:
        return {"method": self.config.method, "step": self.step, "total_steps": self.total_steps,
                "tasks_seen": self.step * self.config.train.meta_batch, "best_val": self.best_val,
                "nonfinite_total": self.nonfinite_total, "nonfinite_run": self.nonfinite_run,
                "backbone": self.config.model.backbone, **self.model.identity(),
                "config": checkpoint.config_record(self.config)}

    def save(self, best: bool = False) -> None:
        if not self.world.is_main:
            return
        optimizer_state = {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                           "schedules": {k: s.state_dict() for k, s in self.schedules.items()},
                           "scaler": self.scaler.state_dict()}
        checkpoint.save(self.run, self.step, self.tensors(), optimizer_state, self.state(), best=best,
                        keep=self.config.keep_checkpoints)

    def restore(self, folder: Path) -> None:
        """Continue from checkpoint ``folder``; a checkpoint that does not belong to this run or cannot be read
        whole is a CheckpointError naming the file, raised before anything is changed."""
        tensors, optimizer_state, state = checkpoint.load(folder, map_location=self.device)
        checkpoint.check_config(state, self.config, folder, self.run / "config.yaml")
        check_compatible(state, self.model, self.config, folder)
        try:
            self.model.load_trainable_tensors({k: v for k, v in tensors.items() if k != "lambda"})
            if self.spec.constrained:
                self.multipliers.load_state_dict({"lambda": tensors["lambda"]})
        except (KeyError, RuntimeError, ValueError) as error:
            raise checkpoint.CheckpointError(checkpoint.damaged(
                Path(folder) / checkpoint.TENSORS, f"does not fit the model of {self.run / 'config.yaml'}: "
                f"{str(error).splitlines()[0]}")) from None
        try:
            for name, opt in self.optimizers.items():
                opt.load_state_dict(optimizer_state["optimizers"][name])
            for name, schedule in self.schedules.items():
                schedule.load_state_dict(optimizer_state["schedules"][name])
            self.scaler.load_state_dict(optimizer_state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
            raise checkpoint.CheckpointError(checkpoint.damaged(
                Path(folder) / checkpoint.OPTIMIZER, f"does not hold this run's optimiser state "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")) from None
        self.step, self.best_val = state["step"], state.get("best_val", -1.0)
        self.nonfinite_total, self.nonfinite_run = state.get("nonfinite_total", 0), state.get("nonfinite_run", 0)
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
        clip_gradients(self.spec, self.model, train)
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        for schedule in self.schedules.values():
            schedule.step()
        if self.spec.constrained:
            self.enforce_sparsity(out, alpha_sum / train.meta_batch)
        return {"skipped": False, "loss": float(loss), **metrics,
                "alpha_mean": (alpha_sum / train.meta_batch).tolist()}

    def enforce_sparsity(self, out: dict, alpha_mean: torch.Tensor) -> None:
        """After the optimisers' step: project log_α; λ_m ascends (weighted by the batch's mean α_·,m)
        while constraint m is violated and resets once it holds.

        ``train.constraint_on``: 'expected' judges the constraint on the expected density E[L0]/N, as the
        paper; 'hard' on the density of the deterministic masks that meta-testing uses (a proxy-Lagrangian,
        Cotter et al. 2019: the model still descends on the differentiable expected density). The two agree
        once log_α has saturated; in short runs it has not, and only 'hard' lands the deployed sparsity on τ."""
        self.model.project_log_alpha()
        measured = out["density"] if self.config.train.constraint_on == "expected" else out["hard_density"]
        self.multipliers.lr = self.lambda_lr()
        self.multipliers.ascend(measured, alpha_mean)

    def lambda_lr(self) -> float:
        """λ's learning rate at this step: train.lambda_lr, scaled by the schedule when train.lambda_schedule,
        and train.first_epoch_lr in the first epoch when that is set."""
        train = self.config.train
        if train.first_epoch_lr is not None and self.step < self.steps_per_epoch:
            return train.first_epoch_lr
        return train.lambda_lr * (self.lr_factor(self.step) if train.lambda_schedule else 1.0)

    def _skip(self, value: float) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        self.log(f"step {self.step}: loss is {value}; step skipped ({self.nonfinite_run} in a row, "
                 f"{self.nonfinite_total} in all)")
        if self.nonfinite_run >= self.config.train.max_nonfinite:
            raise TrainingError(f"the loss was NaN or infinite for {self.nonfinite_run} steps in a row (step "
                                f"{self.step}); training stopped. Lower the learning rates (train.delta_lr, "
                                f"train.mask_lr, train.hyper_lr) or use train.precision=fp32; "
                                f"{self._last_good()}")

    def _last_good(self) -> str:
        complete = checkpoint.steps(self.run)
        if not complete:
            return "no checkpoint was written before it (start again with output=ANOTHER_FOLDER)"
        return f"the last good checkpoint is {complete[-1]}"

    # ------------------------------------------------------------ the loop

    def batches(self):
        """This process's share of every remaining meta-batch, from the current step on."""
        train = self.config.train
        indices = [step * train.meta_batch + self.world.rank * self.local_batch + b
                   for step in range(self.step, self.total_steps) for b in range(self.local_batch)]
        return episodes.loader(self.train_set, self.config, indices=indices, meta_batch=self.local_batch)

    def fit(self, stop_after: int | None = None) -> dict:
        """Train to the end (or for ``stop_after`` more steps); returns the last logged metrics. A method with
        nothing to train validates once and writes its one checkpoint (step 0, marked best)."""
        if self.objective is None:
            if self.best_val < 0:  # a resumed run already holds its checkpoint
                self.end_of_epoch()
            return {}
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
                  **{k: v for k, v in metrics.items() if k != "skipped"},
                  # each expert's hard and expected sparsity (dense experts: 0), and λ
                  "hard_sparsity": self.model.hard_sparsity().tolist(),
                  "expected_sparsity": (1 - self.model.expected_density().detach()).tolist(),
                  "lambda": self.multipliers.value.tolist(),
                  "nonfinite_total": self.nonfinite_total,
                  "tasks_per_second": (self.step - start_step) * self.config.train.meta_batch / max(elapsed, 1e-9),
                  "lr_delta": self.schedules["delta"].get_last_lr()[0], "lr_lambda": self.multipliers.lr}
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
        if not self.val_sets:
            return 0.0
        accuracies = []
        for dataset in self.val_sets.values():
            share = range(self.world.rank, len(dataset), self.world.size)
            loader = episodes.loader(dataset, self.config, indices=list(share),
                                     meta_batch=self.config.train.meta_batch)
            accuracies += loader_accuracies(self.model, loader, self.temperature(), self.device, self.config)
        gathered = [a for part in distributed.all_gather_objects(accuracies, self.world) for a in part]
        return float(np.mean(gathered))


def _postfix(record: dict) -> str:
    text = f"loss {record.get('loss', float('nan')):.3f} acc {record.get('accuracy', float('nan')):.3f}"
    if "hard_sparsity" in record:
        text += " sparsity [" + " ".join(f"{s:.2f}" for s in record["hard_sparsity"]) + "]"
    return text
