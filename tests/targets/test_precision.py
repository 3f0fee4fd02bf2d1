"""float16 / bfloat16 models compile for the CPU (computed in float32 behind their own interface) and run through
the passes; float64 is refused by name; outputs that are not tensors are left out with a warning."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import graphopt
from graphopt.errors import TargetError


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.d = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.n = torch.nn.LayerNorm(8)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        y = F.hardswish(self.d(F.relu(self.bn(self.c(x)))))
        p = torch.softmax(y.float().flatten(2), -1).to(x.dtype)  # (AMP-style code: a float32 island)
        return self.fc(self.n((p * y.flatten(2)).sum(-1))) + torch.ones(4, dtype=x.dtype), y.mean()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_compiles_with_its_own_dtypes_and_float32_accuracy(tmp_path, dtype):
    """A half model traced as it is reached TVM with float16 biases next to float32 conv outputs (the import
    failed). It now takes and returns its dtype, computing in float32: closer to the float32 model than PyTorch's
    own half run, and within one half rounding of that run."""
    torch.manual_seed(0)
    m32 = _Net().eval()
    m = _Net().eval()
    m.load_state_dict(m32.state_dict())
    m = m.to(dtype)
    x = torch.randn(1, 3, 12, 12).to(dtype)
    art = graphopt.load(graphopt.compile(graphopt.trace(m, (x,)), "llvm", output=tmp_path / "a"))
    assert [s["dtype"] for s in art.inputs] == [str(dtype).split(".")[1]]
    got = art(x)
    with torch.no_grad():
        ref, ref32 = m(x), m32(x.float())
    eps = torch.finfo(dtype).eps
    for o, r, r32 in zip(got, ref, ref32):
        assert str(o.dtype) == str(dtype).split(".")[1]
        o = np.asarray(o, np.float32)
        scale = float(r32.abs().max())
        assert np.abs(o - r.float().numpy()).max() <= 4 * eps * scale
        assert np.abs(o - r32.numpy()).max() <= np.abs(r.float().numpy() - r32.numpy()).max() + eps * scale


@pytest.mark.parametrize("pipeline", ["fold-bn,quantize,fold-qdq", "sparsify{sparsity=0.7},select-sparse-layout"])
def test_half_model_runs_the_float32_passes(tmp_path, pipeline):
    """quantize's ops and the CPU's sparse kernels are float32: on a float16 graph quantize crashed (float input
    against a half bias) and select-sparse-layout found no weight it could take; both now widen the graph first,
    keeping its interface, and the build matches the optimized graph."""
    torch.manual_seed(1)
    m = _Net().eval().half()
    xs = [(torch.randn(1, 3, 12, 12).half(),) for _ in range(3)]
    g = graphopt.optimize(graphopt.trace(m, xs[0]), pipeline, data=xs, target="llvm")
    assert g.inputs[0].dtype == "float16" and g.outputs[0].dtype == "float16"
    if pipeline.startswith("fold-bn,quantize"):
        assert g.meta["history"][1]["stats"]["half_model_computed_in_float32"] is True
    assert any(op.startswith(("qconv2d", "qlinear", "bsr", "sparse")) or "bsr" in op for op in g.stats().ops) or \
        g.masks, g.stats().ops
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "a"))
    got = np.asarray(art(*xs[0])[0], np.float32)
    ref = g.run(*xs[0])[0].float().numpy()
    assert np.abs(got - ref).max() <= 2e-3 * max(1.0, np.abs(ref).max())


def test_float64_is_refused_by_name(tmp_path):
    m = torch.nn.Linear(4, 2).double()
    g = graphopt.trace(m, (torch.randn(1, 4).double(),))
    with pytest.raises(TargetError, match="input 'input_1' is float64.*\\.float\\(\\)"):
        graphopt.compile(g, "llvm", output=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_non_tensor_outputs_are_left_out_with_a_warning(tmp_path, caplog):
    """A model returning None or a number among its outputs failed to trace (KeyError: None)."""
    class M(torch.nn.Module):
        def forward(self, x):
            return x * 2, 3, (None, x.sum())
    with caplog.at_level(logging.WARNING):
        g = graphopt.trace(M(), (torch.arange(4.0),))
    assert "#1 (3), #2 (None)" in caplog.text
    got = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "a"))(np.arange(4.0, dtype=np.float32))
    assert len(got) == 2 and got[0].tolist() == [0, 2, 4, 6] and float(got[1]) == 6.0


class _Autocast(torch.nn.Module):
    """A float32 model with a bfloat16 autocast region in forward (mixed-precision inference code)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.b(torch.relu(self.a(x)))
        return y.float() * 2


def test_autocast_region_traces_and_computes_in_float32(tmp_path):
    """`with torch.autocast(...)` in forward exported as a wrapper op around a submodule, and trace failed with
    "'Module' object has no attribute 'submod_1'"; traced inline, its linears ran in bfloat16 and TVM refused the
    float32 / bfloat16 bias add. Now it compiles as a half model: float32 compute, so within 1e-6 of the model
    without autocast and within bfloat16's rounding of PyTorch's autocast run. A .pt2 archive of it loads too."""
    torch.manual_seed(0)
    m, x = _Autocast().eval(), torch.randn(4, 16)
    art = graphopt.load(graphopt.compile(graphopt.trace(m, (x,)), "llvm", output=tmp_path / "a"))
    got, = art(x.numpy())
    with torch.no_grad():
        ref = m(x)
        plain = m.b(torch.relu(m.a(x))) * 2
    np.testing.assert_allclose(got, plain.numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(got - ref.numpy()).max() <= 4 * torch.finfo(torch.bfloat16).eps * float(ref.abs().max())
    torch.export.save(torch.export.export(m, (x,)), tmp_path / "m.pt2")  # the same model as a .pt2 archive
    np.testing.assert_array_equal(graphopt.load_model(str(tmp_path / "m.pt2")).run(x)[0].numpy(), ref.numpy())
