"""Convs whose weight the graph computes (StyleGAN2's modulated convs, weight standardization, hypernetworks,
CondConv) run graphopt's conv kernels on the weight packed when the model runs (k x k at stride 1 or 2), or its
im2col columns times the weight on the batched matmul kernel (1x1, dilated, grouped at batch > 1), not TVM's
generic conv2d loop nest."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm
from tvm import relax

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.lower import lower_to_relax


class _Computed(torch.nn.Module):
    def __init__(self, co, ci, k, stride=1, padding=0, dilation=1, groups=1, bias=False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(co, ci // groups, k, k) * 0.2)
        self.b = torch.nn.Parameter(torch.randn(co)) if bias else None
        self.args = (stride, padding, dilation, groups)

    def forward(self, x, s):
        b = None if self.b is None else self.b * s.mean() if self.args[3] > 1 else self.b  # computed or constant
        return F.conv2d(x, self.w * s.reshape(1, -1, 1, 1), b, *self.args)


class _CondConv(torch.nn.Module):
    """CondConv: the kernel mixed from 3 experts by routing weights of the input; a residual add and a ReLU after."""
    def __init__(self, c=12):
        super().__init__()
        self.route, self.w = torch.nn.Linear(c, 3), torch.nn.Parameter(0.2 * torch.randn(3, c, c, 3, 3))

    def forward(self, x):
        r = torch.sigmoid(self.route(x.mean((2, 3))))[0]
        return F.relu(F.conv2d(x, (r[:, None, None, None, None] * self.w).sum(0), padding=1) + x)


class _Modulated(torch.nn.Module):
    """StyleGAN2: per-sample weights demodulated, the batch folded into the groups of one conv."""
    def __init__(self, i=8, o=12, w=6):
        super().__init__()
        self.aff, self.weight, self.i, self.o = torch.nn.Linear(w, i), torch.nn.Parameter(torch.randn(o, i, 3, 3)), i, o

    def forward(self, x, lat):
        b = x.shape[0]
        w = self.weight[None] * (self.aff(lat) + 1)[:, None, :, None, None]
        w = w * torch.rsqrt((w * w).sum(dim=(2, 3, 4)) + 1e-8)[:, :, None, None, None]
        y = F.conv2d(x.reshape(1, b * self.i, *x.shape[2:]), w.reshape(b * self.o, self.i, 3, 3), padding=1, groups=b)
        return F.leaky_relu(y.reshape(b, self.o, *y.shape[2:]), 0.2)


def _check(model, *xs, kernel="bmm_"):
    """Lowers to `kernel` (a name prefix; conv_: the flat / pixel-row convs on the packed weight) and matches
    PyTorch."""
    g = graphopt.trace(model.eval(), xs)
    mod = lower_to_relax(g)
    names, text = {gv.name_hint for gv in mod.get_global_vars()}, mod.script()
    assert any(n.startswith(kernel) for n in names) or kernel == "bmm_" and "R.matmul(" in text, names
    assert "conv2d" not in text
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(x.numpy()) for x in xs))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    with torch.no_grad():
        ref = model(*xs).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("co,ci,k,stride,padding,dilation,groups,bias,shape,kernel", [
    (16, 8, 3, 1, 1, 1, 1, False, (1, 8, 12, 12), "conv_"),
    (13, 8, 3, 2, 1, 1, 1, True, (1, 8, 13, 11), "conv_"),  # stride 2 on odd maps; 13 channels: a padded panel
    (16, 8, 3, 1, 1, 1, 1, True, (2, 8, 9, 9), "conv_"),  # batch 2: both samples take the one weight
    (16, 8, 3, 1, 1, 1, 2, True, (1, 8, 9, 9), "conv_"),  # batch-1 groups as samples, each its own weight and bias
    (12, 8, 1, 1, 0, 1, 1, False, (2, 8, 9, 9), "bmm_"),  # 1x1: its columns are its input; batch 2
    (16, 8, 3, 1, 2, 2, 1, False, (1, 8, 10, 10), "bmm_"),  # dilated
    (16, 8, 3, 1, 1, 1, 4, True, (3, 8, 7, 7), "bmm_"),  # groups, batch 3: every sample's groups take the same weights
    (64, 64, 3, 3, 1, 1, 1, False, (1, 64, 39, 39), "bmm_"),  # stride 3; large right operand: panels staged in turn
])
def test_a_computed_weight_conv_runs_graphopts_kernels(co, ci, k, stride, padding, dilation, groups, bias, shape,
                                                       kernel):
    torch.manual_seed(0)
    _check(_Computed(co, ci, k, stride, padding, dilation, groups, bias), torch.randn(shape),
           torch.rand(ci // groups) + 0.5, kernel=kernel)


def test_stylegan2_modulated_conv():
    torch.manual_seed(0)
    _check(_Modulated(), torch.randn(3, 8, 10, 10), torch.randn(3, 6), kernel="conv_")


def test_condconv_mixed_kernel_with_residual_and_relu_in_the_store():
    torch.manual_seed(0)
    model, x = _CondConv(), torch.randn(1, 12, 10, 10)
    _check(model, x, kernel="conv_")
    text = lower_to_relax(graphopt.trace(model.eval(), (x,))).script()
    assert "R.maximum" not in text and "R.add(" not in text.split("call_tir")[-1]  # ReLU and residual in the store


@pytest.mark.parametrize("batch,m,k,n", [(1, 13, 4000, 100),  # few rows: tasks split the panels, a partial last one
                                         (2, 20, 1152, 1000), (1, 8, 9000, 20),  # one full panel + a partial one
                                         (3, 200, 3000, 50)])  # many rows: row chunks, each panel staged in turn
def test_batched_matmul_stages_one_panel_at_a_time(batch, m, k, n):
    """Right operands past a core's L2 are staged one panel at a time; with few rows the tasks take ranges of
    panels (each staged once: a 64-channel computed-weight conv over 56x56 pixels 0.62-0.89x the row-chunk time),
    else ranges of rows. Against float64 numpy."""
    from graphopt.targets.tvm.cpu.bmm import bmm_source, emit_bmm
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.host import cpu_target
    assert ("pc: T.let" in bmm_source(batch, m, k, n, 6, 16, False)) == (m <= 96)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch, m, k)).astype(np.float32)
    w = rng.standard_normal((batch, k, n)).astype(np.float32)
    bb = relax.BlockBuilder()
    av, wv = relax.Var("a", relax.TensorType(a.shape, "float32")), relax.Var("w", relax.TensorType(w.shape, "float32"))
    with bb.function("main", [av, wv]):
        with bb.dataflow():
            out = bb.emit_output(emit_bmm(bb, av, wv, batch, m, k, n, False, 8))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(build_cpu(bb.get(), cpu_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(got, a.astype(np.float64) @ w, rtol=0, atol=1e-5 * np.sqrt(k) * 4)
