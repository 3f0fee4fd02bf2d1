"""graphopt's hand-written CPU kernels: the packed-weight GEMM for dense linear layers (with its row tail), the
vectorizable erf GELU, and the BSR/CSR sparse kernels: numerics against PyTorch, the kernel really in the module,
and the emitted assembly (register-resident FMA accumulation, no stores inside the reduction loop)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.ir.sparse_ops import to_bsr
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu.gemm import gemm_packed, pack_weight
from graphopt.targets.tvm.cpu.sparse import bsr_matmul_rows, bsr_matmul_t
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax


def _assert_built_matches(g, model, x):
    """Build `g` for the CPU, run it, and compare with the PyTorch model within 1e-5 of the output's range."""
    from tvm import relax
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


def _func_names(g):
    return {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}


@pytest.mark.parametrize("rows,width", [(12, 32), (13, 32), (128, 32), (20, 27)])  # row tails; 27: padded panels
def test_linear_uses_packed_gemm_and_matches_torch(rows, width):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, width), torch.nn.GELU(), torch.nn.Linear(width, 16)).eval()
    x = torch.randn(1, rows, 48)
    g = graphopt.trace(model, (x,))
    names = _func_names(g)
    assert any(n.startswith("gemm_packed") for n in names), names
    _assert_built_matches(g, model, x)


@pytest.mark.parametrize("cout,cin,hw,act", [(96, 16, 12, torch.nn.ReLU6()), (13, 8, 7, torch.nn.ReLU()),
                                             (32, 24, 4, torch.nn.Identity())])
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
                                               (12, 9, 5, 2, torch.nn.ReLU()), (4, 40, 5, 1, torch.nn.Identity())])
def test_depthwise_conv_kernel_handles_padding_in_the_kernel(c, hw, k, stride, act):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(c, c, k, stride, k // 2, groups=c), act).eval()
    x = torch.randn(1, c, hw, hw)
    g = graphopt.trace(model, (x,))
    mod = lower_to_relax(g)
    names = {gv.name_hint for gv in mod.get_global_vars()}
    assert any(n.startswith("depthwise_") for n in names), names
    assert "R.nn.pad" not in mod.script()  # borders are guarded inside the kernel, no padded copy
    _assert_built_matches(g, model, x)


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


@pytest.mark.parametrize("cout,cin,hw,k,stride,pad", [(32, 3, 20, 3, 2, (1, 1, 1, 1)), (13, 2, 11, 3, 1, (0, 1, 0, 1)),
                                                      (8, 4, 9, 5, 2, (2, 2, 2, 2))])
def test_stem_conv_direct_kernel(cout, cin, hw, k, stride, pad):
    torch.manual_seed(0)

    class Stem(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, k, stride)

        def forward(self, x):
            return torch.clamp(self.conv(torch.nn.functional.pad(x, pad)), 0.0, 6.0)

    model, x = Stem().eval(), torch.randn(1, cin, hw, hw)
    g = graphopt.trace(model, (x,))
    text = lower_to_relax(g).script()
    assert "conv_direct_" in text and "R.nn.pad" not in text and "R.clip" not in text
    _assert_built_matches(g, model, x)


def test_batch1_linear_keeps_the_gemv_rule():
    g = graphopt.trace(torch.nn.Linear(64, 32).eval(), (torch.randn(1, 64),))
    assert not any(n.startswith("gemm_packed") for n in _func_names(g))


def _asm(func):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=cpu_target())
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


def test_bsr_kernel_assembly_accumulates_in_registers():
    loop = _inner_fma_loop(_asm(bsr_matmul_t(32, 64, 64, 4, 4, 10)))
    assert re.findall(r"vfmadd\d+ps", loop)
    assert not re.search(r"vmov(?:u|a)ps\s+%(?:ymm|zmm)\d+, ", loop)
    assert "call" not in loop  # no workspace allocation (or any call) inside the reduction


@pytest.mark.parametrize("m,block", [(32, (4, 4)), (16, (1, 1)), (64, (1, 1)), (64, (2, 8)), (2, (1, 16)), (1, (8, 1)),
                                     (12, (4, 4))])
def test_bsr_kernels_match_dense(m, block):
    torch.manual_seed(1)
    n, k = 64, 128
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


def test_pack_weight_layout():
    w = np.arange(32 * 8, dtype=np.float32).reshape(32, 8)
    p = pack_weight(w, 16)
    assert p.shape == (2, 8, 16) and p[1, 3, 5] == w[16 + 5, 3]


def test_int8_pointwise_kernel_is_exact_and_uses_vpmaddwd():
    from graphopt.targets.tvm.cpu.int8 import MR, int8_kernels_available, pack_pairs, qconv1x1_source
    if not int8_kernels_available(cpu_target()):
        pytest.skip("needs AVX2")
    rng = np.random.default_rng(0)
    cout, cin, p = 13, 64, 24  # enough channels that the reduction stays a loop
    mt, cin2 = -(-cout // MR), cin
    x = rng.integers(-128, 128, (cin, p)).astype(np.int16)
    w = rng.integers(-127, 128, (cout, cin)).astype(np.int8)
    from tvm.script import tirx as T
    f = tvm.script.parse(qconv1x1_source(mt, cin2 // 2, p), extra_vars={"T": T})
    loop = _inner_fma_loop(_asm(f), r"vpmaddwd")
    assert len(re.findall(r"vpmaddwd", loop)) >= MR  # one per output row of the tile, in the reduction loop
    assert not re.search(r"vmovdq[au]\s+%ymm\d+, ", loop)  # accumulators stay in registers
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    x2 = np.ascontiguousarray(x.reshape(cin // 2, 2, p).transpose(0, 2, 1)).reshape(-1)
    out = tvm.runtime.tensor(np.zeros(mt * MR * p, np.int32))
    lib["main"](tvm.runtime.tensor(x2), tvm.runtime.tensor(pack_pairs(w, mt, cin2)), out)
    got = out.numpy().reshape(mt * MR, p)[:cout]
    assert np.array_equal(got, w.astype(np.int64) @ x.astype(np.int64))


def test_quantized_mobilenet_block_lowers_to_int8_and_float_kernels():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 24, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 24, 3, padding=1, groups=24), torch.nn.ReLU6(),
                                torch.nn.Conv2d(24, 16, 1)).eval()
    x = torch.rand(1, 8, 14, 14)
    g = graphopt.trace(model, (x,))
    q = graphopt.optimize(g, "quantize,fold-qdq", data=[(torch.rand(1, 8, 14, 14),) for _ in range(4)])
    names = _func_names(q)
    assert any(n.startswith("qconv1x1_") for n in names) and any(n.startswith("depthwise_") for n in names)
    from tvm import relax
    ex, *_ = build_executable(q)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    ref = q.run(x)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max() + 1e-5  # the reference integer ops, to rounding
