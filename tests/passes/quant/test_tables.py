"""Activation functions between int8 layers as 256-entry tables (quantize{tables}, fold-qdq's lookup_tables,
graphopt.lut): which chains become tables, exactness against the Q/DQ chain they replace, outputs within a
stated tolerance of fp32, the CPU kernel (byte permutes with AVX512-VBMI) against numpy, and the exports."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt

go = torch.ops.graphopt


class Net(nn.Module):
    """SiLU (YOLO / EfficientNet), tanh GELU, a squeeze-excite that reads a SiLU's result in float too, a ReLU
    (fused into the conv's store, never a table) and a sigmoid-only head."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 24, 1), nn.Conv2d(24, 24, 3, 1, 1)
        self.se, self.c4, self.fc = nn.Linear(24, 24), nn.Conv2d(24, 16, 1), nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        y = F.silu(self.c1(x))
        y = F.gelu(self.c2(y), approximate="tanh")
        y = F.silu(self.c3(y))
        y = y * torch.sigmoid(self.se(y.mean((2, 3))))[:, :, None, None]
        y = torch.relu(self.c4(y))
        return torch.sigmoid(self.fc(y.flatten(1)))


def _quantized(tables: str = "auto"):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(1, 3, 16, 16)
    g = graphopt.trace(model, (x,))
    data = [(torch.randn(1, 3, 16, 16),) for _ in range(6)]
    return model, x, graphopt.optimize(g, f"quantize{{tables={tables}}}", data=data)


def _count(g, target) -> int:
    return sum(1 for n in g.graph.nodes if n.target is target)


def test_functions_after_int8_layers_become_exact_tables():
    """The functions of a quantized layer's output alone get grids on both ends and become tables (tables=true):
    SiLU, GELU,
    the SiLU whose result the squeeze-excite pools and scales in float, the SE's sigmoid; the ReLU stays for the
    conv's store and the head's sigmoid, the model's output, stays float. The tables equal the Q/DQ chains they
    replace code for code, so the graph's outputs are bit-identical before and after; the whole int8 graph stays
    within 5% of fp32's output range. `tables=auto` leaves the functions after linears (the SE's sigmoid here, a
    transformer's GELU) in float."""
    from graphopt.passes.quant.fold_qdq import lookup_tables
    assert _quantized()[2].meta["history"][-1]["stats"]["functions_on_tables"] == 3
    model, x, q = _quantized("true")
    stats = q.meta["history"][-1]["stats"]
    assert stats["functions_on_tables"] == 4, stats
    before = q.run(x)[0]
    g = q.clone()
    made = lookup_tables(g)
    assert len(made) == 4 and _count(g, go.lut.default) == 4
    assert _count(g, torch.ops.aten.silu.default) == 0 and _count(g, torch.ops.aten.gelu.default) == 0
    assert _count(g, torch.ops.aten.relu.default) == 1 and _count(g, torch.ops.aten.sigmoid.default) == 1
    assert torch.equal(g.run(x)[0], before)
    folded = graphopt.optimize(q, "fold-qdq")
    assert folded.meta["history"][-1]["stats"]["lookup_tables"] == 4
    ref = model(x)
    for out in (before, folded.run(x)[0]):
        assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_tables_false_keeps_the_functions_in_float():
    _, x, q = _quantized("false")
    assert q.meta["history"][-1]["stats"]["functions_on_tables"] == 0
    assert _count(graphopt.optimize(q, "fold-qdq"), go.lut.default) == 0


def test_a_chain_that_only_clamps_or_reads_a_second_activation_is_no_table():
    """ReLU6 after a conv is the conv's clamp (no table); of relu6(a) * tanh(b) only tanh(b) is a function of one
    code (the product of two layers' outputs is not)."""
    from graphopt.passes.quant.tables import forward_chain

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.c(F.relu6(self.a(x)) * torch.tanh(self.b(x)))

    g = graphopt.trace(M().eval(), (torch.randn(1, 3, 8, 8),))
    convs = [n for n in g.graph.nodes if n.target is torch.ops.aten.conv2d.default]
    assert forward_chain(g, convs[0]) is None
    chain, end = forward_chain(g, convs[1])  # (tanh alone: the product is no function of its code)
    assert end.target is torch.ops.aten.tanh.default and chain == {end}
    q = graphopt.optimize(g, "quantize,fold-qdq", data=[(torch.randn(1, 3, 8, 8),) for _ in range(3)])
    assert _count(q, go.lut.default) == 1


@pytest.mark.parametrize("n", [37, 64, 1000, 70_001])
def test_lut_kernel_matches_numpy(n):
    """The CPU kernel over n codes: a byte loop under 64, else 64-code byte permutes (the last block overlapping
    the one before), parallel groups; every code's entry, the extremes included. With AVX512-VBMI the library
    holds vpermi2b / vpermt2b."""
    import tvm

    from graphopt.targets.tvm.cpu.lut import lut_source, lut_vbmi
    from graphopt.targets.tvm.cpu.parse import parse_kernel
    from graphopt.targets.tvm.host import cpu_target
    target = cpu_target()
    vbmi = lut_vbmi(target)
    func = parse_kernel(lut_source(n, vbmi)).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=target)
    rng = np.random.default_rng(n)
    x = rng.integers(-128, 128, n).astype(np.int8)
    x[:2], x[-2:] = [-128, 127], [127, -128]
    table = rng.integers(-128, 128, 256).astype(np.int8)
    y = tvm.runtime.tensor(np.zeros(n, np.int8))
    lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(table), y)
    np.testing.assert_array_equal(y.numpy(), table[x.astype(np.int32) + 128])
    if vbmi and n >= 64:
        assert "vperm" in lib.mod.inspect_source("asm") and "2b" in lib.mod.inspect_source("asm")


