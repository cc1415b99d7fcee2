"""A trained run folder, loaded for meta-testing: its config, its model with the best checkpoint's tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, ConfigError, merge_values, parse_override, read_config_file, run_config_from_dict, validate
from ..model import TaskModel, build, check_compatible
from ..model.backbone import create_backbone
from ..runtime import checkpoint
from ..runtime.device import precision_dtype, resolve_device, task_parallel


@dataclass
class Run:
    """A run folder's model with its best checkpoint loaded, ready for meta-testing."""

    path: Path
    config: Config
    model: TaskModel
    state: dict  # the checkpoint's state.json
    device: torch.device

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def temperature(self) -> float:
        """The hypernetwork's temperature where the checkpoint was taken (its evaluation form uses it)."""
        return self.config.train.temperature.at(self.state.get("tasks_seen", 0))

    @property
    def parallel(self) -> str:
        """How the backbones of several weight rows run: 'loop' or 'vmap' (``train.task_parallel``)."""
        return task_parallel(self.config)

    @property
    def precision(self) -> torch.dtype | None:
        return precision_dtype(self.config, self.device)


def read_run_config(run_dir: str | Path, overrides=()) -> Config:
    """The config a run was trained with (``<run>/config.yaml``), with ``key=value`` overrides applied.

    A config.yaml that is not the YAML mapping of a valid config is a CheckpointError naming it."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        what = "is a file, not a run folder" if run.exists() else "does not exist"
        raise checkpoint.CheckpointError(f"run folder {run} {what}; give the output folder of "
                                         f"`python -m smat.train` (its output=PATH){_enclosing_run(run)}")
    path = run / "config.yaml"
    if not path.is_file():
        raise checkpoint.CheckpointError(f"{run} has no config.yaml, so it is not a folder written by "
                                         f"`python -m smat.train`{_config_hint(run) or _enclosing_run(run)}")
    try:  # the config reader's limits: UTF-8, size, anchors, duplicate keys, a mapping
        values = read_config_file(path)
    except ConfigError as error:
        raise _damaged_config(path, " ".join(str(error).split())) from None
    if not isinstance(values, dict) or not values:
        raise _damaged_config(path, f"it holds {'nothing' if not values else type(values).__name__}, not the "
                                    f"mapping of a run's config")
    try:  # paths=False: predict and export need neither the data nor the weights file the run was trained from
        config = validate(run_config_from_dict(values), paths=False)
    except (ConfigError, TypeError, ValueError, AttributeError) as error:
        raise _damaged_config(path, " ".join(str(error).split()) or type(error).__name__) from None
    for text in overrides:
        merge_values(config, parse_override(text), "")  # the config's own rules: types, unknown-key hints
    return validate(config, paths=False)


def _damaged_config(path: Path, problem: str) -> checkpoint.CheckpointError:
    return checkpoint.CheckpointError(f"{path} is damaged, or was written by another version of smat "
                                      f"({problem[:300]}); restore it from a backup, or use the smat version "
                                      f"that trained the run{_config_hint(path.parent)}")


def _enclosing_run(path: Path) -> str:
    """", such as RUN" where a folder above ``path`` (up to three levels) is a run: the user gave a file or
    step folder inside it."""
    for parent in list(path.absolute().parents)[:3]:
        if (parent / "config.yaml").is_file():
            return f", such as {parent}, which holds this path"
    return ""


def _config_hint(run: Path) -> str:
    """Where the run's config as trained can be read, when a checkpoint recorded it."""
    for folder in reversed(checkpoint.steps(run)):
        try:
            if isinstance(checkpoint.read_state(folder).get("config"), dict):
                return f" (the values it was trained with are under 'config' in {folder / checkpoint.STATE})"
        except checkpoint.CheckpointError:
            continue
    return ""


def _load_tensors(model: TaskModel, tensors: dict[str, torch.Tensor], folder: Path, config_path) -> None:
    try:
        model.load_trainable_tensors({k: v for k, v in tensors.items() if k != "lambda"})
    except (KeyError, RuntimeError, ValueError) as error:
        raise checkpoint.CheckpointError(f"checkpoint {folder} does not fit the model of {config_path}: "
                                         f"{str(error).splitlines()[0]}") from None


def load_trained(model: TaskModel, folder: Path, device) -> dict:
    """Load a checkpoint's trained tensors into ``model``; returns the checkpoint's state."""
    tensors, _, state = checkpoint.load(folder, map_location=device, optimizer=False)
    _load_tensors(model, tensors, folder, "the run")
    return state


def load_run(run_dir: str | Path, device: torch.device | str | None = None, overrides=(), which: str = "best") -> Run:
    """Rebuild a run's model: backbone from ``<run>/backbone.safetensors``, the method's model over it,
    and the trained tensors of the ``best`` checkpoint (``which``: another one, 'latest' or 'step-0000120').
    ``device=None``: the run config's device.

    Every file is checked before it is used: config.yaml against the config the checkpoint recorded, the
    backbone and the checkpoint's files against their recorded SHA-256, every tensor for NaN/±inf. A
    checkpoint that does not fit the config (another backbone, M, method or shapes), or any damaged file,
    raises :class:`smat.runtime.checkpoint.CheckpointError` naming it and what to do."""
    run = Path(run_dir).expanduser()
    trained = read_run_config(run)
    folder = checkpoint.resolve(run, which)
    state = checkpoint.read_state(folder)
    checkpoint.check_config(state, trained, folder, run / "config.yaml")
    config = read_run_config(run, overrides) if overrides else trained
    device = torch.device(device) if device is not None else resolve_device(config.device)
    weights = checkpoint.check_backbone(run, state, folder)
    try:
        checkpoint.read_tensors(weights)  # NaN and ±inf, with the tensor's name
        backbone = create_backbone(config.model, weights=weights)
    except ConfigError as error:
        raise checkpoint.CheckpointError(f"{error}; restore {weights.name} from a backup, or train the run again "
                                         f"into another folder") from None
    model = build(config, backbone).to(device)
    tensors, _, state = checkpoint.load(folder, map_location=device, optimizer=False)
    check_compatible(state, model, config, folder)
    _load_tensors(model, tensors, folder, run / "config.yaml")
    return Run(run, config, model.eval(), state, device)
