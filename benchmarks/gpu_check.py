"""Runs on the GPU machine (see gpu_check.sh): correctness against PyTorch on the GPU and speed of graphopt's
prebuilt CUDA kernels (dense fp16, int8, 2:4 sparse on mma.sp, fp16 conv) on MiniLM-L6 and MobileNetV2 shapes,
2:4 vs dense vs PyTorch's to_sparse_semi_structured, and the MobileNetV2 fp16 artifact against its fp32 outputs.
Prints a table and writes JSON. Needs: torch with CUDA, numpy, the TVM runtime, graphopt (installed -e)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# kernel kinds (gpu_check_prepare.py): dlight's ("dense16", "int8"), the simple 2:4 kernel ("sp24", "sp24s8") and
# the multistage tensor-core kernels ("...p", targets/tvm/gpu/gemm.py) and the Hopper wgmma ones ("...w", wgmma.py)
GEMM_KINDS = ("dense16", "int8", "sp24", "sp24s8", "dense16p", "int8p", "sp24p", "sp24ps8", "dense16w", "int8w",
              "sp24w", "sp24ws8")
INT8_KINDS = ("int8", "sp24s8", "int8p", "sp24ps8", "int8w", "sp24ws8")


def cuda_time(fn, runs: int) -> float:
    """Seconds of GPU time per fn() call: `runs` calls captured in one CUDA graph, replayed between two CUDA events
    (so PyTorch's Python dispatch, which TVM's C++ time_evaluator does not pay, is not counted either); calls that
    cannot be captured are timed as a plain loop of `runs` calls between the events."""
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()  # warm up on the capture stream
            torch.cuda.synchronize()
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(runs):
                    fn()
        run = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time the plain loop
        torch.cuda.synchronize()

        def run():
            for _ in range(runs):
                fn()
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / runs)
    return float(np.median(times))


def mean_cosine(outs: np.ndarray, refs: np.ndarray) -> float:
    """Mean over samples of the cosine between each output and its reference."""
    return float(np.mean([np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)
                          for a, b in zip(outs, refs)]))


def eager_time(fn, runs: int) -> float:
    """Seconds per fn() call launched from Python one by one (what an eager PyTorch program pays, dispatch included),
    the way TVM's time_evaluator launches graphopt's kernels from C++."""
    import torch
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(runs):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3 / runs


def probe_s8_layout(vm, tvm, dev, shape) -> dict:
    """Which (row, input) of a 16 x 64 weight tile each metadata nibble and each value byte of the int8 mma.sp
    stands for, read off the hardware: all values 1 and every chunk keeping inputs (0, 1); moving one nibble to
    (2, 3), or doubling one value byte, changes the outputs of exactly the row and inputs it stands for."""
    m, k, n = shape
    nt, kt = n // 16, k // 64
    x = np.zeros((m, k), np.int8)
    j = np.arange(64)
    x[0, :64] = j % 4 >= 2  # +2 on the row whose chunk moved to (2, 3)
    x[1, :64] = (j // 4 + 1) * (j % 4 >= 2)  # +2 (chunk + 1)
    x[2, :64] = j + 1  # +(input + 1) for a doubled value
    wv = np.full((nt, kt, 32, 4), 0x01010101, np.uint32)
    wm = np.full((nt, kt, 32), 0x44444444, np.uint32)
    b = tvm.runtime.tensor(np.zeros(n, np.float32), device=dev)
    xt = tvm.runtime.tensor(x, device=dev)

    def run(wv_, wm_):
        return vm["main"](xt, tvm.runtime.tensor(wv_, device=dev), tvm.runtime.tensor(wm_, device=dev), b).numpy()
    y0 = run(wv, wm)
    meta, vals = {}, {}
    for lane in range(32):
        for nib in range(8):
            wm2 = wm.copy()
            wm2[0, 0, lane] = (int(wm2[0, 0, lane]) & ~(0xF << 4 * nib) | (0b1110 << 4 * nib)) & 0xFFFFFFFF
            d = run(wv, wm2) - y0
            rows = [int(r) for r in np.nonzero(d[0, :16])[0]]
            meta[f"{lane}.{nib}"] = [[r, int(d[1, r]) // 2 - 1] for r in rows]
        for reg in range(4 if lane < 4 else 0):  # values: one group of lanes (the layout repeats by group)
            for byte in range(4):
                wv2 = wv.copy()
                wv2[0, 0, lane, reg] = int(wv2[0, 0, lane, reg]) + (1 << 8 * byte)
                d = run(wv2, wm) - y0
                rows = [int(r) for r in np.nonzero(d[2, :16])[0]]
                vals[f"{lane}.{reg}.{byte}"] = [[r, int(d[2, r]) - 1] for r in rows]
    return {"meta (lane.nibble -> [row, chunk])": meta, "values (lane.reg.byte -> [row, input])": vals}


def load_helpers():
    """(cuda_runtime_loaded, the tensor-core kernel module (its packers), None) from graphopt; if graphopt does not
    import with the machine's own torch (its version is not ours), the two come from their source files alone (they
    need only numpy and TVM), the kernel checks still run, and the third item says why the model checks cannot."""
    try:
        from graphopt.runtime import cuda_runtime_loaded
        from graphopt.targets.tvm.gpu import sparse
        return cuda_runtime_loaded, sparse, None
    except Exception as e:  # noqa: BLE001
        import importlib.util
        import types
        why = f"graphopt did not import here ({type(e).__name__}: {e}); model checks skipped"
        stub = types.ModuleType("graphopt.errors")
        stub.TargetError = RuntimeError
        sys.modules["graphopt.errors"] = stub

        def load(name, rel):
            spec = importlib.util.spec_from_file_location(name, ROOT / rel)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
            return mod
        device = load("gpu_check_device", "targets/tvm/gpu/device.py")
        sparse = load("gpu_check_sparse", "targets/tvm/gpu/sparse.py")
        print(why, file=sys.stderr)
        return device.cuda_runtime_loaded, sparse, why


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=str(ROOT / ".gpu_check"))
    ap.add_argument("--json", default="gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=360, help="stop starting new kernels after this many seconds")
    args = ap.parse_args(argv)
    import torch
    import tvm
    from tvm.runtime.vm import VirtualMachine

    cuda_runtime_loaded, kernels, import_error = load_helpers()
    pack_fragments = kernels.pack_fragments
    t_start = time.perf_counter()
    if not (torch.cuda.is_available() and cuda_runtime_loaded()):
        print("no CUDA GPU (or no TVM CUDA runtime) here", file=sys.stderr)
        return 2
    dev = tvm.cuda(0)
    data = Path(args.data)
    index = json.loads((data / "kernels" / "index.json").read_text())
    report = {"gpu": torch.cuda.get_device_name(0), "arch": index["arch"], "torch": torch.__version__,
              "kernels": [], "models": [], "graphopt_import_error": import_error}
    print(f"GPU: {report['gpu']}  (kernels built for {index['arch']})", flush=True)

    def tv(t):  # torch (cuda) -> TVM tensor, zero copy
        return tvm.runtime.from_dlpack(t.contiguous()) if hasattr(tvm.runtime, "from_dlpack") else \
            tvm.runtime.tensor(t.cpu().numpy(), device=dev)

    def to_torch(a):
        return torch.from_numpy(a.numpy()).cuda()

    weights, packs = {}, {}

    def packed(key, dense, fmt, layout=None):  # packing an 8192^2 weight takes seconds on the CPU: once per weight
        if key not in packs:
            packs[key] = pack_fragments(dense(), fmt, layout) if layout else pack_fragments(dense(), fmt)
        return packs[key]
    for entry in index["kernels"]:
        if time.perf_counter() - t_start > args.budget_s:
            entry["skipped"] = "time budget"
            report["kernels"].append(entry)
            continue
        rec = dict(entry)
        try:
            vm = VirtualMachine(tvm.runtime.load_module(str(data / "kernels" / entry["file"])), dev)
            torch.manual_seed(0)
            if entry["kind"].startswith("peak_"):  # the instruction alone: its throughput, no check
                xs = tvm.runtime.tensor(np.random.default_rng(0).integers(0, 2**32, entry["shape"], dtype=np.uint32),
                                        device=dev)
                rec["graphopt_s"] = float(vm.time_evaluator("main", dev, number=5, repeat=3)(xs).median)
                rec["tflops"] = entry["ops"] / rec["graphopt_s"] / 1e12
                rec["ok"] = True
                report["kernels"].append(rec)
                print(f"  {rec['kind']:<11} {rec['name']:<28} {rec['graphopt_s'] * 1e6:9.1f} us  "
                      f"{rec['tflops']:7.1f} T(FL)OPS (dense-equivalent)", flush=True)
                continue
            if entry["kind"] in GEMM_KINDS:
                m, k, n = entry["shape"]
                key = (m, k, n)
                if key not in weights:  # one 2:4 weight per shape, shared by dense, sparse and PyTorch
                    w = torch.randn(n, k, device="cuda", dtype=torch.float16)
                    g = w.view(n, k // 4, 4)
                    w = g.scatter(-1, g.abs().argsort(-1)[..., :2], 0).view(n, k)
                    weights[key] = (torch.randn(m, k, device="cuda", dtype=torch.float16), w)
                x, w = weights[key]
                if entry["kind"] in INT8_KINDS:  # one 2:4 int8 weight for dense and sparse
                    if ("i8",) + key not in weights:
                        xi = torch.randint(-64, 64, (m, k), device="cuda", dtype=torch.int8)
                        wi = torch.randint(-64, 64, (n, k), device="cuda", dtype=torch.int8)
                        wi = torch.where(w != 0, wi, torch.zeros_like(wi))
                        weights[("i8",) + key] = (xi, wi)
                    xi, wi = weights[("i8",) + key]
                    ref = xi.double() @ wi.double().T  # exact: |sums| < 2^53
                    if entry["kind"] in ("sp24s8", "sp24ps8", "sp24ws8"):
                        wv, wm = packed(("s8",) + key, lambda: wi.cpu().numpy().astype(np.float32), "s8")
                        args_ = [tv(xi), tvm.runtime.tensor(wv, device=dev), tvm.runtime.tensor(wm, device=dev),
                                 tv(torch.zeros(n, device="cuda"))]
                        # which reading of the int8 metadata layout the hardware agrees with (exact results)
                        rec["meta_layouts_exact"] = {}
                        for layout in (("rows-inner", "rows-outer", "pairs")
                                       if entry["kind"] in ("sp24s8", "sp24ws8") else ()):
                            wv_, wm_ = packed(("s8", layout) + key, lambda: wi.cpu().numpy().astype(np.float32),
                                              "s8", layout)
                            got_ = to_torch(vm["main"](tv(xi), tvm.runtime.tensor(wv_, device=dev),
                                                       tvm.runtime.tensor(wm_, device=dev),
                                                       tv(torch.zeros(n, device="cuda")))).double()
                            rec["meta_layouts_exact"][layout] = bool((got_ - ref).abs().max().item() == 0)
                        if "s8_probe" not in report and entry["kind"] == "sp24s8":
                            report["s8_probe"] = probe = probe_s8_layout(vm, tvm, dev, entry["shape"])
                            meta_ = probe["meta (lane.nibble -> [row, chunk])"]
                            for lane in range(4):
                                print(f"  int8 metadata, lane {lane}: nibbles -> [row, chunk] "
                                      f"{[meta_[f'{lane}.{q}'] for q in range(8)]}", flush=True)
                    elif entry["kind"] in ("int8p", "int8w"):
                        if ("d8",) + key not in packs:
                            packs[("d8",) + key] = kernels.pack_dense_fragments(wi.cpu().numpy().astype(np.float32),
                                                                                 "s8")
                        args_ = [tv(xi), tvm.runtime.tensor(packs[("d8",) + key], device=dev),
                                 tv(torch.zeros(n, device="cuda"))]
                    else:
                        args_ = [tv(xi), tv(wi)]
                        rec["torch_eager_s"] = eager_time(lambda: torch._int_mm(xi, wi.T), 20)
                    try:
                        torch_fn = lambda: torch._int_mm(xi, wi.T)  # noqa: E731
                        rec["torch_s"] = cuda_time(torch_fn, 20)
                    except RuntimeError as e:
                        rec["torch_note"] = f"torch._int_mm: {e}"[:120]
                else:
                    ref = (x.float() @ w.float().T)
                    rec["torch_s"] = cuda_time(lambda: torch.nn.functional.linear(x, w), 20)
                    if entry["kind"] in ("sp24", "sp24p", "sp24w"):
                        wv, wm = packed(("f16",) + key, lambda: w.float().cpu().numpy(), "f16")
                        args_ = [tv(x), tvm.runtime.tensor(wv, device=dev), tvm.runtime.tensor(wm, device=dev),
                                 tv(torch.zeros(n, device="cuda"))]
                        try:
                            from torch.sparse import to_sparse_semi_structured
                            if ("ws",) + key not in packs:
                                packs[("ws",) + key] = to_sparse_semi_structured(w)
                            ws = packs[("ws",) + key]
                            rec["torch_sparse_s"] = cuda_time(lambda: torch.nn.functional.linear(x, ws), 20)
                        except Exception as e:  # noqa: BLE001 - shape limits of the semi-structured kernels
                            rec["torch_sparse_note"] = f"{type(e).__name__}: {e}"[:160]
                    elif entry["kind"] in ("dense16p", "dense16w"):
                        if ("d16",) + key not in packs:
                            packs[("d16",) + key] = kernels.pack_dense_fragments(w.float().cpu().numpy(), "f16")
                        args_ = [tv(x), tvm.runtime.tensor(packs[("d16",) + key], device=dev),
                                 tv(torch.zeros(n, device="cuda"))]
                    else:
                        args_ = [tv(x), tv(w)]
                        rec["torch_eager_s"] = eager_time(lambda: torch.nn.functional.linear(x, w), 20)
            else:  # conv16
                cin, cout, size, ks, stride, groups = entry["shape"]
                x = torch.randn(1, cin, size, size, device="cuda", dtype=torch.float16)
                w = torch.randn(cout, cin // groups, ks, ks, device="cuda", dtype=torch.float16) * 0.1
                conv = lambda: torch.nn.functional.conv2d(x, w, stride=stride, padding=ks // 2, groups=groups)  # noqa: E731
                ref = torch.nn.functional.conv2d(x.float(), w.float(), stride=stride, padding=ks // 2, groups=groups)
                rec["torch_s"] = cuda_time(conv, 20)
                args_ = [tv(x), tv(w)]
            out = vm["main"](*args_)
            got = to_torch(out).double()
            err = (got - ref.double()).abs().max().item()
            scale = ref.double().abs().max().item() or 1.0
            rec["max_rel_err"] = err / scale
            exact = entry["kind"] in INT8_KINDS  # integer accumulation: exact or wrong
            rec["ok"] = bool(err == 0 if exact else err / scale < 2e-2)
            rec["graphopt_s"] = float(vm.time_evaluator("main", dev, number=10, repeat=3)(*args_).median)
        except Exception as e:  # noqa: BLE001 - report and go on: one broken kernel must not hide the others
            rec["error"] = f"{type(e).__name__}: {e}"[:300]
        report["kernels"].append(rec)
        print(f"  {rec['kind']:<8} {rec['name']:<32} "
              + (f"err {rec.get('max_rel_err', float('nan')):.1e} {'ok' if rec.get('ok') else 'WRONG'}  "
                 f"graphopt {rec.get('graphopt_s', 0) * 1e6:9.1f} us  torch {rec.get('torch_s', 0) * 1e6:9.1f} us"
                 + (f"  int8 metadata layouts exact: {rec['meta_layouts_exact']}" if "meta_layouts_exact" in rec else "")
                 if "error" not in rec else rec["error"]), flush=True)

    # ratios: graphopt vs PyTorch (CUDA-graph time, kernels only); 2:4 vs dense for the same shape and weight: the
    # simple 2:4 kernel against dlight's, the multistage 2:4 kernel against the multistage dense one, each at the
    # tiles the build picks (build_default)
    dense_of = {"sp24": "dense16", "sp24s8": "int8", "sp24p": "dense16p", "sp24ps8": "int8p", "sp24w": "dense16w",
                "sp24ws8": "int8w"}
    timed = {(r["kind"], tuple(r["shape"])): r for r in report["kernels"]
             if r.get("graphopt_s") and r.get("build_default", True)}
    for r in report["kernels"]:
        if r.get("graphopt_s") and r.get("torch_s"):
            r["vs_torch"] = r["graphopt_s"] / r["torch_s"]
        d = timed.get((dense_of.get(r["kind"]), tuple(r["shape"])))
        if d and r.get("graphopt_s"):
            r["speedup_vs_dense"] = d["graphopt_s"] / r["graphopt_s"]
        if r.get("torch_sparse_s") and r.get("torch_s"):
            r["torch_sparse_speedup"] = r["torch_s"] / r["torch_sparse_s"]

    for mdir in sorted(p.parent for p in data.glob("*/manifest.json")):
        if time.perf_counter() - t_start > args.budget_s + 60 or import_error:
            break
        import graphopt
        name = mdir.name
        try:
            io = np.load(data / f"{name}_io.npz")
            xs = [io[f"x{i}"] for i in range(sum(f.startswith("x") for f in io.files))]  # x0, x1, ...
            art = graphopt.load(mdir)
            outs = np.stack([art(*(x[j] for x in xs))[0] for j in range(len(xs[0]))])
            ref = io["ref"]
            cos = mean_cosine(outs, ref)
            lat = art.latency(*(x[0] for x in xs), warmup=5, runs=50)
            rec = {"name": f"{name} fp16 (cuda)", "cosine": cos, "latency_s": lat,
                   "max_abs_err": float(np.abs(outs - ref).max())}
            if "ref_graph" in io.files:  # the optimized graph on the CPU (int8 semantics for a quantized one)
                rg = io["ref_graph"]
                rec["cosine_vs_graph"] = mean_cosine(outs, rg)
                rec["max_abs_err_vs_graph"] = float(np.abs(outs - rg).max())
            if ref.ndim == 3 and ref.shape[-1] == 1000:  # classifiers: top-1 agreement with fp32
                rec["top1_agreement_vs_fp32"] = float((outs.reshape(len(ref), -1).argmax(-1)
                                                       == ref.reshape(len(ref), -1).argmax(-1)).mean())
            info = json.loads((mdir / "manifest.json").read_text())["target_info"]
            tc = info.get("tensor_core_linears") or {}
            rec["tensor_core_linears"] = len(tc)
            rec["sp24_layers"] = sum(r.get("choice") == "sp24" for r in (info.get("sparse_kernels") or {}).values())
            print(f"  {name} fp16 artifact: cosine {cos:.5f} (vs the optimized graph: "
                  f"{rec.get('cosine_vs_graph', float('nan')):.5f}), top-1 agreement "
                  f"{rec.get('top1_agreement_vs_fp32', float('nan')):.3f}, {lat * 1e3:.3f} ms, "
                  f"{len(tc)} dense linears on graphopt's tensor-core kernel, {rec['sp24_layers']} on 2:4",
                  flush=True)
        except Exception as e:  # noqa: BLE001
            rec = {"name": name, "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name}: {rec['error']}", flush=True)
        report["models"].append(rec)

    print(f"\n{'kind':<9} {'shape':<30} {'tiles':<15} {'ok':<5} {'graphopt us':>11} {'torch us':>9} "
          f"{'x torch':>7} {'2:4/dense':>9} {'torch 2:4':>9}")
    for r in report["kernels"]:
        tiles = ",".join(map(str, r["tiles"])) + ("*" if r.get("build_default") else "") if r.get("tiles") else "-"
        print(f"{r['kind']:<9} {r['name'][:30]:<30} {tiles:<15} {str(r.get('ok', '-')):<5} "
              f"{r.get('graphopt_s', float('nan')) * 1e6:11.1f} {r.get('torch_s', float('nan')) * 1e6:9.1f} "
              f"{r.get('vs_torch', float('nan')):7.2f} {r.get('speedup_vs_dense', float('nan')):9.2f} "
              f"{r.get('torch_sparse_speedup', float('nan')):9.2f}")
    print("(* the tiles the build picks; 2:4/dense: against the dense kernel of the same family at its build tiles)")
    report["seconds"] = time.perf_counter() - t_start
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json} ({report['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
