"""``quantize``: static/dynamic int8 (QDQ) or fp16/bf16 for conv, linear and matmul.

    quantize{mode=int8,calib=entropy,skip=[fc2],max_error=0.02}

* ``int8``: static. Activation ranges come from calibration (``node.meta["qrange"]``, set
  by ``graphopt.calibrate`` or, when missing or made by another method, by calibrating on
  ``graph.annotations["calibration_data"]``, which ``calibration_data=`` of
  ``graphopt.optimize``/``compile`` fills). Weights: int8, symmetric, per output channel
  unless ``per_channel=false``. Activations: asymmetric unless ``symmetric=true``.
* ``dynamic``: int8 weights; activation scales computed per batch at run time (symmetric).
* ``fp16`` / ``bf16``: the op and its weights in half precision, casts around it.
* ``int4``: weight-only, for linear (matmul by a constant weight, 1x1 conv over a 1x1 image):
  weights packed two per byte with one scale per ``group`` input features, activations float
  (int4.py); other convs stay float, with the reason in the build log.
* ``skip``: layers kept in float, by module path (``layer1.0.conv1``) or node name; globs
  allowed (``layer4.*``).
* ``max_error``: accuracy budget (relative L2 output error vs float on the calibration
  data, see sensitivity.py); the most sensitive layers stay float until it is met. The
  sensitivity table is left in ``graph.annotations["quantize_sensitivity"]`` and logged.
* ``fallback``: for ``int8``/``dynamic``, when the build target is known
  (``graph.annotations["target"]``), layers the target has no integer kernel for that beats
  float stay in float (fallback.py says which and why).

``graph.annotations["quantize"]`` records the layers quantized, the layers kept in float and,
in ``float_why``, the reason for each; the pass logs that list at INFO.

The graph after the pass still runs in eager PyTorch (the fake-quant reference); the TVM
backend turns every QDQ-wrapped op into integer kernels (targets/frontend/quantized.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, Optional

from graphopt.errors import PassError
from graphopt.graph import Graph
from graphopt.passes.quantize.calibration import calibrate, calibration_batches
from graphopt.passes.quantize.fallback import float_layers
from graphopt.passes.quantize.observers import METHODS
from graphopt.passes.quantize.insert_qdq import QuantOp, apply_quantization, quantizable_ops
from graphopt.passes.quantize.int4 import GROUPS, apply_int4, int4_candidates
from graphopt.passes.quantize.sensitivity import choose_float_layers
from graphopt.passes_base import GraphPass, PassResult, option, register_pass

_log = logging.getLogger(__name__)

# Batches of calibration data the accuracy-aware search evaluates on (it runs the graph
# 2 + number-of-layers times; the rest of the data only calibrates).
_EVAL_BATCHES = 64


@register_pass
@dataclass(frozen=True)
class Quantize(GraphPass):
    """Quantize conv/linear/matmul to int8 (static or dynamic, as QDQ) or to fp16/bf16."""

    name: ClassVar[str] = "quantize"
    tolerance: ClassVar[str] = "int8"

    mode: str = option("int8", "int8 (static, calibrated), dynamic (int8 weights, run-time activation "
                       "scales), fp16, bf16 or int4 (weight-only, linear layers; int4.py)",
                       choices=("int8", "dynamic", "fp16", "bf16", "int4"))
    group: int = option(128, "int4: input features sharing one weight scale", choices=GROUPS)
    calib: str = option("minmax", "calibration method for static int8 activation ranges", choices=METHODS)
    per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)")
    symmetric: bool = option(False, "symmetric activations (zero point 0); weights are always symmetric")
    skip: tuple[str, ...] = option((), "layers kept in float: module paths or node names, globs allowed")
    max_error: Optional[float] = option(None, "accuracy budget: relative output error vs float on the "
                                        "calibration data; most sensitive layers stay float until met",
                                        range=(0.0, 10.0, "(]"))
    fallback: bool = option(True, "keep layers in float where the build target has no integer kernel "
                            "for them that beats float (int8 and dynamic modes)")

    def rung(self) -> str:
        """int8 and dynamic on the int8 rung; int4 weights on their own, looser one; fp16/bf16 on half."""
        return {"int4": "int4", "fp16": "half", "bf16": "half"}.get(self.mode, self.tolerance)

    def run(self, graph: Graph) -> PassResult:
        candidates = quantizable_ops(graph)
        no_int4: list[tuple[QuantOp, str]] = []
        if self.mode == "int4":
            candidates, no_int4 = int4_candidates(candidates)
        skipped = [op for op in candidates if any(op.matches(p) for p in self.skip)]
        self._check_skip_patterns(candidates)
        kept: list[tuple[QuantOp, str]] = [(op, "skip option") for op in skipped] + no_int4  # (op, why)
        ops = [op for op in candidates if op not in skipped]
        no_kernel = float_layers(graph, ops) if self.fallback and self.mode in ("int8", "dynamic") else {}
        kept += [(op, no_kernel[op.node.name]) for op in ops if op.node.name in no_kernel]
        ops = [op for op in ops if op.node.name not in no_kernel]
        stats = {"skipped": len(skipped), "no_int8_kernel": len(no_kernel)}
        if not ops:
            self._record(graph, [], kept)
            return PassResult(False, {"quantized": 0, **stats})
        if self.mode == "int4":  # weight-only: no calibration, no accuracy search
            n = apply_int4(graph, ops, self.group)
            self._record(graph, ops, kept)
            return PassResult(n > 0, {"quantized": n, **stats})
        data = graph.annotations.get("calibration_data")
        if self.mode == "int8":
            self._ensure_ranges(graph, ops, data)
        kept_nodes: list[str] = []  # most sensitive first
        if self.max_error is not None:
            kept_nodes = self._accuracy_aware(graph, ops, data)
            op_of = {op.node.name: op for op in ops}
            kept += [(op_of[n], f"accuracy (max_error={self.max_error:g})") for n in kept_nodes]
            ops = [op for op in ops if op.node.name not in kept_nodes]
        n = apply_quantization(graph, ops, self.mode, per_channel=self.per_channel, symmetric=self.symmetric)
        self._record(graph, ops, kept)
        return PassResult(n > 0, {"quantized": n, **stats, "kept_float": len(kept_nodes)})

    def _record(self, graph: Graph, quantized: list[QuantOp], kept: list[tuple[QuantOp, str]]) -> None:
        graph.annotations["quantize"] = {
            "mode": self.mode, "calib": self.calib if self.mode == "int8" else None,
            "quantized": [op.layer for op in quantized], "float": [op.layer for op, _ in kept],
            "float_why": [{"layer": op.layer, "node": op.node.name, "reason": why} for op, why in kept]}
        if kept:
            _log.info("quantize{mode=%s}: %d layers quantized, %d kept in float:\n%s", self.mode, len(quantized),
                      len(kept), "\n".join(f"  {op.layer} ({op.node.name}): {why}" for op, why in kept))

    def _check_skip_patterns(self, candidates: list[QuantOp]) -> None:
        for pattern in self.skip:
            if not any(op.matches(pattern) for op in candidates):
                layers = ", ".join(sorted({op.layer for op in candidates})) or "(none)"
                raise PassError(f"quantize: skip pattern {pattern!r} matches no quantizable layer; "
                                f"layers are: {layers}")

    def _ensure_ranges(self, graph: Graph, ops: list[QuantOp], data) -> None:
        acts = {a.name: a for op in ops for a in op.activations}
        have = all("qrange" in a.meta for a in acts.values())
        method = graph.annotations.get("calibration", {}).get("method")
        if data is not None and (not have or method != self.calib):
            calibrate(graph, data, self.calib, nodes=acts.values())
        elif not have:
            missing = next(a.name for a in acts.values() if "qrange" not in a.meta)
            raise PassError(f"quantize{{mode=int8}} needs activation ranges (node {missing!r} has none): "
                            "pass calibration_data= to graphopt.optimize/compile, call "
                            "graphopt.calibrate(graph, data) first, or use mode=dynamic")

    def _accuracy_aware(self, graph: Graph, ops: list[QuantOp], data) -> list[str]:
        batches = calibration_batches(graph, data) if data is not None else [graph.example_inputs]
        batches = batches[:_EVAL_BATCHES]
        wanted = {op.node.name for op in ops}
        # the copies the search makes must not deep-copy the calibration data each time
        saved = graph.annotations.pop("calibration_data", None)
        try:
            report = choose_float_layers(
                graph, ops, self.max_error,
                lambda g, sub: apply_quantization(g, [o for o in sub if o.node.name in wanted], self.mode,
                                                  per_channel=self.per_channel, symmetric=self.symmetric),
                batches)
        finally:
            if saved is not None:
                graph.annotations["calibration_data"] = saved
        table = report.table()
        graph.annotations["quantize_sensitivity"] = table
        # the same numbers as records, for reports (graphopt.explore plots them)
        graph.annotations["quant_sensitivity"] = [
            {"layer": report.layers[name] or name, "node": name, "error": float(err),
             "kept_float": name in report.kept_float}
            for name, err in sorted(report.sensitivity.items(), key=lambda kv: -kv[1])]
        graph.annotations["quantize_error"] = report.final_error
        _log.info("%s", table)
        if report.final_error > self.max_error:
            _log.warning("quantize: error %.4g still above max_error=%g with every layer in float",
                         report.final_error, self.max_error)
        return report.kept_float
