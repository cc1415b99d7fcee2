"""``python -m smat.train``: meta-train a run (Algorithm 1, or a baseline), then evaluate it and write its report.

With no argument, the command runs the built-in default end to end:
take the small built-in ViT pre-trained by ``python -m smat.pretrain`` (shipped with the package; ``--pretrain``
trains it anew, once, then cached), meta-tune it with SMAT on
the built-in ID domains, evaluate ProtoNet accuracy on the ID and OOD domains
against the pre-trained backbone, and write a report. Options:

    python -m smat.train [--config configs/X.yaml] [--resume] [--skip-eval] [--pretrain] [key=value ...]

``key=value`` overrides any config entry (``train.tau=0.95``, ``output=runs/x``).
Under ``torchrun --nproc_per_node K`` the tasks of each meta-batch are split
over the K processes.

A run folder belongs to one run and never changes meaning. Every check
(config, device, folder) passes before anything is written into it; while
training, the main process holds the folder's lock (smat.runtime.lock), so a
second training into it is refused with the holder's PID and host. A folder
that holds any checkpoint is never started anew. ``--resume`` continues with
the run's own ``config.yaml``; overrides may change only what cannot change
the experiment (:data:`RESUMABLE`).
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import signal
import sys
from pathlib import Path

import torch

from smat_kernels import dispatch

from .config import Config, ConfigError, load_config, merge_values, parse_override, validate, with_absolute_paths
from .data import DataError, episodes
from .evaluation.report import evaluate_and_report
from .evaluation.runs import read_run_config
from .model import check_buildable
from .runtime import checkpoint, distributed
from .runtime.device import resolve_device
from .runtime.io import OutputError, describe_os_error, ensure_writable_dir, save_config
from .runtime.lock import RunLock, describe_stale
from .training import Trainer, TrainingError

# what a resume may change (checkpoints record the rest of the config, to notice a damaged config.yaml)
RESUMABLE = checkpoint.RESUMABLE


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``): handled as Ctrl-C is, with the line that says how to resume."""


def _terminate(signum, frame):
    raise Terminated


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m smat.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="YAML config: a file, else one of smat's own by name "
                        "(pmf, baselines/pmf.yaml, vit_small_dino_metadataset: smat/configs/); repeat it to "
                        "compose: a later file overrides an earlier one (e.g. a ViT config, then an overlay from "
                        "ablations/); default: the built-in default run")
    parser.add_argument("--resume", action="store_true", help="continue the run in `output` from its latest "
                        "checkpoint")
    parser.add_argument("--skip-eval", action="store_true", help="meta-train only; no test evaluation or report")
    parser.add_argument("--pretrain", action="store_true", help="pre-train the built-in backbone (into the cache) "
                        "instead of using the one shipped with smat; the same as pretrain.use_shipped=false")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.tau=0.95")
    args = parser.parse_intermixed_args(argv)
    if args.pretrain:
        args.overrides.append("pretrain.use_shipped=false")
    return args


def prepare(args) -> tuple[Config, Path, torch.device, bool, RunLock | None]:
    """Every check before anything is written: the config, the device, the folder (new or resumable), then
    the folder's lock (main process only) and a re-check under it. Returns (config, run, device, whether a
    checkpoint is restored, the lock)."""
    requested = load_config(args.config, args.overrides)
    if not args.resume:
        check_buildable(validate(requested))
        check_data(requested)
        requested = with_absolute_paths(requested)  # the run's config.yaml works from any directory
    elif not (isinstance(requested.output, str) and requested.output):
        raise ConfigError(f"--resume needs output=RUN, the folder of the run to continue; got {requested.output!r}")
    run = Path(requested.output).expanduser()
    config = resumed_config(args, requested, run) if args.resume else requested
    check_folder(run, args.resume)
    device = resolve_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
    check_backend(config, device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.train.meta_batch % world_size:
        raise ConfigError(f"train.meta_batch ({config.train.meta_batch}) must be divisible by the number of "
                          f"processes ({world_size})")
    if int(os.environ.get("RANK", "0")) != 0:
        return config, run, device, args.resume and checkpoint.has_checkpoints(run), None
    run = ensure_writable_dir(run)
    lock = RunLock(run).acquire()
    try:
        check_folder(run, args.resume)  # again, under the lock: another process may have started it meanwhile
        checkpoint.remove_temporaries(run)
    except BaseException:
        lock.release()
        raise
    return config, run, device, args.resume and checkpoint.has_checkpoints(run), lock


def check_data(config: Config) -> None:
    """The episodes of training, validation and testing can be drawn from the data (domains, classes, and the
    image folders of data.test_folders): found before training, not after it."""
    source = episodes.open_source(config)
    episodes.train_dataset(config, source)
    episodes.val_datasets(config, source)
    episodes.test_datasets(config, source)


def check_backend(config: Config, device: torch.device) -> None:
    """The kernel backend named by model.backend (or SMAT_BACKEND) runs on ``device``: checked before the run
    folder is written, not at the first merge."""
    name = config.model.backend or os.environ.get(dispatch.ENVIRONMENT_VARIABLE) or None
    where = "model.backend" if config.model.backend else dispatch.ENVIRONMENT_VARIABLE
    try:
        reason = dispatch.rejection(name, device) if name is not None else None
    except ValueError as error:  # an unknown name in SMAT_BACKEND
        reason = str(error)
    if reason is not None:
        raise ConfigError(f"{where}={name} cannot run on {device}: {reason}; leave it empty for the automatic "
                          f"choice, or choose a device it runs on")


def check_folder(run: Path, resume: bool) -> None:
    if not resume and checkpoint.has_checkpoints(run):
        raise ConfigError(f"{run} already holds a run; resume it with --resume, or choose another folder with "
                          f"output=PATH")
    if resume and not (run / "config.yaml").is_file():
        raise ConfigError(f"{run} holds no run to resume (no config.yaml); start one without --resume")


def resumed_config(args, requested: Config, run: Path) -> Config:
    """The run's own config.yaml with the command line's resumable changes; any other change is refused."""
    saved = read_run_config(run)
    if args.config:  # the original command again: its files and overrides must give the run's config
        resumed = requested
    else:
        resumed = copy.deepcopy(saved)
        for text in args.overrides:
            merge_values(resumed, parse_override(text), "")
    resumed.output = requested.output
    changed = [f"{key} ({before!r} → {after!r})" for key, (before, after) in differences(saved, resumed).items()
               if not key.startswith(tuple(k for k in RESUMABLE if k.endswith("."))) and key not in RESUMABLE]
    if changed:
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUMABLE if k != "config_files")
        raise ConfigError(f"--resume continues {run} with its own config ({run / 'config.yaml'}); this would "
                          f"change the experiment: {', '.join(changed)}. A resume may change only {allowed}; "
                          f"to train another config, start a new run with output=ANOTHER_FOLDER")
    return validate(resumed)


