"""Pre-training of the built-in backbone: it learns (a regression to the non-learning schedule fails here)."""

import math

import numpy as np
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
