"""SMAT's model: θ_i = θ_pre + θ_δ ⊙ Σ_m α_{i,m} z_m over a frozen timm ViT.

- ``theta_pre`` [N]: the pre-trained values of every parameter that carries
  experts, in one flat buffer; the backbone's own parameters are views of it.
- ``delta`` [N] (θ_δ, initialised to 0) and ``log_alpha`` [N, M] (the
  hard-concrete mask logits of M experts, expert-minor): trained.
- ``hypernet``: support set → M logits → Gumbel-sigmoid → α.

The merge of all B tasks of a meta-batch is one ``smat_kernels.merge`` call;
the backbone then runs on each task's row of the merged [B, N] buffer.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vmap

import smat_kernels

from . import hypernet as hyper
from . import protonet
from .backbone import feature_dim
from .config import ModelConfig
from .flat import FlatLayout
from .hypernet import Hypernetwork


class SparseInterpolatedExperts(nn.Module):
    def __init__(self, backbone: nn.Module, num_experts: int = 8, expert_patterns=("*",),
                 log_alpha_init_mean: float = 0.0, log_alpha_init_std: float = 0.5,
                 log_alpha_range=(-10.0, 10.0), hyper_tokens: int = 4, hyper_heads: int = 4,
                 hyper_mlp_ratio: float = 2.0, protonet_scale: float = 10.0, backend: str | None = None):
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.layout = FlatLayout(backbone, expert_patterns)
        self.register_buffer("theta_pre", self.layout.flatten(backbone), persistent=False)
        self.layout.tie(backbone, self.theta_pre)
        n, m = self.layout.num_elements, num_experts
        self.delta = nn.Parameter(torch.zeros(n))
        self.log_alpha = nn.Parameter(torch.randn(n, m) * log_alpha_init_std + log_alpha_init_mean)
        self.log_alpha_range = (float(log_alpha_range[0]), float(log_alpha_range[1]))
        self.project_log_alpha()
        self.hypernet = Hypernetwork(feature_dim(backbone), m, hyper_tokens, hyper_heads, hyper_mlp_ratio)
        self.protonet_scale = protonet_scale
        self.backend = backend

    @classmethod
    def from_config(cls, config: ModelConfig, backbone: nn.Module) -> SparseInterpolatedExperts:
        return cls(backbone, config.num_experts, config.expert_patterns, config.log_alpha_init_mean,
                   config.log_alpha_init_std, config.log_alpha_range, config.hyper_tokens, config.hyper_heads,
                   config.hyper_mlp_ratio, config.protonet_scale, config.backend)

    @property
    def num_experts(self) -> int:
        return self.log_alpha.shape[1]

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

    def task_features(self, theta: torch.Tensor, images: list[torch.Tensor], parallel: str = "loop"):
        """One image batch per task under its own row of ``theta`` [B, N] → list of [S_b, D].

        ``parallel='vmap'`` runs the B backbones as one batched call (needs equal shapes)."""
        if parallel == "vmap" and len({tuple(x.shape) for x in images}) == 1:
            stacked = vmap(self.features, in_dims=(0, 0), randomness="same")(theta, torch.stack(images))
            return list(stacked.unbind(0))
        return [self.features(row, x) for row, x in zip(theta.unbind(0), images, strict=True)]

    @torch.no_grad()
    def pretrained_prototypes(self, support_x: list[torch.Tensor], support_y: list[torch.Tensor],
                              n_ways: list[int]) -> list[torch.Tensor]:
        return [protonet.prototypes(self.features(None, x).float(), y, n)
                for x, y, n in zip(support_x, support_y, n_ways, strict=True)]

    # ------------------------------------------------------------------ experts

    def expert_logits(self, prototypes: list[torch.Tensor]) -> torch.Tensor:
        """Hypernetwork logits fp32 [B, M] from the pre-trained class prototypes of each task."""
        return self.hypernet(prototypes)

    @staticmethod
    def merging_weights(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
                        hard: bool = False) -> torch.Tensor:
        """α [B, M]: Gumbel-sigmoid scores (``generator=None``: their evaluation form), normalised to sum 1.

        ``hard``: scores rounded to {0, 1} first (Algorithm 2's starting point)."""
        scores = hyper.gumbel_sigmoid(logits, temperature, generator)
        return hyper.normalise(scores.round() if hard else scores)

    @torch.no_grad()
    def task_alpha(self, tasks, temperature: float, hard: bool = False) -> torch.Tensor:
        """Evaluation-time α [B, M] of the tasks: sigmoid(logits / T) of the hypernetwork, normalised."""
        prototypes = self.pretrained_prototypes([t.support_x for t in tasks], [t.support_y for t in tasks],
                                                [t.n_way for t in tasks])
        return self.merging_weights(self.expert_logits(prototypes), temperature, None, hard)

    @torch.no_grad()
    def task_parameters(self, tasks, temperature: float) -> torch.Tensor:
        """θ [B, N] of the tasks at meta-test time: evaluation α, deterministic masks, one merge call."""
        return self.merge(self.task_alpha(tasks, temperature), mode="deterministic")

    def merge(self, alpha: torch.Tensor, mode: str = "deterministic", seed: int = 0, offset: int = 0,
              backend: str | None = None) -> torch.Tensor:
        """θ [B, N] for merging weights ``alpha`` [B, M]; one kernel call for all tasks."""
        return smat_kernels.merge(self.theta_pre, self.delta.to(self.theta_pre.dtype), self.log_alpha,
                                  alpha.float().contiguous(), mode=mode, seed=seed, offset=offset,
                                  backend=backend or self.backend)

    def counters_per_task(self) -> int:
        """Philox counters one task's masks use: offsets of consecutive tasks are this far apart."""
        return smat_kernels.counters_per_call(1, self.layout.num_elements, self.num_experts)

    @torch.no_grad()
    def project_log_alpha(self) -> None:
        self.log_alpha.clamp_(*self.log_alpha_range)

    def expected_density(self) -> torch.Tensor:
        """Mean P(z ≠ 0) per expert, fp32 [M], differentiable (the L0 term)."""
        return smat_kernels.expected_density(self.log_alpha, backend=self.backend)

    @torch.no_grad()
    def hard_masks(self) -> torch.Tensor:
        """bool [N, M]: where each expert's deterministic mask is non-zero.

        z = clamp(sigmoid(log_α)(ζ − γ) + γ, 0, 1) > 0 exactly when sigmoid(log_α) > −γ / (ζ − γ)."""
        threshold = -smat_kernels.GAMMA / (smat_kernels.ZETA - smat_kernels.GAMMA)
        return self.log_alpha.detach() > math.log(threshold / (1 - threshold))

    @torch.no_grad()
    def hard_sparsity(self) -> torch.Tensor:
        """Fraction of each expert's deterministic mask that is exactly 0, [M]."""
        return 1.0 - smat_kernels.hard_density(self.log_alpha, backend=self.backend)

    # ------------------------------------------------------------------ state

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """What meta-training learns (θ_δ, log_α, the hypernetwork with its spectral-norm buffers);
        θ_pre is saved once per run, separately."""
        tensors = {"delta": self.delta.detach(), "log_alpha": self.log_alpha.detach()}
        tensors.update({f"hypernet.{k}": v for k, v in self.hypernet.state_dict().items()})
        return tensors

    @torch.no_grad()
    def load_trainable_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.delta.copy_(tensors["delta"])
        self.log_alpha.copy_(tensors["log_alpha"])
        self.hypernet.load_state_dict({k.removeprefix("hypernet."): v for k, v in tensors.items()
                                       if k.startswith("hypernet.")})

    def num_parameters(self) -> dict[str, int]:
        return {"theta_pre": self.layout.num_elements, "delta": self.delta.numel(),
                "log_alpha": self.log_alpha.numel(),
                "hypernet": sum(p.numel() for p in self.hypernet.parameters())}

    def describe(self) -> str:
        counts = self.num_parameters()
        return (f"SMAT over {type(self.backbone).__name__}: N = {counts['theta_pre']:,} parameters carry "
                f"{self.num_experts} experts ({len(self.layout.slots)} tensors); hypernetwork "
                f"{counts['hypernet']:,} parameters; log_alpha in [{self.log_alpha_range[0]:g}, "
                f"{self.log_alpha_range[1]:g}]")


