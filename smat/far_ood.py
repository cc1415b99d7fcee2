"""``python -m smat.far_ood``: which meta-training settings hold on images unlike the training data.

The built-in study's SMAT (τ chosen on ID validation: 0.5) gains on ID and near-OOD tasks but loses 1–1.5
points on the real-image far-OOD sources (docs/results/far_ood.md). This experiment changes one setting at a
time and judges every candidate on **validation only**:

- ID validation: the run's best accuracy on the training domains' validation classes (200 tasks);
- far-OOD validation: ``relief_patches``, a real source (a colour-relief map of a coast) that no training or
  test domain uses, 300 tasks. It is never a test domain, so choosing on it leaves the test domains untouched.

The rule, fixed before any candidate was trained: among the SMAT candidates whose ID validation accuracy is at
most ``ID_TOLERANCE`` points below the base run's, the one with the highest far-OOD validation accuracy. Then
every run is tested on the study's tasks (ID, near-OOD and far-OOD test domains, the same tasks as the study),
paired against the pre-trained backbone, and the chosen candidate against PMF.

    python -m smat.far_ood [--output runs/far_ood] [--episodes N] [--device cpu] [key=value ...]

Every run starts from the built-in settings as they were before this experiment (``STARTING_POINT``: crops of
scale 0.85–1, no colour jitter), written out, so that its result does not move with the default it led to
(the built-in default now has the chosen augmentations). Runs of the same names and settings already in the
output folder (a study trained with those settings) are reused; a run there with other settings is an error,
never silently reused. It writes ``<output>/far_ood/``: ``validation.md``, ``test.md``, ``summary.json`` and
``validation.png`` (ID against far-OOD validation accuracy per candidate).
"""

from __future__ import annotations

import argparse
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .config import count_flag, device_flag  # noqa: E402
from .data import FAR_OOD_VALIDATION_DOMAINS  # noqa: E402
from .data.builtin import VALIDATION_GROUP  # noqa: E402
from .data.groups import label  # noqa: E402
from .experiments import ExperimentPlan, RunSpec, evaluate_plan, train_plan  # noqa: E402
from .experiments.claims import paired_difference  # noqa: E402
from .experiments.runner import RunResult, run_command  # noqa: E402
from .runtime.device import resolve_device  # noqa: E402
from .runtime.io import atomic_write_json, atomic_write_text, ensure_writable_dir  # noqa: E402

BASE_TAU = 0.5  # the study's SMAT chosen on ID validation (docs/results/builtin_study)
BASE = f"smat_tau{BASE_TAU:g}"
ID_TOLERANCE = 1.0  # points of ID validation accuracy a candidate may give up for far-OOD validation accuracy
EPISODES = 300

# The experiment's starting point: the built-in settings before it (gentle crops, no jitter), written out so
# that the experiment does not move with the defaults it changed. Every run starts from them.
STARTING_POINT = ("data.train_jitter=0.0", "data.train_crop_scale=[0.85,1.0]")
AUGMENTATIONS = ("data.train_jitter=0.4", "data.train_crop_scale=[0.5,1.0]")  # the paper's jitter, wider crops
# (name, what changes, overrides): one setting each, from the study's chosen run
CANDIDATES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("smat_lr3e-3", "θ_δ learning rate 3e-3 (base 1e-2)", ("train.delta_lr=3e-3",)),
    ("smat_lr1e-3", "θ_δ learning rate 1e-3", ("train.delta_lr=1e-3",)),
    ("smat_aug", "the paper's colour jitter 0.4 and wider crops (scale 0.5–1)", AUGMENTATIONS),
    ("smat_nokd", "no dense teacher (query cross-entropy only, no KD target)", ("train.teacher_steps=0",)),
    ("smat_lr1e-3_aug", "θ_δ learning rate 1e-3 and the wider augmentations", ("train.delta_lr=1e-3", *AUGMENTATIONS)),
)
PMF_AUG = "pmf_aug"  # a reference, not a candidate
REAL_SOURCES = ("digits", "photo_patches", "scan_patches")  # the far-OOD test domains of real images


