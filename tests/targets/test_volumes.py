"""Volumes and generators on graphopt's CPU kernels: 3-D UNets' up-convolutions and pools, video models' temporal
convs and (1, k, k) pools, and a generator's transposed conv of a 1 x 1 map; each checks the kernel it lowers to
(TVM's generic op took 2.5-100x the time) and the built artifact's output against PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets.tvm.lower import lower_to_relax

from tests.targets.test_cpu_kernels import _run_built


def _lowered(model, x):
    """(graph, Relax script, kernel names) of `model` traced on x."""
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    return g, mod.script(), {gv.name_hint for gv in mod.get_global_vars()}


def _matches(g, model, x, tol=1e-5):
    got = _run_built(g, x)
    ref = model(x).detach().numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.abs(got[ok] - ref[ok]).max() <= tol * np.abs(ref[ok]).max() + 1e-6


@pytest.mark.parametrize("k,shape", [(2, (1, 8, 3, 4, 5)), ((1, 2, 2), (2, 8, 3, 4, 4)), ((2, 1, 3), (1, 8, 2, 3, 2))])
def test_3d_up_convolution_is_the_packed_pointwise_gemm(k, shape):
    """A 3-D UNet's up-convolution (ConvTranspose3d, kernel == stride, no padding) runs the packed pointwise GEMM
    with Cout x kd x kh x kw rows, then a shuffle: Relax's conv3d_transpose took 108 ms for 32 -> 16 channels at
    16x32x32. Uneven kernels and batch 2 included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose3d(8, 6, k, stride=k), torch.nn.ReLU()).eval()
    x = torch.randn(*shape)
    g, text, names = _lowered(model, x)
    kd, kh, kw = (k,) * 3 if isinstance(k, int) else k
    packed = f"conv1x1_packed_{6 * kd * kh * kw}x8"
    assert "conv3d_transpose" not in text and any(n.startswith(packed) for n in names), names
    _matches(g, model, x)


def test_overlapping_3d_transposed_conv_keeps_relax_op():
    torch.manual_seed(0)
    model = torch.nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1).eval()
    x = torch.randn(1, 4, 3, 4, 4)
    g, text, _ = _lowered(model, x)
    assert "conv3d_transpose" in text
    _matches(g, model, x)


@pytest.mark.parametrize("k,pad,residual,batch", [
    ((3, 1, 1), (1, 0, 0), False, 1),  # R(2+1)D's temporal conv
    ((3, 1, 1), (0, 0, 0), True, 2),  # no depth padding, a residual add, batch 2
    (1, 0, True, 1),  # a 3-D UNet's 1x1x1 head with the skip added in its store
])
def test_temporal_and_pointwise_conv3d_are_2d_convs_over_depth_rows(k, pad, residual, batch):
    """(kd, 1, 1) conv3d of stride 1 run as a 2-D conv with a kd x 1 kernel over [N, C, D, H W] (no copies; TVM's
    conv3d took 2.8 ms for 16 channels over 8x56x56, 7 GMAC/s), bias, ReLU and a residual add in the store."""
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(16, 16, k, 1, pad)

        def forward(self, x):
            y = self.conv(x)
            return torch.relu(y + x[:, :, :y.shape[2]] if residual else y)

    model = Net().eval()
    x = torch.randn(batch, 16, 5, 6, 7)
    g, text, names = _lowered(model, x)
    assert "R.nn.conv3d" not in text and "depth_taps" not in text, text
    assert any(n.startswith(("conv_tok", "conv1x1", "conv_direct")) for n in names), names
    _matches(g, model, x)


