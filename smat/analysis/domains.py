"""Fig. 6c: the test domains clustered by their mean evaluation-time α."""

from __future__ import annotations

import copy
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from scipy.cluster import hierarchy  # noqa: E402

from ..config import Config  # noqa: E402
from ..data import episodes  # noqa: E402
from ..data.groups import label  # noqa: E402
from .figures import save_figure  # noqa: E402


@torch.no_grad()
def domain_alpha(config: Config, model, episodes_per_domain: int, temperature: float,
                 device: torch.device) -> dict[str, dict]:
    """{test domain: {'role', 'group', 'alpha': mean evaluation-time α [M]}} over the first N test episodes.

    The episodes are the evaluation's (same seed), so the α are those the reported accuracies used."""
    evaluation = copy.deepcopy(config)
    evaluation.evaluate.episodes = episodes_per_domain
    source = episodes.open_source(evaluation)
    model.eval()
    result = {}
    for name, dataset in episodes.test_datasets(evaluation, source).items():
        loader = episodes.loader(dataset, evaluation, meta_batch=evaluation.train.meta_batch)
        alphas = [model.task_alpha([t.to(device) for t in (batch if isinstance(batch, list) else [batch])],
                                   temperature).cpu() for batch in loader]
        result[name] = {"role": episodes.domain_role(name, source), "group": episodes.domain_group(name, source),
                        "alpha": torch.cat(alphas).mean(0).tolist()}
    return result


def domain_linkage(alpha: np.ndarray) -> np.ndarray | None:
    """Average-linkage (UPGMA) clustering of the domains' mean α [D, M] by Euclidean distance; None for
    fewer than two domains, which have nothing to cluster."""
    if len(alpha) < 2:
        return None
    return hierarchy.linkage(alpha, method="average", metric="euclidean")


def plot_domain_alpha(domains: dict[str, dict], title: str, path: Path, episodes_per_domain: int,
                      temperature: float) -> Path:
    """Dendrogram of the domains by mean α (left) and the mean α heatmap in the dendrogram's leaf order."""
    names = list(domains)
    alpha = np.asarray([domains[n]["alpha"] for n in names], dtype=np.float64)
    linkage = domain_linkage(alpha)
    count, experts = alpha.shape
    figure, (left, right) = plt.subplots(1, 2, figsize=(4 + 0.55 * experts, 1.2 + 0.4 * count),
                                         gridspec_kw={"width_ratios": [1, 2.5], "wspace": 0.02})
    leaves = list(range(count))
    if linkage is not None:
        leaves = hierarchy.dendrogram(linkage, orientation="left", ax=left, no_labels=True,
                                      link_color_func=lambda _: "black")["leaves"]
    left.set_axis_off()
    # the dendrogram puts leaf k at y = 10k + 5 from the bottom: the heatmap rows use the same scale
    image = right.imshow(alpha[leaves], origin="lower", aspect="auto", cmap="viridis", vmin=0,
                         extent=(-0.5, experts - 0.5, 0, 10 * count))
    left.set_ylim(0, 10 * count)
    right.set_yticks([10 * k + 5 for k in range(count)],
                     [f"{names[i]} ({label(domains[names[i]].get('group') or domains[names[i]]['role'])})"
                      for i in leaves])
    right.yaxis.tick_right()
    right.set_xticks(range(experts), [str(m) for m in range(experts)])
    right.set(xlabel="expert", title=f"{title}: mean α ({episodes_per_domain} episodes per domain, T = "
                                     f"{temperature:g})")
    # below both panels (on the right it would cover the domain names), so that both keep the same height
    figure.colorbar(image, ax=[left, right], orientation="horizontal", fraction=0.05, pad=0.12, label="mean α")
    numbers = {"title": title, "episodes_per_domain": episodes_per_domain, "temperature": temperature,
               "domains": domains, "leaf_order": [names[i] for i in leaves], "linkage_method": "average",
               "linkage": linkage.tolist() if linkage is not None else None}
    return save_figure(figure, path, numbers)

