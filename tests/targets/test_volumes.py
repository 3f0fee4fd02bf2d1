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


@pytest.mark.parametrize("s,batch", [(1, 1), (2, 2)])
def test_conv3d_dilated_in_space_runs_the_pixel_row_conv_over_depth_taps(s, batch):
    """A conv3d dilated in H and W (not in depth; C3D-style nets' context layers) runs the pixel-row conv with its
    taps that far apart over the depth taps, not TVM's conv3d (a 64-channel one at 4x8x8 had made a C3D-style
    net 13.3 ms, 1.31 after); within 1e-5 of PyTorch's range."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(8, 16, 3, (1, s, s), (1, 2, 2), dilation=(1, 2, 2)),
                                torch.nn.ReLU()).eval()
    x = torch.randn(batch, 8, 4, 10, 10)
    g, text, names = _lowered(model, x)
    assert "R.nn.conv3d" not in text and any(n.startswith("conv_tok_16x24x10x10_k3x3") and "d2" in n
                                             for n in names), names
    _matches(g, model, x)


class _Conv3dBlock(torch.nn.Module):
    def __init__(self, cin, cout, k, s, p, groups=1):
        super().__init__()
        self.conv = torch.nn.Conv3d(cin, cout, k, s, p, groups=groups)

    def forward(self, x):
        return torch.relu(self.conv(x)) * 0.5  # (the scale: a float op after, so the conv stores int8)


@pytest.mark.parametrize("cin,cout,k,s,p,shape,taps", [
    (8, 16, 3, 1, 1, (1, 8, 4, 10, 10), True),  # a 3-D UNet's conv: the taps, then 3x3 over 24 channels
    (8, 16, 3, 2, 1, (2, 8, 5, 9, 9), True),  # strided in depth and space, batch 2
    (16, 16, (1, 3, 3), (1, 2, 2), (0, 1, 1), (1, 16, 3, 12, 12), True),  # R(2+1)D's spatial conv: depths as samples
    (16, 16, (3, 1, 1), 1, (1, 0, 0), (1, 16, 6, 5, 7), False),  # its temporal conv: 3 x 1 over [C, D, H W]
    (16, 8, 1, 1, 0, (1, 16, 4, 6, 6), False)])  # a 1x1x1 head: the pointwise conv over [C, D, H W]
def test_int8_3d_convs_fold_to_int8_2d_convs(cin, cout, k, s, p, shape, taps):
    """fold-qdq writes a quantized conv3d as graphopt's int8 2-D conv (qconv2d) over its depth taps (the input
    [N, C, D, H, W] as [N OD, C kd, H, W], padded with the zero point: `graphopt.depth_taps`), or, for (kd, 1, 1)
    convs of stride 1, over [N, C, D, H W] with a kd x 1 kernel (no copy). The folded graph equals the Q/DQ graph
    (exact integer sums), the lowering runs the int8 taps copy and int8 conv kernels (no float conv3d), and the
    artifact matches the folded graph within a step of the output grid. Before, the conv3d stayed float on the
    dequantized codes: a quantized 3-D UNet took 1.05x its fp32 time (now 0.56x)."""
    torch.manual_seed(0)
    model = _Conv3dBlock(cin, cout, k, s, p).eval()
    x = torch.randn(*shape)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize", data=[(torch.randn(*shape),)],
                          warn_unchanged=False)
    g = graphopt.optimize(q, "fold-qdq", warn_unchanged=False)
    ops = [n.target.__name__ for n in g.gm.graph.nodes if n.op == "call_function"]
    assert "conv3d.default" not in ops and "qconv2d.default" in ops, ops
    assert ("depth_taps.default" in ops) == taps, ops
    folded, qdq = g.run(x)[0].numpy(), q.run(x)[0].numpy()
    assert folded.shape == qdq.shape == tuple(model(x).shape)
    assert np.abs(folded - qdq).max() <= 1e-5 * np.abs(qdq).max()
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "R.nn.conv" not in mod.script() and any(n.startswith("qconv") for n in names), names
    assert any(n.startswith("depth_taps") and n.endswith("_int8") for n in names) == taps, names
    step = max(float(n.args[1]) for n in g.gm.graph.nodes if n.op == "call_function"
               and n.target.__name__ == "quantize_per_tensor.default")
    assert np.abs(_run_built(g, x) - folded).max() <= 0.5 * step * 1.001 + 1e-6


def test_depth_taps_lower_to_relax_ops_where_graphopt_has_no_cpu_kernels():
    """For targets without graphopt's CPU kernels (cuda) the depth taps are Relax's pad, strided slices, stack and
    reshape on the int8 codes; built for this CPU they equal the graph's own run."""
    from tvm import relax
    torch.manual_seed(0)
    model = _Conv3dBlock(4, 8, 3, 2, 1).eval()
    x = torch.randn(1, 4, 5, 6, 6)
    g = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq", data=[(torch.randn(1, 4, 5, 6, 6),)],
                          warn_unchanged=False)
    mod = lower_to_relax(g, device="cuda")
    assert "depth_taps" not in mod.script() and "R.strided_slice" in mod.script()
    import tvm
    out = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got, ref = (out if hasattr(out, "numpy") else out[0]).numpy(), g.run(x)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_int8s_3d_weights_bound_the_pairs_of_the_depth_taps_conv():
    """int8s bounds the u8 x s8 pairs the kernels add in the 2-D conv fold-qdq makes of a conv3d, whose channels are
    (c, t) flattened: two depth taps of one channel pair up there, never at one tap of the 3-D weight. A weight
    large on taps 0 and 1 of channel 0 and small elsewhere kept its pairs at 254 (full steps), which AVX2's
    `vpmaddubsw` saturates; bounded, the folded weight's pairs stay within 128."""
    from graphopt.ir.quant_ops import PAIR_BOUND, weight_pairs, worst_pair_sums
    torch.manual_seed(0)
    model = _Conv3dBlock(4, 8, 3, 1, 1).eval()
    with torch.no_grad():
        model.conv.weight.mul_(0.01)
        model.conv.weight[:, 0, :2] = 1.0  # taps 0 and 1 of input channel 0, every row and column
    x = torch.randn(1, 4, 4, 6, 6)
    g = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int8s},fold-qdq",
                          data=[(torch.randn(1, 4, 4, 6, 6),)], warn_unchanged=False)
    (w2,) = [g.get_param(n.args[3].target) for n in g.gm.graph.nodes if n.op == "call_function"
             and n.target.__name__ == "qconv2d.default"]
    assert tuple(w2.shape) == (8, 12, 3, 3)
    assert int(worst_pair_sums(weight_pairs(w2.int())).max()) <= PAIR_BOUND


