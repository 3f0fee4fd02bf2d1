"""int8 post-training quantization fidelity: graphopt `quantize` vs ONNX Runtime `quantize_static`, same model,
same calibration crops, same evaluation crops (disjoint photo sets), per-channel int8 weights, int8 activations.

Also compiles graphopt's percentile-calibrated int8 graph (after `fold-qdq`) and the fp32 graph with TVM, and the
widths AVX2's u8 x s8 kernels take (int7, int8s), a size-budget and a latency-budget mixed-precision graph and a
pruned one; checks each artifact's top-1 agreement, and times them against ONNX Runtime fp32 and ORT's percentile
int8 model in the same run (same threads; ratios are time / ORT time, below 1.0 is faster).

    python benchmarks/ptq_fidelity.py --model mobilenet_v2
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

CALIB_PHOTOS = ["astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "china"]
EVAL_PHOTOS = ["coffee", "chelsea", "stereo_motorcycle", "retina", "flower"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--calib-crops", type=int, default=4, help="random crops per calibration photo")
    ap.add_argument("--eval-crops", type=int, default=8, help="random crops per evaluation photo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prune", type=float, default=0.3,
                    help="also time prune-channels{ratio=R} + int8 (the compressed artifact; 0: skip)")
    ap.add_argument("--mixed", type=float, default=0.2,
                    help="also compile mixed-precision{target=T candidates=int8,int4} + int8 activations (0: skip)")
    ap.add_argument("--mixed-int7", type=float, default=0.85,
                    help="also compile mixed-precision{budget=latency target=T candidates=int8,int7}: int7 on the "
                         "layers whose 7 bits cost the least error per second they save, timed on this CPU (0: skip; "
                         "skipped on VNNI CPUs, where int7 is no faster)")
    ap.add_argument("--out", default="benchmarks/results/ptq_fidelity.json")
    args = ap.parse_args(argv)

    from graphopt.bench import set_threads
    set_threads(args.threads)  # before TVM's thread pool starts

    import numpy as np
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import CalibrationMethod
    torch.set_num_threads(args.threads)

    import graphopt
    from graphopt.bench import fidelity, interleaved_medians, ort_quantize_static, reference_onnx
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.targets.tvm.host import host_record
    from graphopt.zoo import photo_batches, zoo_entry, zoo_graph

    style = zoo_entry(args.model).style
    calib = [(x,) for x in photo_batches(style, CALIB_PHOTOS, args.calib_crops, seed=1)]
    evals = [(x,) for x in photo_batches(style, EVAL_PHOTOS, args.eval_crops, seed=2)]
    graph = graphopt.optimize(zoo_graph(args.model), "fold-bn")
    refs = [graph.run(*b)[0].numpy() for b in evals]
    probs = [np.exp(r - r.max()) / np.exp(r - r.max()).sum() for r in refs]
    confident = [i for i, p in enumerate(probs) if p.max() >= 0.5]
    rows = []

    def record(tool, calibrator, outs, seconds):
        f = fidelity(refs, outs, classification=True).to_json()
        agree_conf = float(np.mean([refs[i].argmax() == outs[i].argmax() for i in confident])) if confident else None
        rows.append({"tool": tool, "calibrator": calibrator, **f, "top1_confident": agree_conf,
                     "confident_samples": len(confident), "seconds": round(seconds, 1)})
        print(f"[{tool}] {calibrator}: top-1 {f['top1'] * 100:.1f}%", file=sys.stderr, flush=True)

    quantized = {}
    for cal in ("minmax", "percentile", "mse", "entropy"):
        t0 = time.perf_counter()
        q = quantized[cal] = graphopt.optimize(graph, f"quantize{{calibrator={cal} weights=int8}}", data=calib)
        record("graphopt", cal, [q.run(*b)[0].numpy() for b in evals], time.perf_counter() - t0)

    tmp = Path(tempfile.mkdtemp(prefix="graphopt-ptq-"))
    t0 = time.perf_counter()
    int8_art = graphopt.load(graphopt.compile(graphopt.optimize(quantized["percentile"], "fold-qdq"), "llvm",
                                              output=tmp / "int8"))
    fp32_art = graphopt.load(graphopt.compile(graph, "llvm", output=tmp / "fp32"))
    record("graphopt-tvm", "percentile", [int8_art(b[0].numpy())[0] for b in evals], time.perf_counter() - t0)
    arts = {"graphopt fp32": fp32_art, "graphopt int8": int8_art}
    folders = {"graphopt fp32": "fp32", "graphopt int8": "int8"}

    def add_artifact(label: str, folder: str, calibrator: str, pipeline: str, bits_row: bool = False, **kw) -> None:
        """Optimize, compile and load one more graphopt artifact; its fidelity row (with its layers' widths)."""
        t0 = time.perf_counter()
        g = graphopt.optimize(graph, pipeline, data=calib, **kw)
        arts[label], folders[label] = graphopt.load(graphopt.compile(g, "llvm", output=tmp / folder)), folder
        record("graphopt-tvm", calibrator, [arts[label](b[0].numpy())[0] for b in evals], time.perf_counter() - t0)
        if bits_row:
            bits = list(g.meta["weight_bits"].values())
            rows[-1]["weight_bits"] = {b: bits.count(b) for b in sorted(set(bits))}

    # 7-bit weights: the exact u8 x s8 kernels on AVX2 CPUs without VNNI (ORT's reduce_range, without saturation);
    # int8s: int8 with per-channel scales that keep every u8 x s8 pair exact, the same kernels at a finer step
    for w in ("int7", "int8s"):
        add_artifact(f"graphopt {w}", w, f"percentile-{w}", f"quantize{{calibrator=percentile weights={w}}},fold-qdq")
    if args.mixed:  # per-layer int8/int4 weights from mixed-precision (size budget), int8 activations
        add_artifact(f"graphopt mixed-{args.mixed}", "mixed", f"mixed{args.mixed}",
                     f"mixed-precision{{target={args.mixed} candidates=int8,int4}},"
                     "quantize{calibrator=percentile bias-correction=true weights=int8},fold-qdq", bits_row=True)
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.host import cpu_target
    if args.mixed_int7 and int8_dot(cpu_target()) == "vnni":  # vpdpbusd takes any int8 at one speed
        print("[graphopt-tvm] mixed-int7 skipped: with VNNI 7-bit weights are no faster than int8 (the pass would "
              "say so and refuse the target)", file=sys.stderr, flush=True)
    elif args.mixed_int7:  # int8 or int7 per layer from measured layer times and sensitivity
        add_artifact(f"graphopt mixed-int7-{args.mixed_int7}", "mixed-int7", f"mixed-int7-{args.mixed_int7}",
                     f"mixed-precision{{budget=latency target={args.mixed_int7} candidates=int8,int7}},fold-qdq",
                     bits_row=True, target="llvm")
    if args.prune:  # the compressed artifact: channels pruned (no fine-tuning), then int8 or int7 weights
        for bits in ("int8", "int7"):
            tag = f"prune{round(args.prune * 100)}+{bits}"
            add_artifact(f"graphopt {tag}", f"pruned-{bits}", tag, f"prune-channels{{ratio={args.prune}}},"
                         f"quantize{{calibrator=percentile weights={bits}}},fold-qdq")

    fp32 = reference_onnx(graph, str(tmp))
    input_name = graph.inputs[0].name

    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    for cal, method in (("minmax", CalibrationMethod.MinMax), ("percentile", CalibrationMethod.Percentile),
                        ("entropy", CalibrationMethod.Entropy)):
        t0 = time.perf_counter()
        qpath = tmp / f"ort-{cal}.onnx"
        ort_quantize_static(fp32, qpath, [{input_name: b[0].numpy()} for b in calib], calibrate_method=method)
        sess = ort.InferenceSession(str(qpath), so, providers=["CPUExecutionProvider"])
        outs = [sess.run(None, {sess.get_inputs()[0].name: b[0].numpy()})[0] for b in evals]
        record("onnxruntime", cal, outs, time.perf_counter() - t0)
        if cal == "percentile":
            ort_int8 = sess

    x = evals[0][0].numpy()
    feed = {input_name: x}
    ort_fp32 = ort.InferenceSession(str(fp32), so, providers=["CPUExecutionProvider"])
    lat = interleaved_medians({**{k: a.prepared(x) for k, a in arts.items()},
                               "onnxruntime fp32": lambda: ort_fp32.run(None, feed),
                               "onnxruntime int8": lambda: ort_int8.run(None, feed)})
    size = {k: (tmp / folders[k] / "model.so").stat().st_size for k in arts}

    lines = [f"{'tool':<12} {'calibrator':<16} {'top-1 agr':>9} {'top-5 agr':>9} {'KL':>8} {'SQNR dB':>8} "
             f"{'top-1 on confident':>18}   ({args.model}, {len(evals)} eval crops, {len(calib)} calibration crops, "
             f"{len(confident)} confident)"]
    for r in rows:
        conf = "n/a" if r["top1_confident"] is None else f"{r['top1_confident'] * 100:.1f}%"
        lines.append(f"{r['tool']:<12} {r['calibrator']:<16} {r['top1'] * 100:>8.1f}% {r['top5'] * 100:>8.1f}% "
                     f"{r['kl']:>8.4f} {r['sqnr_db']:>8.1f} {conf:>18}")
    lines += ["", f"{'batch-1 latency':<26} {'ms':>7} {'/ ORT fp32':>10} {'/ ORT int8':>10}   ({args.threads} threads)"]
    for k, v in lat.items():
        mb = f"   model.so {size[k] / 1e6:.1f} MB" if k in size else ""
        lines.append(f"{k:<26} {v * 1e3:>7.2f} {v / lat['onnxruntime fp32']:>10.2f} "
                     f"{v / lat['onnxruntime int8']:>10.2f}{mb}")
    table = "\n".join(lines)
    print(table)
    atomic_write_bytes(args.out, json.dumps({"model": args.model, "date": time.strftime("%Y-%m-%d"), "rows": rows,
                                             "latency_ms": {k: round(v * 1e3, 3) for k, v in lat.items()},
                                             "artifact_bytes": size, "threads": args.threads,
                                             **host_record(),
                                             "table": table}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
