"""Prepare what benchmarks/gpu_check.sh carries to the GPU machine (run here; no GPU needed): `.gpu_check/` with
  - tvm-runtime.tar.xz: TVM's runtime alone (the compiler library left out: the kernels are compiled here),
  - wheels/: apache-tvm-ffi for the GPU machine's Python (3.12),
  - kernels/*.so + kernels/index.json: GEMM and conv kernels (MiniLM-L6 and MobileNetV2 shapes, and large GEMMs),
    dlight's dense fp16 and int8, graphopt's multistage tensor-core kernels (dense on mma.sync and 2:4 on mma.sp,
    fp16 and int8, at the tiles the build picks and one other shape), its simple 2:4 kernel and the Hopper wgmma
    kernels (sm_90a builds), weights as inputs, cross-compiled for sm_90 with nvcc (--quick: the
    tensor-core kernels alone; --explore: the large GEMMs and the instructions alone),
  - minilm/ (by default; --models picks others from MODELS: the int8 MiniLM, the CNNs, sm_90a builds, CUDA-graph
    builds, the 2:4 MLP): fp16 cuda artifacts of shipped models and their fp32 PyTorch outputs on the shipped
    sentences or photos.

    python benchmarks/gpu_check_prepare.py [--arch sm_90] [--quick | --explore | --skip-kernels] [--skip-model]
        [--models minilm,mobilenet_v2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".gpu_check"

# (name, m = activation rows, k, n = output features)
GEMMS = [("minilm qkv/out 128x384x384", 128, 384, 384), ("minilm ffn-up 128x384x1536", 128, 384, 1536),
         ("minilm ffn-down 128x1536x384", 128, 1536, 384),
         ("mnv2 pw 28x28 32->192", 784, 32, 192), ("mnv2 pw 14x14 384->64", 196, 384, 64),
         ("mnv2 pw 7x7 960->320", 49, 960, 320), ("mnv2 pw 7x7 320->1280", 49, 320, 1280),
         ("large 2048^3", 2048, 2048, 2048), ("large 4096^3", 4096, 4096, 4096), ("large 8192^3", 8192, 8192, 8192)]
# the multistage kernels (targets/tvm/gpu/gemm.py): (row tiles per warp, column tiles per warp, row warps, column
# warps, k-steps per stage, stages). Each GEMM gets the tiles the build picks (gemm.pipeline_tiles) and the other
# shape of the two the build chooses between; 2026-12-04's runs measured more (see pipeline_tiles).
PIPE_VARIANTS = {False: [(1, 4, 2, 2, 2, 4), (4, 8, 2, 2, 2, 4)], True: [(1, 4, 2, 2, 1, 4), (4, 8, 2, 2, 2, 3)]}
# the Hopper wgmma kernels (targets/tvm/gpu/wgmma.py, sm_90a): (warpgroups, columns a block, k-steps a stage,
# stages[, 128-byte swizzle]); the first two are the build's large tiles (wgmma.WG_LARGE). Measured on the H200
# (2026-12-04, benchmarks/results/gpu_check_h200_s50*.json, ..._s51*.json): 2 x 128, 2 x 192 and 2 x 224 columns,
# 5-6 stages, 3 warpgroups, and every tile without the swizzle (1.9-2x) slower; a grouped raster of 8 or 16 row
# blocks (as gemm.raster, tried in ..._s51_int8.json) within 2% either way, dense and 2:4 alike.
WG_VARIANTS = [(2, 256, 4, 4, 1), (4, 128, 4, 4, 1), (2, 192, 4, 4, 1)]
WG_VARIANTS_SMALL = [(2, 128, 4, 3, 1), (1, 64, 4, 3, 1), (1, 32, 4, 3, 1), (1, 16, 4, 4, 1)]  # MiniLM / MNv2 sizes
# 2:4 on wgmma.mma_async.sp (a k-step reads 64 bytes of a column: 2 a stage fill the swizzle's 128): the dense
# kernel's best blocks, and deeper pipelines (a 2:4 stage holds half the weight bytes of a dense one). Measured on the
# H200 (2026-12-04, benchmarks/results/gpu_check_h200_s51*.json): 2 x 256 x 4 stages fastest in fp16 (1.15-1.26x
# the dense wgmma kernel), 4 x 128 in int8; 4 x 128 with 5 stages, 2 x 128 with 6 slower than with 4.
WG_SPARSE_VARIANTS = [(2, 256, 2, 4, 1), (4, 128, 2, 4, 1), (2, 128, 2, 4, 1)]
WG_SPARSE_VARIANTS_SMALL = [(1, 16, 2, 4, 1), (1, 32, 2, 3, 1)]  # wg_tiles picks one of these
# --explore: MiniLM's and the large GEMMs alone: the multistage kernels at the build's tiles, every wgmma variant, the
# instructions alone. (2026-12-04's explore runs also measured a grouped raster, groups of 16 and stages of 4
# instruction steps: benchmarks/results/gpu_check_h200_s49_explore.json.)
# (name, c_in, c_out, size, kernel, stride, groups)
CONVS = [("mnv2 stem 3->32 3x3/2 224", 3, 32, 224, 3, 2, 1), ("mnv2 dw 144 3x3 56", 144, 144, 56, 3, 1, 144),
         ("mnv2 pw 56x56 24->144", 24, 144, 56, 1, 1, 1), ("mnv2 pw 14x14 384->64", 384, 64, 14, 1, 1, 1)]


def _export(ex, path: Path, arch: str) -> None:
    from graphopt.targets.tvm.gpu.fatbin import fatbin_packer
    ex.export_library(str(path), fpack_imports=fatbin_packer([arch], {}), options=["-s"])


def _relax_main(params, body):
    from tvm import relax
    bb = relax.BlockBuilder()
    xs = [relax.Var(name, relax.TensorType(shape, dtype)) for name, shape, dtype in params]
    with bb.function("main", xs):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *xs))
        bb.emit_func_output(out)
    return bb.get()


PEAK_BLOCKS, PEAK_ITERS, PEAK_TILES = 132 * 8, 512, 32


def mma_peak_kernel(fmt: str, sparse: bool):
    """The tensor-core instruction alone, to tell the kernels' ceiling: PEAK_BLOCKS blocks of 4 warps, each warp
    PEAK_ITERS rounds of one instruction on each of PEAK_TILES independent accumulator tiles, operands in registers
    (seeded from x so nothing folds away), y[thread] = the sum of its accumulators."""
    import tvm.backend.cuda  # noqa: F401  (registers T.ptx)
    from tvm.script import tirx as T

    from graphopt.targets.tvm.gpu.sparse import dense_fmt_of, fmt_of
    f = fmt_of(fmt) if sparse else dense_fmt_of(fmt)
    reg_acc = "uint32" if f.name == "s8" else "float32"
    threads = PEAK_BLOCKS * 128

    def mma(acc, a, b, meta, q):
        if sparse:
            return T.ptx[f.ptx](acc[q], acc[q + 1], acc[q + 2], acc[q + 3], a[0], a[1], a[2], a[3], b[0], b[1],
                                b[2], b[3], acc[q], acc[q + 1], acc[q + 2], acc[q + 3], meta[0], 0)
        return T.ptx[f.ptx](acc[q], acc[q + 1], acc[q + 2], acc[q + 3], a[0], a[1], a[2], a[3], b[0], b[1],
                            acc[q], acc[q + 1], acc[q + 2], acc[q + 3])

    @T.prim_func(private=True)
    def kernel(x: T.Buffer((threads,), "uint32"), y: T.Buffer((threads,), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        bx = T.launch_thread("blockIdx.x", PEAK_BLOCKS)
        tx = T.launch_thread("threadIdx.x", 128)
        acc = T.alloc_buffer((PEAK_TILES * 4,), reg_acc, scope="local")
        a = T.alloc_buffer((4,), "uint32", scope="local")
        b = T.alloc_buffer((4,), "uint32", scope="local")
        meta = T.alloc_buffer((1,), "uint32", scope="local")
        meta[0] = T.uint32(0x44444444) | (x[bx * 128 + tx] & T.uint32(0))  # chunks keep inputs 0 and 1: valid
        for i in T.unroll(4):
            a[i] = x[bx * 128 + tx] & T.uint32(0x3C003C00 if f.name != "s8" else 0x01010101)
            b[i] = x[bx * 128 + tx] & T.uint32(0x3C003C00 if f.name != "s8" else 0x01010101)
        for i in T.unroll(PEAK_TILES * 4):
            acc[i] = T.Cast(reg_acc, 0)
        for _it in range(PEAK_ITERS):
            for t in T.unroll(PEAK_TILES):
                mma(acc, a, b, meta, t * 4)
        total = T.alloc_buffer((1,), "float32", scope="local")
        total[0] = T.float32(0)
        for i in T.unroll(PEAK_TILES * 4):
            total[0] = total[0] + T.Cast("float32", acc[i])
        y[bx * 128 + tx] = total[0]
    return kernel


def build_kernels(arch: str, out: Path, quick: bool = False, explore: bool = False) -> list[dict]:
    """Every kernel to measure; quick: graphopt's multistage tensor-core kernels only (every variant), without
    dlight's kernels, the simple 2:4 kernel and the convs; explore: MiniLM's and the large GEMMs, the build's tiles and
    every wgmma variant."""
    quick = quick or explore
    from tvm import relax

    from graphopt.targets.tvm.gpu.gemm import pipeline_fit, pipeline_tiles, tc_kernel_pipelined
    from graphopt.targets.tvm.gpu.pipeline import build_cuda, cuda_target
    from graphopt.targets.tvm.gpu.sparse import DENSE_FORMATS, FORMATS, sp24_kernel
    from graphopt.targets.tvm.gpu.wgmma import wg_fit, wg_tiles, wgmma_kernel
    tgt = cuda_target(arch)
    index = []

    def build(name, kind, shape, params, body, tiles=None, kernel_arch=None):
        file = f"{kind}_{len(index)}.so"
        target = cuda_target(kernel_arch) if kernel_arch else tgt
        _export(build_cuda(_relax_main(params, body), target, "fp32"), out / file, kernel_arch or arch)
        index.append({"name": name, "kind": kind, "shape": list(shape), "file": file, "tiles": tiles})
        print(f"  built {kind:<8} {name} {tiles or ''}", flush=True)

    def call(kern, ydtype, m, n):
        def body(bb, *args):
            gv = bb.add_func(kern, "tc")
            return bb.emit(relax.call_tir(gv, list(args), relax.TensorType((m, n) if n else (m,), ydtype)))
        return body

    def packed_params(m, k, n, xdtype, f, sparse):
        params = [("x", (m, k), xdtype), ("wv", (n // 16, k // f.tile_k, 32, 4), "uint32")]
        params += [("wm", (n // 16, k // f.tile_k, 32), "uint32")] if sparse else []
        return params + [("b", (n,), "float32")]

    for kind, fmt, sparse, ops in (("peak_f16", "f16", False, 16 * 8 * 16 * 2),
                                   ("peak_s8", "s8", False, 16 * 8 * 32 * 2),
                                   ("peak_sp_f16", "f16", True, 16 * 8 * 32 * 2)):
        threads = PEAK_BLOCKS * 128
        build(f"{fmt} {'mma.sp' if sparse else 'mma.sync'} alone", kind, (threads,),
              [("x", (threads,), "uint32")], call(mma_peak_kernel(fmt, sparse), "float32", threads, None))
        index[-1]["ops"] = PEAK_BLOCKS * 4 * PEAK_ITERS * PEAK_TILES * ops  # dense-equivalent multiply-adds x 2
    for name, m, k, n in [g for g in GEMMS if g[1] >= 2048 or g[1] == 128] if explore else GEMMS:
        # graphopt's multistage tensor-core kernels (targets/tvm/gpu/gemm.py): the default tiles and the variants
        for kind, fmt, sparse, xdtype, ydtype in (("dense16p", "f16", False, "float16", "float32"),
                                                  ("int8p", "s8", False, "int8", "int32"),
                                                  ("sp24p", "f16", True, "float16", "float32"),
                                                  ("sp24ps8", "s8", True, "int8", "int32")):
            f = (FORMATS if sparse else DENSE_FORMATS)[fmt]
            for tiles in [pipeline_tiles(m, n, sparse)] if explore else PIPE_VARIANTS[sparse]:
                if pipeline_fit(m, k, n, sparse, fmt, tiles):
                    continue
                build(name, kind, (m, k, n), packed_params(m, k, n, xdtype, f, sparse),
                      call(tc_kernel_pipelined(m, k, n, False, fmt, sparse, tiles), ydtype, m, n), list(tiles))
                index[-1]["build_default"] = tiles == pipeline_tiles(m, n, sparse)
        # the wgmma kernels, compiled for sm_90a (the arch-specific Hopper target wgmma needs); 2:4 on
        # wgmma.mma_async.sp
        for kind, fmt, sparse, xdtype, ydtype in (("dense16w", "f16", False, "float16", "float32"),
                                                  ("int8w", "s8", False, "int8", "int32"),
                                                  ("sp24w", "f16", True, "float16", "float32"),
                                                  ("sp24ws8", "s8", True, "int8", "int32")):
            f = (FORMATS if sparse else DENSE_FORMATS)[fmt]
            large = WG_SPARSE_VARIANTS if sparse else WG_VARIANTS
            for tiles in large if m >= 2048 else WG_SPARSE_VARIANTS_SMALL if sparse else WG_VARIANTS_SMALL:
                if wg_fit(m, k, n, fmt, tiles, sparse):
                    continue
                build(name, kind, (m, k, n), packed_params(m, k, n, xdtype, f, sparse),
                      call(wgmma_kernel(m, k, n, False, fmt, tiles, sparse), ydtype, m, n), list(tiles), "sm_90a")
                index[-1]["build_default"] = tiles == wg_tiles(m, n, fmt, sparse)
        if quick:
            continue
        build(name, "dense16", (m, k, n), [("x", (m, k), "float16"), ("w", (n, k), "float16")],
              lambda bb, x, w: bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)), out_dtype="float32")))
        build(name, "int8", (m, k, n), [("x", (m, k), "int8"), ("w", (n, k), "int8")],
              lambda bb, x, w: bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)), out_dtype="int32")))
        # the simple 2:4 kernel (no shared memory: what 1x1 convs at batch 1 run on)
        for kind, fmt, xdtype, ydtype in (("sp24", "f16", "float16", "float32"), ("sp24s8", "s8", "int8", "int32")):
            if n % 16 or k % FORMATS[fmt].tile_k:
                continue
            build(name, kind, (m, k, n), packed_params(m, k, n, xdtype, FORMATS[fmt], True),
                  call(sp24_kernel(m, k, n, False, "tk", xdtype, fmt), ydtype, m, n))
    for name, cin, cout, size, ks, stride, groups in ([] if quick else CONVS):
        build(name, "conv16", (cin, cout, size, ks, stride, groups),
              [("x", (1, cin, size, size), "float16"), ("w", (cout, cin // groups, ks, ks), "float16")],
              lambda bb, x, w, s=stride, p=ks // 2, g=groups: bb.emit(relax.op.nn.conv2d(
                  x, w, strides=s, padding=p, groups=g, out_dtype="float32")))
    return index


def runtime_tarball(out: Path) -> None:
    import tvm
    src = Path(tvm.__file__).parent
    skip = {"libtvm_compiler.so", "3rdparty", "src", "web", "__pycache__"}
    with tarfile.open(out / "tvm-runtime.tar.xz", "w:xz") as tar:
        tar.add(src, arcname="tvm", filter=lambda ti: None if Path(ti.name).name in skip else ti)


def ffi_wheel(out: Path) -> None:
    from importlib.metadata import version
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    v = version("apache-tvm-ffi")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "-d", str(wheels), f"apache-tvm-ffi=={v}"], check=True)


# (artifact folder, zoo model, pipeline, graphopt.compile options): MiniLM's linears run on graphopt's dense
# tensor-core kernel, the CNNs' convs on dlight; the int8 MiniLM's on the int8 one; the _90a ones are sm_90a builds
# (linears on wgmma); mobilenet_v2_graph / minilm_graph / minilm_int8_graph replay one CUDA graph (--cuda-graph),
# the others launch each kernel.
# mlp24*: a self-built MLP whose two 2048 x 2048 linears (1024 tokens: 4.3G multiply-adds each) are 2:4 -- on an
# sm_90a cuda-sparse build they run the 2:4 wgmma kernel; the _dense twins are the same masked weights built as cuda
# (the dense wgmma kernel): the model-level 2:4 speedup, fp16 and int8.
_90A, _24 = {"cuda_arch": "sm_90a"}, "sparsify-nm{n=2 m=4}"
MODELS = (("mobilenet_v2", "mobilenet_v2", "fold-bn", {}), ("efficientnet_lite0", "efficientnet_lite0", "fold-bn", {}),
          ("minilm", "minilm", "", {}), ("minilm_int8", "minilm", "quantize,fold-qdq", {}),
          ("mobilenet_v2_graph", "mobilenet_v2", "fold-bn", {"cuda_graph": True}),
          ("minilm_graph", "minilm", "", {"cuda_graph": True}),
          ("minilm_int8_graph", "minilm", "quantize,fold-qdq", {"cuda_graph": True}),
          ("minilm_90a", "minilm", "", _90A), ("minilm_int8_90a", "minilm", "quantize,fold-qdq", _90A),
          ("mlp24_90a", "mlp", _24, {**_90A, "target": "cuda-sparse"}), ("mlp24_dense_90a", "mlp", _24, _90A),
          ("mlp24_int8_90a", "mlp", _24 + ",quantize,fold-qdq", {**_90A, "target": "cuda-sparse"}),
          ("mlp24_int8_dense_90a", "mlp", _24 + ",quantize,fold-qdq", _90A))


def mlp_model():
    """(graph, calibration data, eval inputs) of the 2:4 test MLP: 64 -> 2048 -> 2048 -> 2048 -> 64 on 1024 tokens
    (small inputs and outputs to carry, two large GEMMs inside)."""
    import torch
    from torch import nn

    import graphopt
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 2048), nn.GELU(), nn.Linear(2048, 2048), nn.GELU(), nn.Linear(2048, 2048),
                      nn.GELU(), nn.Linear(2048, 64)).eval()
    data = [(torch.randn(1024, 64),) for _ in range(3)]
    return graphopt.trace(m, data[0]), data[1:], data


def model_artifact(out: Path, arch: str, folder: str, name: str, pipeline: str, target: str = "cuda",
                   cuda_arch: str | None = None, cuda_graph: bool = False) -> None:
    """The fp16 `target` artifact of a shipped model (or the test MLP) optimized by `pipeline` and its fp32 PyTorch
    outputs on the shipped photos or sentences (inputs x0, x1, ... stacked over samples; ref stacked likewise)."""
    import graphopt
    from graphopt.zoo import calibration_inputs, eval_inputs
    if name == "mlp":
        g0, calib, samples = mlp_model()
    else:
        g0, calib, samples = graphopt.load_model(f"zoo:{name}"), calibration_inputs(name), eval_inputs(name)
    # (optimized for the GPU target: quantize's auto widths and matmul choice follow its int8 product, not this CPU's)
    g = graphopt.optimize(g0, pipeline, data=calib, target=target) if pipeline else g0
    arch = cuda_arch or arch
    graphopt.compile(g, target, output=out / folder, cuda_arch=arch, precision="fp16", cuda_graph=cuda_graph)
    if name == "mlp":  # the reference is the masked model: what the 2:4 kernels must compute
        g0 = graphopt.optimize(g0, pipeline.split(",")[0])
    io = {f"x{i}": np.stack([s[i].numpy() for s in samples]) for i in range(len(samples[0]))}
    io["ref"] = np.stack([g0.run(*s)[0].numpy() for s in samples])
    if pipeline:  # what the optimized graph computes (int8 for quantize): the GPU artifact must match it, too
        io["ref_graph"] = np.stack([g.run(*s)[0].numpy() for s in samples])
    np.savez_compressed(out / f"{folder}_io.npz", **io)
    print(f"  built {folder} fp16 {target} artifact ({arch}{', CUDA graph' if cuda_graph else ''})", flush=True)


CARRY_LIMIT = 60 << 20  # the device tool carries 64 MiB with the working tree (about 2 MiB)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (the H200 is sm_90)")
    ap.add_argument("--skip-model", action="store_true", help="kernels only (no model artifacts)")
    ap.add_argument("--skip-kernels", action="store_true", help="model artifacts only (room for more of them under "
                    "the carry limit)")
    ap.add_argument("--quick", action="store_true",
                    help="graphopt's tensor-core kernels only (multistage mma.sync / mma.sp and wgmma; no dlight "
                         "kernels, no simple 2:4 kernel, no convs): a shorter run on the GPU")
    ap.add_argument("--explore", action="store_true",
                    help="MiniLM's and the large GEMMs alone: the multistage kernels at the build's tiles, every wgmma "
                         "variant (WG_VARIANTS), and the tensor-core instructions timed alone (implies --quick)")
    ap.add_argument("--models", default="minilm",
                    help="comma-separated artifacts to build, from: " + ", ".join(m[0] for m in MODELS)
                         + " (default minilm: the one on graphopt's tensor-core kernels; MiniLM's 44 MiB and the "
                         "CNNs' 17 MiB together pass the device's 64 MiB carry limit)")
    args = ap.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {m[0] for m in MODELS})
    if unknown:  # before the minutes of kernel building, not after
        ap.error(f"unknown model(s) {', '.join(unknown)} (choose from: {', '.join(m[0] for m in MODELS)})")
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        work = Path(tmp)
        (work / "kernels").mkdir()
        print("building kernels ...", flush=True)
        index = [] if args.skip_kernels else build_kernels(args.arch, work / "kernels", args.quick, args.explore)
        (work / "kernels" / "index.json").write_text(json.dumps({"arch": args.arch, "kernels": index}, indent=1))
        runtime_tarball(work)
        ffi_wheel(work)
        if not args.skip_model:
            for folder, name, pipeline, opts in MODELS:
                if folder in wanted:
                    model_artifact(work, args.arch, folder, name, pipeline, **opts)
        size = sum(p.stat().st_size for p in work.rglob("*") if p.is_file())
        if size > CARRY_LIMIT:
            print(f"gpu_check_prepare: {size / 2**20:.1f} MiB is more than the device carries with the repo "
                  f"({CARRY_LIMIT / 2**20:.0f} MiB); build fewer --models", file=sys.stderr)
            return 1
        if OUT.exists():
            shutil.rmtree(OUT)
        work.rename(OUT)
        Path(tmp).mkdir()  # TemporaryDirectory removes it again
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 2**20:.1f} MiB); carry it: run(command='bash benchmarks/gpu_check.sh', "
          "carry=['.gpu_check'])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
