"""Recover accuracy after pruning: fine-tune a Graph, optionally distilling from a teacher.

    pruned = graphopt.optimize(model, x, "prune{ratio=0.5}")
    graphopt.finetune(pruned, (x_train, y_train), teacher=model, epochs=20, distill=True)

The graph is trained *in place*: its floating constants (get_attr tensors of ``graph.gm``,
stored frozen with ``requires_grad=False``) are made trainable for the run and frozen again
afterwards, so passes and backends see ordinary constants. BatchNorm running statistics are
left alone (the captured graph is in inference form: BN normalizes with them and dropout is
gone), which is what fine-tuning a pruned inference model wants.

Loss (Hinton et al. knowledge distillation): ``alpha * T^2 * KL(softmax(s/T) || softmax(t/T))
+ (1 - alpha) * cross_entropy(s, y)``; with ``distill=False`` or no teacher, plain
cross-entropy. A tqdm bar shows progress and the running loss.

Sparsity. The weights listed in ``graph.annotations["sparsity"]`` (the ``sparsify`` pass) keep
their zeros: their gradients are masked, so Adam's moments of a removed weight stay zero, and
the mask is applied again after every step, so the pattern (N:M, blocks) and the sparsity hold
exactly during and after training. ``sparsity_l1=c`` adds ``c * sum |w|`` over the weights of
every linear and convolution to each batch's loss: L1-regularized training that drives
weights towards zero, before ``sparsify`` removes them (or between two sparsity steps).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from tqdm.auto import tqdm

from graphopt.data import exact_chunks, static_batch
from graphopt.errors import InputError
from graphopt.graph import Graph
from graphopt.passes.utils import aten, is_op

_BN = (aten._native_batch_norm_legit_no_training, aten._native_batch_norm_legit, aten.batch_norm)
_MATMUL_WEIGHTED = (aten.linear, aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution)


def finetune(graph: Graph, data: Any, teacher: "torch.nn.Module | Graph | Callable | None" = None, *,
             epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, distill: bool = True,
             temperature: float = 4.0, alpha: float = 0.7, weight_decay: float = 0.0, seed: int = 0,
             sparsity_l1: float = 0.0, progress: bool = True) -> Graph:
    """Train ``graph`` on ``data`` (an ``(inputs, labels)`` pair of tensors or an iterable of
    such batches, e.g. a DataLoader, of any batch size) with Adam; returns the same graph,
    now trained."""
    if epochs < 1 or lr <= 0 or batch_size < 1:
        raise InputError(f"finetune: epochs, lr and batch_size must be positive (got {epochs}, {lr}, {batch_size})")
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise InputError(f"finetune: need 0 <= alpha <= 1 and temperature > 0 (got {alpha}, {temperature})")
    if sparsity_l1 < 0:
        raise InputError(f"finetune: sparsity_l1 must be >= 0 (got {sparsity_l1})")
    teacher_fn = _as_callable(teacher) if (distill and teacher is not None) else None
    params = trainable_constants(graph)
    masks = SparsityMasks(graph)
    l1_weights = matmul_weights(graph) if sparsity_l1 > 0 else []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    batches = _batches(data, batch_size, gen)
    size = static_batch(graph)
    try:
        for p in params:
            p.requires_grad_(True)
        total = epochs * len(batches(None)) if isinstance(data, tuple) else None
        with tqdm(total=total, desc=f"finetune {graph.name}", disable=not progress, leave=False) as bar:
            for _ in range(epochs):
                for x, y in batches(gen):
                    opt.zero_grad()
                    rows = x.shape[0]
                    # A static-batch graph runs chunks of its own batch; the gradients of the
                    # chunks add up to the gradient of the whole batch (padding rows masked out).
                    chunks = [((x, y), rows)] if size is None or rows == size else exact_chunks((x, y), size)
                    loss_sum = 0.0
                    for (cx, cy), real in chunks:
                        per_sample = _per_sample_loss(graph, cx, cy, teacher_fn, temperature, alpha)
                        loss = per_sample[:real].sum() / rows
                        loss.backward()
                        loss_sum += loss.item()
                    if l1_weights:
                        penalty = sparsity_l1 * sum(w.abs().sum() for w in l1_weights)
                        penalty.backward()
                        loss_sum += penalty.item()
                    masks.mask_gradients()
                    opt.step()
                    masks.apply()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_sum:.4f}")
    finally:
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        masks.apply()
    return graph


def _per_sample_loss(graph: Graph, x: torch.Tensor, y: torch.Tensor, teacher_fn: Callable | None,
                     temperature: float, alpha: float) -> torch.Tensor:
    out = graph.gm(x)
    student = out[0] if isinstance(out, (tuple, list)) else out
    loss = F.cross_entropy(student, y, reduction="none")
    if teacher_fn is not None:
        with torch.no_grad():
            soft = teacher_fn(x)
        kd = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(soft / temperature, -1),
                      reduction="none", log_target=True).sum(-1) * temperature ** 2
        loss = alpha * kd + (1 - alpha) * loss
    return loss


def trainable_constants(graph: Graph) -> list[torch.Tensor]:
    """Floating constants, minus BatchNorm running statistics (they are not learned)."""
    stats = {a.target for n in graph.nodes if is_op(n, *_BN)
             for a in n.args[3:5] if isinstance(a, fx.Node) and a.op == "get_attr"}
    seen: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        if n.op == "get_attr" and n.target not in stats and n.target not in seen:
            t = graph.constant(n)
            if t.is_floating_point():
                seen[n.target] = t
    return list(seen.values())


class SparsityMasks:
    """The zeros of the weights ``sparsify`` recorded, held at zero while a graph trains."""

    def __init__(self, graph: Graph):
        self.masks: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight, keep = nonzero at the start)
        for name in graph.annotations.get("sparsity", {}):
            weight = getattr(graph.gm, name, None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                self.masks.append((weight, weight.detach() != 0))

    def mask_gradients(self) -> None:
        for weight, keep in self.masks:
            if weight.grad is not None:
                weight.grad.mul_(keep)

    def apply(self) -> None:
        with torch.no_grad():
            for weight, keep in self.masks:
                weight.masked_fill_(~keep, 0.0)


def matmul_weights(graph: Graph) -> list[torch.Tensor]:
    """The constant floating weights of linear and convolution ops (what sparsity_l1 penalizes)."""
    weights: dict[str, torch.Tensor] = {}
    for n in graph.call_nodes():
        if is_op(n, *_MATMUL_WEIGHTED) and len(n.args) > 1 and graph.is_constant(n.args[1]):
            t = graph.constant(n.args[1])
            if t.is_floating_point():
                weights[n.args[1].target] = t
    return list(weights.values())


def _as_callable(teacher: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    call = teacher.gm if isinstance(teacher, Graph) else teacher

    def run(x: torch.Tensor) -> torch.Tensor:
        out = call(x)
        return out[0] if isinstance(out, (tuple, list)) else torch.as_tensor(out)

    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
    return run


def _batches(data: Any, batch_size: int, gen: torch.Generator) -> Callable[[Any], list]:
    """A function epoch -> list of (x, y) batches; shuffles tensor data every epoch."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        x, y = data
        if len(x) != len(y):
            raise InputError(f"finetune: {len(x)} inputs but {len(y)} labels")

        def epoch(g: torch.Generator | None) -> list:
            order = torch.randperm(len(x), generator=g) if g is not None else torch.arange(len(x))
            return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]]) for i in range(0, len(x), batch_size)]

        return epoch
    if isinstance(data, Iterable):
        return lambda g: list(data)
    raise InputError(f"finetune: data must be (inputs, labels) tensors or an iterable of batches, "
                     f"got {type(data).__name__}")
