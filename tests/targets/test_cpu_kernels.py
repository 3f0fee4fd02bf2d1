"""graphopt's hand-written CPU kernels: the packed-weight GEMM for dense linear layers (with its row tail), the
vectorizable erf GELU, and the BSR/CSR sparse kernels: numerics against PyTorch, the kernel really in the module,
and the emitted assembly (register-resident FMA accumulation, no stores inside the reduction loop)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.ir.sparse_ops import to_bsr
from graphopt.passes.prune.masks import expand_blocks
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu.gemm import gemm_packed, pack_weight
from graphopt.targets.tvm.cpu.sparse import bsr_matmul_rows, bsr_matmul_t
from graphopt.targets.tvm.cpu.int8 import int8_dot
from graphopt.targets.tvm.cpu.parse import parse_kernel
from graphopt.targets.tvm.cpu.rules import vector_lanes
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax

AVX2 = "znver3"  # an AVX2 CPU without VNNI: its code runs on every x86 host these tests meet


def _run_built(g, *xs) -> np.ndarray:
    """Build `g` for this CPU and run it on xs (torch tensors); its (first) output."""
    from tvm import relax
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(x.numpy()) for x in xs))
    return (got if hasattr(got, "numpy") else got[0]).numpy()


def _assert_runs_im2col(model, x):
    """`model` (a conv) lowers to im2col + the packed GEMM, no Relax conv left, and its build matches torch."""
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "R.nn.conv2d" not in mod.script() and any(n.startswith("im2col") for n in names), names
    _assert_built_matches(g, model, x)


def _assert_built_matches(g, model, x):
    """Build `g` for the CPU, run it, and compare with the PyTorch model within 1e-5 of the output's range."""
    got = _run_built(g, x)
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


@pytest.fixture
def float_depthwise(monkeypatch):
    """int8 graphs' depthwise layers on the float kernels, as on CPUs without AVX512-VNNI and VBMI (the int8
    depthwise kernel's own tests: test_qdepthwise.py)."""
    from graphopt.targets.tvm.cpu import qdepthwise
    monkeypatch.setattr(qdepthwise, "int8_depthwise_dot", lambda target: None)


def _func_names(g, cpu: str | None = None):
    return {gv.name_hint for gv in lower_to_relax(g, target=cpu_target(cpu) if cpu else None).get_global_vars()}


@pytest.mark.parametrize("rows,width", [(12, 32), (13, 32), (128, 32), (20, 27),  # row tails; 27: padded panels
                                        (2, 32), (5, 27), (7, 32)])  # under two row tiles: one partial tile
def test_linear_uses_packed_gemm_and_matches_torch(rows, width, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, width), torch.nn.GELU(), torch.nn.Linear(width, 16)).eval()
    x = torch.randn(1, rows, 48)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("gemm_packed") for n in names), names
    # with 512-bit vectors the 16-column layers (and 27: 16 <= N < 32) get one 16-float vector per panel, not
    # TVM's kernel
    from graphopt.targets.tvm.cpu import rules
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 512)
    names = _func_names(g, "znver4")
    assert len([n for n in names if n.startswith("gemm_packed")]) == 2, names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("width", [64, 27])
@pytest.mark.parametrize("bits", [None, 512])
def test_linear_bias_is_added_in_the_gemm_store(width, bits, monkeypatch):
    """A linear's bias is added by the packed GEMM as it stores (no elementwise add kernel after it); a layer padded
    to whole panels (27 columns of 32) adds it after the slice. Matches torch within 1e-5 of the output's range,
    also with 512-bit tiles (16-float vectors where the CPU has AVX-512)."""
    from graphopt.targets.tvm.cpu import rules
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", bits)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, width), torch.nn.Linear(width, 32)).eval()
    x = torch.randn(1, 20, 48)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    gemms = {gv.name_hint.split("x")[1]: gv.name_hint for gv in mod.get_global_vars()
             if gv.name_hint.startswith("gemm_packed")}  # input width -> name
    assert gemms[str(width)].endswith("_bias") and gemms["48"].endswith("_bias") == (width == 64), gemms
    assert mod.script().count("R.add(") == (width == 27), mod.script()
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("k,n,bias", [(1280, 1000, True), (63, 40, False), (48, 16, True)])
def test_batch1_linear_streams_a_packed_weight(k, n, bias):
    """A one-row linear (a classifier head) is a weight stream: the packed GEMV kernel reads each 16-column panel
    once with independent partial sums; odd K, N padded to whole panels, with and without bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(k, n, bias=bias)).eval()
    x = torch.randn(1, k)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(nm.startswith("gemv_packed") for nm in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cout,cin,hw,act", [(96, 16, 12, torch.nn.ReLU6()), (13, 8, 7, torch.nn.ReLU()),
                                             (32, 24, 4, torch.nn.Identity()), (24, 9, 18, torch.nn.ReLU6()),
                                             (16, 8, 16, torch.nn.ReLU6()),  # 16: remainder rows in each slab task
                                             (12, 10, 7, torch.nn.ReLU6()),  # 49 and 36 pixels: the last 1 / 4
                                             (18, 6, 6, torch.nn.Identity())])  # ride with a panel's tile, K % 4 > 0
def test_pointwise_conv_uses_packed_kernel_with_fused_clamp(cout, cin, hw, act):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1), act).eval()
    x = torch.randn(1, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("conv1x1_packed") for n in names), names
    text = mod.script()
    if not isinstance(act, torch.nn.Identity):
        assert "_clamp" in " ".join(names) and "R.clip" not in text and "R.nn.relu" not in text  # in the kernel
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("c,hw,k,stride,act", [(16, 18, 3, 1, torch.nn.ReLU6()), (8, 15, 3, 2, torch.nn.Identity()),
                                               (12, 9, 5, 2, torch.nn.ReLU()), (4, 40, 5, 1, torch.nn.Identity()),
                                               (6, 70, 3, 2, torch.nn.ReLU6()), (4, 81, 5, 2, torch.nn.Identity()),
                                               (5, 28, 5, 2, torch.nn.ReLU()), (3, 50, 5, 2, torch.nn.ReLU6()),
                                               (4, 13, 3, 1, torch.nn.ReLU6()), (3, 22, 5, 1, torch.nn.Identity()),
                                               # tasks of 2 channels, the last one short (`depthwise_per_task`):
                                               (17, 64, 5, 2, torch.nn.ReLU6()),  # the stride-2 phase kernel
                                               (17, 30, 5, 1, torch.nn.Identity()),  # the padded tile kernel
                                               (5, 20, 13, 1, torch.nn.ReLU())])  # large taps: rows in a loop
def test_depthwise_conv_kernel_handles_padding_in_the_kernel(c, hw, k, stride, act):
    """Depthwise convs on the row, tile and phase kernels pad inside the kernel; the tile and phase kernels' tasks
    take several channels (17: two a task, one in the last) and zero their tile's padding once a task."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c), act).eval()
    x = torch.randn(1, c, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("depthwise_") for n in names), names
    assert "R.nn.pad" not in mod.script()  # borders are guarded inside the kernel, no padded copy
    _assert_built_matches(g, model, x)


def test_large_tap_tile_kernel_loops_over_tap_rows():
    """Past 81 taps the tile kernel runs its tap rows as a loop (each row's taps unrolled): RepLKNet's 31 x 31
    unrolled whole was ~77 KB of code a channel, front-end bound (128 x 28 x 28: 4.0 -> 2.5 ms; 13 x 13 481 ->
    406 us); 9 x 9 and smaller stay unrolled."""
    from graphopt.targets.tvm.cpu.conv import depthwise_source
    big = depthwise_source(8, 20, 20, 20, 20, 13, 13, 1, 6, 6, None)
    small = depthwise_source(8, 20, 20, 20, 20, 9, 9, 1, 4, 4, None)
    assert "for i in T.serial(13)" in big and "for j in T.unroll(13)" in big
    assert "for i in T.unroll(9)" in small


@pytest.mark.parametrize("c,h,w,k,stride,pad", [(3, 3, 70, 3, 1, (1, 1, 1, 1)),   # 3 output rows: a 3-row block
                                                 (2, 37, 41, 3, 1, (1, 1, 1, 1)),  # 37 rows: the last block overlaps
                                                 (3, 9, 66, 3, 2, (1, 1, 1, 1)),   # stride 2, 5 rows
                                                 (2, 12, 40, 5, 1, (2, 2, 2, 2)),  # 5x5: 8 input rows a block
                                                 (2, 10, 68, 3, 2, (0, 1, 0, 1))])  # TF "SAME": no top row skipped
def test_depthwise_row_kernel_blocks_of_output_rows(c, h, w, k, stride, pad):
    """The row kernel computes 4 output rows a task (fewer on thin maps, the last block overlapping the one before),
    loading each input row's tap vectors once for every output row that reads them. With int8 weights and an int8
    store its outputs equal those of one row a task exactly (the same sums in the same order), and the float ones
    match torch."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import conv as k_
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, c, h, w)).astype(np.float32) * 2
    w8, ws = rng.integers(-127, 128, (c, 1, k, k)).astype(np.int8), rng.uniform(0.005, 0.02, c)
    b = rng.standard_normal(c).astype(np.float32)

    def run(out_q, rows):
        source = k_.depthwise_source
        k_.depthwise_source = lambda *a, **kw: source(*a, **kw, rows=rows)
        try:
            bb = relax.BlockBuilder()
            xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
            with bb.function("main", [xv]):
                with bb.dataflow():
                    y = bb.emit_output(k_.emit_depthwise(bb, xv, w8, b, x.shape, stride, pad, (0.0, 6.0), out_q,
                                                         w_scale=ws))
                bb.emit_func_output(y)
            mod = bb.get()
        finally:
            k_.depthwise_source = source
        names = {gv.name_hint for gv in mod.get_global_vars()}
        assert any(n.startswith(f"depthwise_{c}x{h}x{w}_k{k}s{stride}") for n in names), names  # the row kernel
        return relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    w_real = torch.from_numpy(w8.astype(np.float32) * ws.reshape(-1, 1, 1, 1).astype(np.float32))
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x), (pad[2], pad[3], pad[0], pad[1])),
                                     w_real, torch.from_numpy(b), stride, groups=c).clamp(0, 6).numpy()
    got = run(None, 4)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    q = (0.03, -5, -128, 127)
    np.testing.assert_array_equal(run(q, 4), run(q, 1))


@pytest.mark.parametrize("cin,cout,k,stride,groups,hw,batch,own", [
    (64, 64, 3, 1, 4, 14, 1, True),  # one flat conv call, the groups as its samples
    (32, 64, 3, 2, 2, 15, 1, True),  # strided small map: one im2col + GEMM call, the groups as its samples
    (48, 48, 3, 2, 3, 14, 1, True),  # 7x7 out (RegNet / ResNeXt 14 -> 7): the GEMM's tail pixels read their
    (32, 32, 3, 2, 2, 12, 1, True),  # group's weights through a flat view, which read group 0's (wrong outputs)
    (48, 96, 1, 1, 3, 7, 1, False),  # grouped 1x1: per group
    (64, 32, 3, 1, 32, 10, 1, True),  # 2-channel groups (ResNeXt's 4-channel ones: 1.85 -> 0.32 ms)
    (64, 64, 3, 1, 4, 14, 2, False)])  # batch 2: per group
def test_grouped_conv_runs_one_dense_kernel_per_group(cin, cout, k, stride, groups, hw, batch, own):
    """A grouped conv that is not depthwise (ResNeXt, RegNet, ShuffleNet's grouped 1x1) runs each group's channels
    through graphopt's dense kernels (TVM's grouped conv2d under the rules took 31x PyTorch's time), bias and ReLU
    in each group's store, and matches torch. At batch 1 a k x k one is ONE call of the flat conv or of im2col +
    the GEMM whose samples are the groups ([1, C, H, W] is [groups, C / groups, H, W] as it lies), each with its
    own packed weights, the threads splitting the groups; else one call per group, concatenated (by the copy
    kernel where each group's output rows are long)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups), torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    names = _func_names(g)
    assert "R.nn.conv2d" not in text and "R.nn.relu" not in text, names
    assert any(n.startswith(("conv1x1_packed", "conv_staged", "conv_flat", "conv_tok", "conv_direct"))
               for n in names), names
    joined = "R.concat" in text or any(n.startswith("concat_") for n in names)  # (the copy kernel: long runs)
    assert any(n.endswith("_own_weights") for n in names) == own and joined != own, names
    assert any("_across" in n for n in names) == own, names  # the threads split the groups
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("c,groups,hw,kernel", [(64, 4, 28, "conv_tok"),  # 16 channels a group: whole tiles
                                                 (128, 4, 9, "conv_tok"),  # 32, a 9x9 map
                                                 (128, 32, 28, "conv_flat"),  # ResNeXt's 4 a group
                                                 (96, 4, 20, "conv_flat"),  # 24: a tile and a half
                                                 (128, 4, 300, "conv_staged")])  # conv1d (one row, 300 steps)
def test_grouped_conv_takes_the_pixel_row_conv_where_groups_fill_its_tiles(c, groups, hw, kernel):
    """A grouped conv's groups as the samples of one call run the pixel-row conv where a group's output channels
    fill whole 16-channel tiles (0.72-0.74x the staged kernel's time at 16 and 32 a group), else the in-place flat
    conv (0.83x staged on ResNeXt's 4-channel groups); a grouped conv1d keeps the staged kernel (the pixel-row
    conv took 3.6x its time on 3 taps over 2000 steps). Each group reads its own weights; the output matches
    torch."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d if hw > 100 else torch.nn.Conv2d
    model = torch.nn.Sequential(conv(c, c, 3, 1, 1, groups=groups), torch.nn.ReLU()).eval()
    x = torch.randn(1, c, hw) if hw > 100 else torch.randn(1, c, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(kernel) and n.endswith("_own_weights") for n in names), names
    _assert_built_matches(g, model, x)


class _ComputedBiasConv(torch.nn.Module):
    """A conv whose bias is computed (b * 2), so it is not a constant the kernels can fold into their store."""

    def __init__(self, groups: int, dilation: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32, 32 // groups, 3, 3) * 0.1)
        self.b = torch.nn.Parameter(torch.randn(32))
        self.groups, self.dilation = groups, dilation

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.w, self.b * 2.0, 1, self.dilation, self.dilation, self.groups)


@pytest.mark.parametrize("groups,dilation", [(4, 1), (1, 2)])
def test_grouped_and_dilated_convs_with_a_computed_bias_keep_it(groups, dilation):
    """The per-group and phase-image rewrites take constant weights and biases only; with a computed bias the conv
    stays TVM's, bias included (the rewrites had dropped it: max error 4.6-5.1)."""
    torch.manual_seed(0)
    model, x = _ComputedBiasConv(groups, dilation).eval(), torch.randn(1, 32, 12, 12)
    _assert_built_matches(graphopt.trace(model, (x,)), model, x)


@pytest.mark.parametrize("cin,cout,k,d,stride,pad,hw,batch", [
    (16, 32, 3, 2, 1, 2, 20, 1), (16, 16, 3, 4, 1, 4, 17, 1), (12, 24, 3, 2, 1, 0, 15, 1), (16, 16, 5, 2, 1, 4, 12, 2),
    (3, 8, 3, 3, 1, 3, 19, 1),
    (16, 16, 3, 2, 2, 2, 30, 1), (12, 16, 5, 2, 2, 3, 21, 2)])  # stride 2, an odd map, batch 2
def test_dilated_conv_runs_on_the_pixel_row_conv(cin, cout, k, d, stride, pad, hw, batch):
    """A dilated conv (stride 1 or 2) runs on the pixel-row conv with its taps d apart in the zero-padded map, bias
    and ReLU in the store: no phase images split off and interleaved back (DeepLab's ASPP at 128x128 had spent
    more in those copies than in the conv), and TVM's dilated conv2d (13x PyTorch's time) is gone. Matches torch,
    with and without padding, at batch 2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, pad, dilation=d), torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    text = mod.script()
    assert "R.nn.conv2d" not in text and "R.nn.relu" not in text and "R.permute_dims" not in text
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("conv_tok") and f"s{stride}d{d}_" in n for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("c,cout,groups,d,stride,hw,batch,kernel", [
    (32, 32, 4, 2, 1, 12, 1, "im2col"), (64, 64, 2, 2, 1, 30, 1, "conv_tok"),  # batch 1: 8 x 9 x 144, 32 x 9 x 900
    (24, 48, 3, 3, 2, 17, 1, "im2col"), (16, 16, 2, 2, 1, 10, 2, "conv_tok"),  # strided; batch 2: per group
    (12, 24, 3, 2, 2, 15, 3, "conv_tok")])
def test_grouped_dilated_conv_runs_on_graphopt_kernels(c, cout, groups, d, stride, hw, batch, kernel):
    """A grouped conv with a dilation (SKNet's dilated branch): at batch 1 dilated im2col + the packed GEMM with
    the groups as samples (one call), or where a group's columns pass 2^17 values the pixel-row conv with taps d
    apart, one call whose samples are the groups where the cores divide them (0.90x the per-group calls on
    SKNet's), else per group; per group at batch > 1. TVM's grouped dilated conv2d (37 ms for 128 channels in 4
    groups at 28x28: 43x ORT's time) is gone; bias and ReLU fused; matches torch."""
    from graphopt.targets.tvm.cpu.rules import target_cores
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(c, cout, 3, stride, d, dilation=d, groups=groups),
                                torch.nn.ReLU()).eval()
    x = torch.randn(batch, c, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    text = mod.script()
    assert "R.nn.conv2d" not in text and "R.nn.relu" not in text
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith(kernel) for n in names), names
    if kernel == "conv_tok":
        assert any(f"s{stride}d{d}_" in n for n in names), names
        one = batch == 1 and groups % max(1, target_cores(cpu_target())) == 0
        assert any(n.startswith("conv_tok") and n.endswith("_own_weights") for n in names) == one, names
        assert ("R.split" in text) != one, names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("c,groups,batch", [(32, 32, 2), (48, 16, 1), (64, 16, 2)])
def test_depthwise_like_or_many_group_dilated_convs_keep_one_call(c, groups, batch):
    """Dilated convs with under 4 channels a group (dilated depthwise) skip the grouped paths (as one-channel
    GEMMs or one pixel-row conv a group they took 1.3-2.6x TVM's time), and at batch > 1 more than 8 groups are
    not split into separate convs; each still matches torch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, 1, 2, dilation=2, groups=groups), torch.nn.ReLU()).eval()
    x = torch.randn(batch, c, 14, 14)
    g = graphopt.trace(model, (x,))
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    assert not any(n.startswith(("conv_tok", "im2col")) for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,stride,pad,length,batch,bias,groups", [(64, 64, 5, 1, 2, 300, 1, True, 1),
                                                                           (32, 48, 3, 2, 1, 101, 1, True, 1),
                                                                           (16, 32, 1, 1, 0, 50, 2, False, 1),
                                                                           (3, 16, 7, 1, 3, 200, 1, True, 1),
                                                                           (64, 64, 16, 1, 8, 199, 1, True, 4),
                                                                           (48, 48, 5, 2, 2, 100, 1, True, 3),
                                                                           (32, 32, 3, 1, 1, 60, 2, False, 2),
                                                                           (64, 64, 15, 1, 7, 96, 1, True, 64),
                                                                           (16, 16, 3, 2, 1, 41, 2, False, 16)])
def test_conv1d_runs_on_the_2d_kernels(cin, cout, k, stride, pad, length, batch, bias, groups):
    """A 1-D conv (audio, time series) runs as a 2-D conv on a one-row map with a 1 x k kernel, on graphopt's
    kernels with bias and ReLU in the store (TVM's conv1d under the rules took 21x PyTorch's time); strided, 1x1,
    3-channel and batch-2 cases match torch. Grouped ones too (wav2vec2 / HuBERT's positional conv: TVM's grouped
    conv1d ran at ~1 GMAC/s, 2.9 ms of a small wav2vec2's 4), and depthwise ones (Conformer's 15 taps: TVM's took
    92 us for 256 channels at length 256, the depthwise kernel 20) on the depthwise kernel. A dense one with taps
    runs im2col + the packed GEMM, not the flat / pixel-row kernels (0.65-0.92x their time at TCN / audio shapes)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(cin, cout, k, stride, pad, bias=bias, groups=groups),
                                torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, length)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    text = mod.script()
    assert "R.nn.conv1d" not in text and "R.nn.relu" not in text
    names = {gv.name_hint for gv in mod.get_global_vars()}
    if groups == cin == cout:
        assert any(n.startswith(f"depthwise_{cin}x1x{length}") for n in names), names
    if groups == 1 and k > 1 and cin > 8:
        assert any(n.startswith("im2col_") for n in names) and not any(n.startswith("conv_tok") for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,d,stride,pad,length,batch", [(16, 24, 3, 2, 1, 2, 50, 1),
                                                                    (12, 16, 3, 4, 1, 0, 40, 2),
                                                                    (16, 16, 5, 3, 2, 6, 61, 1)])
def test_dilated_conv1d_runs_on_the_pixel_row_conv(cin, cout, k, d, stride, pad, length, batch):
    """A dilated conv1d (TCNs, WaveNet) runs on the pixel-row conv with its taps d apart on the one-row map, bias and
    ReLU in the store (TVM's conv1d had taken it); matches torch with padding, stride 2 and batch 2. Quantized, the
    same conv runs on the int8 pixel-row conv with VNNI (fold-qdq's qconv2d carries the dilation on both axes: with
    (1, d) an int8 TCN ran TVM's generic int8 conv, 2.7x ORT int8's time)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(cin, cout, k, stride, pad, dilation=d), torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, length)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    assert "R.nn.conv1d" not in mod.script() and "R.nn.relu" not in mod.script()
    assert any(gv.name_hint.startswith("conv_tok") and f"s{stride}d{d}_" in gv.name_hint
               for gv in mod.get_global_vars())
    _assert_built_matches(g, model, x)
    model.append(torch.nn.Conv1d(cout, 8, 1))
    q, got, ref = _quantized_block(model, (batch, cin, length))
    assert "R.nn.conv" not in lower_to_relax(q, target=cpu_target("znver4")).script()
    assert any(n.startswith("qconv_tok_vnni") and f"s{stride}d{d}_" in n for n in _func_names(q, "znver4"))
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


class _Residual(torch.nn.Module):
    """expand -> ReLU6 -> project, plus the block's input (MobileNetV2's inverted residual without the depthwise
    conv); `late`: the other operand is computed after the projection, so the add cannot join its kernel."""

    def __init__(self, c, hw, post, late=False):
        super().__init__()
        self.expand, self.project = torch.nn.Conv2d(c, 4 * c, 1), torch.nn.Conv2d(4 * c, c, 1)
        self.post, self.late = post, late

    def forward(self, x):
        y = self.project(torch.nn.functional.relu6(self.expand(x)))
        return self.post(y + (torch.sigmoid(x) if self.late else x))


@pytest.mark.parametrize("c,hw,post", [(24, 14, torch.nn.Identity()), (16, 7, torch.nn.ReLU()),
                                       (8, 13, torch.nn.ReLU6())])  # 196, 49 and 169 pixels: the column tails too
def test_residual_add_joins_the_pointwise_kernel(c, hw, post):
    torch.manual_seed(0)
    model, x = _Residual(c, hw, post).eval(), torch.randn(1, c, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    tag = "_res" if isinstance(post, torch.nn.Identity) else "_res_clamp"
    assert any(n.startswith(f"conv1x1_packed_{c}x{4 * c}x{hw * hw}{tag}") for n in names), names
    text = mod.script()
    assert "R.add" not in text and "R.clip" not in text and "R.nn.relu" not in text
    _assert_built_matches(g, model, x)


class _Block(torch.nn.Module):
    """A stride-2 stem (direct kernel), pointwise expand, depthwise 3x3 on a large map (row kernel, stride 1 and 2)
    and a 5x5 on a 10x10 one (channel-group kernel), pointwise project with a residual add: every float conv kernel."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, 2, 1)
        self.expand = torch.nn.Conv2d(8, 24, 1)
        self.dw = torch.nn.Conv2d(24, 24, 3, 1, 1, groups=24)
        self.dw_small = torch.nn.Conv2d(24, 24, 3, 2, 1, groups=24)
        self.project = torch.nn.Conv2d(24, 8, 1)
        self.dw_tiny = torch.nn.Conv2d(24, 24, 5, 2, 2, groups=24)

    def forward(self, x):
        y = self.stem(x)
        z = torch.nn.functional.relu6(self.dw(torch.nn.functional.relu6(self.expand(y))))
        y = y + self.project(z)
        return self.dw_tiny(self.dw_small(self.expand(y)))


@pytest.mark.parametrize("batch", [2, 3, 4])
def test_batched_convs_run_the_batch1_kernels_per_sample(batch):
    """Batch N > 1 takes graphopt's conv kernels, each looping over the samples (before, it fell back to TVM's
    conv: MobileNetV2 at batch 4 took 2.65x ORT's time, now ~1.0x), and matches PyTorch sample by sample. Where
    the build's cores divide the batch, the threads split the samples (one fork a call; each thread runs whole
    samples, their tasks in turn); otherwise each sample's tasks are split."""
    from graphopt.targets.tvm.cpu.rules import target_cores
    torch.manual_seed(0)
    model, x = _Block().eval(), torch.randn(batch, 3, 80, 80)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g, target=cpu_target())
    names = {gv.name_hint for gv in mod.get_global_vars()}
    for kernel in ("conv_direct_8x3x80x80", "conv1x1_packed_24x8x1600", "depthwise_24x40x40",
                   "depthwise_cb_24x20x20_k5s2", "conv1x1_packed_8x24x1600_res"):
        assert any(n.startswith(kernel) and n.endswith(f"_n{batch}") for n in names), (kernel, names)
    assert not any(n.startswith("conv2d") for n in names), names
    cores = target_cores(cpu_target())
    across = cores > 1 and batch % cores == 0
    for gv, f in mod.functions.items():
        if gv.name_hint.startswith("conv1x1_packed_24x8x1600"):
            text = f.script()
            assert (f"n_ in T.parallel({batch})" in text) == across, text[:600]
            assert ("T.parallel(" in text.replace(f"n_ in T.parallel({batch})", "")) != across, text[:600]
    _assert_built_matches(g, model, x)


