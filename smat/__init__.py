"""smat: Sparse MetA-Tuning (Chen et al., ICML 2024) for few-shot meta-tuning of vision transformers."""

__version__ = "0.1.0"
