"""Meta-test adaptation of a meta-tuned model to one few-shot task.

Modes (``python -m smat.evaluate --mode ...``):

- ``protonet``: no adaptation; θ_i from the hypernetwork's evaluation α, ProtoNet on the query.
- ``select``: Algorithm 2, gradient-free expert selection over binary α' (:mod:`smat.adapt.select`).
- ``full``: Algorithm 3, every backbone parameter fine-tuned from θ_i on the support set
  (:mod:`smat.adapt.finetune`).
- ``lora``: LoRA adapters on the attention projections over a frozen θ_i (:mod:`smat.adapt.lora`).

The options of every mode are one :class:`AdaptConfig`, overridden on the command line with
``adapt.<key>=value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ConfigError, number_or_value, type_problems

MODES = ("protonet", "select", "full", "lora")
GRADIENT_MODES = ("full", "lora")  # the modes whose learning rate is chosen from a grid
PROTOTYPES = ("clean", "augmented")
# how the learning rate of full and lora is chosen from the grid:
# - val_else_support (PMF): one rate per domain from its val split's first lr_tasks tasks; a domain without
#   a val split chooses per task from its support set alone (PMF's ProtoNet_Auto_Finetune)
# - support: every task chooses per task from its support set alone
# - val_else_test (smat before issue 13): a domain without a val split chooses on its first lr_tasks test
#   tasks, whose queries are then scored again; kept to compare with earlier results
LR_CHOICES = ("val_else_support", "support", "val_else_test")


@dataclass
class AdaptConfig:
    """Options of the meta-test modes; the defaults are the paper's protocol (Section 5, Appendix B)."""

    steps: int = 50  # Adam(W) steps on the support set (full, LoRA)
    # learning rates tried per domain for full fine-tuning; LoRA multiplies each by lora_lr_scale
    lr_grid: list[float] = field(default_factory=lambda: [0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    lr_tasks: int = 5  # val tasks per domain that choose the learning rate (lr_choice)
    lr_choice: str = "val_else_support"  # LR_CHOICES; no choice sees a test query before it is scored
    lr: float | None = None  # a fixed learning rate instead of the grid search
    weight_decay: float = 0.0  # AdamW's decay pulls towards 0, i.e. away from θ_i; off unless asked for
    augment_probability: float = 0.9  # DiffAugment applied to each support image with this probability
    augment_flip: bool = True  # DiffAugment's horizontal flip; off anyway where the run has data.train_flip=false
    # the support loss of full and lora: augmented support images against the prototypes of the 'clean'
    # support images (PMF's ProtoNet_Finetune) or of the 'augmented' batch itself
    prototypes: str = "clean"
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_lr_scale: float = 10.0
    # module name suffixes; attn.q, attn.k, attn.v: slices of timm's fused attn.qkv (smat.adapt.lora). The
    # authors' code: query and value, i.e. [attn.q, attn.v]
    lora_targets: list[str] = field(default_factory=lambda: ["attn.qkv", "attn.proj"])
    # Algorithm 2: R rounds of M single-bit flips; 6 rounds of 8 experts ≈ the paper's "50 steps"
    select_rounds: int = 6
    select_rho: float = 0.9  # probability of accepting an improvement (a worse candidate: 1 − ρ)
    seed: int = 0  # augmentation and acceptance draws; task k of a domain uses (seed, k)

    def learning_rates(self, mode: str) -> list[float]:
        """The grid of ``mode`` (its single fixed rate when ``lr`` is set)."""
        base = [self.lr] if self.lr is not None else list(self.lr_grid)
        scale = self.lora_lr_scale if mode == "lora" else 1.0
        return [rate * scale for rate in base]


def validate_adapt(options: AdaptConfig) -> AdaptConfig:
    """Raise one ConfigError naming every impossible option; return ``options`` when they are sound."""
    # YAML reads 1e-3 (no dot) as a string: numbers written as text count as numbers
    options.lr = number_or_value(options.lr)
    if isinstance(options.lr_grid, list):
        options.lr_grid = [number_or_value(rate) for rate in options.lr_grid]
    problems = type_problems(options, "adapt.", repair=True)  # types first: the checks below compare numbers
    rates = options.learning_rates("full")
    for name in ("steps", "select_rounds", "lora_rank", "lr_tasks"):
        value = getattr(options, name)
        low = 1 if name in ("lora_rank", "lr_tasks") else 0
        if not isinstance(value, int) or value < low:
            problems.append(f"adapt.{name} must be an integer ≥ {low}; got {value!r}")
    for name in ("select_rho", "augment_probability", "lora_dropout"):
        if not 0.0 <= getattr(options, name) <= 1.0:
            problems.append(f"adapt.{name} must be in [0, 1]; got {getattr(options, name)!r}")
    if not rates or any(rate < 0 for rate in rates):
        problems.append(f"adapt.lr_grid (or adapt.lr) must hold non-negative numbers; got lr_grid="
                        f"{options.lr_grid!r}, lr={options.lr!r}")
    if not options.lora_targets:
        problems.append("adapt.lora_targets must name at least one module suffix, e.g. attn.qkv")
    for name, allowed in (("prototypes", PROTOTYPES), ("lr_choice", LR_CHOICES)):
        if getattr(options, name) not in allowed:
            problems.append(f"adapt.{name} must be one of {', '.join(allowed)}; got {getattr(options, name)!r}")
    if problems:
        raise ConfigError("invalid adaptation options:\n  - " + "\n  - ".join(problems))
    return options
