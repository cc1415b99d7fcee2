"""Backbones: any timm Vision Transformer, or the small built-in ViT for CPU runs.

A backbone maps images [B, 3, H, W] to features [B, D] (timm with
``num_classes=0``: the pooled, normalised class token). Weights come from a
local file (safetensors or a PyTorch checkpoint, read with
``weights_only=True``), from timm's cache, or, for the built-in ViT, from the
built-in pre-training cache (:mod:`smat.pretrain`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..config import BuiltinArch, ConfigError, ModelConfig, short, short_text

BUILTIN = "builtin"


class ConvStem(PatchEmbed):
    """timm's PatchEmbed with a small convolutional stem in place of the one linear patch projection.

    log2(patch_size) − 1 stride-2 3×3 convolutions (GELU after each, widths doubling up to the embedding
    width), then a stride-2 2×2 convolution to ``embed_dim``: the same token grid as a patch embedding,
    with the locality prior a ViT trained from scratch on a few thousand tiny images lacks (Xiao et al.
    2021, "Early convolutions help transformers see better"). No normalisation layers with running
    statistics, so the whole backbone stays a pure function of its parameters under SMAT's merge.
    """

    def __init__(self, *args, stem_width: int = 32, **kwargs):
        super().__init__(*args, **kwargs)
        patch = self.patch_size[0]
        stages = int(math.log2(patch))
        if 2 ** stages != patch or self.patch_size[0] != self.patch_size[1] or stages < 1:
            raise ValueError(f"the conv stem needs a square power-of-two patch size; got {self.patch_size}")
        in_chans, embed_dim = self.proj.in_channels, self.proj.out_channels
        layers, width = [], in_chans
        for stage in range(stages - 1):
            out = min(stem_width * 2 ** stage, embed_dim)
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GELU()]
            width = out
        layers.append(nn.Conv2d(width, embed_dim, 2, stride=2))
        self.proj = nn.Sequential(*layers)


def create_builtin(arch: BuiltinArch, image_size: int) -> nn.Module:
    """The small built-in ViT (a timm VisionTransformer): a linear patch embedding or a conv stem."""
    embed_layer = functools.partial(ConvStem, stem_width=arch.stem_width) if arch.stem == "conv" else PatchEmbed
    return VisionTransformer(img_size=image_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
                             depth=arch.depth, num_heads=arch.num_heads, mlp_ratio=arch.mlp_ratio,
                             num_classes=0, qkv_bias=True, embed_layer=embed_layer)


def create_backbone(config: ModelConfig, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """The backbone of ``config`` with its pre-trained weights, frozen, in eval mode.

    weights: a local weights file (overrides ``config.weights``). For a timm
    name without a file, ``pretrained`` loads timm's pre-trained weights from
    its cache (no download happens where there is no network).
    """
    weights = weights or config.weights
    if config.backbone == BUILTIN:
        model = create_builtin(config.builtin, config.image_size)
    else:
        kwargs = {"num_classes": 0, "img_size": config.image_size}
        try:
            model = timm.create_model(config.backbone, pretrained=pretrained and weights is None, **kwargs)
        except RuntimeError as error:
            raise ConfigError(f"cannot load timm's pre-trained weights for {config.backbone!r} ({error}); "
                              f"without network access give a local file: model.weights=PATH") from None
    if weights is not None:
        load_weights(model, weights, config.backbone)
    model.requires_grad_(False)
    return model.eval()


def create_skeleton(config: ModelConfig) -> nn.Module:
    """The backbone's modules on the meta device: its parameter names and shapes, without memory, weights or
    a download; a ConfigError where timm refuses the config's sizes."""
    try:
        with torch.device("meta"):
            if config.backbone == BUILTIN:
                return create_builtin(config.builtin, config.image_size)
            return timm.create_model(config.backbone, pretrained=False, num_classes=0, img_size=config.image_size)
    except (AssertionError, RuntimeError, TypeError, ValueError) as error:
        first = (str(error).splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"model.backbone={short(config.backbone)} cannot be built with model.image_size="
                          f"{config.image_size} and the other model.* values: {short_text(first)}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a PyTorch checkpoint (loaded without executing code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any decoding failure is the same user error
        raise ConfigError(f"cannot read weights file {path}: {error}") from None
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path, name: str) -> None:
    """Load ``path`` into ``model``; keys that do not fit give one clear error listing them."""
    state = read_state_dict(path)
    state = {key.removeprefix("module.").removeprefix("backbone."): value for key, value in state.items()}
    if hasattr(model, "pos_embed"):
        try:
            state = checkpoint_filter_fn(state, model)
        except Exception as error:  # noqa: BLE001 - a foreign layout fails inside timm's converter
            raise ConfigError(f"weights file {path} does not fit backbone {name!r}: {error}") from None
    expected = model.state_dict()
    state = {key: value for key, value in state.items() if not key.startswith("head.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(key for key in set(state) & set(expected) if state[key].shape != expected[key].shape)
    if missing or unexpected or wrong_shape:
        details = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                details.append(f"{label}: {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''} ({len(keys)})")
        raise ConfigError(f"weights file {path} does not fit backbone {name!r}:\n  " + "\n  ".join(details)
                          + "\nCheck model.backbone and model.image_size against the file.")
    model.load_state_dict(state)


def feature_dim(model: nn.Module) -> int:
    return int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))
