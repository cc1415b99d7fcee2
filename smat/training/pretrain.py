"""Pre-training of the built-in backbone: shipped with the package, or trained once and cached.

The small ViT of ``model.backbone=builtin`` is trained with a linear
classifier on the built-in pre-training classes (disjoint from every ID and
OOD domain), the way a real backbone is pre-trained on ImageNet before SMAT
meta-tunes it. The package ships the weights that ``python -m smat.pretrain``
produced with the default settings (``smat/model/weights/``, with a record of
the command, settings, machine and SHA-256), so every machine starts from the
same backbone without waiting for pre-training. Other settings, or
``pretrain.use_shipped=false``, train the backbone and cache it under
``cache_dir()/backbones/``, keyed by a hash of everything that shapes it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from smat_kernels.check import cpu_has_avx512, cpu_name

from ..config import Config, ConfigError
from ..data.builtin import CACHE_VERSION, PRETRAIN_DOMAIN, BuiltinSource
from ..data.builtin.cache import cache_dir
from ..data.transforms import normalize
from ..model.backbone import create_builtin
from ..runtime.checkpoint import file_digest
from ..runtime.io import atomic_path, atomic_write_json

SHIPPED = Path(__file__).resolve().parent.parent / "model" / "weights" / "builtin_vit.safetensors"


def cache_key(config: Config) -> str:
    settings = {k: v for k, v in vars(config.pretrain).items() if k != "use_shipped"}  # it shapes nothing
    shaping = {"arch": vars(config.model.builtin), "image_size": config.model.image_size,
               "pretrain": settings, "data": CACHE_VERSION, "seed": config.seed, "version": 2}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def cached_weights(config: Config) -> Path:
    return cache_dir() / "backbones" / f"builtin-vit-{cache_key(config)}.safetensors"


def shipped_record() -> dict | None:
    """The record written beside the shipped weights (settings, command, machine, sha256); None without one."""
    try:
        return json.loads(SHIPPED.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None


def shipped_weights(config: Config) -> Path | None:
    """The shipped backbone where ``config`` asks for it and its settings are the ones it was trained with.

    A shipped file whose SHA-256 is not the recorded one (a damaged install) is an error, not a silent
    pre-training: the user should know their package is broken."""
    record = shipped_record()
    if not config.pretrain.use_shipped or record is None or record.get("config_key") != cache_key(config):
        return None
    if not SHIPPED.is_file() or file_digest(SHIPPED) != record.get("sha256"):
        raise ConfigError(f"the shipped built-in backbone {SHIPPED} is missing or damaged (its SHA-256 is not "
                          f"{record.get('sha256')}); reinstall smat, or pre-train instead with "
                          f"pretrain.use_shipped=false")
    return SHIPPED


def training_threads() -> int:
    """Threads for pre-training: all of torch's on an idle machine, one when other processes keep the cores
    busy. Measured on the 2-core machine under others' load: a step of 128 images took 1.8–3.1 s with two
    spin-waiting threads and 0.16 s with one."""
    threads = torch.get_num_threads()
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return 1 if busy >= max(1.0, (os.cpu_count() or 1) - 0.5) else threads


def pretrained_builtin(config: Config, log=print) -> Path:
    """Path of the pre-trained built-in backbone for ``config`` in the cache, training it first if it is not
    cached."""
    path = cached_weights(config)
    if path.is_file():
        log(f"pre-trained built-in backbone: {path} (cached)")
        return path
    log(f"pre-training the built-in backbone ({config.pretrain.epochs} epochs); cached afterwards at {path}")
    summary = pretrain_to_file(config, path, "python -m smat.train pretrain.use_shipped=false")
    log(f"pre-trained in {summary['seconds']} s: train accuracy {summary['train_accuracy']:.3f}, accuracy on "
        f"{summary['held_out_images']} held-out images of its classes {summary['held_out_accuracy']:.3f}")
    return path


def pretrain_to_file(config: Config, path: Path, command: str, log=None) -> dict:
    """Pre-train, write the weights to ``path`` (atomically) and beside them a JSON record: the summary, the
    settings and their key, ``command``, the machine and the file's SHA-256. Returns the record."""
    start = time.perf_counter()
    backbone, summary = pretrain(config, log)
    seconds = round(time.perf_counter() - start, 1)
    with atomic_path(path) as temporary:
        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(temporary))
    isa = {True: "avx512f", False: "avx2 or older", None: "unknown"}[cpu_has_avx512()]
    record = {**summary, "seconds": seconds, "settings": vars(config.pretrain) | {"seed": config.seed},
              "command": command, "cpu": f"{cpu_name()} ({isa})", "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "sha256": file_digest(path)}
    atomic_write_json(path.with_suffix(".json"), record)
    return record


def pretraining_images(config: Config) -> tuple[torch.Tensor, torch.Tensor, int]:
    domain = BuiltinSource([PRETRAIN_DOMAIN])[PRETRAIN_DOMAIN]
    images, labels = domain.arrays("train")
    x = torch.from_numpy(np.ascontiguousarray(images))
    x = x[:, None].expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    x = x.float().div_(255.0)
    size = config.model.image_size
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x), torch.from_numpy(labels).long(), len(domain.class_names)


