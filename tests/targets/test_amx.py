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

AMX_CPU = "sapphirerapids"  # an AMX CPU to cross-compile for
needs_amx = pytest.mark.skipif(not amx.amx_usable(cpu_target()), reason="this machine's OS grants no AMX tiles")


def _kernel(m: int, k: int, n: int, float_bias: bool = False, cpu: str | None = None):
    from tvm.script import tirx as T
    f = tvm.script.parse(amx.qgemm_amx_source(m, k, n, float_bias, cores=2), extra_vars={"T": T})
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
    acc = (a.astype(np.int64) - 3) @ w.astype(np.int64).T
    if float_bias:
        ref = acc * mult[:n].astype(np.float64) + bias
    else:
        ref = (acc + np.round(bias / (ws * 0.02))) * mult[:n].astype(np.float64)
    assert np.abs(out.numpy().reshape(m, n) - ref).max() <= 1e-6 * np.abs(ref).max()


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
    from tvm.script import tirx as T
    f = tvm.script.parse(amx.qconv_flat_amx_source(cout, cin, h, w, k, k, stride, (k // 2,) * 4),
                         extra_vars={"T": T})
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
