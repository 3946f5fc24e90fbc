"""Structured pruning that physically shrinks the model.

* dependency.py / propagation.py: :class:`ChannelDependencyGraph`, the groups of coupled
  channels, neurons and attention heads of a graph;
* importance.py: the l1 | l2 | bn_scale | taylor criteria, one score per unit;
* surgery.py: slices the constants and rewrites shape arguments so tensors really shrink;
* prune_pass.py: the registered ``prune`` pass (ratio, criterion, scope, steps, round_to, exclude).
"""

from graphopt.passes.prune.dependency import ChannelDependencyGraph, ChannelGroup  # noqa: F401
from graphopt.passes.prune.prune_pass import Prune  # noqa: F401
