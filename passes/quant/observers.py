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

    def all_zero(self) -> bool:
        """Every value seen was zero (to 1e-12): nothing for a grid to represent."""
        return self.count > 0 and max(abs(self.lo), abs(self.hi)) <= 1e-12

    def qparams(self, qmin: int, qmax: int, symmetric: bool = False,
                bounds: tuple[float, float] | None = None) -> tuple[float, int]:
        """(scale, zero point) of the int8 grid over the calibrated range, or over `bounds`: the whole range of an
        op whose outputs are bounded (softmax's [0, 1]), which calibration may not have reached."""
        if self.count == 0:
            raise CalibrationError(f"no calibration batch reached '{self.where}': the data loader yielded nothing")
        lo, hi = bounds if bounds is not None else self.clip_range()
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # zero must be exact (padding, ReLU outputs)
        if hi - lo <= 1e-12 * max(1.0, abs(hi)):
            raise CalibrationError(f"calibration data reaching '{self.where}' is constant ({self.lo:g}); "
                                   "give varied data or exclude this layer")
        if symmetric:  # zero point 0, the range +-max|x| (qmin stays reachable for the clamp, unused)
            return max(hi, -lo) / qmax, 0
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


class EntropyObserver(Observer):
    """TensorRT-style KL calibration: among clipping ranges [lo*f, hi*f] (at least 256 histogram bins, so at least
    one bin per int8 level), choose the one whose int8 version Q of the clipped histogram P (the clipped-off mass
    piled on P's edge bins, not on Q's) has the least KL(P || Q). Q spreads each level's mass over the level's
    non-empty bins only; both are smoothed so empty bins do not give infinities. Exact zeros (ReLU outputs, padding)
    are counted apart and kept whole in both: zero is on the grid, so spreading that spike over a level's bins (which
    made KL prefer the narrowest range on every ReLU6 output) would charge the grid for an error it does not make."""

    needs_histogram = True
    levels = 256

    zeros = 0.0

    def observe_histogram(self, x: torch.Tensor) -> None:
        super().observe_histogram(x)
        self.zeros += float((x == 0).sum())  # exact zeros (ReLU, padding) stay exact on the grid: not smeared

    @staticmethod
    def _smooth(p: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
        zero = p == 0
        nz = int((~zero).sum())
        if nz == 0 or nz == p.numel():
            return p
        take = eps * int(zero.sum()) / nz
        return torch.where(zero, torch.full_like(p, eps), p - take)

    def clip_range(self) -> tuple[float, float]:
        hist = self.hist.double()
        width = (self.hi - self.lo) / self.bins
        zero_bin = (0.0 - min(self.lo, 0.0)) / width  # where 0 sits; the range shrinks towards it
        zb = min(int(zero_bin), self.bins - 1)
        hist[zb] -= self.zeros
        best, best_kl = (self.lo, self.hi), math.inf
        for n in range(self.levels, self.bins + 1, 16):
            f = n / self.bins
            b0 = int(round(zero_bin * (1 - f)))
            b1 = min(self.bins, b0 + n)
            sliced = hist[b0:b1]
            p = sliced.clone()
            p[0] += hist[:b0].sum()
            p[-1] += hist[b1:].sum()
            if p.sum() == 0:
                continue
            level = torch.arange(b1 - b0) * self.levels // (b1 - b0)  # each bin's int8 level
            nonzero = (sliced != 0).double()
            mass = torch.bincount(level, sliced, self.levels)
            count = torch.bincount(level, nonzero, self.levels)
            q = torch.where(nonzero > 0, mass[level] / count[level].clamp(min=1), 0.0)
            if b0 <= zb < b1:
                p[zb - b0] += self.zeros
                q[zb - b0] += self.zeros
            if q.sum() == 0:
                continue
            ps = self._smooth(p / p.sum())
            qs = self._smooth(q / q.sum())
            kl = float((ps * torch.log(ps / qs)).where(ps > 0, torch.zeros_like(ps)).sum())
            if kl < best_kl:
                best, best_kl = (self.lo + b0 * width, self.lo + b1 * width), kl
        return best


CALIBRATORS = {"minmax": MinMaxObserver, "percentile": PercentileObserver, "mse": MSEObserver,
               "entropy": EntropyObserver}
