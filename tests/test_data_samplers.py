"""Samplers, episode assembly, determinism and transforms, over an in-memory source.

Each image encodes its own identity: pixel (0, 0) is the class index and
pixel (0, 1) the item index, so a test can check which image went where.
"""

import numpy as np
import pytest
import torch

from smat.data import (
    ArrayDomain,
    EpisodeDataset,
    EpisodeLoader,
    EvalTransform,
    FixedSampler,
    MultiDomainSampler,
    Source,
    TrainTransform,
    VariableSampler,
    diff_augment,
    make_sampler,
)

SIZE = 4


def coded_domain(name, counts, splits=None):
    """ArrayDomain whose images carry (class, item mod 256) in their first two pixels."""
    images, labels = [], []
    for c, count in enumerate(counts):
        for item in range(count):
            image = np.full((SIZE, SIZE), 255, dtype=np.uint8)
            image[0, 0], image[0, 1] = c, item % 256
            images.append(image)
            labels.append(c)
    splits = splits or {"train": list(range(len(counts)))}
    return ArrayDomain(name, np.stack(images), np.array(labels), [f"{name}-{c}" for c in range(len(counts))], splits)


def raw_transform(images, rng=None):
    return EvalTransform(SIZE, crop_fraction=1.0, normalized=False)(images, rng)


def decode(x):
    pixels = (x[:, 0, 0, :2] * 255).round().long()
    return pixels[:, 0], pixels[:, 1]


@pytest.fixture
def source():
    rng = np.random.default_rng(0)
    return Source([coded_domain("a", [30] * 12), coded_domain("b", rng.integers(2, 200, size=80).tolist())])


def test_fixed_sampler_counts_labels_and_disjointness(source):
    dataset = EpisodeDataset(source, FixedSampler(source["a"], "train", 5, 3, 4), raw_transform, seed=1)
    for index in range(20):
        task, spec = dataset[index], dataset.spec(index)
        assert task.support_x.shape == (15, 3, SIZE, SIZE) and task.query_x.shape == (20, 3, SIZE, SIZE)
        assert torch.equal(task.support_y, torch.arange(5).repeat_interleave(3))
        assert torch.equal(task.query_y, torch.arange(5).repeat_interleave(4))
        assert len(set(spec.classes)) == 5
        for x, y in ((task.support_x, task.support_y), (task.query_x, task.query_y)):
            classes, _ = decode(x)
            assert torch.equal(classes, torch.tensor(spec.classes)[y])
        support_ids = set(zip(*[t.tolist() for t in decode(task.support_x)]))
        query_ids = set(zip(*[t.tolist() for t in decode(task.query_x)]))
        assert len(support_ids) == 15 and len(query_ids) == 20 and not support_ids & query_ids
        assert task.class_names == tuple(f"a-{c}" for c in spec.classes)


