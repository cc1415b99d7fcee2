"""Tests of smat.analyze: parameter grouping, mask IoU, the domain α and dendrogram, and the command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smat import analysis, analyze
from smat.config import Config
from smat.model import SparseInterpolatedExperts
from smat.model.backbone import create_backbone
from smat.model.flat import FlatLayout
from smat.runtime.io import save_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("id_ood", "alignment", "nonzeros_by_type", "nonzeros_by_depth", "domain_alpha", "mask_overlap")


def tiny_config(**builtin) -> Config:
    """The built-in ViT at its smallest, random weights: enough to exercise names, masks and α."""
    config = Config()
    arch = config.model.builtin
    arch.embed_dim, arch.depth, arch.num_heads, arch.mlp_ratio = 16, 2, 2, 2.0
    for key, value in builtin.items():
        setattr(arch, key, value)
    return config


def test_layer_types_of_the_builtin_vit():
    names = [name for name, _ in create_backbone(Config().model).named_parameters()]
    types = {name: analysis.layer_type(name) for name in names}
    stem = [name for name in names if name.startswith("patch_embed.")]  # one projection, or a conv stem's layers
    assert stem and all(types[name] == "patch embedding" for name in stem)
    assert types["blocks.3.attn.qkv.weight"] == "attention qkv"
    assert types["blocks.0.attn.proj.bias"] == "attention proj"
    assert types["blocks.2.mlp.fc1.weight"] == "MLP fc1"
    assert types["blocks.1.mlp.fc2.bias"] == "MLP fc2"
    assert types["blocks.0.norm1.weight"] == types["blocks.3.norm2.bias"] == types["norm.weight"] == "norms"
    assert types["cls_token"] == types["pos_embed"] == "other"
    assert set(types.values()) == set(analysis.LAYER_TYPES)


def test_layer_depths_of_the_builtin_vit():
    names = [name for name, _ in create_backbone(Config().model).named_parameters()]
    depths = analysis.layer_depths(names)
    stem = [name for name in names if name.startswith("patch_embed.")]
    assert depths["cls_token"] == depths["pos_embed"] == "embedding"
    assert stem and all(depths[name] == "embedding" for name in stem)
    assert depths["blocks.0.attn.qkv.weight"] == "block 0"
    assert depths["blocks.3.mlp.fc2.bias"] == "block 3"
    assert depths["norm.weight"] == depths["norm.bias"] == "final"
    assert list(dict.fromkeys(depths.values())) == ["embedding", "block 0", "block 1", "block 2", "block 3", "final"]


def test_nonzero_counts_by_group():
    backbone = create_backbone(tiny_config().model)
    layout = FlatLayout(backbone)
    masks = torch.zeros(layout.num_elements, 3, dtype=torch.bool)
    qkv = next(s for s in layout.slots if s.name == "blocks.1.attn.qkv.weight")
    masks[qkv.offset:qkv.offset + 10, 0] = True  # expert 0: 10 entries of block 1's qkv
    masks[qkv.offset + 5:qkv.offset + 20, 2] = True  # expert 2: 15 entries, 5 shared with expert 0
    rows = {r["group"]: r for r in analysis.nonzero_counts(layout, masks, analysis.layer_type, analysis.LAYER_TYPES)}
    assert list(rows) == list(analysis.LAYER_TYPES)
    assert sum(r["parameters"] for r in rows.values()) == layout.num_elements
    assert rows["attention qkv"]["experts"] == [10, 0, 15]
    assert rows["attention qkv"]["union"] == 20
    assert rows["attention qkv"]["fraction_union"] == pytest.approx(20 / rows["attention qkv"]["parameters"])
    assert rows["MLP fc1"]["union"] == 0
    by_depth = analysis.nonzero_counts(layout, masks, analysis.layer_depths(layout.names).__getitem__)
    assert [r["group"] for r in by_depth] == ["embedding", "block 0", "block 1", "final"]
    assert by_depth[2]["experts"] == [10, 0, 15]


def test_mask_overlap_iou():
    masks = torch.zeros(97, 4, dtype=torch.bool)
    masks[:10, 0] = True
    masks[5:20, 1] = True  # |z0 ∩ z1| = 5, |z0 ∪ z1| = 20
    masks[50:60, 2] = True  # disjoint from z0 and z1
    # expert 3 stays empty
    iou = analysis.mask_overlap(masks, chunk=7)  # chunks that do not divide N
    assert iou.shape == (4, 4)
    assert torch.equal(iou, iou.t())
    assert torch.all(iou.diagonal() == 1)
    assert iou[0, 1].item() == pytest.approx(0.25)
    assert iou[0, 2].item() == 0 and iou[1, 2].item() == 0 and iou[0, 3].item() == 0


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config()
    config.model.num_experts = 3
    config.data.test_domains = ["latin", "shapes", "digits"]
    torch.manual_seed(0)
    model = SparseInterpolatedExperts.from_config(config.model, create_backbone(config.model))
    return config, model


def test_domain_alpha_and_dendrogram(tiny_model, tmp_path):
    config, model = tiny_model
    domains = analysis.domain_alpha(config, model, 2, temperature=1.0, device=torch.device("cpu"))
    assert list(domains) == ["latin", "shapes", "digits"]
    assert [d["role"] for d in domains.values()] == ["id", "id", "ood"]
    alpha = np.asarray([d["alpha"] for d in domains.values()])
    assert alpha.shape == (3, 3)
    np.testing.assert_allclose(alpha.sum(1), 1.0, rtol=1e-5)
    linkage = analysis.domain_linkage(alpha)
    assert linkage.shape == (2, 4)
    path = analysis.plot_domain_alpha(domains, "tiny", tmp_path / "domain_alpha.png", 2, 1.0)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    numbers = json.loads(path.with_suffix(".json").read_text())
    assert sorted(numbers["leaf_order"]) == sorted(domains)
    assert analysis.domain_linkage(alpha[:1]) is None


def test_alignment_series_and_nan_in_json(tmp_path):
    records = [{"kind": "train", "step": 1},
               {"kind": "alignment", "step": 2, "overall": 0.1, "experts": [0.2, float("nan")]},
               {"kind": "alignment", "step": 1, "overall": 0.3, "experts": [0.4, 0.5]}]
    series = analysis.alignment_series(records)
    assert series["step"] == [1, 2] and series["overall"] == [0.3, 0.1]
    assert series["experts"][0] == [0.4, 0.2]
    analysis.plot_alignment({"run": series}, {"run": 0.9}, tmp_path / "alignment.png")
    numbers = json.loads((tmp_path / "alignment.json").read_text())  # strict JSON: NaN became null
    assert numbers["runs"]["run"]["experts"][1] == [0.5, None]
    assert analysis.alignment_series([{"kind": "train", "step": 1}]) is None


def test_id_ood_point_reads_the_trained_models_column():
    config = Config(method="softmerge")
    report = {"summary": {"averages": {"id": {"smat": 61.0, "pretrained": 55.0},
                                       "ood": {"smat": 48.0, "pretrained": 47.0}}}}
    point = analysis.id_ood_point(analysis.RunFiles(Path("r"), "r", config, [], report))
    assert (point["id"], point["ood"], point["method"]) == (61.0, 48.0, "softmerge")
    with pytest.raises(analysis.AnalysisError, match="no report.json"):
        analysis.id_ood_point(analysis.RunFiles(Path("r"), "r", config, [], None))
    report["summary"]["averages"].pop("ood")
    with pytest.raises(analysis.AnalysisError, match="no ID and OOD average"):
        analysis.id_ood_point(analysis.RunFiles(Path("r"), "r", config, [], report))


def test_user_errors_exit_2(tmp_path, capsys):
    assert analyze.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert analyze.main([str(tmp_path / "empty")]) == 2
    assert "has no config.yaml" in capsys.readouterr().err
    save_config(Config(), tmp_path / "empty" / "config.yaml")
    assert analyze.main([str(tmp_path / "empty")]) == 2
    assert "has no metrics" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("analyze") / "run"
    command = [sys.executable, "-m", "smat.train", f"output={run}", "train.epochs=1", "train.tasks_per_epoch=4",
               "train.val_episodes=2", "evaluate.episodes=2", "pretrain.epochs=1", "train.alignment_every=1",
               "data.test_domains=[latin,digits]"]  # one ID and one OOD domain: all Fig. 3 needs, and quick
    # run outside the source tree so that the subprocess imports the installed package, like the tests
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=run.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def test_command_end_to_end(tiny_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "smat.analyze", str(tiny_run), "--output", str(tmp_path),
                             "--episodes", "2", "--device", "cpu"], capture_output=True, text=True, timeout=600,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in PLOTS:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE, name
        assert json.loads((tmp_path / f"{name}.json").read_text())
    overlap = json.loads((tmp_path / "mask_overlap.json").read_text())["iou"]
    assert len(overlap) == 8 and all(overlap[i][i] == 1 for i in range(8))
    point = json.loads((tmp_path / "id_ood.json").read_text())["points"][0]
    assert point["tau"] == 0.9 and point["num_experts"] == 8


def test_several_runs_get_their_own_folders(tiny_run, tmp_path):
    assert analyze.main([str(tiny_run), str(tiny_run), "--output", str(tmp_path), "--episodes", "1",
                         "--device", "cpu"]) == 0
    assert len(json.loads((tmp_path / "id_ood.json").read_text())["points"]) == 2
    for folder in ("run", "run-2"):
        assert (tmp_path / folder / "mask_overlap.png").read_bytes()[:8] == PNG_SIGNATURE


def test_analyze_refuses_a_run_folder_and_a_folder_of_other_files(tiny_run, tmp_path, capsys):
    images = tmp_path / "images" / "red"
    images.mkdir(parents=True)
    (images / "0.png").write_bytes(b"a user's picture")
    assert analyze.main([str(tiny_run), "--output", str(images), "--episodes", "1"]) == 2
    assert "already holds other files (0.png)" in capsys.readouterr().err
    assert [p.name for p in images.iterdir()] == ["0.png"]  # analysis plots there would become class images
    assert analyze.main([str(tiny_run), "--output", str(tiny_run), "--episodes", "1"]) == 2
    assert "holds a training run" in capsys.readouterr().err
    assert analyze.main([str(tiny_run), "--output", str(images), "--episodes", "1", "--overwrite"]) == 0
    for _ in range(2):  # an earlier analysis's files are replaced without --overwrite
        assert analyze.main([str(tiny_run), "--output", str(tmp_path / "analysis"), "--episodes", "1"]) == 0
