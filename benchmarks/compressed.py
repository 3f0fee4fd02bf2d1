"""Compressed artifacts against ONNX Runtime, per shipped model, in one run (the CPU-kernel issue's third goal:
prune + int8 >= 3x faster than ORT fp32 and >= 1.5x faster than ORT int8 `quantize_static` on the same original
model).

Rows: graphopt fp32, int8 (and the int8 graph ONNX Runtime users get: quantized for target onnx, whose
`weights=auto` is int8s, no x86 CPU's ORT kernels saturating it, exported and run by ONNX Runtime: "int8s on ORT"), the
CPU's fastest exact width W where that is not int8 (`--width`; by default what
`quantize{weights=auto}` takes: int8s, the u8 x s8 kernels' exact width, on AVX2 CPUs without VNNI; int8 with VNNI),
and `prune-channels{ratio=R}` + W for each ratio; ONNX Runtime fp32 and int8 of the unpruned model, the int8 in
its static forms (QDQ, per-channel): "int8" with int8 activations (S8S8, the default its docs recommend for CPUs)
and "int8 u8" with uint8 activations (U8S8, its faster x86 kernels: about 2x S8S8 on a Zen 4), and "int8 dynamic"
(`quantize_dynamic`, per-call activation grids: on MiniLM faster than both); "/ORT int8" divides by the fastest.
"graphopt ORT-dynamic file" is that dynamic file compiled by graphopt as it is (default pipeline, no calibration),
and for MiniLM "graphopt dynamic W" is graphopt's own `quantize{activations=dynamic weights=W}` of the fp32 model.
Latency is batch 1 at the zoo's input shape, timed in interleaved rounds with the same thread count. Fidelity is against the fp32 model on the zoo's evaluation inputs
(top-1 agreement for the image models, mean cosine of the sentence embeddings for MiniLM). Pruned rows have no
fine-tuning unless `--recover-epochs` is given: then `recover` distills from the unpruned model, for MiniLM on
WordNet noun definitions (Debian's `wordnet-base`, as `wordnet_probe.py` fetches it; `--recover-samples` of them,
with the cosine loss) and reports the cosine on 200 other definitions too; for the image models on the calibration
crops (five photos: expect little).

`--sparse S` adds `sparsify{sparsity=S block=8x4}` + W + `select-sparse-layout` rows: 8x4 zero blocks that the
int8 BSR kernels take where the layout pass measures them faster (no fine-tuning either, unless recovering).
`--sparse-int8 S` adds `sparsify{sparsity=S}` (unstructured) + int8 (full range) + `select-sparse-layout` rows, for
the int8 CSR kernels. `--sparse-amx S` (CPUs with AMX tiles) adds `sparsify{sparsity=S block=16x64}` + int8 +
`select-sparse-layout` rows, for the tile BSR kernel of the int8 linears.

    python benchmarks/compressed.py [--models mobilenet_v2,efficientnet_lite0,minilm] [--prune 0.3,0.5] [--sparse 0.8]
                                    [--sparse-int8 0.9] [--sparse-amx 0.8]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wordnet_texts(n_train: int, n_held: int):
    """Tokenized WordNet noun definitions (batch 1, the zoo's 128 tokens): n_train to recover on, n_held others."""
    import random

    from graphopt.zoo import tokenize
    from wordnet_probe import noun_synsets, wordnet_dir
    try:
        folder = wordnet_dir(None)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--recover-epochs needs WordNet for MiniLM and it could not be fetched ({e}); run "
                         "`python benchmarks/wordnet_probe.py --help` for where it is cached, or pass --recover-epochs 0")
    defs = [d for _, d, _ in noun_synsets(folder)]
    random.Random(1).shuffle(defs)
    return ([tokenize([d]) for d in defs[:n_train]], [tokenize([d]) for d in defs[n_train:n_train + n_held]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mobilenet_v2,efficientnet_lite0,minilm", help="comma-separated zoo names")
    ap.add_argument("--prune", default="0.3,0.5", help="comma-separated prune-channels ratios (each + the width W)")
    ap.add_argument("--sparse", default="", help="comma-separated sparsities: sparsify{block=8x4} + W + "
                    "select-sparse-layout rows (int8 BSR kernels where measured faster; default: none)")
    ap.add_argument("--sparse-int8", default="", help="comma-separated sparsities: unstructured sparsify + int8 + "
                    "select-sparse-layout rows (int8 CSR kernels where measured faster; default: none)")
    ap.add_argument("--sparse-amx", default="", help="comma-separated sparsities: sparsify{block=16x64} + int8 + "
                    "select-sparse-layout rows (AMX tile BSR kernels of the int8 linears where measured faster; "
                    "CPUs with AMX only; default: none)")
    ap.add_argument("--recover-epochs", type=int, default=0, help="recover epochs after pruning (0: none)")
    ap.add_argument("--recover-samples", type=int, default=1000, help="MiniLM: WordNet definitions to recover on")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=30, help="timed runs per runtime (median)")
    ap.add_argument("--width", choices=["int8", "int8s", "int7"], help="weight width of the pruned and block-sparse "
                    "rows (default: what quantize{weights=auto} takes here: int8 with VNNI, int8s on AVX2)")
    ap.add_argument("--out", default="benchmarks/results/compressed.json")
    from graphopt.plots import add_plot_options, replot_asked
    add_plot_options(ap, "speed-up over ORT fp32 against fidelity, marker area = artifact size, one panel per "
                         "model")
    args = ap.parse_args(argv)
    if replot_asked(ap, args, plot):
        return 0
    fractions = {}
    for opt in ("prune", "sparse", "sparse_int8", "sparse_amx"):  # checked before any model is loaded
        try:
            fractions[opt] = [float(v) for v in getattr(args, opt).split(",") if v.strip()]
        except ValueError:
            ap.error(f"--{opt.replace('_', '-')}: {getattr(args, opt)!r} is not a comma-separated list of fractions")
        if any(not 0 < v < 1 for v in fractions[opt]):
            ap.error(f"--{opt.replace('_', '-')}: every value must be in (0, 1), got {getattr(args, opt)!r}")

    from graphopt.bench import set_threads
    set_threads(args.threads)  # before TVM's thread pool starts

    import numpy as np

    import graphopt
    from graphopt.cli import DEFAULT_PIPELINE
    from graphopt.bench import (fidelity, interleaved_medians, ort_quantize_dynamic, ort_quantize_static, ort_session,
                                reference_onnx)
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.zoo import calibration_inputs, eval_inputs, zoo_entry, zoo_graph

    from graphopt.targets.tvm.cpu.amx import amx_usable
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.host import cpu_target, host_record
    if fractions["sparse_amx"] and not amx_usable(cpu_target()):
        print("--sparse-amx: this CPU has no AMX tiles (or GRAPHOPT_AMX=0); those rows are left out")
    # the int8 width this CPU's kernels run fastest and exactly: any int8 on VNNI, pair-bounded int8s on AVX2
    fast = args.width or ("int8" if int8_dot(cpu_target()) == "vnni" else "int8s")
    work = Path(tempfile.mkdtemp(prefix="graphopt-compressed-"))
    results, lines = [], []
    for name in args.models.split(","):
        text = zoo_entry(name).kind == "text"
        graph = graphopt.optimize(zoo_graph(name), "fold-constants,dce" if text else "fold-bn")
        calib, evals = list(calibration_inputs(name)), list(eval_inputs(name))
        cal = "minmax" if text else "percentile"  # the README's advice per model family
        recover, train, held = "", calib, []
        if args.recover_epochs:
            recover = f",recover{{epochs={args.recover_epochs} lr=3e-4" + (" kd-loss=cosine}" if text else "}")
            if text:
                train, held = wordnet_texts(args.recover_samples, 200)
        pipes = {"fp32": None, "int8": f"quantize{{calibrator={cal} weights=int8}},fold-qdq"}
        if fast != "int8":
            pipes[fast] = f"quantize{{calibrator={cal} weights={fast}}},fold-qdq"
        if text:  # graphopt's own dynamic quantization (no calibration data): linears on per-call grids
            pipes[f"dynamic {fast}"] = f"quantize{{activations=dynamic weights={fast}}},fold-qdq"
        for r in fractions["prune"]:
            pipes[f"prune{round(r * 100)}+{fast}"] = (f"prune-channels{{ratio={r}}}{recover},"
                                                      f"quantize{{calibrator={cal} weights={fast}}},fold-qdq")
        for sp in fractions["sparse"]:
            pipes[f"sparse{round(sp * 100)}+{fast}"] = (f"sparsify{{sparsity={sp} block=8x4}}{recover},"
                                                        f"quantize{{calibrator={cal} weights={fast}}},fold-qdq,"
                                                        "select-sparse-layout{candidates=dense,bsr8x4}")
        for sp in fractions["sparse_amx"] if amx_usable(cpu_target()) else []:
            pipes[f"sparse{round(sp * 100)}b16x64+int8"] = (f"sparsify{{sparsity={sp} block=16x64}}{recover},"
                                                           f"quantize{{calibrator={cal} weights=int8}},fold-qdq,"
                                                           "select-sparse-layout{candidates=dense,bsr16x64}")
        for sp in fractions["sparse_int8"]:
            pipes[f"sparse{round(sp * 100)}u+int8"] = (f"sparsify{{sparsity={sp}}}{recover},"
                                                       f"quantize{{calibrator={cal} weights=int8}},fold-qdq,"
                                                       "select-sparse-layout{candidates=dense,csr}")
        arts, size, chosen = {}, {}, {}
        for key, pipe in pipes.items():
            t0 = time.perf_counter()
            g = graphopt.optimize(graph, pipe, data=train if "recover" in (pipe or "") else calib) if pipe else graph
            folder = work / f"{name}-{key.replace('+', '_')}"
            arts[f"graphopt {key}"] = graphopt.load(graphopt.compile(g, "llvm", output=folder))
            size[f"graphopt {key}"] = (folder / "model.so").stat().st_size
            if key == "int8":  # the int8 graph as ORT users get it: optimized for target onnx (weights=auto:
                # int8s, which ORT's u8 x s8 kernels do not saturate on CPUs without VNNI), exported, run by ORT
                eg = graphopt.optimize(graph, f"quantize{{calibrator={cal} weights=auto}},fold-qdq", data=calib,
                                       target="onnx")
                exp = graphopt.compile(eg, "onnx", output=work / f"{name}-int8-onnx")
                arts["graphopt int8s on ORT"] = graphopt.load(exp, threads=args.threads)
                size["graphopt int8s on ORT"] = (exp / "model.onnx").stat().st_size
            layouts = [r["choice"] for r in (g.meta.get("sparse_layout", {}) if pipe else {}).values()]
            if layouts:
                chosen[f"graphopt {key}"] = {lay: layouts.count(lay) for lay in sorted(set(layouts))}
            print(f"[{name}] {key} built in {time.perf_counter() - t0:.0f} s"
                  + (f"; layers per layout {chosen[f'graphopt {key}']}" if layouts else ""), file=sys.stderr, flush=True)

        def run_all(fn):
            return [fn(*[np.asarray(t) for t in b]) for b in evals]

        refs = run_all(lambda *a: arts["graphopt fp32"](*a)[0])
        fid = {k: fidelity(refs, run_all(lambda *a, art=a_: art(*a)[0]), classification=not text).to_json()
               for k, a_ in arts.items()}
        if held:  # held-out WordNet definitions: the recovered rows were trained on other ones
            ref_h = [arts["graphopt fp32"](*[np.asarray(t) for t in b])[0] for b in held]
            for k, a_ in arts.items():
                fid[k]["cosine_wordnet_heldout"] = fidelity(ref_h, [a_(*[np.asarray(t) for t in b])[0]
                                                                    for b in held], classification=False).cosine

        onnx32 = reference_onnx(graph, str(work / name))
        sess = {"onnxruntime fp32": ort_session(onnx32, args.threads)}
        names = [i.name for i in sess["onnxruntime fp32"].get_inputs()]

        for key, acts in (("onnxruntime int8", "int8"), ("onnxruntime int8 u8", "uint8")):
            q8 = ort_quantize_static(onnx32, work / f"{name}-ort-{acts}.onnx",
                                     [{n: np.asarray(t) for n, t in zip(names, b)} for b in calib], activations=acts)
            sess[key] = ort_session(q8, args.threads)
        dyn = ort_quantize_dynamic(onnx32, work / f"{name}-ort-dynamic.onnx")
        sess["onnxruntime int8 dynamic"] = ort_session(dyn, args.threads)
        # the user who already has that file (transformers.js / Optimum ship it) compiling it as it is: its int8
        # linears run graphopt's int8 kernels on each call's grid, as ORT does (convs stay float on rounded inputs)
        key, folder = "graphopt ORT-dynamic file", work / f"{name}-graphopt-dynamic"
        arts[key] = graphopt.load(graphopt.compile(graphopt.optimize(graphopt.load_onnx(dyn), DEFAULT_PIPELINE),
                                                   "llvm", output=folder))
        size[key] = (folder / "model.so").stat().st_size
        fid[key] = fidelity(refs, run_all(lambda *a: arts[key](*a)[0]), classification=not text).to_json()
        for key in ("onnxruntime int8", "onnxruntime int8 u8", "onnxruntime int8 dynamic"):
            fid[key] = fidelity(refs, [sess[key].run(None, {n: np.asarray(t) for n, t in zip(names, b)})[0]
                                       for b in evals], classification=not text).to_json()

        x = [np.asarray(t) for t in evals[0]]
        feed = dict(zip(names, x))
        calls = {**{k: a.prepared(*x) for k, a in arts.items()},
                 **{k: (lambda s=s: s.run(None, feed)) for k, s in sess.items()}}
        lat = interleaved_medians(calls, runs=args.runs)
        ort8 = min(lat[k] for k in ("onnxruntime int8", "onnxruntime int8 u8", "onnxruntime int8 dynamic"))
        metric = "cosine" if text else "top1"
        lines.append(f"{name:<18} {'runtime':<28} {'ms':>7} {'/ORT fp32':>9} {'/ORT int8':>9} {'x faster':>8} "
                     f"{metric:>8} {'file MB':>7}   ({args.threads} threads)")
        for k, v in lat.items():
            f = fid.get(k)
            val = "-" if f is None else f"{f[metric]:.3f}" if text else f"{f[metric] * 100:.1f}%"
            lines.append(f"{'':<18} {k:<28} {v * 1e3:>7.2f} {v / lat['onnxruntime fp32']:>9.2f} "
                         f"{v / ort8:>9.2f} {lat['onnxruntime fp32'] / v:>7.2f}x {val:>8} "
                         + (f"{size[k] / 1e6:>7.1f}" if k in size else f"{'':>7}")
                         + (f"   held-out cos {f['cosine_wordnet_heldout']:.3f}" if f and "cosine_wordnet_heldout" in f
                            else ""))
        results.append({"model": name, "pipelines": pipes, "latency_ms": {k: round(v * 1e3, 3) for k, v in lat.items()},
                        "fidelity": fid, "artifact_bytes": size, "sparse_layouts": chosen})
        print(f"[{name}] done", file=sys.stderr, flush=True)
    table = "\n".join(lines)
    print(table)
    atomic_write_bytes(args.out, json.dumps({"date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                                             **host_record(),
                                             "recover_epochs": args.recover_epochs, "models": results,
                                             "table": table}, indent=1).encode())
    if args.plot:
        print(f"wrote {plot({'models': results, 'threads': args.threads}, args.plot)}", file=sys.stderr)
    return 0


def plot(saved: dict, path: str) -> str:
    """The results' speed/fidelity/size trade-off as a PNG (`graphopt.plots.plot_tradeoff`)."""
    from graphopt.plots import plot_tradeoff
    panels = []
    for m in saved["models"]:
        lat, fid, size = m["latency_ms"], m["fidelity"], m.get("artifact_bytes", {})
        text = m["model"] == "minilm"
        metric = "cosine" if text else "top1"
        points = [{"label": k.replace("graphopt ", "").replace("onnxruntime", "ORT"),
                   "speedup": lat["onnxruntime fp32"] / v,
                   "fidelity": (fid.get(k) or {}).get(metric, 1.0 if k == "onnxruntime fp32" else None),
                   "mb": size[k] / 1e6 if k in size else None} for k, v in lat.items()]
        panels.append({"model": m["model"], "baseline": "ORT fp32",
                       "metric": "cosine to fp32" if text else "top-1 agreement with fp32", "points": points})
    threads = saved.get("threads")
    return str(plot_tradeoff(panels, path, "compressed artifacts, batch 1" + (f", {threads} threads" if threads
                                                                                   else "")))


if __name__ == "__main__":
    sys.exit(main())
