"""int8 vs fp32 matmul: graphopt's kernels against ONNX Runtime (fp32 and `quantize_static` int8) and PyTorch fp32,
one process, same thread count, on the same constant-weight linear layer (the 512^3 matmul of the CPU-kernel issue
and MiniLM's FFN shapes). Times include quantizing the activation, as a quantized model pays it; ratios are
time / ORT time (below 1.0 is faster); "/ORT int8" divides by the faster of ORT's two int8 forms, S8S8 (int8
activations, its documented default) and U8S8 ("int8 u8": uint8 activations, its faster x86 kernels). int7 rows: 7-bit weights (graphopt `quantize{weights=int7}`, ORT
`reduce_range=True`), which make u8 x s8 pair products exact on AVX2 CPUs without VNNI; int8s: graphopt's int8
weights with per-channel scales that keep every pair exact (`quantize{weights=int8s}`), the same kernel at a finer
step. The JSON has each row's largest error against fp32.

    python benchmarks/int8_matmul.py --threads 2 --out benchmarks/results/int8_matmul.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

SHAPES = "512x512x512,128x384x1536,128x1536x384"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated MxKxN (M rows, K inputs, N outputs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=50, help="timed runs per measurement (median reported)")
    ap.add_argument("--out", default="benchmarks/results/int8_matmul.json")
    args = ap.parse_args(argv)

    from graphopt.bench import set_threads
    set_threads(args.threads)  # before TVM's thread pool starts

    import numpy as np
    import torch

    import graphopt
    from graphopt.bench import interleaved_medians, ort_quantize_static, ort_session, reference_onnx
    from graphopt.ir.files import atomic_write_bytes

    work = Path(tempfile.mkdtemp(prefix="graphopt-int8mm-"))
    rows = []
    for spec in args.shapes.split(","):
        m, k, n = (int(v) for v in spec.split("x"))
        torch.manual_seed(0)
        layer = torch.nn.Linear(k, n).eval()
        x = torch.randn(m, k)
        calib = [(torch.randn(m, k),) for _ in range(4)]
        graph = graphopt.trace(layer, (x,))
        q = graphopt.optimize(graph, "quantize{weights=int8},fold-qdq", data=calib)
        q7 = graphopt.optimize(graph, "quantize{weights=int7},fold-qdq", data=calib)
        q8s = graphopt.optimize(graph, "quantize{weights=int8s},fold-qdq", data=calib)
        art = {name: graphopt.load(graphopt.compile(g, "llvm", output=work / f"{spec}-{name}"))
               for name, g in (("fp32", graph), ("int8", q), ("int8s", q8s), ("int7", q7))}
        onnx_fp32 = reference_onnx(graph, str(work / spec))
        name = ort_session(onnx_fp32, args.threads).get_inputs()[0].name

        sessions = {"onnxruntime fp32": ort_session(onnx_fp32, args.threads)}
        for key, reduce_range, acts in (("onnxruntime int8", False, "int8"), ("onnxruntime int8 u8", False, "uint8"),
                                        ("onnxruntime int7", True, "int8")):
            # int7: ORT's reduce_range (7-bit weights), its advice for AVX2 CPUs where u8 x s8 pairs saturate
            path = ort_quantize_static(onnx_fp32, work / f"{spec}-ort-{key[12:].replace(' ', '-')}.onnx",
                                       [{name: b[0].numpy()} for b in calib], reduce_range=reduce_range,
                                       activations=acts)
            sessions[key] = ort_session(path, args.threads)
        xs = x.numpy()
        ref = layer(x).detach().numpy()
        calls = {**{f"graphopt {name}": a.prepared(xs) for name, a in art.items()},
                 **{key: (lambda s=sess: s.run(None, {name: xs})) for key, sess in sessions.items()},
                 "pytorch fp32": lambda: layer(x)}
        with torch.inference_mode():
            t = interleaved_medians(calls, runs=args.runs * 3)
        outs = {**{f"graphopt {b}": art[b](xs)[0] for b in ("int8", "int8s", "int7")},
                **{f"onnxruntime {b}": sessions[f"onnxruntime {b}"].run(None, {name: xs})[0]
                   for b in ("int8", "int8 u8", "int7")}}
        err = {key: float(np.abs(o - ref).max() / np.abs(ref).max()) for key, o in outs.items()}
        rows.append({"shape": spec, "macs": m * k * n, "ms": {key: round(v * 1e3, 4) for key, v in t.items()},
                     "gmac_per_s": {key: round(m * k * n / v / 1e9, 1) for key, v in t.items()},
                     "max_rel_err_vs_fp32": err})
        print(f"[{spec}] done", file=sys.stderr, flush=True)

    keys = ["graphopt fp32", "graphopt int8", "graphopt int8s", "graphopt int7", "onnxruntime fp32", "onnxruntime int8",
            "onnxruntime int8 u8", "onnxruntime int7", "pytorch fp32"]
    lines = [f"{'shape MxKxN':<16} {'runtime':<20} {'ms':>8} {'GMAC/s':>7} {'/ORT fp32':>9} {'/ORT int8':>9}"
             f"   ({args.threads} threads)"]
    for r in rows:
        ort8 = min(r["ms"]["onnxruntime int8"], r["ms"]["onnxruntime int8 u8"])
        for key in keys:
            ms = r["ms"][key]
            lines.append(f"{r['shape']:<16} {key:<20} {ms:>8.3f} {r['gmac_per_s'][key]:>7.1f} "
                         f"{ms / r['ms']['onnxruntime fp32']:>9.2f} {ms / ort8:>9.2f}")
    table = "\n".join(lines)
    print(table)
    from graphopt.targets.tvm.host import host_record
    atomic_write_bytes(args.out, json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                                             **host_record(), "rows": rows, "table": table}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
