"""Run configuration: nested dataclasses, read from YAML, overridden by ``key=value``.

``load_config(paths, overrides)`` starts from the defaults below (the built-in
default run), applies one or more YAML files of the same shape in order (a
later file overrides an earlier one; a file may name the files it builds on
with ``base:``), then command-line overrides such as ``train.tau=0.95`` or
``model.backbone=vit_small_patch16_224.dino``. The files applied are recorded
in ``config_files``, so a run's ``config.yaml`` says what it was composed of.
The configs that come with smat are package data (``smat/configs``): a name
that is not a file where it is given is looked up there (``pmf``,
``baselines/pmf.yaml``, ``configs/baselines/pmf.yaml``), from any folder.
:func:`validate` checks the whole config before any work starts and raises
one :class:`ConfigError` naming every problem and how to fix it. Reading and
checking never end in another exception: a file that is not UTF-8 or not
YAML, a key given twice, a value of the wrong type or out of range, anchors
that expand to a huge value, a bad ``base:`` chain all become one bounded
ConfigError (every line at most LINE_LIMIT characters, values cut with "…").
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml

from smat_kernels.dispatch import BACKEND_CLASSES

# smat: the paper's method. Baselines (smat/baselines.py): pretrained (no meta-tuning), pmf (all parameters
# meta-tuned with ProtoNet), softmerge (M dense experts merged by a learned soft router, SMEAR-style; with
# model.expert_patterns on the MLP layers it is Table 2's "fixed MLP experts"), smat_independent (Table 2's
# "without interpolation": every expert has its own delta, masked by its own mask).
METHODS = ("smat", "pretrained", "pmf", "softmerge", "smat_independent")
NOISE_MODES = ("sample", "near_noiseless")
# the recipe options (README, "Recipe options"): each first value is ours, the second the authors' code's
KD_DIRECTIONS = ("teacher_student", "student_teacher")  # KL(teacher‖student) (Hinton) or KL(student‖teacher)
TEACHER_STARTS = ("before_support_step", "after_support_step")
LR_SCHEDULES = ("steps", "epochs")
PMF_HEADS = ("learnable", "fixed")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TASK_PARALLEL = ("auto", "loop", "vmap")
SOURCES = ("builtin", "folder", "h5")
PROTOCOLS = ("fixed", "variable")
STEMS = ("conv", "patch")  # the built-in ViT's patch embedding: a small conv stem, or timm's linear one


class ConfigError(ValueError):
    """An impossible or inconsistent configuration, found before any work starts. Its message is bounded:
    every line at most LINE_LIMIT characters (values are cut with '…')."""

    def __str__(self) -> str:
        return bounded(super().__str__())


@dataclass
class BuiltinArch:
    """The small ViT trained from scratch for CPU runs (``model.backbone=builtin``): 32 px images in 8×8
    patches, 17 tokens, 0.7M parameters."""

    patch_size: int = 8
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 3.0
    # 'conv': a small convolutional stem makes the 8×8 patch tokens (smat.model.backbone.ConvStem); from
    # scratch on tiny images it learns far faster than timm's linear patch embedding ('patch')
    stem: str = "conv"
    stem_width: int = 32


@dataclass
class ModelConfig:
    backbone: str = "builtin"  # 'builtin' or any timm ViT name, e.g. vit_small_patch16_224.dino
    weights: str | None = None  # local .safetensors/.pth; None: the built-in cache or timm's cache
    image_size: int = 32
    builtin: BuiltinArch = field(default_factory=BuiltinArch)
    num_experts: int = 8
    expert_patterns: list[str] = field(default_factory=lambda: ["*"])  # parameters that carry experts
    log_alpha_init_mean: float = 0.0
    log_alpha_init_std: float = 0.5
    # log_α is projected onto this range after every step. The reference code uses [ln 0.01, ln 100];
    # there the mask of a "closed" entry still has P(z ≠ 0) ≈ 0.05, so expected and hard sparsity disagree.
    log_alpha_range: list[float] = field(default_factory=lambda: [-10.0, 10.0])
    hyper_tokens: int = 4
    hyper_heads: int = 4
    hyper_mlp_ratio: float = 2.0
    protonet_scale: float = 10.0
    # PMF's cosine head: 'learnable' scale (init protonet_scale) and bias (init 0), logits = scale·(cos + bias),
    # meta-trained with δ as in PMF's code (configs/baselines/pmf.yaml sets it); 'fixed': scale protonet_scale,
    # bias 0, as runs before it. Other methods: always fixed.
    pmf_head: str = "fixed"
    backend: str | None = None  # smat_kernels backend: None (automatic), reference, cpu, cuda, triton


@dataclass
class PretrainConfig:
    """Supervised pre-training of the built-in backbone on the built-in pre-training classes."""

    # Measured (docs/results/builtin_pretraining.md): the old 12 epochs at lr 2e-3 on 640 glyph classes of 20
    # images ended at 13% train accuracy. The causes: too few steps for that many classes (a ViT, and even a
    # small CNN, stays at chance for the first few hundred steps on 1040 classes), a learning rate too high for
    # a from-scratch ViT (2e-3 learnt slower than 5e-4 and 2e-4 in a 144-step pilot), and no locality prior
    # (a linear patch embedding learnt slower than the conv stem). Now: 400 classes × 40 images, conv stem,
    # lr 5e-4, 14 epochs (~1650 steps) — about 4 minutes on 2 cores.
    epochs: int = 14
    batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.05
    held_out_per_class: int = 2  # images of every class kept out of training to measure the accuracy
    # Use the weights shipped in the package (smat/model/weights/) where these settings are the ones they were
    # trained with; false re-runs pre-training into the cache (`python -m smat.train --pretrain`).
    use_shipped: bool = True


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin | folder | h5
    root: str | None = None  # for folder and h5 sources
    train_domains: list[str] | None = None  # None: the source's ID domains
    test_domains: list[str] | None = None  # None: ID and OOD domains
    # folder sources: a splits JSON as ImageFolderSource reads it ({"<domain>": {"train": [...], ...}}),
    # and domains that are test-only (OOD): every class tested, none trained on
    splits: str | None = None
    test_only: list[str] = field(default_factory=list)
    # image folders whose domains are added to the test domains as OOD, every class tested
    # (python -m smat.evaluate --folder DIR); <DIR>/<domain>/<class>/<image>, or <DIR>/<class>/<image>
    test_folders: list[str] = field(default_factory=list)
    protocol: str = "fixed"  # fixed N-way K-shot, or Meta-Dataset's variable way and shot
    n_way: int = 5
    k_shot: int = 5
    q_query: int = 10  # 10 queries per class: per-task accuracy in steps of 2%, tighter intervals than 5
    num_workers: int = 0
    # training-set augmentation (the protocol: crop scale [0.08, 1], flip on, colour jitter 0.4). Mirrored
    # glyphs are other characters, so the built-in default does not flip. Its crops (scale 0.5–1) and the
    # paper's colour jitter were chosen on ID validation and a far-OOD validation source: they cost 0.2 ID
    # validation points and gain 6.5 far-OOD validation points over gentle crops without jitter
    # (docs/results/far_ood.md).
    train_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    train_flip: bool = False
    train_jitter: float = 0.4


@dataclass
class TemperatureSchedule:
    """Gumbel-sigmoid temperature T = max(end, start − tasks_seen / tasks_per_unit).

    The paper: tasks_per_unit 4000 over 50,000 tasks (T reaches its floor after 36% of training); the built-in
    default keeps that proportion over its 960 tasks."""

    start: float = 5.0
    end: float = 0.5
    tasks_per_unit: float = 80.0

    def at(self, tasks_seen: int) -> float:
        return max(self.end, self.start - tasks_seen / self.tasks_per_unit)


@dataclass
class TrainConfig:
    """Defaults: the built-in default run (sized for minutes on a laptop CPU). The paper's ViT-S values are in
    configs/vit_small_dino_metadataset.yaml; they differ in epochs (25), tasks_per_epoch (2000), delta_lr
    (1e-4), lambda_lr (2e-3), constraint_on (expected) and val_episodes (120)."""

    epochs: int = 2
    tasks_per_epoch: int = 480
    meta_batch: int = 4
    tau: float = 0.9  # target sparsity of every expert
    inner_lr: float = 1e-3  # the first-order support step
    inner_steps: int = 1
    teacher_lr: float = 5e-3
    teacher_steps: int = 1  # K; 0 disables the dense teacher (ablation)
    # False: Table 2's 'no split' ablation — each task's support and query sets are pooled, and the pool
    # serves as both (the support step, prototypes and loss all see the same images)
    support_query_split: bool = True
    ce_weight: float = 0.75  # β in β·CE + (1 − β)·KD
    kd_temperature: float = 2.0
    kd_pretrained_share: float = 0.0  # reference code: 0.5 of the KD term goes to the pre-trained model
    # KL(teacher‖student) as Hinton et al. and the paper's "distil the teacher into the student"; the
    # reference code computes KL(student‖teacher) (student_teacher)
    kd_direction: str = "teacher_student"
    # the dense teacher's K steps start from θ_i (Algorithm 1: sg(θ_i)); the reference code starts them
    # from θ_i' after the support step (after_support_step)
    teacher_start: str = "before_support_step"
    noise: str = "sample"  # hard-concrete samples, or the reference code's near_noiseless
    lambda_lr: float = 0.03
    # judge each expert's sparsity constraint on 'expected' (E[L0]/N, the paper) or 'hard' (the
    # deterministic masks meta-testing uses; see Trainer.after_step)
    constraint_on: str = "hard"
    delta_lr: float = 1e-2  # 100× the paper's ViT-S 1e-4: 240 steps; chosen on validation (builtin_tuning.md)
    delta_momentum: float = 0.9
    delta_weight_decay: float = 1e-4
    mask_lr: float = 1e6
    mask_clip: float = 5.0
    hyper_lr: float = 1e-4
    hyper_weight_decay: float = 1e-2
    hyper_clip: float = 1.0
    hyper_penalty: float = 1e-4
    temperature: TemperatureSchedule = field(default_factory=TemperatureSchedule)
    warmup_fraction: float = 0.05
    # 'steps': linear warm-up over warmup_fraction of the steps, then cosine to 0 at the last step. 'epochs':
    # the reference code's schedule, set once per epoch: warm-up from 0 over warmup_epochs, then cosine over
    # a horizon of schedule_epochs (50 there, for 25 epochs of training: the last epoch runs at 0.62 of the peak)
    lr_schedule: str = "steps"
    warmup_epochs: int = 5
    schedule_epochs: int = 50
    # the reference code runs its first epoch at lr 1e-6 for θ_δ, the masks and λ (None: no such epoch)
    first_epoch_lr: float | None = None
    # λ's learning rate follows the schedule of θ_δ (the reference code: λ is a group of θ_δ's optimiser)
    lambda_schedule: bool = False
    precision: str = "auto"  # auto: bf16 autocast on GPUs that have it, else fp16 on GPU, fp32 on CPU
    task_parallel: str = "auto"  # run the B tasks' backbones in a loop or under torch.func.vmap
    val_episodes: int = 40  # fixed validation episodes per training domain, every epoch
    max_nonfinite: int = 20  # consecutive skipped steps (NaN/inf loss) before training stops
    log_every: int = 10
    alignment_every: int = 10  # log the meta-gradient alignment between tasks every k steps (0: never)


@dataclass
class EvalConfig:
    episodes: int = 100  # test episodes per domain (python -m smat.evaluate --episodes N for more)
    seed: int = 1234


@dataclass
class Config:
    method: str = "smat"
    seed: int = 0
    output: str = "runs/builtin"
    device: str = "auto"  # auto: cuda when available
    keep_checkpoints: int = 2
    config_files: list[str] = field(default_factory=list)  # the YAML files applied, in order (load_config)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{dotted key: value} of every leaf, e.g. ``{"train.tau": 0.9, ...}``."""
        return flatten_keys(self.to_dict())


