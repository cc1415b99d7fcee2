"""Meta-testing: accuracy per task on test episodes, mean ± 95% confidence interval, and the
``python -m smat.evaluate`` command.

ProtoNet (no adaptation): each task's weights are merged from the
hypernetwork's evaluation-time α (sigmoid(logits / T)) and the deterministic
masks; class prototypes are the support features' means; queries are
classified by cosine similarity. The B tasks of a batch are merged in one
kernel call. The other modes (Algorithm 2's expert selection, Algorithm 3's
full fine-tuning, LoRA) live in :mod:`smat.adapt`.

    python -m smat.evaluate --checkpoint RUN [RUN ...] [--datasets D ...]
        [--mode protonet|select|full|lora ...] [--episodes N] [--folder DIR ...] [--output DIR] [key=value ...]

``key=value`` overrides the runs' configs (``data.n_way=5``, ``device=cpu``)
or the adaptation options (``adapt.steps=50``, ``adapt.lr_grid=[0,1e-4]``,
see :class:`smat.adapt.AdaptConfig`). For full fine-tuning and LoRA the
learning rate is chosen per domain from ``adapt.lr_grid`` by mean query
accuracy on the first ``adapt.lr_tasks`` tasks of the domain's val split;
a domain without a val split (every OOD domain) uses its first test tasks,
which are then also among the tasks it is tested on (``lr_split`` in
results.json says which). Writes results.md/csv (Table 1), cost.md/csv
(Table 5) and results.json (every task's accuracy) into ``--output``.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from .adapt import MODES, AdaptConfig, validate_adapt
from .config import ConfigError, Once, count_flag, merge_values, parse_override, parsed_once
from .data import DataError
from .evaluation import tables
from .evaluation.modes import Plan, evaluate_mode, plan_run
from .evaluation.runs import load_run
from .runtime import checkpoint
from .runtime.io import OutputError, atomic_write_json, check_output_folder, ensure_writable_dir

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
OUTPUTS = ("results.md", "results.csv", "cost.md", "cost.csv", "results.json")  # an earlier evaluation's, replaced


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smat.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True, metavar="RUN",
                        help="run folders written by `python -m smat.train` (their best checkpoint is used)")
    parser.add_argument("--datasets", nargs="+", action="extend", metavar="DOMAIN", help="test domains (default: "
                        "the runs' data.test_domains, else every ID and OOD domain of the source)")
    # no argparse choices: they would be checked before the overrides that follow the modes are set apart
    parser.add_argument("--mode", nargs="+", action="extend", metavar="{" + ",".join(MODES) + "}",
                        help="protonet: no adaptation; select: Algorithm 2; full: Algorithm 3; lora: LoRA (default "
                        "protonet)")
    parser.add_argument("--episodes", action=Once, type=count_flag(1), metavar="N", help="test episodes per domain "
                        "(evaluate.episodes)")
    parser.add_argument("--folder", nargs="+", action="extend", metavar="DIR", help="image folders added to the "
                        "test domains as OOD, every class tested: <DIR>/<domain>/<class>/<image>, or "
                        "<DIR>/<class>/<image> (one domain)")
    parser.add_argument("--output", action=Once, metavar="DIR", help="where the tables go (default: <first "
                        "run>/evaluation); never a run or export folder")
    parser.add_argument("--overwrite", action="store_true", help="write into an --output folder that holds other "
                        "files than an earlier evaluation's")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides (data.n_way=5, device=cpu) and adaptation options (adapt.steps=50)")
    args = parsed_once(parser.parse_intermixed_args(argv))
    # `--checkpoint RUN key=value`, `--mode full lora adapt.steps=20`: nargs="+" swallows the overrides that
    # follow a list option
    mode_given = args.mode is not None
    for name in ("checkpoint", "datasets", "mode", "folder"):
        values = getattr(args, name) or []
        args.overrides = [v for v in values if OVERRIDE.match(v) and not Path(v).exists()] + args.overrides
        setattr(args, name, [v for v in values if not (OVERRIDE.match(v) and not Path(v).exists())] or None)
    if not args.checkpoint:
        parser.error("--checkpoint needs at least one run folder")
    if args.mode is None and not mode_given:
        args.mode = ["protonet"]
    if not args.mode:
        parser.error(f"--mode needs at least one of {', '.join(MODES)}")
    unknown = [mode for mode in args.mode if mode not in MODES]
    if unknown:
        parser.error(f"--mode: invalid choice: {', '.join(map(repr, unknown))} (choose from {', '.join(MODES)})")
    return args


def split_overrides(overrides) -> tuple[list[str], AdaptConfig]:
    """Config overrides for the runs, and the adaptation options built from the ``adapt.*`` ones."""
    options = AdaptConfig()
    rest = []
    for text in overrides:
        if text.startswith("adapt."):
            merge_values(options, parse_override(text.removeprefix("adapt.")), "adapt.")
        else:
            rest.append(text)
    return rest, validate_adapt(options)


def load_plans(args, overrides, options: AdaptConfig, log=print) -> list[Plan]:
    extra = list(overrides)
    if args.datasets:
        extra.append(f"data.test_domains={args.datasets!r}")
    if args.episodes:
        extra.append(f"evaluate.episodes={args.episodes}")
    if args.folder:
        extra.append(f"data.test_folders={[str(Path(f).expanduser().resolve()) for f in args.folder]!r}")
    plans = []
    for path in args.checkpoint:
        run = load_run(path, None, extra)
        log(f"{run.path}: method {run.method}, step {run.state.get('step')} (best checkpoint), on {run.device}")
        plans.append(plan_run(run, args.mode, options))
    return plans


def evaluate_plans(plans: list[Plan], modes, options: AdaptConfig):
    results, costs = [], []
    total = sum(plan.tasks(modes, options) for plan in plans)
    with tqdm(total=total, desc="evaluate", unit="task", dynamic_ncols=True) as progress:
        for plan in plans:
            for mode in modes:
                mode_results, cost = evaluate_mode(plan, mode, options, progress)
                results += mode_results
                costs.append(cost)
    return results, costs


def write_outputs(folder: Path, plans: list[Plan], results, costs, options: AdaptConfig) -> dict:
    paths = tables.write_tables(results, costs, folder)
    record = {"runs": {plan.run.name: {"path": str(plan.run.path), "method": plan.run.method,
                                       "checkpoint": plan.run.state, "config": plan.run.config.to_dict()}
                       for plan in plans},
              "adapt": asdict(options),
              "results": [{**asdict(r), "lr_scores": {str(k): v for k, v in r.lr_scores.items()}} for r in results],
              "costs": [{**asdict(c), "seconds_per_task": c.seconds_per_task} for c in costs]}
    paths["results.json"] = folder / "results.json"
    atomic_write_json(paths["results.json"], record)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        overrides, options = split_overrides(args.overrides)
        output = check_output_folder(args.output or Path(args.checkpoint[0]).expanduser() / "evaluation",
                                     OUTPUTS, args.overwrite)
        plans = load_plans(args, overrides, options)
        folder = ensure_writable_dir(output)
        results, costs = evaluate_plans(plans, args.mode, options)
        paths = write_outputs(folder, plans, results, costs, options)
    except (ConfigError, DataError, OutputError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(tables.results_markdown(results))
    print(tables.cost_markdown(costs, results))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