class _BasicBlock(torch.nn.Module):
    """ResNet's basic block with a stride-2 3x3 conv, a 1x1 stride-2 shortcut, and the residual add + ReLU after
    the second 3x3 conv; and an asymmetric zero pad before a last 3x3 conv (TF "SAME")."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(16, 32, 3, 2, 1), torch.nn.Conv2d(32, 32, 3, 1, 1)
        self.down, self.c3 = torch.nn.Conv2d(16, 32, 1, 2), torch.nn.Conv2d(32, 24, 3)

    def forward(self, x):
        shortcut = self.down(x)  # computed first, so the add can join the second conv's store
        y = torch.relu(self.c2(torch.relu(self.c1(x))) + shortcut)
        return self.c3(torch.nn.functional.pad(y, (0, 1, 0, 1)))


@pytest.mark.parametrize("batch,hw,lanes", [(1, 20, 8), (2, 20, 8), (1, 40, 8), (2, 40, 8), (1, 20, 16), (2, 40, 16)])
def test_dense_convs_run_on_the_pixel_row_kernel(batch, hw, lanes, monkeypatch):
    """3x3 convs with more than 8 input channels, at stride 1 and 2: the zero-padded input, then the pixel-row
    conv (output pixels broadcast, output channels in the vectors; bias, the residual add and ReLU in its store);
    the pad before the last conv joins its padding; the strided 1x1 shortcut is im2col + the packed pointwise
    GEMM. No TVM conv is left (TVM's conv with the rules ran them at 5-15 GMAC/s: ResNet-18 316 ms). Built for 8-
    and for 16-lane vectors on any host: with 16, the 32-channel convs take 32-channel tiles, the 24-channel one
    16."""
    from graphopt.targets.tvm.cpu import rules
    from graphopt.targets.tvm.cpu.conv import tok_channels
    assert (tok_channels(32, 16), tok_channels(24, 16), tok_channels(32, 8)) == (32, 16, 16)
    monkeypatch.setattr(rules, "vector_lanes", lambda target, dtype_bits=32: lanes * 32 // dtype_bits)
    torch.manual_seed(0)
    model, x = _BasicBlock().eval(), torch.randn(batch, 16, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    nt = f"_n{batch}" if batch > 1 else ""
    h2 = hw // 2
    # the stride-1 32 -> 32 conv on 20x20 runs as Winograd (tests/targets/test_winograd.py), which reads the map
    # itself (masked loads: no zero-padded copy); on 10x10 (5-tile rows) on the pixel-row conv
    wino = h2 >= 11
    assert wino != any(n.startswith(f"pad_phases_32x{h2}x{h2}_k3x3s1_p1111") for n in names), names
    expected = (f"pad_phases_16x{hw}x{hw}_k3x3s1_p1111", f"conv_tok_32x16x{hw}x{hw}_k3x3s2_p1111_clamp",
                f"conv_{'winograd' if wino else 'tok'}_32x32x{h2}x{h2}_k3x3s1_p1111_res_clamp",
                f"conv_tok_24x32x{h2}x{h2}_k3x3s1_p0101",  # the pad joined the last conv
                f"im2col_16x{hw}x{hw}_k1s2_p0000", f"conv1x1_packed_32x16x{h2 * h2}")  # the strided 1x1 shortcut
    for kernel in expected:
        assert any(n.startswith(kernel) and n.endswith(nt) for n in names), (kernel, names)
    assert not any("conv2d" in n for n in names), names  # no TVM conv left
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("k,stride,pad,hw", [(5, 2, (2, 1), (40, 47)), (3, 3, (1, 0), (52, 61)), (3, 1, (1, 1), (3, 9)),
                                             (3, 1, (1, 1), (2, 2))])
def test_dense_conv_geometries_on_every_candidate(k, stride, pad, hw):
    """Each kernel a dense kxk conv may run on (the pixel-row conv, the staged and the in-place flat implicit
    GEMMs) for other kernels, strides (3: nine phase planes, where the pixel-row conv does not apply), uneven
    padding, non-square maps and 13 output channels (a partial panel of either kind); a map whose flat output range
    is exactly one tile (3x9 with a 3x3 kernel: 16 pixels) still runs the flat ones, one under a tile (2x2: four
    pixels, under the pixel-row conv's 6-pixel tile) only the pixel-row one. Matches PyTorch at batch 2."""
    from graphopt.targets.tvm.cpu import knobs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(12, 13, k, stride=stride, padding=pad), torch.nn.ReLU()).eval()
    x = torch.randn(2, 12, *hw)
    g = graphopt.trace(model, (x,))
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    sites = [s for s in col.sites.values() if s.family == "conv_kxk"]
    if hw == (2, 2):
        assert not sites  # (one candidate: nothing to tune)
        kernels, records = ["tok"], lambda kernel: {}
    else:
        (site,) = sites
        kernels, records = [c["kernel"] for c in site.candidates], lambda kernel: {site.name: {"kernel": kernel}}
        assert kernels == (["staged", "flat"] if stride == 3 else ["tok", "staged", "flat"])
    for kernel in kernels:
        with knobs.applied(records(kernel)):
            assert any(n.startswith(f"conv_{kernel}_13x12") for n in _func_names(g)), (kernel, _func_names(g))
            _assert_built_matches(g, model, x)


def _flat_conv_args(cin: int, cout: int, hw, k: int, stride: int, pad, res: bool):
    """Random phase planes, packed taps, bias (and a residual) for a flat conv kernel, and its output shape."""
    from graphopt.targets.tvm.cpu.conv import MR, flat_geometry
    oh, ow, hq, wq = flat_geometry(*hw, k, k, stride, pad)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(cin * stride * stride * hq * wq).astype(np.float32),
            rng.standard_normal((-(-cout // MR), k * k * cin, MR)).astype(np.float32),
            rng.standard_normal(-(-cout // MR) * MR).astype(np.float32)]
    if res:
        args.append(rng.standard_normal((cout, oh, ow)).astype(np.float32))
    return args, (cout, oh, ow)


def _run_kernel(f, args, out_shape) -> np.ndarray:
    """Compile one kernel PrimFunc, run it on the arrays into a NaN-filled output, return the output."""
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    return out.numpy()


@pytest.mark.parametrize("hw,k,stride,pad,res", [((56, 56), 3, 1, (1, 1, 1, 1), True), ((7, 7), 3, 1, (1, 1, 1, 1), True),
                                                 ((14, 14), 3, 1, (1, 1, 1, 1), False),
                                                 ((40, 47), 5, 2, (2, 1, 1, 2), False), ((3, 9), 3, 1, (1, 1, 1, 1), True)])
def test_flat_conv_vector_store_equals_the_per_lane_one(hw, k, stride, pad, res):
    """The flat conv's AVX store (plain vector stores for a tile inside one output row, masked ones per row for a
    tile crossing rows: up to three rows on a 7x7 map, where a plane row is 9 wide) writes exactly what the per-lane
    store does, with bias, residual add and ReLU6; `vmaskmovps` is emitted, and the only scalar stores left are
    masks that keep one lane (LLVM narrows those to `vmovss` once it knows the tile: at most one per channel and
    one-lane piece, where the per-lane store loops over every pixel)."""

    from graphopt.targets.tvm.cpu.conv import MR, NR_FLAT, flat_geometry
    from graphopt.targets.tvm.cpu.conv import flat_conv_source
    if vector_lanes(cpu_target()) < 8:
        pytest.skip("needs AVX")
    cin, cout = 5, 13
    oh, ow, _, wq = flat_geometry(*hw, k, k, stride, pad)
    qmax = (oh - 1) * wq + ow
    one_lane = sum(sum(0 <= x0 + hv * 8 - s * wq + lane < ow for lane in range(8)) == 1
                   for q0 in range(0, qmax, NR_FLAT) for x0 in [min(q0, qmax - NR_FLAT) % wq]
                   for hv in range(NR_FLAT // 8) for s in range(1 + (wq + NR_FLAT - 2) // wq))
    args, out_shape = _flat_conv_args(cin, cout, hw, k, stride, pad, res)
    outs = {}
    for masked in (False, True):
        f = parse_kernel(flat_conv_source(cout, cin, *hw, k, k, stride, pad, (0.0, 6.0), res, masked))
        outs[masked] = _run_kernel(f, args, out_shape)
        stores = re.findall(r"vmovss\s+%xmm\d+, -?\d*\(|vmaskmovps", _asm(f))  # scalar float stores, masked ones
        assert ("vmaskmovps" in stores) == masked and (masked or stores)
        assert not masked or sum("vmovss" in st for st in stores) <= MR * one_lane
    assert not np.isnan(outs[False]).any()
    np.testing.assert_array_equal(outs[True], outs[False])


@pytest.mark.parametrize("batch,k", [(1, 2), (2, 2), (1, 3)])
def test_stride_equals_kernel_transposed_conv_is_the_packed_gemm(batch, k):
    """A UNet's upsampling ConvTranspose (kernel == stride, no padding): the packed GEMM with the weight as
    [(Cout, a, b), Cin], then a pixel shuffle; matches PyTorch. A transposed conv with overlapping blocks (kernel 3,
    stride 2) takes the phase conv (`test_transposed_conv_is_one_phase_conv_and_a_pixel_shuffle`)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(24, 16, k, stride=k), torch.nn.ConvTranspose2d(16, 8, 3, 2),
                                torch.nn.ReLU()).eval()
    x = torch.randn(batch, 24, 6, 5)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    nt = f"_n{batch}" if batch > 1 else ""
    assert f"conv1x1_packed_{16 * k * k}x24x30{nt}" in {gv.name_hint for gv in mod.get_global_vars()}
    assert "R.nn.conv2d_transpose" not in mod.script()
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,s,p,op,shape,relu", [
    (32, 16, 4, 2, 1, 0, (1, 32, 9, 9), True),  # DCGAN / UNet decoder upsampling
    (32, 16, 3, 2, 1, 1, (2, 32, 9, 11), True),  # output padding, batch 2; 3 taps: one phase has a zero tap
    (16, 8, 5, 3, 2, 0, (1, 16, 7, 6), False),
    (16, 8, 3, 1, 1, 0, (1, 16, 10, 10), False),  # stride 1: the flipped kernel
    (16, 8, (4, 3), (2, 1), 1, 0, (1, 16, 10, 10), False),
    (16, 8, 4, 2, 3, 0, (1, 16, 10, 10), False),  # padding beyond the taps of the first phase row
    (64, 32, 16, 8, 4, 0, (1, 64, 20), False),  # HiFi-GAN's 1-D upsampler
    (16, 8, 3, 2, 1, 1, (2, 16, 21), True),
])
def test_transposed_conv_is_one_phase_conv_and_a_pixel_shuffle(cin, cout, k, s, p, op, shape, relu):
    """A transposed conv runs as one stride-1 conv whose s_h s_w Cout output channels are its output phases (each a
    ceil(k / s)-tap flipped kernel), on graphopt's kernels with bias and ReLU in the store, then interleaved and
    cut: TVM's conv2d_transpose took 90x PyTorch's time. Matches torch for 1-D and 2-D, uneven strides, output
    padding, taps not a multiple of the stride and batch 2."""
    torch.manual_seed(0)
    conv = (torch.nn.ConvTranspose1d if len(shape) == 3 else torch.nn.ConvTranspose2d)(cin, cout, k, s, p, op,
                                                                                      bias=not relu)
    model = torch.nn.Sequential(conv, torch.nn.ReLU() if relu else torch.nn.Identity()).eval()
    x = torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    assert "_transpose(" not in text and "R.nn.relu" not in text, text
    _assert_built_matches(g, model, x)


def test_grouped_transposed_conv_leaves_tvms_op():
    """A grouped transposed conv had kept TVM's conv2d_transpose (58 ms for 4 groups of 64 channels at 32 x 32,
    ONNX Runtime 0.87); since the seventy-fourth session it is the grouped conv of its phase kernels on graphopt's
    kernels (tests/targets/test_volumes.py has the shapes)."""
    torch.manual_seed(0)
    grouped = torch.nn.ConvTranspose2d(16, 8, 4, 2, 1, groups=2).eval()
    x = torch.randn(1, 16, 6, 6)
    g = graphopt.trace(grouped, (x,))
    assert "R.nn.conv2d_transpose" not in lower_to_relax(g).script()
    _assert_built_matches(g, grouped, x)


@pytest.mark.parametrize("w", [9, 31])  # 9: the scalar copy; 31 (12+ output columns): whole vectors per tap column
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_im2col_is_the_patch_matrix(w, dtype):
    """The im2col kernel alone equals torch's unfold, for stride 1 and 2 with padding on every side (outside the
    image: the fill value), in channel-major and tap-major row order, float and int8."""
    from graphopt.targets.tvm.cpu.conv import im2col_source
    for stride, (pt, pl), k in ((1, (1, 1), 3), (2, (1, 0), 3), (1, (0, 2), 3), (2, (3, 3), 7), (2, (1, 1), 3)):
        c, h = 3, 7
        oh, ow = (h + 2 * pt - k) // stride + 1, (w + 2 * pl - k) // stride + 1
        x = torch.randint(-100, 100, (c, h, w)).to(getattr(torch, dtype))
        fill = 5
        ref = torch.nn.functional.unfold(torch.nn.functional.pad(x[None].double() - fill, (pl, pl, pt, pt)), k,
                                         stride=stride)[0][:, :oh * ow] + fill
        for tap_major in (False, True):
            f = parse_kernel(im2col_source(c, h, w, oh, ow, k, k, stride, pt, pl, dtype=dtype,
                                           tap_major=tap_major))
            lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
            out = tvm.runtime.tensor(np.zeros((c * k * k, oh * ow), dtype))
            lib["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(np.full(1, fill, dtype)), out)
            want = ref.reshape(c, k * k, -1).transpose(0, 1).reshape(c * k * k, -1) if tap_major else ref
            np.testing.assert_array_equal(out.numpy(), want.numpy().astype(dtype))


def test_residual_add_stays_separate_when_its_operand_comes_later():
    torch.manual_seed(0)
    model, x = _Residual(8, 6, torch.nn.Identity(), late=True).eval(), torch.randn(1, 8, 6, 6)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    assert "R.add" in mod.script()
    assert not any("_res" in gv.name_hint for gv in mod.get_global_vars())
    _assert_built_matches(g, model, x)


def test_stem_tasks_read_back_the_split_rows_their_thread_wrote():
    """The stride-2 direct conv's column split and its tasks both run row-major (output row outer, channel panel
    inner), so each thread's static share of the tasks reads the split rows its own share wrote (not the other
    core's: the 224x224 stem at 2 threads 266 -> 198 us); outputs stay PyTorch's."""
    from graphopt.targets.tvm.cpu.conv import direct_conv_source
    src = direct_conv_source(32, 3, 224, 224, 112, 112, 3, 3, 2, 1, 1, (0.0, 6.0))
    assert "xe[r % 3, r // 3, " in src and "xe[r // 224" not in src
    assert "out[(t % 6) * 6 + r, t // 6, " in src and "t % 112" not in src
    torch.manual_seed(0)
    model, x = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 2, 1), torch.nn.ReLU6()).eval(), torch.randn(1, 3, 66, 66)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("conv_direct_16x3x66x66_k3s2") for n in _func_names(g))
    _assert_built_matches(g, model, x)


class _Inverted(torch.nn.Module):
    """MobileNetV2's inverted residual: pointwise expand (`act_e` after it) -> k x k depthwise (stride s, "same"
    padding; `act_d` after it) -> pointwise project; `tap`: the expanded map also feeds the output (a second user)."""

    def __init__(self, cin, c, k, s, act_e, act_d, bias=True, tap=False, pad=None, pad_value=0.0):
        super().__init__()
        self.expand = torch.nn.Conv2d(cin, c, 1)
        # `pad` (left, right, top, bottom): an explicit pad before an unpadded depthwise conv (TF "SAME")
        self.pad = torch.nn.Identity() if pad is None else torch.nn.ConstantPad2d(pad, pad_value)
        self.dw = torch.nn.Conv2d(c, c, k, s, k // 2 if pad is None else 0, groups=c, bias=bias)
        self.project = torch.nn.Conv2d(c, cin, 1)
        self.act_e, self.act_d, self.tap = act_e, act_d, tap
        for m in (self.expand, self.dw):  # biases that move the clamps
            if m.bias is not None:
                torch.nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, x):
        e = self.act_e(self.expand(x))
        y = self.project(self.act_d(self.dw(self.pad(e))))
        return (y, e.mean()) if self.tap else y


def _unfused(monkeypatch):
    from graphopt.targets.tvm.cpu import conv
    monkeypatch.setattr(conv, "expand_dw_plan", lambda *a, **kw: None)


@pytest.mark.parametrize("cin,c,hw,k,s,act_e,act_d,bias", [
    (8, 24, 40, 3, 1, torch.nn.ReLU6(), torch.nn.ReLU6(), True),  # one band of 40 rows
    (8, 24, 64, 3, 2, torch.nn.ReLU6(), torch.nn.ReLU6(), True),  # three bands of 11 output rows (halos shared)
    (16, 24, 56, 3, 1, torch.nn.ReLU(), torch.nn.Identity(), False),  # two bands, no depthwise bias or clamp
    (8, 30, 36, 5, 1, torch.nn.Identity(), torch.nn.ReLU6(), True),  # 5x5 taps, no clamp on the expansion
])
def test_expansion_and_depthwise_run_as_one_kernel(cin, c, hw, k, s, act_e, act_d, bias, monkeypatch):
    """A pointwise expansion whose output (after a clamp) meets only a depthwise conv the row kernel takes runs
    with it in one kernel (the expanded map never stored): no pointwise or depthwise kernel of those layers is
    left, the outputs match PyTorch, and they are bit-identical to the two kernels' (the same sums in the same
    order)."""
    torch.manual_seed(0)
    model, x = _Inverted(cin, c, k, s, act_e, act_d, bias).eval(), torch.randn(1, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(f"expand_dw_{c}x{cin}x{hw}x{hw}_k{k}s{s}") for n in names), names
    assert not any(n.startswith((f"conv1x1_packed_{c}x{cin}x", f"depthwise_{c}x", "depthwise_cb")) for n in names)
    fused = _run_built(g, x)
    ref = model(x).detach().numpy()
    assert np.abs(fused - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    _unfused(monkeypatch)
    assert any(n.startswith(f"depthwise_{c}x{hw}x{hw}_k{k}s{s}") for n in _func_names(g))
    assert np.array_equal(fused, _run_built(g, x))


def test_expansion_with_a_second_user_or_a_small_map_keeps_its_own_kernels():
    """The expanded map read elsewhere too (it has to be stored), and a 14x14 map (its depthwise layer on the
    channel-group kernel): no fusion, outputs still PyTorch's."""
    from graphopt.targets.tvm.cpu.conv import expand_dw_plan
    torch.manual_seed(0)
    for model, x in ((_Inverted(8, 24, 3, 1, torch.nn.ReLU6(), torch.nn.ReLU6(), tap=True), torch.randn(1, 8, 40, 40)),
                     (_Inverted(16, 96, 3, 1, torch.nn.ReLU6(), torch.nn.ReLU6()), torch.randn(1, 16, 14, 14))):
        g = graphopt.trace(model.eval(), (x,))
        names = _func_names(g)
        assert not any(n.startswith("expand_dw") for n in names), names
        got = _run_built(g, x)
        ref = model(x)
        ref = (ref[0] if isinstance(ref, tuple) else ref).detach().numpy()
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    assert expand_dw_plan(16, 96, 112, 112, 3, 2, 16) == (8, 7)  # MobileNetV2's first expansion: 7 bands of 8 rows
    assert expand_dw_plan(16, 100, 112, 112, 3, 2, 16) is None  # channels not in whole panels of 6
    assert expand_dw_plan(64, 384, 14, 14, 3, 1, 16) is None  # channel-group depthwise kernel
    from graphopt.targets.tvm.cpu.conv import expand_cb_applies
    assert expand_cb_applies(384, 14, 14, 3, 1, 16)  # which takes it with 16 lanes (MobileNetV2's 14x14 blocks)
    assert not expand_cb_applies(384, 14, 14, 3, 1, 8)  # 8-lane CPUs: not measured
    assert not expand_cb_applies(960, 7, 7, 3, 1, 16)  # 7x7 maps: no gain
    assert not expand_cb_applies(96, 14, 14, 3, 1, 16)  # under CB16_MIN_CHANNELS: 8-channel groups
    from graphopt.targets.tvm.cpu.conv import balanced_per_task
    # tasks sized so that the busiest of two threads has the fewest units: 36 in threes (6 tasks each), not in
    # fours (9 tasks: 5 and 4); 12 pairs one a task; with 4 threads 36 units in threes too (12 tasks, 3 each)
    assert (balanced_per_task(36, 2), balanced_per_task(12, 2), balanced_per_task(36, 4)) == (3, 1, 3)


@pytest.mark.parametrize("cin,c,hw,k,s,act_e,act_d,bias", [
    (16, 192, 14, 3, 1, torch.nn.ReLU6(), torch.nn.ReLU6(), True),  # a 14x14 block: 6 pairs of 16-channel groups
    (24, 208, 14, 3, 2, torch.nn.ReLU(), torch.nn.Identity(), False),  # stride 2; 13 groups: the last one alone
    (32, 320, 10, 3, 1, torch.nn.Identity(), torch.nn.ReLU6(), True),  # 10-pixel rows, no expansion clamp
    (16, 192, 14, 5, 1, torch.nn.ReLU6(), torch.nn.ReLU6(), True),  # 5x5 taps
])
def test_expansion_and_channel_group_depthwise_run_as_one_kernel(cin, c, hw, k, s, act_e, act_d, bias,
                                                                   monkeypatch):
    """With 16-lane vectors an expansion whose depthwise conv takes the 16-channel group kernel (maps 8-14 pixels
    wide, 192+ channels) runs with it as one kernel that fills each pair of groups' tiles with the expansion
    itself: no pointwise or depthwise kernel of those layers is left, and the outputs match PyTorch and the two
    kernels'."""
    from graphopt.targets.tvm.cpu import conv, rules
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 512)
    torch.manual_seed(0)
    model, x = _Inverted(cin, c, k, s, act_e, act_d, bias).eval(), torch.randn(1, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g, "sapphirerapids")
    assert any(n.startswith(f"expand_cb16_{c}x{cin}x{hw}x{hw}_k{k}s{s}") for n in names), names
    assert not any(n.startswith((f"conv1x1_packed_{c}x{cin}x", "depthwise_")) for n in names), names
    fused = _run_built(g, x)  # (on a host without AVX-512: 8 lanes, the two kernels)
    ref = model(x).detach().numpy()
    assert np.abs(fused - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    monkeypatch.setattr(conv, "expand_cb_applies", lambda *a, **kw: False)
    assert any(n.startswith(f"depthwise_cb16_{c}x{hw}x{hw}_k{k}s{s}") for n in _func_names(g, "sapphirerapids"))
    assert np.abs(fused - _run_built(g, x)).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("cin,c,hw,k,s,pad,kernel", [
    (8, 24, 64, 3, 2, (0, 1, 0, 1), "expand_dw"),  # TF "SAME" at stride 2 (EfficientNet-Lite0's 96 x 112 x 112)
    (8, 24, 40, 3, 1, (0, 2, 1, 1), "expand_dw"),  # top 1, left 0
    (16, 192, 14, 5, 2, (1, 2, 1, 2), "expand_cb16"),  # EfficientNet-Lite0's 672 x 14 x 14 5x5 stride 2
    (24, 208, 14, 3, 2, (1, 0, 0, 1), "expand_cb16"),  # top 0, left 1
])
def test_a_same_pad_between_expansion_and_depthwise_joins_the_fused_kernel(cin, c, hw, k, s, pad, kernel, monkeypatch):
    """A zero pad between the expansion and its depthwise conv whose output is "same" padding's size (TF "SAME",
    more at the bottom / right) is done by the fused kernel; outputs match PyTorch and the unfused kernels."""
    from graphopt.targets.tvm.cpu import conv, rules
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 512)
    torch.manual_seed(0)
    model = _Inverted(cin, c, k, s, torch.nn.ReLU6(), torch.nn.ReLU6(), pad=pad).eval()
    x = torch.randn(1, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g, "sapphirerapids")
    assert any(n.startswith(f"{kernel}_{c}x{cin}x{hw}x{hw}_k{k}s{s}_clamp_p{pad[2]}{pad[0]}") for n in names), names
    assert not any(n.startswith((f"conv1x1_packed_{c}x{cin}x", "depthwise_", "pad")) for n in names), names
    fused = _run_built(g, x)
    ref = model(x).detach().numpy()
    assert np.abs(fused - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6
    monkeypatch.setattr(conv, "expand_pads", lambda *a, **kw: None)
    assert not any(n.startswith("expand_") for n in _func_names(g, "sapphirerapids"))
    assert np.abs(fused - _run_built(g, x)).max() <= 1e-6 * np.abs(ref).max()


def test_other_pads_before_the_depthwise_keep_the_kernels_apart():
    """More padding at the top than k // 2, or a pad of ones: not the fused kernels' "same" zero padding."""
    from graphopt.targets.tvm.cpu.conv import expand_pads
    assert expand_pads(112, 112, 3, 2, (0, 1, 0, 1)) == (0, 0)
    assert expand_pads(14, 14, 5, 2, (1, 2, 1, 2)) == (1, 1)
    assert expand_pads(40, 40, 3, 1, (2, 0, 1, 1)) is None  # 2 rows above a 3x3 tap
    assert expand_pads(40, 40, 3, 1, (0, 0, 1, 1)) is None  # output 38 rows, not 40
    torch.manual_seed(0)
    for pad, value in (((0, 0, 2, 0), 0.0), ((0, 1, 0, 1), 1.0)):
        model = _Inverted(8, 24, 3, 1 if value == 0.0 else 2, torch.nn.ReLU6(), torch.nn.ReLU6(), pad=pad,
                          pad_value=value).eval()
        x = torch.randn(1, 8, 40, 40)
        g = graphopt.trace(model, (x,))
        assert not any(n.startswith("expand_") for n in _func_names(g)), pad
        ref = model(x).detach().numpy()
        assert np.abs(_run_built(g, x) - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("c,hw,k,stride,act", [(16, 7, 5, 1, torch.nn.ReLU6()), (24, 14, 3, 1, torch.nn.Identity()),
                                               (8, 14, 5, 2, torch.nn.ReLU()), (32, 13, 3, 2, torch.nn.ReLU6()),
                                               (16, 4, 3, 1, torch.nn.Identity()), (8, 3, 3, 1, torch.nn.ReLU6()),
                                               (16, 11, 3, 1, torch.nn.ReLU()),  # 11 = 6 + 6 overlapping
                                               (12, 7, 5, 1, torch.nn.ReLU6()), (20, 14, 3, 1, torch.nn.Identity()),
                                               (16, 14, 5, 1, torch.nn.ReLU6()),  # 5x5, 14 wide: 2 rows a step
                                               (8, 11, 5, 1, torch.nn.Identity()),  # 11 rows: the last pair overlaps
                                               (8, 28, 5, 1, torch.nn.ReLU6()),  # 5x5 on 28x28: a 32 KB tile
                                               (152, 7, 3, 1, torch.nn.ReLU6()),  # 19 groups: 2 a task, 1 left
                                               (276, 14, 3, 2, torch.nn.Identity())])  # 35 groups, 3 a task
def test_small_map_depthwise_runs_over_channel_groups(c, hw, k, stride, act):
    """7x7 / 14x14 maps (and 28x28 ones with 5x5 taps) take the channel-blocked kernel: 8x8 transposes back to
    NCHW (the last block of 8 pixels overlapping), odd sizes with stride 2, tiny maps (3x3: 9 outputs), a last
    group of fewer than 8 channels (12, 20, 276), and tasks of several groups whose last task is short (152, 276
    on a 2-core host: `balanced_per_task`)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c), act).eval()
    x = torch.randn(1, c, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(("depthwise_cb_", "depthwise_cb16_")) for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("c,h,wd,k,stride,pad", [
    (5, 40, 42, 3, 2, (1, 1, 1, 1)),    # stride 2: even/odd planes from 16- and 8-byte chunks, a scalar tail
    (3, 24, 37, 3, 1, (1, 1, 1, 1)),    # stride 1: one padded plane; 37 = 4 chunks of 8 + 4 + 1 scalar
    (4, 71, 73, 5, 2, (2, 2, 2, 2)),    # 5x5 stride 2 (the rule's phase kernel), odd sizes
    (3, 40, 40, 3, 2, (0, 1, 0, 1)),    # TF "SAME": zero padding right and bottom only
    (2, 200, 12, 3, 1, (1, 1, 1, 1))])  # 8-15 output columns: 8-lane vectors
def test_depthwise_reads_int8_input_as_the_float_kernel_reads_its_floats(c, h, wd, k, stride, pad):
    """With x_q the row and phase kernels take the int8 input and convert each channel's rows to the floats of its
    grid into column phase planes of the padded row (`_depthwise_int8_planes`): the same products summed in the
    same order as the float kernel on the dequantized input, so float outputs and int8 stores are equal, and both
    match torch."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import conv as k_
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(3)
    sx, zx = 0.04, 7
    xq = rng.integers(-128, 128, (1, c, h, wd)).astype(np.int8)
    xf = ((xq.astype(np.float32) - zx) * np.float32(sx)).astype(np.float32)
    w8, ws = rng.integers(-127, 128, (c, 1, k, k)).astype(np.int8), rng.uniform(0.005, 0.02, c)
    b = rng.standard_normal(c).astype(np.float32)

    def run(x, out_q):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(k_.emit_depthwise(bb, xv, w8, b, x.shape, stride, pad, (0.0, 6.0), out_q,
                                                     w_scale=ws, x_q=(sx, zx) if x.dtype == np.int8 else None))
            bb.emit_func_output(y)
        mod = bb.get()
        names = {gv.name_hint for gv in mod.get_global_vars() if "depthwise" in gv.name_hint}
        assert all(n.startswith("depthwise_i8in_") == (x.dtype == np.int8) for n in names) and names, names
        return relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    got = run(xq, None)
    w_real = torch.from_numpy((w8.astype(np.float64) * ws.reshape(-1, 1, 1, 1)).astype(np.float32))
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(xf), (pad[2], pad[3], pad[0], pad[1])),
                                     w_real, torch.from_numpy(b), stride, groups=c).clamp(0, 6).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_array_equal(got, run(xf, None))
    q = (0.03, -5, -128, 127)
    np.testing.assert_array_equal(run(xq, q), run(xf, q))


def test_depthwise_int8_input_on_a_tuned_float_kernel_is_dequantized_first():
    """A layer whose rule kernel reads int8 (so its producer stores int8) but which tuning moved to the
    channel-blocked kernel gets its input dequantized by a function before that kernel: the same outputs as that
    kernel on the float input."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import conv as k_
    from graphopt.targets.tvm.cpu import knobs
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(4)
    c, hw, sx, zx = 8, 28, 0.05, -3
    assert k_.depthwise_int8_input(c, hw, hw, 3, 3, 1)  # the rule: the row kernel, int8 in
    xq = rng.integers(-128, 128, (1, c, hw, hw)).astype(np.int8)
    xf = ((xq.astype(np.float32) - zx) * np.float32(sx)).astype(np.float32)
    w8, ws = rng.integers(-127, 128, (c, 1, 3, 3)).astype(np.int8), rng.uniform(0.005, 0.02, c)
    b = rng.standard_normal(c).astype(np.float32)

    def module(x):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, str(x.dtype)))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(k_.emit_depthwise(bb, xv, w8, b, x.shape, 1, (1, 1, 1, 1), (0.0, 6.0), None,
                                                     w_scale=ws, x_q=(sx, zx) if x.dtype == np.int8 else None))
            bb.emit_func_output(y)
        return bb.get()

    with knobs.collecting() as col:
        module(xq)
    (site,) = col.sites
    outs = []
    for x in (xq, xf):
        with knobs.applied({site: {"kernel": "channels"}}):
            mod = module(x)
        names = {gv.name_hint for gv in mod.get_global_vars()}
        assert any(n.startswith("depthwise_cb_") for n in names) and not any("i8in" in n for n in names), names
        outs.append(relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](
            tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


@pytest.mark.parametrize("c,hw,k,stride,pad", [(32, 7, 5, 1, (2, 2, 2, 2)), (40, 14, 3, 1, (1, 1, 1, 1)),  # 40: 16+16+8
                                                 (36, 14, 5, 2, (1, 2, 1, 2)),   # TF "SAME", 36 = 16+16+4 channels
                                                 (16, 11, 3, 2, (1, 1, 1, 1)), (24, 28, 5, 1, (2, 2, 2, 2))])
def test_small_map_depthwise_in_16_channel_groups_equals_8_channel_groups(c, hw, k, stride, pad, monkeypatch):
    """With 16 lanes (and CB16_MIN_CHANNELS channels, lowered here to take these small layers) the channel-blocked
    kernel works on 16 channels a task (two 8x8 transposes per 8 pixels, one for each half of the group): the same
    sums in the same order as 8-channel groups, so float outputs and int8 stores are equal, and the float ones match
    torch; a last group of fewer than 16 (and fewer than 8) channels stores only its own."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import conv as k_
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    w = rng.standard_normal((c, 1, k, k)).astype(np.float32)
    w8, ws = rng.integers(-127, 128, (c, 1, k, k)).astype(np.int8), rng.uniform(0.005, 0.02, c)
    b = rng.standard_normal(c).astype(np.float32)

    def run(lanes, out_q, int8_weight):
        monkeypatch.setattr(k_, "CB16_MIN_CHANNELS", 16 if lanes == 16 else 1 << 30)
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, "float32"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(k_.emit_depthwise(bb, xv, w8 if int8_weight else w, b, x.shape, stride, pad,
                                                     (0.0, 6.0), out_q, w_scale=ws if int8_weight else None,
                                                     lanes=16))
            bb.emit_func_output(y)
        mod = bb.get()
        names = {gv.name_hint for gv in mod.get_global_vars()}
        want = "depthwise_cb16_" if lanes == 16 else "depthwise_cb_"
        assert any(n.startswith(want) for n in names), names
        return relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    got = run(16, None, False)
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(torch.from_numpy(x), (pad[2], pad[3], pad[0], pad[1])),
                                     torch.from_numpy(w), torch.from_numpy(b), stride, groups=c).clamp(0, 6).numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_array_equal(got, run(8, None, False))
    q = (0.03, -5, -128, 127)
    np.testing.assert_array_equal(run(16, q, True), run(8, q, True))


class _SamePadDepthwise(torch.nn.Module):
    """TF "SAME" padding as EfficientNet-Lite exports it: an asymmetric zero pad, then a stride-2 depthwise conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 5, 2, groups=8)

    def forward(self, x):
        return torch.relu(self.conv(torch.nn.functional.pad(x, (1, 2, 1, 2))))


def test_asymmetric_zero_pad_folds_into_the_depthwise_kernel():
    torch.manual_seed(0)
    model, x = _SamePadDepthwise().eval(), torch.randn(1, 8, 17, 17)
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    assert "R.nn.pad" not in text and "depthwise_" in text
    _assert_built_matches(g, model, x)


class _ZeroPads(torch.nn.Module):
    """TF "SAME" padding that works out to none (a 1x1 conv, or a small map): F.pad(x, (0, 0, 0, 0))."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 1)

    def forward(self, x):  # with the mode named, as Hugging Face's MobileNets write it, the pad stays in the graph
        y = torch.nn.functional.pad(x, (0, 0, 0, 0), "constant", 0.0)
        return self.conv(y) + torch.nn.functional.pad(y.mean(1, keepdim=True), (0, 0, 0, 0), "constant", 0.0)


def test_a_zero_pad_is_no_kernel():
    """All-zero pads lower to nothing: they had a copy kernel of their own (pad_128x4x4_0_0_0_0 in a tiny
    MobileNetV1 compiled without a pipeline), a fork and a pass over the map for no change."""
    torch.manual_seed(0)
    model, x = _ZeroPads().eval(), torch.randn(1, 8, 5, 5)
    g = graphopt.trace(model, (x,))
    assert sum(str(n.target) == "aten.pad.default" for n in g.nodes()) == 2
    names = [gv.name_hint for gv in lower_to_relax(g).get_global_vars()]
    assert not any("pad" in n for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("c,hw,k,pad,batch", [(8, 56, 5, (2, 2, 2, 2), 1),  # EfficientNet's 56x56 -> 28x28
                                              (5, 33, 7, (3, 3, 3, 3), 1),  # odd width: scalar tail of the copy
                                              (6, 40, 5, (1, 2, 1, 2), 2),  # TF "SAME": asymmetric, pad 1 left
                                              (3, 35, 6, (2, 0, 2, 0), 1),  # even taps, 16 outputs, no right pad:
                                              # the last input column lands in the tile's last column
                                              (4, 37, 5, (0, 0, 0, 0), 1)])  # no pad: no zeroed columns on the left
def test_stride2_wide_depthwise_reads_column_phases(c, hw, k, pad, batch):
    """Stride-2 depthwise convs with 5x5 or wider taps outside the channel-blocked maps take the phase kernel
    (each channel's even and odd padded columns split into two planes, every tap a contiguous load); the pad, odd
    widths, the last plane columns and batches match PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ZeroPad2d((pad[2], pad[3], pad[0], pad[1])),
                                torch.nn.Conv2d(c, c, k, 2, groups=c), torch.nn.ReLU6()).eval()
    x = torch.randn(batch, c, hw, hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(f"depthwise_ph_{c}x{hw}x{hw}_k{k}s2_clamp") for n in names), names
    assert not [n for n in names if "pad" in n], names
    _assert_built_matches(g, model, x)


def test_stride2_wide_depthwise_with_int8_weights_and_output(float_depthwise):
    """The phase kernel in an int8 graph: int8 taps widened per channel, the next quantize in its store."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 24, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 24, 5, stride=2, padding=2, groups=24), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 16, 1))
    q, got, ref = _quantized_block(model, (1, 8, 40, 40))
    names = _func_names(q)
    assert any(n.startswith("depthwise_ph_24x40x40_k5s2") and n.endswith("_clamp_q_w8") for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()  # a rounding boundary may move one int8 step


@pytest.mark.parametrize("cout,cin,hw,k,stride,pad", [(32, 3, 20, 3, 2, (1, 1, 1, 1)), (13, 2, 11, 3, 1, (0, 1, 0, 1)),
                                                      (8, 4, 9, 5, 2, (2, 2, 2, 2)),
                                                      (6, 3, 40, 3, 2, (1, 1, 1, 1)),  # 19 interior columns: the
                                                      (7, 3, 37, 3, 1, (1, 1, 1, 1)),  # last 16 overlap the first
                                                      (16, 3, 40, 7, 2, (3, 3, 3, 3)),  # ResNet's stem
                                                      (24, 3, 40, 7, 2, (3, 3, 3, 3))])  # a partial 16-channel tile
def test_stem_conv_direct_kernel(cout, cin, hw, k, stride, pad):
    """Few-input-channel stems: the direct kernel, or where the reduction (Cin x kh x kw) passes 64 steps, the
    pixel-row conv (Cout a multiple of 16) or the staged flat conv, or with output rows under 16 pixels im2col +
    the packed GEMM; the pad and the clamp fused; matches PyTorch."""
    torch.manual_seed(0)

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, k, stride)

        def forward(self, x):
            return torch.clamp(self.conv(torch.nn.functional.pad(x, pad)), 0.0, 6.0)

    model, x = Stem().eval(), torch.randn(2 if k == 7 else 1, cin, hw, hw)  # the staged kernel at batch 2
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    narrow = (hw + pad[0] + pad[1] - k) // stride + 1 < 16
    long = "conv_tok_" if cout % 16 == 0 else "conv_staged_"
    kernel = long if cin * k * k > 64 else "im2col_" if narrow else "conv_direct_"
    assert kernel in text and "R.nn.pad" not in text and "R.clip" not in text
    _assert_built_matches(g, model, x)


def test_a_stem_with_narrow_output_rows_takes_im2col():
    """A keyword-spotting DS-CNN's stem (1 channel of 49 x 10 MFCC frames, a 10x4 stride-2 kernel: 5 output
    columns) on im2col + the packed GEMM (the direct kernel vectorizes along rows: 2x its time there), with bias
    and ReLU in the GEMM's store; matches PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 64, (10, 4), 2, (5, 1)), torch.nn.ReLU()).eval()
    x = torch.randn(1, 1, 49, 10)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("im2col_1x49x10_k10s2") for n in names), names
    assert any(n.startswith("conv1x1_packed_64x40x125_clamp") for n in names), names
    assert not any(n.startswith("conv_direct") for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("hw,k,stride,pad,cout,res", [((56, 56), 3, 1, (1, 1, 1, 1), 13, True),
                                                        ((7, 7), 3, 1, (1, 1, 1, 1), 12, True),
                                                        ((28, 28), 3, 2, (1, 1, 1, 1), 8, False),
                                                        ((40, 47), 5, 2, (2, 1, 1, 2), 13, True)])
def test_staged_conv_equals_the_flat_one(hw, k, stride, pad, cout, res):
    """The staged kernel (the rule for dense kxk convs) and the in-place flat one (its knob candidate) sum the
    same products in the same order: bit-identical outputs with bias, residual add and ReLU6, on maps whose tiles
    cross rows (7x7), strided, and with a partial channel panel (13)."""

    from graphopt.targets.tvm.cpu.conv import flat_conv_source, staged_conv_source
    cin = 6
    args, out_shape = _flat_conv_args(cin, cout, hw, k, stride, pad, res)
    masked = vector_lanes(cpu_target()) >= 8
    outs = []
    for source in (flat_conv_source, staged_conv_source):
        f = parse_kernel(source(cout, cin, *hw, k, k, stride, pad, (0.0, 6.0), masked=masked, res=res))
        outs.append(_run_kernel(f, args, out_shape))
    assert not np.isnan(outs[0]).any() and (outs[0] > 0).any() and (outs[0] < 6).any()
    np.testing.assert_array_equal(outs[1], outs[0])


def test_batch1_linear_keeps_the_gemv_rule():
    g = graphopt.trace(torch.nn.Linear(64, 32).eval(), (torch.randn(1, 64),))
    assert not any(n.startswith("gemm_packed") for n in _func_names(g))


def _built_and_reference(g, x, cpu: str | None = None):
    """The graph built for the CPU (this one, or `cpu`) and run on x, and the graph's own output."""
    from tvm import relax
    ex, *_ = build_executable(g, cpu=cpu)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (got if hasattr(got, "numpy") else got[0]).numpy(), g.run(x)[0].numpy()


def _asm(func, cpu: str = AVX2):
    """The kernel's assembly for an AVX2 CPU (the 8-lane forms the kernel sources are written in), whatever this
    machine is: on AVX-512 LLVM fuses their vector pairs, so the patterns read here would depend on the host."""
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=cpu_target(cpu))
    return lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")


def _inner_fma_loop(asm: str, op: str = r"vfmadd\d+ps") -> str:
    """The innermost loop (a label up to the backward jump to it) holding the most FMAs: the reduction body."""
    loops = []
    for m in re.finditer(r"^(\.LBB\d+_\d+):", asm, re.M):
        back = re.search(rf"^\s+j\w+\s+{re.escape(m.group(1))}$", asm[m.end():], re.M)
        body = asm[m.end():m.end() + back.start()] if back else ""
        if back and not re.search(r"^\.LBB\d+_\d+:", body, re.M):  # innermost: no label inside
            loops.append(body)
    return max(loops, key=lambda b: len(re.findall(op, b)))


def test_packed_gemm_assembly_accumulates_in_registers():
    loop = _inner_fma_loop(_asm(gemm_packed(12, 64, 32, 6, 16)))
    fmas = re.findall(r"vfmadd\d+ps\s+[^\n]*%(?:ymm|zmm)\d+", loop)
    assert len(fmas) >= 12  # a 6 x 16 tile: 12 vector accumulators on AVX2
    assert not re.search(r"vmov(?:u|a)ps\s+%(?:ymm|zmm)\d+, ", loop)  # no accumulator spilled to memory


def test_packed_gemm_with_16_lanes_keeps_a_6x64_tile_in_zmm_registers():
    """Cross-compiled for a full-width AVX-512 CPU, the 6 x 64 tile (four 16-lane buffers, 24 accumulators) runs
    24 zmm FMAs a reduction step and stores none of them in the loop."""
    f = gemm_packed(12, 64, 64, 6, 64, 16)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=cpu_target("sapphirerapids"))
    loop = _inner_fma_loop(lib.mod.inspect_source("asm"))
    fmas = re.findall(r"vfmadd\d+ps\s+[^\n]*%zmm\d+", loop)
    assert len(fmas) >= 24, loop
    assert not re.search(r"vmov(?:u|a)ps\s+%zmm\d+, ", loop), loop


