"""``sparsify``: zero out the least important weights of linear and conv layers.

    sparsify{sparsity=0.9,pattern=block,block=1x16}
    sparsify{pattern=2:4}
    sparsify{sparsity=0.8,scope=global,criterion=taylor,exclude=[fc2,layer4.*]}

Unlike ``prune``, nothing is cut out: the tensors keep their shapes and the removed weights
become exact zeros (+0.0) in the graph's constants. That is the whole contract with the
backend, which reads the block or N:M structure off the values and picks a sparse kernel or
the dense one per layer. The zeros are also the masks: ``graphopt.finetune`` keeps every
zero of a weight listed in ``graph.annotations["sparsity"]`` at zero.

* ``pattern``: ``unstructured``, ``block`` (``block=RxC``, default ``1x16``) or ``N:M``
  (``2:4``), laid over each weight's matrix view (masks.py);
* ``sparsity``: the fraction of units (weights, or blocks) to zero, default 0.5. N:M fixes it
  at ``1 - N/M``: a different value is an error;
* ``scope=layer`` zeroes that fraction of every layer; ``scope=global`` ranks the units of
  all layers together by raw score (global magnitude pruning: layers with small weights lose
  more) and never empties a layer (its best unit stays). N:M is per group, so layer-only;
* ``criterion``: ``magnitude`` or ``taylor`` (needs ``calibration_data=``), selection.py;
* ``exclude``: layers left dense, by module path, node name or weight name; globs allowed.
  A pattern that matches no layer is an error.

Depthwise and transposed convolutions, weights shared with other ops (tied embeddings) and,
for N:M, weights whose input count is not a multiple of M stay dense, each with its reason.

Recorded in ``graph.annotations`` (and logged):

* ``"sparsity"``: ``{weight_name: entry}``, ``weight_name`` the constant's name (get_attr
  target), ``entry`` = ``{"layer": "fc1", "op": "linear" | "conv", "pattern": "unstructured"
  | "block" | "n:m", "block": [R, C] (block only), "n": N, "m": M (n:m only), "sparsity":
  fraction of the weight's elements that are zero, "criterion": "magnitude" | "taylor"}``.
  Patterns are over the matrix view of masks.py: ``(out, in)`` of a linear, ``(out_channels,
  in_channels / groups)`` of every kernel tap of a conv;
* ``"sparsity_skipped"``: ``[{"weight", "layer", "reason"}]`` for the linear/conv weights left dense.

``sparsity=0`` leaves the graph untouched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from graphopt.errors import PassError, PassOptionError
from graphopt.graph import Graph
from graphopt.passes.sparsify.masks import (SparsityPattern, lowest_units, n_of_m_mask, unit_scores,
                                            units_to_mask)
from graphopt.passes.sparsify.selection import CRITERIA, SparseWeight, sparsifiable_weights, weight_scores
from graphopt.passes_base import GraphPass, PassResult, option, register_pass

log = logging.getLogger(__name__)

DEFAULT_SPARSITY = 0.5


@register_pass
@dataclass(frozen=True)
class Sparsify(GraphPass):
    """Zero the least important weights of linear/conv layers: unstructured, RxC blocks or N:M."""

    name: ClassVar[str] = "sparsify"
    tolerance: ClassVar[str] = "lossy"

    sparsity: Optional[float] = option(None, "fraction of the weights (or blocks) to zero; default 0.5, "
                                       "1-N/M for N:M", range=(0.0, 1.0, "[)"))
    pattern: str = option("unstructured", "unstructured, block (see block) or N:M, e.g. 2:4 (at most N nonzeros "
                          "in every M consecutive inputs of an output)")
    block: Optional[str] = option(None, "pattern=block: RxC blocks of R outputs by C inputs (default 1x16)")
    scope: str = option("layer", "the sparsity holds per layer, or over all layers together",
                        choices=("layer", "global"))
    criterion: str = option("magnitude", "weight importance: |w| or Taylor |w * dL/dw|", choices=CRITERIA)
    exclude: tuple[str, ...] = option((), "layers left dense: module paths, node or weight names, globs allowed")

    def __post_init__(self) -> None:
        super().__post_init__()
        fixed = self.sparsity_pattern.fixed_sparsity
        if fixed is not None and self.sparsity is not None and not math.isclose(self.sparsity, fixed):
            raise PassOptionError(f"sparsify: pattern={self.pattern} zeroes {fixed:g} of the weights; "
                                  f"sparsity={self.sparsity:g} contradicts it (leave sparsity out)")
        if fixed is not None and self.scope == "global":
            raise PassOptionError(f"sparsify: pattern={self.pattern} keeps N of every M weights of every layer; "
                                  "scope=global does not apply")

    @property
    def sparsity_pattern(self) -> SparsityPattern:
        return SparsityPattern.parse(self.pattern, self.block)

    @property
    def target_sparsity(self) -> float:
        fixed = self.sparsity_pattern.fixed_sparsity
        return fixed if fixed is not None else self.sparsity if self.sparsity is not None else DEFAULT_SPARSITY

    def run(self, graph: Graph) -> PassResult:
        if self.target_sparsity == 0:
            return PassResult(False, {"layers": 0})
        data = graph.annotations.get("calibration_data")
        if self.criterion == "taylor" and data is None:
            raise PassOptionError("sparsify: criterion=taylor needs calibration batches; pass "
                                  "calibration_data=... to graphopt.optimize/compile")
        pattern = self.sparsity_pattern
        weights, skipped = sparsifiable_weights(graph)
        self._check_exclude(weights)
        chosen = []
        for w in weights:
            why = "excluded" if any(w.matches(p) for p in self.exclude) else \
                pattern.unfit_reason(getattr(graph.gm, w.name))
            if why:
                skipped.append({"weight": w.name, "layer": w.layer, "reason": why})
            else:
                chosen.append(w)
        scores = weight_scores(graph, chosen, self.criterion, data)
        masks = self._masks(chosen, scores, pattern)
        entries, zeros, total = {}, 0, 0
        for w in chosen:
            sparse = getattr(graph.gm, w.name).detach().masked_fill(~masks[w.name], 0.0)
            graph.set_constant(w.nodes[0].args[1], sparse)
            layer_zeros = int((sparse == 0).sum())
            zeros, total = zeros + layer_zeros, total + sparse.numel()
            entries[w.name] = {"layer": w.layer, "op": w.op, **pattern.describe(),
                               "sparsity": round(layer_zeros / sparse.numel(), 6), "criterion": self.criterion}
        graph.annotations.setdefault("sparsity", {}).update(entries)
        graph.annotations["sparsity_skipped"] = skipped
        log.info("%s:\n%s", self, format_report(entries, skipped))
        return PassResult(bool(chosen), {"layers": len(chosen), "layers_skipped": len(skipped), "zeros": zeros,
                                         "weights": total})

    def _check_exclude(self, weights: list[SparseWeight]) -> None:
        for pattern in self.exclude:
            if not any(w.matches(pattern) for w in weights):
                layers = ", ".join(sorted({w.layer for w in weights})) or "(none)"
                raise PassError(f"sparsify: exclude pattern {pattern!r} matches no sparsifiable layer; "
                                f"layers are: {layers}")

    def _masks(self, weights: list[SparseWeight], scores: dict[str, torch.Tensor],
               pattern: SparsityPattern) -> dict[str, torch.Tensor]:
        """Keep-masks (True = stays) of the weights' shapes."""
        if pattern.kind == "n:m":
            return {w.name: n_of_m_mask(scores[w.name], pattern.n, pattern.m) for w in weights}
        units = {w.name: unit_scores(pattern, scores[w.name]) for w in weights}
        if self.scope == "layer":
            drop = {name: lowest_units(u, round(self.target_sparsity * u.numel())) for name, u in units.items()}
        else:
            everything = torch.cat(list(units.values())) if units else torch.zeros(0)
            flat = lowest_units(everything, round(self.target_sparsity * everything.numel()))
            drop = dict(zip(units, flat.split([u.numel() for u in units.values()])))
            for name, d in drop.items():
                if bool(d.all()):  # never empty a layer: its best unit stays
                    d[torch.argmax(units[name])] = False
        return {w.name: units_to_mask(pattern, ~drop[w.name], scores[w.name].shape) for w in weights}


def format_report(entries: dict[str, dict], skipped: list[dict[str, str]]) -> str:
    """The ``graph.annotations["sparsity"]`` and ``["sparsity_skipped"]`` records as a table."""
    lines = [f"{'weight':<28} {'layer':<20} {'pattern':<14} {'sparsity':>8}"]
    for name, e in entries.items():
        lines.append(f"{name:<28} {e['layer']:<20} {pattern_text(e):<14} {e['sparsity']:>8.1%}")
    lines += [f"{s['weight']:<28} {s['layer']:<20} {'dense':<14} {'':>8}  ({s['reason']})" for s in skipped]
    return "\n".join(lines)


def pattern_text(entry: dict) -> str:
    """``unstructured``, ``block 1x16`` or ``2:4`` for a ``graph.annotations["sparsity"]`` entry."""
    if entry["pattern"] == "block":
        return "block " + "x".join(map(str, entry["block"]))
    if entry["pattern"] == "n:m":
        return f"{entry['n']}:{entry['m']}"
    return entry["pattern"]
