"""LoRA at meta-test time: low-rank adapters over the task's frozen merged weights θ_i.

θ_i is loaded into a private copy of the backbone (:func:`smat.adapt.finetune.task_backbone`); peft
then wraps the attention projections (``attn.qkv`` and ``attn.proj`` of every timm ViT block by
default; r = 8, alpha = 32, dropout 0.1) and only the adapters' A and B matrices train, with the
learning rate of full fine-tuning × 10. B starts at zero, so before the first step the adapted
backbone computes exactly θ_i's features.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import ConfigError
from .finetune import FineTuned, fine_tune, task_backbone

LORA_MARK = "lora_"  # peft names its adapter parameters …lora_A.<adapter>.weight / …lora_B.<adapter>.weight


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
        raise ConfigError(f"mode lora needs the peft package ({error}); install it with `pip install peft`") from None
    return LoraConfig, inject_adapter_in_model


def add_lora(backbone: nn.Module, options) -> nn.Module:
    """Inject LoRA adapters into ``backbone`` in place; only the adapters require gradients."""
    lora_config, inject_adapter_in_model = require_peft()
    config = lora_config(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                         target_modules=target_pattern(options.lora_targets), bias="none")
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
    losses = fine_tune(backbone, lora_parameters(backbone), task, lr, options.steps, model.protonet_scale,
                       options.augment_probability, options.weight_decay, generator, precision,
                       options.augment_flip)
    return FineTuned(backbone, losses)
