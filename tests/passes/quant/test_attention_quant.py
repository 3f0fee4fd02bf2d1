"""Activation x activation int8 matmuls: attention is rewritten into explicit matmuls exactly, both matmuls get
per-tensor int8 operands, fold-qdq turns them into graphopt::qmatmul (exact int32 accumulation), and the TVM artifact
and the ONNX QDQ export agree with the graph."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

import graphopt
from graphopt.bench import fidelity


class Attention(torch.nn.Module):
    def __init__(self, d=32, heads=4, mask="none", causal=False, scale=None):
        super().__init__()
        self.qkv, self.out, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads
        self.mask, self.causal, self.scale = mask, causal, scale

    def forward(self, x, keep):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(x).chunk(3, -1))
        mask = None
        if self.mask == "bool":
            mask = keep[:, None, None, :] > 0
        elif self.mask == "float":
            mask = (1.0 - keep[:, None, None, :]) * -1e4
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def _inputs(seed, b=2, t=16, d=32):
    torch.manual_seed(seed)
    keep = torch.ones(b, t)
    keep[1, 11:] = 0  # the second sequence is padded
    return torch.randn(b, t, d), keep


@pytest.mark.parametrize("mask,causal,scale", [("none", False, None), ("bool", False, None), ("float", False, 0.3),
                                               ("none", True, None)])
def test_attention_becomes_explicit_matmuls_exactly(mask, causal, scale):
    from graphopt.passes.quant.attention import decompose_attention
    torch.manual_seed(0)
    model = Attention(mask=mask, causal=causal, scale=scale).eval()
    x = _inputs(1)
    g = graphopt.trace(model, x)
    h = g.clone()
    matmuls, kept = decompose_attention(h)
    assert len(matmuls) == 2 and not kept
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in h.gm.graph.nodes)
    torch.testing.assert_close(h.run(*x)[0], g.run(*x)[0], rtol=1e-5, atol=1e-5)


def test_attention_matmuls_are_int8_end_to_end(tmp_path):
    import onnxruntime as ort
    torch.manual_seed(0)
    model = Attention(mask="bool").eval()
    g = graphopt.trace(model, _inputs(1))
    data = [_inputs(s) for s in range(2, 8)]
    evals = [_inputs(s) for s in range(20, 24)]
    q = graphopt.optimize(g, "quantize{matmul=true}", data=data)  # (auto: false on AVX2 hosts)
    st = q.meta["history"][-1]["stats"]
    assert st["matmuls_quantized"] == 2 and st["activations_quantized"] == 6  # x, attention out, q, k^T, p, v
    f = graphopt.optimize(q, "fold-qdq", verify=True, data=data[:2])
    assert f.meta["history"][-1]["verify"]["step"]["sqnr_db"] > 40  # integer matmuls equal the Q/DQ graph
    targets = [str(n.target) for n in f.graph.nodes if n.op == "call_function"]
    assert targets.count("graphopt.qmatmul.default") == 2 and targets.count("graphopt.qlinear.default") == 2
    assert g.stats().macs == q.stats().macs == f.stats().macs  # SDPA, its matmuls and qmatmul count the same work
    ref = [g.run(*b)[0].numpy() for b in evals]
    got = [f.run(*b)[0].numpy() for b in evals]
    assert fidelity(ref, got).cosine > 0.995  # stated tolerance for int8 attention on this block
    no_mm = graphopt.optimize(g, "quantize{matmul=false}", data=data)
    assert no_mm.meta["history"][-1]["stats"]["matmuls_quantized"] == 0
    art = graphopt.load(graphopt.compile(f, "llvm", output=tmp_path / "tvm"))
    for b, want in zip(evals, got):
        out = art(*[t.numpy() for t in b])[0]
        assert np.abs(out - want).max() <= 0.02 * np.abs(want).max()  # a rounding tie may land one step away
    # ONNX Runtime's fused int8 kernels on a CPU without VNNI add u8 x s8 pairs in int16 (AVX2's vpmaddubsw),
    # which saturates on full-range operands (up to 18% off here): there the export is held to ORT's unfused
    # ops (its Q/DQ semantics), with VNNI to the fused kernels as well
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.host import cpu_target
    levels = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL]
    if int8_dot(cpu_target()) == "vnni":
        levels.append(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    for label, graph in (("qdq", q), ("folded", f)):  # integer ops go out in QDQ form too
        onnx_dir = graphopt.compile(graph, "onnx", output=tmp_path / label)
        for level in levels:
            so = ort.SessionOptions()
            so.graph_optimization_level = level
            sess = ort.InferenceSession(str(onnx_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
            names = [i.name for i in sess.get_inputs()]
            for b in evals:
                want = graph.run(*b)[0].numpy()
                out = sess.run(None, dict(zip(names, [t.numpy() for t in b])))[0]
                assert np.abs(out - want).max() <= 0.02 * np.abs(want).max(), (label, level)


def test_attention_qmatmuls_take_the_int8_kernel_where_the_cpu_has_vnni(monkeypatch):
    """Lowered for a VNNI CPU, the score matmul (16 x 8 @ 8 x 16 per head) runs graphopt's int8 activation matmul
    (`qbmm`, quad products, zero points off in int32); the output matmul (8 columns, under the kernel's 16) and
    every qmatmul for an AVX2 CPU keep the generic exact path. With the exact quad product (runs on any CPU) the
    built artifact equals the folded graph to float rounding."""
    from graphopt.targets.tvm.cpu import int8
    from graphopt.targets.tvm.host import cpu_target
    from graphopt.targets.tvm.lower import lower_to_relax
    torch.manual_seed(0)
    g = graphopt.trace(Attention(mask="bool").eval(), _inputs(1))
    f = graphopt.optimize(g, "quantize{matmul=true},fold-qdq", data=[_inputs(s) for s in range(2, 8)])
    names = lambda cpu: [gv.name_hint for gv in  # noqa: E731
                         lower_to_relax(f, target=cpu_target(cpu) if cpu else None).get_global_vars()]
    assert len([n for n in names("sapphirerapids") if n.startswith("qbmm_vnni_")]) == 1
    assert not [n for n in names("znver3") if n.startswith("qbmm_")]
    monkeypatch.setattr(int8, "int8_dot", lambda target: "exact")
    assert len([n for n in names(None) if n.startswith("qbmm_exact_")]) == 1
    from tvm import relax

    from graphopt.targets.tvm.build import build_executable
    vm = relax.VirtualMachine(build_executable(f)[0], tvm.cpu())
    for b in [_inputs(s) for s in (20, 21)]:
        want = f.run(*b)[0].numpy()
        got = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in b])[0].numpy()
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # a rounding tie may land one step away


def test_int8_attention_softmax_runs_one_kernel_with_its_mask_and_quantize():
    """The int8 attention's scores scaled, masked (a padding mask), softmaxed and quantized for the P V matmul run
    one row kernel (`softmax_masked_q`): no where, softmax or quantize function of their own, one mask conversion
    for the layer; the build matches the folded graph within 2% of the output's range (a rounding tie may land
    one step away)."""
    from tvm import relax

    from graphopt.targets.tvm.build import build_executable
    from graphopt.targets.tvm.lower import lower_to_relax
    torch.manual_seed(0)
    g = graphopt.trace(Attention(mask="bool").eval(), _inputs(1))
    f = graphopt.optimize(g, "quantize{matmul=true},fold-qdq", data=[_inputs(s) for s in range(2, 8)])
    mod = relax.transform.DeadCodeElimination()(lower_to_relax(f))
    names = [gv.name_hint for gv in mod.get_global_vars()]
    assert [n for n in names if n.startswith("softmax_masked_q")] and not [n for n in names if "softmax_rows" in n]
    assert mod.script().count("R.where") == 1, names
    vm = relax.VirtualMachine(build_executable(f)[0], tvm.cpu())
    for b in [_inputs(s) for s in (20, 21)]:
        want = f.run(*b)[0].numpy()
        got = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in b])[0].numpy()
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


@pytest.mark.parametrize("k", [40, 300])
def test_generic_qmatmul_path_is_exact(k):
    """A qmatmul the int8 kernel does not take (8 columns) lowers to a Relax matmul of the centered codes: in float32
    while every partial sum is an integer it holds (K * 255^2 < 2^24: K = 40), else in int32 (K = 300); either way
    equal to graphopt::qmatmul's float64 reference to float32 rounding, with both zero points at the range's edge."""
    from graphopt.targets.tvm.lower import lower_to_relax

    class QM(torch.nn.Module):
        def forward(self, a, b):
            return torch.ops.graphopt.qmatmul(a, 0.02, -128, b, 0.03, 127)

    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(-128, 128, (2, 8, k)).astype(np.int8))
    b = torch.from_numpy(rng.integers(-128, 128, (2, k, 8)).astype(np.int8))
    a[0, 0] = 127
    b[0, :, 0] = -128
    g = graphopt.trace(QM(), (a, b))
    mod = lower_to_relax(g)
    assert not [gv.name_hint for gv in mod.get_global_vars() if gv.name_hint.startswith("qbmm_")]
    from tvm import relax

    from graphopt.targets.tvm.build import build_executable
    vm = relax.VirtualMachine(build_executable(g)[0], tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(a.numpy()), tvm.runtime.tensor(b.numpy()))[0].numpy()
    want = torch.ops.graphopt.qmatmul(a, 0.02, -128, b, 0.03, 127).numpy()
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


class _DecodeStep(torch.nn.Module):
    """One decoder step: the new token's key and value written into a static cache at `pos` (index_copy), then
    attention over the positions up to it."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.q, self.k, self.v, self.heads = (torch.nn.Linear(d, d), torch.nn.Linear(d, d), torch.nn.Linear(d, d),
                                              heads)

    def forward(self, x, kc, vc, pos):
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        kc, vc = kc.index_copy(2, pos, k), vc.index_copy(2, pos, v)
        keep = torch.arange(kc.shape[2])[None, :] <= pos[:, None]
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=keep).transpose(1, 2).reshape(b, t, d)


