"""Episode assembly time: 5-way 5-shot 15-query (100 images) at 32 and 128 px.

Sources: the built-in 'latin' domain (32 px uint8 arrays) and a Meta-Dataset
.h5 tree written here (160×160 RGB, like the PMF conversion). With workers=0
the time is one ``dataset[i]`` in this process; with workers=2 it is the wall
time per episode drawn from an EpisodeLoader that is already running. A
ViT-Tiny-sized training step on the same 100 images is measured alongside,
because the target is "well under one training step". Results go to
benchmarks/results/data_<date>.json with machine, date and versions.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from bench_util import write_rows

from smat.data import BuiltinSource, EpisodeDataset, EpisodeLoader, FixedSampler, MetaDatasetH5Source, TrainTransform

RESULTS = Path(__file__).parent / "results"
WORKER_EPISODES = 8


@pytest.fixture(scope="module")
def rows():
    collected: list[dict] = []
    yield collected
    if collected:
        write_rows(RESULTS, "data", collected)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("h5")
    directory = root / "aircraft"
    directory.mkdir()
    rng = np.random.default_rng(0)
    for class_id in range(10):
        with h5py.File(directory / f"{class_id}.h5", "w") as file:
            for item in range(20):
                file.create_group(str(item))["image"] = rng.integers(0, 256, (160, 160, 3), dtype=np.uint8)
    spec = {"classes_per_split": {"TRAIN": 10, "VALID": 0, "TEST": 0},
            "images_per_class": {str(c): 20 for c in range(10)}}
    (directory / "dataset_spec.json").write_text(json.dumps(spec))
    return {"builtin": (BuiltinSource("latin"), "latin"), "h5": (MetaDatasetH5Source(root), "aircraft")}


def _dataset(sources, kind, size):
    source, name = sources[kind]
    sampler = FixedSampler(source[name], "train", n_way=5, k_shot=5, q_query=15)
    return EpisodeDataset(source, sampler, TrainTransform(size), num_episodes=10**6, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("size", [32, 128])
@pytest.mark.parametrize("kind", ["builtin", "h5"])
def test_episode_assembly(benchmark, sources, rows, kind, size, workers):
    dataset = _dataset(sources, kind, size)
    if workers == 0:
        counter = itertools.count()
        task = benchmark(lambda: dataset[next(counter)])
        per_episode = benchmark.stats.stats.median
    else:
        loader = iter(EpisodeLoader(dataset, num_workers=workers, prefetch_factor=4))
        next(loader)  # workers started and warm

        def draw():
            return [next(loader) for _ in range(WORKER_EPISODES)][-1]

        task = benchmark.pedantic(draw, rounds=5, warmup_rounds=1)
        per_episode = benchmark.stats.stats.median / WORKER_EPISODES
    assert task.support_x.shape == (25, 3, size, size) and task.query_x.shape == (75, 3, size, size)
    rows.append({"op": "episode", "source": kind, "size": size, "workers": workers, "images": 100,
                 "seconds_per_episode": per_episode})


@pytest.mark.parametrize("size,patch", [(32, 4), (128, 16)])
def test_reference_training_step(benchmark, rows, size, patch):
    """Forward + backward of a ViT-Tiny-sized encoder (dim 192, depth 12, 3 heads, 64 tokens) on 100 images."""
    torch.manual_seed(0)
    embed = torch.nn.Conv2d(3, 192, patch, patch)
    layer = torch.nn.TransformerEncoderLayer(192, 3, 768, batch_first=True, norm_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    images = torch.randn(100, 3, size, size)

    def step():
        tokens = embed(images).flatten(2).transpose(1, 2)
        encoder(tokens).mean().backward()

    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    rows.append({"op": "vit_tiny_train_step", "size": size, "images": 100,
                 "seconds": statistics.median(benchmark.stats.stats.data), "threads": torch.get_num_threads(),
                 "measured_at": time.strftime("%H:%M:%S")})
