"""LoRA at meta-test time: low-rank adapters over the task's frozen merged weights θ_i.

θ_i is loaded into a private copy of the backbone (:func:`smat.adapt.finetune.task_backbone`); peft
then wraps the attention projections (``attn.qkv`` and ``attn.proj`` of every timm ViT block by
default; r = 8, alpha = 32, dropout 0.1) and only the adapters' A and B matrices train, with the
learning rate of full fine-tuning × 10. B starts at zero, so before the first step the adapted
backbone computes exactly θ_i's features.

Query and value only (the authors' code: ``target_modules=["query", "value"]`` of a Hugging Face ViT,
whose q, k and v are separate Linear layers): timm fuses them into one ``attn.qkv`` Linear, so the
targets ``attn.q``, ``attn.k`` and ``attn.v`` name output slices of it. :class:`SlicedLoRA` gives each
named slice its own rank-r pair (A_s [r, D], B_s [D, r]) and adds scaling·B_s A_s dropout(x) to that
third of the output only: exactly a LoRA on a separate query (value) Linear layer. The other slices
are untouched.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ConfigError
from .finetune import FineTuned, fine_tune, head_of, task_backbone

LORA_MARK = "lora_"  # peft names its adapter parameters …lora_A.<adapter>.weight / …lora_B.<adapter>.weight
SLICES = {"q": 0, "k": 1, "v": 2}  # output thirds of a fused qkv projection


class SlicedLoRA(nn.Module):
    """A fused qkv Linear [3D ← D] with LoRA on some of its output thirds, each with its own A and B."""

    def __init__(self, base_layer: nn.Linear, slices, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.dim = base_layer.out_features // 3
        self.slices = sorted(slices, key=SLICES.get)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.lora_A = nn.ModuleDict({name: nn.Linear(base_layer.in_features, rank, bias=False)
                                     for name in self.slices})  # nn.Linear's initialisation, as peft's A
        self.lora_B = nn.ModuleDict({name: nn.Linear(rank, self.dim, bias=False) for name in self.slices})
        for layer in self.lora_B.values():
            nn.init.zeros_(layer.weight)
        self.to(base_layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        dropped = self.dropout(x)
        parts = [self.lora_B[name](self.lora_A[name](dropped)) * self.scaling if name in self.lora_A
                 else out.new_zeros(*out.shape[:-1], self.dim) for name in SLICES]
        return out + torch.cat(parts, -1).to(out.dtype)


def _split_targets(targets) -> tuple[list[str], dict[str, list[str]]]:
    """(module suffixes for peft, {fused-projection suffix: [slices]}): ``attn.q`` → ``attn.qkv``, q."""
    modules, sliced = [], {}
    for target in targets:
        head, _, last = target.rpartition(".")
        if last in SLICES:
            sliced.setdefault(f"{head}.qkv" if head else "qkv", []).append(last)
        else:
            modules.append(target)
    return modules, sliced


def add_sliced_lora(backbone: nn.Module, sliced: dict[str, list[str]], options) -> int:
    """Replace every fused projection named in ``sliced`` by a :class:`SlicedLoRA`; returns how many."""
    found = [(name, module) for name, module in backbone.named_modules()
             if isinstance(module, nn.Linear) and any(name == s or name.endswith("." + s) for s in sliced)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        suffix = next(s for s in sliced if name == s or name.endswith("." + s))
        setattr(parent, child, SlicedLoRA(module, sliced[suffix], options.lora_rank, options.lora_alpha,
                                          options.lora_dropout))
    return len(found)


def target_pattern(suffixes) -> str:
    """A regular expression peft matches against full module names: any module ending in one of
    ``suffixes`` (e.g. ``attn.qkv``), and not ``patch_embed.proj``, which a bare ``proj`` would also hit."""
    return r"(.*\.)?(" + "|".join(re.escape(suffix) for suffix in suffixes) + ")"


def require_peft():
    """peft's (LoraConfig, inject_adapter_in_model); a ConfigError where peft is not installed.

    Evaluation calls this before measuring anything: importing peft takes seconds and tens of MiB."""
    try:
        from peft import LoraConfig, inject_adapter_in_model  # here, not at import: peft takes seconds to load
    except ImportError as error:
        raise ConfigError(_peft_import_failure(error)) from None
    return LoraConfig, inject_adapter_in_model


def _peft_import_failure(error: ImportError) -> str:
    """The message for a failed ``import peft``: a missing peft is named as such; a peft that is installed but
    fails to import (a broken dependency, a module of the user's shadowing one peft imports) shows the real
    error and where it came from, since "install peft" would send the user the wrong way."""
    if isinstance(error, ModuleNotFoundError) and error.name == "peft":
        return "mode lora needs the peft package, which is not installed; install it with `pip install peft`"
    origin = f" (from {error.path})" if getattr(error, "path", None) else ""
    return (f"mode lora needs peft, which is installed but failed to import: {type(error).__name__}: {error}{origin}; "
            f"fix that import (a local file or folder named like a package peft imports can shadow it)")


def add_lora(backbone: nn.Module, options) -> nn.Module:
    """Inject LoRA adapters into ``backbone`` in place; only the adapters require gradients.

    Targets ending in ``.q``, ``.k`` or ``.v`` are slices of the fused ``qkv`` projection (:class:`SlicedLoRA`);
    the others are module name suffixes for peft."""
    modules, sliced = _split_targets(options.lora_targets)
    clash = [suffix for suffix in sliced if suffix in modules]
    if clash:
        raise ConfigError(f"adapt.lora_targets={list(options.lora_targets)} names {clash[0]} both whole and by "
                          f"slice; give one of the two")
    if sliced and not add_sliced_lora(backbone, sliced, options):
        raise ConfigError(f"adapt.lora_targets={list(options.lora_targets)}: the backbone has no fused projection "
                          f"named {', '.join(sliced)}")
    if modules:
        lora_config, inject_adapter_in_model = require_peft()
        config = lora_config(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                             target_modules=target_pattern(modules), bias="none")
        try:
            backbone = inject_adapter_in_model(config, backbone)
        except ValueError as error:
            raise ConfigError(f"adapt.lora_targets={list(options.lora_targets)} matches no module of the backbone "
                              f"({error})") from None
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_(LORA_MARK in name)
    return backbone


def lora_parameters(backbone: nn.Module) -> list[nn.Parameter]:
    return [p for name, p in backbone.named_parameters() if LORA_MARK in name]


def lora_finetune(model, theta: torch.Tensor | None, task, lr: float, options,
                  generator: torch.Generator | None = None, precision: torch.dtype | None = None) -> FineTuned:
    """LoRA fine-tuning for one task from θ_i (``theta`` [N]; None: θ_pre); ``lr`` is used as given
    (:meth:`smat.adapt.AdaptConfig.learning_rates` already applies the ×10)."""
    backbone = add_lora(task_backbone(model, theta), options).to(task.support_x.device)
    scale, bias = head_of(model)
    losses = fine_tune(backbone, lora_parameters(backbone), task, lr, options.steps, scale,
                       options.augment_probability, options.weight_decay, generator, precision,
                       options.augment_flip, bias, options.prototypes)
    return FineTuned(backbone, losses)
