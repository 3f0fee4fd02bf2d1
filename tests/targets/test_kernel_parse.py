"""graphopt builds its kernels' TVMScript with its own direct builder (`parse.build_direct`, ~10x faster than TVM's
parser) and leaves to TVM's parser only the constructs that builder does not take. The direct builder must make
exactly the PrimFunc TVM's parser makes: checked here on every kernel a set of small models makes (convs, depthwise,
pointwise, pools, linears, norms, attention, int8 (AVX2, and AVX-512 / AMX cross-compiled), BSR / CSR with a symbolic
block count)."""
from __future__ import annotations

import pytest
import torch
import tvm
from torch import nn
from tvm.script import tirx as T

import graphopt
from graphopt.targets.tvm.cpu import parse


def _tvm_parse(source: str):
    return tvm.script.parse(source, extra_vars={"T": parse._script_namespace(T)})


@pytest.fixture
def kernel_sources(monkeypatch):
    """Every kernel source the direct builder is asked to build while the test runs (none from the caches)."""
    seen: list[str] = []
    real = parse.build_direct

    def spy(source, namespace):
        seen.append(source)
        return real(source, namespace)

    monkeypatch.setattr(parse, "build_direct", spy)
    monkeypatch.setenv("GRAPHOPT_KERNEL_CACHE", "off")
    parse.parse_kernel.cache_clear()
    yield seen
    parse.parse_kernel.cache_clear()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32))
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        y = self.pw(self.dw(self.stem(x)))
        y = torch.relu(self.conv(y)) + y
        y = nn.functional.max_pool2d(y, 2)
        return torch.softmax(self.head(y.mean((2, 3))), -1)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True, activation="gelu")

    def forward(self, x):
        return self.layer(x)


class _Costs:
    """fc1 cheapest as 4x4 blocks, fc2 as CSR: both float sparse kernels (their block count symbolic) get built."""

    def measure(self, op, shape, layout, weight):
        best = "bsr4x4" if shape[-1] == 64 else "csr"
        return 0.1 if layout == best else 1.0


def test_direct_builder_makes_the_kernels_tvms_parser_makes(tmp_path, kernel_sources):
    torch.manual_seed(0)
    cnn = _Block().eval()
    x = torch.randn(1, 3, 32, 32)
    g = graphopt.optimize(graphopt.trace(cnn, (x,)), "fold-bn")
    graphopt.compile(g, "llvm", output=tmp_path / "cnn")
    q = graphopt.optimize(g, "quantize{weights=int8},fold-qdq", data=[(torch.randn(1, 3, 32, 32),) for _ in range(4)])
    graphopt.compile(q, "llvm", output=tmp_path / "int8")
    graphopt.compile(q, "llvm", output=tmp_path / "amx", cpu="sapphirerapids")  # AVX-512, VNNI and AMX kernels
    enc = _Encoder().eval()
    graphopt.compile(graphopt.trace(enc, (torch.randn(1, 24, 64),)), "llvm", output=tmp_path / "enc")
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    s = graphopt.optimize(graphopt.trace(mlp, (torch.randn(16, 64),)),
                          "sparsify{sparsity=0.9 block=4x4},select-sparse-layout{candidates=dense,csr,bsr4x4}",
                          target=_Costs())
    graphopt.compile(s, "llvm", output=tmp_path / "sparse")
    ql = graphopt.optimize(graphopt.trace(mlp, (torch.randn(64, 64),)), "quantize{weights=int8},fold-qdq",
                           data=[(torch.randn(64, 64),) for _ in range(2)])
    graphopt.compile(ql, "llvm", output=tmp_path / "amx-gemm", cpu="sapphirerapids")  # AMX tiles' int8 GEMM

    sources = list(dict.fromkeys(kernel_sources))
    assert len(sources) >= 15
    assert any('"nnz"' in src for src in sources)  # the sparse kernels' symbolic block count
    assert any('"int8"' in src or '"uint8"' in src for src in sources)
    assert any("\n    assert " in src for src in sources)  # the AMX kernels' tile-state check
    built = 0
    for src in sources:
        try:
            direct = parse.build_direct(src, parse._script_namespace(T))
        except parse.Unsupported:
            continue
        tvm.ir.assert_structural_equal(direct, _tvm_parse(src))
        built += 1
    assert built >= len(sources) - 2


_WHILE = """
@T.prim_func(private=True)
def halve(x: T.Buffer((1,), "int32"), out: T.Buffer((1,), "int32")):
    T.func_attr({"tirx.noalias": True})
    n = T.decl_buffer((1,), "int32", scope="global")
    n[0] = x[0]
    while n[0] > 1:
        n[0] = n[0] // 2
    out[0] = n[0]
"""


def test_constructs_the_direct_builder_does_not_take_go_to_tvms_parser(kernel_sources):
    with pytest.raises(parse.Unsupported, match="While statement on line 7"):
        parse.build_direct(_WHILE, parse._script_namespace(T))
    kernel_sources.clear()
    tvm.ir.assert_structural_equal(parse.parse_kernel(_WHILE), _tvm_parse(_WHILE))
    assert kernel_sources == [_WHILE]  # tried directly first


def test_tvms_parser_alone_on_request(kernel_sources, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_KERNEL_PARSER", "tvm")
    src = _WHILE.replace("    while n[0] > 1:\n        n[0] = n[0] // 2\n", "")
    assert parse.parse_kernel(src) is not None
    assert kernel_sources == []


def test_a_faulty_kernel_source_gets_tvms_diagnostic_naming_its_line(kernel_sources):
    """Where the direct builder fails on a source (here a call with an argument missing), TVM's parser takes it and
    its error points at the line, as before the direct builder."""
    bad = _WHILE.replace("    while n[0] > 1:\n        n[0] = n[0] // 2\n", "    n[T.ramp(0, 1)] = x[0]\n")
    with pytest.raises(Exception, match=r"(?s)missing 1 required positional argument.*<str>:7") as err:
        parse.parse_kernel(bad)
    assert type(err.value).__name__ == "DiagnosticError"
    assert kernel_sources == [bad]  # tried directly first