def test_pointwise_kernel_prefetches_its_weight_stream():
    """In a whole model a pointwise layer's packed weight is cold (read once per run, evicted by the other layers'
    traffic): the reduction asks for it PREFETCH k steps ahead, and still keeps its tile in registers."""
    from graphopt.targets.tvm.cpu.conv import MR, PREFETCH, conv1x1_packed
    loop = _inner_fma_loop(_asm(conv1x1_packed(320, 960, 49, 16, (0.0, 6.0))))
    assert PREFETCH > 0 and re.search(rf"prefetcht0\s+{PREFETCH * MR * 4}\(", loop), loop
    assert len(re.findall(r"vfmadd\d+ps", loop)) >= 12
    assert not re.search(r"vmov(?:u|a)ps\s+%(?:ymm|zmm)\d+, ", loop)


@pytest.mark.parametrize("cout,cin,p,expected", [(24, 144, 3136, 2),  # tile nest: weight and next pixel tile
                                                 (16, 32, 1024, 1),  # slab nest: the next slab only
                                                 (96, 144, 3136, 1)])  # many panels per tile: the weight only
def test_few_channel_pointwise_kernel_prefetches_its_next_pixel_tile(cout, cin, p, expected):
    """With few output channels (<= XPREFETCH_MAX_COUT) a pixel tile's K rows, P floats apart, are read by few
    panels: the reduction asks for the next tile's line of every row while it runs this one."""
    from graphopt.targets.tvm.cpu.conv import XPREFETCH_MAX_COUT, conv1x1_packed
    assert 24 <= XPREFETCH_MAX_COUT < 96
    loop = _inner_fma_loop(_asm(conv1x1_packed(cout, cin, p, 16, (0.0, 6.0))))
    fmas = len(re.findall(r"vfmadd\d+ps", loop))  # 12 per k step (LLVM may unroll the loop)
    assert fmas >= 12 and len(re.findall(r"prefetcht0\s", loop)) * 12 == expected * fmas, loop


