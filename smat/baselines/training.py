"""How each baseline is meta-trained: :class:`~smat.train.Trainer` with its method hooks overridden.

- ``pmf``: the ProtoNet query loss of every task under θ_pre + δ; SGD with momentum on δ.
- ``softmerge``: SMAT's :class:`~smat.train.MetaObjective` (support step, CE + KD from the dense teacher)
  over the soft-merged experts; no sparsity constraint.
- ``smat_independent``: SMAT's trainer unchanged (masks, Lagrangian, hypernetwork).
- ``pretrained``: nothing to train; one checkpoint at step 0 records its validation accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import objective
from ..train import MetaObjective, Trainer, _autocast


class ProtoNetObjective(nn.Module):
    """PMF's meta-loss: ProtoNet cross-entropy of each task's queries under θ_pre + δ (no support step, no
    teacher, no KD). Same forward signature and outputs as :class:`~smat.train.MetaObjective`."""

    def __init__(self, model, config, parallel: str):
        super().__init__()
        self.model, self.config, self.parallel = model, config, parallel

    def forward(self, tasks, first_task: int, step: int, temperature: float, multipliers) -> dict[str, torch.Tensor]:
        alpha = self.model.task_alpha(tasks, temperature)
        theta = self.model.merge(alpha)
        with _autocast(self.config, tasks[0].query_x.device):
            logits = objective.query_logits(self.model, theta, tasks, self.parallel)
        ce = torch.stack([F.cross_entropy(out.float(), task.query_y) for out, task in zip(logits, tasks)]).mean()
        accuracy = torch.stack([(out.argmax(-1) == task.query_y).float().mean() for out, task in zip(logits, tasks)])
        return {"loss": ce, "task_loss": ce.detach(), "ce": ce.detach(), "kd": torch.zeros_like(ce.detach()),
                "accuracy": accuracy.mean(), "alpha_sum": alpha.sum(0)}


class DenseTrainer(Trainer):
    """The hooks of the baselines without masks: no sparsity constraint (λ stays 0, so MetaObjective's
    penalty term is 0), no log_α to project or clip, no λ to save. SMAT's training records are kept, so
    that the report reads them alike: dense experts have sparsity 0."""

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """θ_δ's optimiser of SMAT (SGD with momentum) for the dense deltas."""
        train = self.config.train
        return {"delta": torch.optim.SGD([self.model.delta], lr=train.delta_lr, momentum=train.delta_momentum,
                                         weight_decay=train.delta_weight_decay)}

    def clip_gradients(self) -> None:
        pass

    def after_step(self, out: dict, alpha_mean: torch.Tensor) -> None:
        pass

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class PMFTrainer(DenseTrainer):
    def build_objective(self) -> nn.Module:
        return ProtoNetObjective(self.model, self.config, self.parallel)


class SoftMergeTrainer(DenseTrainer):
    def build_objective(self) -> nn.Module:
        return MetaObjective(self.model, self.config, self.parallel)

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Δ as SMAT's θ_δ, the router as SMAT's hypernetwork (AdamW)."""
        train = self.config.train
        router = torch.optim.AdamW(self.model.hypernet.parameters(), lr=train.hyper_lr,
                                   weight_decay=train.hyper_weight_decay)
        return {**super().build_optimizers(), "hypernet": router}

    def clip_gradients(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.hypernet.parameters(), self.config.train.hyper_clip)


class PretrainedTrainer(DenseTrainer):
    """Writes the run of the pre-trained model: one checkpoint (step 0, no tensors) marked best, with the
    validation accuracy of the pre-trained backbone, so that evaluation reads it like any other run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.total_steps = 0

    def build_objective(self) -> None:
        return None

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {}

    def fit(self, stop_after: int | None = None) -> dict:
        if self.best_val < 0:  # a resumed run already holds its checkpoint
            self.end_of_epoch()
        return {}


TRAINERS: dict[str, type[Trainer]] = {"pretrained": PretrainedTrainer, "pmf": PMFTrainer,
                                      "softmerge": SoftMergeTrainer, "smat_independent": Trainer}
