"""Benchmark: graphopt (untuned and tuned) vs ONNX Runtime fp32 and PyTorch eager, one process run, batch 1 (or
--batch N: the real inputs grouped N at a time, cycling through them when a model has fewer than N: MiniLM's 6).

Prints a table and writes JSON. Same thread count for every runtime; a model's variants (untuned, tuned,
pruned) are all built first, then timed together with ORT and PyTorch in the same interleaved rounds (median of
every run after warm-up), so a slow phase of the machine cannot fall on one variant only; ratios are graphopt
time / baseline time (below 1.0 means graphopt is faster).

    python benchmarks/bench_models.py --threads 2 --trials 64 --out benchmarks/results/latest.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_lite0,minilm", help="comma-separated zoo names")
    ap.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    ap.add_argument("--trials", type=int, default=64, help="MetaSchedule trials per model for the tuned row (0: skip)")
    ap.add_argument("--tune-db", default=None, help="tuning database folder to reuse (default: a fresh temporary one)")
    ap.add_argument("--runs", type=int, default=30, help="timed runs per measurement (median reported)")
    ap.add_argument("--pipeline", default="fold-bn,fold-pad,fold-constants,dce")
    ap.add_argument("--prune", default="0.3", help="comma-separated prune-channels ratios for extra rows ('' for none);"
                    " ORT and PyTorch then run the same pruned graph")
    ap.add_argument("--batch", type=int, default=1, help="batch size: models traced and run at this batch (default 1)")
    ap.add_argument("--out", default="benchmarks/results/latest.json", help="JSON output path")
    args = ap.parse_args(argv)

    from graphopt.bench import set_threads
    set_threads(args.threads)  # before TVM's thread pool starts

    import graphopt
    from graphopt.bench import compare_variants, fidelity, reference_onnx
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.ir.stats import human
    from graphopt.targets.artifact import versions
    from graphopt.targets.tvm.host import host_record
    from graphopt.zoo import eval_inputs, zoo_entry, zoo_graph

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="graphopt-bench-"))
    db = args.tune_db
    if args.trials and db is None:
        db = str(work / "tunedb")
        os.makedirs(db)
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        entry = zoo_entry(name)
        graph = zoo_graph(name, args.batch)
        module = entry.build()
        # the real inputs, N at a time (cycling through them when there are fewer than N)
        inputs = eval_inputs(name, shapes=[tuple(s.shape) for s in graph.inputs])
        refs = [graph.run(*b)[0].numpy() for b in inputs]
        row = {"model": name, "params": graph.stats().params, "macs": graph.stats().macs, "variants": {}}
        variants = [("untuned", args.pipeline, None)]
        if args.trials:
            variants.append((f"tuned-{args.trials}", args.pipeline, graphopt.Tuning(trials=args.trials, db=db)))
        for ratio in [float(r) for r in args.prune.split(",") if r]:
            variants.append((f"pruned-{int(ratio * 100)}", f"{args.pipeline},prune-channels{{ratio={ratio}}},dce",
                             None))
        opts, onnx_paths, built = {}, {}, {}
        for label, pipeline, tuning in variants:
            if pipeline not in opts:  # untuned and tuned rows share their graph, its ONNX file and ORT's timing
                opts[pipeline] = graphopt.optimize(graph, pipeline)
                onnx_paths[pipeline] = reference_onnx(opts[pipeline], str(work / f"{name}-{label}"))
            opt = opts[pipeline]
            tb = time.perf_counter()
            out = graphopt.compile(opt, "llvm", tuning=tuning, output=work / f"{name}-{label}" / "art")
            build_s = time.perf_counter() - tb
            art = graphopt.load(out)
            fid = fidelity(refs, [art(*[x.numpy() for x in b])[0] for b in inputs], entry.kind == "image").to_json()
            built[label] = (art, onnx_paths[pipeline], module if pipeline == args.pipeline else opt.gm)
            row["variants"][label] = {"pipeline": pipeline, "macs": opt.stats().macs, "params": opt.stats().params,
                                      "fidelity": fid, "build_s": round(build_s, 1),
                                      "artifact_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file())}
            if tuning:  # what tuning kept: MetaSchedule kernels, and graphopt's kernel knobs changed from the rules
                t = art.manifest.get("tuning") or {}
                row["variants"][label]["tuning"] = {
                    **{k: t.get(k) for k in ("trials", "kept_tuned", "kept_rules", "seconds")},
                    "knobs": {k: v for k, v in (t.get("knobs") or {}).items() if k != "per_site"}}
            print(f"[{name}] {label}: built in {build_s:.0f} s", file=sys.stderr, flush=True)
        # every variant and baseline of the model in the same interleaved rounds (`compare_variants`)
        lats = compare_variants(built, inputs[0], threads=args.threads, runs=args.runs)
        for label, cmp in lats.items():
            lat = row["variants"][label]["latency"] = cmp.to_json()
            print(f"[{name}] {label}: graphopt {lat['graphopt_ms']:.2f} ms, ORT {lat['ort_ms']:.2f} ms, "
                  f"PyTorch {lat['torch_ms']:.2f} ms", file=sys.stderr, flush=True)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)

    lines = [f"{'model':<19} {'variant':<11} {'MACs':>8} {'ORT fp32':>9} {'PyTorch':>9} {'graphopt':>10} "
             f"{'vs ORT':>7} {'vs PyT':>7} {'fidelity vs fp32':>17}"]
    for r in rows:
        for label, v in r["variants"].items():
            lat, fid = v["latency"], v["fidelity"]
            agr = f"top-1 {fid['top1'] * 100:.1f}%" if fid.get("top1") is not None else f"cos {fid['cosine']:.4f}"
            lines.append(f"{r['model']:<19} {label:<11} {human(v['macs']):>8} {lat['ort_ms']:>7.2f}ms "
                         f"{lat['torch_ms']:>7.2f}ms {lat['graphopt_ms']:>8.2f}ms {lat['ratio_vs_ort']:>6.2f}x "
                         f"{lat['ratio_vs_torch']:>6.2f}x {agr:>17}")
    table = "\n".join(lines)
    print(table)
    result = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "trials": args.trials, "batch": args.batch,
              **host_record(), "machine": platform.machine(), "versions": versions(), "rows": rows,
              "table": table}
    atomic_write_bytes(args.out, json.dumps(result, indent=1).encode())
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
