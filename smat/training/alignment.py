"""The meta-gradient alignment between tasks (the paper's Fig. 4), measured during training."""

from __future__ import annotations

import torch


@torch.no_grad()
def gradient_alignment(model, out: dict) -> dict:
    """Mean cosine between the meta-gradients of this process's tasks.

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
