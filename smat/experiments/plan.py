"""A plan: the runs of an experiment, each a named config, trained into ``<root>/<name>``."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import Config, load_config, validate


@dataclass(frozen=True)
class RunSpec:
    """One run of a plan: ``python -m smat.train [--config F ...] overrides`` into ``<root>/<name>``."""

    name: str
    method: str
    configs: tuple[str, ...] = ()  # YAML files, later ones overriding earlier ones
    overrides: tuple[str, ...] = ()  # key=value, after the files and the plan's shared overrides
    tau: float | None = None  # the run's expert sparsity target, for tables and figures (masked methods)
    modes: tuple[str, ...] = ("protonet",)  # meta-test modes it is evaluated with (smat.evaluate's --mode)
    run: str | None = None  # evaluate another spec's trained run instead of training one (default: its own)
    checkpoint: str = "best"  # which of the run's checkpoints is evaluated ('best', 'latest', 'step-0000120')

    @property
    def folder(self) -> str:
        """The run folder's name under the plan's root."""
        return self.run or self.name


@dataclass
class ExperimentPlan:
    """The runs of an experiment and how every run is tested (the same tasks for all of them)."""

    name: str
    runs: list[RunSpec]
    episodes: int  # test tasks per domain
    shared_overrides: list[str] = field(default_factory=list)  # applied to every run, before its own
    test_domains: tuple[str, ...] | None = None  # evaluated on these instead of each run's data.test_domains
    cache_tag: str = ""  # evaluations are cached per tag (a plan that tests other domains keeps its own cache)

    def __post_init__(self):
        names = [run.name for run in self.runs]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"plan {self.name!r} names runs more than once: {', '.join(duplicated)}")
        orphans = sorted(run.name for run in self.runs if run.run is not None and run.run not in names)
        if orphans:
            raise ValueError(f"plan {self.name!r}: {', '.join(orphans)} evaluate a run the plan does not train")

    def trained(self) -> list[RunSpec]:
        """The specs that train a run (the others evaluate one of these)."""
        return [run for run in self.runs if run.run is None]

    def overrides(self, run: RunSpec) -> list[str]:
        """The shared overrides first, then the run's own: a shared ``train.tau=…`` cannot undo a τ sweep."""
        return [f"method={run.method}", *self.shared_overrides, *run.overrides]

    def arguments(self, run: RunSpec) -> list[str]:
        """The command line of ``python -m smat.train`` for a fresh run (without ``output=``)."""
        return [*(argument for path in run.configs for argument in ("--config", path)), *self.overrides(run)]

    def config(self, run: RunSpec, paths: bool = True) -> Config:
        """The validated config ``python -m smat.train`` will run for ``run`` (a ConfigError says what is wrong);
        ``paths=False``: without checking that its data and weights exist (a dry run)."""
        return validate(load_config(list(run.configs), self.overrides(run)), paths)

    def check(self, paths: bool = True) -> None:
        """Validate every run's config before anything is trained."""
        for run in self.trained():
            self.config(run, paths)

    def steps(self, run: RunSpec) -> int:
        """Meta-training steps of ``run`` (0 for the pre-trained backbone, which is not trained)."""
        train = self.config(run, paths=False).train
        return 0 if run.method == "pretrained" else train.epochs * max(1, train.tasks_per_epoch // train.meta_batch)


def dry_run(plan: ExperimentPlan, step_seconds: float, how: str, unit: str = "GPU-hours", log=print) -> float:
    """Print every run with its command and training time, at ``step_seconds`` per step (``how``: where that
    number comes from); returns the total in hours. Needs neither the data nor the weights."""
    total = 0.0
    for spec in plan.runs:
        steps = plan.steps(spec)
        hours = steps * step_seconds / 3600
        total += hours
        log(f"- {spec.name}: {steps} steps, {hours:.2f} {unit}; evaluated with {', '.join(spec.modes)}\n"
            f"    python -m smat.train {' '.join(plan.arguments(spec))} output=<output>/{spec.name}")
    log(f"{len(plan.runs)} runs, about {total:.1f} {unit} of meta-training at {step_seconds:.2f} s per step ({how}; "
        f"validation and testing not included)")
    return total
