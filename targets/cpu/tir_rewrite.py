"""Rewriting lowered TIR: the loops a schedule rule annotated (prefetch.py, transpose.py), small
allocations (stack_tiles.py)."""

from __future__ import annotations

from typing import Callable

from tvm import tirx


def const_int(expr) -> int | None:
    """The value of a constant integer expression, None for anything else."""
    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def rewrite_statements(stmt, rewrite: Callable[[object, Callable], object | None]):
    """``stmt`` with each statement ``s`` for which ``rewrite(s, visit)`` returns a replacement
    replaced by it (``visit`` rewrites a sub-statement, e.g. the body); ``None`` descends into
    ``s``. Returns ``stmt`` itself when nothing below it changed, so an unchanged function
    keeps its identity. Walks the node kinds of lowered CPU TIR."""
    def visit(s):
        replaced = rewrite(s, visit)
        if replaced is not None:
            return replaced
        if isinstance(s, tirx.SeqStmt):
            seq = [visit(x) for x in s.seq]
            return s if all(a.same_as(b) for a, b in zip(seq, s.seq)) else tirx.SeqStmt(seq)
        if isinstance(s, tirx.For):
            body = visit(s.body)
            if body.same_as(s.body):
                return s
            return tirx.For(s.loop_var, s.min, s.extent, s.kind, body, s.thread_binding, s.annotations)
        if isinstance(s, tirx.AttrStmt):
            body = visit(s.body)
            return s if body.same_as(s.body) else tirx.AttrStmt(s.node, s.attr_key, s.value, body)
        if isinstance(s, tirx.IfThenElse):
            then_case = visit(s.then_case)
            else_case = visit(s.else_case) if s.else_case is not None else None
            if then_case.same_as(s.then_case) and (else_case is None or else_case.same_as(s.else_case)):
                return s
            return tirx.IfThenElse(s.condition, then_case, else_case)
        if isinstance(s, tirx.While):
            body = visit(s.body)
            return s if body.same_as(s.body) else tirx.While(s.condition, body)
        return s

    return visit(stmt)


def rewrite_annotated_loops(stmt, key: str, rewrite: Callable[[tirx.For, object], object]):
    """``stmt`` with every loop annotated ``key`` replaced by ``rewrite(loop, body)``, where
    ``body`` is the loop's body already rewritten (rewrite_statements)."""
    def annotated_loop(s, visit):
        if isinstance(s, tirx.For) and key in s.annotations:
            return rewrite(s, visit(s.body))
        return None

    return rewrite_statements(stmt, annotated_loop)


def without_annotation(loop: tirx.For, key: str, body=None) -> tirx.For:
    """``loop`` (with ``body`` if given) minus its ``key`` annotation."""
    annotations = {k: v for k, v in loop.annotations.items() if k != key}
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, loop.body if body is None else body,
                    loop.thread_binding, annotations)