def test_int8_3d_convs_no_int8_kernel_takes_stay_float_on_compile_time_weights():
    """A grouped conv3d and a transposed one are left as dequantize(int8 weight) -> conv by fold-qdq (no int8
    kernel takes them; the grouped one with its reason); the lowering dequantizes the weights at compile time, so
    the transposed conv runs graphopt's float kernels, not TVM's generic conv on a computed weight (int8 R(2+1)D
    had taken 12.9 ms so, 1.9 after). Matches the quantized graph's own run."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Conv3dBlock(8, 8, (3, 1, 1), 1, (1, 0, 0), groups=2),
                                torch.nn.ConvTranspose3d(8, 4, 2, 2)).eval()
    x = torch.randn(1, 8, 4, 8, 8)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize", data=[(torch.randn(1, 8, 4, 8, 8),)],
                          warn_unchanged=False)
    from graphopt.passes.quant.fold_qdq import check
    (conv,) = [n for n in q.gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "conv3d.default"]
    assert check(q, conv).startswith("grouped conv3d")
    g = graphopt.optimize(q, "fold-qdq", warn_unchanged=False)
    assert "dequantize_per_channel" in str(g) and "conv3d" in str(g)  # (the weight left behind a dequantize)
    text = lower_to_relax(g).script()
    assert "conv3d_transpose" not in text, text
    got, want = _run_built(g, x), g.run(x)[0].numpy()
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_int8_3d_convs_export_to_onnxruntime_and_pt2(tmp_path):
    """An int8 3-D conv folded over its depth taps exports: to ONNX as the taps' pad, slices and reshape on the
    int8 codes (ONNX has no depth-taps op) and a 2-D Q/DQ conv, which ONNX Runtime runs; to .pt2 as plain ATen,
    which loads without graphopt. Both agree with the graph within its grid's rounding."""
    import onnxruntime as ort

    from graphopt.targets.onnx.export import export_onnx
    from graphopt.targets.torch.export import export_pt2
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Conv3dBlock(4, 8, 3, 2, 1), torch.nn.Conv3d(8, 8, 3, 1, 1)).eval()
    x = torch.randn(1, 4, 5, 8, 8)
    g = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq", data=[(torch.randn(1, 4, 5, 8, 8),)],
                          warn_unchanged=False)
    assert "depth_taps" in str(g)
    ref = g.run(x)[0].numpy()
    export_onnx(g, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max(), np.abs(got - ref).max()
    export_pt2(g, tmp_path / "m.pt2")
    ep = torch.export.load(str(tmp_path / "m.pt2"))
    assert not any("graphopt" in str(n.target) for n in ep.graph.nodes)
    got = ep.module()(x)[0].detach().numpy()
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max(), np.abs(got - ref).max()


def test_weight_only_3d_convs_are_named_by_compile(tmp_path, caplog):
    """Weight-only int8 (activations=none) 3-D convs run as float convs on weights dequantized at build, like 2-D
    ones: compile names them in its weight-only warning (it had counted 2-D convs and linears only)."""
    torch.manual_seed(0)
    model = _Conv3dBlock(4, 8, 3, 1, 1).eval()
    x = torch.randn(1, 4, 3, 6, 6)
    g = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{activations=none}", warn_unchanged=False)
    with caplog.at_level("WARNING", logger="graphopt"):
        graphopt.compile(g, "llvm", output=tmp_path / "wo")
    assert "1 layer(s) have int8 weights and float inputs" in caplog.text and "conv3d" in caplog.text
