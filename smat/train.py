"""``python -m smat.train``: meta-train a run (Algorithm 1, or a baseline), then evaluate it and write its report.

With no argument, the command runs the built-in default end to end:
pre-train the small built-in ViT (once, cached), meta-tune it with SMAT on
the built-in ID domains, evaluate ProtoNet accuracy on the ID and OOD domains
against the pre-trained backbone, and write a report. Options:

    python -m smat.train [--config configs/X.yaml] [--resume] [--skip-eval] [key=value ...]

``key=value`` overrides any config entry (``train.tau=0.95``, ``output=runs/x``).
Under ``torchrun --nproc_per_node K`` the tasks of each meta-batch are split
over the K processes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import Config, ConfigError, load_config, validate
from .data import DataError
from .evaluation.report import evaluate_and_report
from .runtime import checkpoint, distributed
from .runtime.device import resolve_device
from .runtime.io import OutputError, ensure_writable_dir, save_config
from .training import Trainer, TrainingError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="YAML config (see configs/); repeat it to compose: a "
                        "later file overrides an earlier one (e.g. a ViT config, then an overlay from "
                        "configs/ablations/); default: the built-in default run")
    parser.add_argument("--resume", action="store_true", help="continue the run in `output` from its latest "
                        "checkpoint")
    parser.add_argument("--skip-eval", action="store_true", help="meta-train only; no test evaluation or report")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.tau=0.95")
    return parser.parse_intermixed_args(argv)


def prepare(args) -> tuple[Config, Path]:
    config = validate(load_config(args.config, args.overrides))
    run = Path(config.output).expanduser()
    latest = checkpoint.checkpoint_dir(run) / "latest"
    if latest.exists() and not args.resume:
        raise ConfigError(f"{run} already holds a run; resume it with --resume, or choose another folder with "
                          f"output=PATH")
    return config, ensure_writable_dir(run)


def train(config: Config, run: Path, device: torch.device, world: distributed.World, log=print,
          resume: bool = False, evaluate: bool = True) -> Trainer | None:
    """Meta-train ``config.method`` into ``run`` (from its latest checkpoint when ``resume``), then evaluate
    the best checkpoint against the pre-trained backbone and write the report. Returns the trainer (None on a
    process that had nothing to do)."""
    if config.method == "pretrained":
        if not world.is_main:
            return None  # nothing to train, so nothing to share: the main process writes the run alone
        world = distributed.World()
    trainer = Trainer(config, run, device, world, log)
    log(trainer.model.describe())
    if resume:
        trainer.restore(checkpoint.resolve(run))
    elif world.is_main:
        checkpoint.save_backbone(run, trainer.model.backbone.state_dict())
    trainer.fit()
    if world.is_main and evaluate:
        evaluate_and_report(config, run, trainer.model, device, log)
    return trainer


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config, run = prepare(args)
    except (ConfigError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(config.seed)
    world = distributed.World()
    try:
        device = resolve_device(config.device, world.local_rank)
        world = distributed.init(device)
        log = print if world.is_main else (lambda *a, **k: None)
        if world.is_main:
            save_config(config, run / "config.yaml")
        train(config, run, device, world, log, resume=args.resume, evaluate=not args.skip_eval)
    except (ConfigError, DataError, OutputError, TrainingError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
