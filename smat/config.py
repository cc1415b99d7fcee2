"""Run configuration: nested dataclasses, read from YAML, overridden by ``key=value``.

``load_config(paths, overrides)`` starts from the defaults below (the built-in
default run), applies one or more YAML files of the same shape in order (a
later file overrides an earlier one; a file may name the files it builds on
with ``base:``), then command-line overrides such as ``train.tau=0.95`` or
``model.backbone=vit_small_patch16_224.dino``. The files applied are recorded
in ``config_files``, so a run's ``config.yaml`` says what it was composed of.
:func:`validate` checks the whole config before any work starts and raises
one :class:`ConfigError` naming every problem and how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
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


class ConfigError(ValueError):
    """An impossible or inconsistent configuration, found before any work starts."""


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
    # glyphs are other characters, and on the built-in 32 px glyphs jitter and strong crops made the
    # meta-tuned model worse than the pre-trained one on clean test images, so the built-in default crops
    # gently and does neither.
    train_crop_scale: list[float] = field(default_factory=lambda: [0.85, 1.0])
    train_flip: bool = False
    train_jitter: float = 0.0


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


# --------------------------------------------------------------------------
# reading and overriding
# --------------------------------------------------------------------------


def merge_values(obj, values: dict, where: str = "") -> None:
    """Set the fields of dataclass ``obj`` from a nested dict, keeping types and naming unknown keys."""
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {where}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {where}{key}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} is a section; give its keys ({where}{key}.<name>=...)")
            merge_values(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, f"{where}{key}"))


def _coerce(value, current, name: str):
    """Keep the default's type where it is unambiguous (YAML reads 1e-3 as a string, 5 as an int)."""
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    if isinstance(current, list) and not isinstance(value, list):
        return [value]
    return value


def parse_override(text: str) -> dict:
    """``a.b.c=value`` → {'a': {'b': {'c': value}}}, the value parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.tau=0.95)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
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
    overlay can say what it builds on; a later file overrides an earlier one, key by key."""
    config = Config()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    for path in paths or ():
        _apply_file(config, Path(path), ())
    for text in overrides:
        merge_values(config, parse_override(text), "")
    return config


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        bundled = Path(__file__).resolve().parent.parent / "configs" / path
        raise ConfigError(f"config file {path} does not exist"
                          + (f" (a bundled one is at {bundled})" if bundled.is_file() else ""))
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys")
    return values


