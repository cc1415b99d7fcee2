"""The report of a training run: test accuracy of SMAT against the pre-trained backbone, sparsity, plots.

Written to ``<run>/report.md`` and ``<run>/report.json``, with pictures in
``<run>/plots/``. The model evaluated is the run's best checkpoint (highest
validation accuracy).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..config import Config
from ..data import episodes
from ..data.groups import NOTE as GROUPS_NOTE
from ..data.groups import average_keys, distinct_average_keys, in_group, label
from ..model.protonet import loader_accuracies
from ..runtime import checkpoint, runlog
from ..runtime.io import atomic_write_json, atomic_write_text
from . import plots
from .metrics import SPARSITY_TOLERANCE, confidence_interval
from .runs import load_trained


def compared_methods(config: Config) -> tuple[str, ...]:
    """The run's method, and the pre-trained backbone it is compared with."""
    return (config.method,) if config.method == "pretrained" else (config.method, "pretrained")


def evaluate_domains(config: Config, model, device, temperature: float, log=print) -> dict:
    """{domain: {'role', 'group', <method>: [accuracies], 'pretrained': [accuracies]}} over the test episodes."""
    source = episodes.open_source(config)
    methods = compared_methods(config)
    results = {}
    datasets = episodes.test_datasets(config, source)
    progress = tqdm(total=sum(len(d) for d in datasets.values()) * len(methods), desc="evaluate", unit="task",
                    leave=False)
    for name, dataset in datasets.items():
        loader = episodes.loader(dataset, config, meta_batch=config.train.meta_batch)
        results[name] = {"role": episodes.domain_role(name, source), "group": episodes.domain_group(name, source)}
        if len(methods) == 2:  # the model and the pre-trained backbone, on one pass over the tasks
            results[name].update(zip(methods, loader_accuracies(model, loader, temperature, device, config,
                                                                 paired=True), strict=True))
        else:
            results[name][methods[0]] = loader_accuracies(model, loader, temperature, device, config,
                                                          pretrained=methods[0] == "pretrained")
        progress.update(len(dataset) * len(methods))
    progress.close()
    return results


def sparsity_summary(model, tau: float) -> dict | None:
    """Each expert's hard and expected sparsity against τ; None for models without masks."""
    if not model.masked:
        return None
    hard = model.hard_sparsity().tolist()
    expected = (1 - model.expected_density().detach()).tolist()
    return {"tau": tau, "hard": hard, "expected": expected,
            "max_deviation": float(max(abs(s - tau) for s in hard)),
            "within_0.02": all(abs(s - tau) <= SPARSITY_TOLERANCE for s in hard)}


def paired_difference(results: dict, names: list[str], method: str, baseline: str = "pretrained") -> list[float]:
    """Mean over ``names`` of the per-domain mean of (method − baseline) per task, and its 95% half-width, in %.

    Both methods are evaluated on the same episodes, so the difference is taken task by task (a paired
    comparison): its interval is much tighter than the two methods' own intervals combined. The average over
    domains gives each domain equal weight; its variance is Σ_d var_d / n_d / D² (independent domains).
    """
    means, variances = [], []
    for name in names:
        difference = np.asarray(results[name][method], dtype=np.float64) - np.asarray(results[name][baseline])
        means.append(difference.mean())
        variances.append(difference.var(ddof=1) / difference.size if difference.size > 1 else 0.0)
    return [float(100 * np.mean(means)), float(100 * 1.96 * np.sqrt(np.sum(variances)) / len(names))]


def summarise(results: dict, methods=("smat", "pretrained")) -> dict:
    """Per domain and per group (ID, near-OOD, far-OOD averages, and OOD: every test-only domain): mean and 95% CI
    in %; with a baseline among ``methods``, the paired difference of the method against it (mean and 95% CI,
    per domain and per group). A domain's group is its 'group' (its 'role' in results without one)."""
    table = {name: {m: [100 * v for v in confidence_interval(r[m])] for m in methods}
             for name, r in results.items()}
    averages, differences = {}, {}
    paired = len(methods) == 2 and methods[1] == "pretrained"
    groups = {name: r.get("group") or r["role"] for name, r in results.items()}
    for key in average_keys(groups.values()):
        names = [n for n in results if in_group(groups[n], key)]
        averages[key] = {m: float(np.mean([table[n][m][0] for n in names])) for m in methods}
        if paired:
            differences[key] = paired_difference(results, names, methods[0])
    if paired:
        for name in results:
            differences[name] = paired_difference(results, [name], methods[0])
    return {"domains": table, "averages": averages, "differences": differences}


def _difference_cell(summary: dict, key: str) -> str:
    mean, half = summary["differences"][key]
    verdict = " ✓" if mean - half > 0 else (" ✗" if mean + half < 0 else "")
    return f"{mean:+.2f} ± {half:.2f}{verdict}"


