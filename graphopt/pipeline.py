"""Textual pipelines and the pass manager that runs them.

Grammar (whitespace between tokens is ignored)::

    pipeline := pass ("," pass)*
    pass     := NAME ["{" option ("," option)* "}"]
    option   := KEY "=" (ATOM | "[" ATOM ("," ATOM)* "]")

``str(Pipeline.parse(text)) == text`` for canonical text (no spaces, options as written),
and ``Pipeline.parse(str(p)) == p`` always: the text is what manifests, IR dumps, error
messages and reproducers carry.

Running a pipeline copies the graph once, then for every pass: instruments' ``before``,
``run``, re-derive meta and check invariants when it changed, instruments' ``after``. Any
exception is re-raised naming the pass, the passes already run and the pipeline text.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from graphopt.errors import GraphoptError, PassError, PipelineError
from graphopt.graph import Graph
from graphopt.passes_base import GraphPass, PassResult, coerce_option, get_pass

DEFAULT_PIPELINE = "fold,fuse"

_TOKEN = re.compile(r"\s*([{}\[\],=]|[^{}\[\],=\s]+)")


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, int]] = []
        pos = 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if m is None:  # only trailing whitespace is left
                break
            self.tokens.append((m.group(1), m.start(1)))
            pos = m.end()
        self.i = 0

    def error(self, what: str) -> PipelineError:
        col = self.tokens[self.i][1] if self.i < len(self.tokens) else len(self.text)
        return PipelineError(f"malformed pipeline {self.text!r}: {what} at column {col + 1}\n"
                             f"  {self.text}\n  {' ' * col}^")

    def peek(self) -> str | None:
        return self.tokens[self.i][0] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise self.error("unexpected end")
        self.i += 1
        return tok

    def expect(self, tok: str) -> None:
        if self.peek() != tok:
            raise self.error(f"expected {tok!r}, found {self.peek()!r}" if self.peek() else f"expected {tok!r}")
        self.i += 1

    def atom(self) -> str:
        tok = self.peek()
        if tok is None or tok in "{}[],=":
            raise self.error("expected a value")
        return self.take()

    def parse(self) -> list[tuple[str, list[tuple[str, str | list[str]]]]]:
        items = []
        if self.peek() is None:
            raise self.error("empty pipeline")
        while True:
            name = self.atom()
            opts: list[tuple[str, str | list[str]]] = []
            if self.peek() == "{":
                self.take()
                if self.peek() != "}":
                    while True:
                        key = self.atom()
                        self.expect("=")
                        if self.peek() == "[":
                            self.take()
                            vals = [] if self.peek() == "]" else [self.atom()]
                            while self.peek() == ",":
                                self.take()
                                vals.append(self.atom())
                            self.expect("]")
                            opts.append((key, vals))
                        else:
                            opts.append((key, self.atom()))
                        if self.peek() != ",":
                            break
                        self.take()
                self.expect("}")
            items.append((name, opts))
            if self.peek() is None:
                return items
            self.expect(",")


@dataclass(frozen=True)
class Pipeline:
    passes: tuple[GraphPass, ...]

    @classmethod
    def parse(cls, text: "str | Pipeline") -> "Pipeline":
        if isinstance(text, Pipeline):
            return text
        if not isinstance(text, str):
            raise PipelineError(f"a pipeline is text like 'fold,fuse', got {type(text).__name__}")
        if text.strip() == "none":  # spelled out: "" is more likely a mistake than a wish
            return cls(())
        if text.strip() == "default":
            text = DEFAULT_PIPELINE
        passes = []
        for name, opts in _Parser(text).parse():
            pass_cls = get_pass(name)
            declared = {o.name: o for o in pass_cls.options()}
            kwargs: dict[str, Any] = {}
            for key, raw in opts:
                if key not in declared:
                    valid = ", ".join(declared) or "(none)"
                    raise PipelineError(f"pass {name!r} has no option {key!r}; valid options: {valid}")
                if key in kwargs:
                    raise PipelineError(f"pass {name!r}: option {key!r} given twice")
                kwargs[key] = coerce_option(name, declared[key], raw)
            p = pass_cls(**kwargs)
            object.__setattr__(p, "_spelled", tuple(kwargs))
            passes.append(p)
        return cls(tuple(passes))

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes) if self.passes else "none"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __len__(self) -> int:
        return len(self.passes)

    def run(self, graph: Graph, instruments: Sequence["Instrument"] = (), *, copy: bool = True) -> Graph:
        """Run every pass over (a copy of) ``graph``; returns the optimized graph."""
        return PassManager(self, instruments).run(graph, copy=copy)


class Instrument:
    """Hooks around every pass; subclasses override what they need."""

    def before_pipeline(self, pipeline: Pipeline, graph: Graph) -> None: ...
    def before_pass(self, index: int, p: GraphPass, graph: Graph) -> None: ...
    def after_pass(self, index: int, p: GraphPass, graph: Graph, result: PassResult, seconds: float) -> None: ...
    def on_failure(self, index: int, p: GraphPass, graph: Graph, error: BaseException) -> None: ...
    def after_pipeline(self, graph: Graph) -> None: ...


@dataclass
class PassRecord:
    name: str
    text: str
    seconds: float
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)


class PassManager:
    def __init__(self, pipeline: Pipeline, instruments: Iterable[Instrument] = ()):
        self.pipeline = pipeline
        self.instruments = list(instruments)
        self.records: list[PassRecord] = []

    def run(self, graph: Graph, *, copy: bool = True) -> Graph:
        g = graph.copy() if copy else graph
        for ins in self.instruments:
            ins.before_pipeline(self.pipeline, g)
        for index, p in enumerate(self.pipeline.passes):
            for ins in self.instruments:
                ins.before_pass(index, p, g)
            start = time.perf_counter()
            try:
                result = p.run(g)
                if result.changed:
                    g.recompile()
                g.check()
            except Exception as e:
                for ins in self.instruments:
                    ins.on_failure(index, p, g, e)
                err = self._blame(index, p, e)
                if err is e:
                    raise
                raise err from e
            seconds = time.perf_counter() - start
            g.history.append(str(p))
            self.records.append(PassRecord(p.name, str(p), seconds, result.changed, dict(result.stats)))
            for ins in self.instruments:
                ins.after_pass(index, p, g, result, seconds)
        for ins in self.instruments:
            ins.after_pipeline(g)
        g.annotations.setdefault("pass_records", []).extend(
            {"pass": r.text, "seconds": r.seconds, "changed": r.changed, "stats": r.stats} for r in self.records)
        return g

    def _blame(self, index: int, p: GraphPass, e: BaseException) -> GraphoptError:
        done = ",".join(str(q) for q in self.pipeline.passes[:index]) or "nothing"
        where = f"pass {p.name!r} (after {done}) in pipeline {str(self.pipeline)!r}"
        if isinstance(e, GraphoptError):
            e.add_note(f"while running {where}")
            return e
        return PassError(f"{where} failed: {type(e).__name__}: {e}")
