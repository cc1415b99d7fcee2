"""Result tables of ``python -m smat.evaluate``, in the paper's layout.

- ``results.md`` / ``results.csv`` (Table 1): one row per test domain with its group (ID, near-OOD, far-OOD;
  OOD where the source declares none: :mod:`smat.data.groups`), then the average of each group and of all
  test-only domains (means of the domains' means); one column per method × mode, e.g. ``smat + lora``; each cell the
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

from ..data.groups import GROUPS, average_keys, distinct_average_keys, in_group, label
from ..runtime.io import atomic_write_text
from .metrics import confidence_interval

MIB = 2 ** 20


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
    group: str = ""  # 'id', 'near_ood', 'far_ood' or 'ood' (smat.data.groups); empty: the role

    @property
    def domain_group(self) -> str:
        return self.group or self.role


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
    """(labels, domains [(name, group)], cells {(domain, label): (mean %, ci %)}, averages {(key, label): %},
    keys: the averages to show)."""
    labels = column_labels(results)
    columns = list(dict.fromkeys(labels.values()))
    domains = list(dict.fromkeys((r.domain, r.domain_group) for r in results))
    domains.sort(key=lambda d: GROUPS.index(d[1]) if d[1] in GROUPS else len(GROUPS))  # stable: ID first
    cells = {(r.domain, labels[r.run, r.mode]): tuple(100 * v for v in confidence_interval(r.accuracies))
             for r in results}
    averages = {}
    for key in average_keys(group for _, group in domains):
        for label_ in columns:
            means = [cells[name, label_][0] for name, g in domains if in_group(g, key) and (name, label_) in cells]
            if means:
                averages[key, label_] = float(np.mean(means))
    return columns, domains, cells, averages, distinct_average_keys(group for _, group in domains)


def _average_name(key: str, keys: list[str]) -> str:
    return "all OOD" if key == "ood" and len(keys) > 2 else label(key)


def results_markdown(results: list[ModeResult]) -> str:
    columns, domains, cells, averages, keys = _summary(results)
    lines = ["| domain | group | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for name, group in domains:
        row = [f"{cells[name, c][0]:.2f} ± {cells[name, c][1]:.2f}" if (name, c) in cells else "—" for c in columns]
        lines.append(f"| {name} | {label(group)} | " + " | ".join(row) + " |")
    for key in keys:
        if any((key, c) in averages for c in columns):
            row = [f"**{averages[key, c]:.2f}**" if (key, c) in averages else "—" for c in columns]
            lines.append(f"| **{_average_name(key, keys)} average** | | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def results_csv(results: list[ModeResult]) -> str:
    """domain, role ('id' or 'ood'), then '<column> mean' and '<column> ci95' per column (in %), then the group
    (last, so that the columns before keep their places); averages have no CI."""
    columns, domains, cells, averages, keys = _summary(results)
    roles = {r.domain: r.role for r in results}
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["domain", "role"] + [f"{c} {part}" for c in columns for part in ("mean", "ci95")] + ["group"])
    for name, group in domains:
        row = [name, roles[name]]
        for c in columns:
            row += [f"{v:.4f}" for v in cells[name, c]] if (name, c) in cells else ["", ""]
        writer.writerow(row + [group])
    for key in keys:
        if any((key, c) in averages for c in columns):
            row = [f"{key} average", "id" if key == "id" else "ood"]
            for c in columns:
                row += [f"{averages[key, c]:.4f}" if (key, c) in averages else "", ""]
            writer.writerow(row + [key])
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