def _assert_conv1x1_relu6_res(src: str, cout: int, cin: int, p: int):
    """Build the pointwise kernel source `src` (clamp to [0, 6], a residual) and compare it with numpy's."""
    from graphopt.targets.tvm.cpu import conv
    rng = np.random.default_rng(0)
    w = rng.standard_normal((cout, cin)).astype(np.float32) / 8
    x, res = rng.standard_normal((cin, p)).astype(np.float32), rng.standard_normal((cout, p)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    f = parse_kernel(src).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": f}), target=cpu_target())
    args = [tvm.runtime.tensor(a) for a in (x, conv.pack_rows(w), b, res, np.zeros((cout, p), np.float32))]
    lib["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), np.clip(w @ x + b[:, None] + res, 0, 6), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cout,cin,p,staged", [(64, 32, 1024, True),  # the slab kernel (a partial channel tile)
                                               (96, 64, 1024, True),  # the tile nests
                                               (100, 48, 2000, False),  # rows 8000 bytes apart: no aliasing
                                               (16, 32, 2048, False)])  # a slab read by two channel tiles
def test_pointwise_kernel_stages_rows_that_alias_in_cache(cout, cin, p, staged):
    """Pointwise layers whose input rows lie a multiple of 4 KB apart (1024 or 2048 pixels / points) read their
    pixel tiles from a contiguous copy: the rows shared one cache set each and evicted each other (52-66 GMAC/s,
    staged 100-110). Numerics as numpy's with bias, ReLU6 and a residual."""
    from graphopt.targets.tvm.cpu import conv
    src = conv.conv1x1_source(cout, cin, p, 16, (0.0, 6.0), res=True)
    assert ("xs = T.decl_buffer" in src) == staged
    _assert_conv1x1_relu6_res(src, cout, cin, p)


@pytest.mark.parametrize("cout,cin,hw", [(40, 260, 7), (13, 256, 14), (6, 300, 5)])
def test_pointwise_kernel_staged_inputs_match(monkeypatch, cout, cin, hw):
    """Long reductions read their pixel tiles from a contiguous staged copy (panel-outer 7x7, tile-outer 14x14,
    remainder rows, the fused tail pixel, a map smaller than one tile): same result as numpy, and the copy is only
    made where the layer is big enough (thresholds lowered here to stage these small layers)."""
    from graphopt.targets.tvm.cpu import conv
    monkeypatch.setattr(conv, "STAGE_MIN_MACS", 0)
    p = hw * hw
    src = conv.conv1x1_source(cout, cin, p, 16, (0.0, 6.0), res=True)
    assert ("xs = T.decl_buffer" in src) == (p >= 16)
    _assert_conv1x1_relu6_res(src, cout, cin, p)
    monkeypatch.setattr(conv, "STAGE_MIN_MACS", 7_000_000)
    assert "xs = T.decl_buffer" not in conv.conv1x1_source(cout, cin, p, 16, (0.0, 6.0), res=True)


def test_bsr_kernel_assembly_accumulates_in_registers():
    loop = _inner_fma_loop(_asm(bsr_matmul_t(32, 64, 64, 4, 4, 10)))
    assert re.findall(r"vfmadd\d+ps", loop)
    assert not re.search(r"vmov(?:u|a)ps\s+%(?:ymm|zmm)\d+, ", loop)
    assert "call" not in loop  # no workspace allocation (or any call) inside the reduction


def test_csr_stream_loads_one_scalar_a_nonzero_into_two_chains():
    """CSR weights as one stream (`csr_stream`): per nonzero one 64-bit load (value and x^T offset), no 32-bit index
    load or broadcast from memory, and its four 32-token FMAs go to one of two accumulator chains (8 registers)."""
    loop = _inner_fma_loop(_asm(bsr_matmul_t(32, 64, 64, 1, 1, 700, stream=True)))
    accs = re.findall(r"^\s+vfmadd\w+\s+.*, (%ymm\d+)$", loop, re.M)
    scalars = re.findall(r"^\s+movq\s+-?\d*\(%\w+(?:,%\w+)?(?:,\d)?\), %r", loop, re.M)
    assert len(accs) >= 8 and len(set(accs)) == 8 and len(accs) == 4 * len(scalars)
    assert "movslq" not in loop and not re.search(r"vbroadcastss\s+-?\d*\(", loop)


def test_csr_stream_refuses_what_it_cannot_hold():
    """The stream packs 1x1 blocks (values and int32 x^T offsets): block shapes it does not hold, a pointwise kernel
    without its pixel copy and offsets past int32 are errors naming what to change, not wrong kernels."""
    from graphopt.targets.tvm.cpu import sparse as S
    with pytest.raises(ValueError, match="1x1 blocks, not 4x4"):
        S.bsr_linear_source(32, 64, 64, 4, 4, 10, stream=True)
    with pytest.raises(ValueError, match="copy=True"):
        S.bsr_conv1x1_source(49, 64, 32, 1, 1, 40, copy=False, stream=True)
    with pytest.raises(ValueError, match="must fit int32"):
        S.csr_stream(np.ones(2, np.float32), np.array([0, 2 ** 27]), 32)
    nz = S.csr_stream(np.array([1.5, -2.0], np.float32), np.array([3, 5]), 32)
    assert (nz >> 32).tolist() == [96, 160]
    assert (nz & 0xFFFFFFFF).astype(np.uint32).view(np.float32).tolist() == [1.5, -2.0]


@pytest.mark.parametrize("m,block,k,n", [(32, (4, 4), 128, 64), (16, (1, 1), 128, 64), (64, (1, 1), 128, 64),
                                         (64, (2, 8), 128, 64), (2, (1, 16), 128, 64), (1, (8, 1), 128, 64),
                                         (12, (4, 4), 128, 64), (50, (1, 1), 100, 64), (20, (4, 4), 100, 64),
                                         (5, (4, 4), 128, 64), (7, (2, 2), 6, 64), (40, (8, 1), 96, 64),
                                         (24, (4, 4), 96, 52), (16, (4, 4), 64, 4)])
def test_bsr_kernels_match_dense(m, block, k, n):
    """Token tiles that overlap at the end (12, 20, 50 rows), K with a partial 8 x 8 transpose tile (100) or under
    8 (scalar transposes), tiles under 8 tokens (5, 7) and the batch-1 row variant; 4- and 8-row blocks store
    groups of 8 output rows, the last overlapping the one before (52 rows), or keep y^T under 8 rows (4)."""
    torch.manual_seed(1)
    w = torch.randn(n, k) * (torch.rand(n, k) > 0.85)
    s = to_bsr(w, block)
    x = torch.randn(m, k)
    dev = tvm.cpu()
    f = bsr_matmul_t(m, k, n, *block, s.nnzb) if m >= 4 else bsr_matmul_rows(m, k, n, *block, s.nnzb)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"), dev)
    lib["main"](*[tvm.runtime.tensor(a.numpy(), dev) for a in (x, s.data, s.indices, s.indptr)], out)
    got = out.numpy()
    assert np.abs(got - (x @ w.t()).numpy()).max() < 1e-4


@pytest.mark.parametrize("m,k,n,density", [(1, 100, 64, 0.15), (2, 128, 64, 0.5), (3, 37, 10, 0.3),
                                            (1, 1280, 40, 0.1), (1, 64, 8, 0.0)])
def test_csr_gemv_matches_dense(m, k, n, density):
    """The gather kernel for CSR weights under 4 rows of x: rows whose nonzeros are whole 16s, 16s plus a group of 8,
    and a masked partial last group (its loads and gather read no lane past the row), empty rows, an all-zero
    weight, 1-3 x rows gathered with the same columns."""
    from graphopt.targets.tvm.cpu.sparse import csr_gemv
    torch.manual_seed(3)
    w = torch.randn(n, k) * (torch.rand(n, k) < density)
    w[:, :2] = 0
    w[0, :24] = 1.5  # a row of 22 nonzeros: one 16, a masked 6
    if n > 8:
        w[1] = 0  # an empty row
        w[2, :] = 0
        w[2, 5:13] = -2.0  # exactly one group of 8
    s = to_bsr(w, (1, 1))
    x = torch.randn(m, k)
    lib = tvm.compile(tvm.IRModule({"main": csr_gemv(m, k, n, s.nnzb).with_attr("global_symbol", "main")}),
                      target=cpu_target())
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    lib["main"](*[tvm.runtime.tensor(a.numpy()) for a in (x, s.data, s.indices, s.indptr)], out)
    np.testing.assert_allclose(out.numpy(), (x @ w.t()).numpy(), rtol=1e-5, atol=1e-4)


def test_csr_gemv_gathers_in_two_chains():
    """Its reduction: per 16 nonzeros two 8-lane gathers, each multiplied into its own accumulator (two FMA chains);
    the partial last group by masked loads. Batch-1 CSR linears take it where the target has AVX2, else the row
    kernel."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.sparse import csr_gemv, emit_bsr_linear
    asm = _asm(csr_gemv(1, 256, 64, 1000))
    loop = _inner_fma_loop(asm)
    fmas = re.findall(r"vfmadd132ps\s+-?\w*\([^)]*\), (%ymm\d+), (%ymm\d+)", loop)  # (accumulator in, sum out)
    assert len(re.findall(r"vgatherdps", loop)) == len(fmas) >= 2 and len(fmas) % 2 == 0, loop
    assert all(fmas[i][0] == fmas[i - 2][1] != fmas[i - 1][1] for i in range(2, len(fmas))), loop
    assert re.search(r"vmaskmovps", asm) and re.search(r"vpmaskmovd", asm)
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.cpu.rules import has_gather
    assert has_gather(cpu_target(AVX2)) and not has_gather(cpu_target("sandybridge"))  # AVX without AVX2
    w = torch.randn(64, 256) * (torch.rand(64, 256) < 0.1)
    sp = to_bsr(w, (1, 1))
    x = torch.randn(1, 256)
    for gather in (True, False):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType((1, 256), "float32"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(emit_bsr_linear(bb, xv, *(relax.const(a.numpy()) for a in (sp.data, sp.indices,
                                                   sp.indptr)), None, (1, 256), 64, (1, 1), sp.nnzb, gather=gather))
            bb.emit_func_output(y)
        mod = bb.get()
        names = [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint != "main"]
        assert names == [f"csr_gemv_1x256x64_b1x1_nnz{sp.nnzb}" if gather else f"bsr_rows_1x256x64_b1x1_nnz{sp.nnzb}"]
        got = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
        np.testing.assert_allclose(got.numpy(), (x @ w.t()).numpy(), rtol=1e-5, atol=1e-4)


def test_sparse_layers_of_one_shape_share_one_parsed_kernel():
    """The float sparse kernels' stored-block count is symbolic (bound by the weight tensors at the call): two 4x4
    BSR linears of one shape and different block counts lower to one kernel, parsed once (`parse_kernel`), and
    each still matches its own dense product."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.parse import parse_kernel
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.cpu.sparse import emit_bsr_linear
    torch.manual_seed(4)
    ws = [torch.randn(64, 96) * expand_blocks(torch.rand(16, 24) > p, (4, 4)) for p in (0.7, 0.9)]
    sps = [to_bsr(w, (4, 4)) for w in ws]
    assert sps[0].nnzb != sps[1].nnzb
    hits = parse_kernel.cache_info().hits
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((32, 96), "float32"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            ys = [emit_bsr_linear(bb, xv, *(relax.const(a.numpy()) for a in (sp.data, sp.indices, sp.indptr)),
                                  None, (32, 96), 64, (4, 4), sp.nnzb) for sp in sps]
            y = bb.emit_output(relax.Tuple(ys))
        bb.emit_func_output(y)
    mod = bb.get()
    assert len([gv for gv in mod.get_global_vars() if gv.name_hint.startswith("bsr_t_")]) == 1
    assert parse_kernel.cache_info().hits > hits
    x = torch.randn(32, 96)
    got = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    for g, w in zip(got, ws):
        np.testing.assert_allclose(g.numpy(), (x @ w.t()).numpy(), rtol=1e-5, atol=1e-4)


def test_int8_sparse_layers_of_one_shape_share_one_parsed_kernel():
    """The int8 sparse kernels' stored counts are symbolic too: two int8 CSR linears (pair counts) and two int8
    8x4-block BSR linears (block counts) of one shape lower to one kernel each, and each layer still equals its
    own int8 product. (With the counts in the source, int8 select-sparse-layout on MiniLM spent 33 of 65 s
    parsing one CSR kernel per layer.)"""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.cpu.sparse import emit_bsr_qlinear, emit_csr_qlinear
    rng = np.random.default_rng(5)
    m, k, n = 32, 128, 64
    dot = int8_dot(cpu_target())
    csr = [(rng.integers(-127, 128, (n, k)) * (rng.random((n, k)) < d)).astype(np.int8) for d in (0.1, 0.2)]
    bsr = [(rng.integers(-63, 64, (n, k)) * expand_blocks(torch.rand(n // 8, k // 4) < d, (8, 4)).numpy()).astype(np.int8)
           for d in (0.1, 0.3)]
    scales = rng.uniform(1e-3, 2e-3, n).astype(np.float32)
    sx, zx = 0.02, 3
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "int8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            ys = [emit_csr_qlinear(bb, xv, w, scales, None, sx, zx, (m, k), dot) for w in csr]
            ys += [emit_bsr_qlinear(bb, xv, w, scales, None, sx, zx, (m, k), dot) for w in bsr]
            y = bb.emit_output(relax.Tuple(ys))
        bb.emit_func_output(y)
    mod = bb.get()
    kernels = sorted(gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith(("csr_q", "bsr_q")))
    assert [name.split("_")[0] for name in kernels] == ["bsr", "csr"], kernels  # one kernel per format
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    got = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x))
    for g, w in zip(got, csr + bsr):
        ref = ((x.astype(np.int64) - zx) @ w.astype(np.int64).T) * (sx * scales.astype(np.float64))
        assert np.abs(g.numpy() - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bsr_token_tiles_widen_with_16_lanes():
    """With 16-lane vectors, blocks of 4+ rows take 64 tokens where M is whole 64-token tiles, else 32, each while
    every core keeps a tile; CSR (1-row blocks) and 8-lane targets keep their tiles."""
    from graphopt.targets.tvm.cpu.sparse import token_tile
    assert token_tile(128, 4, 16, 2) == 64 and token_tile(384, 8, 16, 2) == 64
    assert token_tile(196, 4, 16, 2) == 32 and token_tile(49, 4, 16, 2) == 32 and token_tile(100, 4, 16, 0) == 32
    assert token_tile(128, 4, 16, 4) == 32 and token_tile(128, 4, 16, 8) == 16 and token_tile(20, 4, 16, 2) == 16
    assert token_tile(128, 1, 16, 2) == 32 and token_tile(128, 4, 8, 2) == 16 and token_tile(128, 4, 16) == 64


@pytest.mark.parametrize("m,block,k,n", [(128, (4, 4), 96, 64), (100, (4, 4), 100, 52), (128, (8, 1), 64, 40),
                                         (49, (4, 4), 64, 16)])
def test_wide_bsr_token_tiles_match_dense(m, block, k, n):
    """The 16-lane token tiles: 64 tokens (128 rows: two tiles), 32 with the last tile overlapping (100, 49 rows),
    groups of 8 output rows whose last overlaps the one before (52). Any x86 host runs them (LLVM splits the
    vectors where they are wider than the CPU's)."""
    torch.manual_seed(2)
    w = torch.randn(n, k) * (torch.rand(n, k) > 0.85)
    s = to_bsr(w, block)
    x = torch.randn(m, k)
    f = bsr_matmul_t(m, k, n, *block, s.nnzb, lanes=16, cores=2)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros((m, n), "float32"))
    lib["main"](*[tvm.runtime.tensor(a.numpy()) for a in (x, s.data, s.indices, s.indptr)], out)
    assert np.abs(out.numpy() - (x @ w.t()).numpy()).max() < 1e-4


def test_wide_bsr_tile_accumulates_in_zmm_registers():
    """A 4x4 block-row over 64 tokens on an AVX-512 CPU: 16 zmm accumulators (4 rows x 4 vectors), none stored in
    the reduction."""
    loop = _inner_fma_loop(_asm(bsr_matmul_t(128, 64, 64, 4, 4, 10, lanes=16, cores=2), "sapphirerapids"))
    assert len(set(re.findall(r"vfmadd\w+\s+%zmm\d+, %zmm\d+, (%zmm\d+)", loop))) >= 16
    assert not re.search(r"vmov(?:u|a)ps\s+%zmm\d+, ", loop) and "call" not in loop


@pytest.mark.parametrize("m,k,sparsity", [(32, 768, 0.8), (20, 800, 0.9), (16, 1600, 0.95)])
def test_csr_weights_take_the_k_tiled_kernel_where_it_pays(m, k, sparsity):
    """CSR linears with K >= 768 and >= 16 nonzeros per row and 192-input tile (>= 8 from K = 1536: 95% sparse)
    run k-tiled (rows of x^T from L1, two accumulator chains); sparser or narrower ones keep the untiled kernel
    (768 inputs at 95%: untiled). Both match the dense product. K = 800 and 1600: a partial last k-tile."""
    from tvm import relax

    from graphopt.ir.sparse_ops import layout_block
    from graphopt.targets.tvm.cpu.sparse import CSR_TILE, csr_tiled_applies, csr_tiled_pack, emit_bsr_linear
    torch.manual_seed(0)
    n = 48
    w = torch.randn(n, k) * (torch.rand(n, k) > sparsity)
    s = to_bsr(w, layout_block("csr"))
    vals, cols, ptr = csr_tiled_pack(s.data.numpy(), s.indices.numpy(), s.indptr.numpy(), k)
    tiles = -(-k // CSR_TILE)  # the packing is the same matrix, grouped by (tile, row)
    dense = np.zeros((n, k), np.float32)
    for seg in range(tiles * n):
        rows = slice(ptr[seg], ptr[seg + 1])
        assert (cols[rows] // CSR_TILE == seg // n).all() and (np.diff(cols[rows]) > 0).all()
        dense[seg % n, cols[rows]] = vals[rows]
    np.testing.assert_array_equal(dense, w.numpy())
    # K = 2 tiles: untiled; at 95% 768 inputs too
    for kk, tiled in ((k, True), (384, False)) + (((768, False),) if sparsity >= 0.95 else ()):
        ww, xx = w[:, :kk].contiguous(), torch.randn(m, kk)
        ss = to_bsr(ww, (1, 1))
        assert csr_tiled_applies(m, kk, n, ss.nnzb) == tiled
        arrays = [ss.data.numpy(), ss.indices.numpy(), ss.indptr.numpy()]
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType((m, kk), "float32"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(emit_bsr_linear(bb, xv, *(relax.const(a) for a in arrays), None, (m, kk), n,
                                                   (1, 1), ss.nnzb, arrays))
            bb.emit_func_output(y)
        mod = bb.get()
        assert any(gv.name_hint.startswith("csr_tiled_") for gv in mod.get_global_vars()) == tiled
        from graphopt.targets.tvm.cpu.pipeline import build_cpu
        got = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(xx.numpy()))
        assert np.abs(got.numpy() - (xx @ ww.t()).numpy()).max() < 1e-4


def test_pack_weight_layout():
    w = np.arange(32 * 8, dtype=np.float32).reshape(32, 8)
    p = pack_weight(w, 16)
    assert p.shape == (2, 8, 16) and p[1, 3, 5] == w[16 + 5, 3]


@pytest.mark.parametrize("cout,cin,p,out_int8,relu,wbits", [(13, 64, 24, True, True, 8), (13, 63, 49, False, True, 8),
                                                            (7, 16, 8, True, True, 8), (13, 64, 16, False, False, 8),
                                                            (13, 63, 49, True, False, 4), (96, 16, 12544, False, True, 8),
                                                            (64, 190, 196, True, True, 4), (40, 24, 3136, True, True, 8),
                                                            (13, 64, 24, False, True, -8), (13, 63, 49, True, True, 7),
                                                            (64, 190, 196, False, True, 7), (7, 18, 8, True, False, 7),
                                                            (40, 24, 3136, True, True, 7), (13, 64, 24, False, True, -7)])
def test_int8_pointwise_kernel_is_exact_and_uses_vpmaddwd(cout, cin, p, out_int8, relu, wbits):
    """int8 in, exact int32 accumulation, the requantize epilogue in registers; odd Cin, a partial channel tile,
    an overlapping last pixel block (24, 49 pixels) and pixel blocks split unevenly into chunks (196, 3136 pixels)
    included; the pair kernel's int8 weights are widened once per task. wbits=-8: one channel's weight scale
    is ~0, so its bias does not fit int32 at the accumulator's scale and the kernel keeps a float bias. wbits=7:
    7-bit weights on the u8 quad kernel (`vpmaddubsw`), Cin not a multiple of 4 (63, 190, 18) included; wbits=4:
    int4 weights on the same kernel, stored as nibbles and widened per channel block."""
    degenerate, wbits = wbits < 0, abs(wbits)
    from graphopt.targets.tvm.cpu.conv import store_params
    from graphopt.targets.tvm.cpu.int8 import (MR, epilogue_constants, int8_kernels_available, pack_pairs, pack_quads,
                                               pack_quads_w4, qconv1x1_source, qconv1x1_ubsw_source, ubsw_exact)
    if not int8_kernels_available(cpu_target()):
        pytest.skip("needs AVX2")
    rng = np.random.default_rng(0)
    mt, nv = -(-cout // MR), 2 if p >= 16 else 1
    x = rng.integers(-128, 128, (cin, p)).astype(np.int8)
    lim = {8: 128, 7: 65, 4: 8}[wbits]
    w = rng.integers(-lim + (wbits in (7, 8)), lim, (cout, cin)).astype(np.int8)
    assert ubsw_exact(np.pad(w, ((0, 0), (0, cin % 2)))) == (wbits < 8)
    ws, bias, sx, zx = rng.uniform(1e-3, 2e-3, cout), rng.uniform(-1, 1, cout).astype(np.float32), 0.02, -7
    if degenerate:
        ws[3] = 1e-12
    out_q = (0.05, 3, -128, 127) if out_int8 else None
    consts = epilogue_constants(w, ws, bias, sx, zx + 128 * (wbits < 8), mt, out_q)
    assert (consts[2] is not None) == degenerate
    clamp = (0.0, 6.0) if relu else None
    if wbits < 8:
        f = parse_kernel(qconv1x1_ubsw_source(cout, cin, p, nv, clamp, out_q, float_bias=degenerate,
                                              wbits=4 if wbits == 4 else 8))
        if cin >= 128:  # (a shorter reduction is unrolled whole: no loop to read)
            loop = _inner_fma_loop(_asm(f), r"vpmaddubsw")
            assert len(re.findall(r"vpmaddubsw", loop)) >= MR and "vpunpck" not in loop  # quads read whole
        packed = pack_quads_w4(w, mt) if wbits == 4 else pack_quads(w, mt)
    else:
        f = parse_kernel(qconv1x1_source(cout, cin, p, nv, clamp, out_q, float_bias=degenerate))
        packed = pack_pairs(w, mt)
    if cin >= 32 and wbits == 8:  # (a shorter reduction is unrolled whole: no loop to read)
        loop = _inner_fma_loop(_asm(f), r"vpmaddwd")
        assert len(re.findall(r"vpmaddwd", loop)) >= MR  # one per output row of the tile, in the reduction loop
        assert re.search(r"vpmovsxbw", loop)  # int8 read and widened in registers: no int16 copy of the activation
        assert not re.search(r"vmovdq[au]\s+%ymm\d+, ", loop)  # accumulators stay in registers
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(cout * p, np.int8 if out_int8 else np.float32))
    qp = store_params((0.0, 6.0) if relu else None, out_q)
    lib["main"](*(tvm.runtime.tensor(a) for a in (x.reshape(-1), packed,
                                                  *(c for c in consts if c is not None), qp)), out)
    got = out.numpy().reshape(cout, p).astype(np.float64)
    acc = w.astype(np.int64) @ (x.astype(np.int64) - zx)  # the exact integer result
    if degenerate:
        ref = acc * (ws[:, None] * sx) + bias[:, None]
    else:
        b_int = np.round(bias / (ws * sx))  # the bias as stored: int32 at the accumulator's scale
        ref = (acc + b_int[:, None]) * (ws[:, None] * sx)
    ref = np.clip(ref, 0.0, 6.0) if relu else ref
    if out_int8:
        ref = np.clip(np.round(ref / 0.05) + 3, -128, 127)
        assert np.abs(got - ref).max() <= 1  # a rounding tie may land one step away
        assert (got == ref).mean() > 0.99
    else:
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("nv,tiles,lanes", [(2, 1, 8), (1, 2, 8), (2, 1, 16), (4, 2, 16)])
def test_int4_quad_kernel_matches_its_int8_form(nv, tiles, lanes):
    """The quad pointwise kernel with int4 weights stored as nibbles (`pack_quads_w4`, widened per channel block
    into a local buffer) gives exactly the outputs of the same kernel reading the weights as int8 words, for every
    register tile form (two channel blocks: each block widened; 16 lanes); on the exact quad product, so on any
    CPU. 40 output channels: 7 blocks, the last partial (tiles=2 pairs it with a clamped repeat)."""
    from graphopt.targets.tvm.cpu.conv import store_params
    from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants, pack_quads, pack_quads_w4, qconv1x1_ubsw_source
    rng = np.random.default_rng(1)
    cout, cin, p = 40, 70, 49
    mt = -(-cout // MR)
    x = rng.integers(-128, 128, (cin, p)).astype(np.int8)
    w = rng.integers(-8, 8, (cout, cin)).astype(np.int8)
    w[0], w[1] = 7, -8
    out_q = (0.05, 3, -128, 127)
    consts = epilogue_constants(w, rng.uniform(0.02, 0.04, cout), None, 0.02, -7 + 128, mt, out_q)
    outs = []
    for wbits, packed in ((8, pack_quads(w, mt)), (4, pack_quads_w4(w, mt))):
        f = parse_kernel(qconv1x1_ubsw_source(cout, cin, p, nv, (0.0, 6.0), out_q, dot="exact", tiles=tiles,
                                              lanes=lanes, wbits=wbits))
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
        out = tvm.runtime.tensor(np.zeros(cout * p, np.int8))
        lib["main"](*(tvm.runtime.tensor(a) for a in (x.reshape(-1), packed, *consts[:2],
                                                      store_params((0.0, 6.0), out_q))), out)
        outs.append(out.numpy())
    assert packed.nbytes == mt * 24 * MR * 2  # two bytes a quad; 18 quads a row padded to 24
    np.testing.assert_array_equal(outs[1], outs[0])
    assert len(np.unique(outs[0])) > 20  # (not a clamped constant)


def _quantized_block(model, shape, weights: str = "int8"):
    torch.manual_seed(0)
    x = torch.rand(*shape)
    q = graphopt.optimize(graphopt.trace(model.eval(), (x,)), f"quantize{{weights={weights}}},fold-qdq",
                          data=[(torch.rand(*shape),) for _ in range(4)])
    from tvm import relax
    ex, *_ = build_executable(q)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    return q, got, q.run(x)[0].numpy()


@pytest.mark.parametrize("batch", [1, 2])
def test_quantized_dense_convs_run_on_the_pixel_row_int8_kernel(monkeypatch, batch):
    """int8 3x3 convs with VNNI (16 -> 24 channels at stride 2, 12x12 to 6x6; 24 -> 13 at 6x6: a partial
    16-channel panel) run on the pixel-row int8 conv, with the next quantize in the store; bit-identical to the
    kernels they replace and within a rounding step of the reference integer ops. (AMX off: on AMX CPUs the
    stride-1 conv takes the tile form, test_amx.py.)"""
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    from graphopt.targets.tvm.cpu import int8
    if not _vnni_here():
        pytest.skip("the int8 pixel-row conv needs VNNI")
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, 2, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(24, 13, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(13, 8, 1))
    q, got, ref = _quantized_block(model, (batch, 16, 12, 12))
    names = _func_names(q)
    assert any(n.startswith("qconv_tok_vnni_24x16x12x12_k3x3s2_p1111_clamp_q") for n in names), names
    assert any(n.startswith("qconv_tok_vnni_13x24x6x6_k3x3s1_p1111_clamp_q") for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    monkeypatch.setattr(int8, "tok_qconv_applies", lambda *a: False)
    assert not any(n.startswith("qconv_tok") for n in _func_names(q))
    _, flat, _ = _quantized_block(model, (batch, 16, 12, 12))
    np.testing.assert_array_equal(got, flat)


def test_small_strided_int8s_convs_take_the_pixel_row_int8_kernel_on_avx2(monkeypatch):
    """On AVX2, int8s weights (quantize's default there) make vpmaddubsw exact, and a stride-2 3x3 conv to at most
    64 pixels runs the int8 pixel-row conv (0.67-0.90x the flat int8 conv's time on 14x14 / 16x16 / 7x7 maps);
    stride 1 keeps the flat int8 conv. Built here, the result equals the flat kernels' and the reference integer
    ops within a rounding step."""
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    from graphopt.targets.tvm.cpu import int8
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 3, 2, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(24, 13, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(13, 8, 1))
    q, got, ref = _quantized_block(model, (1, 16, 12, 12), "int8s")
    names = _func_names(q, "znver3")
    assert any(n.startswith("qconv_tok_ubsw_24x16x12x12_k3x3s2_p1111_clamp_q") for n in names), names
    assert any(n.startswith("qconv_flat_ubsw_13x24x6x6_k3x3s1") for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    monkeypatch.setattr(int8, "tok_qconv_applies", lambda *a: False)
    assert not any(n.startswith("qconv_tok") for n in _func_names(q, "znver3"))
    _, flat, _ = _quantized_block(model, (1, 16, 12, 12), "int8s")
    np.testing.assert_array_equal(got, flat)


def _int8s_on_avx2(monkeypatch, model, shape, kernel: str):
    """An int8s build of `model` whose AVX2 (znver3) lowering has a kernel named `kernel`..., within a grid step of
    the reference here: (its output, the output with the pixel-row int8 conv's rule off)."""
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    from graphopt.targets.tvm.cpu import int8
    q, got, ref = _quantized_block(model, shape, "int8s")
    names = _func_names(q, "znver3")
    assert any(n.startswith(kernel) for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    monkeypatch.setattr(int8, "tok_qconv_applies", lambda *a: False)
    return got, _quantized_block(model, shape, "int8s")[1]


@pytest.mark.parametrize("cout, kernel", [(32, "qconv_tok_ubsw_32x16x10x10_k3x3s1_p1111"),
                                           (8, "qconv_flat_ubsw_8x16x10x10_k3x3s1_p1111")])
def test_stride_1_int8s_convs_with_a_float_output_take_the_pixel_row_kernel_on_avx2(monkeypatch, cout, kernel):
    """A stride-1 int8s 3x3 conv whose output is float (the model's output here; RCAN's channel attention, a
    residual add) runs the pixel-row int8 conv on AVX2 where its output channels fill a 16-channel panel (0.57-0.84x
    the flat conv's time, whose stores of 16-pixel blocks across rows cost most with floats); fewer channels keep
    the flat conv (32 -> 3 at 64x64: the pixel-row conv 3x slower). Equal to the flat kernel's result."""
    got, flat = _int8s_on_avx2(monkeypatch, torch.nn.Sequential(torch.nn.Conv2d(16, cout, 3, 1, 1)), (1, 16, 10, 10),
                               kernel)
    np.testing.assert_allclose(got, flat, rtol=1e-6, atol=1e-6 * np.abs(flat).max())


@pytest.mark.parametrize("cout, stride, kernel", [(32, 1, "qconv_tok_ubsw_32x16x24x24_k3x3s1_p1111_clamp_q"),
                                                   (24, 1, "qconv_flat_ubsw_24x16x24x24_k3x3s1_p1111_clamp_q"),
                                                   (32, 2, "qconv_tok_ubsw_32x16x24x24_k3x3s2_p1111_clamp_q"),
                                                   (24, 2, "im2col_16x24x24_k3s2_p1111_int8_tm")])
def test_int8s_convs_storing_int8_take_the_pixel_row_kernel_on_avx2(monkeypatch, cout, stride, kernel):
    """A stride-1 or -2 int8s 3x3 conv the int8 Winograd conv does not take (16 input channels; strided), storing
    int8 for the next conv, runs the pixel-row int8 conv on AVX2 where its output channels are whole 16-channel
    panels (kernels alone, Zen 3: 32x16 at 112x112 0.43 vs 0.74 ms, 16x16 at 56x56 0.10 vs 0.13, 512x256 at 7x7
    0.49 vs 0.55; stride 2 to 144 pixels here, 28x28 to 56x56 in models: 64x32 at 112x112 0.39 vs 0.68, 96x48 at
    56x56 0.28 vs 0.37, 256x128 at 28x28 0.42 vs 0.58, 128x64 at 56x56 0.47 vs 0.45), else the flat conv (24x16
    at 56x56: 0.14 vs 0.11) or, strided to a small map, int8 im2col. Equal to those kernels' result."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, cout, 3, stride, 1), torch.nn.ReLU(), torch.nn.Conv2d(cout, 8, 1))
    got, flat = _int8s_on_avx2(monkeypatch, model, (1, 16, 24, 24), kernel)
    np.testing.assert_array_equal(got, flat)


def test_quantized_grouped_conv_runs_one_int8_kernel_per_group():
    """int8 grouped convs (3x3 in 4 groups, then a grouped 1x1 in 2 groups) run each group on the int8 kernels,
    with the next quantize in each group's store (the activation between them stays int8), their outputs joined
    by the copy kernel (Relax's concatenate of ResNeXt's 32 groups took 1.6 ms, 3x the convs), and match the
    reference integer ops within a rounding step; TVM's generic int8 grouped conv is gone."""
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, 1, 1, groups=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 48, 1, groups=2), torch.nn.ReLU())
    q, got, ref = _quantized_block(model, (1, 32, 14, 14))
    names = _func_names(q, "znver4")
    assert any(n.startswith("qconv_flat_vnni_8x8x14x14_k3x3s1_p1111_clamp_q") for n in names), names
    assert any(n.startswith("qconv1x1_vnni_24x16x196_clamp") for n in names), names
    assert any(n.startswith("concat_1x1568_1568_1568_1568") for n in names), names
    text = lower_to_relax(q, target=cpu_target("znver4")).script()
    assert "R.nn.conv2d" not in text and "R.concat" not in text
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("cin,hw,k", [(16, 4, 3), (64, 4, 3), (16, 2, 3), (3, 4, 3), (24, 3, 3)])
def test_quantized_strided_conv_to_a_tiny_map_stays_in_bounds(cin, hw, k):
    """An int8 k x k stride-2 conv with fewer than 8 output pixels (HF ResNet's last stage at 64x64: 4x4 -> 2x2)
    ran im2col into the int8 pointwise kernel, whose last 8-pixel block overlaps the one before: with 4 pixels it
    started 4 before its buffers and wrote there (glibc: "free(): invalid next size"). Such convs take another
    kernel now, and the pointwise emitter refuses fewer than 8 pixels by name."""
    from graphopt.targets.tvm.cpu.int8 import emit_qconv1x1
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, 16, k, 2, k // 2), torch.nn.ReLU())
    q, got, ref = _quantized_block(model, (1, cin, hw, hw))
    assert not any(n.startswith("qconv1x1") for n in _func_names(q)), _func_names(q)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    with pytest.raises(ValueError, match="8 pixels or more, not 4"):
        emit_qconv1x1(None, None, np.ones((8, 16), np.int8), np.ones(8), None, 0.1, 0, (1, 16, 2, 2), None, None)


@pytest.mark.parametrize("stride,batch,groups", [(1, 1, 1), (2, 2, 1), (1, 1, 2), (2, 2, 2)])
def test_quantized_dilated_conv_runs_int8_kernels(stride, batch, groups):
    """An int8 dilated conv runs, with VNNI, on the int8 pixel-row conv with its taps d apart in the quad planes
    (int8 im2col's 9x columns through memory made DeepLab's 64 -> 16 ASPP convs at 128x128 2x slower), and on
    AVX2 too for int8s weights (exact on vpmaddubsw), else int8 im2col with the taps d apart + the pointwise kernel; the input's zero point outside the image, the
    next quantize in the store; TVM's generic int8 dilated conv is gone, grouped ones too (each group on those
    kernels: SKNet's dilated branch had taken TVM's, 1.5 ms). Matches the reference integer ops within a rounding
    step, strided and at batch 2."""
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, stride, 2, dilation=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 16, 3, 1, 3, dilation=3, groups=groups), torch.nn.ReLU())
    q, got, ref = _quantized_block(model, (batch, 16, 20, 20))
    for cpu, prefix, tags in (("znver4", "qconv_tok_vnni", (f"s{stride}d2_", "s1d3_")), ("znver3", "im2col",
                                                                                         ("d2", "d3"))):
        assert "R.nn.conv2d" not in lower_to_relax(q, target=cpu_target(cpu)).script()
        names = _func_names(q, cpu)
        assert all(any(n.startswith(prefix) and t in n for n in names) for t in tags), (cpu, names)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    # int8s weights (quantize's default on AVX2): vpmaddubsw is exact for them, so AVX2 runs the int8 pixel-row
    # conv too (DeepLab's 64 -> 16 at 128x128 d4: 1.61 ms against im2col's 3.92)
    q, got, ref = _quantized_block(model, (batch, 16, 20, 20), "int8s")
    names = _func_names(q, "znver3")  # (a grouped conv's groups too: `quantize` narrows their weights as well)
    tags = (f"s{stride}d2_", "s1d3_")
    assert all(any(n.startswith("qconv_tok_ubsw") and t in n for n in names) for t in tags), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("hw,batch", [(7, 1), (14, 1), (56, 1), (14, 3), (20, 2)])  # channel-blocked depthwise
# (lane stores, transposes), row vectors; batch > 1: every kernel loops over the samples
def test_quantized_mobilenet_block_keeps_int8_between_kernels(hw, batch, float_depthwise):
    """pw -> ReLU6 -> depthwise -> ReLU6 -> pw: each conv's store does the next quantize (int8 into the pointwise
    kernel; into the depthwise one int8 where its row kernel reads int8 (16 outputs a row and more), else the int8
    grid's floats), so no separate quantize/requantize function is left except the one on the model input; the
    result matches the reference integer ops."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 24, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 24, 3, padding=1, groups=24), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 16, 1))
    q, got, ref = _quantized_block(model, (batch, 8, hw, hw))
    names = _func_names(q)
    nt = f"_n{batch}" if batch > 1 else ""
    pw = "qconv1x1_vnni_" if _vnni_here() else "qconv1x1_"  # with VNNI every int8 weight takes the quad kernel
    rows = hw > 14  # the row kernel, which converts its int8 input itself
    assert any(n.startswith(pw + "24x8") and n.endswith(("_clamp_q" if rows else "_clamp_qdq") + nt)
               for n in names), names
    dw = "depthwise_cb_24x" if not rows else "depthwise_i8in_24x"
    assert any(n.startswith(dw) and n.endswith("_clamp_q_w8" + nt) for n in names), names  # int8 weight
    assert any(n.startswith(pw + "16x24") and n.endswith(nt) for n in names), names
    assert len([n for n in names if "round" in n]) <= 1, names  # only the model input's quantize
    # float rounding differs from the reference's integer conv in the depthwise layer: a value on a rounding
    # boundary may land one int8 step away
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


class _ResidualBlock(torch.nn.Module):
    """x + project(relu6(expand(x))), a ReLU after the add when `relu`: MobileNetV2's residual block."""

    def __init__(self, relu: bool):
        super().__init__()
        self.expand, self.project, self.relu = torch.nn.Conv2d(8, 24, 1), torch.nn.Conv2d(24, 8, 1), relu

    def forward(self, x):
        y = x + self.project(torch.nn.functional.relu6(self.expand(x)))
        return torch.relu(y) if self.relu else y


@pytest.mark.parametrize("weights,relu,batch", [("int8", False, 1), ("int8", True, 2), ("int4", True, 1)])
def test_quantized_residual_add_joins_the_int8_pointwise_store(weights, relu, batch):
    """The projection's float output meets only the residual add: the add (and a ReLU after it) happen in the int8
    kernel's store (the quad kernel, its int4 weights as nibbles too), so no add function is built; the result
    matches the reference integer ops."""
    q, got, ref = _quantized_block(_ResidualBlock(relu), (batch, 8, 14, 14), weights)
    names = _func_names(q)
    assert any(n.startswith("qconv1x1_") and "_8x24x196" in n and "_res" in n for n in names), names
    assert not [n for n in names if "add" in n and "round" not in n], names  # (the input's quantize adds its zp)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    if relu:
        assert got.min() >= 0.0


@pytest.mark.parametrize("first,hw", [("pointwise", 28), ("depthwise", 28), ("pointwise", 64)])
# float or int8 handed to the padded depthwise conv; at 64x64 (the row kernel) int8 from the pointwise conv too
def test_quantized_tf_same_pad_joins_the_depthwise_kernel(first, hw, float_depthwise):
    """EfficientNet's asymmetric zero pad between the expansion's ReLU6 and a stride-2 depthwise conv is done by
    the depthwise kernel; no padded copy (a pad function) is built."""
    head = torch.nn.Conv2d(8, 24, 1) if first == "pointwise" else torch.nn.Sequential(
        torch.nn.Conv2d(8, 24, 1), torch.nn.Conv2d(24, 24, 3, padding=1, groups=24))
    model = torch.nn.Sequential(head, torch.nn.ReLU6(), torch.nn.ZeroPad2d((0, 1, 0, 1)),
                                torch.nn.Conv2d(24, 24, 3, stride=2, groups=24), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 16, 1))
    q, got, ref = _quantized_block(model, (1, 8, hw, hw))
    names = _func_names(q)
    assert not [n for n in names if "pad" in n], names
    dw = "depthwise_cb_24x28x28_k3s2" if hw == 28 else "depthwise_i8in_24x64x64_k3s2"  # 14x14, 32x32 outputs
    assert any(n.startswith(dw) for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_quantized_input_pad_joins_the_stem_kernel():
    """A quantized model whose input is zero padded (TF "SAME") before a stride-2 stem: the input is quantized
    unpadded and the stem kernel pads, so no pad function (and no scalar quantize of a 33 x 33 image) is built.
    On AVX2 the stem is the float direct conv on the dequantized input for full-range int8 weights; int7 weights
    and with VNNI any: int8 im2col (the 27 tap values in 7 whole quads; `im2col_beats_flat`), whose fill takes
    the pad."""
    model = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.Conv2d(3, 16, 3, stride=2),
                                torch.nn.ReLU6(), torch.nn.Conv2d(16, 8, 1))
    for weights in ("int8", "int7"):
        q, got, ref = _quantized_block(model, (1, 3, 32, 32), weights)
        avx2, vnni = _func_names(q, AVX2), _func_names(q, "znver4")
        for names in (avx2, vnni):
            assert not [n for n in names if "pad" in n], names
        assert any(n.startswith("conv_direct_16x3x32x32_k3s2" if weights == "int8" else
                                "im2col_3x32x32_k3s2_p0101_int8") for n in avx2), avx2
        assert not any(n.startswith("qconv_flat_") for n in avx2), avx2
        assert any(n.startswith("im2col_3x32x32_k3s2_p0101_int8") for n in vnni), vnni
        assert not any(n.startswith(("qconv_flat_", "conv_direct")) for n in vnni), vnni
        assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_quantized_waveform_conv_runs_int8_im2col():
    """An audio model's first conv on the raw waveform (wav2vec2: 1 channel, 10 taps, stride 5) runs int8 im2col
    with VNNI (10 taps in 3 whole quads, not 10 quads three-quarters zeros: 465 -> ~60 us at 16000 samples), and
    the strided conv1d after it (stride 2, a (2, 2) stride on the one-row map) a graphopt int8 kernel. Each conv1d's
    ReLU and next quantize are in its store (fold-qdq quantizes before the squeeze back to 1-D: `_clamp_q`)."""
    model = torch.nn.Sequential(torch.nn.Conv1d(1, 32, 10, 5, bias=False), torch.nn.ReLU(),
                                torch.nn.Conv1d(32, 32, 3, 2), torch.nn.ReLU(), torch.nn.Conv1d(32, 8, 1))
    q, got, ref = _quantized_block(model, (1, 1, 2000))  # (the flat conv takes a strided map this long)
    names = _func_names(q, "znver4")
    assert any(n.startswith("im2col_1x1x2000_k1s5") for n in names) and "qconv1x1_vnni_32x10x399_clamp_q" in names, \
        names
    assert "qconv1x1_vnni_32x96x199_clamp_q" in names, names
    assert "R.nn.conv" not in lower_to_relax(q, target=cpu_target("znver4")).script()
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("m,k,n", [(13, 64, 32), (6, 128, 16), (40, 96, 48)])
def test_int8_gemm_kernel_is_exact_and_uses_vpmaddwd(m, k, n):
    """qlinear's kernel: int16-widened activations, int8 weights packed in pairs, exact int32 accumulation,
    zero point / scale / bias in the epilogue; 13 and 40 rows overlap the last row tile."""
    from graphopt.targets.tvm.cpu.int8 import (MR, epilogue_constants, int8_kernels_available, pack_gemm_pairs,
                                               qgemm_source)
    if not int8_kernels_available(cpu_target()):
        pytest.skip("needs AVX2")
    f = parse_kernel(qgemm_source(m, k, n))
    loop = _inner_fma_loop(_asm(f), r"vpmaddwd")
    assert len(re.findall(r"vpmaddwd", loop)) >= 2 * MR  # a 6 x 16 tile: 12 accumulators
    assert len(re.findall(r"vpmovsxbw", loop)) >= 2  # int8 weights widened as they are loaded
    assert not re.search(r"vmovdq[au]\s+%ymm\d+, ", loop)  # accumulators stay in registers
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (m, k)).astype(np.int16)
    w = rng.integers(-127, 128, (n, k)).astype(np.int8)
    ws, bias = rng.uniform(1e-3, 2e-3, n), rng.uniform(-1, 1, n).astype(np.float32)
    off, mult, fb = epilogue_constants(w, ws, bias, 0.02, 5, n // MR + 1)
    assert fb is None  # the bias fits int32 at the accumulator's scale
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(m * n, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x.reshape(-1), pack_gemm_pairs(w), off[:n], mult[:n])), out)
    b_int = np.round(bias / (ws * 0.02))  # the bias as stored: int32 at the accumulator's scale
    ref = ((x.astype(np.int64) - 5) @ w.astype(np.int64).T + b_int) * (ws * 0.02)
    assert np.abs(ref - ((x.astype(np.int64) - 5) @ w.astype(np.int64).T * (ws * 0.02) + bias)).max() <= 0.5 * (ws * 0.02).max()
    assert np.abs(out.numpy().reshape(m, n) - ref).max() <= 1e-6 * np.abs(ref).max()


def test_ubsw_exactness_bound():
    """vpmaddubsw sums a pair of u8 x s8 products in int16 with saturation: exact for every u8 input iff each pair's
    positive weights sum to <= 128 and its negative ones to >= -128."""
    from graphopt.targets.tvm.cpu.int8 import ubsw_exact
    assert ubsw_exact(np.array([[100, 28, -64, -64]], np.int8))
    assert not ubsw_exact(np.array([[100, 29, 0, 0]], np.int8))  # 255 * 129 = 32895 > 32767
    assert not ubsw_exact(np.array([[0, 0, -100, -29]], np.int8))
    assert ubsw_exact(np.array([[127, -128, 0, 0]], np.int8))  # opposite signs never add up
    assert ubsw_exact(np.random.default_rng(0).integers(-64, 65, (32, 64)).astype(np.int8))  # int7 weights
    assert not ubsw_exact(np.array([[1, 2, 3]], np.int8))  # odd K: no pairs


@pytest.mark.parametrize("cb,k4,nr", [(13, 24, 16), (25, 24, 8), (4, 80, 16), (196, 6, 16), (13, 144, 16), (1, 512, 16)])
def test_quad_kernel_pixel_chunks_are_even(cb, k4, nr):
    """The threads take contiguous runs of the quad kernel's tasks, so its pixel chunks must be of equal length (a
    chunk of 21 blocks next to one of 4 left a thread idle most of the call) and each chunk's staged quads fit half
    of L1 (16 KB) unless one block alone is bigger."""
    from graphopt.targets.tvm.cpu.int8 import quad_chunks
    chunks, nblk = quad_chunks(cb, k4, nr)
    lengths = [(c + 1) * cb // chunks - c * cb // chunks for c in range(chunks)]  # the kernel's chunk bounds
    assert sum(lengths) == cb and max(lengths) == nblk and max(lengths) - min(lengths) <= 1
    assert nblk * k4 * nr * 4 <= max(16384, k4 * nr * 4)


@pytest.mark.parametrize("m,k,n", [(13, 64, 32), (6, 128, 16)])
def test_int8_gemm_ubsw_kernel_is_exact_at_the_saturation_edge(m, k, n):
    """The u8 x s8 kernel (`vpmaddubsw`, then `vpmaddwd` by ones) on weights at the bound (pairs summing to +-128
    against activations of 255, the largest int16 pair sums) and random 7-bit weights: equal to the int64 product."""
    from graphopt.targets.tvm.cpu.int8 import (MR, epilogue_constants, int8_kernels_available, pack_gemm_quads,
                                               qgemm_ubsw_source, ubsw_exact)
    if not int8_kernels_available(cpu_target()):
        pytest.skip("needs AVX2")
    f = parse_kernel(qgemm_ubsw_source(m, k, n))
    loop = _inner_fma_loop(_asm(f), r"vpmaddubsw")
    assert len(re.findall(r"vpmaddubsw", loop)) >= 2 * MR and "vpmovsxbw" not in loop
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (m, k)).astype(np.int16)
    x[0] = 127  # u8 255 after the shift
    w = rng.integers(-64, 65, (n, k)).astype(np.int8)
    w[0, :] = np.tile(np.array([100, 28, -64, -64], np.int8), k // 4)
    w[1, :] = np.tile(np.array([-128, 0, 64, 64], np.int8), k // 4)
    assert ubsw_exact(w)
    ws = rng.uniform(1e-3, 2e-3, n)
    off, mult, _ = epilogue_constants(w, ws, None, 1.0, 5 + 128, n // MR + 1)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(m * n, np.float32))
    u8 = (x + 128).astype(np.uint8)
    lib["main"](*(tvm.runtime.tensor(a) for a in (u8.reshape(-1), pack_gemm_quads(w), off[:n], mult[:n])), out)
    ref = ((x.astype(np.int64) - 5) @ w.astype(np.int64).T) * ws
    assert np.abs(out.numpy().reshape(m, n) - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("weights", ["int7", "int8s"])
def test_pair_width_quantized_linears_take_the_ubsw_kernel(weights):
    """quantize{weights=int7} stores 7-bit weights, int8s pair-bounded int8 ones: every linear lowers to the u8 x s8
    kernel and the artifact equals the graph (exact products; the GELU between can move a value across a rounding
    boundary)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 48)).eval()
    x = torch.randn(1, 10, 32)
    data = [(torch.randn(1, 10, 32),) for _ in range(4)]
    q = graphopt.optimize(graphopt.trace(model, (x,)), f"quantize{{weights={weights}}},fold-qdq", data=data)
    names = _func_names(q, AVX2)
    assert len([n for n in names if n.startswith("qgemm_ubsw_")]) == 2, names
    assert not [n for n in names if n.startswith("qgemm_1")], names
    q8 = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int8},fold-qdq", data=data)
    assert not [n for n in _func_names(q8, AVX2) if "ubsw" in n]  # full-range int8 weights break the bound here
    got, ref = _built_and_reference(q, x, AVX2)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    # and int7 stays close to the float model
    f32 = model(x).detach().numpy()
    assert np.abs(ref - f32).max() <= 0.05 * np.abs(f32).max()


@pytest.mark.parametrize("weights", ["int7", "int8s"])
def test_pair_width_quantized_pointwise_convs_take_the_quad_kernel(weights):
    """7-bit or pair-bounded int8s weights put pointwise convs on the u8 quad kernel (int8 and dequantized-float
    stores, ReLU6 fused); the artifact agrees with the graph to a rounding step of the int8 grids in between."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 36, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(36, 48, 1),
                                torch.nn.ReLU6(), torch.nn.Conv2d(48, 48, 3, padding=1, groups=48),
                                torch.nn.Conv2d(48, 20, 1)).eval()
    x = torch.randn(1, 8, 14, 14)
    q = graphopt.optimize(graphopt.trace(model, (x,)), f"quantize{{weights={weights}}},fold-qdq",
                          data=[(torch.randn(1, 8, 14, 14),) for _ in range(4)])
    names = _func_names(q, AVX2)
    assert len([n for n in names if n.startswith("qconv1x1_ubsw_")]) == 2, names
    got, ref = _built_and_reference(q, x, AVX2)
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


@pytest.mark.parametrize("weights,batch", [("int8", 1), ("int7", 2), ("int8s", 1)])
def test_quantized_dense_convs_run_on_the_int8_kernels(weights, batch, monkeypatch):
    """A quantized ResNet basic block: where the quad product is exact (7-bit or pair-bounded int8s weights on
    AVX2, any int8 weight with VNNI) its stride-1 3x3 convs run over the input's quad planes, padded with its zero
    point: the pixel-row int8 conv (with VNNI; on AVX2 where the output is float, as both are here: the residual
    add, the block's output; on AVX2 the strided 3x3 conv too, its 32 output channels two whole panels);
    otherwise, and for the strided 3x3 conv with VNNI and the strided 1x1 shortcut, int8 im2col (the zero point
    outside the image; tap-major rows, so int8s's channel pairs are the kernel's pairs there too) then the
    pointwise int8 kernel. ReLU and the next quantize are
    in the stores; no TVM conv is left (its generic int8 conv made a quantized ResNet-18 twice as slow as the fp32
    one). The artifact agrees with the graph's own integer ops within a rounding step of the int8 grids between.
    (AMX off: on AMX CPUs the stride-1 convs take the tile form, test_amx.py.)"""
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    torch.manual_seed(0)
    model = _BasicBlock().eval()
    x = torch.randn(batch, 16, 20, 20)
    q = graphopt.optimize(graphopt.trace(model, (x,)), f"quantize{{weights={weights}}},fold-qdq",
                          data=[(torch.randn(batch, 16, 20, 20),) for _ in range(4)])
    names = _func_names(q)
    nt = f"_n{batch}" if batch > 1 else ""
    dot = int8_dot(cpu_target())
    kernel = f"qconv1x1_{dot}_" if weights in ("int7", "int8s") or dot == "vnni" else "qconv1x1_"
    expected = ["im2col_16x20x20_k1s2_p0000_int8_tm", f"{kernel}32x16x100"]
    if dot == "ubsw" and weights != "int8":  # AVX2's pixel-row int8 conv at stride 2 (whole 16-channel panels)
        expected.append("qconv_tok_ubsw_32x16x20x20_k3x3s2_p1111_clamp_q")
    else:
        expected += ["im2col_16x20x20_k3s2_p1111_int8_tm", f"{kernel}32x144x100_clamp_q"]
    if weights != "int8" or dot == "vnni":
        conv = f"qconv_tok_{dot}"  # the pixel-row int8 conv: with VNNI, and on AVX2 for these float outputs
        expected += ["quad_planes_32x10x10_k3x3s1_p1111", f"{conv}_32x32x10x10_k3x3s1_p1111",
                     "quad_planes_32x11x11_k3x3s1_p0000", f"{conv}_24x32x11x11_k3x3s1_p0000"]
        assert not [n for n in names if n.startswith("im2col_32x")], names
    else:
        expected += ["im2col_32x10x10_k3s1_p1111_int8", f"{kernel}32x288x100", f"{kernel}24x288x81"]
    for f in expected:
        assert any(n.startswith(f) and n.endswith(nt) for n in names), (f, names)
    assert not [n for n in names if "conv2d" in n], names
    got, ref = _built_and_reference(q, x)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9999


@pytest.mark.parametrize("x_shape,cout,k,stride,pad,store", [
    ((1, 64, 28, 28), 13, 3, 1, (1, 1, 1, 1), "q"),  # a partial panel; blocks crossing rows
    ((2, 18, 40, 47), 16, 5, 2, (2, 1, 1, 2), "dq"),  # a partial quad, four phase planes, uneven padding, batch 2
    ((1, 12, 52, 61), 8, 3, 3, (1, 0, 1, 0), "f"),  # nine phase planes, float out
    ((1, 32, 7, 7), 24, 3, 1, (1, 1, 1, 1), "fb")])  # 7x7: a block spans three rows; a float bias
def test_flat_int8_conv_equals_im2col_and_the_pointwise_kernel(x_shape, cout, k, stride, pad, store):
    """The flat int8 conv (quad planes padded with the zero point, staged per block and tap) computes exactly what
    int8 im2col + the pointwise quad kernel does: same integer sums, same epilogue (int8 on the next grid `q`, its
    floats `dq`, float `f`, float bias `fb` when a weight scale is ~0)."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import emit_flat_qconv, emit_im2col_qconv, flat_qconv_applies, int8_dot
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    dot = int8_dot(cpu_target())
    if dot is None:
        pytest.skip("needs AVX2")
    rng = np.random.default_rng(0)
    cin = x_shape[1]
    w = rng.integers(-63, 64, (cout, cin, k, k)).astype(np.int8)
    assert flat_qconv_applies(w, dot)
    ws = rng.uniform(1e-3, 2e-3, cout)
    if store == "fb":
        ws[2] = 1e-12
    out_q = (0.05, 3, -128, 127) if store in ("q", "dq") else None
    args = (w, ws, rng.uniform(-1, 1, cout).astype(np.float32), 0.02, -7, x_shape, stride, pad, (0.0, 6.0), out_q,
            store == "dq", dot)
    x = tvm.runtime.tensor(rng.integers(-128, 128, x_shape).astype(np.int8))
    outs, names = {}, set()
    for emit in (emit_flat_qconv, emit_im2col_qconv):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x_shape, "int8"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(emit(bb, xv, *args))
            bb.emit_func_output(y)
        mod = bb.get()
        names |= {gv.name_hint for gv in mod.get_global_vars()}
        outs[emit] = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](x).numpy()
    assert any(n.startswith(f"qconv_flat_{dot}_{cout}x{cin}x") for n in names), names
    assert outs[emit_flat_qconv].dtype == (np.int8 if store == "q" else np.float32)
    np.testing.assert_array_equal(outs[emit_flat_qconv], outs[emit_im2col_qconv])


def test_quantized_big_map_conv_after_a_pad_runs_on_the_flat_int8_conv():
    """A dense 3x3 conv on a map too big for im2col's columns (16 x 9 x 100 x 100 > 4 M) took the float direct
    kernel on the dequantized input; with 7-bit weights it is the flat int8 conv (with VNNI the pixel-row one), and
    the zero pad before its input's quantize (TF "SAME" padding) joins its padding (on AMX CPUs: the tile form over
    the same planes). Within a rounding step of the graph's integer ops."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 1), torch.nn.ReLU(), torch.nn.ZeroPad2d((0, 1, 0, 1)),
                                torch.nn.Conv2d(16, 16, 3, stride=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, 3, 200, 200)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int7},fold-qdq",
                          data=[(torch.randn(1, 3, 200, 200),) for _ in range(2)])
    names = _func_names(q)
    assert any(n.startswith(("qconv_flat_", "qconv_tok_", "qgemm_amx_flat_")) and "_16x16x200x200_k3x3s1_p0101" in n
               for n in names), names  # (qgemm_amx_flat: the tile form, on AMX CPUs)
    assert not any(n.startswith(("conv_direct", "constant_pad")) for n in names), names
    got, ref = _built_and_reference(q, x)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.9999


@pytest.mark.parametrize("tokens,hidden", [(10, 32), (16, 40)])  # 40: a width padded to whole 16-column panels
def test_quantized_linear_layers_lower_to_the_int8_gemm(tokens, hidden):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(hidden, 64), torch.nn.GELU(), torch.nn.Linear(64, hidden)).eval()
    x = torch.randn(1, tokens, hidden)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq",
                          data=[(torch.randn(1, tokens, hidden),) for _ in range(4)])
    names = _func_names(q)
    assert len([n for n in names if n.startswith("qgemm_")]) == 2, names
    got, ref = _built_and_reference(q, x)
    # exact integer products; only the float GELU between the layers can move a value across a rounding boundary
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


