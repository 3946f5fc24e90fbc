"""Which layers stay in float on the build target, and why.

An int8 layer only pays where the target has an integer kernel for it: the integer lowering
(targets/frontend/quantized.py) turns every QDQ-wrapped op into an int8 x int8 -> int32
product, and the CPU build packs that product for a dot-product instruction
(targets/cpu/schedules/int8.py: ``vpdpbusd`` zmm or ymm, AVX2 ``vpmaddubsw``, AArch64 ``sdot``) only when

* the op is a conv2d with ``groups=1`` or a matmul/linear against a constant 2-D weight,
* every shape is static (the kernel's packing loops are sized at build time),
* the layer is big enough: below :data:`MIN_INT8_MACS` multiply-accumulates the quantize step
  and the activation packing in front of the kernel cost more than the integer product saves
  (benchmarks/quantize_zoo.py on an AVX512-VNNI host: BERT-small's linears, 65K-131K MACs each,
  ran the model at 0.64x of float; resnet18 at 64x64, 0.5M-9.6M MACs per layer, at 2.9x;
  with ``--target x86-avx2`` a 451K-MAC conv broke even),
* on AVX2 (:data:`FLOAT_KINDS_BY_DOT`), the layer is a conv: the exact ``vpmaddubsw`` kernel
  ran linears of 0.26M-2.1M MACs 1.07-1.19x slower than float, convs where float's tiles are
  weak (7x7 maps) up to 10x faster.

Any other int8 product is scheduled like a float kernel that multiplies one byte pair per
instruction, plus the quantize/dequantize traffic around it: slower than the float layer it
replaces. A target without any of those instructions (SSE-only x86, NEON without dotprod)
runs every int8 layer that way. So the ``quantize`` pass, when it
knows the build target (``graphopt.compile`` and ``graphopt.optimize(..., target=)`` record
it in ``graph.annotations["target"]``), keeps such layers in float and says why. Without a
target the pass quantizes every candidate: the QDQ graph is then the target-neutral
fake-quant reference and every op still lowers (to the generic integer form).

On CUDA the integer product of a grouped conv does not build (dlight's reduction rule rejects
it), so grouped convs stay float there too; every other op has a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from graphopt.graph import Graph
from graphopt.passes.quantize.insert_qdq import QuantOp


# Multiply-accumulates below which a layer stays float (see the module docstring).
MIN_INT8_MACS = 1 << 18
# Op kinds that stay float whatever their size, per int8 instruction (see the module docstring).
FLOAT_KINDS_BY_DOT = {"avx2": ("linear", "matmul")}


@dataclass(frozen=True)
class IntegerTarget:
    """What the build target offers int8 layers."""

    name: str  # the target's name, for the messages
    kind: str  # "llvm" or "cuda"
    dot: str | None  # the CPU int8 kernels' instruction ("vnni", "avx-vnni", "avx2", "sdot"), if any
    isa: str = ""  # the vector ISA, in words (CPU targets)


def integer_target(target: Any) -> IntegerTarget | None:
    """The IntegerTarget of a target (preset name, TVM target dict or TargetSpec), None for None."""
    if target is None:
        return None
    from graphopt.targets.registry import resolve_target

    spec = resolve_target(target)
    if not spec.is_cpu:
        return IntegerTarget(spec.name, spec.kind, None)
    from graphopt.targets.cpu.schedules.int8 import dot_instruction

    tvm_target = spec.tvm_target()
    return IntegerTarget(spec.name, "llvm", dot_instruction(tvm_target), str(spec.isa))


def _shape_is_static(node: Any) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and all(isinstance(d, int) for d in val.shape)


def _groups(op: QuantOp) -> int:
    args = op.node.args
    return int(args[6]) if len(args) > 6 else int(op.node.kwargs.get("groups", 1))


def float_reason(op: QuantOp, target: IntegerTarget) -> str | None:
    """Why ``op`` stays in float on ``target`` (None: it has an integer kernel that pays)."""
    groups = _groups(op) if op.kind == "conv" else 1
    if target.kind == "cuda":
        return f"grouped conv (groups={groups}): no int8 kernel on CUDA" if groups != 1 else None
    if target.dot is None:
        return f"no int8 dot-product kernel for {target.isa}: float is faster"
    if groups != 1:
        channels = op.node.args[1].meta["val"].shape[0]
        what = "depthwise conv" if groups == channels else f"grouped conv (groups={groups})"
        return f"{what}: the int8 kernel takes groups=1 only"
    if op.weight_index is None:
        return "matmul of two activations: no int8 kernel"
    if not all(_shape_is_static(n) for n in (op.node, *op.activations)):
        return "dynamic shape: the int8 kernel is sized at build time"
    if op.kind in FLOAT_KINDS_BY_DOT.get(target.dot, ()):
        return f"{op.kind} on {target.dot}: the int8 kernel measured slower than float"
    macs = multiply_accumulates(op)
    if macs < MIN_INT8_MACS:
        return f"small layer: {macs} MACs < {MIN_INT8_MACS}, quantizing and packing cost more than int8 saves"
    return None


def multiply_accumulates(op: QuantOp) -> int:
    """Multiply-accumulates of one call of ``op`` (static shapes)."""
    out = op.node.meta["val"]
    if op.kind == "conv":
        w = op.node.args[1].meta["val"].shape  # [F, C / groups, kh, kw]
        return out.numel() * int(w[1]) * int(w[2]) * int(w[3])
    k = op.activations[0].meta["val"].shape[-1]
    return out.numel() * int(k)


def float_layers(graph: Graph, ops: list[QuantOp]) -> dict[str, str]:
    """``{node name: reason}`` of the ops the recorded build target runs faster in float."""
    target = integer_target(graph.annotations.get("target"))
    if target is None:
        return {}
    reasons = {op.node.name: float_reason(op, target) for op in ops}
    return {name: why for name, why in reasons.items() if why is not None}
