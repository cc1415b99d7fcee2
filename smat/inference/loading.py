"""``smat.load``: a meta-tuned model from a run folder or an export, ready to specialise to a user's task.

A run folder (``python -m smat.train``) gives its best checkpoint; an export (``python -m smat.export``)
gives the packed form. SMAT's experts are packed once at load time where their deterministic masks are
binary, so every task's weights are then one ``smat_kernels.packed_merge`` (equal bit for bit to the
dense deterministic merge); otherwise the dense merge is used.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch

from ..adapt import MODES, AdaptConfig, validate_adapt
from ..adapt.finetune import full_finetune
from ..adapt.lora import lora_finetune, require_peft
from ..adapt.select import select_experts
from ..config import Config, ConfigError
from ..data import DataError, Task
from ..evaluation.runs import load_run
from ..model import TaskModel, protonet
from ..runtime import checkpoint
from ..runtime.device import autocast_to, precision_dtype, resolve_device, task_parallel
from ..runtime.seeding import keyed_generator
from . import images as image_io
from .export import INFERENCE_OVERRIDES, PackedModel, is_export, pack_experts, packable, read_export
from .specialist import Specialist, plain_backbone

MERGES = ("auto", "packed", "dense")
# learning rate of full fine-tuning when none is given (LoRA: ×adapt.lora_lr_scale); `python -m smat.evaluate
# --mode full` chooses one per domain from adapt.lr_grid instead
DEFAULT_FINETUNE_LR = 1e-4


class Model:
    """A meta-tuned model: ``specialize(support images, labels)`` → a :class:`Specialist` for that task.

    task_model: the method's model (:class:`smat.model.TaskModel`); config: the run's config;
    temperature: the hypernetwork's evaluation temperature; merge: 'auto' (packed where the masks are
    binary, else dense), 'packed' (rounds the masks, with a warning) or 'dense'."""

    def __init__(self, task_model: TaskModel, config: Config, temperature: float, merge: str = "auto",
                 source: Path | None = None):
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {', '.join(MERGES)}; got {merge!r}")
        self.config, self.temperature, self.source = config, temperature, source
        self.device = task_model.theta_pre.device
        self.rounded = getattr(task_model, "rounded", None)
        if merge != "dense" and packable(task_model):
            packed = pack_experts(task_model)
            self.rounded = packed.rounded
            if merge == "packed" or packed.rounded == 0:
                if packed.rounded:
                    warnings.warn(f"merge='packed' rounds {packed.rounded:,} mask entries that are neither 0 nor 1; "
                                  f"task weights differ from the run's deterministic merge", stacklevel=2)
                task_model = PackedModel.from_model(task_model, packed, config.model)
        self.task_model = task_model.eval()

    @property
    def image_size(self) -> int:
        return self.config.model.image_size

    @property
    def merge_kind(self) -> str:
        """'packed' (one packed merge per task), 'dense' (one deterministic merge) or 'none' (θ_pre)."""
        if isinstance(self.task_model, PackedModel):
            return "packed"
        return "dense" if self.task_model.num_experts else "none"

    @property
    def precision(self) -> torch.dtype | None:
        return precision_dtype(self.config, self.device)

    def describe(self) -> str:
        where = f" from {self.source}" if self.source else ""
        return f"{self.task_model.describe()}{where}; merge {self.merge_kind}; on {self.device}"

    def preprocess(self, images) -> image_io.Prepared:
        """Images (paths, PIL, arrays, tensors) → the run's evaluation input; unreadable files are listed."""
        return image_io.prepare(images, self.image_size)

    def specialize(self, support_images, support_labels, mode: str = "protonet", *,
                   options: AdaptConfig | None = None, lr: float | None = None) -> Specialist:
        """A :class:`Specialist` for the task whose support set is ``support_images`` with ``support_labels``
        (class names or ids, one per image; classes are kept in order of first appearance).

        mode: 'protonet' (one merge from the hypernetwork's α), 'select' (Algorithm 2), 'full'
        (Algorithm 3) or 'lora'; options: :class:`smat.adapt.AdaptConfig` (steps, seed, …); lr: the
        learning rate of 'full' and 'lora' (default 1e-4, LoRA ×10). Unreadable support images are skipped
        with a warning; a class left without any image, or fewer than 2 classes, is a DataError."""
        labels = list(support_labels.tolist() if isinstance(support_labels, torch.Tensor) else support_labels)
        if isinstance(support_images, torch.Tensor) and support_images.ndim == 4:
            support_images = list(support_images.unbind(0))
        if len(labels) != len(support_images):
            raise ValueError(f"{len(support_images)} support images but {len(labels)} labels; give one label per "
                             f"image")
        class_names = [str(name) for name in dict.fromkeys(labels)]
        prepared = self.preprocess(support_images)
        for name, reason in prepared.skipped:
            warnings.warn(f"support image {name} skipped: {reason}", stacklevel=2)
        kept_labels = [str(labels[i]) for i in prepared.kept]
        empty = [name for name in class_names if name not in kept_labels]
        if empty:
            raise DataError(f"support class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} "
                            f"{'have' if len(empty) > 1 else 'has'} no readable image; add images of "
                            f"{'them' if len(empty) > 1 else 'it'} or leave {'them' if len(empty) > 1 else 'it'} "
                            f"out of the support set")
        index = {name: i for i, name in enumerate(class_names)}
        targets = torch.tensor([index[name] for name in kept_labels], dtype=torch.int64)
        return self.specialize_batch(prepared.images, targets, class_names, mode, options=options, lr=lr)

    @torch.no_grad()
    def specialize_batch(self, support_x: torch.Tensor, support_y: torch.Tensor, class_names, mode: str = "protonet",
                         *, options: AdaptConfig | None = None, lr: float | None = None) -> Specialist:
        """:meth:`specialize` on preprocessed images fp32 [S, 3, H, W] and labels int64 [S] in 0 … n−1."""
        class_names = tuple(class_names)
        if len(class_names) < 2:
            raise DataError(f"a task needs at least 2 classes to tell apart; the support set has "
                            f"{len(class_names)} ({', '.join(class_names) or 'none'}): add a class")
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        options = validate_adapt(dataclasses.replace(options) if options else AdaptConfig())
        task = Task(support_x.to(self.device), support_y.to(self.device), support_x[:0].to(self.device),
                    support_y[:0].to(self.device), "support", class_names)
        if mode in ("protonet", "select"):
            theta = self._task_theta(task, mode, options)
            weights = {} if theta is None else self.task_model.layout.views(theta)
            backbone = self.task_model.backbone
        else:
            backbone, weights = self._fine_tuned(task, mode, options, lr), {}
        specialist = Specialist(backbone, weights, None, class_names, self.task_model.protonet_scale,
                                self.config.model, mode, self.precision)
        specialist.prototypes = protonet.prototypes(specialist.features(task.support_x).float(), task.support_y,
                                                    task.n_way)
        return specialist

    def _task_theta(self, task: Task, mode: str, options: AdaptConfig) -> torch.Tensor | None:
        """θ_i [N] of the task, from one merge (None: the model has no task weights, θ_pre)."""
        model = self.task_model
        with autocast_to(self.device, self.precision):
            if mode == "protonet":
                theta = model.task_parameters([task], self.temperature)
                return None if theta is None else theta[0]
            if not model.masked:
                raise ConfigError(f"mode select (Algorithm 2) chooses among sigmoid-scored sparse experts; this "
                                  f"model ({type(model).__name__}) has none. Use mode protonet, full or lora")
            selection = select_experts(model, task, self.temperature, options.select_rounds, options.select_rho,
                                       keyed_generator(options.seed, 0), task_parallel(self.config))
            return model.merge(selection.alpha[None].to(self.device), mode="deterministic")[0]

    def _fine_tuned(self, task: Task, mode: str, options: AdaptConfig, lr: float | None):
        if mode == "lora":
            require_peft()
        if lr is None:
            options = dataclasses.replace(options, lr=options.lr if options.lr is not None else DEFAULT_FINETUNE_LR)
            lr = options.learning_rates(mode)[0]
        options = dataclasses.replace(options, augment_flip=options.augment_flip and self.config.data.train_flip)
        theta = self._task_theta(task, "protonet", options)
        method = full_finetune if mode == "full" else lora_finetune
        with torch.enable_grad():
            tuned = method(self.task_model, theta, task, lr, options, keyed_generator(options.seed, 0,
                           device=self.device), self.precision)
        return plain_backbone(tuned.backbone, self.task_model.backbone)