class _QuantRoundTrip(torch.nn.Module):
    def forward(self, x):
        q = torch.ops.graphopt.quantize_per_tensor(x, 0.5, 3, -128, 127, torch.int8)
        return torch.ops.graphopt.dequantize_per_tensor(q, 0.5, 3)


def test_compiled_quantize_rounds_half_to_even_and_clamps():
    from tvm import relax
    """The compiled quantize equals the reference on ties (x / scale = k + 0.5, both
    signs), on the int8 range's edges and on huge values."""
    import graphopt.ir.quant_ops  # noqa: F401  registers the ops
    ties = np.arange(-300, 300, dtype=np.float32) * 0.5 + 0.25  # x / 0.5 = k + 0.5 for every k in [-300, 299]
    x = torch.from_numpy(np.concatenate([ties, [1e9, -1e9, 63.9, -65.6, 0.0, -0.0, 1e-8, 62.0, -65.5]]).astype(np.float32))
    x = x.reshape(1, -1)
    g = graphopt.trace(_QuantRoundTrip(), (x,))
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    np.testing.assert_array_equal(got, g.run(x)[0].numpy())


@pytest.mark.parametrize("literals", [False, True])
@pytest.mark.parametrize("times", [None, "T.float32(0.5)"])
@pytest.mark.parametrize("clamp", [None, (0.0, 6.0)])
def test_int8_store_rounds_through_the_float_bits_and_clamps_any_value(literals, times, clamp):
    """The kernels' int8 store (`_clamped` with out_q): value (* times) + zero point + 1.5 * 2^23, its float bits
    clamped as int32 and narrowed. Against round-half-to-even of value + zero point, clamped to the grid and ReLU6
    bounds (or the int8 range alone), for ties of both signs, the bounds' edges, values past 2^22 and 2^24 (other
    float exponents), and values below -1.5 * 2^23 (negative floats, whose bits are negative ints)."""

    from graphopt.targets.tvm.cpu.conv import _clamped, grid_bounds, store_params
    out_q = (0.05, 3, -128, 127)
    steps = np.arange(-300, 300, dtype=np.float64) + 0.5
    v = np.concatenate([steps, [0.0, -0.49, 119.5, 120.5, 121.0, 5e6, -5e6, 2e7, -2e7, 1e10, -1e10, 4.4e6, -1.3e7]])
    v = np.concatenate([v, np.zeros(-len(v) % 8)]).astype(np.float32)
    x = v / 0.5 if times else v  # times 0.5: exact products
    store = _clamped("x[i * 8 + u]", clamp, out_q, qp=None if literals else "qp", times=times)
    src = f"""
@T.prim_func
def main(x: T.Buffer(({len(x)},), "float32"), qp: T.Buffer((4,), "float32"), out: T.Buffer(({len(x)},), "int8")):
    T.func_attr({{"tirx.noalias": True}})
    for i in T.serial({len(x) // 8}):
        for u in T.vectorized(8):
            out[i * 8 + u] = {store}
"""
    f = parse_kernel(src)
    lib = tvm.compile(tvm.IRModule({"main": f}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(len(x), np.int8))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(store_params(clamp, out_q)), out)
    lo, hi = grid_bounds(clamp, out_q)
    ref = np.clip(np.rint(v.astype(np.float64) + out_q[1]), lo + out_q[1], hi + out_q[1]).astype(np.int8)
    np.testing.assert_array_equal(out.numpy(), ref)


def test_elementwise_rule_keeps_int8_round_trips_vectorized():
    """A quantize -> dequantize of a 224x224 image (a quantized model's input) writes floats but narrows to int8 on
    the way: with 16-lane vectors LLVM scalarized the narrowing and re-vectorized across rows, gathering and
    scattering lane by lane (vinsertps / vextractps); with whole 8-bit registers (32 lanes) it stays contiguous."""
    from tvm import relax
    import graphopt.ir.quant_ops  # noqa: F401  registers the ops
    x = torch.randn(1, 3, 224, 224) * 4
    g = graphopt.trace(_QuantRoundTrip(), (x,))
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    np.testing.assert_array_equal(got, g.run(x)[0].numpy())
    asm = "".join(m.inspect_source("s") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")
    assert re.search(r"vroundps|vrndscaleps", asm)  # (AVX-512 rounds with vrndscaleps)
    assert "vinsertps" not in asm and "vextractps" not in asm



class _QuantizeImage(torch.nn.Module):
    """An int8 model's input quantize on a 4-D image, and torch.round in a float model."""
    def forward(self, x):
        q = torch.ops.graphopt.quantize_per_tensor(x, 0.04, -4, -128, 127, torch.int8)
        return q, torch.round(x * 2.5)


def test_round_runs_vectorized_and_half_to_even():
    """relax.round (a quantize's rounding, torch.round) is LLVM's nearbyint element by element: TVM's T.nearbyint
    made its vectorizer scalarize the whole expression of a 4-D elementwise function, with the indices' divisions
    per lane (a 3x320x320 input quantize: 296 us alone against 18, 9x the int8 stem conv after it). Ties round to
    even as in PyTorch."""
    from tvm import relax
    import graphopt.ir.quant_ops  # noqa: F401  registers the ops
    x = torch.randn(1, 3, 320, 320) * 3  # (rows of 320: smaller maps had vectorized)
    x[0, 0, 0, :24] = torch.arange(-12, 12) * 0.4 + 0.2  # x * 2.5 = k + 0.5
    x[0, 1, 0, :16] = (torch.arange(-8, 8) + 0.5) * 0.04  # x / 0.04 = k + 0.5
    g = graphopt.trace(_QuantizeImage(), (x,))
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    for o, want in zip(got, g.run(x)):
        np.testing.assert_array_equal(o.numpy(), want.numpy())
    np.testing.assert_array_equal(got[1].numpy(), torch.round(x * 2.5).numpy())
    asm = "".join(m.inspect_source("s") for m in [ex.mod, *ex.mod.imports] if m.kind == "llvm")
    assert re.search(r"vroundps|vrndscaleps", asm)
    assert "vpextrb" not in asm  # (the scalarized quantize stored its int8 codes byte by byte)

@pytest.mark.parametrize("k,n,bias,bits", [(1280, 1000, True, 8), (63, 40, False, 8), (63, 40, True, 4)])
def test_quantized_batch1_linear_streams_int8_weights(k, n, bias, bits):
    """A one-row qlinear (an int8 classifier head) runs a weight-stream kernel padded to whole panels of 16 columns
    and matches the reference integer op within float rounding: with VNNI the weights stream as quads into
    `vpdpbusd` (int4 ones as nibbles, two bytes a quad, widened as read); without it they are converted to float
    as loaded."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(k, 32), torch.nn.ReLU(), torch.nn.Linear(32, k),
                                torch.nn.Linear(k, n, bias=bias)).eval()
    x = torch.rand(1, k)
    q = graphopt.optimize(graphopt.trace(model, (x,)), f"quantize{{weights=int{bits}}},fold-qdq",
                          data=[(torch.rand(1, k),) for _ in range(4)])
    names = _func_names(q)
    quads = int8_dot(cpu_target()) == "vnni"
    assert any(nm.startswith(f"qgemv_vnni_{k}x" if quads else f"qgemv_{k}x") and nm.endswith("_w4") == (bits == 4)
               for nm in names), names
    from tvm import relax
    ex, *_ = build_executable(q)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    want = q.run(x)[0].numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("dtype,nbytes", [("int8", 64), ("int8", 100), ("int32", 28512), ("int32", 68)])
def test_widen_nibbles_restores_weights_of_any_whole_word_length(dtype, nbytes):
    """The load-time kernel that widens int4 nibbles back to the packed int8 weight restores every byte where the
    weight is not whole 64-byte steps too (its last step overlaps the one before): an int4 3x3 conv of 64 output
    channels on AVX2's 6-channel panels packs 28512 bytes and had stayed int8 in the artifact."""
    from graphopt.targets.tvm.cpu.int8 import nibble_quads, widen_nibbles_source
    from graphopt.targets.tvm.cpu.parse import parse_kernel
    data = np.random.default_rng(nbytes).integers(-8, 8, nbytes).astype(np.int8)
    f = parse_kernel(widen_nibbles_source(dtype))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    w = tvm.runtime.tensor(np.full(nbytes // (4 if dtype == "int32" else 1), 99, dtype))
    lib["main"](tvm.runtime.tensor(nibble_quads(data.view(np.int32))), tvm.runtime.tensor(np.zeros(1, np.int8)), w)
    np.testing.assert_array_equal(w.numpy().view(np.int8), data)


@pytest.mark.parametrize("layers,amx", [("linear12", "0"), ("linear40", "1"), ("conv3x3", "0"), ("conv3x3", "1")])
def test_int4_weights_stay_nibbles_in_the_artifact(tmp_path, monkeypatch, layers, amx):
    """int4 layers on kernels that read a whole int8 weight (the int8 GEMMs: VNNI or AVX2 quads, AMX tiles for 40
    rows where the CPU has them; 3x3 convs on the flat / pixel-row int8 convs or AMX tiles, or on AVX2 the int8
    Winograd conv), built for an artifact (`prepare=True`), keep their weights as nibbles: `main` takes them
    widened (Winograd's: transformed), from the executable's `prepare` (one widening function, whatever the
    sizes; a transform per conv shape), which the build's constant folding did not evaluate, and the
    library is smaller than the plain build's (int8 constants) by 40% of the weights' values at least (half, less
    the widening's code); the outputs are identical, and those of the compiled artifact."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import int8
    monkeypatch.setenv("GRAPHOPT_AMX", amx)
    if not int8.int8_kernels_available(cpu_target()):
        pytest.skip("needs AVX2")
    torch.manual_seed(0)
    if layers == "conv3x3":
        model = torch.nn.Sequential(torch.nn.Conv2d(64, 48, 3, padding=1), torch.nn.ReLU(),
                                    torch.nn.Conv2d(48, 64, 3, padding=1))
        shape = (1, 64, 12, 12)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(256, 192), torch.nn.ReLU(), torch.nn.Linear(192, 256))
        shape = (1, int(layers[6:]), 256)
    x = torch.rand(*shape)
    q = graphopt.optimize(graphopt.trace(model.eval(), (x,)), "quantize{weights=int4},fold-qdq",
                          data=[(torch.rand(*shape),) for _ in range(4)])

    def built(name, prepare):
        stats = {}
        ex, *_ = build_executable(q, stats=stats, prepare=prepare)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        weights = list(vm["prepare"](tvm.runtime.tensor(np.zeros(1, np.int8)))) if prepare else []
        assert len(weights) == stats.get("prepared_weights", 0)
        out = vm["main"](tvm.runtime.tensor(x.numpy()), *weights)
        ex.export_library(str(tmp_path / name), options=["-s"])  # (stripped, as compile writes it)
        return ex.as_text(), (out if hasattr(out, "numpy") else out[0]).numpy(), (tmp_path / name).stat().st_size

    text, got, size = built("int4.so", True)
    text8, want, size8 = built("int8.so", False)
    # (AVX2's int8 Winograd convs make their transformed weight from the nibbles: `qwinograd.qwinograd_weights`)
    made_by = ("qwinograd_weights" if layers == "conv3x3" and int8.int8_dot(cpu_target()) == "ubsw"
               else "widen_nibbles")
    assert made_by in text and made_by not in text8 and "@prepare" in text
    assert made_by not in text.split("@main")[1].split("\n\n@")[0]  # (made by prepare, not each call)
    assert size8 - size >= 0.4 * sum(p.numel() for p in model.parameters() if p.dim() > 1)
    np.testing.assert_array_equal(got, want)
    ref = q.run(x)[0].numpy()  # (the kernels round the bias to the accumulator's grid, the reference does not)
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()
    art = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "art"))
    assert art.manifest["target_info"]["prepared_weights"] == 2
    np.testing.assert_array_equal(art(x.numpy())[0], got)
    if layers == "linear12":  # a manifest from another compile: refused at load, naming the field
        import json
        path = tmp_path / "art" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["target_info"]["prepared_weights"] = 3
        path.write_text(json.dumps(manifest))
        with pytest.raises(graphopt.ArtifactError, match="target_info.prepared_weights says 3, but .* made 2"):
            graphopt.load(tmp_path / "art")


@pytest.mark.parametrize("rows", [2, 3, 5])
def test_quantized_linear_of_two_to_five_rows(rows):
    """A qlinear of 2-5 rows (a classifier head at batch 2-5, a short sequence) fell to TVM's generic int8 matmul,
    10-25x the one-row kernel's time; with VNNI 2 rows stream the weight once for both (the quad GEMV), 3-5 run the
    int8 GEMM on one row tile padded with zero rows. Outputs match the reference op."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 40)).eval()
    x = torch.rand(rows, 96)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq",
                          data=[(torch.rand(rows, 96),) for _ in range(2)])
    names = _func_names(q, "znver4")
    assert any(nm.startswith("qgemv_vnni_96x48_m2" if rows == 2 else "qgemm_vnni_6x96x48") for nm in names), names
    got, want = _built_and_reference(q, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("k,n,bits", [(1280, 1000, 8), (50, 40, 8), (8, 16, 8), (1280, 1000, 4), (50, 40, 4)])
def test_quad_gemv_is_exact(k, n, bits):
    """The quad GEMV (`qgemv_quads_source`) against the float-converting weight stream and the integer reference:
    sum (x - zx) w is exact in int32 before the scale, on the exact quad product everywhere and `vpdpbusd` where
    the CPU has it; zero points and padded columns (40 -> 48) included (50: a partial last quad and a tail sum).
    bits=4: int4 weights, stored as nibbles by both kernels."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import emit_qgemv
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(0)
    lim = 2 ** (bits - 1)
    wq = rng.integers(-lim, lim, (n, k)).astype(np.int8)
    wq[0], wq[1] = lim - 1, -lim  # the largest sums; every nibble's sign bit
    ws, b = rng.uniform(1e-3, 2e-3, n), rng.standard_normal(n).astype(np.float32)
    sx, zx = 0.05, -7
    x = rng.integers(-128, 128, (1, k)).astype(np.int8)
    x[0, :8] = 127
    want = ((x[0].astype(np.int64) - zx) @ wq.T.astype(np.int64)).astype(np.float64) * ws * sx + b
    dots = [None, "exact"] + (["vnni"] if int8_dot(cpu_target()) == "vnni" else [])
    for dot in dots:
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType((1, k), "int8"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = bb.emit_output(emit_qgemv(bb, xv, wq, ws, b, sx, zx, k, dot))
            bb.emit_func_output(y)
        mod = bb.get()
        assert any(g.name_hint.startswith(f"qgemv_{dot + '_' if dot else ''}{k}x")
                   and g.name_hint.endswith("_w4") == (bits == 4) for g in mod.get_global_vars())
        got = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
        assert got.shape == (n,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_vnni_gemm_with_16_lanes_emits_512_bit_vpdpbusd():
    """Built for a full-width AVX-512 CPU (cross-compiled), the int8 GEMM with 16-lane accumulators does each row's
    16 columns per 4 inputs with one zmm `vpdpbusd`, four panels a task (24 in the reduction loop, 24 accumulators
    in registers); the lowering picks it there, with as many panels as divide N's (64 columns: 4, 32: 2), and
    keeps the 8-lane form for Zen 4."""

    from graphopt.targets.tvm.cpu.int8 import MR, qgemm_ubsw_source
    f = parse_kernel(qgemm_ubsw_source(13, 256, 64, dot="vnni", lanes=16, panels=4))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=cpu_target("sapphirerapids"))
    loop = _inner_fma_loop(lib.mod.inspect_source("asm"), r"vpdpbusd")
    dots = re.findall(r"^\s+vpdpbusd\s+(\S+)", loop, re.M)
    assert len(dots) >= 4 * MR and all(d.startswith("%zmm") or d.startswith("(") for d in dots), loop
    assert not re.search(r"vmovdq[au](?:32|64)?\s+%zmm\d+, ", loop)  # accumulators stay in registers
    torch.manual_seed(0)
    for n_out, panels in ((64, 4), (32, 2), (48, 1)):
        layer = torch.nn.Linear(64, n_out).eval()
        x = torch.randn(12, 64)
        q = graphopt.optimize(graphopt.trace(layer, (x,)), "quantize,fold-qdq", data=[(torch.randn(12, 64),)])
        names = {cpu: _func_names(q, cpu) for cpu in ("sapphirerapids", "znver4")}
        assert any(n.startswith("qgemm_vnni") and n.endswith(f"_v16p{panels}") for n in names["sapphirerapids"])
        assert any(n.startswith("qgemm_vnni") for n in names["znver4"])
        assert not any("_v16" in n for n in names["znver4"])


@pytest.mark.parametrize("nv,tiles", [(4, 1), (4, 2)])
def test_vnni_pointwise_with_16_lanes_keeps_its_tile_in_zmm_registers(nv, tiles):
    """Cross-compiled for a full-width AVX-512 CPU, the int8 pointwise kernel's 16-lane tiles (32 pixels x 6 or 12
    channels: 12 or 24 accumulators in buffers of one vector a row) reduce with zmm `vpdpbusd` on registers only
    and store no accumulator in the loop."""

    from graphopt.targets.tvm.cpu.int8 import MR, qconv1x1_ubsw_source
    f = parse_kernel(qconv1x1_ubsw_source(24, 64, 196, nv, dot="vnni", tiles=tiles, lanes=16))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=cpu_target("sapphirerapids"))
    loop = _inner_fma_loop(lib.mod.inspect_source("asm"), r"vpdpbusd")
    dots = re.findall(r"^\s+vpdpbusd\s+([^\n]*)", loop, re.M)
    assert len(dots) >= MR * tiles * nv // 2, loop
    assert all(re.fullmatch(r"%zmm\d+, %zmm\d+, %zmm\d+", d.strip()) for d in dots), dots
    assert not re.search(r"vmovdq[au](?:32|64)?\s+%zmm\d+, ", loop), loop  # accumulators stay in registers


def test_int8_pointwise_kernel_refuses_tiles_its_vectors_cannot_hold():
    """16 lanes need whole 16-pixel vectors and a product with a 512-bit form; two channel blocks at most 32 pixels.
    The errors name the setting."""
    from graphopt.targets.tvm.cpu.int8 import qconv1x1_ubsw_source
    with pytest.raises(ValueError, match=r"lanes=16, nv=1 \(8-pixel blocks\)"):
        qconv1x1_ubsw_source(8, 16, 49, 1, dot="vnni", lanes=16)
    with pytest.raises(ValueError, match=r"dot='ubsw'"):
        qconv1x1_ubsw_source(8, 16, 49, 2, dot="ubsw", lanes=16)
    with pytest.raises(ValueError, match="at most 32 with 16 lanes"):
        qconv1x1_ubsw_source(8, 16, 196, 8, dot="vnni", lanes=16, tiles=2)


def _vnni_here() -> bool:
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    return int8_dot(cpu_target()) == "vnni"


@pytest.mark.parametrize("cpu,encoding", [("alderlake", "{vex}"), ("znver4", "")])  # AVX-VNNI; AVX512-VNNI + VL
def test_vnni_kernels_emit_vpdpbusd(cpu, encoding):
    """Built for a CPU with VNNI (cross-compiled: this machine need not have it), both quad kernels do each 32-byte
    u8 x s8 step with one `vpdpbusd` into an int32 accumulator held in a register: 12 in the GEMM's reduction
    loop (6 x 16 tile), 12 in the pointwise conv's (6 channels x 16 pixels), no `vpmaddubsw` / `vpmaddwd` pair."""
    from graphopt.targets.tvm.cpu.int8 import MR, int8_dot, qconv1x1_ubsw_source, qgemm_ubsw_source
    tgt = cpu_target(cpu)
    assert int8_dot(tgt) == "vnni"
    for src in (qgemm_ubsw_source(13, 256, 32, dot="vnni"),
                qconv1x1_ubsw_source(40, 190, 196, 2, (0.0, 6.0), (0.05, 3, -128, 127), dot="vnni")):
        f = parse_kernel(src)
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=tgt)
        asm = lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")
        loop = _inner_fma_loop(asm, r"vpdpbusd")
        dots = re.findall(r"^\s+(\{vex\})?\s*vpdpbusd\s", loop, re.M)
        assert len(dots) >= 2 * MR and all(d == encoding for d in dots)
        assert "vpmaddubsw" not in loop and "vpmaddwd" not in loop
        assert not re.search(r"vmovdq[au](?:32|64)?\s+%ymm\d+, ", loop)  # accumulators stay in registers


@pytest.mark.parametrize("dot", ["exact", "vnni"])
@pytest.mark.parametrize("kernel", ["gemm", "conv"])
def test_quad_kernels_are_exact_for_full_range_int8_weights(dot, kernel):
    """The quad kernels' layout, packing and epilogue with a product that cannot saturate: "exact" (the same sum in
    widened vector arithmetic, runs anywhere) and, on a CPU with VNNI, `vpdpbusd` itself. Weights use the whole
    int8 range, with the worst case (255 x -128, four times) where `vpmaddubsw` would saturate. The GEMM also
    with 16-lane accumulators (the 512-bit form; for "vnni" where this CPU has AVX512-VNNI), one, two and four
    16-column panels a task (64 columns: 4, 2 and 1 tasks per row tile). The conv also with
    two channel blocks per register tile (`tiles=2`, VNNI's tuning candidate; 13 channels: the second block of the
    last pair is past the weight and must not be stored), and with 16-lane vectors of 16 or 32 pixels, one or two
    channel blocks (the 512-bit rule and its candidates); on 49, 40 and 41 pixels (last blocks overlapping the
    one before by 15, 8 and 7 pixels at 16 a block). A map narrower than a block is refused."""
    if dot == "vnni" and not _vnni_here():
        pytest.skip("this CPU has no VNNI (the exact variant checks the same kernel's layout)")
    rng = np.random.default_rng(3)
    for p in ((None,) if kernel == "gemm" else (49, 40, 41)):
        _check_quad_kernel(kernel, dot, rng, p)
    if kernel == "conv":
        from graphopt.targets.tvm.cpu.int8 import qconv1x1_ubsw_source
        with pytest.raises(ValueError, match="32 pixels or more, not 24"):
            qconv1x1_ubsw_source(13, 63, 24, 4, dot=dot, lanes=16)


def _check_quad_kernel(kernel, dot, rng, p):
    """`test_quad_kernels_are_exact_for_full_range_int8_weights` for one kernel (and pixel count)."""
    from graphopt.targets.tvm.cpu.conv import store_params
    from graphopt.targets.tvm.cpu.int8 import (MR, epilogue_constants, pack_gemm_quads, pack_quads,
                                               qconv1x1_ubsw_source, qgemm_ubsw_source, ubsw_exact)
    if kernel == "gemm":
        m, k, n = 13, 64, 64
        x = rng.integers(-128, 128, (m, k)).astype(np.int16)
        x[0] = 127  # u8 255 after the shift
        w = rng.integers(-128, 128, (n, k)).astype(np.int8)
        w[0] = -128
        w[1] = 127
        assert not ubsw_exact(w)
        ws = rng.uniform(1e-3, 2e-3, n)
        off, mult, _ = epilogue_constants(w, ws, None, 1.0, 5 + 128, n // MR + 1)
        wide = dot == "exact" or vector_lanes(cpu_target()) == 16
        fs = [parse_kernel(qgemm_ubsw_source(m, k, n, dot=dot, lanes=lanes, panels=panels))
              for lanes, panels in ((8, 1), (16, 1), (16, 2), (16, 4))[:4 if wide else 1]]
        args = ((x + 128).astype(np.uint8).reshape(-1), pack_gemm_quads(w), off[:n], mult[:n])
        out = np.zeros(m * n, np.float32)
        ref = ((x.astype(np.int64) - 5) @ w.astype(np.int64).T) * ws
    else:
        cout, cin = 13, 63
        x = rng.integers(-128, 128, (cin, p)).astype(np.int8)
        x[:, 0] = 127
        w = rng.integers(-128, 128, (cout, cin)).astype(np.int8)
        w[0] = -128
        mt = -(-cout // MR)
        ws, zx = rng.uniform(1e-3, 2e-3, cout), -7
        consts = epilogue_constants(w, ws, None, 1.0, zx + 128, mt)
        wide = dot == "exact" or vector_lanes(cpu_target()) == 16
        fs = [parse_kernel(qconv1x1_ubsw_source(cout, cin, p, nv, dot=dot, tiles=tiles, lanes=lanes))
              for nv, tiles, lanes in ((2, 1, 8), (1, 2, 8), (4, 1, 16), (2, 2, 16), (4, 2, 16))[:5 if wide else 2]]
        args = (x.reshape(-1), pack_quads(w, mt), consts[0], consts[1], store_params(None, None))
        out = np.zeros(cout * p, np.float32)
        ref = (w.astype(np.int64) @ (x.astype(np.int64) - zx)) * ws[:, None]
    for f in fs:
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
        res = tvm.runtime.tensor(np.full_like(out, np.nan))
        lib["main"](*(tvm.runtime.tensor(a) for a in args), res)
        got = res.numpy().reshape(ref.shape)
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def _int8_block():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 36, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(36, 48, 1),
                                torch.nn.ReLU6(), torch.nn.Conv2d(48, 20, 1), torch.nn.Flatten(2),
                                torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    x = torch.randn(1, 8, 8, 8)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int8},fold-qdq",
                          data=[(torch.randn(1, 8, 8, 8),) for _ in range(4)])
    return q, x


def test_full_int8_layers_take_the_quad_kernels_with_vnni(monkeypatch):
    """quantize (full int8 weights): lowered for a VNNI CPU, every pointwise conv and linear takes a quad kernel on
    `vpdpbusd`; for AVX2 alone they keep the exact int16 kernels (u8 x s8 pairs could saturate). The same lowering
    built here with the exact quad product equals the graph, so the VNNI artifact's layout and offsets are right.
    (AMX off: on AMX CPUs the linears take the tile GEMM instead, test_amx.py.)"""
    from graphopt.targets.tvm.cpu import int8
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    q, x = _int8_block()
    vnni = {gv.name_hint for gv in lower_to_relax(q, target=cpu_target("sapphirerapids")).get_global_vars()}
    assert len([n for n in vnni if n.startswith("qconv1x1_vnni_")]) == 2, vnni
    assert len([n for n in vnni if n.startswith("qgemm_vnni_")]) == 2, vnni
    avx2 = {gv.name_hint for gv in lower_to_relax(q, target=cpu_target("znver3")).get_global_vars()}
    assert not [n for n in avx2 if "vnni" in n or "ubsw" in n], avx2
    monkeypatch.setattr(int8, "int8_dot", lambda target: "exact")
    assert len([n for n in _func_names(q) if n.startswith(("qconv1x1_exact_", "qgemm_exact_"))]) == 4
    got, ref = _built_and_reference(q, x)
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


def test_cross_compiled_artifact_records_its_isa_and_refuses_a_cpu_without_it(tmp_path, monkeypatch):
    """compile(cpu="znver4") builds AVX-512 + VNNI code on any machine: the manifest lists the extensions, the
    library holds `vpdpbusd`, and loading it where one is missing is a clear error instead of an illegal
    instruction; a misspelt CPU name is refused before building."""
    import subprocess

    from graphopt.errors import ArtifactError, TargetError
    from graphopt.targets.tvm import host
    q, x = _int8_block()
    out = graphopt.compile(q, "llvm", output=tmp_path / "art", cpu="znver4")
    from graphopt.targets.artifact import read_manifest
    info = read_manifest(out)["target_info"]
    assert info["mcpu"] == "znver4" and {"avx512f", "avx512vnni"} <= set(info["isa"])
    dis = subprocess.run(["objdump", "-d", str(out / "model.so")], capture_output=True, text=True).stdout
    assert "vpdpbusd" in dis
    monkeypatch.setattr(host, "host_isa", lambda: {"sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"})
    with pytest.raises(ArtifactError, match="avx512f.*avx512vnni"):
        graphopt.load(out)
    # built for an Ice Lake or newer, the code may hold VBMI / GFNI instructions (LLVM picks them for int4 nibbles,
    # the int8 depthwise kernel permutes bytes with vpermb): a Cascade Lake (AVX-512 + VNNI, neither) is refused
    icx = graphopt.compile(q, "llvm", output=tmp_path / "icx", cpu="icelake-server")
    assert {"avx512vbmi", "gfni"} <= set(read_manifest(icx)["target_info"]["isa"])
    cascadelake = {"sse4.2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                   "avx512cd", "avx512vnni"}
    monkeypatch.setattr(host, "host_isa", lambda: cascadelake)
    with pytest.raises(ArtifactError, match="avx512vbmi.*gfni"):
        graphopt.load(icx)
    with pytest.raises(TargetError, match="sapphirerapids"):
        graphopt.compile(q, "llvm", output=tmp_path / "bad", cpu="sapphirerapid")
    with pytest.raises(graphopt.GraphoptError, match="applies to the llvm target"):
        graphopt.compile(q, "onnx", output=tmp_path / "bad", cpu="znver4")
    with pytest.raises(TargetError, match="tuning measures kernels on this machine.*avx512vbmi"):
        graphopt.compile(q, "llvm", graphopt.Tuning(trials=1), output=tmp_path / "bad", cpu="znver4")
    assert not (tmp_path / "bad").exists()


def test_kernels_shaped_for_avx512_compute_the_same_here(monkeypatch):
    """The kernels' vector width follows the CPU (`rules.avx512_vector_bits`): 256-bit shapes on Zen 4 (measured
    faster there), 512-bit ones on full-width AVX-512 CPUs, either forced by AVX512_VECTOR_BITS. The 16-lane kernels
    are checked for numbers on any host: without AVX-512 LLVM splits those vectors for AVX2, same outputs."""
    from graphopt.targets.tvm.cpu import rules
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 24, 3, 2, 1), torch.nn.ReLU6(), torch.nn.Conv2d(24, 40, 1),
                                torch.nn.ReLU6(), torch.nn.Conv2d(40, 40, 3, 1, 1, groups=40),
                                torch.nn.Conv2d(40, 24, 1), torch.nn.Flatten(2), torch.nn.Linear(196, 40)).eval()
    x = torch.randn(1, 3, 28, 28)
    g = graphopt.trace(model, (x,))
    assert rules.vector_lanes(cpu_target("znver4")) == rules.vector_lanes(cpu_target("znver3")) == 8
    assert rules.vector_lanes(cpu_target("znver4"), 8) == 32
    # full-width AVX-512 cores get 16-lane shapes unless AVX512_VECTOR_BITS forces a width
    assert rules.vector_lanes(cpu_target("sapphirerapids")) == rules.vector_lanes(cpu_target("znver5")) == 16
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 256)
    assert rules.vector_lanes(cpu_target("sapphirerapids")) == 8
    narrow = lower_to_relax(g, target=cpu_target("znver4")).script()
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 512)
    assert rules.vector_lanes(cpu_target("znver4")) == 16
    monkeypatch.setattr(rules, "vector_lanes", lambda target, dtype_bits=32: 512 // dtype_bits)  # on any host
    assert lower_to_relax(g).script() != narrow  # the kernels did change shape
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("hw", [7, 9, 10, 14, 20])
def test_pointwise_kernel_with_16_lane_vectors_picks_its_pixel_tile(hw, monkeypatch):
    """With 16-lane vectors a pointwise layer takes 32-pixel tiles where the map leaves at most 4 pixels or one
    whole vector over (10x10 = 3 x 32 + 4, 14x14 = 6 x 32 + 4, 20x20 = 12 x 32 + 16), and 16-pixel tiles where 32
    would leave an odd remainder or make fewer than two tiles (9x9 = 2 x 32 + 17, 7x7); outputs checked against
    PyTorch with the kernels built for 512-bit vectors on any host, batch 2. (A 7x7 map's layers run the channels-
    in-vector kernel by rule there; its 16-pixel tile is their tuning candidate.)"""
    from graphopt.targets.tvm.cpu import rules
    from graphopt.targets.tvm.cpu.conv import pointwise_cols
    p = hw * hw
    expected = {49: 16, 81: 16, 100: 32, 196: 32, 400: 32}[p]
    assert pointwise_cols(p, 16) == expected and pointwise_cols(p, 8) == 16
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(24, 40, 1), torch.nn.ReLU6(), torch.nn.Conv2d(40, 13, 1)).eval()
    x = torch.randn(2, 24, hw, hw)
    g = graphopt.trace(model, (x,))
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 512)
    monkeypatch.setattr(rules, "vector_lanes", lambda target, dtype_bits=32: 512 // dtype_bits)  # on any host
    assert any(n.startswith("conv1x1_packed") for n in _func_names(g))
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cout,cin,p,res,clamp", [
    # 32-channel panels: 10-pixel tiles in two accumulator groups (7 + 3), the last overlapping, whole panels
    # (16-channel panels: 7 tiles of 7)
    (64, 24, 49, True, (0.0, 6.0)),
    (40, 16, 49, False, (0.0, 6.0)),  # the same with a half-padded panel: both groups stored lane by lane
    (40, 16, 13, False, None),        # 13 pixels: 7-pixel tiles, the last overlapping; a half-padded panel
    (96, 33, 36, True, None),         # 12-pixel tiles (7 + 5) / 6-pixel tiles
    (17, 8, 64, False, (0.0, 6.0)),   # 8-pixel tiles, one padded panel
    (70, 9, 196, True, None),         # 14x14: 20 tiles of 10, the last overlapping 4 pixels / 28 tiles of 7
    (32, 5, 6, True, (-1.0, 1.0))])   # fewer pixels than a tile of 7
