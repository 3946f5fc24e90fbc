"""graphopt's TIR pipeline for CPU kernels: TVM's default one, then the lowering of the loop
annotations our schedule rules set (they hold only names and integers, so a rule's schedule
still replays from a MetaSchedule tuning record):

* ``graphopt.prefetch`` -> ``llvm.prefetch`` calls for weight streams (prefetch.py);
* ``graphopt.transpose`` -> a register shuffle network for transposing write-backs
  (transpose.py);

and small per-task tiles stay on the stack instead of TVM's workspace pool (stack_tiles.py).
They run after TVM's lowering because they rewrite vectorized, flattened TIR, and before the
host finalization (LowerTVMBuiltin), which the stack tiles must precede.  Pass
``tir_pipeline=TIR_PIPELINE`` to ``tvm.compile``.
"""

from __future__ import annotations

import tvm

from graphopt.targets.cpu.prefetch import inject_prefetch
from graphopt.targets.cpu.stack_tiles import keep_small_tiles_on_stack
from graphopt.targets.cpu.transpose import lower_transposes

TIR_PIPELINE = "graphopt"


def tir_pipeline_for(target: tvm.target.Target) -> str:
    """The TIR pipeline to build ``target``'s kernels with: ours for CPU (LLVM) targets, whose
    rules set the annotations, TVM's default for the others (CUDA)."""
    return TIR_PIPELINE if target.kind.name == "llvm" else "default"


def _graphopt_tir_pipeline():
    pipeline, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("default")
    ours = [inject_prefetch, lower_transposes, keep_small_tiles_on_stack]
    return tvm.transform.Sequential([pipeline, *ours]), finalize_host, finalize_device


tvm.tirx.compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _graphopt_tir_pipeline)
