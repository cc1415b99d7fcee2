"""Episode loaders for a run, built from its :class:`~smat.config.DataConfig`.

Training episodes are drawn from the train split of the training domains,
validation episodes (fixed: the same tasks every epoch) from their val split,
test episodes from the test split of every test domain. Every episode is a
pure function of (seed, index), so any process can load any task.
"""

from __future__ import annotations

from ..config import Config, ConfigError
from .builtin import DOMAINS, ID_DOMAINS, OOD_DOMAINS, BuiltinSource
from .folder import ImageFolderSource
from .h5 import MetaDatasetH5Source
from .loader import EpisodeDataset, EpisodeLoader
from .samplers import make_sampler
from .transforms import EvalTransform, TrainTransform

VAL_SEED_OFFSET = 7919  # validation and test episodes never reuse the training stream's seeds


def open_source(config: Config):
    data = config.data
    if data.source == "builtin":
        return BuiltinSource([*ID_DOMAINS, *OOD_DOMAINS])
    if data.source == "folder":
        return ImageFolderSource(data.root)
    return MetaDatasetH5Source(data.root)


def train_domains(config: Config, source) -> list[str]:
    return _check_domains(config.data.train_domains or _default_train(config, source), source, "train_domains")


def test_domains(config: Config, source) -> list[str]:
    default = [*ID_DOMAINS, *OOD_DOMAINS] if config.data.source == "builtin" else list(source)
    return _check_domains(config.data.test_domains or default, source, "test_domains")


def _default_train(config: Config, source) -> list[str]:
    if config.data.source == "builtin":
        return list(ID_DOMAINS)
    return [name for name in source if source[name].classes("train")]


def _check_domains(names, source, key: str) -> list[str]:
    unknown = [name for name in names if name not in list(source)]
    if unknown:
        raise ConfigError(f"data.{key}: no domain {', '.join(map(repr, unknown))} in the source; "
                          f"available: {', '.join(source)}")
    return list(names)


def sampler_options(config: Config, way: int | None = None) -> dict:
    data = config.data
    if data.protocol == "variable":
        return {}
    return {"n_way": way or data.n_way, "k_shot": data.k_shot, "q_query": data.q_query}


def _sampler(config: Config, source, domains, split: str):
    try:
        return make_sampler(source, domains, split, config.data.protocol, **sampler_options(config))
    except ValueError as error:
        raise ConfigError(f"cannot draw {config.data.n_way}-way {config.data.k_shot}-shot tasks from the "
                          f"{split} split: {error}. Lower data.n_way, data.k_shot or data.q_query.") from None


def train_dataset(config: Config, source) -> EpisodeDataset:
    data = config.data
    transform = TrainTransform(config.model.image_size, scale=data.train_crop_scale, jitter=data.train_jitter,
                               flip=data.train_flip)
    sampler = _sampler(config, source, train_domains(config, source), "train")
    return EpisodeDataset(source, sampler, transform, num_episodes=config.train.tasks_per_epoch,
                          seed=config.seed)


def eval_dataset(config: Config, source, domain: str, split: str, episodes: int, seed: int) -> EpisodeDataset:
    sampler = _sampler(config, source, domain, split)
    return EpisodeDataset(source, sampler, EvalTransform(config.model.image_size), num_episodes=episodes,
                          seed=seed)


def val_datasets(config: Config, source) -> dict[str, EpisodeDataset]:
    return {name: eval_dataset(config, source, name, "val", config.train.val_episodes,
                               config.seed + VAL_SEED_OFFSET)
            for name in train_domains(config, source) if source[name].classes("val")}


def test_datasets(config: Config, source) -> dict[str, EpisodeDataset]:
    return {name: eval_dataset(config, source, name, "test", config.evaluate.episodes, config.evaluate.seed)
            for name in test_domains(config, source)}


def loader(dataset: EpisodeDataset, config: Config, start: int = 0, count: int | None = None,
           meta_batch: int | None = None, indices=None) -> EpisodeLoader:
    return EpisodeLoader(dataset, num_episodes=count, start=start, meta_batch=meta_batch,
                         num_workers=config.data.num_workers, indices=indices)


def domain_role(name: str, source) -> str:
    """'id' (the domain has training classes, i.e. it can be meta-trained on) or 'ood' (test classes only)."""
    if isinstance(source, BuiltinSource):
        return DOMAINS[name].role
    return "id" if source[name].classes("train") else "ood"
