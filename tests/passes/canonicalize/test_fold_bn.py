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


def test_constants_added_per_output_channel_become_the_bias():
    """A conv or linear followed by the add of a constant per output channel (one value, [C], [1, C, 1, 1]; either
    operand order), as ONNX files that write the bias as an Add import: the constant joins the layer's bias, so
    the kernel adds it in its epilogue; a constant that varies along another axis, or a producer read elsewhere,
    stays an add."""
    torch.manual_seed(2)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, bias=False), nn.Conv2d(4, 4, 1)
            self.c3 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4 * 6 * 6, 5)
            self.b1 = nn.Parameter(torch.randn(1, 4, 1, 1))
            self.b2 = nn.Parameter(torch.randn(4, 1, 1))
            self.per_pixel = nn.Parameter(torch.randn(1, 4, 6, 6))
            self.bf = nn.Parameter(torch.randn(5))

        def forward(self, x):
            y = self.c1(x) + self.b1                  # no bias before: one is made
            y = self.b2 + self.c2(y)                  # constant first, bias already there
            z = self.c3(y)
            y = z + self.per_pixel + z                # varies per pixel (and z is read twice): kept
            return self.fc(y.flatten(1)) + self.bf    # a linear's features

    model = M().eval()
    x = torch.randn(2, 3, 8, 8)
    g = graphopt.trace(model, (x,))
    out = graphopt.optimize(g, "fold-bn")
    stats = out.meta["history"][-1]["stats"]
    assert stats["folded"] == 0 and stats["affine_ops"] == 3, stats
    adds = [n for n in out.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    assert len(adds) == 2, out.text()
    layers = [n for n in out.graph.nodes if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    assert all(n.args[2] is not None for n in layers)
    torch.testing.assert_close(out.run(x)[0], model(x), **TOL)


def test_constant_scales_per_output_channel_fold_into_weight_and_bias():
    """A batch norm written as Mul and Add of per-channel constants after a conv (what some converters write, and
    FrozenBatchNorm2d once fold-constants has computed its scale) folds whole: the mul into the weight and bias,
    the add into the bias. Muls after layers of one tied weight stay, and say why."""
    torch.manual_seed(3)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c, self.fc, self.fc2 = nn.Conv2d(3, 4, 3), nn.Linear(4, 3, bias=False), nn.Linear(4, 3)
            self.fc3 = nn.Linear(4, 5)
            self.fc2.weight = self.fc.weight  # (tied: scaling it for one would change the other)
            self.s, self.t = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5), nn.Parameter(torch.randn(1, 4, 1, 1))
            self.fs, self.fs2 = nn.Parameter(torch.rand(3) + 0.5), nn.Parameter(torch.rand(3) + 0.5)
            self.fs3 = nn.Parameter(torch.rand(5) - 0.5)

        def forward(self, x):
            y = (self.c(x) * self.s + self.t).mean((2, 3))
            return self.fc(y) * self.fs, self.fc2(y) * self.fs2, self.fs3 * self.fc3(y)

    model = M().eval()
    x = torch.randn(2, 3, 8, 8)
    g = graphopt.trace(model, (x,))
    out = graphopt.optimize(g, "fold-bn")
    stats = out.meta["history"][-1]["stats"]
    assert stats["affine_ops"] == 3, stats  # conv's mul and add, fc3's mul
    assert set(stats["skipped"].values()) == {"weight 'fc2_weight' of 'linear' is shared with 'linear_1', whose bias "
                                              "differs (folding would need a copy of the weight for each)"}, stats
    left = [n for n in out.graph.nodes if n.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor)]
    assert len(left) == 2, out.text()  # the tied linears' muls
    for a, b in zip(out.run(x), model(x)):
        torch.testing.assert_close(a, b, **TOL)


def test_layers_of_one_weight_fold_together_where_their_batch_norms_are_the_same():
    """A Siamese encoder (one conv + BN module on two inputs) and a block applied twice fold: the shared weight is
    scaled once and every layer reads it and one bias. A conv shared across two inputs with a batch norm of its own
    for each (detector heads shared across feature levels) stays, and says why: folding would need two weights."""
    torch.manual_seed(5)

    def bn(c):
        b = nn.BatchNorm2d(c)
        b.running_mean.uniform_(-1, 1), b.running_var.uniform_(0.5, 2), b.weight.data.uniform_(0.5, 1.5)
        return b

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn(8), nn.ReLU())
            self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), bn(8), nn.ReLU())
            self.head, self.bn_a, self.bn_b = nn.Conv2d(8, 4, 1), bn(4), bn(4)

        def forward(self, a, b):
            ya, yb = self.block(self.block(self.enc(a))), self.enc(b)
            return self.bn_a(self.head(ya)), self.bn_b(self.head(yb))

    model = M().eval()
    x = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    g = graphopt.trace(model, x)
    out = graphopt.optimize(g, "fold-bn")
    stats = out.meta["history"][-1]["stats"]
    assert stats["folded"] == 4 and bn_count(out) == 2, stats  # enc twice, block twice; the head's two stay
    reason = ("weight 'head_weight' of 'conv2d_4' is shared with 'conv2d_5', whose batch norm differs (folding would "
              "need a copy of the weight for each)")
    assert sorted(stats["skipped"].values()) == [reason] * 2, stats
    convs = [n for n in out.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert len({n.args[1].target for n in convs}) == 3 and len({n.args[2].target for n in convs}) == 3
    assert out.stats().params < g.stats().params
    for got, want in zip(out.run(*x), model(*x)):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dims,groups", [(2, 1), (2, 2), (1, 1), (3, 1)])
def test_folds_batch_norm_after_a_transposed_conv(dims, groups):
    """DCGAN / UNet decoders: BatchNorm after ConvTranspose folds into the weight along its axis 1 (output channels
    within each group: the weight is [Cin, Cout / groups, *k]) and the bias, one added where the layer had none; a
    per-channel constant multiply after one folds the same way."""
    torch.manual_seed(4)
    conv_t = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.bn = conv_t(4, 6, 3, 2, 1, 1, groups=groups, bias=False), norm(6)
            self.up2 = conv_t(6, 4, 2, 2)
            self.s = nn.Parameter(torch.rand(1, 4, *[1] * dims) + 0.5)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.3, 3)
            self.bn.weight.data.uniform_(0.5, 1.5)
            self.bn.bias.data.uniform_(-0.5, 0.5)

        def forward(self, x):
            return self.up2(torch.relu(self.bn(self.up(x)))) * self.s

    model = M().eval()
    x = torch.randn(2, 4, *[5] * dims)
    g = graphopt.trace(model, (x,))
    out = graphopt.optimize(g, "fold-bn")
    assert bn_count(out) == 0 and not any(n.target is torch.ops.aten.mul.Tensor for n in out.graph.nodes), out.text()
    torch.testing.assert_close(out.run(x)[0], model(x), **TOL)