def flatten_keys(values: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as {dotted key: leaf value}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_keys(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# --------------------------------------------------------------------------
# reading and overriding
# --------------------------------------------------------------------------


def merge_values(obj, values: dict, where: str = "") -> None:
    """Set the fields of dataclass ``obj`` from a nested dict, keeping types and naming unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'a config'} must be a mapping of config keys; got {short(values)}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"config key {short(key)} under {where.rstrip('.') or 'the top level'} is not a name; "
                              f"config keys are names such as {where}{next(iter(names))}")
        if key not in names:
            close = difflib.get_close_matches(key[:MAX_TEXT], names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {where}{short_text(key)}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} is a section; give its keys ({where}{key}.<name>=...)")
            merge_values(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, _hints(type(obj))[key], f"{where}{key}"))


def _coerce(value, hint, name: str):
    """The value in its field's type where that is unambiguous (YAML reads 1e-3 as a string, 5 as an int, and
    a single value where a list is meant); anything else is left for :func:`type_problems` to name."""
    if value is None:
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # e.g. float | None: named by type_problems
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        return number_or_value(value) if hint is float else _coerce(value, hint, name) if hint is not str else value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {short(value)}")
        return value
    if hint is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{name} must be a number, got {short(value)}") from None
    if hint is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {short(value)}")
    if typing.get_origin(hint) is list:
        values = value if isinstance(value, list) else [value]
        if typing.get_args(hint)[0] is float:
            values = [number_or_value(v) for v in values]
        return values
    return value


def number_or_value(value):
    """A number's float (YAML reads 1e-3 as a string); any other value unchanged."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            return value
    return value


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def parse_override(text: str) -> dict:
    """``a.b.c=value`` → {'a': {'b': {'c': value}}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {short(text)} is not key=value (e.g. train.tau=0.95)")
    key, raw = text.split("=", 1)
    value = load_yaml(raw, f"override {short_text(key)}=…") if raw.strip() else None
    nested: dict = {}
    cursor = nested
    parts = key.strip().split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(paths=None, overrides=()) -> Config:
    """The defaults, then each YAML file of ``paths`` (one path, a list, or None) in order, then ``overrides``.

    A file's ``base:`` (a path or a list, relative to the file) is applied before the file itself, so an
    overlay can say what it builds on; a later file overrides an earlier one, key by key. A path that is not
    a file here is looked up among the configs installed with smat (:func:`find_config`)."""
    config = Config()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths or ():
        _apply_file(config, find_config(path), ())
    for text in overrides:
        merge_values(config, parse_override(text), "")
    return config


# --------------------------------------------------------------------------
# YAML files: bounded, strict, and looked up among the installed configs
# --------------------------------------------------------------------------

# the configs installed with smat (package data): `--config pmf`, `--config baselines/pmf.yaml` and
# `--config configs/baselines/pmf.yaml` find smat/configs/baselines/pmf.yaml from any folder
PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB
MAX_YAML_VALUES = 10_000  # values after YAML's aliases are expanded (a "billion laughs" file is refused)
MAX_BASE_DEPTH = 32  # files named by base: in a chain
MAX_TEXT = 4096  # characters of a config string (a path at most PATH_MAX)
MAX_INT = 2**31 - 1  # every integer of a config; seeds are in [0, MAX_INT]
LINE_LIMIT = 490  # characters of one line of an error message (with "error: ", at most 500)
MAX_LINES = 60  # lines of one error message

_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 120
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 8
_SHORT.maxlevel = 3
_SHORT.fillvalue = "…"


def short(value) -> str:
    """``repr(value)`` cut to a bounded length, whatever the value holds (YAML aliases can make it huge)."""
    try:
        return short_text(_SHORT.repr(value))
    except Exception:  # e.g. an int beyond Python's digit limit
        return f"<{type(value).__name__}>"


def short_text(text) -> str:
    """``text`` as is where short, else cut to 160 characters with '…'."""
    text = str(text)
    return text if len(text) <= 160 else text[:130] + "…" + text[-29:]


def bounded(message: str) -> str:
    """``message`` with every line at most LINE_LIMIT characters and at most MAX_LINES lines."""
    lines = message.splitlines() or [""]
    cut = [line if len(line) <= LINE_LIMIT else line[:LINE_LIMIT - 63] + " … " + line[-60:] for line in lines]
    if len(cut) > MAX_LINES:
        cut = cut[:MAX_LINES - 1] + [f"… and {len(cut) - MAX_LINES + 1} more lines"]
    return "\n".join(cut)


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader that refuses a key given twice in one mapping, naming the key and its lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are meant to be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found duplicate key {short(key)} (first given on line {seen[key]})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the SafeLoader names it below
                continue
        return super().construct_mapping(node, deep)


def load_yaml(text: str, name: str):
    """The YAML value of ``text``; a ConfigError naming ``name`` for anything that is not a small, plain value."""
    loader = None
    try:
        loader = _StrictLoader(text)  # refuses control characters already
        loader.name = name  # error marks say: in "<name>", line N
        value = loader.get_single_data()
    except yaml.YAMLError as error:
        raise ConfigError(f"{name} is not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{name} is nested too deeply for a config") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise ConfigError(f"{name} holds an integer too long to be a config value") from None
    finally:
        if loader is not None:
            loader.dispose()
    _check_size(value, name)
    return value


def _check_size(value, name: str) -> None:
    """Refuse a value of more than MAX_YAML_VALUES values once aliases are expanded, without expanding it."""
    stack, count = [value], 0
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{name} holds more than {MAX_YAML_VALUES} values once its YAML anchors and aliases "
                              f"are expanded; a config is a few dozen keys")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            stack.extend(item)


def bundled_configs() -> list[str]:
    """The configs installed with smat, as ``--config`` takes them (e.g. ``baselines/pmf``)."""
    return sorted(str(p.relative_to(PACKAGE_CONFIGS).with_suffix("")) for p in PACKAGE_CONFIGS.rglob("*.yaml"))


def find_config(name, relative_to: Path | None = None) -> Path:
    """The config file ``name``: a path (relative to ``relative_to``, else to the working folder), else one of
    the configs installed with smat: ``pmf``, ``baselines/pmf``, ``baselines/pmf.yaml`` and
    ``configs/baselines/pmf.yaml`` all name smat/configs/baselines/pmf.yaml."""
    if not isinstance(name, (str, Path)) or not str(name).strip() or "\0" in str(name):
        raise ConfigError(f"a config file must be a path or the name of a bundled config; got {short(name)}")
    text = str(name)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # ~user of an unknown user
        path = Path(text)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    kind = _kind(path)
    if kind == "file":
        return path
    if kind == "folder":
        raise ConfigError(f"config file {short_text(text)} is a folder; give a YAML file")
    for candidate in _bundled_candidates(Path(text)):
        if _kind(candidate) == "file":
            return candidate
    where = f"(relative to {relative_to})" if relative_to is not None else f"(in {Path.cwd()})"
    raise ConfigError(f"config file {short_text(text)} does not exist {where}, nor is it one of smat's configs: "
                      f"{', '.join(bundled_configs())}")


def _kind(path: Path) -> str | None:
    """'file', 'folder' or None (nothing there, or a name the system refuses: too long, a loop of links)."""
    try:
        return "file" if path.is_file() else "folder" if path.is_dir() else None
    except OSError:
        return None


def _bundled_candidates(name: Path) -> list[Path]:
    if name.is_absolute() or ".." in name.parts:
        return []
    parts = name.parts[1:] if name.parts[:1] == ("configs",) else name.parts
    if not parts:
        return []
    relative = Path(*parts)
    candidates = [PACKAGE_CONFIGS / relative]
    if relative.suffix not in (".yaml", ".yml"):
        candidates.append(PACKAGE_CONFIGS / relative.with_name(relative.name + ".yaml"))
        if len(parts) == 1:  # a bare name: wherever it is unique among the bundled configs
            found = sorted(p for p in PACKAGE_CONFIGS.rglob("*.yaml") if p.stem == relative.name)  # no pattern
            if len(found) > 1:
                raise ConfigError(f"config name {relative.name} is ambiguous among smat's configs: "
                                  + ", ".join(str(p.relative_to(PACKAGE_CONFIGS)) for p in found))
            candidates += found
    return candidates


def read_config_file(path: Path) -> dict:
    """The mapping of config keys in YAML file ``path`` (UTF-8, at most MAX_CONFIG_BYTES, no duplicate keys)."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config file {path} is {path.stat().st_size} bytes; a config is a few kB "
                              f"(at most {MAX_CONFIG_BYTES})")
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {raw[error.start]:#04x} at offset "
                          f"{error.start}); save it as UTF-8") from None
    values = load_yaml(text, str(path))
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys (key: value lines); got {short(values)}")
    return values


