"""The paper's claims, tested on an evaluated plan: each claim gets its numbers and a verdict.

Differences between two runs are paired: every run is tested on the same tasks, so the difference of a
group's average accuracy is the mean over its domains of the per-task differences, with a 95% interval
from their spread (domains weighted equally, as in the averages).

Claims (c) and (d) are about OOD accuracy: they are judged once per OOD group the test domains declare
(near-OOD and far-OOD on the built-in data, :mod:`smat.data.groups`), or once on all OOD domains where
the source declares no groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from ..data.groups import in_group, label, record_group
from ..evaluation.metrics import SPARSITY_TOLERANCE
from .runner import RunResult

HOLDS, NOT_SEPARATED, FAILS = "holds", "not separated", "does not hold"


@dataclass
class Claim:
    key: str  # (a) … (e)
    statement: str
    verdict: str  # HOLDS, NOT_SEPARATED or FAILS
    evidence: list[str] = field(default_factory=list)  # one line per number that decides it
    numbers: dict = field(default_factory=dict)
    group: str = ""  # the OOD group a claim is judged on ('near_ood', 'far_ood', 'ood'); '' for the others


def paired_difference(a: RunResult, b: RunResult, group: str, domains=None) -> tuple[float, float]:
    """(mean, 95% half-width) in points of a's minus b's average accuracy over the domains of ``group``
    ('id', 'near_ood', 'far_ood'; 'ood': every test-only domain), or over the named ``domains``."""
    means, variances = [], []
    for name, domain in a.domains.items():
        if (name not in domains) if domains is not None else not in_group(record_group(domain), group):
            continue
        diff = 100 * (np.asarray(domain["accuracies"]) - np.asarray(b.domains[name]["accuracies"]))
        means.append(diff.mean())
        variances.append(diff.var(ddof=1) / diff.size if diff.size > 1 else 0.0)
    if not means:
        return float("nan"), float("nan")
    return float(np.mean(means)), float(1.96 * math.sqrt(sum(variances)) / len(means))


def verdict_of(low: float, high: float) -> str:
    """HOLDS when the interval is above 0, FAILS when below, NOT_SEPARATED when it contains 0."""
    return HOLDS if low > 0 else FAILS if high < 0 else NOT_SEPARATED


def describe(name: str, mean: float, half: float) -> str:
    return f"{name}: {mean:+.2f} ± {half:.2f} points"


def by_method(results: list[RunResult], method: str) -> list[RunResult]:
    return [r for r in results if r.spec.method == method]


def chosen_smat(results: list[RunResult]) -> RunResult:
    """The SMAT run with the best validation accuracy: τ chosen without looking at test tasks."""
    return max(by_method(results, "smat"), key=lambda r: r.val_accuracy)


def sparsity_claim(results: list[RunResult]) -> Claim:
    evidence, worst = [], 0.0
    for run in by_method(results, "smat"):
        deviation = max(abs(s - run.spec.tau) for s in run.sparsity)
        worst = max(worst, deviation)
        evidence.append(f"{run.spec.name} (τ = {run.spec.tau:g}): experts at "
                        f"{min(run.sparsity):.3f}–{max(run.sparsity):.3f}, largest deviation {deviation:.3f}")
    return Claim("a", f"each expert's sparsity meets τ within {SPARSITY_TOLERANCE}",
                 HOLDS if worst <= SPARSITY_TOLERANCE else FAILS, evidence, {"largest_deviation": worst})


def meta_tuning_claim(results: list[RunResult]) -> Claim:
    pretrained, smat = by_method(results, "pretrained")[0], chosen_smat(results)
    evidence, verdicts, numbers = [], [], {}
    for run in [*by_method(results, "pmf"), smat]:
        mean, half = paired_difference(run, pretrained, "id")
        verdicts.append(verdict_of(mean - half, mean + half))
        numbers[run.spec.name] = {"difference": mean, "ci95": half}
        evidence.append(describe(f"ID average, {run.spec.name} − pretrained", mean, half))
    verdict = HOLDS if all(v == HOLDS for v in verdicts) else FAILS if FAILS in verdicts else NOT_SEPARATED
    return Claim("b", "meta-tuning raises ID accuracy (PMF and SMAT against the pre-trained backbone)", verdict,
                 evidence, numbers)


def ood_groups(results: list[RunResult]) -> list[str]:
    """The OOD groups claims (c) and (d) are judged on: near-OOD and far-OOD where declared, else OOD."""
    present = {record_group(d) for run in results for d in run.domains.values()}
    return [g for g in ("near_ood", "far_ood") if g in present] or ["ood"]


def ood_claim(results: list[RunResult], group: str = "ood") -> Claim:
    pmf, smat = by_method(results, "pmf")[0], chosen_smat(results)
    evidence, numbers = [], {}
    for run in by_method(results, "smat"):
        mean, half = paired_difference(run, pmf, group)
        numbers[run.spec.name] = {"difference": mean, "ci95": half}
        chosen = " (chosen on validation)" if run is smat else ""
        evidence.append(describe(f"{label(group)} average, {run.spec.name}{chosen} − PMF", mean, half))
    pretrained = by_method(results, "pretrained")
    if pretrained:  # the backbone both started from, for reference
        for run in (pmf, smat):
            mean, half = paired_difference(run, pretrained[0], group)
            evidence.append(describe(f"{label(group)} average, {run.spec.name} − pretrained (reference)", mean, half))
    mean, half = numbers[smat.spec.name]["difference"], numbers[smat.spec.name]["ci95"]
    # "≥": holds unless SMAT is below PMF beyond the interval; above it beyond the interval is the paper's win
    verdict = FAILS if mean + half < 0 else HOLDS if mean - half > 0 else NOT_SEPARATED
    return Claim("c", f"SMAT's {label(group)} accuracy is at least PMF's", verdict, evidence, numbers, group)


def tradeoff_claim(results: list[RunResult], group: str = "ood") -> Claim:
    runs = sorted(by_method(results, "smat"), key=lambda r: r.spec.tau)
    taus = [r.spec.tau for r in runs]
    name = label(group)
    averages = {key: [r.average(key) for r in runs] for key in ("id", group)}
    # undefined (NaN) for fewer than 3 runs or accuracies that do not vary
    correlation = {key: float(spearmanr(taus, values).statistic) if len(runs) > 2 and np.ptp(values) > 0
                   else float("nan") for key, values in averages.items()}
    evidence = [f"τ = {tau:g}: ID {i:.2f}, {name} {o:.2f}" for tau, i, o in zip(taus, averages["id"], averages[group])]
    pretrained = by_method(results, "pretrained")
    if pretrained:  # where the backbone is above the meta-tuned runs, higher τ should move towards it
        evidence.append(f"pretrained: ID {pretrained[0].average('id'):.2f}, {name} {pretrained[0].average(group):.2f}")
    evidence.append(f"Spearman ρ(τ, ID) = {correlation['id']:+.2f}, ρ(τ, {name}) = {correlation[group]:+.2f} "
                    f"(the paper: ID falls and OOD rises as τ grows)")
    # decided on the paired change from the lowest to the highest τ: ρ alone calls a 0.1-point drift a trend
    change = {key: paired_difference(runs[-1], runs[0], key) if len(runs) > 1 else (float("nan"),) * 2
              for key in ("id", group)}
    for key, (mean, half) in change.items():
        evidence.append(describe(f"{label(key)} average, {runs[-1].spec.name} − {runs[0].spec.name}"
                                 if len(runs) > 1 else f"{label(key)} change", mean, half))
    trend = {key: 1 if mean - half > 0 else -1 if mean + half < 0 else 0 for key, (mean, half) in change.items()}
    verdict = (HOLDS if trend["id"] < 0 < trend[group] else FAILS if trend["id"] > 0 or trend[group] < 0
               else NOT_SEPARATED)
    return Claim("d", f"an ID–{name} trade-off across τ: higher sparsity, lower ID and higher {name} accuracy",
                 verdict, evidence, {"taus": taus, **{f"{key}_average": v for key, v in averages.items()},
                                     "spearman": correlation,
                                     "change": {key: {"difference": m, "ci95": h} for key, (m, h) in change.items()}},
                 group)


def random_overlap(density: np.ndarray) -> np.ndarray:
    """Expected IoU of independent random masks with these densities: d_i·d_j / (d_i + d_j − d_i·d_j)."""
    both = np.outer(density, density)
    return both / (density[:, None] + density[None, :] - both)


def domain_separation(alpha: dict, permutations: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(η², p): the share of the variance of the tasks' α explained by their domain, and the fraction of
    random relabellings of the tasks' domains that explain as much."""
    rows = np.concatenate([np.asarray(v, dtype=np.float64) for v in alpha.values()])
    labels = np.concatenate([np.full(len(v), i) for i, v in enumerate(alpha.values())])
    total = ((rows - rows.mean(0)) ** 2).sum()

    def explained(groups: np.ndarray) -> float:
        between = sum(((rows[groups == g].mean(0) - rows.mean(0)) ** 2).sum() * (groups == g).sum()
                      for g in np.unique(groups))
        return float(between / total) if total > 0 else 0.0

    observed = explained(labels)
    generator = np.random.default_rng(seed)
    exceed = sum(explained(generator.permutation(labels)) >= observed for _ in range(permutations))
    return observed, (exceed + 1) / (permutations + 1)


