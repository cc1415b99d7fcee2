"""Image-folder and Meta-Dataset .h5 sources, on trees the tests write themselves."""

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from smat.data import EpisodeDataset, EpisodeLoader, EvalTransform, ImageFolderSource, MetaDatasetH5Source
from smat.data.h5 import H5FileCache, split_counts
from smat.data.samplers import FixedSampler, VariableSampler
from smat.data.source import DataError


def write_h5_source(root, name, images_per_class, classes_per_split=(6, 2, 2), size=12):
    """Community layout: dataset_spec.json plus <class_id>.h5 with groups '0'…'N−1' (image, label, id)."""
    directory = root / name
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for class_id, count in enumerate(images_per_class):
        with h5py.File(directory / f"{class_id}.h5", "w") as file:
            for item in range(count):
                group = file.create_group(str(item))
                image = rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)
                image[0, :] = class_id  # identity check below (survives the centre crop)
                group["image"] = image
                group["label"] = np.int64(class_id)
                group["id"] = f"{name}-{class_id}-{item}".encode()
    train, valid, test = classes_per_split
    spec = {"name": name, "classes_per_split": {"TRAIN": train, "VALID": valid, "TEST": test},
            "images_per_class": {str(c): n for c, n in enumerate(images_per_class)},
            "class_names": {str(c): f"n{c:04d}" for c in range(len(images_per_class))}}
    (directory / "dataset_spec.json").write_text(json.dumps(spec))
    return directory


@pytest.fixture
def h5_root(tmp_path):
    write_h5_source(tmp_path, "aircraft", [8] * 10)
    write_h5_source(tmp_path, "omniglot", [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], classes_per_split=(4, 3, 3))
    return tmp_path


def test_h5_splits_counts_and_images(h5_root):
    source = MetaDatasetH5Source(h5_root)
    assert list(source) == ["aircraft", "omniglot"]
    omniglot = source["omniglot"]
    assert omniglot.classes("train") == [0, 1, 2, 3] and omniglot.classes("test") == [7, 8, 9]
    assert [omniglot.num_items(c) for c in range(10)] == list(range(5, 15))
    assert omniglot.class_names[7] == "n0007"
    image = omniglot.load(7, 2)
    assert image.dtype == np.uint8 and image.shape == (12, 15, 3) and image[0, 0, 0] == 7


def test_h5_episodes_with_bounded_open_files(h5_root):
    source = MetaDatasetH5Source(h5_root, max_open_files=3)
    sampler = VariableSampler(source["omniglot"], "train", min_way=2, max_way=4)
    dataset = EpisodeDataset(source, sampler, EvalTransform(12, crop_fraction=1.0, normalized=False), seed=0)
    opened = []
    for index in range(15):
        task = dataset[index]
        assert len(source.files) <= 3
        opened.extend(source.files._files.values())
        classes = (task.support_x[:, 0, 0, 0] * 255).round().long()
        assert classes.tolist() == [int(task.class_names[y][1:]) for y in task.support_y]
    # Evicted handles are closed, not leaked.
    assert sum(bool(handle) for handle in {id(h): h for h in opened}.values()) <= 3
    assert len({id(h) for h in opened}) > 3


