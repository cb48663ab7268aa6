"""Running and reporting runs: the simulation launcher (locally or on a Ray cluster),
the run directory and its report (with a simulation's held-out replies of the base and
the adapter), and the comparison of aggregators against baselines."""


class SimulationError(RuntimeError):
    """The simulation did not complete (locally or on a Ray cluster)."""
