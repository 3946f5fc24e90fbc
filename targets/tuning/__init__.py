"""MetaSchedule autotuning: the search (tuner), its persistent database (store), progress, RPC devices."""

from graphopt.targets.tuning.tuner import RPC, Tune, tuning_passes  # noqa: F401
