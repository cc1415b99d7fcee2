"""A model specialised to one task: its merged weights, its class prototypes, and what it predicts.

:class:`Specialist` classifies images by ProtoNet (cosine similarity × scale to each class's mean support
feature) under the task's weights. It holds the backbone module and, for ProtoNet and Algorithm 2, the
task's merged weights θ_i as views of one [N] buffer (the backbone module itself keeps θ_pre and is shared
with the model it came from); after fine-tuning, the fine-tuned backbone. :meth:`Specialist.to_timm` gives
a plain timm module with the weights and a linear head; :meth:`Specialist.save` and :func:`load_specialist`
store and read it as safetensors and a small JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call

from ..config import BuiltinArch, ModelConfig
from ..model import protonet
from ..model.backbone import create_backbone
from ..runtime import checkpoint
from ..runtime.device import autocast_to
from ..runtime.io import atomic_write_json, ensure_writable_dir
from . import images as image_io

SPECIALIST_FORMAT = "smat-specialist"
SPECIALIST_VERSION = 1
PROTOTYPES_KEY = "smat.prototypes"
PREDICT_BATCH = 64  # query images per forward pass: bounds the activations' memory


@dataclass
class Predictions:
    """What a specialist says about a list of images (unreadable ones are skipped and listed)."""

    names: list[str]  # one per prediction: the path, or "<input i>"
    labels: list[str]  # predicted class names
    indices: torch.Tensor  # int64 [Q] predicted class index
    probabilities: torch.Tensor  # fp32 [Q, n_way], softmax of the ProtoNet logits
    class_names: tuple[str, ...]
    kept: list[int] = field(default_factory=list)  # input position of each prediction
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    @property
    def confidence(self) -> torch.Tensor:
        """fp32 [Q]: the probability of each predicted class."""
        return self.probabilities.gather(1, self.indices[:, None])[:, 0] if len(self.indices) else \
            self.probabilities.new_zeros(0)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Specialist:
    """A task's model: ``backbone`` with ``weights`` (parameter name → task value; empty: the backbone's own
    parameters are the task's), ``prototypes`` fp32 [n_way, D], ``class_names``, the ProtoNet ``scale``."""

    backbone: nn.Module
    weights: dict[str, torch.Tensor]
    prototypes: torch.Tensor | None
    class_names: tuple[str, ...]
    scale: float
    model_config: ModelConfig
    mode: str = "protonet"
    precision: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def image_size(self) -> int:
        return self.model_config.image_size

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, H, W] → features [B, D] under the task's weights."""
        images = images.to(self.device)
        with autocast_to(self.device, self.precision):
            if not self.weights:
                return self.backbone(images)
            return functional_call(self.backbone, self.weights, (images,), strict=False)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images [B, 3, H, W] → ProtoNet logits fp32 [B, n_way] (scale · cosine)."""
        if not len(images):
            return images.new_zeros(0, len(self.class_names), dtype=torch.float32)
        return torch.cat([protonet.cosine_logits(self.features(chunk).float(), self.prototypes, self.scale)
                          for chunk in images.split(PREDICT_BATCH)])

    def predict(self, images) -> Predictions:
        """Labels and probabilities of ``images`` (paths, PIL images, arrays, tensors, or a batch tensor
        [B, 3, H, W] of raw images), preprocessed with the run's evaluation transform."""
        prepared = image_io.prepare(images, self.image_size)
        predictions = self.predict_batch(prepared.images, prepared.names)
        predictions.kept, predictions.skipped = prepared.kept, prepared.skipped
        return predictions

    def predict_batch(self, images: torch.Tensor, names=None) -> Predictions:
        """:meth:`predict` on preprocessed images fp32 [B, 3, H, W]."""
        probabilities = self.logits(images).softmax(-1).cpu()
        indices = probabilities.argmax(-1)
        names = list(names) if names is not None else [f"<input {i}>" for i in range(len(indices))]
        return Predictions(names, [self.class_names[i] for i in indices.tolist()], indices, probabilities,
                           self.class_names, list(range(len(indices))))

    # ------------------------------------------------------------------ export

    @torch.no_grad()
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone's full state with the task's weights in it (own tensors, on the CPU)."""
        state = {name: value.detach() for name, value in self.backbone.state_dict().items()}
        state.update({name: value.detach() for name, value in self.weights.items()})
        return {name: value.float().clone().contiguous().cpu() for name, value in state.items()}

    @torch.no_grad()
    def to_timm(self) -> nn.Module:
        """A plain timm ViT with the task's weights whose output is this specialist's logits [B, n_way].

        The cosine head is timm's own ``fc_norm`` + ``head``: ``fc_norm`` an ``nn.RMSNorm`` without affine
        parameters (x·√D / ‖x‖) and ``head`` an ``nn.Linear`` whose rows are scale · prototype / ‖prototype‖ / √D.
        Nothing of smat is needed to run, pickle or script it."""
        module = plain_backbone(copy.deepcopy(self.backbone), self.backbone)
        module.load_state_dict(self.state_dict())
        if not (hasattr(module, "fc_norm") and hasattr(module, "head")):
            raise TypeError(f"to_timm needs a timm ViT with fc_norm and head (VisionTransformer); got "
                            f"{type(module).__name__}")
        dim = self.prototypes.shape[1]
        head = nn.Linear(dim, len(self.class_names), bias=False)
        head.weight.copy_(F.normalize(self.prototypes.float(), dim=-1) * (self.scale / math.sqrt(dim)))
        module.fc_norm = nn.RMSNorm(dim, eps=1e-12, elementwise_affine=False)
        module.head, module.num_classes = head, len(self.class_names)
        return module.float().requires_grad_(False).eval()

    def save(self, path: str | Path) -> Path:
        """Write ``<path>/specialist.safetensors`` (backbone with the task's weights, prototypes) and
        ``<path>/specialist.json`` (class names, architecture); :func:`load_specialist` reads them."""
        folder = ensure_writable_dir(path)
        tensors = self.state_dict()
        tensors[PROTOTYPES_KEY] = self.prototypes.float().contiguous().cpu()
        save_file(tensors, str(folder / "specialist.safetensors"))
        model = {"backbone": self.model_config.backbone, "image_size": self.model_config.image_size,
                 "builtin": dataclasses.asdict(self.model_config.builtin)}
        atomic_write_json(folder / "specialist.json", {
            "format": SPECIALIST_FORMAT, "version": SPECIALIST_VERSION, "class_names": list(self.class_names),
            "scale": self.scale, "mode": self.mode, "model": model})
        return folder


def load_specialist(path: str | Path, device: torch.device | str = "cpu") -> Specialist:
    """A :class:`Specialist` written by :meth:`Specialist.save` (nothing of the run is needed)."""
    folder = Path(path).expanduser()
    try:
        record = json.loads((folder / "specialist.json").read_text())
        tensors = load_file(str(folder / "specialist.safetensors"), device="cpu")
    except (OSError, ValueError) as error:
        raise checkpoint.CheckpointError(f"cannot read a saved specialist from {folder} ({error}); give the folder "
                                         f"that Specialist.save wrote") from None
    if record.get("format") != SPECIALIST_FORMAT or record.get("version") != SPECIALIST_VERSION:
        raise checkpoint.CheckpointError(f"{folder} holds format {record.get('format')!r} version "
                                         f"{record.get('version')!r}; this smat reads {SPECIALIST_FORMAT!r} "
                                         f"version {SPECIALIST_VERSION}: specialise and save it again")
    model = record["model"]
    try:
        config = ModelConfig(backbone=model["backbone"], image_size=int(model["image_size"]),
                             builtin=BuiltinArch(**model["builtin"]))
    except TypeError as error:
        raise checkpoint.CheckpointError(f"{folder / 'specialist.json'} describes an architecture this smat "
                                         f"version does not know ({error}); use the version that saved it") from None
    prototypes = tensors.pop(PROTOTYPES_KEY)
    backbone = create_backbone(config, pretrained=False)
    try:
        backbone.load_state_dict(tensors)
    except RuntimeError as error:
        raise checkpoint.CheckpointError(f"{folder / 'specialist.safetensors'} does not fit backbone "
                                         f"{config.backbone!r}: {str(error).splitlines()[0]}") from None
    backbone = backbone.to(device).requires_grad_(False).eval()
    return Specialist(backbone, {}, prototypes.to(device), tuple(record["class_names"]), float(record["scale"]),
                      config, record.get("mode", "protonet"))


@torch.no_grad()
def plain_backbone(module: nn.Module, reference: nn.Module) -> nn.Module:
    """``module`` as plain timm: LoRA adapters merged into their layers, and smat's own submodule classes that
    only change construction (the built-in conv stem) replaced by the timm class they extend.

    ``reference``: the model's backbone, whose parameter names the result must have."""
    names = set(dict(reference.named_parameters()))
    if set(dict(module.named_parameters())) != names:
        state = _merged_lora_state(module)
        module = copy.deepcopy(reference)
        module.load_state_dict(state)
    for submodule in module.modules():
        cls = type(submodule)
        if cls.__module__.split(".")[0] != "smat":
            continue
        base = next(b for b in cls.__mro__ if b.__module__.split(".")[0] != "smat")
        if cls.forward is not base.forward:
            raise TypeError(f"{cls.__name__} has its own forward; to_timm cannot express it with timm's classes")
        submodule.__class__ = base
    return module.requires_grad_(False).eval()


def _merged_lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a peft-injected backbone with every LoRA adapter merged into its base layer."""
    for submodule in module.modules():
        if hasattr(submodule, "base_layer") and hasattr(submodule, "merge"):
            submodule.merge()
    return {name.replace(".base_layer.", "."): value for name, value in module.state_dict().items()
            if "lora_" not in name}