def test_table_models_compile_and_export(tmp_path):
    """The int8 graph with tables lowers its tables to graphopt's kernel and runs within a few output steps of the
    graph; exported to ONNX (a Gather of the table) on ONNX Runtime and to a .pt2 on PyTorch, likewise."""
    from graphopt.targets.tvm.lower import lower_to_relax
    _, x, q = _quantized()
    folded = graphopt.optimize(q, "fold-qdq")
    names = {gv.name_hint for gv in lower_to_relax(folded).get_global_vars()}
    assert sum(1 for name in names if name.startswith("lut_")) >= 2, names  # (one per distinct size)
    ref = folded.run(x)[0].numpy()
    for target in ("llvm", "onnx", "pt2"):
        out = graphopt.compile(folded, target, output=tmp_path / target)
        got = graphopt.load(out)(x.numpy())[0]
        np.testing.assert_allclose(got, ref, atol=0.02, err_msg=target)  # (sigmoid outputs: 2% of the range)


def test_an_onnx_runtime_qdq_files_activation_becomes_a_table(tmp_path):
    """ONNX Runtime's quantize_static (QDQ) writes DequantizeLinear -> Sigmoid -> QuantizeLinear between two convs:
    fold-qdq makes it a table too, with the graph's outputs unchanged."""
    import contextlib
    import io
    import warnings

    from graphopt.bench import ort_quantize_static

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.b(torch.sigmoid(self.a(x)))
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(M().eval(), (torch.randn(1, 3, 8, 8),), str(tmp_path / "m.onnx"), input_names=["x"],
                          dynamo=False)
    feeds = [{"x": torch.randn(1, 3, 8, 8).numpy()} for _ in range(4)]
    g = graphopt.load_onnx(ort_quantize_static(tmp_path / "m.onnx", tmp_path / "q.onnx", feeds))
    folded = graphopt.optimize(g, "fold-qdq")
    assert folded.meta["history"][-1]["stats"]["lookup_tables"] == 1 and _count(folded, go.lut.default) == 1
    assert _count(folded, torch.ops.aten.sigmoid.default) == 0
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(folded.run(x)[0], g.run(x)[0], rtol=0, atol=1e-6)
