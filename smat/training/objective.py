"""Algorithm 1's meta-loss of one meta-batch (this process's share of it), step by step.

Each function is one line (or two) of the paper's Algorithm 1; the reference
code's optional extras are marked as such and switched by config keys:

    for task T_i of the meta-batch:
      α'_i ~ GumbelSigmoid(h_ζ(T_i^s)); α_i = α'_i / Σ_m α'_i,m      merging_weights
      z_m ~ q_φm; θ_i = θ_pre + θ_δ ⊙ Σ_m α_i,m z_m                   merge_task_parameters
      θ_i' = θ_i − η ∇L(T_i^s; θ_i)   (first order)                    support_step
      student logits on T_i^q under θ_i'                              protonet.query_logits
      teacher: K dense SGD steps from sg(θ_i) on L(T_i^q)             dense_teacher_logits
      L_i = β·CE + (1 − β)·KD(teacher → student)                       distillation_terms
    L = mean_i L_i + Σ_m λ_m (E[L0(z_m)]/N − (1 − τ)) + c·mean(h²)    MetaObjective.forward

Task b of this process runs on row b of the merged [B, N] buffer; gradients
with respect to θ are per task because tasks never share a row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..model import protonet
from ..runtime.device import autocast
from ..runtime.seeding import keyed_generator
from .lagrangian import SparsityMultipliers


def support_loss(model, theta: torch.Tensor, tasks, parallel: str = "loop") -> torch.Tensor:
    """Σ_b CE of classifying task b's support set by its own prototypes (the support-set loss)."""
    total = theta.new_zeros(())
    for task, features in zip(tasks, model.task_features(theta, [t.support_x for t in tasks], parallel), strict=True):
        total = total + protonet.support_cross_entropy(features, task.support_y, task.n_way, model.protonet_scale,
                                                       model.protonet_bias)
    return total


def query_loss(model, theta: torch.Tensor, tasks, parallel: str = "loop") -> torch.Tensor:
    """Σ_b CE of task b's query set."""
    return sum(F.cross_entropy(logits, t.query_y)
               for logits, t in zip(protonet.query_logits(model, theta, tasks, parallel), tasks, strict=True))


def gradient_steps(theta: torch.Tensor, loss_fn, lr: float, steps: int) -> torch.Tensor:
    """``steps`` first-order SGD steps: θ ← θ − lr·∇loss(θ), each gradient taken as a constant.

    The result stays differentiable with respect to the ``theta`` passed in (with slope 1), which is the
    first-order approximation of Algorithm 1's support step."""
    for _ in range(steps):
        point = theta.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(point), point)
        theta = theta - lr * grad
    return theta


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                 direction: str = "teacher_student") -> torch.Tensor:
    """T²·KL(p_teacher ‖ p_student) (Hinton et al., ``teacher_student``) or T²·KL(p_student ‖ p_teacher) (the
    reference code, ``student_teacher``) of the tempered softmaxes, averaged over queries."""
    log_student, log_teacher = F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1)
    first, second = (log_teacher, log_student) if direction == "teacher_student" else (log_student, log_teacher)
    return (first.exp() * (first - second)).sum(-1).mean() * temperature ** 2


def dense_teacher_logits(model, theta: torch.Tensor, tasks, lr: float, steps: int,
                         parallel: str = "loop") -> list[torch.Tensor]:
    """Query logits of the dense teacher: θ_i with gradients stopped, ``steps`` SGD steps on the query CE.

    Nothing flows back from the teacher to the student."""
    teacher = gradient_steps(theta.detach(), lambda p: query_loss(model, p, tasks, parallel), lr, steps)
    with torch.no_grad():
        return [logits.detach() for logits in protonet.query_logits(model, teacher.detach(), tasks, parallel)]


def mask_offset(model, step: int, meta_batch: int, first_task: int) -> int:
    """Philox offset of this process's first task: every (step, task) gets its own counters."""
    return (step * meta_batch + first_task) * model.counters_per_task()


def cross_entropies(logits: list[torch.Tensor], tasks) -> torch.Tensor:
    """CE of each task's query logits, fp32 [B]."""
    return torch.stack([F.cross_entropy(out.float(), task.query_y) for out, task in zip(logits, tasks)])


def query_accuracy(logits: list[torch.Tensor], tasks) -> torch.Tensor:
    """Mean query accuracy of the tasks, a 0-d tensor on their device (for the all-reduce of the training log)."""
    return torch.stack([(out.argmax(-1) == task.query_y).float().mean() for out, task in zip(logits, tasks)]).mean()


