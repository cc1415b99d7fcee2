"""A plan: the runs of an experiment, each a named config, trained into ``<root>/<name>``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunSpec:
    """One run of a plan: ``python -m smat.train [--config F ...] overrides`` into ``<root>/<name>``."""

    name: str
    method: str
    configs: tuple[str, ...] = ()  # YAML files, later ones overriding earlier ones
    overrides: tuple[str, ...] = ()  # key=value, after the files
    tau: float | None = None  # the run's expert sparsity target, for tables and figures (masked methods)
    modes: tuple[str, ...] = ("protonet",)  # meta-test modes it is evaluated with (smat.evaluate's --mode)

    def train_arguments(self) -> list[str]:
        """The command line of ``python -m smat.train`` for a fresh run (without ``output=``)."""
        files = [argument for path in self.configs for argument in ("--config", path)]
        return [*files, f"method={self.method}", *self.overrides]


@dataclass
class ExperimentPlan:
    """The runs of an experiment and how every run is tested (the same tasks for all of them)."""

    name: str
    runs: list[RunSpec]
    episodes: int  # test tasks per domain
    shared_overrides: list[str] = field(default_factory=list)  # applied to every run, after its own

    def __post_init__(self):
        names = [run.name for run in self.runs]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"plan {self.name!r} names runs more than once: {', '.join(duplicated)}")

    def arguments(self, run: RunSpec) -> list[str]:
        return [*run.train_arguments(), *self.shared_overrides]