def _apply_file(config: Config, path: Path, chain: tuple[Path, ...]) -> None:
    """Merge ``path`` (after its bases) into ``config``; ``chain``: the files whose ``base:`` led here."""
    if path.resolve() in chain:
        raise ConfigError("config files name each other as base: "
                          + " → ".join(str(p) for p in (*chain, path.resolve())))
    values = _read_yaml(path)
    bases = values.pop("base", None) or []
    for base in [bases] if isinstance(bases, str) else bases:
        _apply_file(config, path.parent / base, (*chain, path.resolve()))
    applied = values.pop("config_files", None) or []  # a run's config.yaml read back as a config file
    merge_values(config, values, "")
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
        problems.append(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _positive(problems, name, value, integer=False, zero=False):
    if not _is_number(value):  # None (an empty override) or a string: no comparison would be meaningful
        problems.append(f"{name} must be a {'non-negative' if zero else 'positive'} "
                        f"{'integer' if integer else 'number'}; got {value!r}")
        return
    bad = (value < 0 if zero else value <= 0) or (integer and int(value) != value) or not math.isfinite(value)
    if bad:
        kind = "integer" if integer else "number"
        problems.append(f"{name} must be a {'non-negative' if zero else 'positive'} {kind}; got {value!r}")


def validate(config: Config) -> Config:
    """Raise one ConfigError listing every problem; return the config unchanged when it is sound."""
    problems: list[str] = _wrong_types(config, Config())
    if problems:  # every check below assumes the default's type
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
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
        problems.append(f"model.num_experts (M) must be an integer from 1 to 32; got {model.num_experts!r}")
    if not 0.0 <= train.ce_weight <= 1.0:
        problems.append(f"train.ce_weight must be in [0, 1]; got {train.ce_weight}")
    if not 0.0 <= train.kd_pretrained_share <= 1.0:
        problems.append(f"train.kd_pretrained_share must be in [0, 1]; got {train.kd_pretrained_share}")
    low, high = (model.log_alpha_range + [None, None])[:2]
    if len(model.log_alpha_range) != 2 or not low < high:
        problems.append(f"model.log_alpha_range must be [low, high] with low < high; got {model.log_alpha_range}")
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
    if data.root and not Path(data.root).expanduser().is_dir():
        problems.append(f"data.root={data.root} is not a folder; point it at the dataset's root")
    _check_folder_domains(problems, data)
    if model.weights and not Path(model.weights).expanduser().is_file():
        problems.append(f"model.weights={model.weights} does not exist; give the path of a .safetensors or "
                        f".pth file, or leave it empty to use the built-in cache or timm's cache")
    if model.backbone == "builtin":
        arch = model.builtin
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
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wrong_types(config, defaults, where: str = "") -> list[str]:
    """Every value whose type differs from its default's (a number, a flag, a name, a list), e.g. the None of
    an empty override ``train.epochs=``; fields whose default is None may hold anything (checked below)."""
    problems = []
    for spec in dataclasses.fields(defaults):
        name, value, default = where + spec.name, getattr(config, spec.name), getattr(defaults, spec.name)
        if dataclasses.is_dataclass(default):
            problems += _wrong_types(value, default, name + ".")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                problems.append(f"{name} must be true or false; got {value!r}")
        elif isinstance(default, int):
            if not (_is_number(value) and float(value).is_integer()):
                problems.append(f"{name} must be an integer; got {value!r}")
        elif isinstance(default, float):
            if not _is_number(value):
                problems.append(f"{name} must be a number; got {value!r}")
        elif isinstance(default, str):
            if not isinstance(value, str) or (default and not value):
                problems.append(f"{name} must be a non-empty string; got {value!r}")
        elif isinstance(default, list) and not isinstance(value, list):
            problems.append(f"{name} must be a list; got {value!r}")
    return problems


DEVICE_NAMES = "auto, cpu, cuda or cuda:N"


def _check_run_options(problems: list[str], config: Config) -> None:
    """Values that would otherwise pass here and fail later, after the output folder was made: the device,
    the kernel backend, seeds, counts, the pre-training, the temperature schedule, the model's sizes and
    the augmentation."""
    model, data, arch = config.model, config.data, config.model.builtin
    device = config.device
    if not (device in ("auto", "cpu", "cuda")
            or (device.startswith("cuda:") and device.removeprefix("cuda:").isdigit())):
        problems.append(f"device={device!r}: smat runs on {DEVICE_NAMES}")
    if model.backend is not None and model.backend not in BACKEND_CLASSES:
        problems.append(f"model.backend={model.backend!r} is not a smat_kernels backend; use one of "
                        f"{', '.join(BACKEND_CLASSES)}, or leave it empty for the automatic choice")
    for name, value in (("seed", config.seed), ("evaluate.seed", config.evaluate.seed),
                        ("data.num_workers", data.num_workers)):
        _positive(problems, name, value, integer=True, zero=True)
    _positive(problems, "keep_checkpoints", config.keep_checkpoints, integer=True)
    for name in ("epochs", "batch_size"):
        _positive(problems, f"pretrain.{name}", getattr(config.pretrain, name), integer=True)
    _positive(problems, "pretrain.lr", config.pretrain.lr)
    _positive(problems, "pretrain.weight_decay", config.pretrain.weight_decay, zero=True)
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
    for name in ("patch_size", "embed_dim", "depth", "num_heads"):
        _positive(problems, f"model.builtin.{name}", getattr(arch, name), integer=True)
    _positive(problems, "model.builtin.mlp_ratio", arch.mlp_ratio)
    if not model.expert_patterns or not all(isinstance(p, str) and p for p in model.expert_patterns):
        problems.append(f"model.expert_patterns must be a non-empty list of parameter name patterns (e.g. "
                        f"['*'] or ['blocks.*.mlp.*']); got {model.expert_patterns!r}")
    scale = data.train_crop_scale
    if not (len(scale) == 2 and all(_is_number(v) for v in scale) and 0.0 < scale[0] <= scale[1] <= 1.0):
        problems.append(f"data.train_crop_scale must be [low, high] with 0 < low <= high <= 1; got {scale!r}")
    _positive(problems, "data.train_jitter", data.train_jitter, zero=True)
    for name in ("train_domains", "test_domains"):
        domains = getattr(data, name)
        if domains is not None and not (isinstance(domains, list) and domains
                                        and all(isinstance(d, str) and d for d in domains)):
            problems.append(f"data.{name} must be a non-empty list of domain names, or empty for the "
                            f"source's default; got {domains!r}")


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
            problems.append(f"train.first_epoch_lr must be a number or null; got {train.first_epoch_lr!r}")


def _check_folder_domains(problems: list[str], data: DataConfig) -> None:
    """data.splits, data.test_only and data.test_folders: files and folders that exist, lists of names."""
    if data.splits is not None:
        if data.source != "folder":
            problems.append(f"data.splits applies to data.source=folder (a splits JSON of image folder domains); "
                            f"got data.source={data.source}")
        elif not Path(data.splits).expanduser().is_file():
            problems.append(f"data.splits={data.splits} is not a file; give a JSON file "
                            '{"<domain>": {"train": [classes], "val": [...], "test": [...]}}')
    if not all(isinstance(name, str) for name in data.test_only):
        problems.append(f"data.test_only must be a list of domain names; got {data.test_only!r}")
    elif data.test_only and data.source != "folder":
        problems.append(f"data.test_only marks image folder domains as OOD; it needs data.source=folder "
                        f"(got {data.source}); for extra folders next to another source use data.test_folders")
    trained = sorted(set(data.test_only) & set(data.train_domains or ()))
    if trained:
        problems.append(f"data.test_only domains {trained} are also in data.train_domains; a test-only domain is "
                        f"never trained on: remove it from one of the two")
    for folder in data.test_folders:
        if not isinstance(folder, str) or not Path(folder).expanduser().is_dir():
            problems.append(f"data.test_folders: {folder!r} is not a folder; give <dir>/<domain>/<class>/<image> "
                            f"or <dir>/<class>/<image>")


def _unknown_timm_model(name: str) -> str | None:
    if timm.is_model(name):
        return None
    base = name.split(".")[0]
    known = timm.list_models()
    close = difflib.get_close_matches(base, known, n=3)
    hint = f"; close names: {', '.join(close)}" if close else "; see timm.list_models('vit_*')"
    return f"model.backbone={name!r} is not a model timm knows{hint}"
