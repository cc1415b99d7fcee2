"""python -m smat.study: the claims' statistics on made-up results, and the command end to end on a tiny budget."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from smat.config import load_config
from smat.experiments import ExperimentPlan, RunResult, RunSpec
from smat.experiments.claims import (
    FAILS,
    HOLDS,
    NOT_SEPARATED,
    domain_separation,
    judge_claims,
    paired_difference,
    random_overlap,
    tradeoff_claim,
)
from smat.model.backbone import create_builtin
from smat.study import QUICK_SHARE, QUICK_TAUS, TAUS, study_plan

VERDICTS = (HOLDS, NOT_SEPARATED, FAILS)


def result(name, method, id_accuracies, ood_accuracies, tau=None, val=0.5, sparsity=None, overlap=None, alpha=None):
    domains = {"id_domain": {"role": "id", "accuracies": list(id_accuracies)},
               "ood_domain": {"role": "ood", "accuracies": list(ood_accuracies)}}
    return RunResult(RunSpec(name, method, tau=tau), Path(name), domains, val, sparsity, overlap, alpha)


def test_paired_difference_uses_the_per_task_differences():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.8, 200)
    better = result("b", "pmf", base + 0.05, base)
    worse = result("w", "pretrained", base, base)
    mean, half = paired_difference(better, worse, "id")
    # every task is 5 points better: the paired interval is 0, although the tasks' accuracies spread widely
    assert mean == pytest.approx(5.0) and half == pytest.approx(0.0, abs=1e-9)
    assert paired_difference(better, worse, "ood") == (pytest.approx(0.0), pytest.approx(0.0))


def test_random_overlap_of_independent_masks():
    density = np.array([0.1, 0.1, 0.5])
    chance = random_overlap(density)
    assert chance[0, 1] == pytest.approx(0.01 / 0.19) and chance[2, 2] == pytest.approx(1 / 3)
    # measured on random masks: the formula is what independent masks give
    rng = np.random.default_rng(1)
    a, b = rng.random(200_000) < 0.1, rng.random(200_000) < 0.5
    assert (a & b).sum() / (a | b).sum() == pytest.approx(random_overlap(np.array([0.1, 0.5]))[0, 1], rel=0.03)


def test_domain_separation_finds_domains_only_where_they_differ():
    rng = np.random.default_rng(2)
    separated = {"a": rng.normal(0.0, 0.1, (40, 4)).tolist(), "b": rng.normal(1.0, 0.1, (40, 4)).tolist()}
    mixed = {"a": rng.normal(0.0, 0.1, (40, 4)).tolist(), "b": rng.normal(0.0, 0.1, (40, 4)).tolist()}
    eta, p = domain_separation(separated, permutations=200)
    assert eta > 0.9 and p < 0.01
    eta, p = domain_separation(mixed, permutations=200)
    assert eta < 0.1 and p > 0.01


def made_up_study(smat_gain: float):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.3, 0.7, 100)
    alpha = {"id_domain": rng.normal(0, 1, (100, 2)).tolist(), "ood_domain": rng.normal(2, 1, (100, 2)).tolist()}
    runs = [result("pretrained", "pretrained", base, base), result("pmf", "pmf", base + 0.1, base - 0.02),
            result("softmerge", "softmerge", base + 0.05, base)]
    for i, tau in enumerate(TAUS):
        runs.append(result(f"smat_tau{tau:g}", "smat", base + smat_gain - 0.01 * i, base + 0.01 * i, tau=tau,
                           val=0.6 - 0.01 * i, sparsity=[tau, tau + 0.01], overlap=[[1, 0.02], [0.02, 1]],
                           alpha=alpha))
    return runs


def test_claims_on_made_up_results():
    claims = {c.key: c for c in judge_claims(made_up_study(smat_gain=0.08))}
    assert list(claims) == ["a", "b", "c", "d", "e"]
    assert all(c.verdict in VERDICTS and c.evidence for c in claims.values())
    assert claims["a"].verdict == HOLDS  # every expert within 0.01 of τ
    assert claims["b"].verdict == HOLDS  # PMF +10, SMAT (τ = 0.5, best on validation) +8 on ID
    assert claims["c"].verdict == HOLDS  # SMAT's OOD = base, PMF's base − 2
    assert claims["d"].verdict == HOLDS  # ID falls, OOD rises with τ
    assert claims["e"].verdict == HOLDS  # IoU 0.02, α separated by domain
    assert judge_claims(made_up_study(smat_gain=-0.05))[1].verdict == FAILS


def tradeoff_study(id_slope: float, ood_slope: float, noise: float = 0.0):
    """SMAT runs across τ whose ID and OOD accuracies move by the given slopes per τ step, plus per-task noise."""
    rng = np.random.default_rng(4)
    base = rng.uniform(0.3, 0.7, 300)
    return [result(f"smat_tau{tau:g}", "smat", base + id_slope * i + rng.normal(0, noise, base.size),
                   base + ood_slope * i + rng.normal(0, noise, base.size), tau=tau) for i, tau in enumerate(TAUS)]


def test_tradeoff_is_judged_on_the_paired_change_across_tau():
    assert tradeoff_claim(tradeoff_study(-0.01, 0.01)).verdict == HOLDS
    # both fall with τ (what the built-in study measured): the OOD half of the paper's trade-off fails
    falling = tradeoff_claim(tradeoff_study(-0.01, -0.01))
    assert falling.verdict == FAILS and falling.numbers["change"]["ood"]["difference"] == pytest.approx(-5.0)
    # a drift far inside the per-task noise is not separated
    drift = tradeoff_claim(tradeoff_study(-0.0002, 0.0002, noise=0.2))
    assert drift.verdict == NOT_SEPARATED and drift.numbers["change"]["id"]["ci95"] > 0.1
    assert tradeoff_claim(tradeoff_study(-0.01, 0.01)[:1]).verdict == NOT_SEPARATED  # one τ: no trade-off to see


def test_the_plan_gives_every_method_the_same_budget():
    plan = study_plan(quick=False, episodes=None, overrides=["train.epochs=1"])
    assert [r.name for r in plan.runs][:3] == ["pretrained", "pmf", "softmerge"]
    assert sorted(r.tau for r in plan.runs if r.method == "smat") == sorted(TAUS)
    assert plan.episodes == 300 and plan.shared_overrides == ["train.epochs=1"]
    quick = study_plan(quick=True, episodes=None, overrides=["train.epochs=1", "train.lambda_lr=0.01"])
    assert sorted(r.tau for r in quick.runs if r.method == "smat") == sorted(QUICK_TAUS) and quick.episodes == 50
    train, default = quick.config(quick.runs[-1]).train, load_config(None, []).train
    assert train.epochs == 1 and train.tasks_per_epoch == default.tasks_per_epoch // QUICK_SHARE
    # a quarter of the steps: the user's λ rate sped up 16×, the temperature schedule 4×
    assert train.lambda_lr == pytest.approx(0.01 * QUICK_SHARE ** 2)
    assert train.temperature.tasks_per_unit == pytest.approx(default.temperature.tasks_per_unit / QUICK_SHARE)
    for run in plan.runs:  # the shared overrides, then the run's own (a shared train.tau cannot undo the sweep)
        assert plan.arguments(run) == [f"method={run.method}", *plan.shared_overrides, *run.overrides]
    assert plan.config(plan.runs[-1]).train.tau == TAUS[-1]
    with pytest.raises(ValueError, match="more than once"):
        ExperimentPlan("x", [RunSpec("a", "smat"), RunSpec("a", "pmf")], 2)


TINY = ["train.epochs=1", "train.tasks_per_epoch=4", "train.val_episodes=2", "data.test_domains=[latin,digits]",
        "model.builtin.embed_dim=32", "model.builtin.depth=1", "model.builtin.num_heads=2", "model.num_experts=2",
        "train.alignment_every=0"]


def test_quick_study_end_to_end_and_resume(tmp_path):
    # a random tiny backbone from a file: the runs skip the built-in pre-training, which is tested elsewhere
    config = load_config(None, TINY)
    weights = tmp_path / "tiny_backbone.safetensors"
    save_file(create_builtin(config.model.builtin, config.model.image_size).state_dict(), str(weights))
    output = tmp_path / "study"
    command = [sys.executable, "-m", "smat.study", "--quick", "--episodes", "3", "--output", str(output),
               "--device", "cpu", *TINY, f"model.weights={weights}"]
    # run outside the source tree so that the subprocess imports the installed package, like the tests
    first = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("table1.md", "table1.csv", "fig3_id_ood.png", "fig3_id_ood.json", "summary.md", "summary.json",
                 "fig6/mask_overlap.png", "fig6/domain_alpha.png"):
        assert (output / name).is_file(), name
    summary = json.loads((output / "summary.json").read_text())
    assert [c["key"] for c in summary["claims"]] == ["a", "b", "c", "d", "e"]
    assert all(c["verdict"] in VERDICTS for c in summary["claims"])
    text = (output / "summary.md").read_text()
    assert all(f"({key})" in text for key in "abcde")
    assert "| pmf − pretrained |" in text and "| softmerge − pretrained |" in text
    assert len(summary["runs"]) == 3 + len(QUICK_TAUS)
    second = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{3 + len(QUICK_TAUS)} of {3 + len(QUICK_TAUS)} runs already trained" in second.stdout