def _names(value, what: str, path: Path) -> list[str]:
    """``base:`` or ``config_files:`` of ``path``: one name or a list of names."""
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
        raise ConfigError(f"{path}: {what}: must be a file name or a list of file names; got {short(value)}")
    return values


def _apply_file(config: Config, path: Path, chain: tuple[Path, ...]) -> None:
    """Merge ``path`` (after its bases) into ``config``; ``chain``: the files whose ``base:`` led here."""
    resolved = path.resolve()
    if resolved in chain:
        raise ConfigError("config files name each other as base: "
                          + " → ".join(short_text(p) for p in (*chain, resolved)))
    if len(chain) >= MAX_BASE_DEPTH:
        raise ConfigError(f"config file {path}: more than {MAX_BASE_DEPTH} files in its chain of base: files")
    values = read_config_file(path)
    for base in _names(values.pop("base", None), "base", path):
        try:
            found = find_config(base, relative_to=path.parent)
        except ConfigError as error:
            raise ConfigError(f"{path}: base: {error}") from None
        _apply_file(config, found, (*chain, resolved))
    applied = _names(values.pop("config_files", None), "config_files", path)  # a run's config.yaml as a file
    try:
        merge_values(config, values, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    config.config_files = [*config.config_files, *applied, str(path)]


def from_dict(values: dict) -> Config:
    config = Config()
    merge_values(config, values, "")
    return config


# Keys added after run folders were first written, with the value that reproduces what such a run did: a
# run's config.yaml without one of them is read with this value, not with today's default (see
# tests/test_old_runs.py). Add an entry whenever a new key's default changes what an old run would build.
LEGACY_VALUES = {
    ("model", "builtin", "stem"): "patch",  # runs before the convolutional stem used timm's patch embedding
    ("model", "pmf_head"): "fixed",  # PMF runs before the learnable cosine head had scale 10 and bias 0
    ("pretrain", "use_shipped"): False,  # runs before the shipped backbone pre-trained their own, then cached it
}


def run_config_from_dict(values: dict) -> Config:
    """The config of an existing run from its config.yaml: keys it predates take their legacy value."""
    values = copy.deepcopy(values)
    for *path, key in LEGACY_VALUES:
        section = values
        for part in path:
            section = section.setdefault(part, {}) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.setdefault(key, LEGACY_VALUES[(*path, key)])
    return from_dict(values)


def to_yaml(config: Config) -> str:
    """The config as the YAML that ``load_config`` reads back (a run's ``config.yaml``)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


def _choice(problems, name, value, allowed):
    if value not in allowed:
        problems.append(f"{name} must be one of {', '.join(map(str, allowed))}; got {short(value)}")


def _positive(problems, name, value, integer=False, zero=False):
    if not _is_number(value):  # None (an empty override) or a string: no comparison would be meaningful
        problems.append(f"{name} must be a {'non-negative' if zero else 'positive'} "
                        f"{'integer' if integer else 'number'}; got {short(value)}")
        return
    bad = (value < 0 if zero else value <= 0) or (integer and int(value) != value) or not math.isfinite(value)
    if bad:
        kind = "integer" if integer else "number"
        problems.append(f"{name} must be a {'non-negative' if zero else 'positive'} {kind}; got {short(value)}")


# sizes beyond which a run cannot fit in memory; the paper's and the defaults' values are far below them
LIMITS = {"model.image_size": 4096, "model.hyper_tokens": 1024, "model.hyper_heads": 256,
          "model.hyper_mlp_ratio": 64, "model.builtin.patch_size": 1024, "model.builtin.embed_dim": 16384,
          "model.builtin.depth": 256, "model.builtin.num_heads": 1024, "model.builtin.stem_width": 4096,
          "model.builtin.mlp_ratio": 64, "data.n_way": 10_000, "data.k_shot": 10_000, "data.q_query": 10_000,
          "data.num_workers": 1024, "train.meta_batch": 4096, "train.inner_steps": 10_000,
          "train.teacher_steps": 10_000, "pretrain.batch_size": 65_536}


def validate(config: Config, paths: bool = True) -> Config:
    """Raise one ConfigError listing every problem; return the config unchanged when it is sound.

    ``paths=False`` leaves out whether the files and folders it names exist (data.root, model.weights,
    data.splits, data.test_folders): a plan's ``--dry-run`` needs neither the data nor the weights."""
    checked = copy.deepcopy(config)  # aliases stay shared: a copy as small as the config it copies
    problems: list[str] = type_problems(checked, repair=True)  # the checks below may assume the types
    config, original = checked, config
    for name, limit in LIMITS.items():
        value = config
        for part in name.split("."):
            value = getattr(value, part)
        if value > limit:
            problems.append(f"{name} must be at most {limit}; got {short(value)}")
    model, train, data = config.model, config.train, config.data
    _choice(problems, "method", config.method, METHODS)
    _choice(problems, "train.noise", train.noise, NOISE_MODES)
    _choice(problems, "train.constraint_on", train.constraint_on, ("expected", "hard"))
    _choice(problems, "train.precision", train.precision, PRECISIONS)
    _choice(problems, "train.task_parallel", train.task_parallel, TASK_PARALLEL)
    _choice(problems, "data.source", data.source, SOURCES)
    _choice(problems, "data.protocol", data.protocol, PROTOCOLS)
    if not 0.0 <= train.tau < 1.0:
        problems.append(f"train.tau (target sparsity) must be in [0, 1); got {train.tau}")
    if not (isinstance(model.num_experts, int) and 1 <= model.num_experts <= 32):
        problems.append(f"model.num_experts (M) must be an integer from 1 to 32; got {short(model.num_experts)}")
    if not 0.0 <= train.ce_weight <= 1.0:
        problems.append(f"train.ce_weight must be in [0, 1]; got {train.ce_weight}")
    if not 0.0 <= train.kd_pretrained_share <= 1.0:
        problems.append(f"train.kd_pretrained_share must be in [0, 1]; got {train.kd_pretrained_share}")
    low, high = (model.log_alpha_range + [None, None])[:2]
    if len(model.log_alpha_range) != 2 or not low < high:
        problems.append(f"model.log_alpha_range must be [low, high] with low < high; "
                        f"got {short(model.log_alpha_range)}")
    for name in ("epochs", "tasks_per_epoch", "meta_batch", "log_every", "max_nonfinite"):
        _positive(problems, f"train.{name}", getattr(train, name), integer=True)
    for name in ("inner_steps", "teacher_steps", "val_episodes", "alignment_every"):
        _positive(problems, f"train.{name}", getattr(train, name), integer=True, zero=True)
    for name in ("lambda_lr", "delta_lr", "mask_lr", "hyper_lr", "kd_temperature", "mask_clip", "hyper_clip"):
        _positive(problems, f"train.{name}", getattr(train, name))
    for name in ("inner_lr", "teacher_lr", "hyper_penalty", "delta_weight_decay", "hyper_weight_decay"):
        _positive(problems, f"train.{name}", getattr(train, name), zero=True)
    if not train.support_query_split and config.method in ("pmf", "pretrained"):
        problems.append(f"train.support_query_split=false (Table 2's ablation) applies to SMAT's objective; "
                        f"method={config.method} does not use it: drop the override or pick method=smat")
    if not 0.0 <= train.delta_momentum < 1.0:
        problems.append(f"train.delta_momentum (SGD's momentum of θ_δ) must be in [0, 1); got {train.delta_momentum}")
    if not 0.0 <= train.warmup_fraction < 1.0:
        problems.append(f"train.warmup_fraction must be in [0, 1); got {train.warmup_fraction}")
    for name in ("n_way", "k_shot", "q_query"):
        _positive(problems, f"data.{name}", getattr(data, name), integer=True)
    if data.n_way < 2:
        problems.append(f"data.n_way must be at least 2 for a classification task; got {data.n_way}")
    _positive(problems, "model.image_size", model.image_size, integer=True)
    _positive(problems, "evaluate.episodes", config.evaluate.episodes, integer=True)
    if data.source in ("folder", "h5") and not data.root:
        problems.append(f"data.source={data.source} needs data.root=PATH (the folder holding the domains)")
    if paths and data.root and _kind(_expand(data.root)) != "folder":
        problems.append(f"data.root={data.root} is not a folder; point it at the dataset's root")
    _check_folder_domains(problems, data, paths)
    if paths and model.weights and _kind(_expand(model.weights)) != "file":
        problems.append(f"model.weights={model.weights} does not exist; give the path of a .safetensors or "
                        f".pth file, or leave it empty to use the built-in cache or timm's cache")
    if model.backbone == "builtin" and model.builtin.patch_size > 0 and model.builtin.num_heads > 0:
        arch = model.builtin  # (sizes ≤ 0 are named below)
        if model.image_size % arch.patch_size:
            problems.append(f"model.image_size ({model.image_size}) must be a multiple of "
                            f"model.builtin.patch_size ({arch.patch_size})")
        if arch.embed_dim % arch.num_heads:
            problems.append(f"model.builtin.embed_dim ({arch.embed_dim}) must be divisible by "
                            f"model.builtin.num_heads ({arch.num_heads})")
    else:
        problem = _unknown_timm_model(model.backbone)
        if problem:
            problems.append(problem)
    _check_recipe_options(problems, config)
    _check_run_options(problems, config)
    for name, path in (("output", config.output), ("data.root", data.root), ("model.weights", model.weights),
                       ("data.splits", data.splits), *(("data.test_folders", f) for f in data.test_folders)):
        if path and any(len(part.encode()) > 255 for part in Path(path).parts):
            problems.append(f"{name}={short(path)}: a file or folder name longer than 255 bytes, which no file "
                            f"system takes")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return original


def with_absolute_paths(config: Config) -> Config:
    """A copy of ``config`` whose data.root, data.splits, data.test_folders and model.weights are absolute: a
    run's config.yaml then names the same files from any working directory."""
    config = copy.deepcopy(config)
    absolute = lambda path: str(_expand(path).absolute()) if isinstance(path, str) and path else path  # noqa: E731
    config.data.root, config.data.splits = absolute(config.data.root), absolute(config.data.splits)
    config.data.test_folders = [absolute(folder) for folder in config.data.test_folders]
    config.model.weights = absolute(config.model.weights)
    return config


def _expand(path: str) -> Path:
    """``path`` with ``~`` expanded where it can be (``~nobody/x`` stays as it is, and then does not exist)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        return Path(path)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def type_problems(obj, where: str = "", repair: bool = False) -> list[str]:
    """Every value of dataclass ``obj`` (recursively) whose type is not its field's: a flag, an integer in
    [-MAX_INT, MAX_INT], a finite number, a string (non-empty where the default is), a list of them, or None
    where the field allows it. ``repair``: set each such field to its default, so that checks of the other
    values can run on ``obj`` and every problem is named at once."""
    problems = []
    hints = _hints(type(obj))
    for spec in dataclasses.fields(obj):
        name, value, hint = where + spec.name, getattr(obj, spec.name), hints[spec.name]
        if dataclasses.is_dataclass(hint):
            if isinstance(value, hint):
                problems += type_problems(value, name + ".", repair)
            else:
                problems.append(f"{name} is a section; give its keys ({name}.<name>=...); got {short(value)}")
                if repair:
                    setattr(obj, spec.name, hint())
            continue
        default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
        expected = _type_problem(value, hint, default)
        if expected:
            problems.append(f"{name} must be {expected}; got {short(value)}")
            if repair:
                setattr(obj, spec.name, default)
    return problems


def _type_problem(value, hint, default) -> str | None:
    """What ``value`` should be for type ``hint`` (None when it is that)."""
    arguments = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in arguments if a is not type(None))
        problem = _type_problem(value, hint, None)
        return f"{problem} or null" if problem else None
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        if not (_is_number(value) and _finite(value) and float(value).is_integer()):
            return "an integer"
        return None if abs(value) <= MAX_INT else f"an integer of magnitude at most {MAX_INT}"
    if hint is float:
        return None if _is_number(value) and _finite(value) else "a finite number"
    if hint is str:
        if not isinstance(value, str) or (default and not value):
            return "a non-empty string" if default else "a string"
        if len(value) > MAX_TEXT or "\0" in value or not _encodable(value):
            return f"a string of at most {MAX_TEXT} characters, without NUL or unencodable characters"
        return None
    if typing.get_origin(hint) is list:
        element = arguments[0]
        if not isinstance(value, list) or len(value) > 1000:
            return f"a list of {_type_name(element)}"
        return None if all(_type_problem(v, element, "x") is None for v in value) else \
            f"a list of {_type_name(element)}"
    return None


def _type_name(hint) -> str:
    return {str: "non-empty strings", float: "finite numbers", int: "integers", bool: "flags"}.get(hint, str(hint))


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range
        return False


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a YAML "\\udc80"
        return False
    return True


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


# --------------------------------------------------------------------------
# command-line flags: argparse types, so that a bad flag is a usage error (exit 2), never a traceback
# --------------------------------------------------------------------------


class Once(argparse.Action):
    """An option that takes one value and may be given once: a second ``--output B`` after ``--output A`` is
    an error naming both, not a silent choice of the last (list options use ``action="extend"``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_given_once", {})
        if self.dest in given:
            parser.error(f"{option_string} given twice ({short(given[self.dest])} and {short(values)}); give it "
                         f"once")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


def parsed_once(namespace: argparse.Namespace) -> argparse.Namespace:
    """``namespace`` without the record that :class:`Once` keeps."""
    namespace.__dict__.pop("_given_once", None)
    return namespace


def positive_flag(text: str) -> float:
    """A finite number > 0 (a learning rate, seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number; got {short(text)}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number; got {short(text)}")
    return value


def count_flag(minimum: int):
    """An integer from ``minimum`` to MAX_INT (episodes, steps)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer; got {short(text)}") from None
        if not minimum <= value <= MAX_INT:
            raise argparse.ArgumentTypeError(f"must be an integer from {minimum} to {MAX_INT}; got {short(text)}")
        return value
    parse.__name__ = "integer"  # argparse's message: "invalid integer value"
    return parse


def device_flag(text: str) -> str:
    """auto, cpu, cuda or cuda:N, where that device is there."""
    if not (text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())):
        raise argparse.ArgumentTypeError(f"{short(text)} is not a device smat runs on; use {DEVICE_NAMES}")
    if text.startswith("cuda"):
        index = int(text[5:] or 0)
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU is visible here; use cpu or auto")
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def _check_run_options(problems: list[str], config: Config) -> None:
    """Values that would otherwise pass here and fail later, after the output folder was made: the device,
    the kernel backend, seeds, counts, the pre-training, the temperature schedule, the model's sizes and
    the augmentation."""
    model, data, arch = config.model, config.data, config.model.builtin
    device = config.device
    if not (device in ("auto", "cpu", "cuda")
            or (device.startswith("cuda:") and device.removeprefix("cuda:").isdigit())):
        problems.append(f"device={short(device)}: smat runs on {DEVICE_NAMES}")
    if model.backend is not None and model.backend not in BACKEND_CLASSES:
        problems.append(f"model.backend={short(model.backend)} is not a smat_kernels backend; use one of "
                        f"{', '.join(BACKEND_CLASSES)}, or leave it empty for the automatic choice")
    for name, value in (("seed", config.seed), ("evaluate.seed", config.evaluate.seed),
                        ("data.num_workers", data.num_workers)):
        _positive(problems, name, value, integer=True, zero=True)
    _positive(problems, "keep_checkpoints", config.keep_checkpoints, integer=True)
    for name in ("epochs", "batch_size"):
        _positive(problems, f"pretrain.{name}", getattr(config.pretrain, name), integer=True)
    _positive(problems, "pretrain.lr", config.pretrain.lr)
    _positive(problems, "pretrain.weight_decay", config.pretrain.weight_decay, zero=True)
    if not 0.0 <= config.pretrain.warmup_fraction < 1.0:
        problems.append(f"pretrain.warmup_fraction must be in [0, 1); got {config.pretrain.warmup_fraction}")
    _positive(problems, "pretrain.held_out_per_class", config.pretrain.held_out_per_class, integer=True, zero=True)
    if not 0.0 <= config.pretrain.label_smoothing < 1.0:
        problems.append(f"pretrain.label_smoothing must be in [0, 1); got {config.pretrain.label_smoothing}")
    temperature = config.train.temperature
    for name in ("start", "end", "tasks_per_unit"):
        _positive(problems, f"train.temperature.{name}", getattr(temperature, name))
    if temperature.end > temperature.start:
        problems.append(f"train.temperature.end ({temperature.end}) must not exceed train.temperature.start "
                        f"({temperature.start}): the temperature falls from start to end")
    for name in ("hyper_tokens", "hyper_heads"):
        _positive(problems, f"model.{name}", getattr(model, name), integer=True)
    for name in ("hyper_mlp_ratio", "protonet_scale"):
        _positive(problems, f"model.{name}", getattr(model, name))
    _positive(problems, "model.log_alpha_init_std", model.log_alpha_init_std, zero=True)
    if not math.isfinite(model.log_alpha_init_mean):
        problems.append(f"model.log_alpha_init_mean must be finite; got {model.log_alpha_init_mean}")
    for name in ("patch_size", "embed_dim", "depth", "num_heads", "stem_width"):
        _positive(problems, f"model.builtin.{name}", getattr(arch, name), integer=True)
    _positive(problems, "model.builtin.mlp_ratio", arch.mlp_ratio)
    _choice(problems, "model.builtin.stem", arch.stem, STEMS)
    if not model.expert_patterns or not all(isinstance(p, str) and p for p in model.expert_patterns):
        problems.append(f"model.expert_patterns must be a non-empty list of parameter name patterns (e.g. "
                        f"['*'] or ['blocks.*.mlp.*']); got {short(model.expert_patterns)}")
    scale = data.train_crop_scale
    if not (len(scale) == 2 and all(_is_number(v) for v in scale) and 0.0 < scale[0] <= scale[1] <= 1.0):
        problems.append(f"data.train_crop_scale must be [low, high] with 0 < low <= high <= 1; got {short(scale)}")
    _positive(problems, "data.train_jitter", data.train_jitter, zero=True)
    for name in ("train_domains", "test_domains"):
        domains = getattr(data, name)
        if domains is not None and not (isinstance(domains, list) and domains
                                        and all(isinstance(d, str) and d for d in domains)):
            problems.append(f"data.{name} must be a non-empty list of domain names, or empty for the "
                            f"source's default; got {short(domains)}")


def _check_recipe_options(problems: list[str], config: Config) -> None:
    """The recipe options (README, "Recipe options") and PMF's head."""
    train = config.train
    _choice(problems, "train.kd_direction", train.kd_direction, KD_DIRECTIONS)
    _choice(problems, "train.teacher_start", train.teacher_start, TEACHER_STARTS)
    _choice(problems, "train.lr_schedule", train.lr_schedule, LR_SCHEDULES)
    _choice(problems, "model.pmf_head", config.model.pmf_head, PMF_HEADS)
    _positive(problems, "train.warmup_epochs", train.warmup_epochs, integer=True, zero=True)
    _positive(problems, "train.schedule_epochs", train.schedule_epochs, integer=True)
    if train.lr_schedule == "epochs" and train.schedule_epochs <= train.warmup_epochs:
        problems.append(f"train.schedule_epochs ({train.schedule_epochs}) must exceed train.warmup_epochs "
                        f"({train.warmup_epochs}): the cosine runs between them")
    if train.first_epoch_lr is not None:
        try:  # YAML reads 1e-6 (no dot) as a string
            train.first_epoch_lr = float(train.first_epoch_lr)
            _positive(problems, "train.first_epoch_lr", train.first_epoch_lr, zero=True)
        except (TypeError, ValueError):
            problems.append(f"train.first_epoch_lr must be a number or null; got {short(train.first_epoch_lr)}")


def _check_folder_domains(problems: list[str], data: DataConfig, paths: bool) -> None:
    """data.splits, data.test_only and data.test_folders: files and folders that exist, lists of names."""
    if data.splits is not None:
        if data.source != "folder":
            problems.append(f"data.splits applies to data.source=folder (a splits JSON of image folder domains); "
                            f"got data.source={data.source}")
        elif paths and _kind(_expand(data.splits)) != "file":
            problems.append(f"data.splits={data.splits} is not a file; give a JSON file "
                            '{"<domain>": {"train": [classes], "val": [...], "test": [...]}}')
    if not all(isinstance(name, str) for name in data.test_only):
        problems.append(f"data.test_only must be a list of domain names; got {short(data.test_only)}")
    elif data.test_only and data.source != "folder":
        problems.append(f"data.test_only marks image folder domains as OOD; it needs data.source=folder "
                        f"(got {data.source}); for extra folders next to another source use data.test_folders")
    trained = sorted(set(data.test_only) & set(data.train_domains or ()))
    if trained:
        problems.append(f"data.test_only domains {trained} are also in data.train_domains; a test-only domain is "
                        f"never trained on: remove it from one of the two")
    for folder in data.test_folders:
        if paths and _kind(_expand(folder)) != "folder":
            problems.append(f"data.test_folders: {short(folder)} is not a folder; give <dir>/<domain>/<class>/<image> "
                            f"or <dir>/<class>/<image>")


def _unknown_timm_model(name: str) -> str | None:
    if timm.is_model(name):
        return None
    base = name.split(".")[0]
    known = timm.list_models()
    close = difflib.get_close_matches(base, known, n=3)
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
    return f"model.backbone={short(name)} is not a model timm knows{hint}"
