"""smat: Sparse MetA-Tuning (Chen et al., ICML 2024) for few-shot meta-tuning of vision transformers.

``smat.load(run)`` gives a meta-tuned model; ``.specialize(images, labels)`` builds a task's model from a
few examples (:mod:`smat.inference`).
"""

__version__ = "0.1.0"

from .inference import load, load_specialist  # noqa: E402 - after __version__, which the layers below may read

__all__ = ["__version__", "load", "load_specialist"]