def test_h5_file_cache_forgets_handles_after_fork(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as file:
        file["a"] = 1
    cache = H5FileCache(2)
    cache.get(str(path))
    cache._pid = -1  # as seen from a forked child
    assert len(cache) == 0
    cache.get(str(path))
    assert len(cache) == 1
    cache.close()


def test_h5_works_in_worker_processes(h5_root):
    source = MetaDatasetH5Source(h5_root, max_open_files=2)
    source["aircraft"].load(0, 0)  # the parent holds an open handle before the workers fork
    dataset = EpisodeDataset(source, FixedSampler(source["aircraft"], "train", 3, 2, 2), EvalTransform(8),
                             num_episodes=6)
    tasks = list(EpisodeLoader(dataset, num_workers=2))
    assert len(tasks) == 6 and all(t.support_x.shape == (6, 3, 8, 8) for t in tasks)


def test_h5_bilevel_and_hierarchical_specs():
    bilevel = {"superclasses_per_split": {"TRAIN": 2, "VALID": 1, "TEST": 1},
               "classes_per_superclass": {"0": 3, "1": 4, "2": 5, "3": 6}}
    assert split_counts(bilevel, "spec") == {"TRAIN": 7, "VALID": 5, "TEST": 6}
    hierarchical = {"split_subgraphs": {"TRAIN": [{"children_ids": ["b"]}, {"children_ids": []}, {}],
                                        "VALID": [{}], "TEST": []}}
    assert split_counts(hierarchical, "spec") == {"TRAIN": 2, "VALID": 1, "TEST": 0}
    with pytest.raises(ValueError, match="classes_per_split"):
        split_counts({}, "some/dataset_spec.json")


def test_h5_missing_root_and_spec_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*dataset_spec.json"):
        MetaDatasetH5Source(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*dataset_spec.json"):
        MetaDatasetH5Source(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="cu_birds/dataset_spec.json"):
        MetaDatasetH5Source(tmp_path / "empty", domains=["cu_birds"])


def write_folder(root, domain, classes, per_class, size=20):
    rng = np.random.default_rng(1)
    for c in range(classes):
        directory = root / domain / f"class{c}"
        directory.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_folder_with_a_corrupt_image_warns_counts_and_continues(tmp_path):
    write_folder(tmp_path, "birds", classes=5, per_class=4)
    (tmp_path / "birds" / "class0" / "2.png").write_bytes(b"not an image at all")
    (tmp_path / "birds" / "class3" / "notes.txt").write_text("ignored: not an image extension")
    source = ImageFolderSource(tmp_path, fractions=(1.0, 0.0, 0.0), size_hint=16)
    domain = source["birds"]
    assert domain.class_names == [f"class{c}" for c in range(5)] and domain.num_items(3) == 4
    sampler = FixedSampler(domain, "train", 5, 1, 2)
    dataset = EpisodeDataset(source, sampler, EvalTransform(16), num_episodes=30)
    loader = EpisodeLoader(dataset)
    with pytest.warns(UserWarning, match="skipping unreadable image .*class0.2.png"):
        tasks = list(loader)
    assert all(t.support_x.shape == (5, 3, 16, 16) and t.query_x.shape == (10, 3, 16, 16) for t in tasks)
    assert set(loader.skipped) == {str(tmp_path / "birds" / "class0" / "2.png")}
    assert loader.skipped[str(tmp_path / "birds" / "class0" / "2.png")] > 1
    assert "1 unreadable images skipped" in loader.summary()


def test_folder_class_without_enough_readable_images_raises_clearly(tmp_path):
    """The unreadable class is excluded; with too few classes left, one DataError says what to do."""
    write_folder(tmp_path, "birds", classes=5, per_class=2)
    for name in ("0.jpg", "1.png"):
        (tmp_path / "birds" / "class1" / name).write_bytes(b"broken")
    source = ImageFolderSource(tmp_path, fractions=(1.0, 0.0, 0.0))
    dataset = EpisodeDataset(source, FixedSampler(source["birds"], "train", 5, 1, 1), EvalTransform(8))
    with pytest.warns(UserWarning, match="excluding class 'class1'"), \
            pytest.raises(DataError, match=r"only 4 classes have enough readable images.*'class1'.*fix or remove"):
        dataset[0]


def test_folder_splits_file_and_errors(tmp_path):
    write_folder(tmp_path, "birds", classes=6, per_class=2)
    write_folder(tmp_path, "mnist", classes=5, per_class=2)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"birds": {"train": ["class0", "class1", "class2", "class3"],
                                            "val": ["class4"], "test": ["class5"]},
                                  "mnist": {"test": "all"}}))
    source = ImageFolderSource(tmp_path, splits_file=splits)
    assert source["birds"].classes("train") == [0, 1, 2, 3] and source["birds"].classes("test") == [5]
    assert source["mnist"].classes("test") == list(range(5)) and source["mnist"].classes("train") == []
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        ImageFolderSource(tmp_path, splits_file=tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"no_such_root.*<root>/<domain>/<class>/<image>"):
        ImageFolderSource(tmp_path / "no_such_root")
    splits.write_text(json.dumps({"birds": {"train": ["ghost"]}}))
    with pytest.raises(ValueError, match="ghost"):
        ImageFolderSource(tmp_path, splits_file=splits)


def test_folder_random_splits_are_seeded(tmp_path):
    write_folder(tmp_path, "birds", classes=20, per_class=1)
    a = ImageFolderSource(tmp_path, seed=0)["birds"].splits
    assert a == ImageFolderSource(tmp_path, seed=0)["birds"].splits
    assert a != ImageFolderSource(tmp_path, seed=1)["birds"].splits
    assert sorted(sum(a.values(), [])) == list(range(20)) and len(a["val"]) == len(a["test"]) == 3
