"""Experiments as plans: named runs (each a base config, overlays and overrides) → train what is missing
(resumable) → evaluate every run on the same test tasks → tables, figures and a summary.

``python -m smat.study`` (the paper's experiment in miniature on the built-in data) is one plan over this
engine. A plan is data (:mod:`.plan`); :mod:`.runner` trains and evaluates it; :mod:`.claims` tests the
paper's claims on the results; :mod:`.figures` draws them.
"""

from .plan import ExperimentPlan, RunSpec
from .runner import RunResult, evaluate_plan, train_plan

__all__ = ["ExperimentPlan", "RunResult", "RunSpec", "evaluate_plan", "train_plan"]