def markdown_table(summary: dict, results: dict, methods=("smat", "pretrained")) -> str:
    """Per-domain accuracies; with a paired baseline, a last column: the difference (paired, 95% CI; ✓ when the
    interval lies above 0, ✗ when below)."""
    differences = summary.get("differences") or {}
    extra = [f"{methods[0]} − {methods[1]} (paired)"] if differences else []
    lines = ["| domain | group | " + " | ".join([*methods, *extra]) + " |",
             "|---|---|" + "---|" * (len(methods) + len(extra))]
    groups = {name: results[name].get("group") or results[name]["role"] for name in summary["domains"]}
    for name, row in summary["domains"].items():
        cells = [f"{row[m][0]:.2f} ± {row[m][1]:.2f}" for m in methods]
        cells += [_difference_cell(summary, name)] if differences else []
        lines.append(f"| {name} | {label(groups[name])} | " + " | ".join(cells) + " |")
    shown = distinct_average_keys(groups.values())
    for key, averages in summary["averages"].items():
        if key not in shown:
            continue
        cells = [f"**{averages[m]:.2f}**" for m in methods]
        cells += [f"**{_difference_cell(summary, key)}**"] if differences else []
        name = "all OOD" if key == "ood" and len(shown) > 2 else label(key)
        lines.append(f"| **{name} average** | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_and_report(config: Config, run: Path, model, device, log=print) -> dict:
    run = Path(run)
    start = time.perf_counter()
    state = load_trained(model, checkpoint.resolve(run, "best"), device)
    temperature = config.train.temperature.at(state["tasks_seen"])
    results = evaluate_domains(config, model, device, temperature, log)
    methods = compared_methods(config)
    summary = summarise(results, methods)
    records = runlog.read(run)
    train_records = [r for r in records if r["kind"] == "train"]
    sparsity = sparsity_summary(model, config.train.tau)
    figures = {"accuracy": plots.accuracy_bars(summary["domains"], list(methods), run / "plots" / "accuracy.png")}
    if train_records:
        figures["training"] = plots.training_curves(records, run / "plots" / "training.png")
        if sparsity is not None:
            figures["sparsity"] = plots.sparsity_curves(records, config.train.tau, run / "plots" / "sparsity.png")
    report = {"config": config.to_dict(), "checkpoint": state, "summary": summary, "sparsity": sparsity,
              "episodes_per_domain": config.evaluate.episodes,
              "train_tasks_per_second": train_records[-1]["tasks_per_second"] if train_records else None,
              "evaluation_seconds": round(time.perf_counter() - start, 1),
              "groups": {name: r.get("group") or r["role"] for name, r in results.items()},
              "per_task": {name: {m: r[m] for m in methods} for name, r in results.items()}}
    atomic_write_json(run / "report.json", report)
    atomic_write_text(run / "report.md", _markdown(config, state, summary, results, sparsity, figures, run))
    log(f"report: {run / 'report.md'}")
    log(markdown_table(summary, results, methods))
    return report


def _protocol(config) -> str:
    data = config.data
    if data.protocol == "variable":
        return "Meta-Dataset's variable way and shot"
    return f"{data.n_way}-way {data.k_shot}-shot, {data.q_query} queries per class"


def _markdown(config, state, summary, results, sparsity, figures, run) -> str:
    parts = [
        f"# {config.method} run report — {run.name}",
        "",
        f"Method `{config.method}`, backbone `{config.model.backbone}`, M = {config.model.num_experts} experts, "
        f"τ = {config.train.tau}; best checkpoint at step {state['step']} of {state['total_steps']} "
        f"({state['tasks_seen']} tasks, validation accuracy {100 * state['best_val']:.2f}%).",
        "",
        f"## Test accuracy (ProtoNet, {config.evaluate.episodes} episodes per domain, mean ± 95% CI, %)",
        "",
        markdown_table(summary, results, compared_methods(config)),
        "",
    ]
    if any(results[name].get("group") in ("near_ood", "far_ood") for name in results):
        parts += [GROUPS_NOTE, ""]
    if summary.get("differences"):
        parts += [
            f"Protocol: {_protocol(config)}. The last column is the paired difference: both models are "
            f"tested on the same episodes, the difference is taken task by task, and ± is its 95% interval "
            f"(averages: domains weighted equally). ✓: above 0 beyond the interval; ✗: below.",
            "",
        ]
    if sparsity is not None:
        verdict = "yes" if sparsity["within_0.02"] else "no"
        parts += [
            "## Sparsity of each expert",
            "",
            "- hard (deterministic masks): " + ", ".join(f"{s:.3f}" for s in sparsity["hard"]),
            "- expected (1 − E[L0]/N): " + ", ".join(f"{s:.3f}" for s in sparsity["expected"]),
            f"- every expert within {SPARSITY_TOLERANCE} of τ = {config.train.tau}: **{verdict}** "
            f"(largest deviation {sparsity['max_deviation']:.3f})",
            "",
        ]
    for name, path in figures.items():
        parts += [f"![{name}]({Path(path).relative_to(run)})", ""]
    return "\n".join(parts)
