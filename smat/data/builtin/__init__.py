"""Built-in domains that need no download: generated on first use and cached.

Cached as one compressed .npz per domain under ``cache_dir()/builtin-v1/``
(``$SMAT_CACHE_DIR``, else ``$XDG_CACHE_HOME/smat``, else ``~/.cache/smat``),
images uint8 at NATIVE_SIZE px; the episode transforms resize them.

Roles are fixed: ID domains have train/val/test class splits and are used
for meta-training; OOD domains put every class in 'test' and are used for
meta-testing only; the pre-training domain's classes (all in 'train') are
disjoint from both, for pre-training the built-in backbone.

Every test domain's group is part of its definition (:data:`GROUPS`):

- ``id``: the meta-training domains (their test classes);
- ``near_ood``: unseen classes drawn by a training generator (the same glyph
  renderer and fonts, or the procedural colour compositing of the shapes);
- ``far_ood``: a source or generator that no training domain uses: real
  handwriting and photographs, typefaces, renderers and colour schemes never
  seen in training (:mod:`.far_ood`).

One more domain is no test domain: ``relief_patches`` (group ``far_ood_val``), a real source that neither
training nor testing uses, on which settings that must hold far from the training data may be chosen
(``python -m smat.far_ood``). Runs are not tested on it unless ``data.test_domains`` names it.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..folder import random_class_split
from ..source import ArrayDomain, Source
from . import glyphs
from .cache import cache_dir, load_arrays, save_arrays
from .digits import generate_digits
from .far_ood import (
    generate_cm_outline,
    generate_lowres_inverted,
    generate_photo_patches,
    generate_relief_patches,
    generate_scan_patches,
)
from .pretrain_families import generate_pretrain_procedural
from .shapes import generate_shapes, generate_textures

NATIVE_SIZE = 32
# bumped whenever generation changes: builtin-v2 caches written while the pre-training set was being redesigned
# (1040 glyph classes of 20) share v2's name with the final 400-class set, so the final set is v3
CACHE_VERSION = "builtin-v3"
GLYPHS_PER_CLASS = 20
PROCEDURAL_PER_CLASS = 40
# The pre-training domain: fewer classes with more images each than the test domains. A ViT trained from scratch
# for ~1500 steps stays at chance on 1040 classes of 20 images (measured: 0.1% after 3 epochs) but learns on a
# few hundred classes with 40, and more renderings per class teach the invariances that few-shot tasks need.
PRETRAIN_MAX_CLASSES = 240  # glyph classes
PRETRAIN_PROCEDURAL_CLASSES = 40  # per procedural kind (harmonic_outline, scribble, wave_mixture, bandpass_noise)
PRETRAIN_PER_CLASS = 40
FAR_OOD_PER_CLASS = 40
# Far-OOD domains added after builtin-v3 carry their own tag in the file name, so that changing one of them
# regenerates that domain only and never invalidates the pre-training cache (bump the tag, not CACHE_VERSION).
FAR_OOD_TAG = "far2"  # far1: a development version of these domains, never released

# A test domain's group: who drew it, relative to the training data (see the module docstring).
GROUPS = ("id", "near_ood", "far_ood")
VALIDATION_GROUP = "far_ood_val"  # a far-OOD source for choosing settings, never a test domain


@dataclass(frozen=True)
class BuiltinDomain:
    name: str
    group: str  # 'id', 'near_ood', 'far_ood' (test domains), 'far_ood_val' (validation only) or 'pretrain'
    description: str
    generate: Callable[[int, int], tuple[np.ndarray, np.ndarray, list[str]]]  # (size, seed) → arrays
    cache_tag: str = ""  # part of the cache file's name (bumped when this domain's generation changes)

    @property
    def role(self) -> str:
        """'id' (meta-trained on), 'ood' (never trained on: near- or far-OOD, or far-OOD validation) or
        'pretrain'."""
        return "ood" if self.group in ("near_ood", "far_ood", VALIDATION_GROUP) else self.group


def _glyph_domain(name: str, max_classes: int | None = None, per_class: int = GLYPHS_PER_CLASS):
    def generate(size: int, seed: int):
        images, labels, names = glyphs.generate(name, per_class, size, seed)
        if max_classes is not None and len(names) > max_classes:
            keep = np.sort(np.random.default_rng(seed).permutation(len(names))[:max_classes])
            mask = np.isin(labels, keep)
            remap = np.full(len(names), -1)
            remap[keep] = np.arange(len(keep))
            images, labels, names = images[mask], remap[labels[mask]], [names[i] for i in keep]
        return images, labels, names
    return generate


def _pretrain_domain(size: int, seed: int):
    """Glyphs (grey, as RGB) then the procedural families of :mod:`.pretrain_families` (colour)."""
    images, labels, names = _glyph_domain("pretrain_glyphs", PRETRAIN_MAX_CLASSES, PRETRAIN_PER_CLASS)(size, seed)
    more, more_labels, more_names = generate_pretrain_procedural(PRETRAIN_PROCEDURAL_CLASSES, PRETRAIN_PER_CLASS,
                                                                 size, seed + 1)
    images = np.concatenate([np.repeat(images[..., None], 3, axis=-1), more])
    return images, np.concatenate([labels, more_labels + len(names)]), [*names, *more_names]


DOMAINS: dict[str, BuiltinDomain] = {d.name: d for d in (
    BuiltinDomain("latin", "id", "Latin letters with Latin-1 accents", _glyph_domain("latin")),
    BuiltinDomain("greek_cyrillic", "id", "Greek and Cyrillic letters", _glyph_domain("greek_cyrillic")),
    BuiltinDomain("math_symbols", "id", "mathematical operators", _glyph_domain("math_symbols")),
    BuiltinDomain("arrows_technical", "id", "arrows and technical symbols", _glyph_domain("arrows_technical")),
    BuiltinDomain("shapes", "id", "procedural shapes, filled or outlined, in colour",
                  lambda size, seed: generate_shapes(PROCEDURAL_PER_CLASS, size, seed)),
    BuiltinDomain("armenian_georgian", "near_ood", "Armenian and Georgian letters",
                  _glyph_domain("armenian_georgian")),
    BuiltinDomain("hebrew_arabic", "near_ood", "Hebrew and Arabic letters", _glyph_domain("hebrew_arabic")),
    BuiltinDomain("braille", "near_ood", "Braille patterns", _glyph_domain("braille")),
    BuiltinDomain("textures", "near_ood", "procedural textures in colour",
                  lambda size, seed: generate_textures(PROCEDURAL_PER_CLASS, size, seed)),
    BuiltinDomain("digits", "far_ood", "scikit-learn's handwritten digits (8×8, upsampled)",
                  lambda size, seed: generate_digits(size)),
    BuiltinDomain("photo_patches", "far_ood", "regions of real photos (scikit-learn's china and flower, "
                  "matplotlib's grace_hopper), random crops", lambda size, seed: generate_photo_patches(
                      FAR_OOD_PER_CLASS, size, seed), FAR_OOD_TAG),
    BuiltinDomain("scan_patches", "far_ood", "regions of a real MRI slice and a hill-shaded terrain model "
                  "(matplotlib's sample data), random crops, grey", lambda size, seed: generate_scan_patches(
                      FAR_OOD_PER_CLASS, size, seed), FAR_OOD_TAG),
    BuiltinDomain("cm_outline", "far_ood", "digits and signs in Computer Modern typefaces, hollow outlines "
                  "in colour on gradients", lambda size, seed: generate_cm_outline(FAR_OOD_PER_CLASS, size, seed),
                  FAR_OOD_TAG),
    BuiltinDomain("lowres_inverted", "far_ood", "digits and signs in Pillow's fonts, light on dark, low "
                  "resolution, blur and noise", lambda size, seed: generate_lowres_inverted(
                      FAR_OOD_PER_CLASS, size, seed), FAR_OOD_TAG),
    BuiltinDomain("relief_patches", VALIDATION_GROUP, "regions of a real colour-relief map of a coast and its "
                  "sea floor (matplotlib's topobathy), random crops; for validation only",
                  lambda size, seed: generate_relief_patches(FAR_OOD_PER_CLASS, size, seed), FAR_OOD_TAG),
    BuiltinDomain("pretrain", "pretrain", "Canadian syllabics, IPA, geometric shapes, symbols, dingbats, "
                  "box drawing, Lisu, Tifinagh, N'Ko; random blobs, scribbles, wave mixtures, band-pass noise",
                  _pretrain_domain),
)}
ID_DOMAINS = tuple(name for name, d in DOMAINS.items() if d.group == "id")
NEAR_OOD_DOMAINS = tuple(name for name, d in DOMAINS.items() if d.group == "near_ood")
FAR_OOD_DOMAINS = tuple(name for name, d in DOMAINS.items() if d.group == "far_ood")
OOD_DOMAINS = NEAR_OOD_DOMAINS + FAR_OOD_DOMAINS
FAR_OOD_VALIDATION_DOMAINS = tuple(name for name, d in DOMAINS.items() if d.group == VALIDATION_GROUP)
PRETRAIN_DOMAIN = "pretrain"


def domain_seed(name: str) -> int:
    return zlib.crc32(name.encode())


def cache_path(name: str, root: Path | None = None) -> Path:
    domain = DOMAINS.get(name)
    tag = f"-{domain.cache_tag}" if domain is not None and domain.cache_tag else ""
    return (root or cache_dir()) / CACHE_VERSION / f"{name}{tag}-{NATIVE_SIZE}px.npz"


def build(name: str, root: Path | None = None, rebuild: bool = False) -> Path:
    """Generate domain ``name`` into the cache unless it is there; returns the file."""
    if name not in DOMAINS:
        raise KeyError(f"no built-in domain {name!r}; available: {list(DOMAINS)}")
    path = cache_path(name, root)
    if path.is_file() and not rebuild:
        return path
    threads = torch.get_num_threads()
    # Many tiny batched ops: one thread avoids spin-waiting on busy cores.
    torch.set_num_threads(1)
    try:
        images, labels, names = DOMAINS[name].generate(NATIVE_SIZE, domain_seed(name))
    finally:
        torch.set_num_threads(threads)
    save_arrays(path, images=images, labels=np.asarray(labels, dtype=np.int64),
                class_names=np.asarray(names, dtype=np.str_))
    return path


def class_splits(name: str, num_classes: int) -> dict[str, list[int]]:
    role = DOMAINS[name].role
    if role == "ood":
        return {"test": list(range(num_classes))}
    if role == "pretrain":
        return {"train": list(range(num_classes))}
    return random_class_split(num_classes, (0.7, 0.15, 0.15), domain_seed(name))


class BuiltinSource(Source):
    """The built-in domains (default: all), generated into the cache on first use.

    cache: folder instead of ``cache_dir()``; rebuild: regenerate even if cached.
    """

    def __init__(self, domains=None, cache: str | Path | None = None, rebuild: bool = False):
        names = list(DOMAINS) if domains is None else ([domains] if isinstance(domains, str) else list(domains))
        root = Path(cache).expanduser() if cache is not None else None
        built = []
        for name in names:
            arrays = load_arrays(build(name, root, rebuild))
            class_names = [str(n) for n in arrays["class_names"]]
            built.append(ArrayDomain(name, arrays["images"], arrays["labels"], class_names,
                                     class_splits(name, len(class_names))))
        super().__init__(built)


def build_all(root: Path | None = None, rebuild: bool = False, log=print) -> None:
    for name in DOMAINS:
        start = time.perf_counter()
        path = build(name, root, rebuild)
        log(f"{name:>18}: {path} ({path.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s)")
