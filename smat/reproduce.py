"""``python -m smat.reproduce``: the paper's Table 1, Table 2 and Fig. 3 at full scale, one command each.

    python -m smat.reproduce table1 --data-root /data/metadataset_h5 [--backbone-weights dino_deitsmall16.pth]
    python -m smat.reproduce table2 --data-root … [--backbone vit_base] [--preset authors_code]
    python -m smat.reproduce fig3 --dry-run [--step-seconds 1.9 | --data-root … --measure-steps 3]

Each row is a run: the backbone's config (``vit_small_dino_metadataset.yaml``, or ViT-B) plus the
row's overlay (``baselines/``, ``ablations/``) and, with ``--preset authors_code``, the
authors' recipe (``presets/``), all from the configs installed with smat (``--configs`` for
others). Rows without a finished run are trained (resumed where interrupted);
every run is evaluated on the same test tasks (``--episodes``, 600 as the paper); the table is written next
to the paper's numbers in ``<output>/<table>.md``. ``--dry-run`` prints the runs, their commands and the
GPU-hours they need, from ``--step-seconds`` or from steps measured here (``--measure-steps``, which needs
the data); it needs neither the data nor the weights otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from .config import PACKAGE_CONFIGS, ConfigError, count_flag, device_flag, positive_flag
from .evaluation.metrics import confidence_interval
from .evaluation.tables import ModeResult, results_markdown
from .experiments import ExperimentPlan, RunSpec, evaluate_plan, train_plan
from .experiments.figures import plot_tradeoff
from .experiments.plan import dry_run
from .experiments.runner import RunResult, run_command
from .runtime.device import resolve_device
from .runtime.distributed import World
from .runtime.io import atomic_write_text, ensure_writable_dir
from .training import Trainer

BACKBONES = {"vit_small": "vit_small_dino_metadataset.yaml", "vit_base": "vit_base_dino_metadataset.yaml"}
# the paper's averages (DINO ViT-S, no fine-tuning unless named), ../shared/REFERENCE.md: (ID, OOD)
PAPER = {
    "table1": {"pretrained": (71.29, 64.07), "pmf": (84.23, 64.10), "softmerge": (84.40, 64.87),
               "smat": (85.14, 67.27), "smat + full": (85.81, 75.31), "smat + lora": (85.88, 75.02)},
    "table2": {"smat": (85.14, 67.27), "no_dense_teacher": (85.07, 66.44), "no_interpolation": (84.77, 67.02),
               "no_support_query_split": (82.35, 63.64), "fixed_mlp_experts": (85.21, 66.21),
               "pmf": (84.23, 64.10)},
}
FIG3_TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
FIG3_EXPERTS = (4, 8, 16)
ASSUMED_STEP_SECONDS = 1.0  # --dry-run without --step-seconds or a measurement: hours per second of step time
DATA_ROOT_PLACEHOLDER = "<data-root>"  # --dry-run without --data-root


def configs_folder(given: str | None) -> Path:
    """``--configs``, else the configs installed with smat (works from any folder)."""
    folder = Path(given).expanduser() if given else PACKAGE_CONFIGS
    if not (folder / BACKBONES["vit_small"]).is_file():
        raise ConfigError(f"--configs {given}: no {BACKBONES['vit_small']} there; give a folder laid out as smat's "
                          f"own configs ({PACKAGE_CONFIGS}), or leave --configs out to use those")
    return folder


def plan_for(table: str, configs: Path, backbone: str, preset: str | None, episodes: int) -> ExperimentPlan:
    base = [str(configs / BACKBONES[backbone])] + ([str(configs / "presets" / f"{preset}.yaml")] if preset else [])

    def row(name: str, method: str, overlay: str | None = None, **options) -> RunSpec:
        files = base + ([str(configs / overlay)] if overlay else [])
        return RunSpec(name, method, tuple(files), **options)

    if table == "table1":
        runs = [row("pretrained", "pretrained", "baselines/pretrained.yaml"), row("pmf", "pmf", "baselines/pmf.yaml"),
                row("softmerge", "softmerge", "baselines/softmerge.yaml"),
                row("smat", "smat", modes=("protonet", "full", "lora"))]
    elif table == "table2":
        runs = [row("smat", "smat"), row("no_dense_teacher", "smat", "ablations/no_dense_teacher.yaml"),
                row("no_interpolation", "smat_independent", "ablations/no_interpolation.yaml"),
                row("no_support_query_split", "smat", "ablations/no_support_query_split.yaml"),
                row("fixed_mlp_experts", "smat", "ablations/fixed_mlp_experts.yaml"),
                row("pmf", "pmf", "baselines/pmf.yaml")]
    else:
        runs = [row(f"smat_tau{tau:g}_m{experts}", "smat", tau=tau,
                    overrides=(f"train.tau={tau}", f"model.num_experts={experts}"))
                for experts in FIG3_EXPERTS for tau in FIG3_TAUS]
        runs += [row("pretrained", "pretrained", "baselines/pretrained.yaml"), row("pmf", "pmf", "baselines/pmf.yaml")]
    return ExperimentPlan(table, runs, episodes)


def measure_step_seconds(plan: ExperimentPlan, steps: int, log=print) -> float:
    """Median seconds of ``steps`` meta-training steps of the plan's first SMAT run, on this machine."""
    spec = next((s for s in plan.runs if s.method == "smat"), plan.runs[0])
    config = plan.config(spec)
    train = config.train  # enough steps to measure, whatever the run's length
    train.tasks_per_epoch = max(train.tasks_per_epoch, (steps + 1) * train.meta_batch)
    device = resolve_device(config.device)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(config, Path(folder), device, World(), log=lambda *a, **k: None)
        batches, times = iter(trainer.batches()), []
        for index in range(steps + 1):  # the first step (allocation, autotuning) is not counted
            start = time.perf_counter()
            trainer.train_step(next(batches))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index:
                times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log(f"measured {seconds:.2f} s per meta-training step of {spec.name} on {name} ({steps} steps)")
    return seconds