def differences(before: Config, after: Config) -> dict[str, tuple]:
    """{dotted key: (before, after)} of every value that differs."""
    flat_before, flat_after = before.flat(), after.flat()
    return {key: (flat_before.get(key), flat_after.get(key)) for key in sorted(flat_before.keys() | flat_after)
            if flat_before.get(key) != flat_after.get(key)}


def train(config: Config, run: Path, device: torch.device, world: distributed.World, log=print,
          resume: bool = False, evaluate: bool = True) -> Trainer | None:
    """Meta-train ``config.method`` into ``run`` (from its latest checkpoint when ``resume``), then evaluate
    the best checkpoint against the pre-trained backbone and write the report. Returns the trainer (None on a
    process that had nothing to do).

    Nothing is written into ``run`` before the model and data are built and a resumed checkpoint is
    restored: a run that fails there (a config the model or data refuse, a foreign checkpoint) is left as
    it was."""
    if config.method == "pretrained":
        if not world.is_main:
            return None  # nothing to train, so nothing to share: the main process writes the run alone
        world = distributed.World()
    trainer = Trainer(config, run, device, world, log)
    log(trainer.model.describe())
    if resume:
        folder = checkpoint.resolve(run)
        trainer.restore(folder)
        if world.is_main:
            for line in checkpoint.repair_pointers(run, folder):
                log(line)
    if world.is_main:
        save_config(config, run / "config.yaml")
        if not resume:
            (run / "metrics.jsonl").unlink(missing_ok=True)  # of a start killed before its first checkpoint
            checkpoint.save_backbone(run, trainer.model.backbone.state_dict())
    trainer.fit()
    if world.is_main and evaluate:
        evaluate_and_report(config, run, trainer.model, device, log)
    return trainer


def main(argv=None) -> int:
    args = parse_args(argv)
    world, lock, run = distributed.World(), None, None
    previous_handler = signal.signal(signal.SIGTERM, _terminate)
    try:
        config, run, device, resume, lock = prepare(args)
        torch.manual_seed(config.seed)
        world = distributed.init(device)
        log = print if world.is_main else (lambda *a, **k: None)
        if lock is not None and lock.previous:
            log(describe_stale(lock.previous))
        train(config, run, device, world, log, resume=resume, evaluate=not args.skip_eval)
    except KeyboardInterrupt as interruption:
        if world.is_main:
            print(interrupted(run), file=sys.stderr)
        return 128 + signal.SIGTERM if isinstance(interruption, Terminated) else 130
    except (ConfigError, DataError, OutputError, TrainingError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write that no layer below turned into an OutputError
        print(f"error: {describe_os_error(error, Path(error.filename or run or '.'))}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(world)
        if lock is not None:
            lock.release()
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def interrupted(run: Path | None) -> str:
    if run is None or not (run / "config.yaml").is_file():
        return "interrupted before the run started; nothing to resume"
    return f"interrupted; resume with: python -m smat.train output={shlex.quote(str(run))} --resume"


if __name__ == "__main__":
    sys.exit(main())
