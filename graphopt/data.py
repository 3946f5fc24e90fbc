"""User data checked against a graph's inputs: calibration and fine-tuning batches.

Each item of the data must give one tensor per graph input, of the graph's rank and dtype,
with the graph's sizes in every dimension but the batch (dimension 0 may have any size).
Ranges or gradients computed from the wrong tensors would change the model silently, so a
mismatch is a :class:`CalibrationError` naming the item. The one tolerated extra is a class
label: ``(x, label)`` pairs straight from a DataLoader for a single-input graph, the label
being an integer tensor or a Python number.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from graphopt.errors import CalibrationError
from graphopt.graph import Graph


def _is_label(value: Any) -> bool:
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()


def _input_tensors(graph: Graph, i: int, item: Any) -> tuple[torch.Tensor, ...]:
    specs = graph.input_specs
    names = ", ".join(s.name for s in specs)
    items = (item,) if isinstance(item, torch.Tensor) else tuple(item) if isinstance(item, (tuple, list)) else None
    if items is None:
        raise CalibrationError(f"calibration item {i}: expected a tensor or a tuple of {len(specs)} tensor(s) "
                               f"({names}), got {type(item).__name__}")
    if len(specs) == 1 and len(items) == 2 and _is_label(items[1]):
        items = items[:1]  # (x, label) from a DataLoader
    if len(items) != len(specs):
        raise CalibrationError(f"calibration item {i}: expected {len(specs)} tensor(s) ({names}), got {len(items)}")
    for spec, t in zip(specs, items):
        if not isinstance(t, torch.Tensor):
            raise CalibrationError(f"calibration item {i}, input {spec.name!r}: expected a tensor, "
                                   f"got {type(t).__name__}")
    return items


def check_calibration_data(graph: Graph, data: Iterable[Any]) -> list[tuple[torch.Tensor, ...]]:
    """Items of ``data`` as tuples of input tensors; CalibrationError on any mismatch."""
    if data is None:
        raise CalibrationError("calibration data is None; pass an iterable of input batches")
    if isinstance(data, torch.Tensor):
        data = [data]
    checked = []
    for i, item in enumerate(data):
        items = _input_tensors(graph, i, item)
        for spec, t in zip(graph.input_specs, items):
            want = tuple(spec.shape)
            if t.dim() != len(want):
                raise CalibrationError(f"calibration item {i}, input {spec.name!r}: expected rank {len(want)} "
                                       f"(shape {want}), got shape {tuple(t.shape)}")
            for d in range(1, len(want)):  # dimension 0 is the batch: any size (split later)
                if isinstance(want[d], int) and t.shape[d] != want[d]:
                    raise CalibrationError(f"calibration item {i}, input {spec.name!r}: expected shape "
                                           f"(batch, {', '.join(map(str, want[1:]))}), got {tuple(t.shape)} "
                                           f"(dimension {d} must be {want[d]})")
            if str(t.dtype).replace("torch.", "") != str(spec.dtype):
                raise CalibrationError(f"calibration item {i}, input {spec.name!r}: expected dtype {spec.dtype}, "
                                       f"got {str(t.dtype).replace('torch.', '')}")
        checked.append(items)
    if not checked:
        raise CalibrationError("calibration data is empty")
    return checked


def static_batch(graph: Graph) -> int | None:
    """The batch size baked into ``graph``'s inputs: the leading size every input shares. None
    when the batch is dynamic, or when the inputs' leading sizes differ (no dimension is a
    batch that data could be re-cut along)."""
    dims = [n.meta["val"].shape[0] for n in graph.input_nodes if n.meta["val"].dim()]
    if dims and all(isinstance(d, int) for d in dims) and len(set(dims)) == 1:
        return int(dims[0])
    return None


def exact_chunks(tensors: tuple[torch.Tensor, ...], size: int) -> list[tuple[tuple[torch.Tensor, ...], int]]:
    """``tensors`` (one batch, split along dimension 0) as chunks of exactly ``size`` rows.

    A graph captured with a static batch runs only that batch (export bakes it into reshapes),
    while users calibrate and train with whatever batch their DataLoader has. The last chunk
    is filled up with copies of its own first rows; each chunk comes with the number of real
    rows in it, so a loss can mask the copies out.
    """
    rows = tensors[0].shape[0]
    chunks = []
    for start in range(0, rows, size):
        real = min(size, rows - start)
        fill = torch.arange(size) % real + start
        chunks.append((tuple(t[fill] for t in tensors), real))
    return chunks
