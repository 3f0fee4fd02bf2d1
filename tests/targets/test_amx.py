"""The AMX int8 GEMM (`targets/tvm/cpu/amx.py`): its assembly (cross-compiled, on any host), which linears the
lowering gives it, and -- where this machine's OS grants AMX tiles -- its results, exact in int32."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.targets.tvm.cpu import amx
from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants, pack_gemm_quads
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax
from graphopt.targets.tvm.cpu.parse import parse_kernel

AMX_CPU = "sapphirerapids"  # an AMX CPU to cross-compile for
needs_amx = pytest.mark.skipif(not amx.amx_usable(cpu_target()), reason="this machine's OS grants no AMX tiles")


def _kernel(m: int, k: int, n: int, float_bias: bool = False, cpu: str | None = None):
    f = parse_kernel(amx.qgemm_amx_source(m, k, n, float_bias, cores=2))
    return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(cpu))


def _names(g, cpu: str | None = None) -> set[str]:
    return {gv.name_hint for gv in lower_to_relax(g, target=cpu_target(cpu) if cpu else None).get_global_vars()}


def _quantized_linear(rows: int, k: int, n: int, seed: int = 0):
    torch.manual_seed(seed)
    layer = torch.nn.Linear(k, n).eval()
    x = torch.randn(rows, k)
    q = graphopt.optimize(graphopt.trace(layer, (x,)), "quantize,fold-qdq", data=[(x,)])
    return layer, x, q


def test_amx_kernel_assembly():
    """Built for an AMX CPU: per 64-byte reduction step four tile loads and four `tdpbssd` (a 32 x 32 block in
    four accumulator tiles), the tiles configured once per thread and released; no VNNI products, and the OS's
    permission asked before any tile instruction."""
    asm = _kernel(64, 256, 96, cpu=AMX_CPU).mod.inspect_source("asm")
    dots = re.findall(r"^\s+tdpbssd\s+(%tmm\d), (%tmm\d), (%tmm\d)", asm, re.M)
    assert dots and len(dots) % 4 == 0  # (LLVM may unroll the 4 steps of K = 256)
    assert {d[2] for d in dots} == {"%tmm0", "%tmm1", "%tmm2", "%tmm3"}  # (AT&T: the accumulator last)
    assert len(re.findall(r"^\s+tileloadd\s", asm, re.M)) == len(dots)
    for op in ("ldtilecfg", "tilerelease", "tilezero", "tilestored"):
        assert re.search(rf"^\s+{op}\s", asm, re.M), op
    assert "vpdpbusd" not in asm
    assert re.search(r"call.*syscall", asm) and asm.index("syscall") < asm.index("ldtilecfg")


def test_amx_kernel_rejects_shapes_it_cannot_tile():
    for m, k, n in ((16, 64, 32), (32, 48, 32), (32, 64, 48)):
        with pytest.raises(ValueError, match="qgemm_amx needs"):
            amx.qgemm_amx_source(m, k, n)


def test_tile_config_bytes():
    """ldtilecfg's layout: palette byte 1, 16-bit bytes-per-row of tiles 0-7 at offset 16, rows at 48."""
    cfg = amx.tile_config()
    assert cfg.shape == (64,) and cfg[0] == 1 and cfg[1] == 0
    assert list(cfg[16:32].view(np.uint16)[:8]) == [64] * 8 and not cfg[32:48].any()
    assert list(cfg[48:56]) == [16] * 8 and not cfg[56:].any()


@pytest.mark.parametrize("rows,expect", [(40, "amx"), (16, "amx"), (12, "vnni"), (1, "gemv")])
def test_lowering_puts_linears_of_16_rows_or_more_on_amx(rows, expect, monkeypatch):
    """Cross-compiled for an AMX CPU, a quantized linear of 16 rows or more runs the AMX GEMM (N and K padded to
    its 32-column blocks and 64-byte steps); fewer rows keep the VNNI kernels; GRAPHOPT_AMX=0 and a CPU without
    AMX never take it."""
    _, _, q = _quantized_linear(rows, 100, 40)
    names = _names(q, AMX_CPU)
    amx_names = {nm for nm in names if nm.startswith(amx.KERNEL_PREFIX)}
    if expect == "amx":
        assert amx_names == {f"{amx.KERNEL_PREFIX}_{max(rows, 32)}x128x64"}, names
    else:
        assert not amx_names and any(nm.startswith("qgemm_vnni" if expect == "vnni" else "qgemv") for nm in names)
    assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(q, "znver4"))
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(q, AMX_CPU))


