"""Transposed convs as ordinary convs (`convs_from_transposed`, the form quantize puts int8 on): the same outputs,
and the quantized generator / decoder they make runs graphopt's int8 kernels."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

import graphopt
from graphopt.passes.canonicalize.transposed import convs_from_transposed


def _targets(g) -> list[str]:
    return [str(n.target) for n in g.graph.nodes if n.op == "call_function"]


def test_transposed_convs_become_phase_convs_with_the_same_outputs():
    """1-D and 2-D, strides 1-3 (uneven ones too), padding, output padding, dilation, kernels smaller than, equal to
    and larger than the stride, with and without bias, 1 x 1 input maps (a linear), batch 2: no transposed conv is
    left and the outputs are PyTorch's within float rounding (1e-5 of the outputs' range). Small maps, where the
    phase conv would compute more than FOLD_WASTE times the MACs (also a 3-tap kernel at stride 2 on any map: its
    phases hold 2 x 2 taps of 3 x 3, one a zero), dilated taps and a one-tap kernel with a crop larger than the
    phases give become a pointwise conv and a fold (aten.col2im), and 1-D ones at any length; larger maps and
    stride 1 the phase conv. Grouped
    ones (depthwise upsampling, its channel multiplier, 2 groups) take the grouped phase conv on any map (the fold
    for dilated taps and a 1 x 1 map)."""
    torch.manual_seed(0)
    cases = [  # (dims, k, stride, padding, output_padding, input map, bias, dilation, fold)
        (2, 4, 2, 1, 0, (5, 7), True, 1, True), (2, 3, 2, 1, 1, (6, 6), False, 1, True),
        (2, 2, 2, 0, 0, (4, 5), True, 1, False), (2, 5, 3, 2, 2, (4, 4), True, 1, True),
        (2, 3, 1, 1, 0, (5, 5), True, 1, False), (2, (3, 5), (2, 1), (1, 2), 0, (5, 6), True, 1, True),
        (2, 4, 2, 1, 0, (24, 20), True, 1, False), (2, 3, 2, 1, 1, (20, 20), False, 1, True),
        (2, 4, 1, 0, 0, (1, 1), True, 1, False), (2, 4, 2, 1, 0, (1, 1), False, 1, False),
        (2, 3, 2, 2, 1, (5, 6), True, 2, True), (2, (3, 2), (1, 2), (2, 0), 0, (4, 4), False, (2, 3), True),
        (2, 1, 3, 2, 0, (5, 7), True, 1, True),  # one tap, a crop of 2: the phases cannot give it
        (1, 4, 2, 1, 0, (9,), True, 1, True), (1, 4, 2, 1, 0, (40,), True, 1, True),
        (1, 16, 8, 4, 0, (7,), True, 1, True), (1, 7, 3, 3, 2, (1,), False, 1, False),
        (1, 3, 2, 2, 1, (8,), True, 3, True),
    ]
    grouped = [  # (groups, in, out) appended: depthwise, its channel multiplier, 2 groups; 1-D; a 1 x 1 map
        (2, 4, 2, 1, 0, (6, 5), True, 1, False, (6, 6, 6)), (2, 4, 2, 1, 0, (3, 4), True, 1, False, (4, 4, 8)),
        (2, 3, 2, 1, 1, (5, 5), False, 1, False, (2, 4, 6)), (1, 4, 2, 1, 0, (9,), True, 1, False, (2, 4, 6)),
        (2, 4, 2, 1, 0, (1, 1), True, 1, True, (2, 4, 6)), (2, 3, 2, 2, 1, (5, 6), True, 2, True, (2, 4, 6)),
    ]
    for dims, k, s, p, op, hw, bias, d, fold, *grouping in cases + grouped:
        groups, cin, cout = grouping[0] if grouping else (1, 3, 5)
        conv = (nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d)(cin, cout, k, s, p, op, bias=bias,
                                                                          dilation=d, groups=groups)
        x = torch.randn(2, cin, *hw)
        g = graphopt.trace(conv.eval(), (x,))
        done = convs_from_transposed(g)
        targets = _targets(g)
        case = (dims, k, s, p, hw, d, groups)
        assert len(done) == 1 and not any("conv_transpose" in t for t in targets), (case, targets)
        assert any(t in ("aten.conv2d.default", "aten.conv1d.default", "aten.linear.default") for t in targets)
        assert ("aten.col2im.default" in targets) == fold, (case, targets)
        with torch.no_grad():
            want = conv(x)
        got = g.run(x)[0]
        assert got.shape == want.shape, case
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.detach().abs().max()))


class _Generator(nn.Module):
    """A DCGAN-style generator: a latent 1 x 1 map to 4 x 4 (a linear), 4x4 stride-2 transposed convs with batch
    norms and ReLUs, a 2x2 stride-2 one (UNet's up-convolution) and a tanh."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.ConvTranspose2d(16, 32, 4, 1, 0), nn.BatchNorm2d(32), nn.ReLU(),
                                 nn.ConvTranspose2d(32, 16, 4, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.ConvTranspose2d(16, 8, 2, 2), nn.ReLU(), nn.Conv2d(8, 3, 3, 1, 1), nn.Tanh())

    def forward(self, z):
        return self.net(z)


def test_quantize_puts_int8_on_transposed_convs_and_they_run_int8_kernels(tmp_path):
    """quantize had found "no conv or linear" in a generator of transposed convs and kept every layer float (a
    DCGAN's int8 build was its fp32 one). Now each becomes its phase conv (the first, on the 1 x 1 latent, a
    linear) with int8 weights and activation grids; fold-qdq makes them integer ops, quantizes each before its
    pixel shuffle (so the conv stores int8 and the shuffle moves codes), and the CPU build agrees with the folded
    graph (one activation step) and with fp32 within int8's error. `exclude` keeps a transposed conv as it was."""
    torch.manual_seed(0)
    model = _Generator().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    zs = torch.randn(10, 2, 16, 1, 1)
    g = graphopt.trace(model, (zs[0],))
    q = graphopt.optimize(g, "quantize", data=[(z,) for z in zs[:8]])
    stats = q.meta["history"][-1]["stats"]
    assert stats["transposed_convs_as_convs"] == 3 and stats["weights_quantized"] == 4, stats
    f = graphopt.optimize(q, "fold-qdq", verify=True, data=[(z,) for z in zs[8:]])
    rec = f.meta["history"][-1]
    assert rec["verify"]["ok"] and rec["stats"]["folded"] == 4 and rec["stats"]["quantized_before_moves"] == 1, rec
    targets = _targets(f)
    assert targets.count("graphopt.qconv2d.default") == 3 and targets.count("graphopt.qlinear.default") == 1
    assert not any("conv_transpose" in t for t in targets) and targets.count("aten.col2im.default") == 1, targets
    chains = []
    for n in f.graph.nodes:  # the phase conv's only reader is its ReLU, and the ReLU's its int8 quantize; the
        # 4 x 4 map's layer (a fold: 1.56x the MACs as a phase conv) folds the int8 GEMM's blocks, adds the bias
        if n.target is torch.ops.graphopt.qconv2d.default and n.meta["val"].shape[1] != 3:
            chain, m = [], n
            while len(m.users) == 1 and not str(m.target).startswith("graphopt.quantize"):
                (m,) = m.users
                chain.append(str(m.target))
            chains.append(chain)
    assert sorted(chains) == [["aten.relu.default", "graphopt.quantize_per_tensor.default"],
                              ["aten.reshape.default", "aten.col2im.default", "aten.add.Tensor", "aten.relu.default",
                               "graphopt.quantize_per_tensor.default"]], chains
    art = graphopt.load(graphopt.compile(f, "llvm", output=tmp_path / "int8"))
    z = zs[9]
    got, ref = art(z.numpy())[0], f.run(z)[0].numpy()
    assert got.shape == ref.shape == (2, 3, 16, 16)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    with torch.no_grad():
        fp32 = model(z).numpy()
    assert np.abs(got - fp32).max() <= 0.08 * np.abs(fp32).max()
    kept = graphopt.optimize(g, "quantize{exclude=net.3.weight}", data=[(z,) for z in zs[:4]])
    assert kept.meta["history"][-1]["stats"]["transposed_convs_as_convs"] == 2
    assert _targets(kept).count("aten.conv_transpose2d.input") == 1


def test_quantize_says_why_a_transposed_conv_stays_float():
    """3-D transposed convs are not rewritten: quantize lists each in its `skipped` stats with the reason (they
    had not been named at all), and the graph still computes the model. Grouped and dilated ones are (a grouped
    phase conv, a fold), and chained ones."""

    class Kept(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.ConvTranspose2d(8, 8, 4, 2, 1, groups=2)
            self.dilated = nn.ConvTranspose2d(8, 4, 3, 2, 2, dilation=2)
            self.plain = nn.ConvTranspose2d(4, 4, 2, 2)

        def forward(self, x):
            return self.plain(self.dilated(self.grouped(x)))

    torch.manual_seed(0)
    model = Kept().eval()
    xs = [(torch.randn(1, 8, 5, 5),) for _ in range(3)]
    q = graphopt.optimize(graphopt.trace(model, xs[0]), "quantize", data=xs)
    stats = q.meta["history"][-1]["stats"]
    assert stats["transposed_convs_as_convs"] == 3 and not stats["skipped"], stats
    with torch.no_grad():
        want = model(xs[0][0])
    got = q.run(xs[0][0])[0]
    assert torch.abs(got - want).max() <= 0.05 * torch.abs(want).max()
    volume = graphopt.trace(nn.ConvTranspose3d(4, 2, 2, 2).eval(), (torch.randn(1, 4, 3, 3, 3),))
    vq = graphopt.optimize(volume, "quantize{activations=none}", warn_unchanged=False)
    assert "3-D" in vq.meta["history"][-1]["stats"]["skipped"]["conv_transpose3d"]
