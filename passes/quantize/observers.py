"""Range observers: what calibration learns about each activation tensor.

An observer sees every calibration batch of one tensor and answers ``range() -> (lo, hi)``,
the float interval that int8 will cover. Four methods, as in TensorRT and
pytorch-quantization:

* ``minmax``: the extreme values seen. Exact for bounded tensors, wasteful when a few
  outliers stretch the range (every other value then gets fewer levels);
* ``percentile``: clip |x| at the 99.99th percentile of the values seen;
* ``entropy``: TensorRT's KL-divergence calibration: the clipping threshold whose 128-level
  quantized histogram diverges least from the observed one;
* ``mse``: the threshold minimizing the expected squared quantization error (clipping +
  rounding), estimated on the histogram.

The three clipping methods work on a histogram of |x| (2048 bins) whose range grows with
the data: when a batch exceeds it, the old counts are re-binned into the wider range, so
memory stays constant however much data passes. They choose a symmetric threshold ``t``;
the range is then ``(max(min_seen, -t), min(max_seen, t))``, which keeps a post-ReLU
tensor at ``(0, t)`` and lets asymmetric quantization use all 256 levels.
"""

from __future__ import annotations

import math

import torch

METHODS = ("minmax", "percentile", "entropy", "mse")
_BINS = 2048
_PERCENTILE = 99.99


class Observer:
    """Running min/max of a tensor; subclasses add a histogram and a smarter threshold."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def range(self) -> tuple[float, float]:
        if not self.seen:
            return (0.0, 0.0)
        return (min(self.lo, 0.0), max(self.hi, 0.0))  # zero must be exactly representable


class HistogramObserver(Observer):
    """min/max plus a histogram of |x| over a growing [0, amax] range."""

    def __init__(self) -> None:
        super().__init__()
        self.hist = torch.zeros(_BINS, dtype=torch.float64)
        self.amax = 0.0

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        a = x.detach().abs().flatten().double()
        if a.numel() == 0:
            return
        amax = float(a.max())
        if amax > self.amax:
            self._widen(amax)
        if self.amax > 0:
            self.hist += torch.histc(a, bins=_BINS, min=0.0, max=self.amax)

    def _widen(self, amax: float) -> None:
        """Re-bin the counts so far into [0, amax]: each old bin goes to the new bin holding its center."""
        if self.amax > 0 and self.hist.sum() > 0:
            centers = (torch.arange(_BINS, dtype=torch.float64) + 0.5) * (self.amax / _BINS)
            idx = (centers / amax * _BINS).long().clamp(max=_BINS - 1)
            new = torch.zeros_like(self.hist)
            new.index_add_(0, idx, self.hist)
            self.hist = new
        self.amax = amax

    def threshold(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def range(self) -> tuple[float, float]:
        if not self.seen or self.amax == 0:
            return super().range()
        t = self.threshold()
        return (min(max(self.lo, -t), 0.0), max(min(self.hi, t), 0.0))


class PercentileObserver(HistogramObserver):
    def threshold(self) -> float:
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        i = int(torch.searchsorted(cdf, torch.tensor(_PERCENTILE / 100, dtype=torch.float64)))
        return (min(i, _BINS - 1) + 1) * self.amax / _BINS


class EntropyObserver(HistogramObserver):
    """TensorRT's calibration: minimize KL(P || Q) over thresholds of 128..2048 bins."""

    levels = 128

    def threshold(self) -> float:
        hist = self.hist
        best_i, best_kl = _BINS, math.inf
        for i in range(self.levels, _BINS + 1, 16):
            p = hist[:i].clone()
            p[i - 1] += hist[i:].sum()  # outliers clip into the last bin
            if p.sum() == 0:
                continue
            # Q: the first i bins merged into `levels` groups, each group's mass spread
            # evenly over its non-empty bins.
            chunks = torch.tensor_split(hist[:i], self.levels)
            q = torch.cat([_spread(c) for c in chunks])
            kl = _kl(p / p.sum(), q / max(float(q.sum()), 1e-12))
            if kl < best_kl:
                best_i, best_kl = i, kl
        return best_i * self.amax / _BINS


def _spread(chunk: torch.Tensor) -> torch.Tensor:
    nonzero = chunk > 0
    n = int(nonzero.sum())
    if n == 0:
        return torch.zeros_like(chunk)
    return torch.where(nonzero, chunk.sum() / n, torch.zeros_like(chunk))


def _kl(p: torch.Tensor, q: torch.Tensor) -> float:
    mask = p > 0
    q = q[mask].clamp(min=1e-12)
    return float((p[mask] * torch.log(p[mask] / q)).sum())


class MSEObserver(HistogramObserver):
    """Threshold minimizing expected squared error of symmetric int8 quantization."""

    def threshold(self) -> float:
        width = self.amax / _BINS
        centers = (torch.arange(_BINS, dtype=torch.float64) + 0.5) * width
        best_t, best_err = self.amax, math.inf
        for frac in torch.linspace(0.05, 1.0, 96).tolist():
            t = frac * self.amax
            step = t / 127
            inside = centers <= t
            # rounding noise step^2/12 for values inside, squared clipping error outside
            err = float((self.hist[inside]).sum()) * step * step / 12
            err += float((self.hist[~inside] * (centers[~inside] - t) ** 2).sum())
            if err < best_err:
                best_t, best_err = t, err
        return best_t


def make_observer(method: str) -> Observer:
    """A fresh observer for ``method`` (one of METHODS)."""
    classes = {"minmax": Observer, "percentile": PercentileObserver, "entropy": EntropyObserver,
               "mse": MSEObserver}
    if method not in classes:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    return classes[method]()
