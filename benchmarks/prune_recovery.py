"""Structured pruning of a real model, before and after distillation recovery, measured against fp32.

Calibration/training photos and evaluation photos are disjoint (all ship inside scikit-image / scikit-learn);
recovery trains on unlabeled crops with the unpruned model as teacher. Prints a table and writes JSON.

    python benchmarks/prune_recovery.py --model mobilenet_v2 --ratios 0.3,0.5 --epochs 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time

TRAIN_PHOTOS = ["astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "china"]
EVAL_PHOTOS = ["coffee", "chelsea", "stereo_motorcycle", "retina", "flower"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mobilenet_v2", choices=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--ratios", default="0.3", help="comma-separated prune-channels ratios")
    ap.add_argument("--prune-options", default="scope=global", help="extra prune-channels options")
    ap.add_argument("--epochs", type=int, default=3, help="recover{epochs=}")
    ap.add_argument("--lr", type=float, default=1e-4, help="recover{lr=}")
    ap.add_argument("--holdout", type=float, default=0.0, help="recover{holdout=}: fraction of the training crops "
                    "kept out to pick the best epoch (0: keep the last)")
    ap.add_argument("--train-crops", type=int, default=16, help="random crops per training photo")
    ap.add_argument("--eval-crops", type=int, default=8, help="random crops per evaluation photo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/prune_recovery.json")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    import graphopt
    from graphopt.bench import fidelity
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.zoo import photo_batches, zoo_entry, zoo_graph

    style = zoo_entry(args.model).style
    train = [(x,) for x in photo_batches(style, TRAIN_PHOTOS, args.train_crops, seed=1)]
    evals = [(x,) for x in photo_batches(style, EVAL_PHOTOS, args.eval_crops, seed=2)]
    graph = zoo_graph(args.model)
    refs = [graph.run(*b)[0].numpy() for b in evals]
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        base = f"fold-bn,prune-channels{{ratio={ratio} {args.prune_options}}}"
        for label, pipeline in (("pruned", base),
                                ("pruned+recover", f"{base},recover{{epochs={args.epochs} lr={args.lr}"
                                                   + (f" holdout={args.holdout}" if args.holdout else "") + "}")):
            t0 = time.perf_counter()
            out = graphopt.optimize(graph, pipeline, data=train)
            f = fidelity(refs, [out.run(*b)[0].numpy() for b in evals], classification=True).to_json()
            rows.append({"ratio": ratio, "variant": label, "pipeline": pipeline, "macs": out.stats().macs,
                         "params": out.stats().params, "seconds": round(time.perf_counter() - t0, 1), **f})
            print(f"[{args.model}] {label} {ratio}: top-1 {f['top1'] * 100:.1f}%", file=sys.stderr, flush=True)
    base_macs = graph.stats().macs
    lines = [f"{'ratio':>5}  {'variant':<15} {'MACs':>8} {'top-1 agr':>9} {'top-5 agr':>9} {'KL':>8}  "
             f"({args.model}, {len(evals)} eval crops of {len(EVAL_PHOTOS)} photos, train on {len(train)} other crops)"]
    for r in rows:
        lines.append(f"{r['ratio']:>5}  {r['variant']:<15} {r['macs'] / base_macs * 100:>7.1f}% "
                     f"{r['top1'] * 100:>8.1f}% {r['top5'] * 100:>8.1f}% {r['kl']:>8.4f}")
    table = "\n".join(lines)
    print(table)
    atomic_write_bytes(args.out, json.dumps({"model": args.model, "date": time.strftime("%Y-%m-%d"),
                                             "threads": args.threads, "rows": rows, "table": table}, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
