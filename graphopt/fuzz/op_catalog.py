"""Running a GraphSpec: the op vocabulary of the fuzzer as PyTorch code.

``FuzzModel`` builds one layer per op that has weights (seeded by the op's ``wseed``, so
a spec always gives the same weights) and interprets the op list in ``forward``. The
vocabulary: ``UNARY`` and ``BINARY`` elementwise ops, layers (conv2d incl. grouped and
depthwise, batchnorm, linear, layernorm, multi-head attention), matmuls, pooling,
reductions, softmax, concat/split, reshape/flatten/permute/transpose, and patterns the
passes look for (eval dropout and other no-ops, the same op twice, buffer-only arithmetic),
and ``INPUT_FREE`` values computed from no tensor's values (``arange``, fills of ``x.new_zeros``),
as transformers build position ids and attention masks: the backend computes those while it builds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from graphopt.fuzz.generator import GraphSpec, Op

UNARY = ("relu", "gelu", "sigmoid", "tanh", "silu", "hardswish", "leaky_relu", "elu", "relu6", "neg", "abs")
BINARY = ("add", "sub", "mul", "maximum", "minimum")
NOOPS = ("dropout", "mul_one", "add_zero", "same_reshape", "contiguous")
# Ops mixing ``x`` with a value built from ``arange`` alone (a ramp, a mask, a banded
# attention mask) or from ``x``'s shape alone (regions filled into ``x.new_zeros``, as swin
# builds its window mask): computed from no input's values, they never belong in a kernel.
INPUT_FREE = ("arange_add", "arange_where", "masked_sdpa", "fill_mask")


class FuzzModel(torch.nn.Module):
    """Runs a GraphSpec. Layers are built once, with weights seeded per op."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        self.layers = torch.nn.ModuleDict()
        for index, op in enumerate(spec.ops):
            layer = _make_layer(op, spec.shapes)
            if layer is not None:
                self.layers[f"op{index}"] = layer

    def forward(self, *xs: torch.Tensor):
        env: dict[int, torch.Tensor] = dict(zip(self.spec.inputs, xs))
        for index, op in enumerate(self.spec.ops):
            layer = self.layers[f"op{index}"] if f"op{index}" in self.layers else None
            results = _apply(op, [env[i] for i in op.inputs], layer)
            env.update(zip(op.outputs, results))
        return tuple(env[o] for o in self.spec.outputs)


