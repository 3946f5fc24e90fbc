"""Which rule schedules a PrimFunc: the one dispatch that builds and tuning share.

``dispatch`` tries the rules of ``RULES`` in order; the first whose ``match`` accepts the
func schedules it.  The scheduled func carries the rule's name as the ``graphopt.rule``
attribute (``rule_of``; shown by ``graphopt inspect --target`` and
benchmarks/profile_kernels.py), next to ``tirx.is_scheduled`` so that nothing schedules it
again.

A rule that raises has a bug.  In a build the func goes to the next rule (the fallback
rule at the end takes anything) with a ``ScheduleRuleWarning`` naming the rule and the
PrimFunc, so a bug costs speed, not the build; with ``GRAPHOPT_STRICT_RULES=1`` (the test
suite sets it, tests/conftest.py) the exception propagates and fails the test.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import tvm
from tvm import s_tir, tirx

from .base import CPURule, is_scheduled
from .conv2d import Conv2dNCHW
from .conv_depthwise import ConvThenDepthwise
from .depthwise import DepthwiseConv2dNCHW
from .elementwise import Fallback, Injective
from .int4_linear import Int4Linear
from .int8 import Int8DotProduct
from .matmul import Matmul
from .pooling import Pooling
from .reduction import RowReduction
from .sparse_linear import SparseLinear
from .sparse_nm import SparseNMLinear
from .winograd import WinogradConv2d

RULE_ATTR = "graphopt.rule"
STRICT_ENV = "GRAPHOPT_STRICT_RULES"

RULES: list[CPURule] = [
    SparseLinear(),
    SparseNMLinear(),
    Int4Linear(),
    Int8DotProduct(),
    WinogradConv2d(),
    ConvThenDepthwise(),
    Conv2dNCHW(),
    DepthwiseConv2dNCHW(),
    Matmul(),
    Pooling(),
    RowReduction(),
    Injective(),
    Fallback(),
]


class ScheduleRuleWarning(RuntimeWarning):
    """A schedule rule raised on a PrimFunc; the next rule scheduled it instead."""


@dataclass(frozen=True)
class Dispatched:
    """The rule that took a PrimFunc and the (traced) schedule it made."""

    rule: str
    schedule: s_tir.Schedule

    @property
    def func(self) -> tirx.PrimFunc:
        """The scheduled PrimFunc, marked scheduled and stamped with the rule's name."""
        return self.schedule.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, self.rule)


def strict_rules() -> bool:
    return os.environ.get(STRICT_ENV, "") not in ("", "0")


def dispatch(func: tirx.PrimFunc, target: tvm.target.Target, rules: list[CPURule] | None = None,
             name: str | None = None) -> Dispatched | None:
    """The first rule of ``rules`` (default ``RULES``) that schedules ``func``, or None."""
    for rule in RULES if rules is None else rules:
        if not rule.is_target_available(target):
            continue
        try:
            sch = rule.apply(func, target, False)
        except Exception as err:
            where = name or _func_name(func)
            if strict_rules():
                err.add_note(f"raised by schedule rule {rule.name} on PrimFunc {where} ({STRICT_ENV} is set)")
                raise
            first_line = next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
            warnings.warn(f"schedule rule {rule.name} failed on PrimFunc {where} ({first_line}); "
                          "the next rule schedules it", ScheduleRuleWarning, stacklevel=2)
            continue
        if sch is None:
            continue
        return Dispatched(rule.name, sch[0] if isinstance(sch, list) else sch)
    return None


def schedule_primfunc(func: tirx.PrimFunc, target: tvm.target.Target, rules: list[CPURule] | None = None,
                      name: str | None = None) -> tuple[str | None, tirx.PrimFunc]:
    """(rule name, scheduled and stamped func), or (None, func) when no rule took it."""
    chosen = dispatch(func, target, rules, name)
    return (chosen.rule, chosen.func) if chosen is not None else (None, func)


def rule_of(func: tirx.PrimFunc) -> str | None:
    """The graphopt rule that scheduled ``func``; None when none did (unscheduled, or
    scheduled by a tuning record or by TVM's GPU rules)."""
    attrs = func.attrs
    return str(attrs[RULE_ATTR]) if attrs is not None and RULE_ATTR in attrs else None


def cpu_schedule_pass(target: tvm.target.Target, rules: list[CPURule] | None = None) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that carries no "tirx/tir.is_scheduled" attr.

    Functions already scheduled (e.g. by MetaScheduleApplyDatabase) are left untouched so
    tuned records win.  Uses ``target`` (or the func's own "target" attr) for the vector
    ISA and the core count."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target

    @tvm.transform.module_pass(opt_level=0, name="graphopt.CPUSchedule")
    def _pass(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
                continue
            func_target = func.attrs.get("target") if func.attrs is not None else None
            rule, new = schedule_primfunc(func, func_target or target, rules, name=gv.name_hint)
            if rule is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    return _pass


def _func_name(func: tirx.PrimFunc) -> str:
    symbol = func.attrs.get("global_symbol") if func.attrs is not None else None
    return str(symbol) if symbol is not None else "<unnamed>"
