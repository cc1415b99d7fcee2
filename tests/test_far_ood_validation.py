"""The far-OOD validation source and ``python -m smat.far_ood``: never a test domain, its own real source, the
choice rule, checkpoints by step, and the command end to end on a tiny budget."""

from __future__ import annotations

import hashlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from safetensors.torch import save_file

from smat.config import load_config
from smat.data import FAR_OOD_DOMAINS, FAR_OOD_VALIDATION_DOMAINS, ID_DOMAINS, OOD_DOMAINS, episodes
from smat.data.builtin import DOMAINS, NATIVE_SIZE, class_splits, domain_seed, far_ood
from smat.data.groups import in_group, label
from smat.experiments import ExperimentPlan, RunResult, RunSpec
from smat.far_ood import (
    AUGMENTATIONS,
    BASE,
    CANDIDATES,
    ID_TOLERANCE,
    PMF_AUG,
    REAL_SOURCES,
    STARTING_POINT,
    choose,
    far_ood_plan,
)
from smat.model.backbone import create_builtin
from smat.runtime import checkpoint

RELIEF = "relief_patches"
# sha256 of its images, labels and class names at NATIVE_SIZE (a change is a change of the data: bump the tag)
RECORDED = "54428988ebd83266d32d3574578120ccb02656324b30236ff38afe959954a2d4"


def test_the_validation_source_is_never_a_test_domain():
    assert FAR_OOD_VALIDATION_DOMAINS == (RELIEF,)
    assert DOMAINS[RELIEF].group == "far_ood_val" and DOMAINS[RELIEF].role == "ood"
    assert RELIEF not in (*ID_DOMAINS, *OOD_DOMAINS, *FAR_OOD_DOMAINS)
    default = load_config(None, [])
    source = episodes.open_source(default)
    assert RELIEF not in source and RELIEF not in episodes.test_domains(default, source)
    named = load_config(None, [f"data.test_domains=[{RELIEF}]"])
    source = episodes.open_source(named)
    assert episodes.test_domains(named, source) == [RELIEF]
    assert episodes.domain_group(RELIEF, source) == "far_ood_val" and label("far_ood_val") == "far-OOD validation"
    assert class_splits(RELIEF, 10) == {"test": list(range(10))}
    assert in_group("far_ood_val", "far_ood_val") and not in_group("far_ood_val", "far_ood")


def test_the_validation_source_shares_no_file_or_generator_with_any_other_domain():
    relief = inspect.getsource(far_ood.relief_map) + inspect.getsource(far_ood.generate_relief_patches)
    assert "topobathy.npz" in relief
    for other in ("jacksboro", "s1045", "grace_hopper", "load_sample_images", "glyph", "font"):
        assert other not in relief, other
    # no test or training domain reads the relief map's file
    others = [far_ood.photos, far_ood.scans, far_ood.generate_photo_patches, far_ood.generate_scan_patches,
              far_ood.generate_cm_outline, far_ood.generate_lowres_inverted]
    assert not any("topobathy" in inspect.getsource(f) for f in others)
    for name, domain in DOMAINS.items():
        uses = "generate_relief_patches" in domain.generate.__code__.co_names
        assert uses == (name == RELIEF), name
    assert (Path(matplotlib.get_data_path()) / "sample_data" / "topobathy.npz").is_file()