def load(path: str | Path, device: torch.device | str | None = None, merge: str = "auto") -> Model:
    """A meta-tuned model from a run folder (its best checkpoint) or from an export folder.

    device: default the run config's (``auto``: a GPU where there is one). merge: see :class:`Model`.
    A folder from another version of smat, another backbone or config is a CheckpointError saying what
    differs and what to do."""
    folder = Path(path).expanduser()
    if (folder / "specialist.json").is_file():
        raise checkpoint.CheckpointError(f"{folder} holds a saved Specialist; read it with "
                                         f"smat.load_specialist({str(folder)!r})")
    if is_export(folder):
        config_device = resolve_device(device if device is not None else "auto")
        model, config, record = read_export(folder, config_device)
        return Model(model, config, float(record["temperature"]), merge, folder)
    if folder.is_dir() and not (folder / "config.yaml").is_file():
        raise checkpoint.CheckpointError(f"{folder} is neither a run folder (config.yaml, checkpoints/) nor an "
                                         f"export (export.json); give the output of `python -m smat.train` or "
                                         f"`python -m smat.export`")
    try:
        run = load_run(folder, device, INFERENCE_OVERRIDES)
    except ConfigError as error:
        raise checkpoint.CheckpointError(f"{folder} was written by another version of smat or with another "
                                         f"config ({error}); use the smat version that trained it") from None
    return Model(run.model, run.config, run.temperature, merge, folder)


__all__ = ["DEFAULT_FINETUNE_LR", "MERGES", "Model", "load"]