def specialisation_claim(results: list[RunResult]) -> Claim:
    smat = chosen_smat(results)
    iou = np.asarray(smat.overlap)
    pairs = ~np.eye(len(iou), dtype=bool)
    density = 1 - np.asarray(smat.sparsity)
    chance = random_overlap(density)
    observed, expected = float(iou[pairs].mean()), float(chance[pairs].mean())
    eta, p_value = domain_separation(smat.alpha)
    evidence = [f"{smat.spec.name}: mean mask IoU between experts {observed:.3f} against {expected:.3f} for "
                f"independent random masks of the same densities (identical masks: 1)",
                f"domains explain η² = {eta:.3f} of the variance of the tasks' α; permutation p = {p_value:.3f} "
                f"({len(smat.alpha)} test domains)"]
    distinct, separated = observed < 0.5, p_value < 0.05
    verdict = HOLDS if distinct and separated else FAILS if not distinct and not separated else NOT_SEPARATED
    return Claim("e", "experts specialise: distinct masks, and merging weights α that separate the domains",
                 verdict, evidence, {"mask_iou": observed, "random_iou": expected, "alpha_eta2": eta,
                                     "alpha_p": p_value})


CLAIMS = (sparsity_claim, meta_tuning_claim, ood_claim, tradeoff_claim, specialisation_claim)
PER_OOD_GROUP = (ood_claim, tradeoff_claim)


def judge_claims(results: list[RunResult]) -> list[Claim]:
    """(a)–(e) in order; (c) and (d) once per OOD group (:func:`ood_groups`)."""
    groups = ood_groups(results)
    return [judged for claim in CLAIMS
            for judged in ([claim(results, g) for g in groups] if claim in PER_OOD_GROUP else [claim(results)])]