@pytest.mark.parametrize("kind,k,s,p,extra,shape", [
    ("max", 2, None, 0, {}, (1, 4, 4, 6, 8)),  # a 3-D UNet's 2x2x2
    ("avg", (1, 2, 2), None, 0, {}, (2, 4, 3, 6, 6)),  # video (1, 2, 2), batch 2
    ("avg", (2, 3, 3), (2, 2, 2), (0, 1, 1), {"count_include_pad": False}, (1, 3, 4, 7, 7)),
    ("avg", (2, 3, 3), (2, 1, 1), (0, 1, 1), {}, (1, 3, 4, 5, 5)),
    ("max", (3, 3, 3), (3, 2, 2), (0, 1, 1), {}, (1, 2, 6, 7, 7)),
])
def test_3d_pools_with_tiling_depth_windows_run_the_2d_pool_kernel(kind, k, s, p, extra, shape):
    """max_pool3d / avg_pool3d whose depth windows tile the depth run graphopt's pooling kernel over the depth
    planes of each window (Relax's avg_pool3d took 220 us for R(2+1)D's (1, 2, 2) over 32x8x56x56); padding in H
    and W, count_include_pad both ways, NaN kept by the max (PyTorch's)."""
    torch.manual_seed(0)
    pool = torch.nn.MaxPool3d(k, s, p) if kind == "max" else torch.nn.AvgPool3d(k, s, p, **extra)
    x = torch.randn(*shape)
    if kind == "max":
        x[0, 1, 1, 2, 3] = float("nan")
    g, text, names = _lowered(pool, x)
    assert "pool3d" not in text and any(n.startswith(f"{kind}_pool") for n in names), names
    _matches(g, pool, x)


@pytest.mark.parametrize("pool", [torch.nn.MaxPool3d(2, ceil_mode=True), torch.nn.AvgPool3d(3, 2, 1),
                                  torch.nn.MaxPool3d(2, dilation=2), torch.nn.AvgPool3d(2, divisor_override=3)])
def test_3d_pools_the_kernel_does_not_take_keep_relax_ops(pool):
    """ceil mode, depth windows that overlap or are padded, dilation and divisor_override: TVM's pools."""
    x = torch.randn(1, 2, 5, 6, 6)
    g, text, _ = _lowered(pool, x)
    assert "pool3d" in text
    _matches(g, pool, x)


@pytest.mark.parametrize("cin,cout,k,p,op,shape", [
    (16, 24, 4, 0, 0, (1, 16, 1, 1)),  # DCGAN's first layer: z -> 4 x 4, batch 1 (the GEMV)
    (16, 24, 4, 1, 0, (3, 16, 1, 1)),  # padded: the middle 2 x 2 of the kernel; batch 3 (the GEMM)
    (16, 8, 3, 1, 1, (2, 16, 1, 1)),  # output padding past the kernel: zeros, then the bias
    (16, 8, (4, 3), (1, 0), 0, (2, 16, 1, 1)),
    (16, 8, 5, 2, 1, (1, 16, 1)),  # 1-D
])
def test_transposed_conv_of_one_pixel_is_a_linear(cin, cout, k, p, op, shape):
    """A transposed conv of a 1 x 1 map is a linear with Cout OH OW outputs (output pixel o is tap o + p), on the
    packed GEMV / GEMM: TVM's conv2d_transpose took 7.2 ms for DCGAN's first layer at batch 8."""
    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose1d if len(shape) == 3 else torch.nn.ConvTranspose2d)(cin, cout, k, 2 if op else 1, p,
                                                                                      op)
    model = torch.nn.Sequential(conv, torch.nn.Tanh()).eval()
    x = torch.randn(*shape)
    g, text, names = _lowered(model, x)
    assert "_transpose(" not in text and any(n.startswith(("gemv_packed", "gemm_packed")) for n in names), names
    _matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,s,p,d,shape,fold", [
    (16, 8, 4, 2, 1, 1, (2, 16, 4, 4), True),  # DCGAN at 4 x 4: the phase conv would do 1.56x the MACs
    (16, 8, 4, 2, 1, 1, (1, 16, 24, 24), False),  # 24 x 24: 1.09x, the phase conv
    (16, 8, 3, 2, 2, 2, (1, 16, 6, 7), True),  # dilated (had run TVM's conv2d_transpose)
    (16, 8, 3, 2, 1, 1, (1, 16, 20, 20), True),  # a 3-tap kernel at stride 2: its phases hold a zero tap (1.78x)
    (16, 8, 4, 2, 1, 1, (1, 16, 9), True),  # 1-D
])
def test_transposed_conv_on_a_small_map_is_a_gemm_and_a_fold(cin, cout, k, s, p, d, shape, fold):
    """Where the phase conv would compute more than FOLD_WASTE times the transposed conv's MACs (its phases share
    one padded input: a row and a column more each), or the taps are dilated, the layer is the packed pointwise
    GEMM with Cout k k rows and the fold kernel, which adds each pixel's block into place with the bias and the
    ReLU in its store; the phase conv otherwise. A DCGAN's 256 -> 128 layer at 4 x 4, batch 8: 2.4 -> 0.85 ms."""
    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose1d if len(shape) == 3 else torch.nn.ConvTranspose2d)(cin, cout, k, s, p,
                                                                                      dilation=d)
    model = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    x = torch.randn(*shape)
    g, text, names = _lowered(model, x)
    rows = cout * k * (k if len(shape) == 4 else 1)
    assert "_transpose(" not in text and any(n.startswith("col2im_") for n in names) == fold, names
    if fold:
        assert any(n.startswith(f"conv1x1_packed_{rows}x{cin}") for n in names), names
        assert any(n.startswith("col2im_") and "_clamp" in n for n in names), names  # (the ReLU in its store)
    _matches(g, model, x)


