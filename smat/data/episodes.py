"""Episode loaders for a run, built from its :class:`~smat.config.DataConfig`.

Training episodes are drawn from the train split of the training domains,
validation episodes (fixed: the same tasks every epoch) from their val split,
test episodes from the test split of every test domain. Every episode is a
pure function of (seed, index), so any process can load any task.

Image folders can be test-only (OOD) domains, every class tested: ``data.test_only`` marks domains of a
folder source, ``data.test_folders`` adds the domains of other folders to any source's test domains
(``python -m smat.evaluate --folder DIR``).
"""

from __future__ import annotations

from pathlib import Path

from ..config import Config, ConfigError
from .builtin import DOMAINS, FAR_OOD_VALIDATION_DOMAINS, ID_DOMAINS, OOD_DOMAINS, BuiltinSource
from .folder import ImageFolderSource, image_extensions, is_image_file, listing
from .h5 import MetaDatasetH5Source
from .loader import EpisodeDataset, EpisodeLoader
from .samplers import make_sampler
from .source import Source
from .transforms import EvalTransform, TrainTransform

VAL_SEED_OFFSET = 7919  # validation and test episodes never reuse the training stream's seeds


class WithTestFolders(Source):
    """A run's source plus the domains of image folders that are only tested (OOD, every class tested)."""

    def __init__(self, base, folders: dict[str, ImageFolderSource]):
        self.base, self.folders = base, folders
        super().__init__({**base.domains, **{name: source[name] for name, source in folders.items()}})


def open_source(config: Config):
    data = config.data
    if data.source == "builtin":
        # the far-OOD validation source only where a config names it (it is never a default test domain)
        validation = [name for name in FAR_OOD_VALIDATION_DOMAINS if name in (data.test_domains or ())]
        source = BuiltinSource([*ID_DOMAINS, *OOD_DOMAINS, *validation])
    elif data.source == "folder":
        source = ImageFolderSource(data.root, data.splits)
        _mark_test_only(source, data.test_only, f"data.root={data.root}")
    else:
        source = MetaDatasetH5Source(data.root)
    return with_test_folders(source, data.test_folders) if data.test_folders else source


def _mark_test_only(source, names, where: str) -> None:
    unknown = [name for name in names if name not in source.domains]
    if unknown:
        raise ConfigError(f"data.test_only: no domain {', '.join(map(repr, unknown))} under {where}; "
                          f"available: {', '.join(source)}")
    for name in names:
        domain = source[name]
        domain.splits = {"train": [], "val": [], "test": domain.classes("all")}


def with_test_folders(source, folders) -> WithTestFolders:
    """``source`` plus every domain of each folder, test-only. A folder is ``<dir>/<domain>/<class>/<image>``,
    or ``<dir>/<class>/<image>`` (then it is one domain, named after the folder)."""
    added: dict[str, ImageFolderSource] = {}
    for folder in map(lambda f: Path(f).expanduser(), folders):
        single = _holds_images(folder)
        extra = ImageFolderSource(folder.parent, domains=[folder.name]) if single else ImageFolderSource(folder)
        _mark_test_only(extra, list(extra), str(folder))
        clash = [name for name in extra if name in source.domains or name in added]
        if clash:
            raise ConfigError(f"data.test_folders: {folder} has domain(s) {', '.join(map(repr, clash))}, a name "
                              f"already taken; rename the folder")
        added.update({name: extra for name in extra})
    return WithTestFolders(source, added)


def _holds_images(folder: Path) -> bool:
    """Whether ``folder`` is ``<class>/<image>`` (its sub-folders hold images) rather than a data root."""
    extensions = image_extensions()
    for child in (c for c in listing(folder, "test folder") if c.is_dir() and not c.name.startswith(".")):
        if any(is_image_file(f, extensions) for f in listing(child, "class folder")):
            return True
    return False


def train_domains(config: Config, source) -> list[str]:
    return _check_domains(config.data.train_domains or _default_train(config, source), source, "train_domains")


def test_domains(config: Config, source) -> list[str]:
    """``data.test_domains`` (default: the source's ID and OOD domains), and the test folders' domains unless
    ``data.test_domains`` names some of them."""
    added = list(source.folders) if isinstance(source, WithTestFolders) else []
    base = source.base if isinstance(source, WithTestFolders) else source
    default = [*ID_DOMAINS, *OOD_DOMAINS] if config.data.source == "builtin" else list(base)
    names = list(config.data.test_domains or default)
    if added and not set(names) & set(added):
        names += added
    return _check_domains(names, source, "test_domains")


def _default_train(config: Config, source) -> list[str]:
    if config.data.source == "builtin":
        return list(ID_DOMAINS)
    base = source.base if isinstance(source, WithTestFolders) else source
    return [name for name in base if base[name].classes("train")]


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


def domain_group(name: str, source) -> str:
    """'id', 'near_ood' or 'far_ood' where the source declares it (built-in domains), else 'id' or 'ood' as
    :func:`domain_role` (test folders are 'ood': their group is not declared). See :mod:`smat.data.groups`."""
    if isinstance(source, WithTestFolders):
        return "ood" if name in source.folders else domain_group(name, source.base)
    if isinstance(source, BuiltinSource):
        return DOMAINS[name].group
    return domain_role(name, source)


def domain_role(name: str, source) -> str:
    """'id' (the domain has training classes, i.e. it can be meta-trained on) or 'ood' (test classes only)."""
    if isinstance(source, WithTestFolders):
        return "ood" if name in source.folders else domain_role(name, source.base)
    if isinstance(source, BuiltinSource):
        return DOMAINS[name].role
    return "id" if source[name].classes("train") else "ood"