@pytest.mark.parametrize("calibrator,full", [("minmax", True), ("entropy", False)])
def test_softmax_outputs_are_quantized_over_their_whole_range(calibrator, full):
    """Calibrated on a decoder's later steps (attention spread over 4+ keys: probabilities up to ~0.5), min-max's
    grid for the softmax clipped the first step's probability of 1.0 (output 0.93 off; 0.006 on the calibrated
    steps). A softmax / sigmoid / tanh output is now quantized over the op's whole range by the minmax calibrator;
    the clipping calibrators keep their choice."""
    torch.manual_seed(0)
    m = _DecodeStep().eval()
    x, kc, vc = torch.randn(1, 1, 16), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    g = graphopt.trace(m, (x, kc, vc, torch.tensor([3])))
    q = graphopt.optimize(g, f"quantize{{calibrator={calibrator} matmul=true}}",
                          data=[(x, kc, vc, torch.tensor([p])) for p in (3, 4, 5, 6, 7)])
    assert q.meta["history"][-1]["stats"]["bounded_activations_at_full_range"] == (1 if full else 0)
    with torch.no_grad():
        err = [float((q.run(x, kc, vc, torch.tensor([p]))[0] - m(x, kc, vc, torch.tensor([p]))).abs().max())
               for p in (0, 3)]
    # minmax: 0.012 at the first step, 0.011 at a calibrated one; entropy: 0.94 and 0.008
    assert (err[0] < 2 * err[1]) == full, err