def test_channels_in_vector_pointwise_kernel_matches(cout, cin, p, res, clamp):
    """The small-map pointwise kernel with output channels in the vectors (`conv1x1_cv_source`): its weight and
    bias padded to whole 32-channel panels, the transposed store (only real channels stored, guarded where the
    last panel is padded), the residual before the clamp, the pixel tile plans of `cv_rows` (accumulators in
    groups of at most CV_GROUP pixels); with 32-channel panels (16-lane vectors, the rule) and 16-channel ones
    (the 8-lane CPUs' tuning candidate). The next panel's prefetch runs past the last panel: it must not fault."""

    from graphopt.targets.tvm.cpu import conv
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((cin, p), dtype=np.float32), rng.standard_normal((cout, cin), dtype=np.float32)
    b, r = rng.standard_normal(cout, dtype=np.float32), rng.standard_normal((cout, p), dtype=np.float32)
    ref = w @ x + b[:, None] + (r if res else 0)
    ref = np.clip(ref, *clamp) if clamp else ref
    for nr in (32, 16):
        f = parse_kernel(conv.conv1x1_cv_source(cout, cin, p, nr, clamp, res))
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
        nt = -(-cout // nr)
        out = np.full((cout, p), np.nan, np.float32)
        args = [tvm.runtime.tensor(a) for a in (x, conv.pack_rows(w, nr), np.pad(b, (0, nt * nr - cout)),
                                                *([r] if res else []), out)]
        lib["main"](*args)
        np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5, err_msg=f"{nr} channels a panel")


def test_small_map_pointwise_layers_take_the_channels_in_vector_kernel_with_16_lanes(monkeypatch):
    """With 16-lane vectors pointwise layers on maps of at most 64 pixels run the channels-in-vector kernel by rule
    (an inverted residual block at 7x7, its projection's residual in the store; a grouped strided conv's groups,
    each with its own weights, through im2col), and are a tuning candidate on 14x14; with 8 lanes they keep the
    pixel-vector kernel. Outputs against PyTorch at batch 2 and 1."""
    from graphopt.targets.tvm.cpu import conv, rules

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expand, self.project = torch.nn.Conv2d(24, 72, 1), torch.nn.Conv2d(72, 24, 1)

        def forward(self, x):
            return x + self.project(torch.nn.functional.relu6(self.expand(x)))

    def kernels(g):
        return {str(f.attrs["graphopt.knobs"]) for f in lower_to_relax(g).functions.values()
                if f.attrs is not None and "graphopt.knobs" in f.attrs}

    torch.manual_seed(0)
    grouped = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=2), torch.nn.ReLU()).eval()
    cases = [(Block().eval(), torch.randn(2, 24, 7, 7)), (grouped, torch.randn(1, 32, 14, 14))]
    assert conv.conv1x1_knobs(72, 24, 196, 32, 16) == (conv.conv1x1_knobs(72, 24, 196, 32)[0],
                                                       [*conv.conv1x1_knobs(72, 24, 196, 32)[1],
                                                        {"vec": "channels", "nr": 32}])
    assert len(conv.conv1x1_knobs(72, 24, 400, 32, 16)[1]) == len(conv.conv1x1_knobs(72, 24, 400, 32)[1])
    for model, x in cases:
        g = graphopt.trace(model, (x,))
        monkeypatch.setattr(rules, "vector_lanes", lambda target, dtype_bits=32: 256 // dtype_bits)
        assert "vec=channels" not in kernels(g)  # 8 lanes: a candidate, not the rule
        monkeypatch.setattr(rules, "vector_lanes", lambda target, dtype_bits=32: 512 // dtype_bits)  # on any host
        assert "vec=channels" in kernels(g)
        _assert_built_matches(g, model, x)
        monkeypatch.undo()


@pytest.mark.parametrize("cout,cin,p,block,lanes", [(64, 96, 49, (4, 4), 8), (40, 24, 196, (1, 1), 8),
                                                    (32, 64, 3, (1, 16), 8), (24, 16, 3136, (8, 1), 8),
                                                    (36, 32, 49, (4, 4), 8), (64, 96, 49, (4, 4), 16),
                                                    (24, 32, 196, (8, 1), 16), (36, 32, 128, (4, 4), 16),
                                                    (40, 96, 196, (1, 1), 8), (36, 128, 49, (1, 1), 8),
                                                    (48, 96, 100, (1, 1), 16)])
def test_sparse_pointwise_kernel_matches_dense(cout, cin, p, block, lanes):
    """The BSR pointwise conv (x read in place as NCHW stores it, bias + residual + ReLU6 in the store): pixel
    counts that are not whole tiles (49, 196: the last tile overlaps), fewer pixels than a vector (3), CSR and
    row/column blocks; an empty block-row included; small maps split the block-rows in halves (9 block-rows: the
    second half ends early). With 16 lanes: 32-pixel tiles (49, 196) and 64 (128 pixels). CSR rows of 8+
    nonzeros on average read the one weight stream (`csr_stream`: 96 and 128 inputs), two chains, an odd
    count of nonzeros in some rows; 24 inputs keep data and indices."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.cpu.sparse import emit_bsr_conv1x1
    rng = np.random.default_rng(4)
    r, c = block
    keep = rng.random((cout // r, cin // c)) < 0.15
    keep[1] = False  # a block-row with no stored block
    w = rng.standard_normal((cout, cin)).astype(np.float32) * np.kron(keep, np.ones((r, c)))
    w = w.astype(np.float32)
    s = to_bsr(torch.from_numpy(w), block)
    b, x, res = (rng.standard_normal(shape).astype(np.float32) for shape in ((cout,), (1, cin, p, 1), (1, cout, p, 1)))
    bb = relax.BlockBuilder()
    xv, rv = relax.Var("x", relax.TensorType(x.shape, "float32")), relax.Var("r", relax.TensorType(res.shape, "float32"))
    with bb.function("main", [xv, rv]):
        with bb.dataflow():
            arrays = [a.numpy() for a in (s.data, s.indices, s.indptr)]
            y = emit_bsr_conv1x1(bb, xv, *(relax.const(a) for a in arrays), relax.const(b), x.shape, cout, block,
                                 s.nnzb, (0.0, 6.0), rv, lanes, 2, arrays)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    kernel = next(f for gv, f in mod.functions.items() if gv.name_hint.startswith("bsr_conv1x1"))
    assert any(prm.name == "nz" for prm in kernel.params) == (block == (1, 1) and cin >= 96)
    vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(res)).numpy().reshape(cout, p)
    ref = np.clip(w @ x.reshape(cin, p) + b[:, None] + res.reshape(cout, p), 0.0, 6.0)
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("m,k,n,dot", [(13, 64, 32, "ubsw"), (5, 128, 48, "ubsw"), (30, 64, 16, "exact"),
                                       (13, 64, 32, "vnni")])
def test_int8_bsr_kernel_is_exact(m, k, n, dot):
    """The int8 BSR kernel (8x4 blocks, one quad product per token and block): token counts that are not whole
    tiles of 12 and fewer than 12, an empty block-row, 7-bit weights at the `vpmaddubsw` bound on AVX2 and
    full-range ones with the exact product (and `vpdpbusd` where this CPU has VNNI)."""
    from graphopt.ir.sparse_ops import to_bsr
    from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants, ubsw_exact
    from graphopt.targets.tvm.cpu.sparse import QBLOCK, bsr_qlinear_source
    if dot == "vnni" and not _vnni_here():
        pytest.skip("this CPU has no VNNI")
    rng = np.random.default_rng(5)
    keep = rng.random((n // 8, k // 4)) < 0.3
    keep[1] = False
    lim = 65 if dot == "ubsw" else 128
    w = (rng.integers(-lim + 1, lim, (n, k)) * np.kron(keep, np.ones((8, 4), np.int64))).astype(np.int8)
    w[:8, :4] = np.array([100, 28, -64, -64], np.int8)  # pair sums of +-128 against 255: the int16 bound
    if dot == "ubsw":
        assert ubsw_exact(w)
    s = to_bsr(torch.from_numpy(w), QBLOCK)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    x[0] = 127
    ws, zx = rng.uniform(1e-3, 2e-3, n), -3
    off, mult, _ = epilogue_constants(w, ws, None, 1.0, zx + 128, -(-n // MR))
    f = parse_kernel(bsr_qlinear_source(m, k, n, dot))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(m * n, np.float32))
    args = ((x.astype(np.int16) + 128).astype(np.uint8).reshape(-1), s.data.numpy().reshape(-1), s.indices.numpy(),
            s.indptr.numpy(), off[:n], mult[:n])
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    ref = ((x.astype(np.int64) - zx) @ w.astype(np.int64).T) * ws
    assert np.abs(out.numpy().reshape(m, n) - ref).max() <= 1e-6 * np.abs(ref).max()


@pytest.mark.parametrize("m,k,n,dot,tiny", [(13, 64, 32, "exact", False), (30, 72, 16, "exact", False),
                                            (2, 32, 8, "exact", False), (1, 40, 16, "exact", True),
                                            (13, 64, 32, "vnni", False), (40, 128, 48, "vnni", True)])
def test_int8_bsr_token_pairs_are_exact(m, k, n, dot, tiny):
    """The 16-lane int8 BSR linear through its emitter (tokens paired by `pair_tokens_source`, two a 512-bit vector):
    odd token counts (the last pair's second token never stored; one token), 15 pairs in two overlapping tiles of
    8, a single pair, K not whole groups of 4 quads (72, 40); an empty block-row, full-range int8 weights and
    activations, a bias (`tiny` weight scales: a bias too large for int32 at the accumulator's scale, added as a
    float); the exact product on any CPU, `vpdpbusd` where this one has VNNI."""
    from tvm import relax

    from graphopt.ir.sparse_ops import to_bsr
    from graphopt.targets.tvm.cpu.int8 import epilogue_constants
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.cpu.sparse import emit_bsr_qlinear
    if dot == "vnni" and not _vnni_here():
        pytest.skip("this CPU has no VNNI")
    rng = np.random.default_rng(6)
    keep = rng.random((n // 8, k // 4)) < 0.3
    keep[1:2] = False  # (an empty block-row where there are two)
    keep[0, 0] = True
    w = (rng.integers(-127, 128, (n, k)) * np.kron(keep, np.ones((8, 4), np.int64))).astype(np.int8)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    ws, sx, zx = rng.uniform(1e-3, 2e-3, n) * (1e-8 if tiny else 1), 0.05, -3
    bias = rng.standard_normal(n).astype(np.float32)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "int8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(emit_bsr_qlinear(bb, xv, w, ws, bias, sx, zx, (m, k), dot, lanes=16))
        bb.emit_func_output(y)
    mod = bb.get()
    assert any(gv.name_hint.startswith(f"bsr_qlinear_{dot}_pairs") for gv in mod.get_global_vars())
    got = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = ((x.astype(np.int64) - zx) @ w.astype(np.int64).T) * ws * sx + bias
    # (the bias is stored at the accumulator's scale: half a step of sx * ws off at most, `epilogue_constants`)
    assert np.abs(got - ref).max() <= 0.5 * sx * ws.max() + 1e-5 * np.abs(ref).max()
    assert (epilogue_constants(w, ws, bias, sx, zx + 128, -(-n // 6))[2] is not None) == tiny
    assert 0 < to_bsr(torch.from_numpy(w), (8, 4)).nnzb < (n // 8) * (k // 4)  # (a sparse weight)


def test_int8_bsr_token_pairs_use_512_bit_vpdpbusd():
    """The pair kernel's reduction on an AVX-512 VNNI CPU: zmm `vpdpbusd` into 8 accumulators, none stored."""

    from graphopt.targets.tvm.cpu.sparse import bsr_qlinear_pairs_source
    f = parse_kernel(bsr_qlinear_pairs_source(32, 64, 32, "vnni"))
    loop = _inner_fma_loop(_asm(f, "sapphirerapids"), r"vpdpbusd")
    assert len(set(re.findall(r"vpdpbusd\s+[^\n]*, (%zmm\d+)$", loop, re.M))) == 8
    assert not re.search(r"vmovdq\w*\s+%zmm\d+, ", loop) and "call" not in loop


@pytest.mark.parametrize("m,k,n,float_bias,dot", [(20, 72, 24, False, "ubsw"), (75, 64, 200, True, "ubsw"),
                                                   (75, 64, 200, True, "vnni")])
def test_int8_csr_linear_kernel_is_exact(m, k, n, float_bias, dot):
    """The int8 CSR linear (nonzeros paired per row, `vpmaddwd` over staged int16 token rows, y^T transposed out;
    `vpdpwssd` where this CPU has VNNI): 16- and 32-token tiles with an overlapping last tile, row groups with an
    overlapping last group, full-range int8 weights and activations, an empty row and a row of one nonzero (its pad
    pair), a float bias."""
    from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants
    from graphopt.targets.tvm.cpu.sparse import csr_qlinear_source, csr_qpairs, qcsr_tile
    if dot == "vnni" and not _vnni_here():
        pytest.skip("this CPU has no VNNI")
    rng = np.random.default_rng(9)
    w = (rng.integers(-128, 128, (n, k)) * (rng.random((n, k)) < 0.15)).astype(np.int8)
    w[1], w[2] = 0, 0
    w[2, k - 1] = -128
    w[3, :2] = (-128, -128)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    x[0] = -128
    ws, zx = rng.uniform(1e-3, 2e-3, n), -3
    bias = rng.uniform(-1, 1, n) if float_bias else None
    off, mult, fb = epilogue_constants(w, ws, None, 1.0, zx, -(-n // MR))
    pw, cols, ptr = csr_qpairs(w, qcsr_tile(m))
    f = parse_kernel(csr_qlinear_source(m, k, n, float_bias, dot))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(m * n, np.float32))
    args = (x.reshape(-1), pw, cols, ptr, off[:n], mult[:n]) + ((bias.astype(np.float32),) if float_bias else ())
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    ref = ((x.astype(np.int64) - zx) @ w.astype(np.int64).T) * ws + (0 if bias is None else bias)
    assert np.abs(out.numpy().reshape(m, n) - ref).max() <= 1e-6 * np.abs(ref).max()


def test_int8_csr_kernels_emit_vpdpwssd_for_vnni():
    """Built for a CPU with VNNI, the int8 CSR kernels' pair step is one `vpdpwssd` per 8 tokens (the int16 pair
    products accumulated in place; no `vpmaddwd` + `vpaddd`), 4 per pair with the linear's 32 tokens and 2 with
    the 16 pixels of a small conv."""
    from graphopt.targets.tvm.cpu.sparse import csr_qconv1x1_source, csr_qlinear_source
    for src, per_pair in ((csr_qlinear_source(128, 256, 64, False, "vnni"), 4),
                          (csr_qconv1x1_source(64, 96, 20, dot="vnni"), 2)):
        f = parse_kernel(src)
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target("znver4"))
        loop = _inner_fma_loop(lib.mod.inspect_source("asm"), r"vpdpwssd")
        n = len(re.findall(r"vpdpwssd", loop))
        assert n >= per_pair and n % per_pair == 0 and "vpmaddwd" not in loop, loop


def test_int8_bsr_kernel_emits_vpdpbusd_for_vnni():
    from graphopt.targets.tvm.cpu.sparse import bsr_qlinear_source
    f = parse_kernel(bsr_qlinear_source(128, 256, 64, "vnni"))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target("znver4"))
    loop = _inner_fma_loop(lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm"),
                           r"vpdpbusd")
    assert len(re.findall(r"vpdpbusd", loop)) >= 12  # one per token of the tile, accumulators in registers
    assert not re.search(r"vmovdq[au](?:32|64)?\s+%ymm\d+, ", loop)


def qbmm_case(shape, zps, dot: str, amx_cores: int = 0):
    """(qbmm's output built here, graphopt::qmatmul's float64 reference, the Relax module) for int8 a [..., M, K]
    @ b [..., K, N] (`shape` = (*lead, M, K, N)) with zero points `zps`: full-range random codes and the worst case
    (a = 127 along one row, b = -128 down one column)."""
    from tvm import relax

    from graphopt.ir.quant_ops import qmatmul
    from graphopt.targets.tvm.cpu.int8 import emit_qbmm
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    *lead, m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (*lead, m, k)).astype(np.int8)
    b = rng.integers(-128, 128, (*lead, k, n)).astype(np.int8)
    a.reshape(-1, m, k)[0, 0] = 127
    b.reshape(-1, k, n)[0, :, 0] = -128
    (za, zb), sa, sb = zps, 0.02, 0.03
    ref = qmatmul(torch.from_numpy(a), sa, za, torch.from_numpy(b), sb, zb).numpy()
    bb = relax.BlockBuilder()
    av, bv = relax.Var("a", relax.TensorType(a.shape, "int8")), relax.Var("b", relax.TensorType(b.shape, "int8"))
    with bb.function("main", [av, bv]):
        with bb.dataflow():
            y = bb.emit_output(emit_qbmm(bb, av, bv, a.shape, b.shape, sa, za, sb, zb, dot, amx_cores))
        bb.emit_func_output(y)
    mod = bb.get()
    vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(b)).numpy(), ref, mod


@pytest.mark.parametrize("dot", ["exact", "vnni"])
@pytest.mark.parametrize("shape,zps", [((2, 3, 16, 32, 128), (-7, 5)), ((1, 12, 20, 36, 17), (0, -128)),
                                       ((3, 6, 64, 16), (127, 0))])
def test_int8_activation_matmul_kernel_matches_the_reference(dot, shape, zps):
    """qbmm (attention's int8 x int8 matmuls, both operands known only at run time) against graphopt::qmatmul's
    float64 reference, to float32 rounding: zero points on either side (the corrections come off in int32), full-
    range codes with the worst case (a = 127, b = -128 everywhere in one row and column), rows and columns that are
    not whole 6 x 16 tiles (the last tile overlaps), K that is not whole 32-byte row sums (36: a scalar tail), and a
    batch of 3 dims flattened. "exact" (widened arithmetic) runs anywhere; "vnni" where this CPU has it."""
    from graphopt.targets.tvm.cpu.int8 import qbmm_applies
    if dot == "vnni" and not _vnni_here():
        pytest.skip("this CPU has no VNNI (the exact variant checks the same kernel)")
    *lead, m, k, n = shape
    assert qbmm_applies((*lead, m, k), (*lead, k, n), dot) == ""
    got, ref, _ = qbmm_case(shape, zps, dot)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def test_int8_activation_matmul_kernel_applies_and_emits_vpdpbusd():
    """Built for a VNNI CPU, qbmm's reduction is one `vpdpbusd` per 8 columns of each of its 6 rows (12 per quad, in
    registers); it declines (with the reason) what it cannot run: broadcast batch dims, K not a multiple of 4, under
    6 rows or 16 columns, no exact quad product (AVX2's `vpmaddubsw` saturates on full-range codes)."""
    from graphopt.targets.tvm.cpu.int8 import qbmm_applies, qbmm_source
    f = parse_kernel(qbmm_source(4, 128, 32, 128, "vnni"))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target("znver4"))
    loop = _inner_fma_loop(lib.mod.inspect_source("asm"), r"vpdpbusd")
    assert len(re.findall(r"vpdpbusd", loop)) >= 12
    assert not re.search(r"vmovdq[au](?:32|64)?\s+%ymm\d+, ", loop)  # accumulators stay in registers
    assert "batch dims" in qbmm_applies((2, 4, 16, 32), (1, 4, 32, 16), "vnni")
    assert "K % 4" in qbmm_applies((4, 16, 30), (4, 30, 16), "vnni")
    assert "M >= 6" in qbmm_applies((4, 5, 32), (4, 32, 16), "vnni")
    assert "N >= 16" in qbmm_applies((4, 16, 32), (4, 32, 8), "vnni")
    assert "VNNI" in qbmm_applies((4, 16, 32), (4, 32, 16), "ubsw")
    assert qbmm_applies((4, 16, 32), (4, 32, 16), "vnni") == ""


@pytest.mark.parametrize("cout,cin,p,out_int8,batch", [(32, 64, 196, True, 1), (48, 63, 49, False, 1),
                                                       (16, 24, 3136, True, 1), (24, 20, 20, False, 2)])
def test_int8_sparse_pointwise_kernel_equals_the_dense_one(cout, cin, p, out_int8, batch):
    """The int8 pointwise kernel with its weight as 8x4 BSR (a block-row of 8 channels, the reduction over stored
    blocks only) and as pair CSR (`vpmaddwd` over staged int16 pixel rows; rows with an odd count, an empty block
    of rows; 32-pixel tiles, 16 under 32 pixels) gives what the dense int8 kernel gives for the same weight: int8
    stores equal, float stores to rounding. 7-bit weights (exact on AVX2), Cin not a multiple of 4, an overlapping
    last pixel block, ReLU6, a batch of 2."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import emit_qconv1x1
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(6)
    keep = rng.random((cout // 8, -(-cin // 4))) < 0.25
    keep[0, :2] = True
    keep[1] = False
    mask = np.kron(keep, np.ones((8, 4), np.int64))[:, :cin] * (rng.random((cout, cin)) < 0.7)
    w = (rng.integers(-63, 64, (cout, cin)) * mask).astype(np.int8).reshape(cout, cin, 1, 1)
    assert ((w != 0).reshape(cout, -1).sum(1) % 2).any()  # a row with an odd count ends in a pad pair
    ws, bias = rng.uniform(1e-3, 2e-3, cout), rng.uniform(-1, 1, cout).astype(np.float32)
    x = rng.integers(-128, 128, (batch, cin, p, 1)).astype(np.int8)
    out_q = (0.05, 3, -128, 127) if out_int8 else None
    outs = []
    for sparse in ("", "bsr8x4", "csr"):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, "int8"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = emit_qconv1x1(bb, xv, w, ws, bias, 0.02, -5, x.shape, (0.0, 6.0), out_q, dot="ubsw",
                                  sparse=sparse)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        mod = bb.get()
        names = [g.name_hint for g in mod.get_global_vars()]
        assert any(name.startswith(f"qconv1x1_{sparse[:3]}_") for name in names) == bool(sparse), names
        vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy().astype(np.float64))
    dense = outs[0]
    for got in outs[1:]:
        if out_int8:
            assert (got == dense).all()
        else:
            assert np.abs(got - dense).max() <= 1e-6 * np.abs(dense).max()
    assert np.abs(dense).max() > 0 and (dense != dense[0, 0, 0, 0]).any()


@pytest.mark.parametrize("cout,cin,p,dot", [(32, 64, 196, "exact"), (48, 63, 49, "exact"), (16, 24, 16, "exact"),
                                           (16, 24, 12, "exact"), (40, 64, 196, "vnni")])
def test_int8_bsr_pointwise_on_16_pixel_vectors_equals_the_dense_kernel(cout, cin, p, dot):
    """With 16 lanes the int8 BSR pointwise kernel takes 16 pixels a 512-bit vector (`bsr_pixels16`): int8 stores
    equal to the dense kernel's for the same weight, with an overlapping last block (196, 49), exactly 16 pixels,
    Cin not a multiple of 4, an empty block-row, full-range int8 weights; 12 pixels keep 8-pixel blocks. The exact
    product on any CPU, `vpdpbusd` where this one has VNNI."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import bsr_pixels16, emit_qconv1x1
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    if dot == "vnni" and not _vnni_here():
        pytest.skip("this CPU has no VNNI")
    rng = np.random.default_rng(7)
    keep = rng.random((cout // 8, -(-cin // 4))) < 0.3
    keep[0, :2] = True
    keep[1] = False
    w = (rng.integers(-127, 128, (cout, cin)) * np.kron(keep, np.ones((8, 4), np.int64))[:, :cin]).astype(np.int8)
    w = w.reshape(cout, cin, 1, 1)
    ws, bias = rng.uniform(1e-3, 2e-3, cout), rng.uniform(-1, 1, cout).astype(np.float32)
    x = rng.integers(-128, 128, (1, cin, p, 1)).astype(np.int8)
    outs = []
    for sparse in ("", "bsr8x4"):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, "int8"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = emit_qconv1x1(bb, xv, w, ws, bias, 0.02, -5, x.shape, (0.0, 6.0), (0.05, 3, -128, 127), dot=dot,
                                  sparse=sparse, lanes=16)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        mod = bb.get()
        names = [g.name_hint for g in mod.get_global_vars()]
        if sparse:
            assert any(n.startswith(f"qconv1x1_bsr_{dot}_v16_") for n in names) == (p >= 16), names
        vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    assert bsr_pixels16(p, dot, 16) == (p >= 16) and not bsr_pixels16(p, dot, 8) and not bsr_pixels16(p, "ubsw", 16)
    np.testing.assert_array_equal(outs[1], outs[0])
    assert (outs[0] != outs[0].flat[0]).any()


@pytest.mark.parametrize("cout,cin,p,split", [(32, 576, 196, True), (24, 576, 196, False), (16, 602, 144, True)])
def test_int8_bsr_pointwise_row_split_on_two_cores_equals_the_dense_kernel(cout, cin, p, split):
    """On two cores, where the pixel chunks leave one channel group (deep inputs: one 16-pixel block a chunk), the
    int8 BSR kernel splits the output rows into two groups that each stage the whole map (`bsr_row_split`): two
    tasks with an even count of 8-row blocks (32, 16 rows), the chunks as before with an odd count (24 rows: three),
    or with the cores not known. int8 stores equal to the dense kernel's either way (an empty block-row, an
    overlapping last pixel block, Cin not a multiple of 4)."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import emit_qconv1x1, qconv1x1_ubsw_source
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    rng = np.random.default_rng(11)
    keep = rng.random((cout // 8, -(-cin // 4))) < 0.2
    keep[1] = False
    w = (rng.integers(-127, 128, (cout, cin)) * np.kron(keep, np.ones((8, 4), np.int64))[:, :cin]).astype(np.int8)
    w = w.reshape(cout, cin, 1, 1)
    ws, bias = rng.uniform(1e-3, 2e-3, cout), rng.uniform(-1, 1, cout).astype(np.float32)
    x = rng.integers(-128, 128, (1, cin, p, 1)).astype(np.int8)
    for cores in (0, 2):
        src = qconv1x1_ubsw_source(cout, cin, p, 2, None, None, False, False, "exact", int(keep.sum()), lanes=16,
                                   cores=cores)
        assert ("T.parallel(2)" in src) == (split and cores == 2)
    outs = []
    for sparse, cores in (("", 2), ("bsr8x4", 0), ("bsr8x4", 2)):
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType(x.shape, "int8"))
        with bb.function("main", [xv]):
            with bb.dataflow():
                y = emit_qconv1x1(bb, xv, w, ws, bias, 0.02, -5, x.shape, (0.0, 6.0), (0.05, 3, -128, 127),
                                  dot="exact", sparse=sparse, lanes=16, cores=cores)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        vm = relax.VirtualMachine(build_cpu(bb.get(), cpu_target()), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    assert (outs[0] != outs[0].flat[0]).any()


@pytest.mark.parametrize("batch,k,stride,pad,hw", [(1, 3, 2, 1, (23, 20)), (2, 2, None, 0, (9, 10)),
                                                   (1, 3, 1, 1, (7, 9)), (1, 5, 1, 2, (40, 37)),  # YOLO's SPPF
                                                   (1, 3, 2, 1, (40, 40))])  # more rows than one task's band
def test_max_pool_runs_on_the_separable_kernel(batch, k, stride, pad, hw):
    """Max pooling (ResNet's stem pool: 3x3 stride 2, padding 1; stride defaulting to the kernel; stride 1; YOLO's
    5x5 stride 1): the separable kernel, exact against PyTorch, batch 2 looping over the samples (TVM's pooling took
    1.1 ms for ResNet-18's 64x112x112 map, the row kernel 0.10, this 0.06)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.MaxPool2d(k, stride, pad)).eval()
    x = torch.randn(batch, 3, *hw)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("max_pool_8x") for n in names) and "max_pool2d" not in names, names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("k,stride,pad,hw", [(3, 2, 0, (55, 54)),  # SqueezeNet's / GoogLeNet's pools
                                             (2, 2, 0, (7, 9)), (3, 2, 1, (10, 10)), (5, 3, 2, (9, 16)),
                                             (2, 2, 1, (5, 6))])  # a last window past the padding: dropped
def test_max_pool_with_ceil_mode_runs_on_the_separable_kernel(k, stride, pad, hw):
    """ceil_mode (SqueezeNet, GoogLeNet): PyTorch's last partial window, dropped where it would start past the
    image and its padding; its taps past the edge read the last row / column (inside the window). It ran TVM's
    pooling (110 us for SqueezeNet's 3x3 / 2 over 32x111x111). Exact against PyTorch, a NaN in the last window."""
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.MaxPool2d(k, stride, pad, ceil_mode=True)).eval()
    x = torch.randn(2, 3, *hw)
    x[1, 2, -1, -1] = float("nan")
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("max_pool_3x") and "_ceil" in n for n in names) and "max_pool2d" not in names, names
    got, want = _run_built(g, x), model(x).numpy()
    assert got.shape == want.shape and np.isnan(want[1, 2, -1, -1])
    np.testing.assert_array_equal(got, want)


def test_large_max_pool_source_grows_linearly_and_builds():
    """YOLOv3-SPP's 9x9 and 13x13 pools: each running-maximum step names the one before once (the lets are
    substituted into one expression: with two names a step it doubled with each tap and a 7x7 pool's build did not
    finish); built, exact against PyTorch with a NaN."""
    from graphopt.targets.tvm.cpu.pool import max_pool_source
    src = max_pool_source(4, 20, 20, (13, 13), (1, 1), (6, 6))
    steps = re.findall(r"m(\d+): T\.let = (.*)", src)
    assert len(steps) >= 2 * 13 and all(len(re.findall(rf"\bm{int(k) - 1}\b", body)) == 1
                                        for k, body in steps if int(k) > 0)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.MaxPool2d(9, 1, 4)).eval()
    x = torch.randn(1, 4, 15, 13)
    x[0, 1, 7, 2] = float("nan")
    g = graphopt.trace(model, (x,))
    got, want = _run_built(g, x), model(x).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got, nan=1.0), np.nan_to_num(want, nan=1.0))


