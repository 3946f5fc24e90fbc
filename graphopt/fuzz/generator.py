"""Random, valid-by-construction models for differential testing (in the spirit of NNSmith).

A model is described by a :class:`GraphSpec`: input shapes, a list of :class:`Op` records
and the values returned. Every value has a known shape, and an op is only ever chosen for
inputs it accepts (a conv for a 4-d value, a split for an even dimension, a concat for two
values that agree off the concat axis...), so every generated model runs in eager PyTorch
and captures with ``torch.export``: nothing is generated and then thrown away.

The spec is plain data: ``repr(spec)`` is Python that rebuilds it, and it fully determines
the model — each op carries its own weight seed and each input's data is seeded by the
spec seed and the input's value id. That is what makes failures reproducible and what lets
the minimizer (``minimize.py``) delete ops or turn an op's result into a fresh input
without disturbing the rest of the graph.

The op mix deliberately includes what our passes look for: conv+BatchNorm (fold-bn),
eval-mode dropout, ``x * 1`` and same-shape reshapes (noop), the same op applied twice
to one value (cse), arithmetic on buffers alone (fold-const) and values built from no
input at all (``arange`` ramps and masks, as transformers build them: no kernel may hold them).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from graphopt.fuzz.op_catalog import BINARY, INPUT_FREE, NOOPS, UNARY, FuzzModel

# Values larger than this (elements) are not created: fuzz graphs stay fast to build and run.
MAX_ELEMENTS = 2048


@dataclass(frozen=True)
class Op:
    """One generated operation: ``outputs = kind(inputs, **params)`` over value ids."""

    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Op({self.kind!r}, {self.inputs!r}, {self.outputs!r}, {self.params!r})"


@dataclass
class GraphSpec:
    """A random model as data: ``build()`` makes the nn.Module, ``example_inputs()`` its inputs."""

    seed: int
    inputs: dict[int, tuple[int, ...]]  # value id -> shape of a model input
    ops: list[Op]
    outputs: list[int]
    shapes: dict[int, tuple[int, ...]]  # value id -> shape, for every value

    def __repr__(self) -> str:
        ops = "".join(f"\n        {op!r}," for op in self.ops)
        return (f"GraphSpec(seed={self.seed}, inputs={self.inputs!r}, ops=[{ops}\n    ],"
                f"\n    outputs={self.outputs!r}, shapes={self.shapes!r})")

    def build(self) -> FuzzModel:
        return FuzzModel(self).eval()

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        out = []
        for vid, shape in self.inputs.items():
            g = torch.Generator().manual_seed(self.seed * 1009 + vid)
            out.append(torch.randn(shape, generator=g))
        return tuple(out)

    def describe(self) -> str:
        """One line per op, e.g. ``v3 = conv2d(v1) {k: 3, ...}  # [1, 4, 6, 6]``."""
        lines = ["inputs: " + ", ".join(f"v{v}{list(s)}" for v, s in self.inputs.items())]
        for op in self.ops:
            outs = ", ".join(f"v{o}" for o in op.outputs)
            ins = ", ".join(f"v{i}" for i in op.inputs)
            params = {k: v for k, v in op.params.items() if k != "wseed"}
            shapes = ", ".join(str(list(self.shapes[o])) for o in op.outputs)
            lines.append(f"{outs} = {op.kind}({ins}) {params if params else ''}  # {shapes}")
        lines.append("return " + ", ".join(f"v{o}" for o in self.outputs))
        return "\n".join(lines)

    def with_ops(self, ops: list[Op], outputs: list[int], inputs: dict[int, tuple[int, ...]]) -> "GraphSpec":
        """A copy with other ops/outputs/inputs; ops nothing returned depends on are dropped."""
        needed = set(outputs)
        kept: list[Op] = []
        for op in reversed(ops):
            if needed.intersection(op.outputs):
                kept.append(op)
                needed.update(op.inputs)
        kept.reverse()
        used_inputs = {v: s for v, s in inputs.items() if v in needed}
        live = needed | {o for op in kept for o in op.outputs}
        shapes = {v: s for v, s in self.shapes.items() if v in live}
        return GraphSpec(self.seed, used_inputs, kept, list(outputs), shapes)


# ------------------------------------------------------------------------ the generator
def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


