"""Sparsity patterns and the keep-masks they give a weight.

Every pattern is laid over the weight's *matrix view*: ``(out_features, in_features)`` for a
linear, and for a convolution one ``(out_channels, in_channels / groups)`` matrix per kernel
tap (a 3x3 conv has 9), which is the GEMM a 1x1 conv or an im2col/NHWC conv computes. Along
``in`` lies the reduction a sparse kernel skips:

* ``unstructured``: any single weight may go;
* ``block`` ``RxC``: ``R`` output rows by ``C`` consecutive inputs go or stay together (``1x16``
  is one AVX-512 vector of one output row). Blocks at the matrix's right and bottom edges may be
  smaller; a block's score is the mean score of the weights it holds;
* ``N:M`` (``2:4``): of every ``M`` consecutive inputs of one output row, at most ``N`` are
  nonzero. The in-dimension must be a multiple of ``M``.

``unstructured`` and ``block`` remove the lowest-scoring share of *units* (weights or blocks);
``N:M`` keeps the ``N`` best of each group, so its sparsity is ``1 - N/M`` by construction.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graphopt.errors import PassOptionError

_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^(\d+)x(\d+)$")
DEFAULT_BLOCK = (1, 16)
MAX_GROUP = 64  # the largest M of an N:M pattern (packed indices of a group fit in 6 bits)


@dataclass(frozen=True)
class SparsityPattern:
    """``kind`` is ``unstructured``, ``n:m`` or ``block``; ``n``/``m`` and ``block`` say the rest."""

    kind: str
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (1, 1)

    @classmethod
    def parse(cls, pattern: str, block: str | None) -> "SparsityPattern":
        """From the pass options ``pattern`` and ``block``; PassOptionError when they are malformed."""
        if block is not None and pattern != "block":
            raise PassOptionError(f"sparsify: block={block} applies only to pattern=block (pattern is {pattern})")
        if pattern == "unstructured":
            return cls("unstructured")
        if pattern == "block":
            return cls("block", block=parse_block(block) if block is not None else DEFAULT_BLOCK)
        nm = _NM.match(pattern)
        if nm is None:
            raise PassOptionError(f"sparsify: pattern={pattern} is not one of unstructured, block or N:M "
                                  "(e.g. 2:4)")
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n < m <= MAX_GROUP:
            raise PassOptionError(f"sparsify: pattern={pattern} needs 0 < N < M <= {MAX_GROUP}")
        return cls("n:m", n=n, m=m)

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity an N:M pattern implies (None: the pattern takes any)."""
        return 1 - self.n / self.m if self.kind == "n:m" else None

    def describe(self) -> dict:
        """The pattern's part of a ``graph.annotations["sparsity"]`` entry."""
        if self.kind == "n:m":
            return {"pattern": "n:m", "n": self.n, "m": self.m}
        if self.kind == "block":
            return {"pattern": "block", "block": list(self.block)}
        return {"pattern": "unstructured"}

    def unfit_reason(self, weight: torch.Tensor) -> str | None:
        """Why this pattern cannot be laid over ``weight`` (None: it can)."""
        if self.kind == "n:m" and weight.shape[1] % self.m:
            return f"{weight.shape[1]} inputs per output are not a multiple of M={self.m}"
        return None


def parse_block(text: str) -> tuple[int, int]:
    match = _BLOCK.match(text)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise PassOptionError(f"sparsify: block={text} is not RxC with positive R and C (e.g. 1x16, 4x4)")
    return int(match.group(1)), int(match.group(2))


# ----------------------------------------------------------------------------- matrix view


def as_matrices(weight: torch.Tensor) -> torch.Tensor:
    """``(taps, out, in)``: one matrix for a linear, one per kernel tap for a conv."""
    if weight.dim() == 2:
        return weight.unsqueeze(0)
    out, inp = weight.shape[:2]
    return weight.reshape(out, inp, -1).permute(2, 0, 1)


def from_matrices(matrices: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`as_matrices` for a weight of ``shape``."""
    if len(shape) == 2:
        return matrices[0]
    return matrices.permute(1, 2, 0).reshape(shape)


# ----------------------------------------------------------------------------- units


def _block_sums(matrices: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``(taps, out, in)`` -> the flat sum over each ``RxC`` block (edge blocks zero-padded)."""
    r, c = block
    taps, out, inp = matrices.shape
    padded = F.pad(matrices, (0, -inp % c, 0, -out % r))
    return padded.reshape(taps, padded.shape[1] // r, r, padded.shape[2] // c, c).sum((2, 4)).flatten()


def unit_scores(pattern: SparsityPattern, scores: torch.Tensor) -> torch.Tensor:
    """One score per prunable unit of a weight, from the weight's per-weight ``scores``.

    ``unstructured``: the weights themselves; ``block``: the mean over each block's weights.
    """
    if pattern.kind == "unstructured":
        return scores.flatten().double()
    return _block_sums(as_matrices(scores).double(), pattern.block) / unit_sizes(pattern, scores.shape)


def unit_sizes(pattern: SparsityPattern, shape: torch.Size) -> torch.Tensor:
    """How many weights each unit holds (blocks at the right and bottom edges may hold fewer)."""
    ones = torch.ones(shape, dtype=torch.float64)
    if pattern.kind == "unstructured":
        return ones.flatten()
    return _block_sums(as_matrices(ones), pattern.block)


def units_to_mask(pattern: SparsityPattern, keep_units: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The per-weight keep-mask of ``shape`` from a flat keep flag per unit."""
    if pattern.kind == "unstructured":
        return keep_units.reshape(shape)
    r, c = pattern.block
    out, inp = shape[0], shape[1]
    taps = math.prod(shape[2:])
    blocks = keep_units.reshape(taps, -(-out // r), -(-inp // c))
    mats = blocks.repeat_interleave(r, 1).repeat_interleave(c, 2)[:, :out, :inp]
    return from_matrices(mats, shape)


def lowest_units(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Flat bool flags: True for the ``count`` lowest scores (ties broken by position)."""
    drop = torch.zeros(scores.numel(), dtype=torch.bool)
    if count > 0:
        drop[torch.argsort(scores.flatten(), stable=True)[:count]] = True
    return drop


def n_of_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` best of every ``m`` consecutive inputs of each output row, per kernel tap."""
    mats = as_matrices(scores)
    taps, out, inp = mats.shape
    groups = mats.reshape(taps, out, inp // m, m)
    order = torch.argsort(groups.double(), dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order[..., :n], True)
    return from_matrices(keep.reshape(taps, out, inp), scores.shape)
