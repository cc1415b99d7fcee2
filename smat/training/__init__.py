"""Meta-training: Algorithm 1's objective (:mod:`.objective`), the Lagrangian (:mod:`.lagrangian`), each
method's training spec (:mod:`.specs`), the loop (:mod:`.trainer`), the Fig. 4 measurement
(:mod:`.alignment`) and the built-in backbone's pre-training (:mod:`.pretrain`)."""

from .trainer import Trainer, TrainingError, build_model

__all__ = ["Trainer", "TrainingError", "build_model"]