class MetaObjective(nn.Module):
    """SMAT's meta-loss (also SoftMerge's and the Table 2 ablations'); DDP wraps it when K > 1.

    forward(tasks, first_task, step, temperature, multipliers) returns 'loss' and the metrics 'task_loss',
    'ce', 'kd', 'accuracy', 'alpha_sum' [M], 'density' [M], 'hard_density' [M]."""

    def __init__(self, model, config: Config, parallel: str):
        super().__init__()
        self.model, self.config, self.parallel = model, config, parallel

    def merging_weights(self, tasks, first_task: int, step: int, temperature: float):
        """(hypernetwork logits [B, M], α [B, M]): α'_i ~ GumbelSigmoid(h_ζ(T_i^s)), normalised."""
        model = self.model
        with autocast(self.config, tasks[0].query_x.device):
            prototypes = model.pretrained_prototypes(tasks)
        logits = model.expert_logits(prototypes)
        alpha = torch.cat([model.merging_weights(logits[b:b + 1], temperature,
                                                 keyed_generator(self.config.seed, step, first_task + b))
                           for b in range(len(tasks))])
        return logits, alpha

    def merge_task_parameters(self, alpha: torch.Tensor, step: int, first_task: int) -> torch.Tensor:
        """θ [B, N]: hard-concrete samples z_m of the masks, all tasks in one kernel call."""
        train = self.config.train
        return self.model.merge(alpha, mode=train.noise, seed=self.config.seed,
                                offset=mask_offset(self.model, step, train.meta_batch, first_task))

    def support_step(self, theta: torch.Tensor, tasks) -> torch.Tensor:
        """θ_i' = θ_i − η ∇L(T_i^s; θ_i), first order (``train.inner_steps`` steps at ``train.inner_lr``)."""
        train = self.config.train
        return gradient_steps(theta, lambda p: support_loss(self.model, p, tasks, self.parallel), train.inner_lr,
                              train.inner_steps)

    def distillation_terms(self, theta: torch.Tensor, student: list[torch.Tensor], tasks):
        """KD of each task [B] towards the dense teacher started from ``theta`` (and, an option of the
        reference code, a share ``train.kd_pretrained_share`` towards the pre-trained model), in the direction
        ``train.kd_direction``; None without either."""
        train, model = self.config.train, self.model
        share = train.kd_pretrained_share
        teachers = (dense_teacher_logits(model, theta, tasks, train.teacher_lr, train.teacher_steps, self.parallel)
                    if train.teacher_steps else None)
        pretrained = None
        if share > 0:
            with torch.no_grad():
                pretrained = protonet.query_logits(model, None, tasks)
        if teachers is None and pretrained is None:
            return None
        kd = student[0].new_zeros(len(tasks), dtype=torch.float32)
        for b, s in enumerate(student):
            if teachers is not None:
                kd[b] = kd[b] + (1 - share) * distillation(s.float(), teachers[b].float(), train.kd_temperature,
                                                           train.kd_direction)
            if pretrained is not None:
                kd[b] = kd[b] + share * distillation(s.float(), pretrained[b].float(), train.kd_temperature,
                                                     train.kd_direction)
        return kd

    def forward(self, tasks, first_task: int, step: int, temperature: float,
                multipliers: SparsityMultipliers) -> dict[str, torch.Tensor]:
        model, train = self.model, self.config.train
        if not train.support_query_split:  # Table 2, row 4: the pooled images serve as both sets
            tasks = [task.pooled() for task in tasks]
        logits, alpha = self.merging_weights(tasks, first_task, step, temperature)
        theta = self.merge_task_parameters(alpha, step, first_task)
        measure_alignment = train.alignment_every > 0 and step % train.alignment_every == 0 and len(tasks) > 1
        if measure_alignment:
            theta.retain_grad()
        with autocast(self.config, tasks[0].query_x.device):
            adapted = self.support_step(theta, tasks)
            student = protonet.query_logits(model, adapted, tasks, self.parallel)
            # Algorithm 1's teacher starts from sg(θ_i); the reference code's from sg(θ_i') after the support step
            kd = self.distillation_terms(adapted if train.teacher_start == "after_support_step" else theta,
                                         student, tasks)
        ce = cross_entropies(student, tasks)
        ce_weight = train.ce_weight if kd is not None else 1.0
        kd = kd if kd is not None else torch.zeros_like(ce)
        task_loss = (ce_weight * ce + (1 - ce_weight) * kd).mean()
        # Σ_m λ_m C_m: the sparsity constraints, and the hypernetwork's logit penalty
        density = model.expected_density()
        loss = task_loss + multipliers.penalty(density) + train.hyper_penalty * (logits ** 2).mean()
        out = {"loss": loss, "task_loss": task_loss.detach(), "ce": ce.detach().mean(), "kd": kd.detach().mean(),
               "accuracy": query_accuracy(student, tasks), "alpha_sum": alpha.detach().sum(0),
               "density": density.detach(), "hard_density": 1 - model.hard_sparsity()}
        if measure_alignment:
            out.update(theta=theta, alpha=alpha)
        return out


class ProtoNetObjective(nn.Module):
    """PMF's meta-loss: ProtoNet cross-entropy of each task's queries under θ_pre + δ (no support step, no
    teacher, no KD). Same forward signature and outputs as :class:`MetaObjective`."""

    def __init__(self, model, config: Config, parallel: str):
        super().__init__()
        self.model, self.config, self.parallel = model, config, parallel

    def forward(self, tasks, first_task: int, step: int, temperature: float, multipliers) -> dict[str, torch.Tensor]:
        alpha = self.model.task_alpha(tasks, temperature)
        theta = self.model.merge(alpha)
        with autocast(self.config, tasks[0].query_x.device):
            logits = protonet.query_logits(self.model, theta, tasks, self.parallel)
        ce = cross_entropies(logits, tasks).mean()
        return {"loss": ce, "task_loss": ce.detach(), "ce": ce.detach(), "kd": torch.zeros_like(ce.detach()),
                "accuracy": query_accuracy(logits, tasks), "alpha_sum": alpha.sum(0)}