def test_variable_sampler_stays_within_meta_dataset_bounds(source):
    domain = source["b"]
    sampler = VariableSampler(domain, "train")
    ways, totals = [], []
    for index in range(300):
        spec = sampler.sample(np.random.default_rng([7, index]))
        counts = np.array([domain.num_items(c) for c in spec.classes])
        shots = np.array([len(s) for s in spec.support])
        queries = np.array([len(q) for q in spec.query])
        assert 5 <= spec.n_way <= 50 and len(set(spec.classes)) == spec.n_way
        assert np.all(queries == min(10, counts.min() // 2))
        assert np.all(shots >= 1) and np.all(shots + queries <= counts)
        assert shots.sum() <= 500
        for s, q in zip(spec.support, spec.query):
            assert not set(s) & set(q)
        ways.append(spec.n_way)
        totals.append(shots.sum())
    # Way is uniform on 5…50: over 300 draws both ends of the range are visited.
    assert min(ways) <= 8 and max(ways) >= 47
    assert max(totals) > 100 and min(totals) < 50


def test_variable_sampler_optional_per_class_clip():
    domain = coded_domain("big", [1000] + [12] * 5)
    sampler = VariableSampler(domain, "train", max_support_per_class=100)
    shots = [len(s) for i in range(100) for s in sampler.sample(np.random.default_rng(i)).support]
    assert max(shots) <= 100
    unclipped = VariableSampler(domain, "train")
    assert max(len(s) for i in range(100) for s in unclipped.sample(np.random.default_rng(i)).support) > 100


def test_way_is_bounded_by_class_count():
    domain = coded_domain("small", [20] * 7)
    sampler = VariableSampler(domain, "train")
    assert {sampler.sample(np.random.default_rng(i)).n_way for i in range(200)} == {5, 6, 7}


def test_multi_domain_sampler_uses_every_domain_with_weights(source):
    sampler = make_sampler(source, ["a", "b"], "train", "fixed", weights=[1, 3], n_way=5, k_shot=1, q_query=1)
    assert isinstance(sampler, MultiDomainSampler)
    picks = [sampler.sample(np.random.default_rng(i)).domain for i in range(400)]
    assert 0.65 < picks.count("b") / 400 < 0.85


def test_episodes_are_deterministic_in_any_order_and_with_workers(source):
    sampler = make_sampler(source, ["a", "b"], "train", "variable")
    dataset = EpisodeDataset(source, sampler, TrainTransform(8, scale=(0.5, 1.0)), num_episodes=6, seed=3)
    forward = [dataset[i] for i in range(6)]
    backward = [dataset[i] for i in reversed(range(6))][::-1]
    loaded = list(EpisodeLoader(dataset, num_workers=2))
    for a, b, c in zip(forward, backward, loaded):
        for name in ("support_x", "support_y", "query_x", "query_y"):
            assert torch.equal(getattr(a, name), getattr(b, name))
            assert torch.equal(getattr(a, name), getattr(c, name))
    other_seed = EpisodeDataset(source, sampler, TrainTransform(8), seed=4)[0]
    assert other_seed.support_x.shape != forward[0].support_x.shape or not torch.equal(
        other_seed.support_x, forward[0].support_x)


def test_meta_batches_and_start_offset(source):
    dataset = EpisodeDataset(source, FixedSampler(source["a"], "train", 5, 1, 1), raw_transform, seed=0)
    batches = list(EpisodeLoader(dataset, num_episodes=8, start=100, meta_batch=4))
    assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    assert torch.equal(batches[1][3].support_x, dataset[107].support_x)


def test_classes_with_too_few_images_are_excluded_then_error():
    domain = coded_domain("thin", [3, 3, 10, 10, 10, 10, 10, 2])
    with pytest.warns(UserWarning, match="excluding 3 of 8 classes"):
        sampler = FixedSampler(domain, "train", 5, 2, 2)
    assert sorted(sampler.classes) == [2, 3, 4, 5, 6]
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="lower the shots"):
        FixedSampler(domain, "train", 5, 5, 6)
    with pytest.raises(ValueError, match="split 'val'"):
        FixedSampler(domain, "val", 5, 1, 1)


def test_eval_transform_resizes_and_normalises():
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[:, :, 0] = 255
    out = EvalTransform(16)([image, image[:, :, 0]])
    assert out.shape == (2, 3, 16, 16)
    red = (1 - 0.485) / 0.229
    assert torch.allclose(out[0, 0], torch.full((16, 16), red), atol=1e-5)
    assert torch.allclose(out[1], torch.full((3, 16, 16), 1.0).sub(torch.tensor([.485, .456, .406])[:, None, None])
                          .div(torch.tensor([.229, .224, .225])[:, None, None]), atol=1e-5)


def test_train_transform_is_random_but_seeded():
    image = np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8)
    transform = TrainTransform(24)
    a = transform([image] * 4, np.random.default_rng(1))
    b = transform([image] * 4, np.random.default_rng(1))
    assert a.shape == (4, 3, 24, 24) and torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_diff_augment_keeps_shape_and_gradient():
    x = torch.rand(6, 3, 16, 16, requires_grad=True)
    generator = torch.Generator().manual_seed(0)
    y = diff_augment(x, generator)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.equal(diff_augment(x, generator, probability=0.0), x)
    shifted = diff_augment(torch.ones(64, 1, 16, 16), torch.Generator().manual_seed(1), probability=1.0)
    assert (shifted == 0).any()  # translation fills with zeros somewhere