@needs_amx
@pytest.mark.parametrize("m,k,n,float_bias", [(32, 64, 32, False), (45, 192, 96, False), (128, 384, 64, True)])
def test_amx_kernel_is_exact(m, k, n, float_bias):
    """(a @ W^T - offset) * multiplier (+ float bias) equals the int64 product's; 45 rows overlap the last
    32-row block with the one before it."""
    rng = np.random.default_rng(m)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    ws, bias = rng.uniform(1e-3, 2e-3, n), rng.uniform(-1, 1, n).astype(np.float32)
    off, mult, fb = epilogue_constants(w, ws, bias, 0.02, 3, n // MR + 1)
    args = [a.reshape(-1), pack_gemm_quads(w), amx.tile_config(), off[:n], mult[:n]]
    if float_bias:
        fb = np.asarray(bias, np.float32)
        args[3] = (3 * w.astype(np.int64).sum(1)).astype(np.int32)
        args.append(fb)
    out = tvm.runtime.tensor(np.zeros(m * n, np.float32))
    _kernel(m, k, n, float_bias)["main"](*(tvm.runtime.tensor(v) for v in args), out)
    _check_epilogue(out.numpy().reshape(m, n), a, w, ws, bias, mult[:n], float_bias)


def _check_epilogue(got, a, w, ws, bias, mult, float_bias: bool):
    """The int8 linear kernels' output against (a - 3) @ W^T in int64 with epilogue_constants' store (sx 0.02,
    zero point 3): the bias as int32 accumulator steps, or float after the multiply (`float_bias`)."""
    acc = (a.astype(np.int64) - 3) @ w.astype(np.int64).T
    if float_bias:
        ref = acc * mult.astype(np.float64) + bias
    else:
        ref = (acc + np.round(bias / (ws * 0.02))) * mult.astype(np.float64)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


@needs_amx
@pytest.mark.parametrize("rows,k,n", [(128, 384, 96), (20, 100, 40), (50, 64, 33)])
def test_amx_linear_matches_vnni_build_and_torch(rows, k, n, tmp_path, monkeypatch):
    """A quantized linear compiled here on AMX gives the VNNI build's outputs exactly (both accumulate the same
    int32 sums) and PyTorch's float linear within the int8 grid's error; the manifest lists the AMX extensions and
    the report names the tile GEMM. 20 rows and K=100 are padded; N=33 and 40 are sliced back."""
    layer, x, q = _quantized_linear(rows, k, n, seed=rows)
    art = graphopt.compile(q, "llvm", output=tmp_path / "amx")
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["target_info"]["amx"] and {"amx-int8", "amx-tile"} <= set(manifest["target_info"]["isa"])
    got = graphopt.load(art)(x.numpy())[0]
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    plain = graphopt.compile(q, "llvm", output=tmp_path / "vnni")
    info = json.loads((plain / "manifest.json").read_text())["target_info"]
    assert not info["amx"] and "amx-int8" not in info["isa"]
    np.testing.assert_array_equal(got, graphopt.load(plain)(x.numpy())[0])
    ref = layer(x).detach().numpy()
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()
    from graphopt.report import _target_line
    assert "AMX" in _target_line(manifest, int8=True) and "AMX" not in _target_line({"target_info": info}, True)


def test_amx_artifact_refused_where_the_tiles_are_missing(monkeypatch):
    """An artifact whose manifest lists AMX is refused at load on a CPU (or VM) without it, naming the tiles."""
    from graphopt.targets.tvm import host
    from graphopt.runtime import missing_isa
    monkeypatch.setattr(host, "host_isa", lambda: {"avx2", "avx512f"})
    assert missing_isa({"target_info": {"isa": ["avx2", "amx-tile", "amx-int8"]}}) == ["amx-tile", "amx-int8"]
    assert missing_isa({"target_info": {"isa": ["avx2", "avx512f"]}}) == []


def test_amx_flat_conv_assembly():
    """The k x k int8 conv's tile form built for an AMX CPU: signed weights x unsigned quad planes (`tdpbsud`),
    four per step, the tiles configured once per thread; no VNNI products."""
    asm = _conv_kernel(64, 64, 20, 20, 3, 1, cpu=AMX_CPU).mod.inspect_source("asm")
    dots = re.findall(r"^\s+tdpbsud\s+(%tmm\d), (%tmm\d), (%tmm\d)", asm, re.M)
    assert dots and len(dots) % 4 == 0 and {d[2] for d in dots} == {"%tmm0", "%tmm1", "%tmm2", "%tmm3"}
    assert not re.search(r"^\s+(tdpbssd|vpdpbusd)\s", asm, re.M)
    assert len(re.findall(r"^\s+tileloadd\s", asm, re.M)) == len(dots)


def _conv_kernel(cout, cin, h, w, k, stride, cpu=None):
    f = parse_kernel(amx.qconv_flat_amx_source(cout, cin, h, w, k, k, stride, (k // 2,) * 4))
    return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(cpu))


def test_amx_flat_conv_shapes():
    """Reduction steps: all of Cin's quads at a tap up to 64 channels, 16 quads where Cin % 64 == 0, else none;
    the weight packs each channel's row as (tap, quad, channel), zero-padded to 32 rows."""
    assert [amx.flat_quads_step(c) for c in (3, 32, 64, 96, 128, 512)] == [1, 8, 16, 0, 16, 16]
    w = np.arange(2 * 5 * 3 * 3).reshape(2, 5, 3, 3).astype(np.int8)
    packed = amx.pack_flat_weight(w).reshape(32, 9, 8)
    assert packed[1, 4, 2] == w[1, 2, 1, 1] and not packed[1, :, 5:].any() and not packed[2:].any()
    with pytest.raises(ValueError, match="Cin <= 64 or Cin % 64"):
        amx.qconv_flat_amx_source(32, 96, 14, 14, 3, 3, 1, (1, 1, 1, 1))


class _ConvBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.conv = torch.nn.Conv2d(cin, cout, 3, stride, padding=1)
        self.act = act

    def forward(self, x):
        y = self.conv(x)
        return {"relu6": torch.nn.functional.relu6, "relu": torch.relu, "none": lambda v: v}[self.act](y) + 0.5


@pytest.mark.parametrize("cin,cout,hw,stride,act", [(64, 64, 20, 1, "relu"), (32, 40, 41, 2, "relu6"),
                                                    (128, 64, 9, 1, "none")])
def test_amx_flat_conv_lowering_and_results(cin, cout, hw, stride, act, tmp_path, monkeypatch):
    """Cross-compiled for an AMX CPU the int8 3x3 conv takes the tile form (not for Zen 4, nor with
    GRAPHOPT_AMX=0); where this machine grants AMX, its build equals the VNNI build exactly (blocks crossing
    output rows and the planes' extra columns, 40 channels padded to 64, stride 2, a float or requantized store)
    and PyTorch within the int8 grid's error."""
    torch.manual_seed(cin)
    model = _ConvBlock(cin, cout, stride, act).eval()
    x = torch.randn(1, cin, hw, hw)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq", data=[(x,)])
    assert any(nm.startswith(f"{amx.KERNEL_PREFIX}_flat") for nm in _names(q, AMX_CPU))
    assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(q, "znver4"))
    if not amx.amx_usable(cpu_target()):
        return
    got = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "amx"))(x.numpy())[0]
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(q, AMX_CPU))
    np.testing.assert_array_equal(got, graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "v"))(x.numpy())[0])
    ref = model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()


