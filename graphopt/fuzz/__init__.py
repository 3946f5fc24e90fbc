"""Differential fuzzing of graphopt against eager PyTorch.

* :mod:`graphopt.fuzz.generator` — seeded, valid-by-construction random models (GraphSpec);
* :mod:`graphopt.fuzz.harness` — runs them through capture, each pass alone, a pipeline
  and a target build, and compares with eager on the tolerance ladder;
* :mod:`graphopt.fuzz.minimize` — shrinks a failing model to a few ops;
* :mod:`graphopt.fuzz.campaign` — many seeds, each failure minimized and printed as a reproducer;
* :mod:`graphopt.fuzz.emulated` — runs builds for aarch64 targets under qemu-aarch64, one
  emulated process per campaign.

Long campaigns: ``python -m graphopt.fuzz --graphs 5000`` (or ``graphopt fuzz``);
``--target arm64 --passes none`` fuzzes the emulated aarch64 build.
"""

from graphopt.fuzz.generator import GraphSpec, Op, generate
from graphopt.fuzz.campaign import Report, fuzz, minimize_failure
from graphopt.fuzz.harness import (Case, Comparison, Failure, Stage, check_spec, compare, default_stages,
                                   pass_stages, reproducer, stage_named)
from graphopt.fuzz.minimize import minimize

__all__ = ["GraphSpec", "Op", "generate", "Case", "Comparison", "Failure", "Report", "Stage", "check_spec",
           "compare", "default_stages", "fuzz", "pass_stages", "stage_named", "minimize", "minimize_failure",
           "reproducer"]
