"""Sparse linear and pointwise conv kernels vs dense, per shape and sparsity, in one run: graphopt's TVM kernels
(dense kernels and every sparse layout, through the same cost oracle select-sparse-layout uses) against ONNX Runtime
and PyTorch dense.

Goal (issue 6): at >= 80% sparsity the chosen sparse kernel is >= 0.5/density times faster than dense; where sparse
loses, dense is chosen. Masks are block-structured (sparsify{block=4x4}) or unstructured (csr); int8 rows time
the int8 BSR kernel (int7-block8x4: 7-bit weights, 8x4 zero blocks), the int8 CSR kernel (int8-unstructured:
full-range int8 weights, unstructured zeros, 16+ tokens) and, on CPUs with AMX, the tile BSR kernel
(int8-block16x64: full-range int8 weights, 16 x 64 zero blocks, linears of 16+ tokens) against graphopt's dense
int8 kernel for the same weight (and report fp32 dense and ORT fp32).

    python benchmarks/sparse_kernels.py [--threads 2] [--quick] [--patterns int8-unstructured]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time

SHAPES = [  # (name, op, M, K, N): M tokens (linear) or pixels of a batch-1 pointwise conv (conv1x1)
    ("minilm-ffn-in", "linear", 128, 384, 1536),
    ("minilm-ffn-out", "linear", 128, 1536, 384),
    ("bert-768", "linear", 128, 768, 768),
    ("classifier", "linear", 1, 1280, 1000),
    ("mbv2-project-14", "conv1x1", 196, 576, 96),  # MobileNetV2's pointwise convs
    ("mbv2-expand-14", "conv1x1", 196, 96, 576),
    ("mbv2-head-7", "conv1x1", 49, 320, 1280),
    ("mbv2-expand-56", "conv1x1", 3136, 24, 144),
]
LAYOUTS = ["csr", "bsr4x4", "bsr1x16", "bsr8x1"]


def _ort_dense(op, m, k, n, w, threads):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    if op == "conv1x1":  # NCHW [1, K, H, W], square where M is
        h = math.isqrt(m) if math.isqrt(m) ** 2 == m else m
        xs, ys = [1, k, h, m // h], [1, n, h, m // h]
        node, wt = helper.make_node("Conv", ["x", "wt"], ["y"]), w.reshape(n, k, 1, 1).contiguous().numpy()
    else:
        xs, ys = [m, k], [m, n]
        node, wt = helper.make_node("MatMul", ["x", "wt"], ["y"]), w.t().contiguous().numpy()
    g = helper.make_graph([node], "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, xs)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ys)],
                          [numpy_helper.from_array(wt, "wt")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        onnx.save(model, f.name)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(f.name, so)
    x = np.random.default_rng(0).standard_normal(xs).astype("float32")
    return _best(lambda: sess.run(None, {"x": x}))


def _best(fn, runs=30):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsities", default="0.5,0.8,0.9,0.95")
    ap.add_argument("--quick", action="store_true", help="one linear and one conv shape, two sparsities")
    ap.add_argument("--patterns", default="block4x4,unstructured,int7-block8x4,int8-unstructured,int8-block16x64",
                    help="weight patterns to time (comma-separated); rows of the others already in --out are kept")
    ap.add_argument("--shapes", default=None,
                    help="layer shapes to time, by name (comma-separated; default all: "
                         f"{', '.join(s[0] for s in SHAPES)}); rows of the others already in --out are kept")
    ap.add_argument("--out", default="benchmarks/results/sparse_kernels.json")
    from graphopt.plots import add_plot_options, replot_asked
    add_plot_options(ap, "speed-up over the dense kernel against sparsity, a panel per layer shape, a line per "
                         "pattern, with the 0.5/density goal")
    args = ap.parse_args(argv)
    if replot_asked(ap, args, plot):
        return 0

    import os
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import torch
    torch.set_num_threads(args.threads)
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.ir.sparse_ops import layout_block
    from graphopt.passes.prune.masks import expand_blocks
    from graphopt.targets.tvm.cpu.cost import CpuCostOracle

    oracle = CpuCostOracle(cache=os.path.join(tempfile.gettempdir(), "graphopt-bench-layout-costs.json"))
    shapes = [SHAPES[2], SHAPES[4]] if args.quick else SHAPES
    if args.shapes:
        names = args.shapes.split(",")
        if any(nm not in [s[0] for s in SHAPES] for nm in names):
            ap.error(f"--shapes: {args.shapes!r}; choose from {', '.join(s[0] for s in SHAPES)}")
        shapes = [s for s in SHAPES if s[0] in names]
    known = ["block4x4", "unstructured", "int7-block8x4", "int8-unstructured", "int8-block16x64"]
    wanted = args.patterns.split(",")
    if any(p not in known for p in wanted):
        ap.error(f"--patterns: {args.patterns!r}; choose from {', '.join(known)}")
    sparsities = [0.8, 0.9] if args.quick else [float(s) for s in args.sparsities.split(",")]
    rows = []
    for name, op, m, k, n in shapes:
        torch.manual_seed(0)
        w0 = torch.randn(n, k)
        ort_t = _ort_dense(op, m, k, n, w0, args.threads)
        with torch.no_grad():
            if op == "conv1x1":
                h = math.isqrt(m) if math.isqrt(m) ** 2 == m else m
                x = torch.randn(1, k, h, m // h)
                torch_t = _best(lambda: torch.nn.functional.conv2d(x, w0[:, :, None, None]))
            else:
                x = torch.randn(m, k)
                torch_t = _best(lambda: torch.nn.functional.linear(x, w0))
        dense_t = oracle.measure(op, (m, k, n), "dense", w0)
        # int8 rows: 7-bit weights with 8x4 zero blocks (sparsify{block=8x4}, quantize{weights=int7}) against
        # graphopt's dense int8 kernel for the same layer
        patterns = ["block4x4", "unstructured"] + (["int7-block8x4"] if op == "conv1x1" or m >= 6 else []) + (
            ["int8-unstructured"] if m >= 16 else [])
        amx_why = oracle.applies("bsr16x64", torch.zeros(n, k, dtype=torch.int8), "q" + op, m)
        if not amx_why:
            patterns.append("int8-block16x64")  # AMX tiles: full-range int8 weights, 16 x 64 zero blocks
        elif "int8-block16x64" in wanted:
            print(f"{name:15} int8-block16x64 not timed: {amx_why}")
        patterns = [p for p in patterns if p in wanted]
        for s in sparsities:
            for pattern in patterns:
                mop, lays = op, LAYOUTS
                if pattern == "int7-block8x4":
                    mask = expand_blocks(torch.rand(n // 8, k // 4) >= s, (8, 4))
                    w = (torch.randint(-63, 64, (n, k)) * mask).to(torch.int8)
                    mop, lays = "q" + op, ["bsr8x4"]
                elif pattern == "int8-block16x64":
                    mask = expand_blocks(torch.rand(n // 16, k // 64) >= s, (16, 64))
                    w = (torch.randint(-128, 128, (n, k)) * mask).to(torch.int8)
                    mop, lays = "q" + op, ["bsr16x64"]
                elif pattern == "int8-unstructured":
                    w = (torch.randint(-128, 128, (n, k)) * (torch.rand(n, k) >= s)).to(torch.int8)
                    mop, lays = "q" + op, ["csr"]
                else:
                    mask = expand_blocks(torch.rand(n // 4, k // 4) >= s, (4, 4)) if pattern == "block4x4" \
                        else torch.rand(n, k) >= s
                    w = w0 * mask
                # dense and every layout timed together, in interleaved rounds, as select-sparse-layout does
                times = oracle.measure_many(mop, (m, k, n), ["dense"] + [
                    lay for lay in lays if k % layout_block(lay)[1] == 0 and n % layout_block(lay)[0] == 0], w)
                base_t = times.pop("dense")
                best = min(times, key=times.get)
                chosen = best if times[best] * 1.1 <= base_t else "dense"
                chosen_t = times.get(chosen, base_t)
                row = {"shape": name, "op": mop, "m": m, "k": k, "n": n, "sparsity": s, "pattern": pattern,
                       "tvm_dense_us": round(base_t * 1e6, 1), "tvm_fp32_dense_us": round(dense_t * 1e6, 1),
                       "ort_dense_us": round(ort_t * 1e6, 1), "torch_dense_us": round(torch_t * 1e6, 1),
                       "layouts_us": {k2: round(v * 1e6, 1) for k2, v in times.items()},
                       "chosen": chosen, "chosen_us": round(chosen_t * 1e6, 1),
                       "speedup_vs_tvm_dense": round(base_t / chosen_t, 2),
                       "speedup_vs_tvm_fp32_dense": round(dense_t / chosen_t, 2),
                       "speedup_vs_ort_dense": round(ort_t / chosen_t, 2),
                       "goal_0.5_over_density": round(0.5 / (1 - s), 2)}
                rows.append(row)
                print(f"{name:15} s={s:.2f} {pattern:13} dense tvm {row['tvm_dense_us']:8.1f} ort "
                      f"{row['ort_dense_us']:8.1f} torch {row['torch_dense_us']:8.1f} | {chosen:7} "
                      f"{row['chosen_us']:8.1f} us  x{row['speedup_vs_tvm_dense']:.2f} vs tvm dense, "
                      f"x{row['speedup_vs_ort_dense']:.2f} vs ORT (goal x{row['goal_0.5_over_density']})",
                      flush=True)
    timed = {s[0] for s in shapes}
    if os.path.exists(args.out) and (set(wanted) != set(known) or timed != {s[0] for s in SHAPES}):
        with open(args.out) as f:  # a partial run: keep the rows of the other patterns and shapes from the last
            rows = [r for r in json.load(f)["rows"] if r["pattern"] not in wanted or r["shape"] not in timed] + rows
    doc = {"threads": args.threads, "target": oracle.describe(), "rows": rows}
    atomic_write_bytes(args.out, json.dumps(doc, indent=1).encode())
    print(f"wrote {args.out}")
    if args.plot:
        print(f"wrote {plot(doc, args.plot)}")
    return 0


def plot(doc: dict, path: str) -> str:
    """The rows' speed-up over graphopt's dense kernel (1x where dense was kept) against sparsity, per shape and
    pattern (`graphopt.plots.plot_sparsity`)."""
    from graphopt.plots import plot_sparsity
    panels: dict[str, dict] = {}
    for r in doc["rows"]:
        op = r["op"][1:] if r["op"].startswith("q") else r["op"]  # int8 rows time the same layer
        pn = panels.setdefault(r["shape"], {"name": f"{r['shape']} ({op} {r['m']}x{r['k']}x{r['n']})",
                                            "series": {}})
        pn["series"].setdefault(r["pattern"], []).append((r["sparsity"], r["speedup_vs_tvm_dense"]))
    return str(plot_sparsity(list(panels.values()), path, f"sparse kernels vs graphopt's dense kernel, "
                                                        f"{doc.get('threads')} threads"))


if __name__ == "__main__":
    sys.exit(main())
