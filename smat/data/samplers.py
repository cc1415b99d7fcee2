"""Episode samplers: fixed N-way K-shot, Meta-Dataset's variable-way variable-shot, multi-domain.

A sampler draws an :class:`EpisodeSpec` from a ``numpy.random.Generator``;
it never loads an image. Given the generator's state the draw is fixed, so an
episode depends only on (seed, episode index), never on worker scheduling.
Classes with too few images for the protocol are excluded when the sampler
is built, with a warning; if too few classes remain, a DataError (a
ValueError) says what to change. ``sample(rng, exclude)`` also leaves out the
(domain, class) pairs in ``exclude``: the episode builder's way to redraw an
episode without a class whose images turned out to be unreadable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from .episode import EpisodeSpec
from .source import DataError, Domain


def eligible_classes(domain: Domain, split: str, min_items: int, min_classes: int,
                     needed_for: str) -> list[int]:
    """Classes of ``split`` with at least ``min_items`` images; warn about the rest."""
    classes = domain.classes(split)
    keep = [c for c in classes if domain.num_items(c) >= min_items]
    dropped = [c for c in classes if domain.num_items(c) < min_items]
    if dropped:
        examples = ", ".join(f"{domain.class_names[c]!r} ({domain.num_items(c)})" for c in dropped[:5])
        warnings.warn(
            f"domain {domain.name!r} split {split!r}: excluding {len(dropped)} of {len(classes)} "
            f"classes with fewer than {min_items} images ({needed_for}): {examples}"
            + (" …" if len(dropped) > 5 else ""), stacklevel=3)
    if len(classes) < min_classes:  # more images would not help: the split has too few classes
        raise DataError(
            f"domain {domain.name!r} split {split!r} holds {len(classes)} of the domain's "
            f"{len(domain.class_names)} classes, but an episode needs {min_classes}; lower the ways (data.n_way), "
            f"add classes, or split the classes yourself (data.splits)")
    if len(keep) < min_classes:
        raise DataError(
            f"domain {domain.name!r} split {split!r}: {len(keep)} classes have at least "
            f"{min_items} images ({needed_for}), but an episode needs {min_classes}; "
            f"lower the shots/ways or add images")
    return keep


def _available(domain: Domain, split: str, classes: list[int], exclude, min_classes: int) -> list[int]:
    """``classes`` less the (domain, class) pairs of ``exclude``; a DataError
    when fewer than ``min_classes`` are left."""
    if not exclude:
        return classes
    left = [c for c in classes if (domain.name, c) not in exclude]
    if len(left) < min_classes:
        names = ", ".join(repr(domain.class_names[c]) for c in classes if (domain.name, c) in exclude)
        raise DataError(f"domain {domain.name!r} split {split!r}: only {len(left)} classes have enough readable "
                        f"images, but an episode needs {min_classes} (unreadable: {names}); fix or remove the "
                        f"broken images listed in the warnings, or lower the ways")
    return left


def _split_items(rng: np.random.Generator, num_items: int, n_support: int, n_query: int):
    chosen = rng.permutation(num_items)[: n_support + n_query]
    return tuple(int(i) for i in chosen[:n_support]), tuple(int(i) for i in chosen[n_support:])


def _spec(domain: Domain, rng, classes, shots, queries) -> EpisodeSpec:
    support, query = [], []
    for c, n_support, n_query in zip(classes, shots, queries, strict=True):
        s, q = _split_items(rng, domain.num_items(c), n_support, n_query)
        support.append(s)
        query.append(q)
    return EpisodeSpec(domain.name, tuple(int(c) for c in classes), tuple(support), tuple(query))


class FixedSampler:
    """N-way K-shot Q-query episodes: every class gets exactly k_shot + q_query images."""

    def __init__(self, domain: Domain, split: str, n_way: int = 5, k_shot: int = 5, q_query: int = 15):
        if min(n_way, k_shot, q_query) < 1:
            raise ValueError(f"n_way, k_shot and q_query must be ≥ 1, got {n_way}, {k_shot}, {q_query}")
        self.domain, self.split = domain, split
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.classes = eligible_classes(domain, split, k_shot + q_query, n_way,
                                        f"{k_shot} shots + {q_query} queries")

    def sample(self, rng: np.random.Generator, exclude=frozenset()) -> EpisodeSpec:
        available = _available(self.domain, self.split, self.classes, exclude, self.n_way)
        classes = rng.choice(available, size=self.n_way, replace=False)
        return _spec(self.domain, rng, classes, [self.k_shot] * self.n_way, [self.q_query] * self.n_way)


class VariableSampler:
    """Meta-Dataset's variable-way variable-shot episodes (Triantafillou et al. 2020, §3.2).

    For C eligible classes, with n_c images in class c:

    - way N ~ Uniform{min_way, …, min(max_way, C)}  (5 … 50);
    - query per class q = min(max_query, ⌊½·min_c n_c⌋) over the chosen classes (≤ 10);
    - support budget: β ~ U(0, 1), S = min(max_support, Σ_c ⌊β·min(max_contribution, n_c − q)⌋ + 1)
      (≤ 500; each class adds at most 100 to the budget);
    - imbalance: a_c ~ U(log ½, log 2), R_c = e^{a_c} n_c / Σ e^{a_c'} n_c',
      k_c = min(⌊R_c (S − N)⌋ + 1, n_c − q).

    Hence 1 ≤ k_c ≤ n_c − q, Σ k_c ≤ S ≤ 500 and 1 ≤ q ≤ 10. As published,
    the 100 caps a class's contribution to the budget, not k_c itself; pass
    ``max_support_per_class=100`` to clip k_c as well. Classes need at least
    2 images. Meta-Dataset's class-hierarchy sampling for ImageNet and
    Omniglot is not reproduced: classes are drawn uniformly.
    """

    def __init__(self, domain: Domain, split: str, min_way: int = 5, max_way: int = 50,
                 max_query: int = 10, max_support: int = 500, max_contribution: int = 100,
                 max_support_per_class: int | None = None):
        self.domain, self.split = domain, split
        self.min_way, self.max_way, self.max_query = min_way, max_way, max_query
        self.max_support, self.max_contribution = max_support, max_contribution
        self.max_support_per_class = max_support_per_class
        if max_support < max_way:
            raise ValueError(f"max_support ({max_support}) must be ≥ max_way ({max_way})")
        self.classes = eligible_classes(domain, split, 2, min_way, "one support + one query")
        self._counts = {c: domain.num_items(c) for c in self.classes}

    def sample(self, rng: np.random.Generator, exclude=frozenset()) -> EpisodeSpec:
        available = _available(self.domain, self.split, self.classes, exclude, self.min_way)
        n_way = int(rng.integers(self.min_way, min(self.max_way, len(available)) + 1))
        classes = rng.choice(available, size=n_way, replace=False)
        counts = np.array([self._counts[int(c)] for c in classes])
        n_query = min(self.max_query, int(counts.min()) // 2)
        remaining = counts - n_query
        beta = rng.uniform()
        budget = np.floor(beta * np.minimum(self.max_contribution, remaining) + 1).sum()
        budget = int(min(budget, self.max_support))
        weights = np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=n_way)) * counts
        shots = np.floor(weights / weights.sum() * (budget - n_way)).astype(np.int64) + 1
        shots = np.minimum(shots, remaining)
        if self.max_support_per_class is not None:
            shots = np.minimum(shots, self.max_support_per_class)
        return _spec(self.domain, rng, classes, shots.tolist(), [n_query] * n_way)


class MultiDomainSampler:
    """Picks a domain for every task (uniformly, or by ``weights``), then delegates."""

    def __init__(self, samplers: Mapping[str, object] | Sequence[object],
                 weights: Sequence[float] | None = None):
        if isinstance(samplers, Mapping):
            samplers = list(samplers.values())
        if not samplers:
            raise ValueError("MultiDomainSampler needs at least one sampler")
        self.samplers = list(samplers)
        if weights is None:
            weights = [1.0] * len(self.samplers)
        if len(weights) != len(self.samplers) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"weights must be {len(self.samplers)} non-negative numbers, got {weights}")
        self.probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)

    def sample(self, rng: np.random.Generator, exclude=frozenset()) -> EpisodeSpec:
        index = int(rng.choice(len(self.samplers), p=self.probabilities))
        return self.samplers[index].sample(rng, exclude)


def make_sampler(source, domains: str | Sequence[str], split: str, protocol: str = "fixed",
                 weights: Sequence[float] | None = None, **options):
    """One sampler over one or several domains of ``source``.

    protocol: 'fixed' (options n_way, k_shot, q_query) or 'variable'
    (Meta-Dataset; options of :class:`VariableSampler`).
    """
    kinds = {"fixed": FixedSampler, "variable": VariableSampler}
    if protocol not in kinds:
        raise ValueError(f"protocol must be one of {sorted(kinds)}, got {protocol!r}")
    names = [domains] if isinstance(domains, str) else list(domains)
    samplers = [kinds[protocol](source[name], split, **options) for name in names]
    if len(samplers) == 1 and weights is None:
        return samplers[0]
    return MultiDomainSampler(samplers, weights)