@pytest.mark.parametrize("k", [3, 5])  # the two-reference steps (up to 3 taps) and the one-reference ones
def test_max_pool_keeps_nan_and_infinities(k):
    """A NaN anywhere in a window gives NaN (PyTorch's max pooling), -inf and +inf pass as values, and windows
    at the edges see only the image (the taps outside read the nearest row or column inside, which the window
    holds anyway)."""
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.MaxPool2d(k, 2, k // 2)).eval()
    x = torch.randn(1, 4, 11, 12) - 10.0
    x[0, 0, 5, 6] = float("nan")
    x[0, 1, 0, 0] = float("nan")  # a corner: in the first window only
    x[0, 2, 10, 11] = float("inf")
    x[0, 3] = float("-inf")
    g = graphopt.trace(model, (x,))
    got = _run_built(g, x)
    want = model(x).numpy()
    assert np.isnan(got).sum() == np.isnan(want).sum() > 0
    np.testing.assert_array_equal(np.nan_to_num(got, nan=1.0), np.nan_to_num(want, nan=1.0))


class _AvgPool(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, **self.kw)


@pytest.mark.parametrize("batch,hw,kw,tag", [
    (1, (35, 35), dict(kernel_size=3, stride=1, padding=1), ""),  # Inception's pool branch: padded zeros counted
    (1, (35, 33), dict(kernel_size=3, stride=1, padding=1, count_include_pad=False), "_exclude_pad"),
    (2, (14, 15), dict(kernel_size=2, stride=2), "_n2"),  # DenseNet's transition, an odd width, batch 2
    (1, (9, 11), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 1), count_include_pad=False), "_exclude_pad"),
    (1, (9, 11), dict(kernel_size=3, stride=2, padding=1, divisor_override=5), "_d5"),
    (1, (40, 12), dict(kernel_size=3, stride=2, padding=1), "")])  # more rows than one task's band
def test_avg_pool_runs_on_the_separable_kernel(batch, hw, kw, tag):
    """Average pooling on the separable kernel (row sums into a row buffer with zero columns for the padding, then
    sums along it), with PyTorch's count_include_pad either way and divisor_override; Relax's op took 482 us for
    Inception's 3x3 pool of 288x35x35, this 87-98. A NaN spreads to the windows that hold it."""
    torch.manual_seed(0)
    model = _AvgPool(**kw).eval()
    x = torch.randn(batch, 6, *hw)
    x[0, 1, 4, 5] = float("nan")
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("avg_pool_6x") and n.endswith(f"{tag}") for n in names), names
    assert not any("pool2d" in n for n in names), names
    got, want = _run_built(g, x), model(x).numpy()
    assert np.isnan(got).sum() == np.isnan(want).sum() > 0
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_avg_pool_with_ceil_mode_keeps_relax_op():
    """ceil_mode (windows cut at the last row) is not the kernel's: Relax's op, outputs as PyTorch's."""
    model, x = _AvgPool(kernel_size=3, stride=2, ceil_mode=True).eval(), torch.randn(1, 4, 10, 10)
    g = graphopt.trace(model, (x,))
    assert not any(n.startswith("avg_pool_") for n in _func_names(g))
    np.testing.assert_allclose(_run_built(g, x), model(x).numpy(), rtol=1e-6, atol=1e-6)



class _Clamps(torch.nn.Module):
    def forward(self, x):
        return torch.cat([torch.relu(x), torch.nn.functional.hardtanh(x), torch.clamp(x, min=0.5),
                          torch.clamp(x, max=-0.5), torch.clamp(x, -1.0, 2.0),
                          torch.clamp(x, 2.0, 1.0)], 1)  # min above max: all max, NaN kept


@pytest.mark.parametrize("model,cin,hw", [
    (torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.ReLU()), 4, 16),  # pointwise kernel's store
    (torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU6()), 16, 16),  # Winograd
    (torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.ReLU()), 4, 20),  # pixel-row / flat
    (torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6()), 8, 16),  # depthwise
    (torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.Hardtanh()), 4, 16),  # hardtanh's default bounds
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 64), torch.nn.ReLU()), 4, 8),
    (_Clamps(), 4, 8)])  # Relax's own elementwise ops
def test_relu_and_clamps_keep_nan(model, cin, hw):
    """A NaN passes ReLU, ReLU6, hardtanh and clamp as in PyTorch, fused into a conv kernel's store or not:
    bounds go first in max / min (TVM's keep a NaN in their second operand only); max(x, 0) had turned it into 0,
    hiding where a model's NaN came from."""
    model = model.eval()
    torch.manual_seed(0)
    x = torch.randn(1, cin, hw, hw) * 4
    x[0, :, 3, 5] = float("nan")
    g = graphopt.trace(model, (x,))
    got, want = _run_built(g, x), model(x).detach().numpy()
    assert np.isnan(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)  # (none for the linear: its one NaN input reaches every output)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5, atol=1e-4)

class _Concat(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x, y):
        return torch.cat([x * 2.0, y, x], self.dim) + 1.0


@pytest.mark.parametrize("xs,ys,dim,kernel", [((1, 16, 10, 12), (1, 8, 10, 12), 1, True),  # channels (YOLO, UNet)
                                              ((2, 4, 9, 30), (2, 3, 9, 30), 1, True),  # batch 2: outer 2
                                              ((1, 3, 40, 20), (1, 3, 13, 20), 2, True),  # rows
                                              ((1, 64, 8), (1, 64, 24), -1, False),  # runs under 256: Relax's
                                              ((300, 10), (300, 30), -1, True),  # NeRF-like rows of 10 + 30 + 10
                                              ((1, 300, 16), (1, 300, 32), -1, False),  # aligned: Relax's
                                              ((300, 5), (300, 4), -1, False),  # rows under 48 floats: Relax's
                                              ((100, 3), (100, 30), -1, False)])  # under 256 rows: Relax's
def test_concat_runs_on_the_copy_kernel(xs, ys, dim, kernel):
    """torch.cat whose inputs are long contiguous runs per outer index is one copy kernel (Relax's concatenate
    chose each vector's input lane by lane: 541 us for YOLO's 3 x 48 x 80 x 80, this 87); so are many rows of 48
    floats or more with a run that is not whole 16-float vectors (NeRF's encoding: 728 -> 154 us, copying row by
    row); other short runs (a rotary embedding's half-rows) stay Relax's, fused with their neighbours. Exact
    either way."""
    model = _Concat(dim).eval()
    x, y = torch.randn(xs), torch.randn(ys)
    g = graphopt.trace(model, (x, y))
    names = _func_names(g)
    assert any(n.startswith("concat_") for n in names) == kernel, names
    got = _run_built(g, x, y)
    np.testing.assert_array_equal(got, model(x, y).numpy())

@pytest.mark.parametrize("dim,affine,kernel", [(384, True, True), (40, True, True), (36, True, True),
                                               (64, False, True), (300, False, True), (6, True, False)])
def test_layer_norm_rows_kernel_matches_torch(dim, affine, kernel):
    """A float32 layer norm over the last axis is one vectorized pass per row (norm.py; no weight / bias: ones /
    zeros). A row that is not whole 8-float vectors (36, 300) ends with a vector overlapping the one before, its
    repeated lanes left out of the sums (Relax's layer norm had taken 2.5x PyTorch's time over 300 features); a
    row shorter than one vector (6) keeps Relax's. All match torch."""
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(dim, eps=1e-12, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            ln.weight.normal_()
            ln.bias.normal_()
    model = torch.nn.Sequential(torch.nn.Linear(dim, dim), ln).eval()
    x = torch.randn(1, 20, dim) * 3 + 1
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(f"layer_norm_rows_20x{dim}") for n in names) == kernel, names
    _assert_built_matches(g, model, x)


class _AddNorm(torch.nn.Module):
    """A transformer block's residual add and layer norm; `tap` also multiplies by the sum (a second use of the
    add); `conv` makes the add a pointwise conv's residual (which the conv kernel takes in its store)."""
    def __init__(self, dim: int, tap: bool, conv: bool = False):
        super().__init__()
        self.fc = torch.nn.Conv2d(dim, dim, 1) if conv else torch.nn.Linear(dim, dim)
        self.ln, self.tap = torch.nn.LayerNorm(64), tap

    def forward(self, x):
        h = self.fc(x) + x
        return self.ln(h) * h if self.tap else self.ln(h)


@pytest.mark.parametrize("tap,conv", [(False, False), (True, False), (False, True)])
def test_residual_add_joins_the_layer_norm_kernel(tap, conv):
    """An add of two same-shape float tensors whose only use is a layer norm is done inside the row kernel
    (`layer_norm_rows_res`: the sum goes to a row buffer in the first pass, no pass of its own); an add with another
    use stays an op and the plain kernel normalizes it; an add the pointwise conv before it already computed in
    its store (`conv1x1_..._res`) is not added again. All match torch."""
    torch.manual_seed(0)
    model = _AddNorm(8 if conv else 64, tap, conv).eval()
    with torch.no_grad():
        model.ln.weight.normal_()
        model.ln.bias.normal_()
    x = torch.randn(1, 8, 20, 64) if conv else torch.randn(1, 20, 64) * 3 + 1
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    rows = 160 if conv else 20
    assert any(n.startswith(f"layer_norm_rows_res_{rows}x64") for n in names) == (not tap and not conv), names
    assert any(n.startswith(f"layer_norm_rows_{rows}x64") for n in names) == (tap or conv), names
    assert any(n.startswith("conv1x1_") and n.endswith("_res") for n in names) == conv, names
    _assert_built_matches(g, model, x)


class _Softmax(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = torch.nn.Linear(dim, dim)

    def forward(self, x):
        s = self.fc(x) * 4
        s = s.masked_fill(torch.arange(s.shape[-1]) >= s.shape[-1] - 3, torch.finfo(torch.float32).min)  # a mask
        return torch.softmax(s, -1)


@pytest.mark.parametrize("dim,kernel", [(128, True), (24, True), (36, True), (77, True), (5, False)])
def test_softmax_rows_kernel_matches_torch(dim, kernel):
    """softmax over the last axis is one vectorized pass per row (norm.py: vector max, TVM's fast_exp polynomial,
    vector sum); a row that is not whole 8-float vectors (36, 77: CLIP's text length) ends with a vector
    overlapping the one before, whose repeated lanes stay out of the sum and are scaled once; under one vector (5)
    Relax's softmax stays. Masked (float32 min) entries come out ~0 as in torch. All match torch within 1e-5 of
    the output's range."""
    torch.manual_seed(0)
    model = _Softmax(dim).eval()
    x = torch.randn(2, 6, dim)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(f"softmax_rows_12x{dim}") for n in names) == kernel, names
    _assert_built_matches(g, model, x)


def test_kernels_bind_scalars_without_a_workspace_call_per_task():
    """In TVM 0.27's TVMScript `x = expr` in a kernel is a one-element local buffer, which `LowerTVMBuiltin` makes a
    TVMBackendAllocWorkspace/Free pair per parallel task (the int8 BSR linear ran 1.2-1.9x slower for it); the
    kernels bind scalars as `x: T.let = expr`. Lowered, none of them asks for a workspace of one scalar."""

    from graphopt.targets.tvm.cpu import conv as C
    from graphopt.targets.tvm.cpu import int8 as I
    from graphopt.targets.tvm.cpu import sparse as S
    sources = {
        "bsr_qlinear": S.bsr_qlinear_source(24, 64, 32, "ubsw"),
        "csr_qlinear": S.csr_qlinear_source(32, 64, 32),
        "bsr_conv1x1 (halves)": S.bsr_conv1x1_source(49, 32, 36, 4, 4, 6),
        "qconv1x1 quads": I.qconv1x1_ubsw_source(24, 16, 196, 2),
        "qconv_flat": I.qconv_flat_source(16, 8, 14, 14, 3, 3, 1, (1, 1, 1, 1)),
        # the masked (AVX) store where this CPU has it, as the flat conv tests do
        "conv_flat": C.flat_conv_source(13, 5, 9, 9, 3, 3, 1, (1, 1, 1, 1), (0.0, 6.0), False,
                                        vector_lanes(cpu_target()) >= 8),
        "conv_staged": C.staged_conv_source(16, 3, 20, 20, 7, 7, 2, (3, 3, 3, 3), None),
        "depthwise": C.depthwise_source(16, 28, 28, 28, 28, 3, 3, 1, 1, 1, (0.0, 6.0)),
        "depthwise_cb": C.depthwise_cb_source(16, 14, 14, 7, 7, 3, 3, 2, 1, 1, (0.0, 6.0)),
        "im2col": C.im2col_source(4, 28, 28, 14, 14, 3, 3, 2, 1, 1),
    }
    lowered = {}

    @tvm.instrument.pass_instrument
    class AfterBuiltins:
        def run_after_pass(self, mod, info):
            if info.name == "tirx.LowerTVMBuiltin":
                lowered[name] = str(mod)

    for name, src in sources.items():
        f = parse_kernel(src)
        with tvm.transform.PassContext(instruments=[AfterBuiltins()]):
            tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
        scalars = re.findall(r"(\w+) = T\.decl_buffer\(\(1,\), \"\w+\", data=T\.TVMBackendAllocWorkspace", lowered[name])
        assert not scalars, f"{name}: {scalars} bound as workspace buffers"


class _Activations(torch.nn.Module):
    def forward(self, x):
        return torch.stack([torch.sigmoid(x), torch.nn.functional.silu(x), torch.rsqrt(x.abs()),
                            torch.nn.functional.gelu(x, approximate="tanh")])


def test_sigmoid_silu_tanh_gelu_and_rsqrt_are_vector_math():
    """Sigmoid (and SiLU, its product with x), tanh GELU and rsqrt are written with exp / tanh / sqrt, which the
    pipeline makes vectorized polynomials: Relax's own ops legalized to scalar loops at 3.6x (sigmoid), 5.4x
    (SiLU) and 2.4x (tanh GELU) PyTorch's time. Match torch within 1e-6, saturating at +-100 and +-inf and
    keeping NaN."""
    x = torch.cat([torch.linspace(-12, 12, 509), torch.tensor([float("nan"), float("inf"), -float("inf"), -100.0,
                                                                100.0, 0.0, 1e-30])]).reshape(1, -1)
    model = _Activations().eval()
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    assert not any(op in text for op in ("R.sigmoid", "R.rsqrt", "R.nn.gelu_tanh")), text
    got = _run_built(g, x)
    ref = model(x).numpy()
    finite = np.isfinite(ref) & (np.abs(ref) < 1e6)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[~finite], ref[~finite])


class _Logs(torch.nn.Module):
    def forward(self, x):
        return torch.stack([torch.log(x), torch.log1p(x), torch.nn.functional.softplus(x),
                            torch.nn.functional.mish(x)])


def test_log_and_log1p_are_vector_polynomials():
    """log and log1p (softplus, Mish) run graphopt's exponent + mantissa polynomial, not libm's scalar logf: within
    3e-7 of float64 over the whole float range (subnormals, near 1 where 1 + x rounds x away, large values), the
    special values as logf's (0 -> -inf, negatives -> NaN, inf, NaN)."""
    x = torch.cat([torch.logspace(-44, 38, 3000), -torch.logspace(-44, 0, 300), torch.linspace(-30, 30, 1001),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, -1.0, 1.0])]).reshape(1, -1)
    model = _Logs().eval()
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    assert "R.log(" not in text and "R.log1p(" not in text and "vlog1p" in text and "vlog" in text
    got = _run_built(g, x)
    ref, ref64 = model(x).numpy(), model(x.double()).numpy()
    finite = np.isfinite(ref) & (np.abs(ref64) > 1e-30)  # (subnormal results: the CPU flushes them to zero)
    np.testing.assert_allclose(got[finite], ref64[finite], rtol=3e-7, atol=0)
    np.testing.assert_array_equal(got[~np.isfinite(ref)], ref[~np.isfinite(ref)])


class _Trig(torch.nn.Module):
    def forward(self, x):
        return torch.stack([torch.sin(x), torch.cos(x), torch.sin(30.0 * x)])  # (SIREN's sin(30 x))


def test_sin_and_cos_are_vector_polynomials():
    """sin and cos (NeRF's Fourier features, SIREN, positional encodings) run graphopt's float64 reduction by pi / 2
    + float32 polynomials, not libm's scalar sinf (5x PyTorch's time): within 1.2e-7 of sinf / cosf from tiny
    values to 3e10 (both quadrant signs, multiples of pi / 2), NaN for NaN and +-inf."""
    x = torch.cat([torch.logspace(-30, 9, 4000), -torch.logspace(-30, 9, 4000), torch.linspace(-20, 20, 4001),
                   torch.arange(-64, 65) * (math.pi / 2),
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])]).reshape(1, -1)
    model = _Trig().eval()
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    assert "R.sin(" not in text and "R.cos(" not in text and "vsin" in text and "vcos" in text
    got, ref = _run_built(g, x), model(x).numpy()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(got[ok], ref[ok], rtol=0, atol=1.2e-7)


class _BroadcastPolynomial(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, a, b):
        return self.fn(a)[:, :, None] * 2.0 + b


@pytest.mark.parametrize("fn", [lambda a: torch.log(a.abs() + 1), torch.sin,
                                lambda a: -torch.logsumexp(a, 1, keepdim=True)])  # (Sinkhorn's potentials)
def test_log_and_sin_broadcast_into_a_product_build(fn):
    """A log / sin broadcast over a new axis and scaled (Sinkhorn's -logsumexp added back over the cost matrix):
    fused into its consumer, the polynomial's once-read input was the same in every vector lane, and TVM's
    vectorizer refused the function ("Let cannot bind the same var to two different values"); it now keeps its own
    loop there, and the build matches torch."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 16), torch.randn(4, 16, 32)
    model = _BroadcastPolynomial(fn).eval()
    got, ref = _run_built(graphopt.trace(model, (a, b)), a, b), model(a, b).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


class _CutoffSum(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, d, h):
        return (self.fn(d)[:, :, None] * h[None]).sum(1)


@pytest.mark.parametrize("fn", [lambda d: 0.5 * (torch.cos(d * 0.6) + 1) * (d < 5.0).float(),  # (SchNet's cutoff)
                                lambda d: torch.sin(d) * d])
def test_cos_and_sin_broadcast_into_a_reduction_build(fn):
    """The same Let broadcast into a reduction (SchNet's cosine cutoff on pair distances, times the neighbours'
    features, summed over the neighbours): the reduction rule had inlined it and the build failed the same way;
    the producer keeps its own loop there too."""
    torch.manual_seed(0)
    d, h = torch.rand(20, 20) * 6, torch.randn(20, 16)
    model = _CutoffSum(fn).eval()
    got, ref = _run_built(graphopt.trace(model, (d, h)), d, h), model(d, h).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("groups,c,spatial,batch,affine", [(8, 32, (7, 7), 2, True),  # 49 pixels: overlapping tail
                                                           (4, 64, (16, 16), 1, False), (2, 12, (100,), 1, True),
                                                           (4, 16, (2, 2), 1, True)])  # 4 pixels: Relax's op
def test_group_norm_runs_the_row_kernel_with_a_per_channel_store(groups, c, spatial, batch, affine):
    """Group norm (detection heads, diffusion UNets) runs the layer norm row kernel over each sample's groups, each
    channel's pixels scaled and shifted by its own weight and bias in the store (Relax's group norm: 3x PyTorch's
    time); matches torch with 1-D and 2-D maps, tails, batch 2 and no affine; under 8 pixels a channel it keeps
    Relax's op."""
    torch.manual_seed(0)
    model = torch.nn.GroupNorm(groups, c, affine=affine).eval()
    if affine:
        with torch.no_grad():
            model.weight.normal_(), model.bias.normal_()
    x = torch.randn(batch, c, *spatial) * 3 + 1
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("group_norm") for n in names) == (math.prod(spatial) >= 8), names
    _assert_built_matches(g, model, x)


class _Bilinear(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return torch.nn.functional.interpolate(x, mode="bilinear", **self.kw)


@pytest.mark.parametrize("kw,shape", [(dict(scale_factor=2), (1, 16, 14, 14)),
                                      (dict(size=(129, 129)), (1, 3, 17, 17)),  # DeepLab's head resize
                                      (dict(size=(37, 45), align_corners=True), (2, 4, 13, 20)),
                                      (dict(scale_factor=1.7), (1, 4, 15, 11)),  # PyTorch maps by 1 / 1.7
                                      (dict(scale_factor=0.5), (1, 4, 40, 40)),
                                      (dict(scale_factor=2), (1, 4, 5, 5))])  # 10 columns: TVM's resize2d
def test_bilinear_resize_runs_the_table_kernel(kw, shape):
    """Bilinear resizing blends two input rows and gathers the output columns through tables computed at compile
    time (TVM's resize2d: 1.7x PyTorch's time); matches torch within 1e-6 (PyTorch's coordinates, its scale
    factors, align_corners both ways, downsampling, batch 2)."""
    torch.manual_seed(0)
    model, x = _Bilinear(**kw).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("bilinear_") for n in names) == (model(x).shape[-1] >= 16), names
    got = _run_built(g, x)
    np.testing.assert_allclose(got, model(x).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cin,cout,batch,bias,stride", [(64, 100, 1, True, 1), (48, 24, 1, False, 1),
                                                        (64, 100, 3, True, 1), (40, 24, 2, True, 2)])
def test_pointwise_conv_on_one_pixel_is_a_linear(cin, cout, batch, bias, stride):
    """A 1x1 conv on 1x1 maps (a classifier head written as a conv, an SE block's squeeze / excite) runs the packed
    GEMV (one sample) or GEMM: TVM's conv2d took 4.4x PyTorch's time. Matches torch with and without bias, at
    batch 2-3 and with a stride (still one pixel)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(cin, cout, 1, stride, bias=bias),
                                torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, 5, 5)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    assert "R.nn.conv2d" not in mod.script()
    assert any(gv.name_hint.startswith("gemv_packed" if batch == 1 else "gemm_packed") for gv in mod.get_global_vars())
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw,batch", [(3, 48, 16, 16, 0, 64, 1),  # ViT's patch embedding
                                                             (3, 32, 4, 4, 0, 30, 2),  # Swin stem; a cut-off edge
                                                             (3, 16, 3, 4, 1, 33, 1)])  # a 3x3 stride-4 stem
def test_patchify_conv_runs_im2col_and_the_packed_gemm(cin, cout, k, stride, pad, hw, batch):
    """Convs with a stride of 3 or more on few input channels (ViT's patch embedding: stride = kernel) run im2col
    (each pixel copied once when stride = kernel) and the packed GEMM: TVM's conv took 1.65-2x PyTorch's time.
    Matches torch at batch 2, on a map that is not whole patches and with padding."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(cin, cout, k, stride, pad).eval()
    x = torch.randn(batch, cin, hw, hw)
    _assert_runs_im2col(model, x)


class _Pad(torch.nn.Module):
    def __init__(self, pads, value):
        super().__init__()
        self.pads, self.value = pads, value

    def forward(self, x):
        return torch.nn.functional.pad(x, self.pads, value=self.value) * 2.0


@pytest.mark.parametrize("pads,value,shape", [((1, 1, 1, 1), 0.0, (1, 8, 12, 12)), ((0, 1, 0, 1), 0.0, (1, 4, 13, 13)),
                                              ((2, 3), -1.5, (2, 5, 40)), ((1, 2, 3, 4), 0.5, (2, 3, 9, 10)),
                                              ((1, 1, 1, 1, 1, 1), 0.0, (1, 4, 5, 6)),  # 3 axes: Relax's pad
                                              ((-1, 1), 0.0, (1, 4, 10))])  # a crop: Relax's pad
def test_constant_pad_runs_the_row_kernel(pads, value, shape):
    """A zero (or constant) pad of the last one or two axes that no conv absorbs runs a row kernel: Relax's pad
    took 14x PyTorch's time. Exact, for asymmetric pads, 1-D rows, batch 2 and a nonzero fill."""
    model, x = _Pad(pads, value).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("pad_") for n in names) == (len(pads) <= 4 and min(pads) >= 0), names
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


@pytest.mark.parametrize("cin,cout,k,d,stride,pad,hw,batch", [
    (16, 24, 3, 2, 3, 2, 28, 1),  # the vector-copy im2col
    (8, 16, 3, 4, 3, 4, 9, 1),  # 9 columns: the per-element im2col
    (12, 16, 5, 2, 3, 3, 21, 2),  # 5x5, uneven padding of the taps, batch 2
])
def test_dilated_conv_runs_im2col_with_spread_taps(cin, cout, k, d, stride, pad, hw, batch):
    """A dilated conv at a stride the pixel-row conv does not take (3) runs im2col with taps d pixels apart and one
    packed GEMM, ReLU in the store (TVM's dilated conv took 11.5x PyTorch's time at stride 2). Matches torch at
    batch 2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, pad, dilation=d), torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "R.nn.conv2d" not in mod.script() and any(n.startswith("im2col") and f"d{d}" in n for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,stride,pad,shape,relu", [
    (8, 16, 3, 1, 1, (1, 8, 6, 12, 12), True),
    (3, 8, (3, 5, 5), (1, 2, 2), (1, 2, 2), (1, 3, 5, 20, 20), False),  # video stem: depth stride 1, 2 in H / W
    (8, 8, 3, 2, 1, (2, 8, 7, 9, 9), True),  # strided in depth too, batch 2, a depth not a multiple of 2
    (8, 8, (3, 1, 1), 1, (1, 0, 0), (1, 8, 4, 6, 6), False)])  # temporal (k, 1, 1): a k x 1 2-D conv, no copy
def test_conv3d_runs_the_2d_kernels_over_output_depths(cin, cout, k, stride, pad, shape, relu):
    """A 3-D conv runs as a 2-D one whose samples are the output depths, each with its kd input depth slices as
    channels (zeros past the depth), on graphopt's kernels with bias and ReLU in the store (TVM's conv3d took
    3-19x PyTorch's time); matches torch with depth strides, padding and batch 2. (k, 1, 1) kernels need no copy
    (test_volumes.py)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv3d(cin, cout, k, stride, pad),
                                torch.nn.ReLU() if relu else torch.nn.Identity()).eval()
    x = torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    temporal = k == (3, 1, 1)
    assert "R.nn.conv3d" not in text and ("depth_taps" in text) != temporal, text
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cin,cout,k,stride,pad,hw,batch,kernel", [
    (16, 24, 3, (2, 1), 1, (28, 28), 1, "conv_tok_24x16x28x28_k3x3s2x1"),  # a partial channel tile
    (8, 16, 3, (1, 2), 1, (9, 20), 1, "conv_tok_16x8x9x20_k3x3s1x2"),
    (16, 16, (3, 5), (2, 3), (1, 2), (17, 31), 2, "conv_tok_16x16x17x31_k3x5s2x3"),  # batch 2
    (4, 24, 3, (2, 1), 1, (28, 28), 1, "im2col"),  # a short reduction (36 steps): vector copy
    (2, 16, 3, (1, 2), 1, (9, 20), 1, "im2col")])  # per element
def test_uneven_stride_conv_runs_its_own_row_and_column_strides(cin, cout, k, stride, pad, hw, batch, kernel):
    """A conv with different strides along H and W (CRNN's (2, 1)) runs the pixel-row conv with its row and column
    strides, or with a short reduction (Cin * kh * kw <= 64) im2col with its own row stride and the packed GEMM,
    ReLU in the store (TVM's conv took 11.6x PyTorch's time); matches torch, batch 2 included."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, pad), torch.nn.ReLU()).eval()
    x = torch.randn(batch, cin, *hw)
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    names = _func_names(g)
    assert "R.nn.conv2d" not in text and "R.nn.relu" not in text, names
    assert any(n.startswith(kernel) for n in names), names
    _assert_built_matches(g, model, x)


class _Neck(torch.nn.Module):
    """A YOLO / FPN neck's step: SiLU, nearest 2x (or `scale`), concat with the finer map."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x, fine):
        up = torch.nn.functional.interpolate(torch.nn.functional.silu(x), scale_factor=self.scale, mode="nearest")
        return torch.cat([up, fine], 1)


@pytest.mark.parametrize("scale,hw", [(2, (5, 7)), ((3, 2), (4, 6)), (1.5, (6, 6))])  # 1.5: TVM's resize2d
def test_nearest_upsampling_by_whole_factors_is_its_own_kernel(scale, hw):
    """Nearest upsampling by whole factors runs its own kernel, so the SiLU before it and the concat after it do not
    fuse into one generic loop with it (2.2 ms in a YOLO neck); matches torch exactly."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, *hw)
    up = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    fine = torch.randn(1, 4, *up.shape[2:])
    model = _Neck(scale).eval()
    g = graphopt.trace(model, (x, fine))
    whole = not isinstance(scale, float)
    assert any(n.startswith("nearest_") for n in _func_names(g)) == whole
    got = _run_built(g, x, fine)
    np.testing.assert_allclose(got, model(x, fine).numpy(), rtol=1e-6, atol=1e-6)


class _Mean(torch.nn.Module):
    def __init__(self, dims, keep):
        super().__init__()
        self.dims, self.keep = dims, keep

    def forward(self, x):
        return x.mean(self.dims, keepdim=self.keep) * 2.0


@pytest.mark.parametrize("shape,dims,keep,kernel", [((1, 24, 13, 13), (2, 3), True, True),  # 169: overlapping tail
                                                    ((2, 8, 5, 7), (-1, -2), False, True),  # 35: one 32-float step
                                                    ((1, 6, 100), (-1,), True, True),
                                                    ((1, 4, 2, 2), (2, 3), True, False),  # 4 values: Relax's mean
                                                    ((1, 6, 10, 10), (1,), True, False)])  # not trailing
def test_mean_over_trailing_axes_runs_the_row_kernel(shape, dims, keep, kernel):
    """Global average pooling (SE blocks, heads: a mean over the trailing axes) runs a row kernel with four partial
    sums in flight: Relax's mean took 2-7x PyTorch's time on large maps (96x112x112: 299 -> 30 us). Matches torch
    within 1e-6 with tails, keepdim either way, 3-D rows; small or non-trailing means keep Relax's."""
    torch.manual_seed(0)
    model, x = _Mean(dims, keep).eval(), torch.randn(*shape) + 0.5
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("row_mean") for n in _func_names(g)) == kernel
    got = _run_built(g, x)
    np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-6, atol=1e-6)


class _ScalarMean(torch.nn.Module):
    def forward(self, x):
        return x.sum().mean(dim=0, keepdim=True) * 2.0


def test_mean_of_a_0d_tensor_is_the_tensor():
    """A mean over a 0-d tensor's dim 0 (aten.mean.dim) is the tensor itself: the row kernel's converter had divided
    by the tensor's zero rank while importing, and Relax's own mean rejects axis 0 of a 0-d tensor."""
    x = torch.randn(3, 4)
    model = _ScalarMean().eval()
    g = graphopt.trace(model, (x,))
    assert not any(n.startswith("row_mean") for n in _func_names(g))
    np.testing.assert_allclose(_run_built(g, x), model(x).numpy(), rtol=1e-6)