def far_ood_plan(episodes: int, overrides: list[str], validation: bool) -> ExperimentPlan:
    """The references and base of the study, the candidates, and the base's half-way checkpoint (fewer steps);
    ``validation``: tested on the far-OOD validation source instead of the test domains."""
    base = RunSpec(BASE, "smat", overrides=(f"train.tau={BASE_TAU}",), tau=BASE_TAU)
    runs = [RunSpec("pretrained", "pretrained"), RunSpec("pmf", "pmf"), RunSpec("softmerge", "softmerge"), base]
    train = ExperimentPlan("base", [base], episodes, [*STARTING_POINT, *overrides]).config(base, paths=False).train
    if train.epochs > 1:  # the checkpoint validation wrote after the first epoch: fewer steps, same run
        first = max(1, train.tasks_per_epoch // train.meta_batch)
        runs.append(RunSpec(f"{BASE}_epoch1", "smat", overrides=base.overrides, tau=BASE_TAU, run=BASE,
                            checkpoint=f"step-{first:07d}"))
    runs.append(RunSpec("smat_tau0.99", "smat", overrides=("train.tau=0.99",), tau=0.99))
    runs += [RunSpec(name, "smat", overrides=(f"train.tau={BASE_TAU}", *extra), tau=BASE_TAU)
             for name, _, extra in CANDIDATES]
    # PMF under the wider augmentations too, so that SMAT − PMF compares like with like
    runs.append(RunSpec(PMF_AUG, "pmf", overrides=AUGMENTATIONS))
    shared = [*STARTING_POINT, *overrides]
    if validation:
        return ExperimentPlan("far-OOD validation", runs, episodes, shared, test_domains=FAR_OOD_VALIDATION_DOMAINS,
                              cache_tag="far_ood_val")
    return ExperimentPlan("far-OOD test", runs, episodes, shared)


def describe(name: str) -> str:
    changes = {n: what for n, what, _ in CANDIDATES}
    changes.update({BASE: "the study's chosen SMAT (base)",
                    f"{BASE}_epoch1": "the base's checkpoint after its first epoch (half the steps)",
                    "smat_tau0.99": "τ = 0.99 (sparser experts)", "pretrained": "the backbone, no meta-tuning",
                    "pmf": "PMF (dense meta-tuning)", "softmerge": "SoftMerge (dense experts, merged)",
                    PMF_AUG: "PMF with the wider augmentations (reference)"})
    return changes.get(name, name)


def choose(validation: list[RunResult]) -> tuple[RunResult, list[RunResult]]:
    """(the chosen SMAT candidate, the eligible ones) by the module's rule."""
    smat = [r for r in validation if r.spec.method == "smat"]
    base = next(r for r in smat if r.spec.name == BASE)
    eligible = [r for r in smat if 100 * r.val_accuracy >= 100 * base.val_accuracy - ID_TOLERANCE]
    return max(eligible, key=lambda r: r.average(VALIDATION_GROUP)), eligible


def cell(mean: float, half: float) -> str:
    return "—" if math.isnan(mean) else f"{mean:+.2f} ± {half:.2f}"


def validation_table(results: list[RunResult], chosen: RunResult, eligible: list[RunResult]) -> list[str]:
    pretrained = next(r for r in results if r.spec.method == "pretrained")
    base = next(r for r in results if r.spec.name == BASE)
    rows = ["| run | what changes | ID validation | far-OOD validation | − pre-trained | − base | eligible |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        val = "—" if math.isnan(r.val_accuracy) else f"{100 * r.val_accuracy:.2f}"
        mark = "**chosen**" if r is chosen else ("yes" if r in eligible else "")
        rows.append(f"| {r.spec.name} | {describe(r.spec.name)} | {val} | {r.average(VALIDATION_GROUP):.2f} | "
                    f"{cell(*paired_difference(r, pretrained, VALIDATION_GROUP))} | "
                    f"{cell(*paired_difference(r, base, VALIDATION_GROUP))} | {mark} |")
    return rows


def test_table(results: list[RunResult], chosen_name: str) -> list[str]:
    pretrained = next(r for r in results if r.spec.method == "pretrained")
    groups = ("id", "near_ood", "far_ood")
    rows = ["| run | " + " | ".join(f"{label(g)} − pre-trained" for g in groups)
            + " | real far-OOD sources − pre-trained | far-OOD − PMF (same augmentations) |",
            "|---|" + "---|" * (len(groups) + 2)]
    for r in results:
        if r is pretrained:
            continue
        name = f"**{r.spec.name}** (chosen)" if r.spec.name == chosen_name else r.spec.name
        cells = [cell(*paired_difference(r, pretrained, g)) for g in groups]
        pmf = matching_pmf(results, r)
        versus = "—" if pmf is r else cell(*paired_difference(r, pmf, "far_ood"))
        real = cell(*paired_difference(r, pretrained, "far_ood", REAL_SOURCES))
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {real} | {versus} |")
    return rows


def matching_pmf(results: list[RunResult], run: RunResult) -> RunResult:
    """The PMF run trained with the same augmentations as ``run``."""
    augmented = all(o in run.spec.overrides for o in AUGMENTATIONS)
    return next(r for r in results if r.spec.name == (PMF_AUG if augmented else "pmf"))


def plot(results: list[RunResult], chosen: RunResult, path) -> None:
    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    for r in results:
        if math.isnan(r.val_accuracy):
            continue
        axis.scatter(100 * r.val_accuracy, r.average(VALIDATION_GROUP), marker="*" if r is chosen else "o",
                     s=160 if r is chosen else 40)
        axis.annotate(r.spec.name, (100 * r.val_accuracy, r.average(VALIDATION_GROUP)), fontsize=7,
                      xytext=(4, 3), textcoords="offset points")
    axis.set_xlabel("ID validation accuracy (%)")
    axis.set_ylabel(f"far-OOD validation accuracy (%, {', '.join(FAR_OOD_VALIDATION_DOMAINS)})")
    axis.set_title("Candidates judged on validation only (★ chosen)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_far_ood(args, log=print) -> dict:
    validation_plan = far_ood_plan(args.episodes, args.overrides, validation=True)
    test_plan = far_ood_plan(args.episodes, args.overrides, validation=False)
    validation_plan.check()
    root = ensure_writable_dir(args.output)
    device = resolve_device(args.device) if args.device else None
    train_plan(validation_plan, root, log)
    validation = evaluate_plan(validation_plan, root, device)
    chosen, eligible = choose(validation)
    tested = evaluate_plan(test_plan, root, device)
    out = ensure_writable_dir(root / "far_ood")
    plot(validation, chosen, out / "validation.png")
    atomic_write_text(out / "validation.md", "\n".join([
        f"# Candidates on validation tasks ({args.episodes} far-OOD validation tasks)", "",
        f"Rule: among SMAT candidates at most {ID_TOLERANCE:g} point(s) below the base's ID validation accuracy, "
        f"the highest far-OOD validation accuracy. Chosen: **{chosen.spec.name}**.", "",
        *validation_table(validation, chosen, eligible), "", "![validation](validation.png)", ""]))
    atomic_write_text(out / "test.md", "\n".join([
        f"# Every run on the study's test tasks ({args.episodes} per domain, paired 95% intervals, points)", "",
        f"Chosen on validation: **{chosen.spec.name}** ({describe(chosen.spec.name)}).", "",
        *test_table(tested, chosen.spec.name), ""]))
    pretrained = next(r for r in tested if r.spec.method == "pretrained")
    summary = {"episodes": args.episodes, "chosen": chosen.spec.name, "rule": {"id_tolerance": ID_TOLERANCE},
               "runs": {}}
    for v, t in zip(validation, tested):
        summary["runs"][v.spec.name] = {
            "what": describe(v.spec.name), "overrides": list(v.spec.overrides), "checkpoint": v.spec.checkpoint,
            "id_validation": 100 * v.val_accuracy, "far_ood_validation": v.average(VALIDATION_GROUP),
            "eligible": v in eligible,
            "test": {g: t.average(g) for g in ("id", "near_ood", "far_ood")},
            "real_sources_minus_pretrained": paired_difference(t, pretrained, "far_ood", REAL_SOURCES),
            "test_minus_pretrained": {g: paired_difference(t, pretrained, g) for g in ("id", "near_ood", "far_ood")},
            "minus_pmf_same_augmentations": {g: paired_difference(t, matching_pmf(tested, t), g)
                                             for g in ("id", "near_ood", "far_ood")},
            "per_domain": {name: 100 * sum(d["accuracies"]) / len(d["accuracies"]) for name, d in t.domains.items()},
        }
    atomic_write_json(out / "summary.json", summary)
    log((out / "validation.md").read_text())
    log((out / "test.md").read_text())
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.far_ood", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/far_ood", help="folder of the runs and results (runs of the same "
                        "settings there are reused; default runs/far_ood)")
    parser.add_argument("--episodes", type=count_flag(2), default=EPISODES, metavar="N",
                        help=f"validation and test tasks per domain (default {EPISODES})")
    parser.add_argument("--device", type=device_flag, help="where evaluation runs (default: each run's device)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run_far_ood(args), args.output)


if __name__ == "__main__":
    sys.exit(main())
