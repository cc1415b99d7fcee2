"""Shared pytest setup of smat's tests.

GPU tests carry ``@pytest.mark.gpu`` and are skipped here, at setup time,
where there is no CUDA device: nothing asks torch about CUDA at import or
collection time, so collecting the suite never initialises a GPU.
"""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")


@pytest.fixture(scope="module")
def tiny():
    """(SMAT over a random built-in ViT with θ_δ ~ N(0, 0.1²), two 3-way 2-shot latin test tasks): the model
    and tasks of the adaptation and protocol tests. smat is imported here, not at the top, so that collecting
    the kernel tests does not load the method layer."""
    import torch

    from smat import model as methods
    from smat.config import load_config
    from smat.data import episodes
    from smat.model.backbone import create_builtin

    config = load_config(None, ["data.n_way=3", "data.k_shot=2", "data.q_query=2"])
    torch.manual_seed(0)
    model = methods.build(config, create_builtin(config.model.builtin, config.model.image_size)).eval()
    with torch.no_grad():
        model.delta.normal_(0.0, 0.1)
    dataset = episodes.eval_dataset(config, episodes.open_source(config), "latin", "test", 2, seed=3)
    return model, [dataset[i] for i in range(len(dataset))]