class _Product:
    """A target that answers only which instruction its int8 kernels multiply with."""

    def __init__(self, product):
        self.product = product

    def int8_product(self):
        return self.product

    def measure(self, *args, **kwargs):
        raise AssertionError("quantize measures nothing")


def test_matmul_auto_keeps_attention_float_where_int8_multiplies_with_vpmaddubsw():
    """matmul=auto: on a target whose int8 kernels are AVX2's vpmaddubsw (no VNNI) the attention stays the fused
    float kernel (MiniLM int8 14.5 against 15.8 ms on a Zen 3 with its matmuls int8), and the stats say why; with
    VNNI, on ONNX Runtime or with no target the matmuls are int8; matmul=true / false decide whatever the target."""
    torch.manual_seed(0)
    g = graphopt.trace(Attention(mask="bool").eval(), _inputs(1))
    data = [_inputs(s) for s in range(2, 6)]

    def stats(pipeline, product):
        target = _Product(product) if product != "none" else None
        return graphopt.optimize(g, pipeline, data=data, target=target).meta["history"][-1]["stats"]
    avx2 = stats("quantize", "ubsw")
    assert avx2["matmuls_quantized"] == 0 and "vpmaddubsw" in avx2["matmul_auto"], avx2
    for product in ("vnni", "onnxruntime", "none"):
        st = stats("quantize", product)
        assert st["matmuls_quantized"] == 2 and "matmul_auto" not in st, (product, st)
    assert stats("quantize{matmul=true}", "ubsw")["matmuls_quantized"] == 2
    assert stats("quantize{matmul=false}", "vnni")["matmuls_quantized"] == 0
