"""Result tables of ``python -m smat.evaluate``, in the paper's layout.

- ``results.md`` / ``results.csv`` (Table 1): one row per test domain, then the ID and OOD averages
  (means of the domains' means); one column per method × mode, e.g. ``smat + lora``; each cell the
  mean query accuracy over the domain's tasks ± the 95% confidence interval 1.96·std/√n, in %.
  results.md ends with the learning rate of every fine-tuned column and domain.
- ``cost.md`` / ``cost.csv`` (Table 5): one row per method × mode with seconds per task (adaptation and
  prediction, data loading excluded), peak memory and the average accuracy over the domains.

The method of a column is its run's ``config.method``; runs of the same method are told apart by their
folder names. Files are written atomically.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..runtime.io import atomic_write_text
from .metrics import confidence_interval

MIB = 2 ** 20
ROLES = ("id", "ood")


@dataclass
class ModeResult:
    """The tasks of one domain under one run and mode."""

    run: str
    method: str
    mode: str
    domain: str
    role: str  # 'id' or 'ood'
    accuracies: list[float]  # per task, in [0, 1]
    seconds: float  # adaptation + prediction over these tasks
    lr: float | None = None  # the learning rate used (full, LoRA)
    lr_split: str | None = None  # the split whose first tasks chose it: 'val', 'test' or 'fixed'
    lr_scores: dict = field(default_factory=dict)  # {lr: mean accuracy on those tasks}


@dataclass
class ModeCost:
    """One run under one mode, over all its domains."""

    run: str
    method: str
    mode: str
    tasks: int
    seconds: float
    peak_memory_bytes: int | None
    memory_kind: str

    @property
    def seconds_per_task(self) -> float:
        return self.seconds / max(self.tasks, 1)


def column_labels(items) -> dict[tuple[str, str], str]:
    """{(run, mode): 'method + mode'} with the run's folder name added where two runs share a method."""
    runs = {}
    for item in items:
        runs.setdefault(item.method, set()).add(item.run)
    return {(item.run, item.mode): (f"{item.method} [{item.run}]" if len(runs[item.method]) > 1 else item.method)
            + f" + {item.mode}" for item in items}


def _summary(results: list[ModeResult]):
    """(labels, domains [(name, role)], cells {(domain, label): (mean %, ci %)}, averages {(role, label): %})."""
    labels = column_labels(results)
    columns = list(dict.fromkeys(labels.values()))
    domains = list(dict.fromkeys((r.domain, r.role) for r in results))
    domains.sort(key=lambda d: ROLES.index(d[1]) if d[1] in ROLES else len(ROLES))  # stable: ID first
    cells = {(r.domain, labels[r.run, r.mode]): tuple(100 * v for v in confidence_interval(r.accuracies))
             for r in results}
    averages = {}
    for role in ROLES:
        for label in columns:
            means = [cells[name, label][0] for name, r in domains if r == role and (name, label) in cells]
            if means:
                averages[role, label] = float(np.mean(means))
    return columns, domains, cells, averages


def results_markdown(results: list[ModeResult]) -> str:
    columns, domains, cells, averages = _summary(results)
    lines = ["| domain | role | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, role in domains:
        row = [f"{cells[name, c][0]:.2f} ± {cells[name, c][1]:.2f}" if (name, c) in cells else "—" for c in columns]
        lines.append(f"| {name} | {role.upper()} | " + " | ".join(row) + " |")
    for role in ROLES:
        if any((role, c) in averages for c in columns):
            row = [f"**{averages[role, c]:.2f}**" if (role, c) in averages else "—" for c in columns]
            lines.append(f"| **{role.upper()} average** | | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def results_csv(results: list[ModeResult]) -> str:
    """domain, role, then '<column> mean' and '<column> ci95' per column (in %); averages have no CI."""
    columns, domains, cells, averages = _summary(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["domain", "role"] + [f"{c} {part}" for c in columns for part in ("mean", "ci95")])
    for name, role in domains:
        row = [name, role]
        for c in columns:
            row += [f"{v:.4f}" for v in cells[name, c]] if (name, c) in cells else ["", ""]
        writer.writerow(row)
    for role in ROLES:
        if any((role, c) in averages for c in columns):
            row = [f"{role} average", role]
            for c in columns:
                row += [f"{averages[role, c]:.4f}" if (role, c) in averages else "", ""]
            writer.writerow(row)
    return buffer.getvalue()


def learning_rates_markdown(results: list[ModeResult]) -> str:
    """The learning rate each gradient-based column used per domain, and the split whose first tasks chose
    it ('test': the domain has no val split, so those tasks are also among the ones reported; 'support': each
    task chose its own from its support set, shown as the share of tasks per rate)."""
    chosen = [r for r in results if r.lr is not None or r.lr_split == "support"]
    if not chosen:
        return ""
    labels = column_labels(chosen)
    columns = list(dict.fromkeys(labels.values()))
    cells = {(r.domain, labels[r.run, r.mode]): _rate_cell(r) for r in chosen}
    lines = ["| domain | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for domain in dict.fromkeys(r.domain for r in chosen):
        lines.append(f"| {domain} | " + " | ".join(cells.get((domain, c), "—") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _rate_cell(result: ModeResult) -> str:
    if result.lr is not None:
        return f"{result.lr:g} ({result.lr_split})"
    shares = sorted(result.lr_scores.items(), key=lambda item: -item[1])
    return "per task (support): " + ", ".join(f"{float(rate):g} × {share:.0%}" for rate, share in shares)


def _cost_rows(costs: list[ModeCost], results: list[ModeResult]) -> list[list[str]]:
    labels = column_labels(costs)
    rows = []
    for cost in costs:
        means = [np.mean(r.accuracies) for r in results if (r.run, r.mode) == (cost.run, cost.mode)]
        memory = f"{cost.peak_memory_bytes / MIB:.1f}" if cost.peak_memory_bytes is not None else "n/a"
        accuracy = f"{100 * float(np.mean(means)):.2f}" if means else "n/a"
        rows.append([labels[cost.run, cost.mode], f"{cost.seconds_per_task:.3f}", memory, accuracy,
                     str(cost.tasks), cost.memory_kind])
    return rows


COST_HEADER = ["method + mode", "seconds per task", "peak memory (MiB)", "average accuracy (%)", "tasks",
               "memory measured as"]


def cost_markdown(costs: list[ModeCost], results: list[ModeResult]) -> str:
    lines = ["| " + " | ".join(COST_HEADER) + " |", "|---|" + "---:|" * (len(COST_HEADER) - 2) + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in _cost_rows(costs, results)]
    return "\n".join(lines) + "\n"


def cost_csv(costs: list[ModeCost], results: list[ModeResult]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COST_HEADER)
    writer.writerows(_cost_rows(costs, results))
    return buffer.getvalue()


def write_tables(results: list[ModeResult], costs: list[ModeCost], folder: str | Path) -> dict[str, Path]:
    """Write results.{md,csv} and cost.{md,csv} into ``folder``; returns their paths."""
    folder = Path(folder)
    notes = learning_rates_markdown(results)
    results_md = results_markdown(results) + (f"\nLearning rates (split that chose them):\n\n{notes}" if notes else "")
    contents = {"results.md": results_md, "results.csv": results_csv(results),
                "cost.md": cost_markdown(costs, results), "cost.csv": cost_csv(costs, results)}
    paths = {}
    for name, text in contents.items():
        paths[name] = folder / name
        atomic_write_text(paths[name], text)
    return paths
