"""Shrink a failing random model to a few ops, and print it as a reproducer.

Works on the :class:`~graphopt.fuzz.generator.GraphSpec`, never on the fx graph, so every
candidate is again a valid model. Greedy reductions, repeated until none applies:

1. keep a single output (the first one that still fails);
2. *bypass* an op whose first input has the shape of its output (uses of the output read
   the input instead: the op disappears and nothing new appears);
3. *cut* an op: its outputs become fresh model inputs, so everything upstream of it goes;
4. *truncate* at a returned op: the model returns its first input instead, so the op and
   what only it needed go (a shape-changing op at the end, which bypass cannot remove).

Ops nothing returned depends on are dropped after every step. A candidate is kept when
the same stage still fails the same way (mismatch stays mismatch, crash stays crash).
Weights are seeded per op and inputs per value id, so shrinking does not reshuffle them.
"""

from __future__ import annotations

from typing import Callable

from graphopt.fuzz.generator import GraphSpec, Op


def _rename(ops: list[Op], old: int, new: int) -> list[Op]:
    return [Op(op.kind, tuple(new if i == old else i for i in op.inputs), op.outputs, op.params) for op in ops]


def _candidates(spec: GraphSpec):
    """Smaller specs derived from ``spec``, most aggressive first."""
    if len(spec.outputs) > 1:
        for out in spec.outputs:
            yield spec.with_ops(spec.ops, [out], spec.inputs)
    for index in reversed(range(len(spec.ops))):
        op = spec.ops[index]
        rest = spec.ops[:index] + spec.ops[index + 1:]
        # bypass: one output, with the shape of one of its inputs
        if len(op.outputs) == 1:
            out = op.outputs[0]
            for src in op.inputs:
                if spec.shapes[src] == spec.shapes[out]:
                    outputs = [src if o == out else o for o in spec.outputs]
                    yield spec.with_ops(_rename(rest, out, src), outputs, spec.inputs)
                    break
        # cut: its results become model inputs
        inputs = dict(spec.inputs)
        inputs.update({o: spec.shapes[o] for o in op.outputs})
        if not set(op.outputs) <= set(spec.outputs) or len(spec.ops) > 1:
            yield spec.with_ops(rest, spec.outputs, inputs)
        # truncate: a returned op's first input is returned in its place
        if len(op.outputs) == 1 and op.outputs[0] in spec.outputs and op.inputs[0] not in spec.inputs:
            outputs = list(dict.fromkeys(op.inputs[0] if o == op.outputs[0] else o for o in spec.outputs))
            yield spec.with_ops(rest, outputs, spec.inputs)


def minimize(spec: GraphSpec, still_fails: Callable[[GraphSpec], bool], max_checks: int = 200) -> GraphSpec:
    """The smallest spec found, by greedy reduction, for which ``still_fails`` holds."""
    checks = 0
    improved = True
    while improved and checks < max_checks:
        improved = False
        for candidate in _candidates(spec):
            if not candidate.ops or (len(candidate.ops), len(candidate.outputs)) >= (len(spec.ops), len(spec.outputs)):
                continue
            checks += 1
            if still_fails(candidate):
                spec, improved = candidate, True
                break
            if checks >= max_checks:
                break
    return spec
