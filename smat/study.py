"""``python -m smat.study``: the paper's experiment in miniature on the built-in data (Table 1 and Fig. 3).

Trains, with the same budget for every method, the pre-trained backbone, PMF, SoftMerge and SMAT at
τ ∈ {0.5, 0.7, 0.8, 0.9, 0.95, 0.99}; tests every run on the same ProtoNet tasks of every ID and OOD
domain; and writes into the output folder:

- ``table1.md`` / ``table1.csv``: accuracy per domain, mean ± 95% CI, with its group and the ID, near-OOD and
  far-OOD averages (and all OOD domains together);
- ``fig3_id_ood.png`` (+ .json): ID against near-OOD and against far-OOD accuracy across τ, PMF and the others
  as reference points;
- ``fig6/``: the Fig. 6 analyses of the SMAT run chosen on validation (masks by layer and depth, domains
  by their mean α, mask overlap);
- ``summary.md`` / ``summary.json``: the paper's claims (a)–(e), each with its numbers and a verdict; (c) and
  (d), about OOD accuracy, are judged separately on near-OOD and on far-OOD.

    python -m smat.study [--output runs/study] [--quick] [--episodes N] [--device cpu] [key=value ...]

It resumes: finished runs are skipped, interrupted ones continue from their checkpoints, evaluations are
cached. ``--quick`` trains SMAT at τ ∈ {0.5, 0.9, 0.99} only, every run on a quarter of the tasks (the
sparsity constraint and the temperature schedule sped up to fit: :func:`quick_overrides`), and tests on 50
tasks per domain: a check of the pipeline in minutes, not the study's verdicts.
``key=value`` overrides apply to every run (e.g. ``train.epochs=1``).
"""

from __future__ import annotations

import argparse
import json
import sys

from .analysis import analyse_run, open_run
from .config import count_flag, device_flag, load_config, positive_flag, validate
from .data.groups import NOTE as GROUPS_NOTE
from .data.groups import label
from .evaluation.tables import ModeResult, results_csv, results_markdown
from .experiments import ExperimentPlan, RunSpec, evaluate_plan, train_plan
from .experiments.claims import by_method, chosen_smat, judge_claims, ood_groups, paired_difference
from .experiments.figures import plot_tradeoff
from .experiments.plan import dry_run
from .experiments.runner import run_command
from .runtime.device import resolve_device
from .runtime.io import atomic_write_json, atomic_write_text, ensure_writable_dir

TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
QUICK_TAUS = (0.5, 0.9, 0.99)  # the ends and the default: enough for a trend, in the quick budget
EPISODES, QUICK_EPISODES = 300, 50
QUICK_SHARE = 4  # --quick trains on 1/QUICK_SHARE of the tasks
BUILTIN_STEP_SECONDS = 1.7  # a SMAT step of the built-in default on a 2-core AVX2 CPU (PMF's: 0.36 s)


def quick_overrides(overrides: list[str]) -> list[str]:
    """A quarter of the training tasks, with the sparsity constraint and the temperature schedule sped up to fit.

    λ grows by ``lambda_lr`` × the sparsity deficit per step and the mask logits move with λ, so the time the
    masks take to reach τ scales like 1/√lambda_lr: a quarter of the steps needs 16× the rate. Measured on
    the built-in default (60 steps): at 4× the rate τ = 0.99 experts were at sparsity 0.63 at step 50; at 16×
    they reach 0.991 by step 40, but τ = 0.5 experts overshoot to 0.57–0.62 (λ is already at 0 when they
    cross τ, and the masks do not return; in a whole quick study τ = 0.9 ones ended at 0.92–0.94), so
    ``--quick``'s claim (a) can fail where the full budget's holds.
    """
    train = validate(load_config(None, overrides)).train
    return [f"train.tasks_per_epoch={max(train.meta_batch, train.tasks_per_epoch // QUICK_SHARE)}",
            f"train.lambda_lr={train.lambda_lr * QUICK_SHARE ** 2:g}",
            f"train.temperature.tasks_per_unit={train.temperature.tasks_per_unit / QUICK_SHARE:g}"]


def study_plan(quick: bool, episodes: int | None, overrides: list[str]) -> ExperimentPlan:
    """The study's runs; every run has the built-in default's budget (a quarter of it with ``quick``)."""
    runs = [RunSpec("pretrained", "pretrained"), RunSpec("pmf", "pmf"), RunSpec("softmerge", "softmerge")]
    runs += [RunSpec(f"smat_tau{tau:g}", "smat", overrides=(f"train.tau={tau}",), tau=tau)
             for tau in (QUICK_TAUS if quick else TAUS)]
    # quick's values are derived from the user's (a user's train.lambda_lr=… is sped up too), so they go after them
    shared = overrides + (quick_overrides(overrides) if quick else [])
    return ExperimentPlan("study", runs, episodes or (QUICK_EPISODES if quick else EPISODES), shared)


def table(results) -> list[ModeResult]:
    return [ModeResult(r.spec.name, r.spec.method, "protonet", name, domain["role"], domain["accuracies"], 0.0,
                       group=domain.get("group", ""))
            for r in results for name, domain in r.domains.items()]


