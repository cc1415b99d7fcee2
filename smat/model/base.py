"""The one interface every method's model has: a frozen timm ViT, its flat parameter buffer θ_pre [N],
features under any task's weights, and what meta-training learns.

A method's model says what it has as data, not by the attributes it happens to carry:

- ``num_experts``: M, the experts it merges (0 for the pre-trained backbone);
- ``masked``: its experts are sparse hard-concrete masks (``log_alpha`` [N, M]), with a sparsity
  constraint in training and Algorithm 2 at meta-test time;
- ``routed``: a hypernetwork scores the experts from each task's support set.

What differs between methods is :meth:`TaskModel.task_parameters`, how θ_i [N] of task i is built.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from . import protonet
from .flat import FlatLayout


class TaskModel(nn.Module):
    """θ_pre and the features of a frozen backbone; the pre-trained model itself (θ_i = θ_pre)."""

    masked = False
    routed = False

    def __init__(self, backbone: nn.Module, expert_patterns=("*",), protonet_scale: float = 10.0,
                 backend: str | None = None):
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.layout = FlatLayout(backbone, expert_patterns)
        self.register_buffer("theta_pre", self.layout.flatten(backbone), persistent=False)
        self.layout.tie(backbone, self.theta_pre)
        self.protonet_scale = protonet_scale
        self.protonet_bias = 0.0  # the cosine head: logits = scale·(cos + bias); PMF learns both
        self.backend = backend

    @property
    def num_experts(self) -> int:
        return 0

    def _apply(self, fn, recurse=True):
        # .to()/.cuda() replace the buffer; the backbone's parameters must stay views of it
        result = super()._apply(fn, recurse)
        self.layout.tie(self.backbone, self.theta_pre)
        return result

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # no dropout or drop-path in the frozen feature extractor
        return self

    # ------------------------------------------------------------------ features

    def features(self, theta: torch.Tensor | None, images: torch.Tensor) -> torch.Tensor:
        """images [S, 3, H, W] → features [S, D] with the selected parameters taken from ``theta`` [N]
        (``None``: the pre-trained weights)."""
        if theta is None:
            return self.backbone(images)
        return functional_call(self.backbone, self.layout.views(theta), (images,), strict=False)

    def task_features(self, theta: torch.Tensor | None, images: list[torch.Tensor], parallel: str = "loop"):
        """One image batch per task under its own row of ``theta`` [B, N] (``None``: θ_pre for every task)
        → list of [S_b, D]. ``parallel='vmap'`` runs the B backbones as one batched call (equal shapes)."""
        if theta is None:
            return [self.features(None, x) for x in images]
        if parallel == "vmap" and len({tuple(x.shape) for x in images}) == 1:
            stacked = vmap(self.features, in_dims=(0, 0), randomness="same")(theta, torch.stack(images))
            return list(stacked.unbind(0))
        return [self.features(row, x) for row, x in zip(theta.unbind(0), images, strict=True)]

    @torch.no_grad()
    def pretrained_prototypes(self, tasks) -> list[torch.Tensor]:
        """Class prototypes fp32 [n_way_b, D] of each task's support set under θ_pre (the router's input)."""
        return [protonet.prototypes(self.features(None, t.support_x).float(), t.support_y, t.n_way) for t in tasks]

    # ------------------------------------------------------------------ task weights

    @torch.no_grad()
    def task_parameters(self, tasks, temperature: float, prototypes=None) -> torch.Tensor | None:
        """θ [B, N] of the tasks at meta-test time; None: every task runs on the pre-trained weights.
        ``prototypes``: the tasks' :meth:`pretrained_prototypes` where the caller has them already."""
        return None

    # ------------------------------------------------------------------ experts (dense by default)

    def counters_per_task(self) -> int:
        """Philox counters one task's mask noise uses (0: no masks, no noise)."""
        return 0

    def expected_density(self) -> torch.Tensor:
        """Mean P(z ≠ 0) per expert, fp32 [M]: dense experts are fully dense."""
        return self.theta_pre.new_ones(self.num_experts, dtype=torch.float32)

    @torch.no_grad()
    def hard_sparsity(self) -> torch.Tensor:
        """Fraction of each expert's deterministic mask that is exactly 0, fp32 [M]."""
        return 1.0 - self.expected_density().detach()

    @torch.no_grad()
    def hard_masks(self) -> torch.Tensor:
        """bool [N, M]: where each expert acts (everywhere, for dense experts)."""
        return torch.ones(self.layout.num_elements, self.num_experts, dtype=torch.bool, device=self.theta_pre.device)

    def head_parameters(self) -> list[nn.Parameter]:
        """The cosine head's learned scale and bias (PMF); none for a fixed head."""
        return []

    # ------------------------------------------------------------------ state

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """What meta-training learns: everything but the frozen backbone (θ_pre is saved once per run)."""
        return {name: value.detach() for name, value in self.state_dict().items() if not name.startswith("backbone.")}

    @torch.no_grad()
    def load_trainable_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        result = self.load_state_dict(tensors, strict=False)
        missing = [name for name in result.missing_keys if not name.startswith("backbone.")]
        if missing or result.unexpected_keys:
            raise KeyError(f"{type(self).__name__}: tensors missing {missing}, unexpected {result.unexpected_keys}")

    def identity(self) -> dict:
        """What a checkpoint of this model must match (with the run's method and backbone name)."""
        return {"num_elements": self.layout.num_elements, "num_experts": self.num_experts}

    def num_parameters(self) -> dict[str, int]:
        """{"theta_pre": N, <trained submodule or parameter>: count}."""
        counts = {"theta_pre": self.layout.num_elements}
        for name, parameter in self.named_parameters():
            if parameter.requires_grad:
                top = name.split(".")[0]
                counts[top] = counts.get(top, 0) + parameter.numel()
        return counts

    def describe(self) -> str:
        counts = self.num_parameters()
        trained = ", ".join(f"{name} {count:,}" for name, count in counts.items() if name != "theta_pre") or "nothing"
        experts = f"{self.num_experts} dense expert(s); " if self.num_experts else ""
        return (f"{type(self).__name__} over {type(self.backbone).__name__}: N = {counts['theta_pre']:,} parameters "
                f"({len(self.layout.slots)} tensors); {experts}trained: {trained}")