class _Holder(torch.nn.Module):
    """Buffers for ops that need constants but are not standard layers."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for k, t in tensors.items():
            self.register_buffer(k, t)


def _make_layer(op: Op, shapes: dict[int, tuple[int, ...]]) -> torch.nn.Module | None:
    p = op.params
    if "wseed" not in p:
        return None
    x = shapes[op.inputs[0]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["wseed"])
        if op.kind == "conv2d":
            return torch.nn.Conv2d(x[1], p["cout"], p["k"], stride=p["stride"], padding=p["pad"],
                                   groups=p["groups"], bias=p["bias"])
        if op.kind == "batchnorm":
            bn = torch.nn.BatchNorm2d(x[1])
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
            return bn
        if op.kind == "linear":
            return torch.nn.Linear(x[-1], p["out"], bias=p["bias"])
        if op.kind == "layernorm":
            ln = torch.nn.LayerNorm(x[-1])
            with torch.no_grad():
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-0.5, 0.5)
            return ln
        if op.kind == "attention":
            d = x[-1]
            return torch.nn.ModuleDict({"q": torch.nn.Linear(d, d), "k": torch.nn.Linear(d, d),
                                        "v": torch.nn.Linear(d, d), "o": torch.nn.Linear(d, d)})
        if op.kind == "matmul_weight":
            return _Holder(w=torch.randn(x[-1], p["n"]) / math.sqrt(x[-1]))
        if op.kind == "bias_add":
            return _Holder(b=torch.randn(x[-1]))
        if op.kind == "const_expr":
            return _Holder(c=torch.randn(x[-1]))
    raise ValueError(f"op {op.kind} has a weight seed but no layer")  # generator bug


def _apply(op: Op, xs: list[torch.Tensor], layer: Any) -> tuple[torch.Tensor, ...]:
    k, p, x = op.kind, op.params, xs[0]
    if k in UNARY:
        fn: Callable = {"relu": torch.relu, "gelu": F.gelu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
                        "silu": F.silu, "hardswish": F.hardswish, "leaky_relu": F.leaky_relu, "elu": F.elu,
                        "relu6": F.relu6, "neg": torch.neg, "abs": torch.abs}[k]
        return (fn(x),)
    if k in BINARY:
        fn = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "maximum": torch.maximum,
              "minimum": torch.minimum}[k]
        return (fn(x, xs[1]),)
    if k == "scale":
        return (x * p["c"],)
    if k == "safe_div":  # division whose denominator is >= 1 in magnitude
        return (x / (xs[1].abs() + 1.0),)
    if k in ("conv2d", "batchnorm", "linear", "layernorm"):
        return (layer(x),)
    if k == "attention":
        b, s, d = x.shape
        h = p["heads"]

        def heads(t):
            return t.reshape(b, s, h, d // h).transpose(1, 2)

        q, kk, v = heads(layer["q"](x)), heads(layer["k"](x)), heads(layer["v"](x))
        a = F.scaled_dot_product_attention(q, kk, v, is_causal=p["causal"])
        return (layer["o"](a.transpose(1, 2).reshape(b, s, d)),)
    if k == "sdpa":  # attention straight on one 3-d value, single head
        return (F.scaled_dot_product_attention(x, x, x, is_causal=p.get("causal", False), scale=p.get("scale")),)
    if k == "matmul_self":
        return (torch.matmul(x, xs[1].transpose(-1, -2)),)
    if k == "matmul_weight":
        return (torch.matmul(x, layer.w),)
    if k == "bias_add":
        return (x + layer.b,)
    if k == "const_expr":  # buffer-only arithmetic: fold-const turns it into one constant
        return (x + (layer.c * 2.0 + 1.0),)
    if k == "arange_add":  # a position ramp along the last dim
        return (x + torch.arange(x.shape[-1], dtype=x.dtype) * p["c"],)
    if k == "arange_where":  # a mask over the last dim from a comparison of arange
        return (torch.where(torch.arange(x.shape[-1]) >= p["start"], x, x * 0.5),)
    if k == "fill_mask":  # regions numbered by in-place fills, then a mask used twice (its own kernel)
        regions = x.new_zeros(x.shape[-1])
        regions[p["start"]:] = 1.0
        mask = (regions * 2.0 - 1.0).abs() * -100.0
        return (x * (mask + 1.0) + mask,)
    if k == "masked_sdpa":  # single-head attention under a banded boolean mask, as HF builds one
        b, s = x.shape[0], x.shape[1]
        pos = torch.arange(s)
        band = (pos[None, :] <= pos[:, None] + p["ahead"]).unsqueeze(0).unsqueeze(0).expand(b, 1, s, s)
        q = x.unsqueeze(1)
        return (F.scaled_dot_product_attention(q, q, q, attn_mask=band).squeeze(1),)
    if k == "maxpool":
        return (F.max_pool2d(x, p["k"], p["stride"], p["pad"]),)
    if k == "avgpool":
        return (F.avg_pool2d(x, p["k"], p["stride"], p["pad"]),)
    if k == "adaptive_avgpool":
        return (F.adaptive_avg_pool2d(x, p["size"]),)
    if k == "global_mean":
        return (x.mean(dim=(2, 3)),)
    if k == "reduce":
        fn = torch.mean if p["how"] == "mean" else torch.sum
        return (fn(x, dim=p["dim"], keepdim=p["keepdim"]),)
    if k == "softmax":
        return (torch.softmax(x, dim=p["dim"]),)
    if k == "concat":
        return (torch.cat(xs, dim=p["dim"]),)
    if k == "split":
        return tuple(torch.split(x, p["sizes"], dim=p["dim"]))
    if k == "flatten":
        return (torch.flatten(x, p["start"]),)
    if k == "reshape":
        return (x.reshape(p["shape"]),)
    if k == "permute":
        return (x.permute(p["dims"]),)
    if k == "transpose":
        return (x.transpose(-1, -2),)
    if k == "twice":  # the same op on the same value twice: cse merges them
        fn = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[p["fn"]]
        return (fn(x) + fn(x),)
    if k == "dropout":
        return (F.dropout(x, 0.5, training=False),)
    if k == "mul_one":
        return (x * 1,)
    if k == "add_zero":
        return (x + 0,)
    if k == "same_reshape":
        return (x.reshape(x.shape),)
    if k == "contiguous":
        return (x.contiguous(),)
    raise ValueError(f"unknown fuzz op {k!r}")  # generator bug
