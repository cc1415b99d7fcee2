"""Few-shot data: episodes, samplers, transforms, and image sources.

Sources: :class:`ImageFolderSource` (``<root>/<domain>/<class>/<image>``),
:class:`MetaDatasetH5Source` (Meta-Dataset as .h5), :class:`BuiltinSource`
(generated locally, no download). Samplers draw episode plans; an
:class:`EpisodeDataset` turns them into :class:`Task` tensors, and an
:class:`EpisodeLoader` loads them in worker processes.
"""

from .builtin import DOMAINS as BUILTIN_DOMAINS
from .builtin import (
                      FAR_OOD_DOMAINS,
                      FAR_OOD_VALIDATION_DOMAINS,
                      ID_DOMAINS,
                      NEAR_OOD_DOMAINS,
                      OOD_DOMAINS,
                      PRETRAIN_DOMAIN,
                      BuiltinSource,
)
from .episode import EpisodeSpec, Task
from .folder import ImageFolderSource
from .h5 import MetaDatasetH5Source
from .loader import EpisodeDataset, EpisodeLoader
from .samplers import FixedSampler, MultiDomainSampler, VariableSampler, make_sampler
from .source import ArrayDomain, DataError, DataNotFoundError, Domain, Source, UnreadableImageError
from .transforms import EvalTransform, TrainTransform, diff_augment

__all__ = [
    "BUILTIN_DOMAINS", "FAR_OOD_DOMAINS", "FAR_OOD_VALIDATION_DOMAINS", "ID_DOMAINS", "NEAR_OOD_DOMAINS",
    "OOD_DOMAINS", "PRETRAIN_DOMAIN",
    "ArrayDomain", "BuiltinSource", "DataError",
    "DataNotFoundError", "Domain", "EpisodeDataset", "EpisodeLoader", "EpisodeSpec", "EvalTransform", "FixedSampler",
    "ImageFolderSource", "MetaDatasetH5Source", "MultiDomainSampler", "Source", "Task", "TrainTransform",
    "UnreadableImageError", "VariableSampler", "diff_augment", "make_sampler",
]
