"""Calibration: run the float graph on sample data and record activation ranges.

``calibrate(graph, data, method)`` runs ``graph`` eagerly on every batch of ``data`` with
an fx Interpreter, feeds the value of each observed node to its observer
(observers.py) and stores the result on the node as ``node.meta["qrange"] = (lo, hi)``,
which the IR printer shows as ``# range [lo, hi]``. The observed nodes default to the
activation inputs of every quantizable op (qdq.quantizable_ops), which is all the
``quantize`` pass needs.

Data items are a tensor or a tuple/list of the graph inputs (``(x, label)`` pairs from a
DataLoader work for a single-input graph; graphopt.data.check_calibration_data), of any
batch size. A graph captured with a static batch cannot run another batch (export bakes
the batch into reshapes), so the samples are re-cut into batches of the captured size.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx

from graphopt.data import check_calibration_data, exact_chunks, static_batch
from graphopt.graph import Graph
from graphopt.passes.quantize.observers import Observer, make_observer


def calibration_batches(graph: Graph, data: Iterable[Any]) -> list[tuple[torch.Tensor, ...]]:
    """Normalize ``data`` into a list of input tuples that fit ``graph``'s input specs.

    Items may have any batch size. For a graph captured with a static batch the samples of all
    items are concatenated and cut into batches of that size; the last one is filled up with
    samples from its own start (a repeated sample changes no min/max range, and shifts a
    histogram by at most one batch's worth of duplicates).
    """
    # tuples of exactly the graph's inputs (count, rank, shape, dtype checked: CalibrationError)
    items = check_calibration_data(graph, data)
    size = static_batch(graph)
    batched = all(t.dim() for t in items[0])
    if size is not None and batched and any(t.shape[0] != size for it in items for t in it):
        stream = tuple(torch.cat([it[k] for it in items]) for k in range(len(items[0])))
        items = [chunk for chunk, _real in exact_chunks(stream, size)]
    for b in items:
        graph.validate_inputs(b)
    return items


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, observers: dict[str, Observer]):
        super().__init__(gm)
        self.observers = observers

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        obs = self.observers.get(n.name)
        if obs is not None and isinstance(out, torch.Tensor) and out.is_floating_point():
            obs.observe(out)
        return out


def calibrate(graph: Graph, data: Iterable[Any], method: str = "minmax", nodes: Iterable[fx.Node] | None = None,
              progress: bool = True) -> dict[str, tuple[float, float]]:
    """Observe ``nodes`` (default: activations feeding quantizable ops) over ``data``.

    Sets ``node.meta["qrange"]`` on each observed node and returns ``{node name: (lo, hi)}``.
    """
    from tqdm.auto import tqdm

    from graphopt.passes.quantize.insert_qdq import quantizable_ops

    batches = calibration_batches(graph, data)
    if nodes is None:
        targets: dict[str, fx.Node] = {}
        for op in quantizable_ops(graph):
            for a in op.activations:
                targets[a.name] = a
        nodes = targets.values()
    nodes = list(nodes)
    observers = {n.name: make_observer(method) for n in nodes}
    recorder = _Recorder(graph.gm, observers)
    with torch.no_grad():
        for batch in tqdm(batches, desc=f"calibrating ({method})", unit="batch", disable=not progress,
                          leave=False):
            recorder.run(*batch)
    ranges = {}
    for n in nodes:
        lo, hi = observers[n.name].range()
        n.meta["qrange"] = (lo, hi)
        ranges[n.name] = (lo, hi)
    graph.annotations["calibration"] = {"method": method, "batches": len(batches)}
    return ranges
