"""Configuration: YAML and ``key=value`` overrides, unknown keys with a suggestion, and one clear
ConfigError for each impossible setting, raised before a run starts any work."""

from __future__ import annotations

import re

import pytest
import torch
import yaml
from safetensors.torch import save_file

from smat.config import PACKAGE_CONFIGS, BuiltinArch, ConfigError, ModelConfig, load_config, to_yaml, validate
from smat.model.backbone import create_backbone, create_builtin, load_weights
from smat.train import main, parse_args


def test_overrides_set_nested_keys_with_the_defaults_types():
    config = load_config(None, ["train.tau=0.95", "model.num_experts=4", "train.delta_lr=1e-3", "output=runs/x",
                                "data.train_domains=[latin, shapes]", "model.backend=cpu", "train.epochs=3.0"])
    assert config.train.tau == 0.95 and config.model.num_experts == 4 and config.output == "runs/x"
    # YAML reads 1e-3 as a string and 3.0 as a float: both take the default's type
    assert config.train.delta_lr == 1e-3 and isinstance(config.train.delta_lr, float)
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.data.train_domains == ["latin", "shapes"] and config.model.backend == "cpu"
    assert validate(config) is config


def test_overrides_apply_after_the_yaml_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  tau: 0.8\n  meta_batch: 2\nmodel:\n  num_experts: 4\n")
    config = load_config(path, ["train.tau=0.95"])
    assert (config.train.tau, config.train.meta_batch, config.model.num_experts) == (0.95, 2, 4)


@pytest.mark.parametrize("override,words", [
    ("train.tua=0.9", "unknown config key train.tua; did you mean train.tau?"),
    ("modle.backbone=builtin", "unknown config key modle; did you mean model?"),
    ("train.zzz=1", "unknown config key train.zzz; known keys: "),
    ("train=1", "train is a section; give its keys"),
    ("train.epochs=many", "train.epochs must be an integer, got 'many'"),
    ("train.tau=high", "train.tau must be a number, got 'high'"),
    ("data.train_flip=maybe", "data.train_flip must be true or false"),
    ("train.tau", "is not key=value"),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert words in str(error.value)


def test_a_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nothing.yaml")


IMPOSSIBLE = [
    ("train.tau=1.0", ["train.tau (target sparsity) must be in [0, 1); got 1.0"]),
    ("train.tau=-0.1", ["train.tau (target sparsity) must be in [0, 1); got -0.1"]),
    ("model.num_experts=0", ["model.num_experts (M) must be an integer from 1 to 32; got 0"]),
    ("model.num_experts=33", ["model.num_experts (M) must be an integer from 1 to 32; got 33"]),
    ("model.backbone=vit_smal_patch16_224", ["'vit_smal_patch16_224' is not a model timm knows",
                                             "vit_small_patch16_224"]),
]


@pytest.mark.parametrize("override,words", IMPOSSIBLE, ids=[case[0] for case in IMPOSSIBLE])
def test_each_impossible_setting_is_one_clear_error(override, words):
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, [override]))
    message = str(error.value)
    assert message.count("\n  - ") == 1, message
    assert all(word in message for word in words), message


def test_the_no_split_ablation_is_refused_for_methods_without_smats_objective():
    with pytest.raises(ConfigError, match="train.support_query_split=false .* method=pmf does not use it"):
        validate(load_config(None, ["method=pmf", "train.support_query_split=false"]))
    assert validate(load_config(None, ["train.support_query_split=false"])).train.support_query_split is False


def test_every_problem_is_listed_in_one_error():
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, ["train.tau=1.5", "model.num_experts=40", "train.precision=fp8"]))
    message = str(error.value)
    assert message.count("\n  - ") == 3
    assert "train.tau" in message and "model.num_experts" in message and "train.precision" in message


