"""Meta-testing: loading a trained run (:mod:`.runs`), the adaptation modes over test episodes
(:mod:`.modes`), confidence intervals (:mod:`.metrics`), Table 1 / Table 5 style tables (:mod:`.tables`),
and a training run's report with its plots (:mod:`.report`, :mod:`.plots`)."""