def test_the_validation_source_is_deterministic_and_learnable():
    images, labels, names = DOMAINS[RELIEF].generate(NATIVE_SIZE, domain_seed(RELIEF))
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.asarray(labels, dtype=np.int64).tobytes())
    digest.update("\n".join(names).encode())
    assert digest.hexdigest() == RECORDED, "relief_patches changed: bump FAR_OOD_TAG and record the new hash"
    assert images.shape == (400, NATIVE_SIZE, NATIVE_SIZE, 3) and len(names) == len(set(names)) == 10
    height, width = far_ood.relief_map().shape[:2]
    for region, (left, top, right, bottom) in far_ood.RELIEF_REGIONS:
        assert 0 <= left < right <= width and 0 <= top < bottom <= height, region
        assert min(right - left, bottom - top) >= 40, region
    # the classes are regions that differ: nearest mean colour layout on held-out crops is far above chance (10%)
    features = images.reshape(len(images), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(images), -1)
    fit = np.arange(len(images)) % 40 < 20
    centroids = np.stack([features[fit & (labels == k)].mean(0) for k in range(10)])
    predicted = ((features[~fit][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert 0.4 < (predicted == labels[~fit]).mean() < 0.95  # separable, and not trivially so


def test_a_checkpoint_is_resolved_by_its_step_name(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2):
        folder = checkpoint.checkpoint_dir(run) / f"step-{step:07d}"
        folder.mkdir(parents=True)
        (folder / checkpoint.STATE).write_text("{}")
    assert checkpoint.resolve(run, "step-0000001") == checkpoint.checkpoint_dir(run) / "step-0000001"
    with pytest.raises(checkpoint.CheckpointError, match="step-0000001, step-0000002"):
        checkpoint.resolve(run, "step-0000003")


def test_a_plan_may_evaluate_another_spec_s_run():
    plan = ExperimentPlan("x", [RunSpec("a", "smat"), RunSpec("a_early", "smat", run="a", checkpoint="step-1")], 2)
    assert [s.name for s in plan.trained()] == ["a"] and plan.runs[1].folder == "a"
    with pytest.raises(ValueError, match="does not train"):
        ExperimentPlan("x", [RunSpec("b", "smat", run="missing")], 2)


def made_up(name, method, id_val, far_val):
    domains = {RELIEF: {"role": "ood", "group": "far_ood_val", "accuracies": [far_val, far_val]}}
    return RunResult(RunSpec(name, method), Path(name), domains, id_val, None, None, None)


def test_the_rule_prefers_far_ood_validation_within_the_id_tolerance():
    step = ID_TOLERANCE / 100
    results = [made_up("pretrained", "pretrained", float("nan"), 0.9), made_up(BASE, "smat", 0.80, 0.60),
               made_up("close", "smat", 0.80 - 0.5 * step, 0.65), made_up("far", "smat", 0.80 - 2 * step, 0.80)]
    chosen, eligible = choose(results)
    assert chosen.spec.name == "close" and [r.spec.name for r in eligible] == [BASE, "close"]
    assert choose(results[:2])[0].spec.name == BASE  # the base is always eligible


def test_the_plan_changes_one_setting_per_candidate():
    validation = far_ood_plan(300, [], validation=True)
    test = far_ood_plan(300, [], validation=False)
    assert validation.test_domains == FAR_OOD_VALIDATION_DOMAINS and test.test_domains is None
    assert validation.cache_tag and not test.cache_tag
    names = [r.name for r in validation.runs]
    assert names[:4] == ["pretrained", "pmf", "softmerge", BASE] and f"{BASE}_epoch1" in names
    # every run starts from the written-out settings, not from the defaults the experiment changed
    assert validation.shared_overrides[:len(STARTING_POINT)] == list(STARTING_POINT)
    assert validation.config(validation.runs[3], paths=False).data.train_jitter == 0.0
    pmf_aug = next(r for r in validation.runs if r.name == PMF_AUG)
    assert pmf_aug.method == "pmf" and pmf_aug.overrides == AUGMENTATIONS
    assert validation.config(pmf_aug, paths=False).data.train_jitter == 0.4
    assert set(REAL_SOURCES) <= set(FAR_OOD_DOMAINS)
    for name, _, extra in CANDIDATES:
        spec = next(r for r in validation.runs if r.name == name)
        assert spec.overrides == (f"train.tau={spec.tau}", *extra)
        validation.config(spec, paths=False)  # every candidate is a valid config
    assert f"{BASE}_epoch1" not in [r.name for r in far_ood_plan(300, ["train.epochs=1"], True).runs]


TINY = ["train.epochs=2", "train.tasks_per_epoch=4", "train.val_episodes=2", "model.builtin.embed_dim=32",
        "model.builtin.depth=1", "model.builtin.num_heads=2", "model.num_experts=2", "train.alignment_every=0",
        "data.test_domains=[latin,digits]"]


def test_far_ood_end_to_end_and_resume(tmp_path):
    config = load_config(None, TINY)
    weights = tmp_path / "tiny_backbone.safetensors"
    save_file(create_builtin(config.model.builtin, config.model.image_size).state_dict(), str(weights))
    output = tmp_path / "study"
    command = [sys.executable, "-m", "smat.far_ood", "--episodes", "3", "--output", str(output), "--device", "cpu",
               *TINY, f"model.weights={weights}"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = output / "far_ood"
    for name in ("validation.md", "validation.png", "test.md", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    runs = summary["runs"]
    assert summary["chosen"] in runs and runs[summary["chosen"]]["eligible"]
    assert set(runs) == {r.name for r in far_ood_plan(3, TINY, True).runs}
    assert runs[f"{BASE}_epoch1"]["checkpoint"] == "step-0000001"
    assert all(set(r["test"]) == {"id", "near_ood", "far_ood"} for r in runs.values())
    # tested on the run's test domains, never on the validation source
    assert all(set(r["per_domain"]) == {"latin", "digits"} for r in runs.values())
    assert "**chosen**" in (out / "validation.md").read_text()
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "11 of 11 runs already trained" in second.stdout
    # a study into the same folder would reuse runs trained with other settings (the experiment's starting
    # point, not the defaults): refused before anything is trained
    study = subprocess.run([sys.executable, "-m", "smat.study", "--quick", "--episodes", "3", "--output", str(output),
                            "--device", "cpu", *TINY, f"model.weights={weights}"], capture_output=True, text=True,
                           timeout=600, cwd=tmp_path)
    assert study.returncode == 2 and "trained with other settings" in study.stderr, study.stderr[-2000:]