def average_groups(results) -> list[str]:
    """ID, each OOD group, and all OOD domains together when there is more than one OOD group."""
    groups = ood_groups(results)
    return ["id", *groups, *(["ood"] if len(groups) > 1 else [])]


def group_title(key: str, keys: list[str]) -> str:
    return "all OOD" if key == "ood" and len(keys) > 2 else label(key)


def paired_table(results) -> list[str]:
    """Every run against the pre-trained backbone, and the chosen SMAT run against each other meta-tuned one."""
    pretrained, chosen = by_method(results, "pretrained")[0], chosen_smat(results)
    pairs = [(run, pretrained) for run in results if run is not pretrained]
    pairs += [(chosen, run) for run in results if run.spec.method not in ("pretrained", "smat")]
    keys = average_groups(results)
    rows = ["| pair | " + " | ".join(f"{group_title(k, keys)} average" for k in keys) + " |",
            "|---|" + "---|" * len(keys)]
    for a, b in pairs:
        cells = ["{:+.2f} ± {:.2f}".format(*paired_difference(a, b, key)) for key in keys]
        rows.append(f"| {a.spec.name} − {b.spec.name} | " + " | ".join(cells) + " |")
    return rows


def summary_markdown(plan: ExperimentPlan, results, claims) -> str:
    chosen = chosen_smat(results)
    lines = [f"# The built-in study: {len(results)} runs, {plan.episodes} test tasks per domain", "",
             "Every run is tested on the same tasks; differences are paired, with 95% intervals. SMAT's τ is "
             f"chosen on validation tasks of the training domains: {chosen.spec.name} (validation accuracy "
             f"{100 * chosen.val_accuracy:.2f}%).", "",
             "| claim | verdict |", "|---|---|"]
    lines += [f"| ({c.key}) {c.statement} | **{c.verdict}** |" for c in claims]
    if any(c.group in ("near_ood", "far_ood") for c in claims):
        lines += ["", GROUPS_NOTE]
    for claim in claims:
        lines += ["", f"## ({claim.key}) {claim.statement}: {claim.verdict}", ""]
        lines += [f"- {line}" for line in claim.evidence]
    lines += ["", "## Paired differences (points, 95% interval)", "", *paired_table(results), "",
              "## Accuracy (ProtoNet, %, mean ± 95% CI)", "", results_markdown(table(results)), "",
              "![Fig. 3](fig3_id_ood.png)", ""]
    return "\n".join(lines)


def run_study(args, log=print) -> dict | None:
    plan = study_plan(args.quick, args.episodes, args.overrides)
    plan.check()  # every run's config, before anything is written
    if args.dry_run:
        how = "--step-seconds" if args.step_seconds else "a SMAT step of the built-in default on 2 CPU cores"
        dry_run(plan, args.step_seconds or BUILTIN_STEP_SECONDS, how, unit="hours", log=log)
        return None
    root = ensure_writable_dir(args.output)
    device = resolve_device(args.device) if args.device else None
    train_plan(plan, root, log)
    results = evaluate_plan(plan, root, device)
    rows = table(results)
    atomic_write_text(root / "table1.md", results_markdown(rows) + "\n")
    atomic_write_text(root / "table1.csv", results_csv(rows))
    plot_tradeoff(results, root / "fig3_id_ood.png")
    chosen = chosen_smat(results)
    written, notes = analyse_run(open_run(chosen.path), ensure_writable_dir(root / "fig6"), min(plan.episodes, 50),
                                 device)
    claims = judge_claims(results)
    atomic_write_text(root / "summary.md", summary_markdown(plan, results, claims))
    atomic_write_json(root / "summary.json", {
        "episodes": plan.episodes, "chosen_smat": chosen.spec.name,
        "runs": {r.spec.name: {"method": r.spec.method, "tau": r.spec.tau, "id": r.average("id"),
                               "ood": r.average("ood"),
                               **{g: r.average(g) for g in ood_groups(results) if g != "ood"},
                               "val_accuracy": r.val_accuracy} for r in results},
        "claims": [{"key": c.key, "group": c.group, "statement": c.statement, "verdict": c.verdict,
                    "evidence": c.evidence, "numbers": c.numbers} for c in claims]})
    for note in notes:
        log(f"note: {note}")
    log((root / "summary.md").read_text().split("\n## (a)")[0])
    log(f"written: {root / 'summary.md'}, table1.md, fig3_id_ood.png, fig6/ ({len(written)} figures)")
    return json.loads((root / "summary.json").read_text())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="runs/study", help="folder of the runs and results (default runs/study)")
    parser.add_argument("--quick", action="store_true", help="SMAT at 3 τ, a quarter of the training tasks, 50 test "
                        "tasks per domain (a pipeline check in minutes)")
    parser.add_argument("--episodes", type=count_flag(2), metavar="N", help="test tasks per domain (default 300; "
                        "50 quick)")
    parser.add_argument("--device", type=device_flag, help="where evaluation runs (default: each run config's "
                        "device)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs, their commands and hours; train "
                        "nothing")
    parser.add_argument("--step-seconds", type=positive_flag, help=f"seconds per meta-training step for --dry-run "
                        f"(default {BUILTIN_STEP_SECONDS})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run_study(args), args.output)


if __name__ == "__main__":
    sys.exit(main())