def _bsr_kernel(m: int, k: int, n: int, nnzb: int, float_bias: bool = False, cpu: str | None = None):
    f = parse_kernel(amx.qbsr_amx_source(m, k, n, nnzb, float_bias, cores=2))
    return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(cpu))


def _block_sparse_int8(n: int, k: int, keep: float, seed: int = 0) -> np.ndarray:
    """A full-range int8 [n, k] weight whose 16 x 64 blocks are kept with probability `keep`, block row 0 empty."""
    rng = np.random.default_rng(seed)
    kept = rng.random((n // 16, k // 64)) < keep
    kept[0] = False
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    return (w.reshape(n // 16, 16, k // 64, 64) * kept[:, None, :, None]).reshape(n, k).astype(np.int8)


def test_amx_bsr_kernel_assembly():
    """The block-sparse kernel built for an AMX CPU: per stored 16 x 64 block one weight tile (tmm6) and two
    activation tiles (tmm4-5) into two accumulators (tmm0-1), `tdpbssd`; tiles configured and released, the OS's
    permission asked first, no VNNI products."""
    asm = _bsr_kernel(64, 256, 64, 6, cpu=AMX_CPU).mod.inspect_source("asm")
    dots = re.findall(r"^\s+tdpbssd\s+(%tmm\d), (%tmm\d), (%tmm\d)", asm, re.M)
    assert set(dots) == {("%tmm6", "%tmm4", "%tmm0"), ("%tmm6", "%tmm5", "%tmm1")}  # (AT&T: B, A, accumulator)
    assert len(re.findall(r"^\s+tileloadd\s", asm, re.M)) * 2 == len(dots) * 3  # (LLVM may unroll the blocks)
    for op in ("ldtilecfg", "tilerelease", "tilezero", "tilestored"):
        assert re.search(rf"^\s+{op}\s", asm, re.M), op
    assert "vpdpbusd" not in asm
    assert re.search(r"call.*syscall", asm) and asm.index("syscall") < asm.index("ldtilecfg")


def test_amx_bsr_blocks_and_shapes():
    """Each stored 16 x 64 block packs as the B tile `tdpbssd` reads (16 quads x 16 outputs x 4 k); rows, and
    weights that do not divide into blocks, are refused by name."""
    data = np.random.default_rng(0).integers(-128, 128, (3, 16, 64)).astype(np.int8)
    packed = amx.pack_bsr_blocks(data).reshape(3, 16, 16, 4)
    b, q, o, j = np.meshgrid(*(np.arange(s) for s in (3, 16, 16, 4)), indexing="ij")
    np.testing.assert_array_equal(packed, data[b, o, 4 * q + j])
    with pytest.raises(ValueError, match=r"\[nnzb, 16, 64\]"):
        amx.pack_bsr_blocks(data[:, :8])
    assert "16 or more" in amx.amx_bsr_applies(8, 64, 16)
    assert "16x64 blocks" in amx.amx_bsr_applies(32, 96, 16) and "16x64 blocks" in amx.amx_bsr_applies(32, 64, 24)
    assert amx.amx_bsr_applies(16, 128, 32) == ""
    with pytest.raises(ValueError, match="qbsr_amx needs"):
        amx.qbsr_amx_source(16, 64, 16, 1)


@needs_amx
@pytest.mark.parametrize("m,k,n,keep,float_bias", [(128, 256, 64, 0.3, False), (40, 192, 48, 0.5, True),
                                                   (32, 64, 32, 1.0, False)])
def test_amx_bsr_kernel_is_exact(m, k, n, keep, float_bias):
    """(a @ W^T - offset) * multiplier (+ float bias) from the stored blocks equals the int64 product with the
    dense weight: an empty block row (its outputs the epilogue of zero), 40 rows overlapping the last 32-row
    chunk with the one before it, every block stored."""
    from graphopt.ir.sparse_ops import to_bsr
    rng = np.random.default_rng(m)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = _block_sparse_int8(n, k, keep, seed=m)
    s = to_bsr(torch.from_numpy(w), amx.QBSR_BLOCK)
    ws, bias = rng.uniform(1e-3, 2e-3, n), rng.uniform(-1, 1, n).astype(np.float32)
    off, mult, _ = epilogue_constants(w, ws, bias, 0.02, 3, n // MR + 1)
    args = [a.reshape(-1), amx.pack_bsr_blocks(s.data.numpy()), s.indices.numpy(), s.indptr.numpy(),
            amx.tile_config(), off[:n], mult[:n]]
    if float_bias:
        args[5] = (3 * w.astype(np.int64).sum(1)).astype(np.int32)
        args.append(bias)
    out = tvm.runtime.tensor(np.zeros(m * n, np.float32))
    _bsr_kernel(m, k, n, s.nnzb, float_bias)["main"](*(tvm.runtime.tensor(v) for v in args), out)
    _check_epilogue(out.numpy().reshape(m, n), a, w, ws, bias, mult[:n], float_bias)


class _AmxOracle:
    """Scripted costs in the CPU oracle's terms: int8 linears have dense and bsr16x64 (AMX) kernels, the sparse
    one costing its stored blocks' share of dense."""

    def __init__(self):
        self.calls = []

    def applies(self, layout, weight, op="linear", tokens=None):
        return "" if layout in ("dense", "bsr16x64") and op == "qlinear" else "scripted: no such kernel"

    def measure(self, op, shape, layout, weight):
        from graphopt.ir.sparse_ops import to_bsr
        self.calls.append((op, shape, layout))
        if layout == "dense":
            return 1e-4
        s = to_bsr(weight, amx.QBSR_BLOCK)
        return 1e-4 * s.nnzb * 16 * 64 / weight.numel()


class _TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(256, 128), torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_select_sparse_layout_puts_16x64_blocks_on_amx_tiles(tmp_path, caplog):
    """sparsify{block=16x64} + int8: select-sparse-layout measures bsr16x64 against dense for each int8 linear
    and records it; cross-compiled for an AMX CPU both linears run the tile BSR kernel, for Zen 4 (no AMX) they
    stay dense, with a warning naming the layer; where this machine grants the tiles, the artifact equals the
    dense int8 one exactly."""
    torch.manual_seed(0)
    x = torch.randn(48, 256)
    q = graphopt.optimize(graphopt.trace(_TwoLinears().eval(), (x,)),
                          "sparsify{sparsity=0.75 block=16x64},quantize,fold-qdq", data=[(x,)])
    oracle = _AmxOracle()
    out = graphopt.optimize(q, "select-sparse-layout{candidates=dense,bsr16x64}", target=oracle)
    recs = list(out.meta["sparse_layout"].values())
    assert [r["choice"] for r in recs] == ["bsr16x64"] * 2 and all(r["op"] == "qlinear" for r in recs), recs
    assert {c[2] for c in oracle.calls} == {"dense", "bsr16x64"} and out.text() == q.text()
    names = _names(out, AMX_CPU)
    assert {nm for nm in names if nm.startswith(f"{amx.KERNEL_PREFIX}_bsr16x64")} == {
        f"{amx.KERNEL_PREFIX}_bsr16x64_48x256x128_nnz{recs[0]['stored_blocks']}",
        f"{amx.KERNEL_PREFIX}_bsr16x64_48x128x64_nnz{recs[1]['stored_blocks']}"}, names
    with caplog.at_level("WARNING", logger="graphopt.targets.tvm.lower"):
        assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(out, "znver4"))
    assert "chose the int8 bsr16x64 kernel, but this target has no AMX tiles" in caplog.text
    if not amx.amx_usable(cpu_target()):
        return
    got = graphopt.load(graphopt.compile(out, "llvm", output=tmp_path / "sparse"))(x.numpy())[0]
    dense = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "dense"))(x.numpy())[0]
    np.testing.assert_array_equal(got, dense)


def test_cpu_oracle_offers_bsr16x64_where_amx_runs(tmp_path, monkeypatch):
    """The CPU cost oracle's rule: bsr16x64 for int8 linears of 16+ tokens on a target with AMX, named reasons
    for pointwise convs, few tokens, CPUs without AMX and GRAPHOPT_AMX=0."""
    from graphopt.targets.tvm.cpu.cost import CpuCostOracle
    w = torch.zeros(64, 128, dtype=torch.int8)
    on = CpuCostOracle(cpu_target(AMX_CPU), cache=tmp_path / "c.json")
    assert on.applies("bsr16x64", w, "qlinear", 32) == ""
    assert "16 or more" in on.applies("bsr16x64", w, "qlinear", 8)
    assert "pointwise convs take bsr8x4 or csr" in on.applies("bsr16x64", w, "qconv1x1", 196)
    assert "does not have" in CpuCostOracle(cpu_target("znver4"), cache=tmp_path / "c.json").applies(
        "bsr16x64", w, "qlinear", 32)
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    assert "does not have" in on.applies("bsr16x64", w, "qlinear", 32)


def test_amx_attention_matmul_assembly_and_shapes():
    """The attention matmul on tiles, built for an AMX CPU: four `tdpbssd` per reduction step into tmm0-3 (32 x 32
    blocks), tiles configured and released, the permission asked first; 32 or whole 64 inputs, 32+ rows and whole
    32-column blocks, else the VNNI kernel (named reasons from the source)."""
    f = parse_kernel(amx.qbmm_amx_source(4, 64, 32, 64, 2))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(AMX_CPU))
    asm = lib.mod.inspect_source("asm")
    dots = re.findall(r"^\s+tdpbssd\s+(%tmm\d), (%tmm\d), (%tmm\d)", asm, re.M)
    assert dots and {d[2] for d in dots} == {"%tmm0", "%tmm1", "%tmm2", "%tmm3"}
    for op in ("ldtilecfg", "tilerelease", "tilestored"):
        assert re.search(rf"^\s+{op}\s", asm, re.M), op
    assert asm.index("syscall") < asm.index("ldtilecfg")
    assert [amx.amx_qbmm_step(k) for k in (16, 32, 48, 64, 96, 128, 256)] == [0, 32, 0, 64, 0, 64, 64]
    assert amx.amx_qbmm_applies(32, 32, 32) and not amx.amx_qbmm_applies(16, 32, 32)
    assert not amx.amx_qbmm_applies(64, 32, 48) and not amx.amx_qbmm_applies(64, 48, 64)
    with pytest.raises(ValueError, match="qbmm_amx needs"):
        amx.qbmm_amx_source(1, 64, 48, 64)


def _attention_int8(t: int, d: int = 64, heads: int = 2):
    """One attention block (tests/passes/quant's), quantized and folded: two int8 activation matmuls per head."""
    from tests.passes.quant.test_attention_quant import Attention
    torch.manual_seed(0)
    model = Attention(d=d, heads=heads, mask="bool").eval()
    x = (torch.randn(1, t, d), torch.ones(1, t))
    q = graphopt.optimize(graphopt.trace(model, x), "quantize{matmul=true}", data=[x])  # (auto: false on AVX2)
    return x, graphopt.optimize(q, "fold-qdq")


def test_amx_attention_matmuls_lowering_and_results(tmp_path, monkeypatch):
    """An int8 attention block of two heads of 32: at 64 tokens, cross-compiled for an AMX CPU, both activation
    matmuls (scores 64x32x64, output 64x64x32) run on tiles; at 40 tokens neither does (40 columns are not whole
    32-column blocks, 40 inputs no tile step) and both keep the VNNI kernel, as for Zen 4 or with GRAPHOPT_AMX=0.
    Where this machine grants the tiles, the artifact equals the VNNI build exactly."""
    x, q = _attention_int8(t=64)
    tiled = f"{amx.KERNEL_PREFIX}_qbmm"
    assert {nm for nm in _names(q, AMX_CPU) if nm.startswith(tiled)} == {f"{tiled}_2x64x32x64", f"{tiled}_2x64x64x32"}
    _, q40 = _attention_int8(t=40)
    names = _names(q40, AMX_CPU)
    assert not any(nm.startswith(tiled) for nm in names)
    assert len([nm for nm in names if nm.startswith("qbmm_vnni")]) == 2
    assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(q, "znver4"))
    if not amx.amx_usable(cpu_target()):
        return
    feeds = [v.numpy() for v in x]
    got = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "amx"))(*feeds)[0]
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    assert not any(nm.startswith(amx.KERNEL_PREFIX) for nm in _names(q, AMX_CPU))
    np.testing.assert_array_equal(got, graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "v"))(*feeds)[0])


@needs_amx
@pytest.mark.parametrize("shape,zps", [((2, 3, 40, 32, 64), (-7, 5)), ((12, 128, 128, 32), (0, -128)),
                                       ((1, 2, 32, 64, 96), (127, 3))])
def test_amx_attention_matmul_kernel_is_exact(shape, zps):
    """qbmm on tiles against graphopt::qmatmul's float64 reference, to float32 rounding: zero points on either
    side, the worst-case row and column, 40 rows overlapping the last 32-row block, K of 32, 64 and 128 (two
    steps), batches of 6, 12 and 2 split across the threads' runs."""
    from tests.targets.test_cpu_kernels import qbmm_case
    got, ref, mod = qbmm_case(shape, zps, "vnni", amx_cores=2)
    assert any(gv.name_hint.startswith(f"{amx.KERNEL_PREFIX}_qbmm") for gv in mod.get_global_vars())
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