def held_out_split(labels: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, held-out): the last ``per_class`` images of every class are held out."""
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    starts = torch.searchsorted(sorted_labels, sorted_labels, right=True)  # one past each image's class
    held = (starts - torch.arange(len(labels))) <= per_class
    return order[~held], order[held]


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (reflect padding): cheap and label-preserving for glyphs."""
    size = x.shape[-1]
    pad = max(1, size // 8)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[..., dy:dy + size, dx:dx + size]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


def pretrain(config: Config, log=None, data: tuple[torch.Tensor, torch.Tensor, int] | None = None
             ) -> tuple[nn.Module, dict]:
    """Train the built-in backbone with a linear classifier; returns it (eval mode) and a summary with the
    accuracy on the held-out images of the pre-training classes.

    data: (normalised images [N, 3, S, S], labels [N], classes) instead of the built-in pre-training domain.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(training_threads())
    try:
        return _pretrain(config, log, data)
    finally:
        torch.set_num_threads(threads)


def _pretrain(config: Config, log, data) -> tuple[nn.Module, dict]:
    torch.manual_seed(config.seed)
    settings = config.pretrain
    x, y, num_classes = data if data is not None else pretraining_images(config)
    train_index, held_index = held_out_split(y, settings.held_out_per_class)
    backbone = create_builtin(config.model.builtin, config.model.image_size)
    head = nn.Linear(backbone.num_features, num_classes)
    model = nn.Sequential(backbone, head).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(len(train_index) / settings.batch_size)
    total = settings.epochs * steps_per_epoch
    warmup = max(1, round(settings.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / total))))
    generator = torch.Generator().manual_seed(config.seed)
    correct = seen = 0
    curve = []
    progress = tqdm(total=total, desc="pre-train", unit="step", leave=False)
    for epoch in range(settings.epochs):
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        correct = seen = 0
        losses = []
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            logits = model(_augment(x[index], generator))
            loss = F.cross_entropy(logits, y[index], label_smoothing=settings.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(-1) == y[index]).sum())
            seen += len(index)
            losses.append(loss.item())
            progress.update()
            progress.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
        curve.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_accuracy": correct / seen})
        if log is not None:
            log(f"pre-train epoch {epoch + 1}/{settings.epochs}: loss {curve[-1]['loss']:.3f}, "
                f"train accuracy {correct / seen:.3f}")
    progress.close()
    held_out = accuracy(model, x[held_index], y[held_index])
    backbone.eval()
    return backbone, {"classes": num_classes, "images": len(train_index), "held_out_images": len(held_index),
                      "epochs": settings.epochs, "train_accuracy": correct / max(seen, 1),
                      "held_out_accuracy": held_out, "curve": curve, "threads": torch.get_num_threads(),
                      "config_key": cache_key(config)}
