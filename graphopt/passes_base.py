"""Declaring and registering passes.

A pass is a frozen dataclass whose fields are its options (as in xDSL): the declaration
gives the pipeline parser the option names, types, defaults, ranges and docs, so
``graphopt passes``, error messages and documentation all come from one place::

    @register_pass
    @dataclass(frozen=True)
    class Prune(GraphPass):
        '''Remove whole channels, neurons and heads.'''
        name: ClassVar[str] = "prune"
        ratio: float = option(0.3, "fraction of prunable channels to remove", range=(0.0, 1.0, "[)"))

        def run(self, graph: Graph) -> PassResult: ...

``run`` mutates the graph in place and says whether it changed anything; the pass manager
owns copying, re-deriving shape meta, checking invariants and instrumentation.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from graphopt.errors import PassOptionError, PipelineError
from graphopt.graph import Graph

# Tolerance classes of the ladder in docs/TOLERANCES.md: (rtol, atol) between the graph
# before and after one pass. "exact" means bit-identical outputs.
TOLERANCES: dict[str, tuple[float, float]] = {
    "exact": (0.0, 0.0),
    "algebraic": (1e-4, 1e-5),
    "half": (1e-2, 1e-2),
    "int8": (float("inf"), float("inf")),  # checked by SQNR / quantization step instead
    "int4": (float("inf"), float("inf")),  # checked by SQNR
    "lossy": (float("inf"), float("inf")),  # pruning: numerics change on purpose
}


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)


def option(default: Any, doc: str, *, choices: tuple[Any, ...] | None = None,
           range: tuple[float, float, str] | None = None) -> Any:  # noqa: A002 - mirrors the pipeline syntax
    """Declare a pass option. ``range=(lo, hi, "[)")`` gives bounds and their inclusivity."""
    if isinstance(default, list):
        default = tuple(default)
    return field(default=default, metadata={"doc": doc, "choices": choices, "range": range})


@dataclass(frozen=True)
class OptionInfo:
    name: str
    type: Any
    default: Any
    doc: str
    choices: tuple[Any, ...] | None
    range: tuple[float, float, str] | None

    def describe(self) -> str:
        kind = getattr(self.type, "__name__", str(self.type)).replace("tuple", "list")
        extra = ""
        if self.choices:
            extra = " one of " + "|".join(map(str, self.choices))
        elif self.range:
            lo, hi, incl = self.range
            extra = f" in {incl[0]}{lo}, {hi}{incl[1]}"
        return f"{self.name}: {kind} = {format_value(self.default)}{extra} -- {self.doc}"


@dataclass(frozen=True)
class GraphPass:
    """Base class of every pass. Subclasses are frozen dataclasses; fields are options."""

    name: ClassVar[str] = ""
    # Which rung of the tolerance ladder the pass sits on (see TOLERANCES); ``rung()`` may
    # refine it per instance from the options.
    tolerance: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        for opt in self.options():
            value = getattr(self, opt.name)
            if isinstance(value, list):
                object.__setattr__(self, opt.name, tuple(value))
                value = tuple(value)
            _check_option(self.name, opt, value)

    @classmethod
    def options(cls) -> list[OptionInfo]:
        hints = typing.get_type_hints(cls)
        return [OptionInfo(f.name, hints[f.name], f.default, f.metadata.get("doc", ""),
                           f.metadata.get("choices"), f.metadata.get("range"))
                for f in dataclasses.fields(cls)]

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    def run(self, graph: Graph) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def rung(self) -> str:
        """The tolerance rung this configured pass is held to (the class's ``tolerance``)."""
        return self.tolerance

    def __str__(self) -> str:
        given = [(o.name, getattr(self, o.name)) for o in self.options() if o.name in self._explicit()]
        if not given:
            return self.name
        return self.name + "{" + ",".join(f"{k}={format_value(v)}" for k, v in given) + "}"

    def _explicit(self) -> set[str]:
        """Options to print: those that differ from the default, or were spelled out."""
        spelled = getattr(self, "_spelled", None)
        if spelled is not None:
            return set(spelled)
        return {o.name for o in self.options() if getattr(self, o.name) != o.default}


def format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _check_option(pass_name: str, opt: OptionInfo, value: Any) -> None:
    if opt.choices is not None:
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if v not in opt.choices:
                raise PassOptionError(f"{pass_name}: option {opt.name}={format_value(v)} is not one of "
                                      f"{', '.join(map(str, opt.choices))}")
    if opt.range is not None and value is not None:
        lo, hi, incl = opt.range
        ok_lo = value >= lo if incl[0] == "[" else value > lo
        ok_hi = value <= hi if incl[1] == "]" else value < hi
        if not (ok_lo and ok_hi):
            raise PassOptionError(f"{pass_name}: option {opt.name}={format_value(value)} is out of range "
                                  f"{incl[0]}{lo}, {hi}{incl[1]}")


def coerce_option(pass_name: str, opt: OptionInfo, text: str | list[str]) -> Any:
    """Turn the text of one option value into the declared type, or raise PassOptionError."""
    t = opt.type
    origin = typing.get_origin(t)
    try:
        if origin is tuple or t is tuple:
            items = text if isinstance(text, list) else [s for s in text.split("|") if s]
            return tuple(items)
        if isinstance(text, list):
            raise ValueError("a list where a single value is expected")
        if t is bool:
            if text.lower() in ("true", "1", "yes", "on"):
                return True
            if text.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if t is int:
            return int(text)
        if t is float:
            return float(text)
        if origin is typing.Union:  # Optional[float] etc.
            args = [a for a in typing.get_args(t) if a is not type(None)]
            if text.lower() in ("none", "null"):
                return None
            return args[0](text)
        return str(text)
    except ValueError:
        tname = getattr(t, "__name__", str(t))
        raise PassOptionError(f"{pass_name}: option {opt.name}={text!r} is not a valid {tname}") from None


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[GraphPass]] = {}


def register_pass(cls: type[GraphPass]) -> type[GraphPass]:
    """Class decorator: make a pass available to pipelines by its ``name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no pass name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def registered_passes() -> dict[str, type[GraphPass]]:
    import graphopt.passes  # noqa: F401 - importing registers the built-in passes

    return dict(sorted(_REGISTRY.items()))


def get_pass(name: str) -> type[GraphPass]:
    passes = registered_passes()
    if name not in passes:
        raise PipelineError(f"unknown pass {name!r}; valid passes: {', '.join(passes)}")
    return passes[name]