class _Fn(torch.nn.Module):
    """A module computing fn(x) (a lambda over torch ops): the layers the tests below trace."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("pads,mode,shape", [((3, 3, 3, 3), "reflect", (1, 8, 12, 12)),  # style transfer's stem
                                             ((1, 2, 0, 3), "reflect", (2, 3, 9, 10)),
                                             ((3, 0), "reflect", (1, 4, 40)),  # HiFi-GAN's 1-D pad
                                             ((2, 1, 1, 3), "replicate", (1, 3, 7, 9)),
                                             ((5, 5), "replicate", (2, 2, 3)),  # pads wider than the row
                                             ((1, 2, 2, 1), "circular", (1, 2, 6, 5)),
                                             ((4, 4), "circular", (1, 3, 4)),  # the whole row around
                                             ((1, 1, 1, 1, 1, 1), "reflect", (1, 2, 4, 5, 6)),  # 3 axes: Relax's
                                             ((1, 2, 1, 1, 2, 0), "replicate", (1, 2, 4, 5, 6))])
def test_reflect_replicate_and_circular_pads_run_the_row_kernel(pads, mode, shape):
    """Reflect, replicate and circular pads of the last one or two axes (style transfer and CycleGAN's
    ReflectionPad2d, vocoders' 1-D pads) run a row kernel with each border index mapped as PyTorch does (aten's
    decomposition into index gathers took 5.8x / 9x PyTorch's time); 3-axis pads keep Relax's pad in that mode.
    Exact against torch for asymmetric pads, 1-D rows, batch 2 and pads as wide as the axis."""
    torch.manual_seed(0)
    model = _Fn(lambda x: torch.nn.functional.pad(x, pads, mode=mode) * 2.0).eval()
    x = torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith(f"{mode}_pad_") for n in names) == (len(pads) <= 4), names
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


@pytest.mark.parametrize("cls,shape,kw", [(torch.nn.InstanceNorm2d, (1, 16, 12, 12), dict(affine=True)),
                                          (torch.nn.InstanceNorm2d, (2, 8, 7, 9), dict(eps=1e-3)),
                                          (torch.nn.InstanceNorm1d, (1, 6, 50), dict(affine=True)),
                                          (torch.nn.InstanceNorm2d, (1, 4, 2, 2), dict(affine=True)),  # 4 pixels
                                          (torch.nn.InstanceNorm2d, (2, 8, 6, 6),
                                           dict(affine=True, track_running_stats=True))])
def test_instance_norm_runs_the_group_norm_kernel(cls, shape, kw):
    """Instance norm (style transfer, GAN generators) runs the group norm kernel with a group per channel (aten's
    decomposition: 2.6x PyTorch's time); under 8 pixels a channel Relax's instance norm, and with running
    statistics an affine map. Matches torch with a custom eps, 1-D maps and batch 2."""
    torch.manual_seed(0)
    model = cls(shape[1], **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
        if kw.get("track_running_stats"):
            model.running_mean.normal_(), model.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(*shape) * 3 + 1
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    kernel = not kw.get("track_running_stats") and math.prod(shape[2:]) >= 8
    assert any(n.startswith("group_norm") for n in names) == kernel, names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("shifts,dims,shape", [((-3, -3), (1, 2), (1, 14, 14, 8)),  # Swin's window shift
                                               ((3, 3), (1, 2), (2, 14, 14, 8)),  # and back, batch 2
                                               (5, -1, (3, 7)),  # the last axis: one element a run
                                               ((9, -2, 1), (0, 2, 2), (4, 3, 5)),  # beyond the size; one axis twice
                                               (7, None, (3, 4, 5)),  # the flat tensor
                                               ((0, 14), (1, 2), (1, 4, 14, 3))])  # no move at all
def test_roll_runs_the_row_copy(shifts, dims, shape):
    """torch.roll (Swin's shifted windows) runs a row copy that finds each output row's source row through the
    shifts of the axes before the last rolled one and copies that row in two chunks (aten's index_select per axis:
    3.4x PyTorch's time). Exact against torch for negative shifts, shifts past the size, one axis rolled twice,
    the last axis, the flat tensor and batch 2."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: torch.roll(x * 2.0, shifts, dims) + 1.0).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("roll_") for n in _func_names(g))
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


@pytest.mark.parametrize("dims,shape", [((3,), (2, 4, 5, 19)),  # the width: a reversed element copy
                                        ((2,), (1, 3, 6, 7)), ((1,), (1, 5, 4, 6)),  # rows, channels: runs
                                        ((0, 2), (3, 4, 5)), ((-1, 0, 1), (2, 3, 9))])
def test_flip_runs_the_row_copy(dims, shape):
    """torch.flip (test-time augmentation, bidirectional sequence models) runs a row copy: runs copied from their
    mirrored place, the last axis reversed element by element (Relax's flip: 2-3.4x PyTorch's time). Exact."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: torch.flip(x * 2.0, dims) + 1.0).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("flip_") for n in _func_names(g))
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


@pytest.mark.parametrize("shape,perm", [((1, 64, 80), (0, 2, 1)), ((2, 3, 70, 65), (0, 1, 3, 2)),
                                        ((1, 100, 64), (0, 2, 1)),
                                        ((2, 64, 9, 8), (0, 2, 3, 1)), ((1, 8, 9, 70), (0, 3, 1, 2)),  # NCHW <-> NHWC
                                        ((1, 1, 70, 80), (3, 2, 0, 1)),  # unit axes aside: one transpose
                                        ((2, 64, 64, 3), (1, 0, 2, 3))])  # leading axes swapped: not a transpose
def test_large_matrix_transpose_runs_the_block_kernel(shape, perm):
    """Permutations that are batches of transposes of matrices of at least 64 x 64 (SAGAN's attention map,
    MLP-Mixer's token mixing, NCHW <-> NHWC: C against H W) run the 16 x 16 tile transpose (8 x 8 register
    blocks; Relax's read down the columns: 1.7 ms for 1024 x 1024, 2.4x PyTorch's time from NHWC to NCHW).
    Sizes that are not multiples of 16 overlap their last tiles. Exact."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: (x * 2.0).permute(*perm) + 1.0).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("transpose_") for n in _func_names(g)) == (perm != (1, 0, 2, 3))
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


class _SaganAttention(torch.nn.Module):
    def forward(self, x):  # x [1, C, P]: v @ softmax(q^T k)^T, the attention map P x P
        a = torch.softmax(torch.bmm(x[:, :16].transpose(1, 2), x[:, 16:32]), -1)
        return torch.bmm(x, a.transpose(1, 2))


def test_context_matmul_with_a_large_transposed_map_runs_swapped():
    """v @ attn^T with attn too large to stage (SAGAN's 1024-pixel map) runs as (attn @ v^T)^T: the batched kernel
    stages v, reading it as K^T, and the product is transposed back; no transpose of the map. Matches torch."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 576)
    model = _SaganAttention().eval()
    g = graphopt.trace(model, (x,))
    from tvm import relax
    mod = relax.transform.DeadCodeElimination()(lower_to_relax(g))  # (the map's own permute, unused, goes)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "bmm_1x576x576x64_bt" in names and "transpose_1x576x64" in names, names
    assert "transpose_1x576x576" not in names
    _assert_built_matches(g, model, x)


class _EinsumAttention(torch.nn.Module):
    def forward(self, x):  # a diffusion UNet's attention over pixels: x [1, C, P], q = k = v = x
        a = torch.softmax(torch.einsum("bci,bcj->bij", x, x * 0.5), -1)
        return torch.einsum("bij,bcj->bci", a, x)


def test_einsum_attention_reads_the_map_transposed_without_a_copy():
    """einsum's decomposition moves unit axes around the map ([1, N, N, 1] -> [1, 1, N, N] -> [N, N, 1, 1]): a
    permute that moves only unit axes is a reshape, and the bmm reading the map transposed through one runs
    swapped, as in SAGAN's attention; before, Relax's transpose read the 1024 x 1024 map down its columns (2.9 ms
    of a DDPM block's 11.8). Matches torch."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 576)
    model = _EinsumAttention().eval()
    g = graphopt.trace(model, (x,))
    from tvm import relax
    mod = relax.transform.DeadCodeElimination()(lower_to_relax(g))
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert "bmm_1x576x576x64_bt" in names, names
    assert "transpose_1x576x576" not in names, names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("shape,perm", [((1, 30, 1, 40), (0, 2, 1, 3)), ((5, 1, 7), (1, 0, 2)),
                                        ((1, 70, 80, 1), (3, 0, 1, 2))])
def test_permute_of_unit_axes_is_a_reshape(shape, perm):
    """A permutation that keeps the other axes in order moves no element: a reshape, no kernel. Exact."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: x.permute(*perm) * 2.0).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert "permute_dims" not in lower_to_relax(g).script()
    assert not any(n.startswith("transpose") for n in _func_names(g))
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


class _ConstMatmul(torch.nn.Module):
    def __init__(self, transposed: bool):
        super().__init__()
        self.transposed = transposed
        self.w = torch.nn.Parameter(torch.randn(96, 80) / 9 if transposed else torch.randn(80, 96) / 9)

    def forward(self, x):
        return x @ self.w.t() if self.transposed else x @ self.w


@pytest.mark.parametrize("transposed,shape,kernel", [(True, (1, 24, 80), "gemm_packed"), (True, (1, 80), "gemv_packed"),
                                                     (False, (24, 80), "gemm_packed")])
def test_matmul_with_a_constant_matrix_runs_the_packed_gemm(transposed, shape, kernel):
    """x @ W.t() and x @ W with a parameter W (hand-written projections, GCN's x @ W) run the packed GEMM (GEMV for
    one row) as a linear layer would; Relax's matmul under the rule ran at ~43 GMAC/s. Matches torch."""
    torch.manual_seed(0)
    model, x = _ConstMatmul(transposed).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith(kernel) for n in _func_names(g)), _func_names(g)
    _assert_built_matches(g, model, x)


class _Attention(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, mask=None):
        if self.kind == "sdpa":  # scales q and k^T by sqrt(scale) each; a mask adds a safe softmax's where
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.kind == "swin":  # (q * scale) @ k^T
            return torch.softmax((q * 0.125) @ k.transpose(-2, -1), -1) @ v
        return torch.bmm(q[0], torch.relu(k[0].transpose(-2, -1)))  # a plain bmm of two activations


@pytest.mark.parametrize("kind,shape", [("swin", (1, 6, 49, 32)),  # Swin's 7x7 windows
                                        ("sdpa", (1, 3, 197, 6)),  # ViT: row chunks, a shorter last one
                                        ("sdpa", (2, 2, 5, 6)),  # fewer rows than a tile, under a vector
                                        ("sdpa", (1, 4, 20, 6)),  # a seq-first encoder's 20 tokens
                                        ("plain", (1, 2, 13, 7))])  # a last panel of 13 of 16 columns
def test_odd_sized_attention_matmuls_run_the_batched_kernel(kind, shape):
    """Batched matmuls of two activations whose rows or columns the schedule rule cannot tile (Swin's 49 tokens,
    ViT's 197) run graphopt's batched kernel: each task stages its batch's right operand as zero-padded panels,
    reading attention's keys K itself for K^T (and applying SDPA's scale as it stages them), no padded copy or
    cut (they had taken 3.8 ms of a 2-block Swin stage's 12). Matches torch within 2e-6 of the output's range.
    (SDPA with a head width of 6, not whole vectors, is decomposed into them; wider heads run the fused attention
    kernel: test_attention.py.)"""
    torch.manual_seed(0)
    model = _Attention(kind).eval()
    q, k, v = (torch.randn(*shape) for _ in range(3))
    g = graphopt.trace(model, (q, k, v))
    names = _func_names(g)
    bmms = sorted(n for n in names if n.startswith("bmm_"))
    assert bmms and any("_bt" in n for n in bmms) == (kind != "plain"), names
    assert any(n.endswith("_scaled") for n in names) == (kind == "sdpa"), names
    ref = model(q, k, v).numpy()
    got = _run_built(g, q, k, v)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


@pytest.mark.parametrize("lanes", [8, 16])
def test_batched_kernel_source_parses_for_every_row_and_column_split(lanes):
    """Row chunks whose full tiles and last partial tile land in one scope, next to a single full panel, declared
    the accumulator twice: TVMScript refused the kernel and the graph did not compile (216 of 1364 shapes over
    M 1..29, 49, 197 and N 1..197, among them any 20-token attention: a seq-first TransformerEncoderLayer)."""

    from graphopt.targets.tvm.cpu.bmm import bmm_source, bmm_tiles
    for m in (*range(1, 14), 20, 49):
        for n in (5, 17, 20, 33):
            mr, nr = bmm_tiles(n, lanes)
            parse_kernel(bmm_source(2, m, 7, n, mr, nr, True, 0.5))


def test_sdpa_rows_masked_everywhere_are_zeros_in_the_softmax_kernel():
    """SDPA's decomposition zeroes the softmax of rows that are -inf everywhere (an attention mask with a row all
    False) through any + where, a generic reduction and select over the scores (0.13 ms a ViT-Ti layer); the
    softmax kernel does it, and the where, any and eq are gone. Matches torch, zeros included. (6-float heads:
    decomposed; the fused attention kernel's own zeros: test_attention.py.)"""
    torch.manual_seed(0)
    model = _Attention("sdpa").eval()
    q, k, v = (torch.randn(1, 2, 12, 6) for _ in range(3))
    mask = torch.rand(1, 1, 12, 12) > 0.3
    mask[..., 3, :] = False
    g = graphopt.trace(model, (q, k, v, mask))
    from tvm import relax
    mod = relax.transform.DeadCodeElimination()(lower_to_relax(g))
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("softmax_rows_safe") for n in names), names
    assert "R.any" not in mod.script() and mod.script().count("R.where") == 1  # the one that reads the mask
    ref = model(q, k, v, mask).numpy()
    assert np.all(ref[:, :, 3] == 0)
    got = _run_built(g, q, k, v, mask)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


def _assert_values_and_indices_equal(g, model, x, indices: bool):
    """Build `g`, run it on x and compare with the model exactly: (values, indices) when `indices`, else one
    tensor (NaN where torch has NaN)."""
    from tvm import relax
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    ref = model(x)
    if indices:
        np.testing.assert_array_equal(got[0].numpy(), ref[0].numpy())
        np.testing.assert_array_equal(got[1].numpy(), ref[1].numpy())
    else:
        np.testing.assert_array_equal((got if hasattr(got, "numpy") else got[0]).numpy(), ref.numpy())


@pytest.mark.parametrize("shape,dim,keepdim,indices", [((1, 64, 300), -1, False, False),  # PointNet's max over points
                                                       ((2, 5, 37), 2, True, True),  # a tail; the indices too
                                                       ((3, 9, 4), 1, False, True),  # not the last axis
                                                       ((4, 6), -1, False, False)])  # under a vector: Relax's max
def test_max_over_the_last_axis_runs_a_row_kernel(shape, dim, keepdim, indices):
    """torch.max(x, dim) takes its values from a row kernel over the last axis (TVM's converter sorted for a top 1:
    2.9 ms for PyTorch's 1.0-1.3 on 1024 rows of 2048) and its indices from Relax's argmax; NaN wins wherever it
    lies in a row (other axes too: Relax's max drops it), a row of -inf stays -inf and points at 0, as in
    PyTorch. Values and indices match torch exactly."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x.view(-1)[5] = float("nan")  # in a row's first vector
    if shape[-1] > 20:
        x[..., 1, 20] = float("nan")  # a later vector of another row
        x[..., 2, :] = float("-inf")
    model = _Fn(lambda x: tuple(torch.max(x * 1.0, dim, keepdim)) if indices
                else torch.max(x * 1.0, dim, keepdim)[0] + 1.0).eval()
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("row_max") for n in names) == (dim % len(shape) == len(shape) - 1 and shape[-1] >= 8), names
    _assert_values_and_indices_equal(g, model, x, indices)


@pytest.mark.parametrize("shape,dim,log", [((2, 1000), -1, True),  # a classifier's / language model's head
                                           ((3, 37), 1, True),  # a row tail
                                           ((1, 21, 16, 20), 1, False),  # segmentation: softmax over channels
                                           ((1, 21, 16, 20), 1, True),
                                           ((2, 5, 3, 4), 1, False),  # 12 positions: 8-wide blocks
                                           ((2, 3, 40, 5), 2, True),  # a middle axis of a 4-D tensor
                                           ((1, 4, 6), 1, False)])  # under a vector: Relax's softmax
def test_log_softmax_and_softmax_over_channels_run_row_and_column_kernels(shape, dim, log):
    """log_softmax over the last axis runs the softmax row kernel with a log pass (Relax fused aten's decomposition
    into a loop recomputing the row's reductions per output: 2.0 s for one row of 32000), and (log_)softmax over
    an axis before the last a column kernel over blocks of neighbouring positions (Relax's: 6.2x PyTorch's time on
    a 21-class 128x128 segmentation map). Matches torch within 1e-6 with -inf logits and overlapping tails."""
    torch.manual_seed(0)
    x = torch.randn(*shape) * 4
    x.view(-1)[3] = float("-inf")
    model = _Fn(lambda x: (torch.log_softmax if log else torch.softmax)(x * 2.0, dim)).eval()
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    last = dim % len(shape) == len(shape) - 1
    kernel = ("log_softmax_rows" if log else "softmax_rows") if last else ("log_softmax_cols" if log else
                                                                           "softmax_cols")
    inner = math.prod(shape[dim % len(shape) + 1:])
    assert any(n.startswith(kernel) for n in names) == (last or inner >= 8), names
    ref = model(x).numpy()
    got = _run_built(g, x)
    finite = np.isfinite(ref)
    np.testing.assert_allclose(got[finite], ref[finite], rtol=0, atol=1e-6 * max(1.0, np.abs(ref[finite]).max()))
    np.testing.assert_array_equal(got[~finite], ref[~finite])


class _GridSample(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x, theta):
        grid = torch.nn.functional.affine_grid(theta * 1.0, [x.shape[0], x.shape[1], 5, 7], align_corners=False)
        return torch.nn.functional.grid_sample(x, grid, **self.kw)


@pytest.mark.parametrize("kw", [dict(mode="bilinear", padding_mode="zeros", align_corners=False),
                                dict(mode="nearest", padding_mode="border", align_corners=True),
                                dict(mode="bicubic", padding_mode="border", align_corners=False)])
def test_grid_sample_reads_pytorchs_grid_layout(kw):
    """grid_sample (spatial transformers, flow warping) on a grid computed in the graph from an input theta: TVM's
    converter handed PyTorch's [N, H, W, 2] grid to a Relax op that reads [N, 2, H, W] (an 8 x 10 image sampled on a
    5 x 7 grid came out 7 x 2); the grid is transposed first. Matches torch for each mode, batch 2. (Bicubic with
    reflection padding, 12 s of TVM's build, is in the ONNX GridSample test against ONNX Runtime.)"""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 10)
    theta = torch.tensor([[[0.9, 0.2, 0.1], [-0.1, 1.1, -0.2]], [[1.2, 0.0, 0.3], [0.1, 0.8, 0.0]]])
    model = _GridSample(**kw).eval()
    g = graphopt.trace(model, (x, theta))
    ref = model(x, theta).numpy()
    got = _run_built(g, x, theta)
    assert got.shape == ref.shape == (2, 3, 5, 7)
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-6)


class _ReflectedSample(torch.nn.Module):
    def __init__(self, mode, align):
        super().__init__()
        self.mode, self.align = mode, align

    def forward(self, x, grid):
        return torch.nn.functional.grid_sample(x, grid, mode=self.mode, padding_mode="reflection",
                                               align_corners=self.align)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("align", [True, False])
@pytest.mark.parametrize("hw", [(9, 11), (1, 7), (5, 1)])  # one-pixel axes: PyTorch reflects them to 0
def test_grid_sample_reflection_reflects_the_grid_once(mode, align, hw):
    """Reflection padding: the coordinates are reflected into the image on the grid (once a sample, not once a
    channel: TVM's reflection sample ran an fmod per output, 2.26 ms for 16 x 64 x 64 against 0.25 now) and sampled
    with border padding; samples up to 4 image widths outside, both align_corners, match torch."""
    torch.manual_seed(0)
    x, grid = torch.randn(2, 3, *hw), torch.rand(2, 6, 7, 2) * 8 - 4
    model = _ReflectedSample(mode, align).eval()
    g = graphopt.trace(model, (x, grid))
    assert "reflection" not in lower_to_relax(g).script()
    # (a coordinate an ulp off moves a bilinear sample by up to its gradient times that: 3e-6 seen here)
    np.testing.assert_allclose(_run_built(g, x, grid), model(x, grid).numpy(), rtol=0, atol=5e-6)


@pytest.mark.parametrize("fn,dims,keepdim,shape,dtype", [("amax", (2, 3), False, (1, 16, 5, 6), torch.float32),  # CBAM
                                                         ("amin", -1, True, (3, 37), torch.float32),
                                                         ("amax", 1, False, (2, 9, 4), torch.float32),  # a middle axis
                                                         ("amin", (), False, (4, 5), torch.float32),  # all axes
                                                         ("amax", -1, False, (3, 20), torch.int32),
                                                         ("logsumexp", -1, False, (2, 1000), torch.float32)])
def test_amax_amin_and_logsumexp_compile_and_keep_nan(fn, dims, keepdim, shape, dtype):
    """amax / amin had no converter in TVM's importer, so torch.amax and torch.logsumexp (which decomposes into amax)
    did not compile. Over trailing axes of floats they run the row kernel (min too), elsewhere Relax's reduction;
    a NaN in a reduced row gives NaN either way, as in PyTorch. Exact against torch (logsumexp within 1e-6)."""
    torch.manual_seed(0)
    x = (torch.randn(*shape) * 10).to(dtype)
    if dtype.is_floating_point and fn != "logsumexp":
        x.view(-1)[7] = float("nan")
    model = _Fn(lambda x: torch.logsumexp(x * 1.0, dims, keepdim) if fn == "logsumexp"
                else getattr(torch, fn)(x * 1, dims, keepdim)).eval()
    g = graphopt.trace(model, (x,))
    ref = model(x).numpy()
    got = _run_built(g, x)
    if fn == "logsumexp":
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("fn,shape,kernel", [
    (lambda x: torch.nn.functional.normalize(x, dim=-1), (2, 7, 37), "row_norm2"),  # CLIP / ArcFace, a tail
    (lambda x: torch.linalg.vector_norm(x, 2, (1, 2), keepdim=True), (3, 4, 5), "row_norm2"),
    (lambda x: torch.linalg.vector_norm(x, 1, -1), (3, 40), None),  # ord 1: TVM's converter
    (lambda x: (x * x).sum(-1) / x.shape[-1], (1, 80, 300), "row_sum"),  # an audio frame's energy
    (lambda x: x.sum((2, 3), keepdim=True), (2, 6, 5, 7), "row_sum"),
    (lambda x: x.sum(1), (4, 30, 3), None)])  # not trailing: Relax's sum
def test_sums_and_2_norms_over_trailing_axes_run_the_row_kernel(fn, shape, kernel):
    """Sums and 2-norms over trailing float axes run the row kernel (the norm summing squares in its partials):
    TVM's norm (pow, sum, pow) took 4.7x PyTorch's time in F.normalize, Relax's sum 1.8x. Matches torch within
    float rounding for tails, keepdim and several axes; other orders and axes keep TVM's ops."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: fn(x * 1.0)).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("row_") for n in names) == (kernel is not None), names
    if kernel:
        assert any(n.startswith(kernel) for n in names), names
    ref = model(x).numpy()
    np.testing.assert_allclose(_run_built(g, x), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("kw,shape", [(dict(kernel_size=3, padding=1), (1, 8, 14, 14)),
                                      (dict(kernel_size=(2, 3), stride=2, padding=(1, 0)), (2, 4, 9, 11)),
                                      (dict(kernel_size=3, dilation=2, padding=2), (1, 5, 12, 12)),
                                      (dict(kernel_size=2, stride=2), (3, 8, 8))])  # unbatched
def test_unfold_runs_the_im2col_kernel(kw, shape):
    """F.unfold (T2T-ViT's soft split, involution, local attention) runs graphopt's im2col kernel, whose columns
    are aten.im2col's: aten's decomposition gathered with index tensors of two shapes that TVM's index converter
    could not broadcast, so the import failed. Exact against torch for strides, padding, dilation, a 2x3 kernel,
    batch 2 and an unbatched input; per-axis dilations are refused with the node's name."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: torch.nn.functional.unfold(x * 1.0, **kw)).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("im2col") for n in _func_names(g))
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


def test_unfold_with_per_axis_dilation_is_refused_by_name():
    model = _Fn(lambda x: torch.nn.functional.unfold(x * 1.0, 3, dilation=(1, 2))).eval()
    x = torch.randn(1, 2, 9, 9)
    with pytest.raises(graphopt.errors.UnsupportedOpError, match="im2col"):
        build_executable(graphopt.trace(model, (x,)))


@pytest.mark.parametrize("kw,shape", [(dict(size=(25, 25)), (1, 4, 13, 13)),  # not a whole factor
                                      (dict(size=(7, 9)), (2, 3, 13, 20)),  # downsampling, batch 2
                                      (dict(scale_factor=1.55), (1, 2, 10, 10)),  # 1 / 1.55, not 10 / 15
                                      (dict(size=(26, 30)), (1, 2, 13, 15)),  # exactly 2x: PyTorch's shift
                                      (dict(scale_factor=3), (1, 2, 5, 5))])  # whole factors: the kernel
def test_nearest_resize_picks_pytorchs_rows_and_columns(kw, shape):
    """Nearest resizing to a size that is not a whole multiple takes PyTorch's source rows and columns
    (min(floor(dst * in / out), in - 1) in float32) through two takes: TVM's converter picked others (13 -> 25 was
    off by up to 1.7x the output's range). Exact against torch; whole factors keep the copy kernel."""
    torch.manual_seed(0)
    model = _Fn(lambda x: torch.nn.functional.interpolate(x * 1.0, mode="nearest", **kw)).eval()
    x = torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    whole = all(o % i == 0 for o, i in zip(model(x).shape[2:], shape[2:]))
    assert any(n.startswith("nearest_") for n in _func_names(g)) == whole
    np.testing.assert_array_equal(_run_built(g, x), model(x).numpy())


@pytest.mark.parametrize("normalized,shape,affine", [((16, 7, 7), (2, 16, 7, 7), True),  # LayerNorm([C, H, W])
                                                     ((5, 9), (3, 5, 9), True),  # 45 values: a row tail
                                                     ((4, 6), (2, 4, 6), False)])
def test_layer_norm_over_several_axes_runs_the_row_kernel(normalized, shape, affine):
    """A layer norm over several trailing axes runs the layer norm row kernel over the flattened rows (Relax's
    layer norm over 64x28x28 took 3.3 ms, 103x PyTorch's time). Matches torch with and without affine, batch 2."""
    torch.manual_seed(0)
    model = torch.nn.LayerNorm(list(normalized), elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            model.weight.normal_(), model.bias.normal_()
    model.eval()
    x = torch.randn(*shape) * 3 + 1
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("layer_norm_rows") for n in _func_names(g))
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("out,indices", [(1, True), ((3, 5), False), ((5, 5), False), ((3, 5), True)])
def test_adaptive_max_pool_compiles_and_keeps_nan(out, indices):
    """adaptive_max_pool2d (CBAM's channel attention) had no converter, so the import failed: 1x1 outputs take the
    row max over H and W with Relax's argmax for the indices, outputs that divide the map max pooling with kernel
    = stride (whose kernel now keeps a NaN, as PyTorch does), uneven windows (5x5 of 12x10, refused before) the
    max of each window's rows then columns; indices of pooled windows are refused with the node's name. Values and
    indices match torch exactly, a NaN included."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 10)
    x[0, 1, 3, 4] = float("nan")
    model = _Fn(lambda x: torch.nn.functional.adaptive_max_pool2d(x * 1.0, out, return_indices=True)
                if indices else torch.nn.functional.adaptive_max_pool2d(x * 1.0, out)).eval()
    g = graphopt.trace(model, (x,))
    size = (out, out) if isinstance(out, int) else out
    if size != (1, 1) and indices:
        with pytest.raises(graphopt.errors.UnsupportedOpError, match="adaptive_max_pool2d"):
            build_executable(g)
        return
    _assert_values_and_indices_equal(g, model, x, indices)


@pytest.mark.parametrize("kw,shape", [(dict(scale_factor=2), (1, 4, 28, 28)), (dict(size=(25, 49)), (2, 3, 13, 20)),
                                      (dict(size=(7, 17)), (1, 3, 13, 20)),  # downscaling
                                      (dict(scale_factor=1.7, align_corners=True), (1, 3, 13, 20)),
                                      (dict(scale_factor=1.7), (1, 3, 13, 20))])  # PyTorch's 1 / scale, not in / out
def test_bicubic_resize_runs_the_row_kernel(kw, shape):
    """Bicubic resizing (super-resolution, some segmentation heads) ran aten's decomposition at 2.7-3.2x PyTorch's
    time (64x28x28 -> 56x56: 3.3 ms); now the row kernel with PyTorch's taps (clamped into the map) and cubic
    weights (A = -0.75, coordinates not clamped at 0). Within 5e-6 of torch (weights above 1 and below 0)."""
    torch.manual_seed(0)
    model, x = _Fn(lambda x: torch.nn.functional.interpolate(x * 1.0, mode="bicubic", **kw)).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("bicubic_") for n in _func_names(g))
    np.testing.assert_allclose(_run_built(g, x), model(x).numpy(), rtol=0, atol=5e-6)


@pytest.mark.parametrize("out,shape", [(7, (2, 3, 13, 13)), ((4, 3), (1, 4, 10, 9)), ((2, 2), (1, 2, 12, 12)),
                                       ((5, 6), (1, 2, 5, 6))])
def test_adaptive_avg_pool_runs_the_row_kernel(out, shape):
    """Adaptive average pooling to other than 1x1 (PSPNet's pyramid, AlexNet's 13 -> 6, VGG heads at other input
    sizes) ran Relax's generic loop at 1.4-1.9x PyTorch's time; now the row kernel over PyTorch's windows (uneven
    and overlapping ones included), the input itself when the size is unchanged. Within 1e-6 of torch."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = _Fn(lambda x: torch.nn.functional.adaptive_avg_pool2d(x * 1.0, out)).eval()
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("adaptive_avg") for n in _func_names(g)) == (tuple(shape[2:]) != out)
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("kw,shape,kernel", [(dict(size=(25, 49)), (1, 2, 13, 40), True),
                                             (dict(scale_factor=2), (2, 3, 13, 20), True),
                                             (dict(size=(25, 19)), (1, 2, 13, 40), False),  # downsampling
                                             (dict(scale_factor=1.7, align_corners=True), (1, 3, 13, 20), False),
                                             (dict(size=(25, 49), mode="bicubic"), (1, 2, 13, 40), False),
                                             (dict(size=(7, 11), mode="bicubic"), (2, 3, 24, 31), False)])
def test_antialiased_resizing_matches_torch(kw, shape, kernel):
    """F.interpolate(antialias=True): TVM's converter dropped the antialiasing filter (a 13x40 -> 25x19 bilinear
    resize came out off by 1.27). Bilinear upsampling, where PyTorch's filter is plain interpolation, runs the
    bilinear kernel; downsampling, align_corners and bicubic (torchvision's Resize default, preprocessing kept in
    the model) had been refused and run as two matmuls with the filter's per-axis matrices (read off PyTorch's own
    op). Within 5e-6 of PyTorch's outputs' range (float32 sums in another order)."""
    kw = {"mode": "bilinear", **kw}
    model, x = _Fn(lambda x: torch.nn.functional.interpolate(x, antialias=True, **kw)).eval(), torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    assert any(n.startswith("bilinear") for n in _func_names(g)) == kernel, _func_names(g)
    want = model(x).numpy()
    np.testing.assert_allclose(_run_built(g, x), want, rtol=0, atol=5e-6 * np.abs(want).max())


@pytest.mark.parametrize("kw,shape", [(dict(size=(5, 7, 9)), (1, 2, 3, 6, 4)),
                                      (dict(scale_factor=1.55), (2, 2, 4, 6, 5))])
def test_volumetric_nearest_resize_imports_and_picks_pytorchs_voxels(kw, shape):
    """3-D nearest resizing (volumetric UNets): aten's decomposition into index gathers did not import; it takes
    PyTorch's source indices along each axis. Exact against torch, sizes and a scale factor, batch 2."""
    model = _Fn(lambda x: torch.nn.functional.interpolate(x * 1.0, mode="nearest", **kw)).eval()
    x = torch.randn(*shape)
    np.testing.assert_array_equal(_run_built(graphopt.trace(model, (x,)), x), model(x).numpy())


@pytest.mark.parametrize("kw,shape", [(dict(size=25), (1, 2, 13)), (dict(scale_factor=1.7), (2, 3, 13)),
                                      (dict(size=40, align_corners=True), (1, 4, 13)), (dict(size=30), (1, 2, 60)),
                                      (dict(size=7), (1, 2, 13)), (dict(size=5, align_corners=True), (2, 3, 7)),
                                      (dict(size=1), (1, 2, 7)), (dict(size=1, align_corners=True), (1, 2, 7)),
                                      (dict(scale_factor=2.0), (1, 2, 7)),
                                      (dict(scale_factor=1.5), (1, 2, 7))])  # under 16, a scale not the ratio
def test_linear_1d_resizing_runs_the_bilinear_kernel_on_one_row(kw, shape):
    """F.interpolate(mode="linear") on [N, C, L] (audio features, vocoders): aten's decomposition failed TVM's
    build; it runs the bilinear kernel on a one-row map, matching torch within 1e-6 (sizes, a scale factor,
    align_corners, downsampling, batch 2). Outputs under 16 values (refused before) resize on Relax's resize2d,
    down to one value; there a scale factor other than the sizes' ratio is refused with the node's name."""
    model = _Fn(lambda x: torch.nn.functional.interpolate(x, mode="linear", **kw)).eval()
    x = torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    out = model(x).shape[-1]
    if out < 16 and kw.get("scale_factor") not in (None, out / shape[-1]):
        with pytest.raises(graphopt.errors.UnsupportedOpError, match="upsample_linear1d"):
            build_executable(g)
        return
    np.testing.assert_allclose(_run_built(g, x), model(x).numpy(), rtol=0, atol=1e-6)


class _Conv1D(torch.nn.Module):
    """GPT-2's Conv1D: a linear layer written as addmm(bias, x, W) with W [in, out]."""

    def __init__(self, nx, nf, beta=1.0):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(nf))
        self.beta = beta

    def forward(self, x):
        shape = x.shape[:-1] + (self.weight.shape[1],)
        if self.beta != 1.0:
            return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight, beta=self.beta).view(shape)
        return torch.addmm(self.bias, x.view(-1, x.shape[-1]), self.weight).view(shape)


@pytest.mark.parametrize("rows", [1, 7, 16])
def test_addmm_with_a_constant_weight_runs_on_the_packed_gemm(rows):
    """Relax's matmul + add took 2-3x the packed GEMM's time for a tiny GPT-2's Conv1D layers; one row streams the
    weight (GEMV). A beta other than 1 keeps TVM's addmm, and still matches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(_Conv1D(64, 96), torch.nn.ReLU(), _Conv1D(96, 32, beta=0.5)).eval()
    x = torch.randn(1, rows, 64)
    g = graphopt.trace(model, (x,))
    names = [gv.name_hint for gv in lower_to_relax(g).get_global_vars()]
    kernel, beta_half = (("gemv_packed_64x96", "gemv_packed_96x32") if rows == 1 else
                         (f"gemm_packed_{rows}x64x96", f"gemm_packed_{rows}x96x32"))
    assert any(n.startswith(kernel) for n in names) and not any(n.startswith(beta_half) for n in names), names
    _assert_built_matches(g, model, x)
