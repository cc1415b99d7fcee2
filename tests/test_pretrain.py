"""Pre-training of the built-in backbone: it learns (a regression to the non-learning schedule fails here)."""

import math

import numpy as np
import pytest
import torch

from smat.config import Config
from smat.data.builtin.pretrain_families import generate_pretrain_procedural
from smat.data.transforms import normalize
from smat.training.pretrain import cache_key, held_out_split, pretrain


def _procedural_data(classes_per_kind: int = 10, per_class: int = 20):
    images, labels, names = generate_pretrain_procedural(classes_per_kind, per_class, 32, seed=3)
    x = normalize(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    return x, torch.from_numpy(labels).long(), len(names)


def test_held_out_split_keeps_the_last_images_of_every_class():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    train, held = held_out_split(labels, 1)
    assert held.tolist() == [2, 6, 9] and sorted(train.tolist() + held.tolist()) == list(range(10))


def test_pretraining_learns_in_a_few_hundred_steps():
    x, y, classes = _procedural_data()
    config = Config()  # the default architecture, optimiser and schedule; only the length is cut
    config.pretrain.batch_size = 32
    steps_per_epoch = math.ceil((len(y) - classes * config.pretrain.held_out_per_class) / 32)
    config.pretrain.epochs = math.ceil(300 / steps_per_epoch)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    backbone, summary = pretrain(config, data=(x, y, classes))
    curve = summary["curve"]
    chance = 1 / classes
    assert summary["classes"] == classes == 40
    assert curve[-1]["loss"] < 0.85 * curve[0]["loss"], curve  # the loss falls clearly
    assert curve[-1]["train_accuracy"] > 5 * chance, curve
    assert summary["held_out_accuracy"] > 3 * chance, summary  # and it generalises to unseen images
    assert not backbone.training
    features = backbone(x[:4])
    assert features.shape == (4, backbone.num_features) and torch.isfinite(features).all()


def test_cache_key_follows_everything_that_shapes_the_weights():
    config = Config()
    key = cache_key(config)
    config.pretrain.epochs += 1
    assert cache_key(config) != key
    config = Config()
    config.model.builtin.stem = "patch"
    assert cache_key(config) != key
    assert np.isfinite(config.pretrain.lr)


# ---------------------------------------------------------------- the backbone shipped with the package


def test_the_shipped_backbone_is_the_default_runs_and_its_hash_is_the_recorded_one():
    from smat.runtime.checkpoint import file_digest
    from smat.training.pretrain import SHIPPED, shipped_record, shipped_weights

    record = shipped_record()
    assert record is not None and SHIPPED.is_file(), "smat/model/weights/ lost the shipped backbone or its record"
    assert file_digest(SHIPPED) == record["sha256"]
    assert record["config_key"] == cache_key(Config()), \
        "the default settings changed: re-create the weights with the command in the record"
    assert record["command"].startswith("python -m smat.pretrain")
    assert shipped_weights(Config()) == SHIPPED
    config = Config()
    config.pretrain.use_shipped = False  # --pretrain
    assert shipped_weights(config) is None
    config = Config()
    config.pretrain.epochs += 1  # settings the shipped file was not trained with pre-train anew
    assert shipped_weights(config) is None


def test_the_shipped_backbone_loads_and_recognises_held_out_pretraining_images():
    from safetensors.torch import load_file

    from smat.model.backbone import create_builtin
    from smat.training.pretrain import SHIPPED, pretraining_images, shipped_record

    config = Config()
    backbone = create_builtin(config.model.builtin, config.model.image_size)
    backbone.load_state_dict(load_file(str(SHIPPED)))  # strict: every tensor present, no stray one
    assert all(torch.isfinite(t).all() for t in backbone.state_dict().values())
    # its features separate held-out images of the pre-training classes: nearest class mean of the training
    # images, which needs no classifier head (the package ships the backbone only)
    x, y, classes = pretraining_images(config)
    train, held = held_out_split(y, config.pretrain.held_out_per_class)
    keep = y[train] < 50
    with torch.no_grad():
        features = torch.nn.functional.normalize(backbone.eval()(x[train][keep]), dim=-1)
        means = torch.stack([features[y[train][keep] == c].mean(0) for c in range(50)])
        held = held[y[held] < 50]
        queries = torch.nn.functional.normalize(backbone(x[held]), dim=-1)
    nearest = (queries @ means.T).argmax(-1)
    assert (nearest == y[held]).float().mean() > 10 / 50, "far above chance (1/50) for a backbone that learnt"
    assert shipped_record()["held_out_accuracy"] > 20 / classes


def test_a_damaged_shipped_backbone_is_an_error_not_a_silent_pretraining(tmp_path, monkeypatch):
    import shutil

    from smat.config import ConfigError
    from smat.training import pretrain as module

    copy = tmp_path / module.SHIPPED.name
    shutil.copy(module.SHIPPED, copy)
    shutil.copy(module.SHIPPED.with_suffix(".json"), copy.with_suffix(".json"))
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    monkeypatch.setattr(module, "SHIPPED", copy)
    with pytest.raises(ConfigError, match="missing or damaged.*pretrain.use_shipped=false"):
        module.shipped_weights(Config())
