"""MetaSchedule autotuning: the search (tuner), its persistent database (store), progress, RPC devices."""

from graphopt.targets.tuning.options import RPC, Tune, TuningLog  # noqa: F401
from graphopt.targets.tuning.tuner import tuning_passes  # noqa: F401