@pytest.mark.parametrize("override,words", IMPOSSIBLE, ids=[case[0] for case in IMPOSSIBLE])
def test_the_command_stops_before_any_work(tmp_path, capsys, override, words):
    run = tmp_path / "run"
    assert main([f"output={run}", "pretrain.epochs=1", override]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: invalid config") and all(word in error for word in words)
    assert not run.exists(), "the output folder was created for a config that cannot run"


# --------------------------------------------------------------------------
# a weights file that does not fit the backbone
# --------------------------------------------------------------------------


@pytest.fixture
def foreign_weights(tmp_path):
    """A state dict of another model: one key the built-in ViT lacks, and a narrower patch embedding."""
    state = create_builtin(BuiltinArch(embed_dim=64), 32).state_dict()
    state["encoder.extra"] = torch.zeros(3)
    del state["norm.weight"]
    path = tmp_path / "foreign.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_weights_whose_keys_do_not_fit(foreign_weights):
    with pytest.raises(ConfigError) as error:
        load_weights(create_builtin(BuiltinArch(), 32), foreign_weights, "builtin")
    message = str(error.value)
    assert f"weights file {foreign_weights} does not fit backbone 'builtin'" in message
    assert "missing: norm.weight (1)" in message and "unexpected: encoder.extra (1)" in message
    assert re.search(r"wrong shape: \S+, .* \(\d+\)", message), message  # the first few, and how many
    assert "Check model.backbone and model.image_size" in message
    with pytest.raises(ConfigError, match="does not fit backbone"):
        create_backbone(ModelConfig(weights=str(foreign_weights)))


def test_the_command_reports_weights_that_do_not_fit(tmp_path, capsys, foreign_weights):
    run = tmp_path / "run"
    assert main([f"output={run}", f"model.weights={foreign_weights}", "pretrain.epochs=1", "device=cpu"]) == 2
    assert "does not fit backbone 'builtin'" in capsys.readouterr().err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


CONFIGS = sorted(PACKAGE_CONFIGS.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_is_valid(path, tmp_path):
    """Each file under smat/configs/ loads and validates; the paper configs get the data root they ask for."""
    config = load_config(path, [])
    overrides = [f"data.root={tmp_path}"] if config.data.source in ("h5", "folder") else []
    validate(load_config(path, overrides))


# ---------------------------------------------------------------- composition: base configs and overlays

CONFIG_ROOT = PACKAGE_CONFIGS
BASES = [CONFIG_ROOT / "builtin.yaml", CONFIG_ROOT / "vit_small_dino_metadataset.yaml",
         CONFIG_ROOT / "vit_base_dino_metadataset.yaml"]
OVERLAYS = sorted([*(CONFIG_ROOT / "ablations").glob("*.yaml"), *(CONFIG_ROOT / "baselines").glob("*.yaml"),
                   *(CONFIG_ROOT / "presets").glob("*.yaml")])


def flatten(values: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} → {'a.b': 1}."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(before: dict, after: dict) -> set[str]:
    before, after = flatten(before), flatten(after)
    return {key for key in before if before[key] != after[key]} - {"config_files"}


def test_a_vit_config_with_an_ablation_overlay_is_the_vit_config_with_that_one_change():
    base = CONFIG_ROOT / "vit_small_dino_metadataset.yaml"
    overlay = CONFIG_ROOT / "ablations" / "no_dense_teacher.yaml"
    alone, composed = load_config(base).to_dict(), load_config([base, overlay]).to_dict()
    assert changed_keys(alone, composed) == {"train.teacher_steps"}
    assert composed["train"]["teacher_steps"] == 0
    assert composed["config_files"] == [str(base), str(overlay)]
    # every other value is the ViT-S run's, not the built-in toy's
    assert composed["model"]["backbone"] == "vit_small_patch16_224.dino" and composed["train"]["epochs"] == 25


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[f"{p.parent.name}/{p.stem}" for p in OVERLAYS])
@pytest.mark.parametrize("base", BASES, ids=[p.stem for p in BASES])
def test_every_overlay_on_every_base_changes_only_its_keys_and_validates(base, overlay, tmp_path):
    named = flatten(yaml.safe_load(overlay.read_text()))
    alone, composed = load_config(base), load_config([base, overlay], [f"data.root={tmp_path}"])
    changed = changed_keys(alone.to_dict(), composed.to_dict()) - {"data.root"}
    assert changed <= set(named), f"{overlay.name} changed {changed - set(named)}, which it does not name"
    flat = flatten(composed.to_dict())
    assert {key: flat[key] for key in named} == named
    assert "output" not in named  # each row's output folder is named on the command line
    validate(composed)


def test_a_file_names_its_base_and_later_files_override_earlier_ones(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  tau: 0.8\n  epochs: 3\n")
    (tmp_path / "row.yaml").write_text("base: base.yaml\ntrain:\n  tau: 0.95\n")
    (tmp_path / "last.yaml").write_text("train:\n  epochs: 7\n")
    config = load_config([tmp_path / "row.yaml", tmp_path / "last.yaml"], ["train.meta_batch=2"])
    assert (config.train.tau, config.train.epochs, config.train.meta_batch) == (0.95, 7, 2)
    assert config.config_files == [str(tmp_path / n) for n in ("base.yaml", "row.yaml", "last.yaml")]


def test_a_circle_of_bases_is_a_config_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="name each other as base"):
        load_config(tmp_path / "a.yaml")


def test_a_run_config_read_back_keeps_the_files_it_was_composed_of(tmp_path):
    composed = load_config([BASES[1], CONFIG_ROOT / "presets" / "authors_code.yaml"])
    (tmp_path / "config.yaml").write_text(to_yaml(composed))
    again = load_config(tmp_path / "config.yaml")
    assert again.config_files == [*composed.config_files, str(tmp_path / "config.yaml")]
    assert again.train.kd_direction == "student_teacher" and again.to_dict()["train"] == composed.to_dict()["train"]


def test_the_train_command_takes_several_config_files():
    args = parse_args(["--config", "a.yaml", "train.tau=0.9", "--config", "b.yaml"])
    assert args.config == ["a.yaml", "b.yaml"] and args.overrides == ["train.tau=0.9"]


def test_recipe_options_are_checked():
    with pytest.raises(ConfigError) as error:
        validate(load_config(None, ["train.kd_direction=backwards", "train.teacher_start=never",
                                    "train.lr_schedule=hourly", "model.pmf_head=x", "train.first_epoch_lr=abc"]))
    for name in ("train.kd_direction", "train.teacher_start", "train.lr_schedule", "model.pmf_head",
                 "train.first_epoch_lr"):
        assert name in str(error.value)
    assert validate(load_config(None, ["train.first_epoch_lr=1e-6"])).train.first_epoch_lr == 1e-6
