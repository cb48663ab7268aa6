"""Running and reporting runs: the simulation launcher (locally or on a Ray cluster),
the run directory and its report, and the comparison of aggregators against baselines."""
