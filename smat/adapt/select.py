"""Algorithm 2: gradient-free expert selection at meta-test time.

α' ∈ {0, 1}^M starts from the hypernetwork's evaluation scores sigmoid(logits / T) rounded to {0, 1}.
Each of R rounds scores the M single-bit flips of the current α' with forward passes only (the
support-set loss under θ = θ_pre + θ_δ ⊙ Σ_m α_m z_m, α = α' / Σ α', deterministic masks), then walks
through them in order: a candidate whose loss is below the current loss is accepted with probability
ρ, any other with 1 − ρ. The α' returned is the one with the lowest support loss of all evaluated,
the starting α' included, so selection can never end with a higher support loss than it started with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import hypernet, protonet
from ..model.protonet import support_cross_entropy


@dataclass
class Selection:
    binary: torch.Tensor  # bool [M]: α' with the lowest support loss seen
    alpha: torch.Tensor  # fp32 [M]: α' / Σ α' (all zeros when every expert is off, i.e. θ_pre)
    start_loss: float  # support loss of the hypernetwork's rounded α'
    best_loss: float  # support loss of ``binary``; never above ``start_loss``
    evaluations: int  # support-set forward passes spent (1 + R·M)


def binary_to_alpha(binary: torch.Tensor) -> torch.Tensor:
    """α' bool/float [B, M] → α fp32 [B, M] = α' / Σ_m α'.

    Unlike :func:`smat.model.hypernet.normalise`, an all-zero row stays zero: with every expert off the merge
    gives θ_pre, which is what switching all experts off means (uniform α would switch them all on)."""
    binary = binary.float()
    return binary / binary.sum(-1, keepdim=True).clamp_min(1.0)


@torch.no_grad()
def initial_binary(model, tasks, temperature: float) -> torch.Tensor:
    """α' bool [B, M]: the hypernetwork's evaluation scores of each task rounded to {0, 1}."""
    prototypes = model.pretrained_prototypes(tasks)
    return hypernet.gumbel_sigmoid(model.expert_logits(prototypes), temperature, None).round().bool()


@torch.no_grad()
def support_losses(model, binary: torch.Tensor, task, parallel: str = "loop") -> torch.Tensor:
    """Support loss of ``task`` under each of C candidate α' rows, bool [C, M] → fp32 [C].

    All C candidates are merged in one kernel call ([C, N]); the support set then runs once per row."""
    theta = model.merge(binary_to_alpha(binary), mode="deterministic")
    features = model.task_features(theta, [task.support_x] * binary.shape[0], parallel)
    return torch.stack([support_cross_entropy(f, task.support_y, task.n_way, model.protonet_scale, model.protonet_bias)
                        for f in features])


@torch.no_grad()
def select_experts(model, task, temperature: float, rounds: int, rho: float,
                   generator: torch.Generator | None = None, parallel: str = "loop") -> Selection:
    """Algorithm 2 for one task; ``generator`` (CPU) draws the acceptance tests.

    Candidates of a round are scored against the round's starting state: candidate m is the round's
    starting α' with bit m flipped, so that the M candidates are merged and scored as one batch. They
    are then accepted or rejected in order against the loss of the latest accepted state; an accepted
    candidate replaces (does not add its flip to) a candidate accepted earlier in the same round, so
    every state the walk visits is one whose loss was measured. The next round starts from the last
    accepted state. (The paper flips bits one after another, scoring each on the state left by the
    previous decision; it records l* only on accepted improvements, where this keeps the best of every
    evaluated α'.)"""
    current = initial_binary(model, [task], temperature)[0]
    current_loss = start_loss = float(support_losses(model, current[None], task, parallel)[0])
    best, best_loss = current, current_loss
    num_experts = current.numel()
    flips = torch.eye(num_experts, dtype=torch.bool, device=current.device)
    draws = torch.rand(rounds, num_experts, generator=generator, dtype=torch.float64).tolist()
    for round_draws in draws:
        candidates = current[None] ^ flips  # row m: the round's starting α' with bit m flipped
        losses = support_losses(model, candidates, task, parallel).tolist()  # one device sync per round
        for m, (loss, draw) in enumerate(zip(losses, round_draws)):
            if loss < best_loss:
                best, best_loss = candidates[m], loss
            if draw < (rho if loss < current_loss else 1.0 - rho):
                current, current_loss = candidates[m], loss
    return Selection(best.clone(), binary_to_alpha(best[None])[0], start_loss, best_loss,
                     1 + rounds * num_experts)


@torch.no_grad()
def selection_accuracy(model, task, selection: Selection, parallel: str = "loop") -> float:
    """ProtoNet query accuracy of ``task`` under the selected α."""
    theta = model.merge(selection.alpha[None], mode="deterministic")
    (logits,) = protonet.query_logits(model, theta, [task], parallel)
    return protonet.accuracy(logits, task.query_y)
