"""Prepare what benchmarks/gpu_check.sh carries to the GPU machine (run here; no GPU needed): `.gpu_check/` with
  - tvm-runtime.tar.xz: TVM's runtime alone (the compiler library left out: the kernels are compiled here),
  - wheels/: apache-tvm-ffi for the GPU machine's Python (3.12),
  - kernels/*.so + kernels/index.json: GEMM and conv kernels (MiniLM-L6 and MobileNetV2 shapes, and large GEMMs),
    dlight's dense fp16 and int8, graphopt's dense tensor-core kernels (mma.sync fp16 and int8) and 2:4 sparse fp16
    and int8 (mma.sp; the simple kernel and the one staging activations in shared memory), the tiled ones in several
    tile shapes, weights as inputs, cross-compiled for sm_90 with nvcc,
  - minilm/ (by default; --models adds minilm_int8, mobilenet_v2, efficientnet_lite0): fp16 cuda artifacts of
    shipped models and their fp32 PyTorch outputs on the shipped sentences or photos.

    python benchmarks/gpu_check_prepare.py [--arch sm_90] [--skip-model] [--models minilm,mobilenet_v2]
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
# tile shapes (row tiles per warp, column tiles per warp, row warps, column warps[, pipelined]) tried besides the
# default (2, 4, 4, 2): on every GEMM the pipelined default; on the large ones also 128 x 128 blocks with more reuse
# of each weight (2, 8, 4, 2) or activation (4, 4, 2, 4) register, and the pipelined 128 x 128
TILE_VARIANTS_SMALL = [(2, 4, 4, 2, 1)]
TILE_VARIANTS = [(2, 8, 4, 2), (4, 4, 2, 4), (2, 4, 4, 2, 1), (2, 8, 4, 2, 1)]
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


def build_kernels(arch: str, out: Path) -> list[dict]:
    from tvm import relax

    from graphopt.targets.tvm.gpu.pipeline import build_cuda, cuda_target
    from graphopt.targets.tvm.gpu.sparse import (DENSE_FORMATS, FORMATS, dense_kernel_tiled, sp24_kernel,
                                                 sp24_kernel_tiled)
    tgt = cuda_target(arch)
    index = []

    def build(name, kind, shape, params, body, tiles=None):
        file = f"{kind}_{len(index)}.so"
        _export(build_cuda(_relax_main(params, body), tgt, "fp32"), out / file, arch)
        index.append({"name": name, "kind": kind, "shape": list(shape), "file": file, "tiles": tiles})
        print(f"  built {kind:<8} {name} {tiles or ''}", flush=True)

    def call(kern, name, ydtype, m, n):
        def body(bb, *args):
            gv = bb.add_func(kern, name)
            return bb.emit(relax.call_tir(gv, list(args), relax.TensorType((m, n), ydtype)))
        return body

    for name, m, k, n in GEMMS:
        build(name, "dense16", (m, k, n), [("x", (m, k), "float16"), ("w", (n, k), "float16")],
              lambda bb, x, w: bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)), out_dtype="float32")))
        build(name, "int8", (m, k, n), [("x", (m, k), "int8"), ("w", (n, k), "int8")],
              lambda bb, x, w: bb.emit(relax.op.matmul(x, bb.emit(relax.op.permute_dims(w)), out_dtype="int32")))
        for kind, fmt, xdtype, ydtype in (("sp24", "f16", "float16", "float32"), ("sp24s8", "s8", "int8", "int32"),
                                          ("sp24t", "f16", "float16", "float32"),
                                          ("sp24ts8", "s8", "int8", "int32")):
            tk = FORMATS[fmt].tile_k
            if n % 16 or k % tk:
                continue
            kern = (sp24_kernel_tiled(m, k, n, False, fmt) if kind.startswith("sp24t")
                    else sp24_kernel(m, k, n, False, "tk", xdtype, fmt))

            def sparse_body(bb, x, wv, wm, b, kern=kern, m=m, n=n, ydtype=ydtype):
                gv = bb.add_func(kern, "sp24")
                return bb.emit(relax.call_tir(gv, [x, wv, wm, b], relax.TensorType((m, n), ydtype)))
            build(name, kind, (m, k, n), [("x", (m, k), xdtype), ("wv", (n // 16, k // tk, 32, 4), "uint32"),
                                          ("wm", (n // 16, k // tk, 32), "uint32"), ("b", (n,), "float32")],
                  sparse_body)
        # graphopt's own dense tensor-core kernels (the 2:4 kernel's design on mma.sync), default tiles and, on the
        # large GEMMs, the other tile shapes worth measuring
        variants = [None] + (TILE_VARIANTS if m >= 2048 else TILE_VARIANTS_SMALL)
        for tiles in variants:
            for kind, fmt, xdtype, ydtype in (("dense16t", "f16", "float16", "float32"),
                                              ("int8t", "s8", "int8", "int32")):
                if n % 16 or k % 64:
                    continue
                build(name, kind, (m, k, n), [("x", (m, k), xdtype),
                                              ("wv", (n // 16, k // DENSE_FORMATS[fmt].tile_k, 32, 4), "uint32"),
                                              ("b", (n,), "float32")],
                      call(dense_kernel_tiled(m, k, n, False, fmt, tiles), "dense", ydtype, m, n), tiles)
            if tiles:
                for kind, fmt, xdtype, ydtype in (("sp24t", "f16", "float16", "float32"),
                                                  ("sp24ts8", "s8", "int8", "int32")):
                    tk = FORMATS[fmt].tile_k
                    if n % 16 or k % tk:
                        continue
                    build(name, kind, (m, k, n), [("x", (m, k), xdtype), ("wv", (n // 16, k // tk, 32, 4), "uint32"),
                                                  ("wm", (n // 16, k // tk, 32), "uint32"), ("b", (n,), "float32")],
                          call(sp24_kernel_tiled(m, k, n, False, fmt, tiles), "sp24", ydtype, m, n), tiles)
    for name, cin, cout, size, ks, stride, groups in CONVS:
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


# (artifact folder, zoo model, pipeline): MiniLM's linears run on graphopt's dense tensor-core kernel, the CNNs' convs
# on dlight; the int8 MiniLM's on the int8 one.
MODELS = (("mobilenet_v2", "mobilenet_v2", "fold-bn"), ("efficientnet_lite0", "efficientnet_lite0", "fold-bn"),
          ("minilm", "minilm", ""), ("minilm_int8", "minilm", "quantize,fold-qdq"))


def model_artifact(out: Path, arch: str, folder: str, name: str, pipeline: str) -> None:
    """The fp16 cuda artifact of a shipped model (optimized by `pipeline`) and its fp32 PyTorch outputs on the
    shipped photos or sentences (inputs x0, x1, ... stacked over samples; ref stacked likewise)."""
    import graphopt
    from graphopt.zoo import calibration_inputs, eval_inputs
    g0 = graphopt.load_model(f"zoo:{name}")
    g = graphopt.optimize(g0, pipeline, data=calibration_inputs(name)) if pipeline else g0
    graphopt.compile(g, "cuda", output=out / folder, cuda_arch=arch, precision="fp16")
    samples = eval_inputs(name)
    io = {f"x{i}": np.stack([s[i].numpy() for s in samples]) for i in range(len(samples[0]))}
    io["ref"] = np.stack([g0.run(*s)[0].numpy() for s in samples])
    if pipeline:  # what the optimized graph computes (int8 for quantize): the GPU artifact must match it, too
        io["ref_graph"] = np.stack([g.run(*s)[0].numpy() for s in samples])
    np.savez_compressed(out / f"{folder}_io.npz", **io)
    print(f"  built {folder} fp16 artifact", flush=True)


CARRY_LIMIT = 60 << 20  # the device tool carries 64 MiB with the working tree (about 2 MiB)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (the H200 is sm_90)")
    ap.add_argument("--skip-model", action="store_true", help="kernels only (no model artifacts)")
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
        index = build_kernels(args.arch, work / "kernels")
        (work / "kernels" / "index.json").write_text(json.dumps({"arch": args.arch, "kernels": index}, indent=1))
        runtime_tarball(work)
        ffi_wheel(work)
        if not args.skip_model:
            for folder, name, pipeline in MODELS:
                if folder in wanted:
                    model_artifact(work, args.arch, folder, name, pipeline)
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
