"""fold-bn: removes every foldable batch norm; outputs equal within float rounding (rtol 1e-5 of output range)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import graphopt

TOL = dict(rtol=1e-5, atol=1e-5)


def bn_count(g):
    return sum(1 for n in g.graph.nodes if "batch_norm" in str(n.target))


def test_folds_conv_bn_with_and_without_bias(cnn_graph):
    g, model, x = cnn_graph
    assert bn_count(g) == 2
    out = graphopt.optimize(g, "fold-bn")
    assert bn_count(out) == 0
    assert out.stats().params < g.stats().params
    torch.testing.assert_close(out.run(x)[0], model(x), **TOL)


def test_folds_linear_bn1d_and_grouped_conv():
    torch.manual_seed(1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 3, groups=4, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 6)
            self.bn1 = nn.BatchNorm1d(6)
            for b in (self.bn, self.bn1):
                b.running_mean.uniform_(-1, 1)
                b.running_var.uniform_(0.3, 3)

        def forward(self, x):
            return self.bn1(self.fc(self.bn(self.dw(x)).mean((2, 3))))

    m = M().eval()
    x = torch.randn(3, 4, 9, 9)
    g = graphopt.trace(m, (x,))
    out = graphopt.optimize(g, "fold-bn")
    assert bn_count(out) == 0
    torch.testing.assert_close(out.run(x)[0], m(x), **TOL)


def test_leaves_bn_after_non_conv_and_says_why(caplog):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y, self.bn2(torch.relu(y))  # conv output shared; bn2 follows a relu

    m = M().eval()
    x = torch.randn(1, 3, 5, 5)
    g = graphopt.trace(m, (x,))
    with pytest.raises(graphopt.PassFailedError, match="other users besides the batch norm"):
        graphopt.optimize(g, "fold-bn", strict=True)
    out = graphopt.optimize(g, "fold-bn")
    assert bn_count(out) == 2
    rec = out.meta["history"][0]
    assert any("is not a conv or linear" in r for r in rec["stats"]["skipped"].values())
    for a, b in zip(out.run(x), m(x)):
        torch.testing.assert_close(a, b, **TOL)
