"""Calibrators: streaming statistics of a tensor over calibration batches (memory independent of their number),
and the (scale, zero_point) they choose for an affine int8 grid."""
from __future__ import annotations

import math

import torch

from graphopt.errors import GraphoptError


class CalibrationError(GraphoptError):
    """Calibration data that cannot give a scale (NaN/inf, constant, none); names the layer."""


class Observer:
    """Collects min/max in a first pass and, for histogram calibrators, a fixed-range histogram in a second."""

    bins = 2048
    needs_histogram = False

    def __init__(self, where: str):
        self.where = where
        self.lo = math.inf
        self.hi = -math.inf
        self.hist: torch.Tensor | None = None
        self.count = 0

    def observe_range(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise CalibrationError(f"calibration data reaching '{self.where}' contains NaN or inf; clean the data "
                                   "or exclude this layer (quantize{exclude=...})")
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += 1

    def observe_histogram(self, x: torch.Tensor) -> None:
        h = torch.histc(x.detach().float(), self.bins, self.lo, self.hi)
        self.hist = h if self.hist is None else self.hist + h

    def clip_range(self) -> tuple[float, float]:
        return self.lo, self.hi

    def qparams(self, qmin: int, qmax: int) -> tuple[float, int]:
        if self.count == 0:
            raise CalibrationError(f"no calibration batch reached '{self.where}': the data loader yielded nothing")
        lo, hi = self.clip_range()
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU outputs)
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            raise CalibrationError(f"calibration data reaching '{self.where}' is constant ({self.lo:g}); "
                                   "give varied data or exclude this layer")
        scale = (hi - lo) / (qmax - qmin)
        zero_point = int(round(qmin - lo / scale))
        return scale, max(qmin, min(qmax, zero_point))


class MinMaxObserver(Observer):
    pass


class PercentileObserver(Observer):
    """Clip to the given percentile of |values| seen (drops rare outliers)."""

    needs_histogram = True
    percentile = 99.99

    def clip_range(self) -> tuple[float, float]:
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        width = (self.hi - self.lo) / self.bins
        lo_bin = int(torch.searchsorted(cdf, torch.tensor((100 - self.percentile) / 100)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100)))
        return self.lo + lo_bin * width, self.lo + (hi_bin + 1) * width


class MSEObserver(Observer):
    """Choose the clipping range that minimizes the histogram's expected quantization + clipping error."""

    needs_histogram = True

    def clip_range(self) -> tuple[float, float]:
        centers = torch.linspace(self.lo, self.hi, self.bins + 1)[:-1] + (self.hi - self.lo) / self.bins / 2
        best, best_err = (self.lo, self.hi), math.inf
        for frac in torch.linspace(0.3, 1.0, 36).tolist():
            lo, hi = self.lo * frac, self.hi * frac
            step = (max(hi, 0) - min(lo, 0)) / 255 or 1.0
            q = torch.clamp(torch.round((centers - min(lo, 0)) / step), 0, 255) * step + min(lo, 0)
            err = float(((q - centers) ** 2 * self.hist).sum())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


CALIBRATORS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver}
