"""cuda / cuda-sparse targets. Built here without a GPU: kernels cross-compiled with nvcc into the artifact, PTX
checked for the sparse tensor-core instruction, the 2:4 packing checked against a CPU model of the instruction's
fragment layout. Running the artifacts needs a GPU: those tests skip cleanly without one."""
from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import ArtifactError, TargetError
from graphopt.runtime import cuda_available
from graphopt.targets.tvm.gpu import sparse as sp

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not __import__("os").path.exists(
    "/usr/local/cuda/bin/nvcc"), reason="the cuda targets cross-compile with nvcc; none here")
needs_gpu = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU here (CI never has one)")


def mask_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    drop = g.abs().argsort(-1)[..., :2]
    return g.scatter(-1, drop, 0.0).reshape(n, k)


def random_24(n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = mask_24(torch.from_numpy(rng.standard_normal((n, k)).astype(np.float32))).numpy()
    w[1, 4:8] = [0, 0, 0, 0.75]  # chunks with fewer than two nonzeros still pack
    w[2, 0:4] = 0
    return w


class Head(nn.Module):
    """conv + ReLU6 (clip, which fp16 conversion must handle) + 2:4-able 1x1 conv + pooled linears."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.pw = nn.Conv2d(32, 64, 1)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.stem(x))
        y = torch.relu(self.pw(y)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)))


def head_graph(sparse: bool):
    torch.manual_seed(0)
    m = Head().eval()
    if sparse:
        with torch.no_grad():
            for layer in (m.pw, m.fc1):
                w = layer.weight.data
                layer.weight.data = mask_24(w.reshape(w.shape[0], -1)).reshape(w.shape)
    return graphopt.trace(m, (torch.randn(1, 3, 8, 8),))


@pytest.mark.parametrize("fmt", ["f16", "bf16", "s8"])
def test_24_packing_round_trips_and_follows_the_fragment_layout(fmt):
    f = sp.FORMATS[fmt]
    k = 3 * f.tile_k
    w = random_24(48, k)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((21, k)).astype(np.float32)
    if fmt == "s8":
        w, x = np.round(w * 40), np.round(x * 40)
    wv, wm = sp.pack_fragments(w, fmt)
    assert wv.shape == (3, 3, 32, 4) and wm.shape == (3, 3, 32)
    np.testing.assert_array_equal(sp.unpack_fragments(wv, wm, fmt), sp.rounded(w, f))
    # metadata never holds an invalid (equal) pair of positions
    nib = np.stack([(wm >> (4 * i)) & 0xF for i in range(8)])
    assert not np.isin(nib, [0b0000, 0b0101, 0b1010, 0b1111]).any()
    # the kernel's loop structure, lane by lane with its index maps, computes x @ w^T (+ bias)
    b = None if fmt == "s8" else rng.standard_normal(48).astype(np.float32)
    ref = sp.rounded(x, f).astype(np.float64) @ sp.rounded(w, f).astype(np.float64).T + (0 if b is None else b)
    got = sp.sp24_linear_reference(x, wv, wm, b, fmt)
    if fmt == "s8":
        np.testing.assert_array_equal(got, ref)  # integer accumulation is exact
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_fragment_coordinates_match_the_ptx_isa_formulas():
    """Pinned against the ISA's own formulas (groupID = lane >> 2, threadID_in_group = lane % 4), written out here
    independently of the helpers: the packer, the CPU reference and the kernel all share the helpers, so a wrong
    helper would pass the round trips above; this test is what ties them to the hardware's layout."""
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        # f16/bf16 A (dense m16n8k16 layout of the 16x16 compressed tile): a_i row g for i in {0,1,4,5}, else g+8;
        # col t*2 + (i & 1), +8 for i >= 4 -- register r holds a_2r, a_2r+1
        for r in range(4):
            i = 2 * r
            row = g if i in (0, 1, 4, 5) else g + 8
            col = t * 2 + (8 if i >= 4 else 0)
            assert sp.a_coords(lane, r, 2) == (row, col)
        # int8 A (dense m16n8k32 layout of the 16x32 compressed tile): a_i row g for i < 4 or 8 <= i < 12, else
        # g+8; col t*4 + (i & 3), +16 for i >= 8 -- register r holds a_4r .. a_4r+3
        for r in range(4):
            i = 4 * r
            row = g if (i < 4 or 8 <= i < 12) else g + 8
            assert sp.a_coords(lane, r, 4) == (row, t * 4 + (16 if i >= 8 else 0))
        # B: f16 k32 row t*2 + (i & 1) + 8 * (i // 2), col g; int8 k64 row t*4 + (i & 3) + 16 * (i // 4)
        for r in range(4):
            assert sp.b_coords(lane, r, 2) == (t * 2 + 8 * r, g)
            assert sp.b_coords(lane, r, 4) == (t * 4 + 16 * r, g)
        # C/D: row g for c0, c1 and g+8 for c2, c3; col t*2 + (i & 1)
        for i in range(4):
            assert sp.c_coords(lane, i) == (g + (8 if i >= 2 else 0), t * 2 + (i & 1))


def test_int8_metadata_holds_one_row_per_register_as_the_h200_showed():
    """The int8 mma.sp (m16n8k64) metadata layout, as probed on an H200 (benchmarks/gpu_check.py moves one nibble
    at a time and reads which row and chunk of 4 inputs changed): lane 4g + t holds 8 chunks of row g + 8 (t % 2),
    chunks 8 (t // 2) .. + 7, nibble c in bits 4c .. 4c + 3. The fp16 reading (rows g and g + 8 in one register),
    used for int8 before, gave wrong results there."""
    where = sp.meta_map(sp.FORMATS["s8"])
    assert len(where) == 16 * 16  # every (row, chunk) of the 16 x 64 tile once
    for lane in range(32):
        g, t = lane >> 2, lane % 4
        for c in range(8):
            assert where[(g + 8 * (t % 2), 8 * (t // 2) + c)] == (lane, 4 * c)
    # fp16/bf16 keep theirs: lanes t = 0, 1 hold chunks 4t .. 4t + 3 of row g (low half) and g + 8 (high half)
    where16 = sp.meta_map(sp.FORMATS["f16"])
    assert where16[(3, 5)] == (13, 4) and where16[(11, 5)] == (13, 20)
    with pytest.raises(TargetError, match="metadata layout"):
        sp.meta_map(sp.FORMATS["s8"], "columns")


@pytest.mark.parametrize("fmt", ["f16", "bf16", "s8"])
def test_dense_fragment_packing_round_trips_in_the_mma_sync_layout(fmt):
    f = sp.DENSE_FORMATS[fmt]
    rng = np.random.default_rng(2)
    w = rng.standard_normal((32, 4 * f.tile_k)).astype(np.float32)
    if fmt == "s8":
        w = np.round(w * 40)
    wv = sp.pack_dense_fragments(w, fmt)
    assert wv.shape == (2, 4, 32, 4)
    np.testing.assert_array_equal(sp.unpack_dense_fragments(wv, fmt), sp.rounded(w, f))
    # lane 5 (g = 1, t = 1), register 3 of tile (1, 2) holds row 16 + 9, inputs 2 tile_k + e t + 4 e .. (+ e - 1)
    e = f.per_reg
    word = int(wv[1, 2, 5, 3])
    first = 2 * f.tile_k + e + 4 * e
    assert word & ((1 << (32 // e)) - 1) == int(sp.to_bits(w[25, first:first + 1], f)[0])
    with pytest.raises(TargetError, match="inputs %"):
        sp.pack_dense_fragments(np.ones((16, f.tile_k), np.float32), fmt)


def test_multistage_tiles_that_do_not_fit_are_refused():
    from graphopt.targets.tvm.gpu import gemm
    assert gemm.pipeline_fit(128, 384, 384, False, "f16", gemm.DEFAULT_PIPELINE) == ""
    assert "whole ldmatrix.x4" in gemm.pipeline_fit(128, 384, 384, False, "f16", (4, 8, 2, 2, 1, 4))  # 8 words
    assert gemm.pipeline_fit(128, 384, 384, True, "f16", (4, 8, 2, 2, 1, 4)) == ""  # a sparse step is 16 words
    assert "2+ stages" in gemm.pipeline_fit(128, 384, 384, False, "f16", (4, 8, 2, 2, 2, 1))
    assert "inputs % 32" in gemm.pipeline_fit(128, 48, 384, False, "f16", gemm.DEFAULT_PIPELINE)
    assert "inputs % 64" in gemm.pipeline_fit(128, 96, 384, False, "s8", gemm.DEFAULT_PIPELINE)
    assert "shared memory" in gemm.pipeline_fit(4096, 4096, 4096, False, "f16", (4, 8, 2, 8, 8, 6))
    # every tile shape the build picks fits an sm_86 / sm_89 block (99 KiB), which a multi-arch binary must
    assert "sm_86" in gemm.pipeline_fit(4096, 4096, 4096, True, "f16", (4, 8, 2, 2, 2, 4))  # 112 KiB
    for sparse in (False, True):
        for fmt in ("f16", "s8"):
            for cols, n in ((128, 384), (4096, 4096)):
                assert gemm.pipeline_fit(cols, 4096, n, sparse, fmt, gemm.pipeline_tiles(cols, n, sparse)) == ""
    assert "give (row tiles" in gemm.pipeline_fit(128, 384, 384, False, "f16", (2, 4, 4, 2))
    with pytest.raises(TargetError, match="multistage tensor-core kernel: .*2\\+ stages"):
        gemm.tc_kernel_pipelined(64, 64, 64, False, "f16", False, (1, 4, 2, 2, 2, 1))
    assert "group >= 0" in gemm.pipeline_fit(128, 384, 384, False, "f16", (4, 8, 2, 2, 2, 4, -1))
    # the build's choice: 128 x 128 blocks for large GEMMs, 32 x 64 for MiniLM/MobileNetV2 sizes (enough blocks)
    assert gemm.pipeline_tiles(4096, 4096) == (4, 8, 2, 2, 2, 4) == gemm.pipeline_tiles(8192, 8192)
    assert gemm.pipeline_tiles(8192, 8192, True) == (4, 8, 2, 2, 2, 3)
    assert gemm.pipeline_tiles(128, 1536) == (1, 4, 2, 2, 2, 4) and gemm.pipeline_tiles(128, 1536, True)[4] == 1


@pytest.mark.parametrize("grid_n,grid_c,group", [(64, 64, 8), (13, 5, 8), (16, 3, 16), (7, 9, 3), (5, 5, 8)])
def test_grouped_raster_visits_every_block_once(grid_n, grid_c, group):
    from graphopt.targets.tvm.gpu import gemm
    seen = [gemm.raster(pid, grid_n, grid_c, group) for pid in range(grid_n * grid_c)]
    assert sorted(seen) == [(bx, by) for bx in range(grid_n) for by in range(grid_c)]
    # consecutive blocks walk the group's row blocks first
    assert [b[0] for b in seen[:min(group, grid_n)]] == list(range(min(group, grid_n))) and seen[0][1] == seen[1][1] \
        or grid_n == 1


@pytest.mark.parametrize("sparse", [False, True])
def test_multistage_ldmatrix_rows_give_each_lane_its_b_registers_without_bank_conflicts(sparse):
    """The kernel's ldmatrix addresses (gemm.ldsm_row), read the way the instruction distributes rows to lanes,
    must put B register r of every lane (sparse.b_coords, in 32-bit words of a staged column) in the lane's
    register; and each phase of 8 row reads (16 bytes each) must hit 32 distinct banks at the padded stride."""
    from graphopt.targets.tvm.gpu import gemm
    for fmt in ("f16", "s8"):
        f = sp.FORMATS[fmt] if sparse else sp.DENSE_FORMATS[fmt]
        ws = f.tile_k // f.per_reg
        bregs = ws // 4
        for ks in (1, 2, 4):
            if (ks * ws) % 16:
                continue
            stride = ks * ws + 4
            for st in range(0, ks, 4 // bregs):  # dense: one ldmatrix per two steps
                for lane in range(32):
                    for q in range(4):
                        col, word = gemm.ldsm_register(lane, q, lambda ln, st=st: gemm.ldsm_row(ln, st, ws))
                        step, r = st + q // bregs, q % bregs  # the instruction step and B register q stands for
                        krow, bcol = sp.b_coords(lane, r, f.per_reg)
                        assert (col, word) == (bcol, step * ws + krow // f.per_reg), (fmt, ks, st, lane, q)
                for phase in range(4):
                    banks = []
                    for ln in range(8 * phase, 8 * phase + 8):
                        col, word = gemm.ldsm_row(ln, st, ws)
                        banks += [(col * stride + word + i) % 32 for i in range(4)]
                    assert sorted(banks) == list(range(32)), (fmt, ks, st, phase)


@needs_nvcc
@pytest.mark.parametrize("fmt,sparse,tiles", [("f16", False, None), ("s8", False, (1, 4, 2, 2, 2, 4)),
                                              ("bf16", False, (4, 8, 2, 2, 4, 2)), ("f16", True, (1, 4, 2, 2, 1, 4)),
                                              ("s8", True, (4, 8, 2, 2, 2, 3)), ("f16", False, (1, 4, 2, 2, 2, 3, 2))])
def test_multistage_kernel_compiles_to_cp_async_ldmatrix_and_tensor_core_instructions(tmp_path, fmt, sparse, tiles):
    import tvm

    from graphopt.targets.tvm.gpu import gemm
    from graphopt.targets.tvm.gpu.fatbin import compile_ptx
    f = sp.FORMATS[fmt] if sparse else sp.DENSE_FORMATS[fmt]
    mt, j, _wn, _wc, ks, stages = (tiles or gemm.DEFAULT_PIPELINE)[:6]
    kern = gemm.tc_kernel_pipelined(300, 2 * ks * f.tile_k, 272, True, fmt, sparse, tiles)
    for arch in ("sm_80", "sm_90"):
        lib = tvm.compile(tvm.IRModule({"k": kern.with_attr("global_symbol", "k")}),
                          target=tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"}))
        src = lib.mod.imports[0].inspect_source()
        assert "extern __shared__" in src  # dynamic shared memory: the stages may pass 48 KiB
        ptx = compile_ptx(src, arch, tmp_path, f"k_{arch}")
        assert "cp.async.cg.shared.global" in ptx and f"cp.async.wait_group {stages - 2}" in ptx
        assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in ptx and "ld.shared.v4" in ptx  # B and A fragments
        n = ptx.count(f.ptx)
        assert n >= mt * j * ks and n % (mt * j) == 0, n  # every (row tile, column tile) pair, each step of a stage
        assert ("mma.sp" in ptx) == sparse
        assert ("blockIdx.y" in src) == (tiles is None or len(tiles) == 6)  # a grouped raster runs a 1-D grid


@pytest.mark.parametrize("ks,swizzle,step_bytes", [(2, False, 32), (4, False, 32), (4, True, 32), (1, False, 64),
                                                    (2, True, 64)])
def test_wgmma_activation_chunks_land_where_the_descriptor_reads_them(ks, swizzle, step_bytes):
    """The wgmma kernel's cp.async chunks (wgmma.b_chunk) put byte b of column c of a stage where the instruction
    reads it through the descriptor the kernel encodes (wgmma.b_read: K-major, no swizzle with LBO 128 B and SBO a
    stage's core matrices, or the 128-byte swizzle); every byte of the stage is written once. A dense k-step reads
    32 bytes of a column, a 2:4 one (wgmma.mma_async.sp: k32 fp16 / k64 int8) 64."""
    from graphopt.targets.tvm.gpu import wgmma
    chunks, bn = ks * step_bytes // 16, 64  # 16-byte chunks a column, columns a block
    where = {}
    for c in range(bn * chunks):
        col, kw, off = wgmma.b_chunk(c, chunks, swizzle)
        for i in range(16):
            where[(col, kw * 16 + i)] = off + i
    assert sorted(where.values()) == list(range(bn * chunks * 16))
    for col in range(bn):
        for step in range(ks):
            for kb in range(step_bytes):
                assert wgmma.b_read(col, kb, step, chunks, swizzle, step_bytes) == where[(col, step * step_bytes + kb)]
    # consecutive threads store to 8 distinct 16-byte bank groups (conflict-free) and read whole 32-byte sectors
    assert sorted(wgmma.b_chunk(c, chunks, swizzle)[2] % 128 for c in range(8)) == [16 * i for i in range(8)]
    assert {wgmma.b_chunk(c, chunks, swizzle)[0] for c in range(16)} == set(range(8))


def test_wgmma_tiles_that_do_not_fit_are_refused():
    from graphopt.targets.tvm.gpu import wgmma
    assert wgmma.wg_fit(2048, 2048, 2048, "f16", wgmma.WG_DEFAULT) == ""
    assert "8-256 columns" in wgmma.wg_fit(2048, 2048, 2048, "s8", (2, 256, 2, 3))  # int8 stops at 224
    assert "8-256 columns" in wgmma.wg_fit(2048, 2048, 2048, "f16", (2, 100, 2, 3))
    assert "3+ stages" in wgmma.wg_fit(2048, 2048, 2048, "f16", (2, 128, 4, 2))  # one prefetching, one draining
    assert "128-byte swizzle" in wgmma.wg_fit(2048, 2048, 2048, "f16", (2, 128, 2, 4, 1))
    assert "inputs % 64" in wgmma.wg_fit(2048, 96, 2048, "f16", wgmma.WG_DEFAULT)
    assert "shared memory" in wgmma.wg_fit(2048, 2048, 2048, "f16", (4, 256, 8, 4))
    # 2:4: a k-step reads 64 bytes of a column, so the swizzle's 128-byte rows take 2 k-steps a stage
    assert wgmma.wg_fit(2048, 2048, 2048, "f16", wgmma.WG_SPARSE_DEFAULT, sparse=True) == ""
    assert "takes 2 k-steps" in wgmma.wg_fit(2048, 2048, 2048, "f16", (2, 128, 4, 3, 1), sparse=True)
    assert "inputs % 64" in wgmma.wg_fit(2048, 96, 2048, "f16", wgmma.WG_SPARSE_DEFAULT, sparse=True)
    assert "multiples of 16" in wgmma.wg_fit(2048, 2048, 2048, "s8", (2, 40, 4, 3))
    with pytest.raises(TargetError, match="wgmma kernel: .*3\\+ stages"):
        wgmma.wgmma_kernel(64, 64, 64, False, "f16", (1, 64, 2, 1))


@needs_nvcc
@pytest.mark.parametrize("fmt,tiles,sparse", [("f16", (2, 128, 4, 4), False), ("s8", (1, 64, 2, 3), False),
                                              ("bf16", None, False), ("f16", (2, 256, 4, 4, 1), False),
                                              ("f16", None, True), ("s8", (1, 16, 2, 4, 1), True),
                                              ("bf16", (1, 32, 1, 3), True)])
def test_wgmma_kernel_compiles_for_sm90a_with_async_proxy_fences(tmp_path, fmt, tiles, sparse):
    import tvm

    from graphopt.targets.tvm.gpu import wgmma
    from graphopt.targets.tvm.gpu.fatbin import compile_ptx
    f = (sp.FORMATS if sparse else sp.DENSE_FORMATS)[fmt]
    wgs, bn, ks, stages = (tiles or (wgmma.WG_SPARSE_DEFAULT if sparse else wgmma.WG_DEFAULT))[:4]
    kern = wgmma.wgmma_kernel(300, 2 * ks * f.tile_k, 272, True, fmt, tiles, sparse).with_attr("global_symbol", "k")
    lib = tvm.compile(tvm.IRModule({"k": kern}), target=tvm.target.Target({"kind": "cuda", "arch": "sm_90a"},
                                                                          host={"kind": "llvm"}))
    ptx = compile_ptx(lib.mod.imports[0].inspect_source(), "sm_90a", tmp_path)
    types = {"f16": "f32.f16.f16", "bf16": "f32.bf16.bf16", "s8": "s32.s8.s8"}[fmt]
    op = "wgmma.mma_async.sp.sync.aligned" if sparse else "wgmma.mma_async.sync.aligned"
    assert ptx.count(f"{op}.m64n{bn}k{f.tile_k}.{types}") >= ks  # 2:4: k32 fp16 / k64 int8
    assert ("mma_async.sp" in ptx) == sparse
    if sparse:  # the metadata register and selector 0 follow the descriptor (d, a, b-desc, sp-meta, sp-sel, ...)
        assert re.search(r"mma_async\.sp\.[^;]*\}, %rd\d+, %r\d+, 0, ", ptx)
    assert ".target sm_90a" in ptx
    # cp.async's generic-proxy writes are fenced for wgmma's async-proxy reads before the stage's barrier
    body = ptx[ptx.index("cp.async.wait_group"):]
    assert body.index("fence.proxy.async.shared::cta") < body.index("bar.sync")
    # the next stage's wgmmas are issued before the previous stage's are waited for (one group in flight)
    assert "wgmma.fence.sync.aligned" in ptx and "wgmma.wait_group.sync.aligned 1" in ptx
    assert "wgmma.wait_group.sync.aligned 0" in ptx[ptx.rindex("wgmma.wait_group.sync.aligned 1"):]


def test_24_packing_refuses_dense_weights():
    w = np.ones((16, 32), np.float32)
    assert "not 2:4" in sp.sp24_applies(w)
    assert "rows % 16" in sp.sp24_applies(np.zeros((10, 32), np.float32))
    with pytest.raises(TargetError, match="sparsify-nm"):
        sp.pack_fragments(w)


@needs_nvcc
@pytest.mark.parametrize("fmt,xdtype", [("f16", "float32"), ("f16", "float16"), ("bf16", "float32"), ("s8", "int8")])
def test_sparse_kernel_ptx_has_mma_sp_for_sm80_and_sm90(tmp_path, fmt, xdtype):
    import tvm

    from graphopt.targets.tvm.gpu.fatbin import compile_ptx
    f = sp.FORMATS[fmt]
    for acts in ("tk", "kt"):
        kern = sp.sp24_kernel(40, 2 * f.tile_k, 32, True, acts, xdtype, fmt).with_attr("global_symbol", "k")
        for arch in ("sm_80", "sm_90"):
            lib = tvm.compile(tvm.IRModule({"k": kern}), target=tvm.target.Target({"kind": "cuda", "arch": arch},
                                                                                  host={"kind": "llvm"}))
            ptx = compile_ptx(lib.mod.imports[0].inspect_source(), arch, tmp_path, f"k_{acts}_{arch}")
            assert f".target {arch}" in ptx
            # one per 8-column tile in the body of the loop over k (nvcc may unroll that loop)
            n = ptx.count(f.ptx)
            assert n >= sp.COLS_PER_WARP and n % sp.COLS_PER_WARP == 0, n


@needs_nvcc
def test_cuda_artifact_carries_fatbins_for_each_arch(tmp_path):
    from graphopt.targets.tvm.gpu.fatbin import artifact_cuda_modules
    out = graphopt.compile(head_graph(False), "cuda", output=tmp_path / "a", cuda_arch="sm_80,sm_90")
    mods = artifact_cuda_modules(out / "model.so")
    assert [m["format"] for m in mods] == ["fatbin"]  # machine code, not source: loading needs no compiler
    have = {(e["kind"], e["arch"]) for e in mods[0]["entries"]}
    assert {("elf", "sm_80"), ("elf", "sm_90"), ("ptx", "sm_90")} <= have
    from graphopt.targets.artifact import read_manifest
    info = read_manifest(out)["target_info"]
    assert info["device"] == "cuda" and info["archs"] == ["sm_80", "sm_90"] and info["precision"] == "fp16"
    assert info["cuda_graph"] is False


@needs_nvcc
def test_cuda_builds_replay_the_kernels_between_input_and_output_as_one_cuda_graph(tmp_path):
    """cuda_graph=True lifts the kernels that read only constants and planned buffers into one function the VM
    captures as a CUDA graph on the first call and replays after; by default each kernel is launched."""
    from graphopt.report import gpu_build_report
    from graphopt.targets.tvm.build import build_gpu_executable
    g = head_graph(False)
    text = build_gpu_executable(g, "cuda", ["sm_80"], "fp16", cuda_graph=True)[0].as_text()
    assert "vm.builtin.cuda_graph.run_or_capture" in text
    captured = text[text.index("@main_cuda_graph_capture:"):].split("\n@")[0]
    assert captured.count("  call  fused_") + captured.count("  call  graphopt_") >= 3, captured
    plain = build_gpu_executable(g, "cuda", ["sm_80"], "fp16")[0].as_text()
    assert "cuda_graph" not in plain
    out = graphopt.compile(g, "cuda", output=tmp_path / "a", cuda_arch="sm_80", cuda_graph=True)
    assert "kernels replayed as one CUDA graph" in gpu_build_report(out)
    with pytest.raises(graphopt.GraphoptError, match="cuda_graph=True applies to the cuda targets"):
        graphopt.compile(g, "llvm", output=tmp_path / "b", cuda_graph=True)


@needs_nvcc
def test_cuda_sparse_puts_24_layers_on_mma_sp_and_keeps_the_rest_dense(tmp_path):
    from graphopt.targets.tvm.build import build_gpu_executable
    from graphopt.targets.tvm.gpu.fatbin import compile_ptx, cuda_sources
    g = head_graph(True)
    ex, _tgt, _s, records, _tc = build_gpu_executable(g, "cuda-sparse", ["sm_80"], "fp16", None,
                                                      sparse_min_speedup=1.0)
    choice = {name: r["choice"] for name, r in records.items()}
    # pw (64x32 1x1 conv) and fc1 (128x64) are 2:4; the stem is no pointwise conv; fc2 (10 rows) misfits the tile
    assert sorted(n for n, c in choice.items() if c == "sp24") == ["fc1_weight", "pw_weight"], choice
    assert "rows % 16" in records["fc2_weight"]["reason"]
    src = "\n".join(cuda_sources(ex.mod))
    ptx = compile_ptx(src, "sm_80", tmp_path)
    assert ptx.count("mma.sp.sync") >= 2
    # the cost table decides by size when nothing was measured: these layers are too small to gain
    _, _, _, records, _ = build_gpu_executable(g, "cuda-sparse", ["sm_80"], "fp16", None)
    assert all(r["choice"] == "dense" for r in records.values())
    assert "estimated" in records["fc1_weight"]["source"]


@needs_nvcc
def test_fp16_precision_reads_half_operands_and_fp32_does_not():
    from graphopt.targets.tvm.build import build_gpu_executable
    from graphopt.targets.tvm.gpu.fatbin import cuda_sources
    counts = {}
    for prec in ("fp16", "fp32"):
        ex, *_ = build_gpu_executable(head_graph(False), "cuda", ["sm_80"], prec)
        counts[prec] = "\n".join(cuda_sources(ex.mod)).count("half ")
    assert counts["fp16"] > 0 and counts["fp32"] == 0, counts


@needs_nvcc
def test_cuda_puts_linears_that_fit_the_tile_on_the_dense_tensor_core_kernel(tmp_path):
    from graphopt.targets.tvm.build import build_gpu_executable
    from graphopt.targets.tvm.gpu.fatbin import compile_ptx, cuda_sources
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    g = graphopt.trace(m, (torch.randn(24, 64),))
    ex, _, _, _, tc = build_gpu_executable(g, "cuda", ["sm_90"], "fp16")
    # 64 -> 128 fits the tile; the 10-row classifier does not (rows % 16) and stays on dlight
    assert [r["shape"] for r in tc.values()] == [[24, 64, 128]] and all(r["format"] == "f16" for r in tc.values())
    ptx = compile_ptx("\n".join(cuda_sources(ex.mod)), "sm_90", tmp_path)
    assert sp.DENSE_FORMATS["f16"].ptx in ptx
    from graphopt.report import gpu_build_report
    art = graphopt.compile(g, "cuda", output=tmp_path / "a", cuda_arch="sm_90")
    assert "1 linear(s) on graphopt's dense tensor-core kernel (mma.sync, f16)" in gpu_build_report(art)
    # fp32 builds keep float linears in fp32 (dlight); int8 linears take the int8 kernel at any precision
    _, _, _, _, tc32 = build_gpu_executable(g, "cuda", ["sm_90"], "fp32")
    assert tc32 == {}
    q = graphopt.optimize(g, "quantize,fold-qdq", data=[(torch.randn(24, 64),) for _ in range(4)])
    ex, _, _, _, tc8 = build_gpu_executable(q, "cuda", ["sm_90"], "fp32")
    assert [r["format"] for r in tc8.values()] == ["s8"]
    ptx = compile_ptx("\n".join(cuda_sources(ex.mod)), "sm_90", tmp_path)
    assert sp.DENSE_FORMATS["s8"].ptx in ptx


@needs_nvcc
def test_sm90a_builds_put_linears_that_fit_on_wgmma_and_the_rest_on_mma_sync(tmp_path):
    from graphopt.report import gpu_build_report
    from graphopt.targets.artifact import read_manifest
    from graphopt.targets.tvm.build import build_gpu_executable
    from graphopt.targets.tvm.gpu.fatbin import artifact_cuda_modules, compile_ptx, cuda_sources
    torch.manual_seed(0)
    # 128 -> 256 fits wgmma (inputs % 64); 256 -> 96 -> 48: 96 inputs fit mma.sync's 32 but not wgmma's 64; 40 rows
    # fit neither (rows % 16): dlight
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 96), nn.Linear(96, 48), nn.Linear(48, 40)).eval()
    g = graphopt.trace(m, (torch.randn(32, 128),))
    ex, _, _, _, tc = build_gpu_executable(g, "cuda", ["sm_90a"], "fp16")
    kernels = {tuple(r["shape"]): r["kernel"] for r in tc.values()}
    assert kernels == {(32, 128, 256): "graphopt dense tensor-core (wgmma, sm_90a)",
                       (32, 256, 96): "graphopt dense tensor-core (wgmma, sm_90a)",
                       (32, 96, 48): "graphopt dense tensor-core (mma.sync, multistage)"}, kernels
    ptx = compile_ptx("\n".join(cuda_sources(ex.mod)), "sm_90a", tmp_path)
    assert ptx.count("wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16") >= 8  # 4 k-steps a stage, 2 linears
    assert sp.DENSE_FORMATS["f16"].ptx in ptx
    # portable builds (any list without sm_90a) never take wgmma
    _, _, _, _, tc90 = build_gpu_executable(g, "cuda", ["sm_90"], "fp16")
    assert all("mma.sync" in r["kernel"] for r in tc90.values()) and len(tc90) == 3
    # int8 linears take the int8 wgmma kernel
    q = graphopt.optimize(g, "quantize,fold-qdq", data=[(torch.randn(32, 128),) for _ in range(4)])
    _, _, _, _, tc8 = build_gpu_executable(q, "cuda", ["sm_90a"], "fp16")
    assert [r["kernel"].split()[-2] for r in tc8.values() if r["format"] == "s8"][:1] == ["(wgmma,"], tc8
    art = graphopt.compile(g, "cuda", output=tmp_path / "a", cuda_arch="sm_90a")
    assert read_manifest(art)["target_info"]["archs"] == ["sm_90a"]
    # (a fatbin entry's header holds the number alone: sm_90a machine code reads as sm_90)
    assert ("elf", "sm_90") in {(e["kind"], e["arch"]) for e in artifact_cuda_modules(art / "model.so")[0]["entries"]}
    report = gpu_build_report(art)
    assert "3 linear(s) on graphopt's dense tensor-core kernel (wgmma for 2, mma.sync for 1, f16)" in report
    assert "cuda for sm_90a (H100/H200 only), fp16" in report


@needs_nvcc
def test_sm90a_cuda_sparse_puts_large_24_linears_on_24_wgmma(tmp_path):
    """In an sm_90a cuda-sparse build a 2:4 linear large enough to gain runs wgmma.mma_async.sp (the H200 ran the
    whole artifact correctly: benchmarks/results/gpu_check_h200_s51_mlp24.json); smaller ones stay dense on the
    dense wgmma kernel, and weights wgmma does not take are decided as in portable builds."""
    from graphopt.report import gpu_build_report
    from graphopt.targets.tvm.build import build_gpu_executable
    from graphopt.targets.tvm.gpu.fatbin import compile_ptx, cuda_sources
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 96), nn.ReLU(), nn.Linear(96, 64)).eval()
    for layer in m[::2]:
        layer.weight.data = mask_24(layer.weight.data)
    g = graphopt.trace(m, (torch.randn(16384, 256),))  # the first linear: 2.1G multiply-adds
    ex, _, _, records, tc = build_gpu_executable(g, "cuda-sparse", ["sm_90a"], "fp16")
    got = {tuple(r["shape"]): (r["choice"], r["sp24_kernel"]) for r in records.values()}
    assert got == {(16384, 256, 512): ("sp24", "wgmma.sp (sm_90a)"), (16384, 512, 96): ("dense", "wgmma.sp (sm_90a)"),
                   (16384, 96, 64): ("dense", "mma.sp")}, got
    assert [r["tiles"] for r in records.values() if r["choice"] == "sp24"] == [[2, 256, 2, 4, 1]]
    assert sorted(tuple(r["shape"]) for r in tc.values()) == [(16384, 96, 64), (16384, 512, 96)]
    ptx = compile_ptx("\n".join(cuda_sources(ex.mod)), "sm_90a", tmp_path)
    assert ptx.count("wgmma.mma_async.sp.sync.aligned.m64n256k32.f32.f16.f16") >= 4  # 2 k-steps a stage, x2 unrolled
    assert "mma.sp.sync" not in ptx
    art = graphopt.compile(g, "cuda-sparse", output=tmp_path / "a", cuda_arch="sm_90a")
    assert "1 of 3 layer(s) on sparse tensor cores (wgmma.sp)" in gpu_build_report(art)


def test_sm90a_is_built_alone_and_loads_on_hopper_alone():
    from graphopt.runtime import gpu_mismatch
    from graphopt.targets.tvm.build import parse_archs
    assert parse_archs("sm_90a") == ["sm_90a"] and parse_archs("sm_90,sm_80") == ["sm_80", "sm_90"]
    with pytest.raises(TargetError, match="sm_90a builds Hopper-only kernels .* give sm_90a alone"):
        parse_archs("sm_80,sm_90a")
    assert gpu_mismatch(["sm_90a"], "sm_90") == "" and gpu_mismatch(["sm_80", "sm_90"], "sm_120") == ""
    assert "run on H100/H200 (sm_90) alone" in gpu_mismatch(["sm_90a"], "sm_100")
    assert "need at least sm_90" in gpu_mismatch(["sm_90"], "sm_86")
    assert "need sm_80 or later" in gpu_mismatch(["sm_80"], "sm_75")


def test_wgmma_tiles_give_the_gpu_enough_blocks_and_large_24_layers_take_24_wgmma():
    from graphopt.targets.tvm.gpu import wgmma
    # large GEMMs: the measured fastest large tiles; MiniLM's (128 rows) too few blocks at any tile: the smallest
    assert wgmma.wg_tiles(2048, 2048, "f16") == (2, 256, 4, 4, 1) and wgmma.wg_blocks(2048, 2048, (2, 256)) == 128
    assert wgmma.wg_tiles(8192, 8192, "s8") == (4, 128, 4, 4, 1)
    assert wgmma.wg_tiles(128, 384, "f16") == (1, 16, 4, 4, 1)
    assert wgmma.wg_tiles(1024, 1024, "f16") == (2, 128, 4, 3, 1)  # 8 x 4 blocks of 2 x 256 are too few
    assert wgmma.wg_tiles(512, 1024, "f16") == (1, 64, 4, 3, 1)
    assert all(wgmma.wg_fit(c, 1024, n, f, wgmma.wg_tiles(c, n, f)) == "" for c in (49, 128, 4096)
               for n in (64, 384, 4096) for f in ("f16", "s8"))
    assert "inputs % 128" in wgmma.wg_applies(256, 192, "s8") and wgmma.wg_applies(256, 256, "s8") == ""
    # 2:4 in an sm_90a build: the 2:4 wgmma kernel against the dense wgmma one (the H200's 1.15-1.25x) -- large
    # GEMMs take it, MiniLM-sized ones (launch-bound, 0.9x) stay dense, whatever select-sparse-layout timed for the
    # portable kernels
    w = random_24(4096, 4096)
    rec = sp.sp24_decision("w", w, 4096, 1.1, {"dense": 1.0, "sp24": 2.0}, wgmma=True)
    assert rec["choice"] == "sp24" and rec["speedup"] == 1.18 and "wgmma" in rec["source"], rec
    assert rec["sp24_kernel"] == "wgmma.sp (sm_90a)"
    small = sp.sp24_decision("w", random_24(384, 384), 128, 1.1, {"dense": 2.0, "sp24": 1.0}, wgmma=True)
    assert small["choice"] == "dense" and small["speedup"] < 1, small
    assert sp.sp24_decision("w", w, 4096, 1.1, {"dense": 2.0, "sp24": 1.0})["choice"] == "sp24"
    # a weight the wgmma kernels do not take (inputs % 64) stays on the portable kernels' measurements
    odd = sp.sp24_decision("w", random_24(256, 96), 4096, 1.1, {"dense": 2.0, "sp24": 1.0}, wgmma=True)
    assert odd["sp24_kernel"] == "mma.sp" and odd["speedup"] == 2.0, odd
    assert wgmma.wg_tiles(4096, 4096, "f16", sparse=True) == (2, 256, 2, 4, 1)
    assert wgmma.wg_tiles(4096, 4096, "s8", sparse=True) == (4, 128, 2, 4, 1)


@needs_nvcc
def test_int8_24_linears_take_the_int8_sparse_kernel(tmp_path):
    from graphopt.targets.tvm.build import build_gpu_executable
    from graphopt.targets.tvm.gpu.fatbin import compile_ptx, cuda_sources
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()
    for layer in (m[0], m[2]):
        layer.weight.data = mask_24(layer.weight.data)
    g = graphopt.trace(m, (torch.randn(24, 64),))
    q = graphopt.optimize(g, "quantize,fold-qdq", data=[(torch.randn(24, 64),) for _ in range(4)])
    ex, _, _, records, _ = build_gpu_executable(q, "cuda-sparse", ["sm_90"], "fp16", None, sparse_min_speedup=1.0)
    assert [r["choice"] for r in records.values()] == ["sp24", "sp24"]
    assert all(r["dtype"] == "int8 x int8 -> int32" for r in records.values())
    ptx = compile_ptx("\n".join(cuda_sources(ex.mod)), "sm_90", tmp_path)
    assert ptx.count(sp.FORMATS["s8"].ptx) >= 2 * sp.COLS_PER_WARP


@needs_nvcc
def test_cuda_tuning_tunes_the_fused_functions_and_builds_with_the_database(monkeypatch, tmp_path):
    """Without a GPU, tuning is refused (see the errors test). Here the plumbing: the tasks come from exactly the
    fused module the build schedules, graphopt's own (already scheduled) 2:4 kernels are not tuning tasks, and the
    database reaches the build. (Measuring needs the GPU: MetaSchedule's LocalRunner runs the candidates there.)"""
    from graphopt.targets.tvm import build
    from graphopt.targets.tvm.gpu import pipeline
    from graphopt.targets.tvm.lower import lower_to_relax
    g = head_graph(True)
    sparse = {"min_speedup": 1.0, "records": {}}
    fused = pipeline.fuse_for_cuda(lower_to_relax(g, "cuda", sparse), pipeline.cuda_target("sm_80"))
    names = pipeline.tunable_functions(fused)
    assert names and not any("sp24" in n for n in names)
    assert any("sp24" in gv.name_hint for gv in fused.functions)
    seen = {}

    def fake_tune(mod, target, precision, trials, work_dir):
        seen.update(trials=trials, work_dir=work_dir, precision=precision)
        return "the-database"

    def fake_build(mod, target, precision, database=None, cuda_graph=False):
        seen["database"] = database
        raise RuntimeError("stop here")

    monkeypatch.setattr("graphopt.targets.tvm.gpu.device.cuda_available", lambda: True)
    monkeypatch.setattr(pipeline, "tune_cuda", fake_tune)
    monkeypatch.setattr(pipeline, "build_cuda", fake_build)
    with pytest.raises(TargetError, match="stop here"):
        build.build_gpu_executable(g, "cuda", ["sm_80"], "fp16", graphopt.Tuning(trials=8, db=str(tmp_path)))
    assert seen == {"trials": 8, "work_dir": str(tmp_path), "precision": "fp16", "database": "the-database"}


class SamePad(nn.Module):
    """EfficientNet-Lite's pattern: 1x1 conv + ReLU6 + an asymmetric zero pad before a stride-2 depthwise conv."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(8, 48, 1)
        self.dw = nn.Conv2d(48, 48, 3, stride=2, groups=48)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.pw(x))
        return self.dw(torch.nn.functional.pad(y, (0, 1, 0, 1)))


@needs_nvcc
def test_a_dlight_rule_that_fails_on_a_function_falls_through_to_the_next():
    """dlight's matmul rule asserts on a 1x1 conv whose fused epilogue pads its output (TVM 0.27); the build takes
    the next rule for that function instead of failing (EfficientNet-Lite0 did)."""
    from graphopt.targets.tvm.build import build_gpu_executable
    torch.manual_seed(0)
    g = graphopt.trace(SamePad().eval(), (torch.randn(1, 8, 28, 28),))
    ex, *_ = build_gpu_executable(g, "cuda", ["sm_80"], "fp16")
    assert ex is not None


def test_dlight_matmul_takes_float_matmuls_with_an_int8_mask_epilogue_and_declines_int8_operands():
    """The int8 MiniLM's attention scores (fp16 q @ k^T fused with `where(int8 mask, ...)`) were declined by the
    matmul rule for the int8 mask parameter and took dlight's reduction rule (one 256-thread block an output
    element); only the reduction's own operands decide now. int8 x int8 matmuls still decline (TVM 0.27's int8
    tensor-core path does not lower)."""
    from tvm import relax

    from graphopt.targets.tvm.gpu.pipeline import _FloatMatmul, cuda_target, fuse_for_cuda

    def fused_matmul(dtype):
        bb = relax.BlockBuilder()
        q = relax.Var("q", relax.TensorType((1, 2, 32, 16), dtype))
        k = relax.Var("k", relax.TensorType((1, 2, 16, 32), dtype))
        mask = relax.Var("mask", relax.TensorType((1, 1, 32, 32), "int8"))
        with bb.function("main", [q, k, mask]):
            with bb.dataflow():
                s = bb.emit(relax.op.matmul(q, k, out_dtype="float32"))
                s = bb.emit(relax.op.multiply(s, relax.const(0.25, "float32")))
                keep = bb.emit(relax.op.not_equal(mask, relax.const(0, "int8")))
                out = bb.emit_output(bb.emit(relax.op.where(keep, s, relax.const(-1e4, "float32"))))
            bb.emit_func_output(out)
        tgt = cuda_target("sm_80")
        fused = fuse_for_cuda(bb.get(), tgt, "fp32")
        [func] = [f for gv, f in fused.functions.items() if "matmul" in gv.name_hint]
        assert any(str(p.dtype) == "int8" for p in func.params)  # the mask is the fused function's parameter
        return func, tgt

    func, tgt = fused_matmul("float16")
    with tgt:
        assert _FloatMatmul().apply(func, tgt, False) is not None
    func, tgt = fused_matmul("int8")
    with tgt:
        assert _FloatMatmul().apply(func, tgt, False) is None


def test_half_precision_stores_embedding_tables_in_half_width():
    """MiniLM's artifact was mostly its fp32 word-embedding table: with fp16/bf16 the table is stored and gathered
    in half width and the rows widened back to fp32; fp32 keeps it."""
    from graphopt.targets.tvm.gpu.pipeline import cuda_target, fuse_for_cuda
    from graphopt.targets.tvm.lower import lower_to_relax

    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(1000, 64)
            self.fc = nn.Linear(64, 8)

        def forward(self, i):
            return self.fc(self.e(i))

    g = graphopt.trace(Embed().eval(), (torch.randint(0, 1000, (1, 16)),))
    for precision, dtype in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")):
        fused = fuse_for_cuda(lower_to_relax(g, "cuda"), cuda_target("sm_80"), precision)
        takes = [ln for ln in fused["main"].script(show_meta=False).splitlines() if "R.call_tir(take" in ln]
        assert takes and all(f'dtype="{dtype}"' in ln for ln in takes), (precision, takes)
        # the half-width gather keeps the embedding's bounds check (a NaN row for an id outside the table): the
        # rewrite had dropped it for take's default "fast" mode, which reads past the table on a bad id (TVM
        # warned "Fast mode segfaults" building MiniLM for cuda)
        take = [f for gv, f in fused.functions.items() if gv.name_hint.startswith("take")]
        assert take and all("T.if_then_else(T.int64(0) <=" in f.script() for f in take), precision


def test_gpu_target_errors():
    g = head_graph(False)
    # a CPU sparse layout (BSR) has no cuda kernel: the node and what to do instead, before any TVM work
    torch.manual_seed(0)
    lin = graphopt.trace(nn.Sequential(nn.Linear(64, 64)).eval(), (torch.randn(4, 64),))
    lin = graphopt.optimize(lin, "sparsify{sparsity=0.8 block=4x4}")

    class AlwaysSparse:
        def measure(self, op, shape, layout, w):
            return 1.0 if layout == "dense" else 0.1

    bsr = graphopt.optimize(lin, "select-sparse-layout{candidates=dense,bsr4x4}", target=AlwaysSparse())
    with pytest.raises(graphopt.GraphoptError, match="bsr_linear.*no BSR kernel.*target='cuda'"):
        graphopt.compile(bsr, "cuda", output="unused")
    with pytest.raises(graphopt.GraphoptError, match="or sp24"):
        graphopt.optimize(lin, "select-sparse-layout{candidates=dense,sp25}", target="cuda")
    with pytest.raises(TargetError, match="unknown CUDA architecture sm_70"):
        graphopt.compile(g, "cuda", output="unused", cuda_arch="sm_70")
    with pytest.raises(TargetError, match="precision"):
        graphopt.compile(g, "cuda", output="unused", precision="int3")
    with pytest.raises(TargetError, match="GPU"):
        graphopt.compile(g, "cuda", graphopt.Tuning(trials=4), output="unused")
    with pytest.raises(TargetError, match="min-speedup"):
        graphopt.compile(g, "cuda-sparse", output="unused", sparse_min_speedup=0.5)


def test_missing_nvcc_is_a_clear_error(monkeypatch):
    from graphopt.targets.tvm.gpu import fatbin
    monkeypatch.setattr(fatbin.shutil, "which", lambda _: None)
    monkeypatch.setenv("CUDA_HOME", "/nonexistent")
    with pytest.raises(TargetError, match="nvcc"):
        fatbin.nvcc_path()


@needs_nvcc
@pytest.mark.skipif(cuda_available(), reason="checks the message shown where there is no GPU")
def test_loading_a_cuda_artifact_without_a_gpu_says_so(tmp_path):
    out = graphopt.compile(head_graph(False), "cuda", output=tmp_path / "a", cuda_arch="sm_80")
    with pytest.raises(ArtifactError, match="no CUDA GPU"):
        graphopt.load(out)


@needs_gpu
@needs_nvcc
@pytest.mark.parametrize("target", ["cuda", "cuda-sparse"])
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_artifact_matches_the_graph_on_the_gpu(tmp_path, target, cuda_graph):
    g = head_graph(target == "cuda-sparse")
    out = graphopt.compile(g, target, output=tmp_path / "a", sparse_min_speedup=1.0, cuda_graph=cuda_graph)
    art = graphopt.load(out)
    for _ in range(3):  # the CUDA graph captured on the first call must read each call's input
        x = torch.randn(1, 3, 8, 8)
        np.testing.assert_allclose(art(x.numpy())[0], g.run(x)[0].numpy(), rtol=2e-2, atol=2e-2)  # fp16 compute


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(1024, 2048)
        self.small = nn.Linear(2048, 16)

    def forward(self, x):
        return self.small(torch.relu(self.big(x)))


def test_select_sparse_layout_for_cuda_uses_the_cost_table_without_a_gpu(tmp_path, monkeypatch):
    from graphopt.targets.tvm.gpu import cost
    monkeypatch.setattr("graphopt.targets.tvm.gpu.device.cuda_available", lambda: False)
    torch.manual_seed(0)
    g = graphopt.trace(Mlp().eval(), (torch.randn(2048, 1024),))
    g = graphopt.optimize(g, "sparsify-nm{n=2 m=4}")
    out = graphopt.optimize(g, "select-sparse-layout{candidates=dense,sp24 min-speedup=1.05}", target="cuda")
    recs = out.meta["sparse_layout"]
    big, small = recs["big_weight"], recs["small_weight"]
    # 2048x1024x2048 = 4.3G MACs: the table's 1.2x row (>= 1.05); 2048x2048x16 is launch-bound, no gain
    assert big["choice"] == "sp24" and small["choice"] == "dense"
    assert big["timing_source"].startswith("estimated") and big["timings_us"]["sp24"] < big["timings_us"]["dense"]
    assert sp.estimated_speedup(64, 512, 512) == 1.0 and sp.estimated_speedup(8192, 8192, 8192) == 1.25
    x = torch.randn(2048, 1024)
    torch.testing.assert_close(out.run(x)[0], g.run(x)[0])  # a decision, not a rewrite: numerics unchanged
    assert isinstance(cost.CudaCostOracle().measure("linear", (64, 512, 512), "dense"), float)
    # a min-speedup above the table's 1.2x keeps the layer dense
    strict = graphopt.optimize(g, "select-sparse-layout{candidates=dense,sp24 min-speedup=1.3}", target="cuda")
    assert strict.meta["sparse_layout"]["big_weight"]["choice"] == "dense"
    with pytest.raises(graphopt.GraphoptError, match="candidates are dense and sp24"):
        graphopt.optimize(g, "select-sparse-layout{candidates=dense,csr}", target="cuda")
    # no candidates given: the GPU's (the CPU's default list had been that error)
    plain = graphopt.optimize(g, "select-sparse-layout{min-speedup=1.05}", target="cuda")
    assert {r["choice"] for r in plain.meta["sparse_layout"].values()} == {"sp24", "dense"}
    with pytest.raises(graphopt.GraphoptError, match="target='cuda'"):
        graphopt.optimize(g, "select-sparse-layout{candidates=dense,sp24}", target="llvm")
    if shutil.which("nvcc") or __import__("os").path.exists("/usr/local/cuda/bin/nvcc"):
        from graphopt.targets.artifact import read_manifest
        art = graphopt.compile(out, "cuda-sparse", output=tmp_path / "a", cuda_arch="sm_90", sparse_min_speedup=1.05)
        rec = read_manifest(art)["target_info"]["sparse_kernels"]
        assert rec["big_weight"]["choice"] == "sp24" and "select-sparse-layout, estimated" in rec["big_weight"]["source"]
        assert rec["small_weight"]["choice"] == "dense"


def test_artifacts_load_with_the_tvm_runtime_alone(tmp_path):
    """The GPU machine gets TVM's runtime without its compiler (the full wheel is too big to carry there): loading
    and running an artifact must not touch compiler-only modules. Checked on an llvm artifact in a fresh process."""
    import subprocess
    import sys
    torch.manual_seed(0)
    g = graphopt.trace(nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval(), (torch.randn(2, 8),))
    out = graphopt.compile(g, "llvm", output=tmp_path / "a")
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, tvm, graphopt\n"
            "assert tvm.base._RUNTIME_ONLY\n"
            f"y = graphopt.load(r'{out}')(np.load(r'{tmp_path / 'x.npy'}'))[0]\n"
            f"np.save(r'{tmp_path / 'y.npy'}', y)\n")
    env = dict(__import__("os").environ, TVM_USE_RUNTIME_LIB="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), g.run(torch.from_numpy(x))[0].numpy(), rtol=1e-5,
                               atol=1e-5)


@needs_nvcc
def test_an_nvcc_failure_names_the_archs_and_keeps_the_source(tmp_path):
    from pathlib import Path

    from graphopt.targets.tvm.gpu.fatbin import compile_fatbin
    with pytest.raises(TargetError, match="sm_90") as e:
        compile_fatbin("this is not CUDA;", ["sm_90"], tmp_path)
    kept = Path(str(e.value).split("source kept at ")[1].split(")")[0])
    assert kept.read_text() == "this is not CUDA;" and tmp_path not in kept.parents


def test_bool_tensors_cross_kernels_as_int8_and_keep_their_meaning():
    """TVM 0.27's CUDA codegen loads bool vectors as ushort2 (and nvcc rejects its `!` on them), which broke the int8
    MiniLM's attention kernel, whose bool mask several fused matmul kernels read: the cuda pipeline makes them read
    an int8 copy. Checked here: after the pipeline's fusion no kernel takes a bool tensor (without the rewrite one
    does), and the outputs are unchanged (run on the CPU)."""
    import tvm
    from tvm import relax, tirx

    from graphopt.targets.tvm.gpu import pipeline
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            # a row mask made by a reduction kernel, read by two matmul kernels' epilogues
            mask = bb.emit(relax.op.greater(relax.op.sum(x, axis=[1], keepdims=True), relax.const(0.0)))
            a = bb.emit(relax.op.where(mask, bb.emit(relax.op.matmul(x, x)), relax.const(-1.0)))
            nm = bb.emit(relax.op.logical_not(mask))
            b = bb.emit(relax.op.where(nm, bb.emit(relax.op.matmul(x, relax.op.permute_dims(x))), relax.const(0.0)))
            out = bb.emit_output(relax.op.matmul(a, b))  # both epilogues end their kernels
        bb.emit_func_output(out)
    mod = bb.get()

    def bool_params(m):  # kernels with a bool tensor parameter (read off their signatures)
        return [gv.name_hint for gv, f in m.functions.items() if isinstance(f, tirx.PrimFunc)
                and '"bool")' in next(ln for ln in f.script().splitlines() if ln.lstrip().startswith("def "))]
    tgt = pipeline.cuda_target("sm_90")
    assert bool_params(pipeline.fuse_for_cuda(mod, tgt, "fp32")) == []
    with tgt:
        plain = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                          relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    assert bool_params(plain), "the example must make a kernel read a bool tensor without the rewrite"
    xin = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    outs = []
    for m in (mod, pipeline.bool_as_int8()(mod)):
        ex = relax.build(m, target="llvm")
        outs.append(relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(xin)).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    rows = xin.sum(1, keepdims=True) > 0
    np.testing.assert_allclose(outs[1], np.where(rows, xin @ xin, -1) @ np.where(rows, 0, xin @ xin.T),
                               rtol=1e-4, atol=1e-4)