@pytest.mark.parametrize("cin,cout,groups,shape", [
    (16, 16, 16, (1, 16, 8, 8)),  # depthwise upsampling (FCN / CenterNet's up-convolutions)
    (8, 16, 8, (2, 8, 6, 7)),  # its channel multiplier, batch 2
    (16, 8, 4, (1, 16, 12, 12)),
    (8, 8, 2, (1, 8, 10)),  # 1-D
])
def test_grouped_transposed_conv_runs_as_a_grouped_phase_conv(cin, cout, groups, shape):
    """A grouped transposed conv had run TVM's generic conv2d_transpose (depthwise 4x4 stride 2, 64 channels at
    32 x 32: 4.3 ms against ONNX Runtime's 1.0; 4 groups: 58 ms against 0.87). It lowers as the grouped conv of its
    per-group phase kernels (graphopt's depthwise and grouped kernels) and a shuffle: 0.20 and 0.43 ms there."""
    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose1d if len(shape) == 3 else torch.nn.ConvTranspose2d)(cin, cout, 4, 2, 1,
                                                                                      groups=groups)
    model = torch.nn.Sequential(conv, torch.nn.ReLU()).eval()
    x = torch.randn(*shape)
    g, text, _ = _lowered(model, x)
    assert "_transpose(" not in text, "a grouped transposed conv left to TVM's generic op"
    _matches(g, model, x)


def test_dcgan_generator_folds_its_batch_norms_and_matches():
    """fold-bn folds each BatchNorm after a transposed conv into its weight (axis 1) and bias; the folded generator
    builds and matches PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(16, 32, 4, 1, 0, bias=False), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(16, 3, 4, 2, 1, bias=False), torch.nn.Tanh()).eval()
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    z = torch.randn(2, 16, 1, 1)
    g = graphopt.optimize(graphopt.trace(model, (z,)), "fold-bn", warn_unchanged=False)
    assert "batch_norm" not in str(g)
    _matches(g, model, z)


def test_quantized_3d_convs_fold_qdq_leaves_run_the_float_kernels():
    """quantize + fold-qdq leaves 3-D and transposed convs as dequantize(int8 weight) -> conv (no int8 kernel takes
    them); the lowering dequantizes the weight at compile time so they run graphopt's float kernels, not TVM's
    generic conv on a computed weight (int8 R(2+1)D 12.9 -> 1.9 ms). Matches the quantized graph's own run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(3, 8, (1, 3, 3), 1, (0, 1, 1)), torch.nn.ReLU(),
                                torch.nn.Conv3d(8, 8, (3, 1, 1), 1, (1, 0, 0)), torch.nn.ReLU(),
                                torch.nn.ConvTranspose3d(8, 4, 2, 2)).eval()
    x = torch.randn(1, 3, 4, 8, 8)
    g = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq", data=[(torch.randn(1, 3, 4, 8, 8),)],
                          warn_unchanged=False)
    assert "dequantize_per_channel" in str(g)  # (weights left behind a dequantize)
    text = lower_to_relax(g).script()
    assert "R.nn.conv3d" not in text and "conv3d_transpose" not in text, text
    got, want = _run_built(g, x), g.run(x)[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
