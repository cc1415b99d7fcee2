"""python -m smat.reproduce on a tiny stand-in of the paper's setting: a small timm ViT with random weights
and a generated Meta-Dataset .h5 tree; the plans of Table 1, Table 2 and Fig. 3."""

from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_data_sources import write_h5_source

from smat.config import PACKAGE_CONFIGS
from smat.reproduce import FIG3_EXPERTS, FIG3_TAUS, PAPER, plan_for

CONFIGS = PACKAGE_CONFIGS
TINY = ["model.backbone=vit_tiny_patch16_224", "model.image_size=32", "model.num_experts=2",
        "data.train_domains=[ilsvrc_2012,omniglot]", "data.test_domains=[omniglot,traffic_sign]",
        "data.protocol=fixed", "data.n_way=2", "data.k_shot=1", "data.q_query=1", "data.num_workers=0",
        "train.epochs=1", "train.tasks_per_epoch=4", "train.val_episodes=1", "train.precision=fp32",
        "train.alignment_every=0", "device=cpu"]


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(h5 root, weights file): two training domains with train/val/test classes, one test-only domain."""
    root = tmp_path_factory.mktemp("reproduce")
    data = root / "h5"
    for name in ("ilsvrc_2012", "omniglot"):
        write_h5_source(data, name, [3] * 10, classes_per_split=(6, 2, 2))
    write_h5_source(data, "traffic_sign", [3] * 4, classes_per_split=(0, 0, 4))
    weights = root / "vit_tiny.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32).state_dict(),
              str(weights))
    return data, weights


def command(table: str, stand_in, *extra: str) -> list[str]:
    data, weights = stand_in
    return [sys.executable, "-m", "smat.reproduce", table, "--data-root", str(data), "--backbone-weights",
            str(weights), "--configs", str(CONFIGS), *extra, *TINY]


def changed_keys(config, reference) -> set[str]:
    def flat(values, prefix=""):
        for key, value in values.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    ours, theirs = dict(flat(config.to_dict())), dict(flat(reference.to_dict()))
    return {key for key in ours if ours[key] != theirs.get(key)} - {"config_files"}


def test_each_row_changes_only_what_its_overlay_names(tmp_path):
    plan = plan_for("table2", CONFIGS, "vit_small", None, 600)
    plan.shared_overrides += [f"data.root={tmp_path}"]
    configs = {spec.name: plan.config(spec) for spec in plan.runs}
    reference = configs["smat"]
    assert changed_keys(configs["no_dense_teacher"], reference) == {"train.teacher_steps"}
    assert changed_keys(configs["no_support_query_split"], reference) == {"train.support_query_split"}
    assert changed_keys(configs["fixed_mlp_experts"], reference) == {"model.expert_patterns"}
    assert changed_keys(configs["no_interpolation"], reference) == {"method"}
    assert reference.model.backbone == "vit_small_patch16_224.dino" and reference.model.image_size == 128
    assert set(PAPER["table2"]) == set(configs)


def test_the_fig3_plan_and_the_presets(tmp_path):
    plan = plan_for("fig3", CONFIGS, "vit_base", "authors_code", 600)
    smat = [spec for spec in plan.runs if spec.method == "smat"]
    assert len(smat) == len(FIG3_TAUS) * len(FIG3_EXPERTS)
    plan.shared_overrides += [f"data.root={tmp_path}"]
    config = plan.config(smat[0])
    assert config.model.backbone.startswith("vit_base") and config.train.tau == FIG3_TAUS[0]
    assert config.model.num_experts == FIG3_EXPERTS[0]
    assert any("authors_code" in path for path in config.config_files)


def test_dry_run_prints_the_plan_and_measured_gpu_hours(stand_in, tmp_path):
    result = subprocess.run(command("table1", stand_in, "--dry-run", "--measure-steps", "1", "--output",
                                    str(tmp_path / "out")), capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("pretrained", "pmf", "softmerge", "smat"):
        assert f"- {name}:" in result.stdout
    assert "measured" in result.stdout and "GPU-hours" in result.stdout
    assert not (tmp_path / "out").exists()


def test_table2_end_to_end_on_the_stand_in(stand_in, tmp_path):
    arguments = command("table2", stand_in, "--episodes", "2", "--output", str(tmp_path / "out"))
    result = subprocess.run(arguments, capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "out" / "table2" / "table2.md").read_text()
    for name, (paper_id, paper_ood) in PAPER["table2"].items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{paper_id:.2f}" in row and f"{paper_ood:.2f}" in row
    again = subprocess.run(arguments, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0 and "6 of 6 runs already trained" in again.stdout
