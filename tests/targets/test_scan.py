"""cumsum / cumprod along an axis with whole vectors of values behind it run graphopt's chunked scan kernel
(targets/tvm/cpu/scan.py); the rest keep the generic converter."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.lower import lower_to_relax


class _Scan(torch.nn.Module):
    def __init__(self, dim, product=False):
        super().__init__()
        self.dim, self.product = dim, product

    def forward(self, x):
        return (torch.cumprod if self.product else torch.cumsum)(x, self.dim) * 2.0


class _LinearAttention(torch.nn.Module):
    """Causal linear attention (elu + 1 features): running sums of k v^T over the tokens."""
    def forward(self, q, k, v):
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
        z = 1 / (torch.einsum("btd,btd->bt", q, torch.cumsum(k, 1)) + 1e-6)
        return torch.einsum("btd,btde->bte", q, kv) * z[..., None]


def _run(model, *xs):
    g = graphopt.trace(model.eval(), xs)
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(x.numpy()) for x in xs))
    return names, (got if hasattr(got, "numpy") else got[0]).numpy()


@pytest.mark.parametrize("shape,dim,product,kernel", [
    ((2, 40, 16, 16), 1, False, "cumsum_2x40x256"),
    ((3, 20, 24), -2, False, "cumsum_3x20x24"),  # 24 values behind the axis: three 8-float vectors (or a 16 + 8)
    ((5, 64), 0, False, "cumsum_1x5x64"),
    ((4, 30, 16), 1, True, "cumprod_4x30x16"),
    ((3, 20, 24), -1, False, None),  # along the last axis: one value behind it, the generic scan
    ((3, 20, 12), 1, False, None),  # 12 values: not whole vectors
])
def test_cumsum_and_cumprod_run_the_chunked_scan(shape, dim, product, kernel):
    """Same values as torch (which accumulates in float64: within a few float32 ulps of the largest), NaN
    propagated down the axis, -0.0 + 0 = 0 as PyTorch's running sum from 0."""
    torch.manual_seed(0)
    x = (torch.rand(shape) * 0.5 + 0.75) if product else torch.randn(shape)
    x.view(-1)[5] = float("nan")
    x.view(-1)[9] = -0.0
    names, got = _run(_Scan(dim, product), x)
    ref = _Scan(dim, product)(x).numpy()
    if kernel is None:
        assert not any(n.startswith(("cumsum_", "cumprod_")) for n in names), names
    else:
        assert kernel in names, names
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=0, atol=2e-6 * np.abs(ref[ok]).max())


def test_causal_linear_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 48, 16), torch.randn(2, 48, 16), torch.randn(2, 48, 16)
    names, got = _run(_LinearAttention(), q, k, v)
    assert "cumsum_2x48x256" in names and "cumsum_2x48x16" in names, names
    np.testing.assert_allclose(got, _LinearAttention()(q, k, v).numpy(), rtol=1e-4, atol=1e-5)


class _LogCumSumExp(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.logcumsumexp(x, self.dim)


@pytest.mark.parametrize("shape,dim,kernel", [
    ((2, 2048, 32), 1, "logcumsumexp_2x2048x32"),  # minGRU's log-space scan; 2048^2 pairs were refused
    ((3, 300), 1, "logcumsumexp_1x300x"),  # along the last axis: the rows go behind it, padded to vectors
    ((5, 7, 3), 0, "logcumsumexp_1x5x"),
])
def test_logcumsumexp_runs_the_running_maximum_scan(shape, dim, kernel):
    """Within float32 rounding of float64 torch at values spread over +-30 (the sum rescaled at each new maximum:
    no overflow, no underflow); -inf prefixes stay -inf, +inf stays +inf, a NaN propagates down the axis."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 30
    flat = x.movedim(dim, 0).reshape(shape[dim], -1)  # a view: writes land in x
    flat[:3, 0] = float("-inf")
    flat[4, 1] = float("inf")
    flat[2, 2] = float("nan")
    names, got = _run(_LogCumSumExp(dim), x)
    assert any(n.startswith(kernel) for n in names), names
    ref = torch.logcumsumexp(x.double(), dim).float().numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    ok = np.isfinite(ref)
    assert np.isfinite(got[ok]).all()
    np.testing.assert_allclose(got[ok], ref[ok], rtol=2e-7, atol=2e-6)