class _Builder:
    def __init__(self, seed: int, max_ops: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.max_ops = max_ops
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.inputs: dict[int, tuple[int, ...]] = {}
        self.ops: list[Op] = []
        self.consumed: set[int] = set()

    def new_value(self, shape: tuple[int, ...]) -> int:
        vid = len(self.shapes)
        self.shapes[vid] = tuple(int(d) for d in shape)
        return vid

    def add(self, kind: str, inputs: tuple[int, ...], out_shapes: list[tuple[int, ...]], **params: Any) -> int | None:
        """Record an op; returns its first output's id, or None when a result would be too big."""
        if any(_numel(s) > MAX_ELEMENTS or min(s) < 1 for s in out_shapes):
            return None
        outs = tuple(self.new_value(s) for s in out_shapes)
        self.ops.append(Op(kind, inputs, outs, params))
        self.consumed.update(inputs)
        return outs[0]

    def wseed(self) -> int:
        return self.rng.randrange(2**31)

    def pick(self, pred: Callable[[tuple[int, ...]], bool] = lambda s: True) -> int | None:
        """A value satisfying ``pred``: usually the newest (deep graphs), sometimes any (branches)."""
        cands = [v for v, s in self.shapes.items() if pred(s)]
        if not cands:
            return None
        unconsumed = [v for v in cands if v not in self.consumed]
        if unconsumed and self.rng.random() < 0.7:
            return unconsumed[-1] if self.rng.random() < 0.7 else self.rng.choice(unconsumed)
        return self.rng.choice(cands)

    def random_input_shape(self) -> tuple[int, ...]:
        r, b = self.rng, self.rng.choice((1, 1, 2))
        rank = r.choice((2, 3, 4, 4))
        if rank == 4:
            return (b, r.randint(1, 6), r.randint(1, 8), r.randint(1, 8))
        if rank == 3:
            return (b, r.randint(1, 6), r.choice((2, 4, 6, 8, 12)))
        return (b, r.randint(1, 24))

    def build(self) -> GraphSpec:
        for _ in range(self.rng.choice((1, 1, 1, 2))):
            shape = self.random_input_shape()
            self.inputs[self.new_value(shape)] = shape
        target = self.rng.randint(2, self.max_ops)
        attempts = 0
        while len(self.ops) < target and attempts < 20 * self.max_ops:
            attempts += 1
            self.step()
        leaves = [v for v in self.shapes if v not in self.consumed and v not in self.inputs]
        outputs = leaves[-4:] or [len(self.shapes) - 1]
        if not self.ops:  # every attempt failed (tiny shapes): one op is always possible
            v = next(iter(self.inputs))
            outputs = [self.add("relu", (v,), [self.shapes[v]])]
        spec = GraphSpec(self.seed, dict(self.inputs), list(self.ops), outputs, dict(self.shapes))
        return spec.with_ops(spec.ops, spec.outputs, spec.inputs)

    # one random op, chosen by weight among the families
    def step(self) -> None:
        r = self.rng
        family = r.choices(
            ["conv", "pool", "bn", "linear", "matmul", "unary", "binary", "concat", "split", "reshape",
             "norm", "softmax", "attention", "reduce", "noop", "cse", "const", "input_free"],
            weights=[10, 4, 3, 8, 4, 10, 8, 4, 3, 6, 3, 3, 3, 3, 4, 2, 2, 2])[0]
        getattr(self, f"gen_{family}")()

    def gen_conv(self) -> None:
        r = self.rng
        v = self.pick(lambda s: len(s) == 4)
        if v is None:
            return self.gen_reshape()
        n, c, h, w = self.shapes[v]
        k = r.choice((1, 3, 3, 5))
        stride, pad = r.choice((1, 1, 2)), r.choice((0, k // 2))
        ho, wo = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        if ho < 1 or wo < 1:
            k, stride, pad, ho, wo = 1, 1, 0, h, w
        style = r.choice(("dense", "dense", "depthwise", "grouped"))
        if style == "depthwise":
            groups, cout = c, c * r.choice((1, 1, 2))
        elif style == "grouped" and c % 2 == 0:
            groups, cout = 2, 2 * r.randint(1, 4)
        else:
            groups, cout = 1, r.randint(1, 8)
        out = self.add("conv2d", (v,), [(n, cout, ho, wo)], cout=cout, k=k, stride=stride, pad=pad,
                       groups=groups, bias=r.random() < 0.7, wseed=self.wseed())
        if out is not None and len(self.ops) < self.max_ops and r.random() < 0.5:  # conv -> BN: what fold-bn is for
            self.add("batchnorm", (out,), [(n, cout, ho, wo)], wseed=self.wseed())

    def gen_bn(self) -> None:
        v = self.pick(lambda s: len(s) == 4)
        if v is not None:
            self.add("batchnorm", (v,), [self.shapes[v]], wseed=self.wseed())

    def gen_pool(self) -> None:
        r = self.rng
        v = self.pick(lambda s: len(s) == 4 and s[2] >= 2 and s[3] >= 2)
        if v is None:
            return self.gen_unary()
        n, c, h, w = self.shapes[v]
        kind = r.choice(("maxpool", "avgpool", "adaptive_avgpool", "global_mean"))
        if kind == "global_mean":
            return self.add(kind, (v,), [(n, c)])
        if kind == "adaptive_avgpool":
            size = r.choice((1, 2))
            return self.add(kind, (v,), [(n, c, size, size)], size=size)
        k = min(r.choice((2, 3)), h, w)
        stride, pad = r.choice((1, 2)), r.choice((0, k // 2))
        self.add(kind, (v,), [(n, c, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)],
                 k=k, stride=stride, pad=pad)

    def gen_linear(self) -> None:
        v = self.pick(lambda s: len(s) in (2, 3))
        if v is None:
            return self.gen_reshape()
        out = self.rng.choice((1, 4, 8, 12, 16))
        self.add("linear", (v,), [self.shapes[v][:-1] + (out,)], out=out, bias=self.rng.random() < 0.8,
                 wseed=self.wseed())

    def gen_matmul(self) -> None:
        v = self.pick(lambda s: len(s) == 3)
        if v is None:
            return self.gen_linear()
        s = self.shapes[v]
        if self.rng.random() < 0.5:
            other = [u for u, t in self.shapes.items() if t == s]
            u = self.rng.choice(other)
            self.add("matmul_self", (v, u), [s[:-1] + (s[1],)])
        else:
            n = self.rng.choice((2, 4, 8))
            self.add("matmul_weight", (v,), [s[:-1] + (n,)], n=n, wseed=self.wseed())

    def gen_unary(self) -> None:
        v = self.pick()
        kind = self.rng.choice(UNARY + ("scale",))
        if kind == "scale":
            return self.add(kind, (v,), [self.shapes[v]], c=self.rng.choice((0.5, 2.0, -1.5)))
        self.add(kind, (v,), [self.shapes[v]])

    def gen_binary(self) -> None:
        r = self.rng
        v = self.pick()
        s = self.shapes[v]
        same = [u for u, t in self.shapes.items() if t == s and u != v]
        if same and r.random() < 0.8:  # residual connection / two branches meeting
            u = r.choice(same)
            kind = r.choice(BINARY + ("safe_div",))
            return self.add(kind, (u, v) if r.random() < 0.5 else (v, u), [s])
        self.add("bias_add", (v,), [s], wseed=self.wseed())

    def gen_concat(self) -> None:
        r = self.rng
        v = self.pick(lambda s: len(s) >= 2)
        if v is None:
            return self.gen_unary()
        s = self.shapes[v]
        dim = r.randrange(1, len(s))
        fits = [u for u, t in self.shapes.items()
                if len(t) == len(s) and all(a == b for i, (a, b) in enumerate(zip(t, s)) if i != dim)]
        u = r.choice(fits)  # includes v itself: concat with itself is valid too
        out = list(s)
        out[dim] = s[dim] + self.shapes[u][dim]
        self.add("concat", (v, u), [tuple(out)], dim=dim)

    def gen_split(self) -> None:
        v = self.pick(lambda s: any(d >= 2 for d in s[1:]))
        if v is None:
            return self.gen_unary()
        s = self.shapes[v]
        dim = self.rng.choice([i for i in range(1, len(s)) if s[i] >= 2])
        first = self.rng.randint(1, s[dim] - 1)
        sizes = [first, s[dim] - first]
        outs = []
        for size in sizes:
            t = list(s)
            t[dim] = size
            outs.append(tuple(t))
        self.add("split", (v,), outs, sizes=sizes, dim=dim)

    def gen_reshape(self) -> None:
        r = self.rng
        v = self.pick()
        s = self.shapes[v]
        n, rest = s[0], _numel(s[1:])
        choice = r.choice(("flatten", "reshape", "permute", "transpose"))
        if choice == "flatten" and len(s) >= 3:
            start = r.choice((1, 2)) if len(s) == 4 else 1
            return self.add("flatten", (v,), [s[:start] + (_numel(s[start:]),)], start=start)
        if choice == "permute" and len(s) >= 3:
            tail = list(range(1, len(s)))
            r.shuffle(tail)
            dims = [0] + tail
            return self.add("permute", (v,), [tuple(s[d] for d in dims)], dims=dims)
        if choice == "transpose" and len(s) >= 2:
            return self.add("transpose", (v,), [s[:-2] + (s[-1], s[-2])])
        # reshape into another rank: 2-d, 3-d or 4-d with the same element count
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        rank = r.choice((2, 3, 4))
        if rank == 2:
            shape = (n, rest)
        elif rank == 3:
            a = r.choice(divisors)
            shape = (n, a, rest // a)
        else:
            a = r.choice(divisors)
            sub = [d for d in range(1, rest // a + 1) if (rest // a) % d == 0]
            b = r.choice(sub)
            shape = (n, a, b, rest // a // b)
        if shape != s:
            self.add("reshape", (v,), [shape], shape=list(shape))

    def gen_norm(self) -> None:
        v = self.pick(lambda s: len(s) in (2, 3) and s[-1] >= 2)
        if v is None:
            return self.gen_bn()
        self.add("layernorm", (v,), [self.shapes[v]], wseed=self.wseed())

    def gen_softmax(self) -> None:
        v = self.pick(lambda s: len(s) >= 2)
        if v is None:
            return self.gen_unary()
        s = self.shapes[v]
        self.add("softmax", (v,), [s], dim=self.rng.randrange(1, len(s)))

    def gen_attention(self) -> None:
        v = self.pick(lambda s: len(s) == 3)
        if v is None:
            return self.gen_reshape()
        s = self.shapes[v]
        if self.rng.random() < 0.3:
            return self.add("sdpa", (v,), [s], causal=self.rng.random() < 0.3,
                            scale=self.rng.choice((None, 0.3)))
        heads = self.rng.choice([h for h in (1, 2, 4) if s[-1] % h == 0])
        self.add("attention", (v,), [s], heads=heads, causal=self.rng.random() < 0.3, wseed=self.wseed())

    def gen_reduce(self) -> None:
        v = self.pick(lambda s: len(s) >= 2)
        if v is None:
            return self.gen_unary()
        s = self.shapes[v]
        dim, keep = self.rng.randrange(1, len(s)), self.rng.random() < 0.5
        out = tuple(1 if i == dim else d for i, d in enumerate(s)) if keep else s[:dim] + s[dim + 1:]
        self.add("reduce", (v,), [out], dim=dim, keepdim=keep, how=self.rng.choice(("mean", "sum")))

    def gen_noop(self) -> None:
        v = self.pick()
        self.add(self.rng.choice(NOOPS), (v,), [self.shapes[v]])

    def gen_cse(self) -> None:
        v = self.pick()
        self.add("twice", (v,), [self.shapes[v]], fn=self.rng.choice(("relu", "tanh", "sigmoid")))

    def gen_const(self) -> None:
        v = self.pick()
        self.add("const_expr", (v,), [self.shapes[v]], wseed=self.wseed())

    def gen_input_free(self) -> None:
        r = self.rng
        kind = r.choice(INPUT_FREE)
        if kind == "masked_sdpa":
            v = self.pick(lambda s: len(s) == 3)
            if v is None:
                kind = "arange_add"
            else:
                return self.add(kind, (v,), [self.shapes[v]], ahead=r.choice((0, 1, 2)))
        v = self.pick()
        s = self.shapes[v]
        if kind == "arange_add":
            return self.add(kind, (v,), [s], c=r.choice((0.5, -0.25)))
        self.add(kind, (v,), [s], start=r.randrange(s[-1]))


def generate(seed: int, max_ops: int = 10) -> GraphSpec:
    """The random model for ``seed``: same seed, same spec, same weights, same inputs."""
    return _Builder(seed, max_ops).build()