def paper_table(table: str, results: list[RunResult]) -> str:
    """The role averages of every row (mean ± 95% CI over the domains' means) beside the paper's."""
    lines = ["| row | ID | OOD | paper ID | paper OOD |", "|---|---|---|---|---|"]
    paper = PAPER.get(table, {})
    for result in results:
        cells = []
        for role in ("id", "ood"):
            means = [confidence_interval(d["accuracies"]) for d in result.domains.values() if d["role"] == role]
            mean = 100 * sum(m for m, _ in means) / len(means) if means else float("nan")
            half = 100 * (sum(h * h for _, h in means) ** 0.5) / len(means) if means else float("nan")
            cells.append(f"{mean:.2f} ± {half:.2f}")
        reference = paper.get(result.label, (None, None))
        cells += [f"{value:.2f}" if value is not None else "–" for value in reference]
        lines.append(f"| {result.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reproduce(args, log=print) -> int:
    configs = configs_folder(args.configs)
    plan = plan_for(args.table, configs, args.backbone, args.preset, args.episodes)
    plan.shared_overrides += [f"data.root={args.data_root or DATA_ROOT_PLACEHOLDER}"]
    if args.backbone_weights:
        plan.shared_overrides.append(f"model.weights={args.backbone_weights}")
    plan.shared_overrides += args.overrides
    measure = args.dry_run and not args.step_seconds and args.measure_steps
    plan.check(paths=not args.dry_run or bool(measure))  # every row's config, before anything runs
    if args.dry_run:
        if args.step_seconds:
            seconds, how = args.step_seconds, "--step-seconds"
        elif measure:
            seconds, how = measure_step_seconds(plan, args.measure_steps, log), "measured here"
        else:
            seconds, how = ASSUMED_STEP_SECONDS, ("assumed, not measured: give --step-seconds S, or --data-root "
                                                  "with --measure-steps N")
        dry_run(plan, seconds, how, log=log)
        return 0
    root = ensure_writable_dir(Path(args.output) / args.table)
    train_plan(plan, root, log)
    results = evaluate_plan(plan, root, resolve_device(args.device) if args.device else None)
    rows = [ModeResult(r.label, r.spec.method, r.mode, name, d["role"], d["accuracies"], 0.0)
            for r in results for name, d in r.domains.items()]
    text = (f"# {args.table}: {args.backbone}, {plan.episodes} test tasks per domain"
            + (f", preset {args.preset}" if args.preset else "") + "\n\n" + paper_table(args.table, results)
            + "\n\n## Per domain (%, mean ± 95% CI)\n\n" + results_markdown(rows) + "\n")
    atomic_write_text(root / f"{args.table}.md", text)
    if args.table == "fig3":
        plot_tradeoff(results, root / "fig3_id_ood.png")
    log(text)
    return 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.reproduce", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("table1", "table2", "fig3"))
    parser.add_argument("--data-root", help="Meta-Dataset in PMF's .h5 layout (not needed by --dry-run)")
    parser.add_argument("--backbone-weights", help="DINO weights file (default: timm's cache)")
    parser.add_argument("--backbone", choices=tuple(BACKBONES), default="vit_small")
    parser.add_argument("--preset", choices=("authors_code",), help="the authors' code's recipe instead of the paper's")
    parser.add_argument("--configs", help="a configs folder laid out as smat's own (default: the configs "
                        "installed with smat)")
    parser.add_argument("--output", default="runs/reproduce", help="runs go to OUTPUT/<table>/<row>")
    parser.add_argument("--episodes", type=count_flag(2), default=600, help="test tasks per domain (the paper: "
                        "600)")
    parser.add_argument("--device", type=device_flag, help="where evaluation runs (default: each run config's "
                        "device)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs, their commands and GPU-hours; "
                        "train nothing; needs neither data nor weights")
    parser.add_argument("--step-seconds", type=positive_flag, help="seconds per meta-training step for "
                        "--dry-run")
    parser.add_argument("--measure-steps", type=count_flag(1), help="measure this many steps here for --dry-run "
                        "(needs --data-root)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    args = parser.parse_intermixed_args(argv)
    if not args.data_root and not (args.dry_run and not args.measure_steps):
        parser.error("--data-root is required (Meta-Dataset in PMF's .h5 layout), except by --dry-run without "
                     "--measure-steps")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(lambda: reproduce(args), args.output)


if __name__ == "__main__":
    sys.exit(main())
