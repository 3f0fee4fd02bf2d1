"""The Python front door: trace / load a model, optimize it with a pipeline, compile it, load the artifact."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch.fx as fx

import graphopt.passes  # noqa: F401  registers the built-in passes (layer 6 may import every layer below)
from graphopt.errors import GraphoptError, ModelFileError
from graphopt.frontends.torch_export import trace
from graphopt.ir.graph import Graph

log = logging.getLogger("graphopt")

__all__ = ["trace", "load_onnx", "load_model", "optimize", "compile", "load"]


def load_onnx(path: str | Path, input_shapes: dict[str, Sequence[int]] | None = None) -> Graph:
    """Import an ONNX file (from either torch exporter or elsewhere) into graphopt's Graph; input_shapes
    {input name: shape} fixes dynamic dims (a dynamic batch dim alone defaults to 1, and stays dynamic in an ONNX
    export, as one given as None does)."""
    from graphopt.frontends.onnx_import import load_onnx as _load
    return _load(path, input_shapes)


def load_model(spec: str | Path, input_shapes: dict[str, Sequence[int]] | None = None) -> Graph:
    """A model given on the command line: an .onnx file, a torch.export archive (.pt2), a saved graph (.gopt), or
    `zoo:<name>` (shipped models). input_shapes {input name: shape} fixes an ONNX model's or a .pt2 program's dynamic
    dims, or the shapes a shipped model is traced at (another batch, image size or sequence length); a shape with
    None first, (None, 128), leaves the batch open: traced at 1, any batch in an ONNX export (as a dynamic batch
    left to its default is)."""
    spec = str(spec)
    if input_shapes and not (spec.lower().endswith((".onnx", ".pt2")) or spec.startswith("zoo:")):
        raise GraphoptError(f"input shapes apply to ONNX models and torch.export programs (.pt2) with dynamic dims "
                            f"and to zoo: models; '{spec}' has the fixed shapes it was traced or saved with")
    if spec.startswith("zoo:"):
        from graphopt.zoo import zoo_graph
        return zoo_graph(spec[4:], shapes=input_shapes)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return load_onnx(path, input_shapes)
    if suffix == ".gopt":
        return Graph.load(path)
    if suffix == ".pt2":
        from graphopt.frontends.torch_export import load_pt2
        return load_pt2(path, input_shapes)
    if suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl") and _is_torchscript(path):
        raise ModelFileError(f"'{path}' is a TorchScript archive (torch.jit.save): graphopt does not read "
                             "TorchScript. Its graph goes to ONNX with torch's TorchScript exporter: "
                             f"torch.onnx.export(torch.jit.load('{path}'), example_inputs, 'model.onnx', "
                             "dynamo=False), then pass model.onnx; or export the Python model with torch.export "
                             "(torch.export.save as .pt2)")
    if suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl"):
        raise ModelFileError(f"'{path}' is a PyTorch weights/pickle file: it holds no graph, and graphopt never "
                             "unpickles files. Trace the model in Python (graphopt.trace(model, inputs).save('m.gopt')), "
                             "save torch.export.export(model, inputs) with torch.export.save as .pt2, or export it "
                             "to ONNX, then pass that file")
    if not path.exists():
        raise ModelFileError(f"model '{path}' does not exist")
    raise ModelFileError(f"'{path}': unknown model file type '{suffix}' (expected .onnx, .pt2, .gopt or zoo:<name>)")


def _is_torchscript(path: Path) -> bool:
    """Whether `path` is a torch.jit.save archive (a zip with TorchScript code in it), from its file list only."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/__torch__/" in f"/{name}" for name in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# ctx extras the passes read (labels for training passes, teacher/loss/optimizer for distillation and recovery)
_PASS_EXTRAS = ("labels", "teacher", "loss", "optimizer")


def optimize(graph: Graph, pipeline: str, *, data: Sequence[Any] | None = None, verify: bool = False,
             dump_dir: str | Path | None = None, strict: bool = False, print_ir_after_all: bool = False,
             print_ir_after_change: bool = False, seed: int = 0, target: Any = "llvm", warn_unchanged: bool = True,
             cpu: str | None = None, **extras: Any) -> Graph:
    """Run the pipeline text (or a .yaml recipe path) over a clone of `graph` and return the new Graph.

    `target` answers the cost questions of measuring passes (select-sparse-layout): "llvm" (the host CPU, built on
    first use), "cuda" (the GPU when present, else the documented 2:4 cost table, marked estimated), "onnx" (an ONNX
    export for ONNX Runtime: measures nothing; `quantize{weights=auto}` takes int8s for its kernels), an object with
    `measure(op, shape, layout, weight)` and/or `measure_variants(key, variants)` (mixed-precision{budget=latency}),
    or None. `cpu` (with "llvm"; an LLVM CPU name, as `compile(cpu=)`) asks that CPU instead of this one: its int8
    product (`quantize{weights=auto}`) and which kernels it has; timing its kernels needs a machine that can run
    them, and is refused with the missing extensions otherwise. `warn_unchanged=False` logs a pass that changed
    nothing at info level instead of as a warning (for pipelines the user did not write). Extra keyword arguments
    reach the passes as ctx extras: `labels` (one tensor per batch), `teacher` (a Graph), `loss`, `optimizer`."""
    from graphopt.pm import PassContext, PassManager
    if not isinstance(graph, Graph):
        raise GraphoptError(f"optimize() needs a graphopt Graph (see graphopt.trace / load_onnx), got "
                            f"{type(graph).__name__}")
    unknown = sorted(set(extras) - set(_PASS_EXTRAS))
    if unknown:
        hints = {"calibration": "data", "calib": "data", "calibration_data": "data", "inputs": "data",
                 "targets": "labels", "y": "labels", "teacher_model": "teacher"}
        said = ", ".join(f"{k!r}" + (f" (did you mean {hints[k]}=?)" if k in hints else "") for k in unknown)
        raise GraphoptError(f"optimize() got unknown keyword argument(s) {said}; it takes data=, verify=, dump_dir=, "
                            f"strict=, seed=, target=, cpu=, print_ir_after_all=, print_ir_after_change=, "
                            f"warn_unchanged= and the pass extras {', '.join(_PASS_EXTRAS)}")
    pm = PassManager(pipeline, verify=verify, strict=strict, dump_dir=str(dump_dir) if dump_dir else None,
                     print_ir_after_all=print_ir_after_all, print_ir_after_change=print_ir_after_change,
                     warn_unchanged=warn_unchanged)
    batches = None
    if data is not None:
        batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in data]
        for b in batches:
            graph.check_inputs(b)
    ctx = PassContext(data=batches, reference=graph, seed=seed, strict=strict, extras=dict(extras),
                      target=_cost_oracle(target, cpu))
    return pm.run(graph, ctx)


class _LazyCpuOracle:
    """The host CPU's cost oracle, built (TVM imported) only when a pass first asks."""

    def __init__(self, cpu: str | None = None):
        self._oracle = None
        self._cpu = cpu

    def _get(self):
        if self._oracle is None:
            from graphopt.targets.tvm.cpu.cost import CpuCostOracle
            from graphopt.targets.tvm.host import cpu_target
            self._oracle = CpuCostOracle(cpu_target(self._cpu) if self._cpu else None)
        return self._oracle

    def measure(self, *args, **kwargs) -> float:
        return self._get().measure(*args, **kwargs)

    def measure_variants(self, *args, **kwargs) -> dict[str, float]:
        return self._get().measure_variants(*args, **kwargs)

    def __getattr__(self, name: str):
        # everything else the oracle offers (applies: which int8 layouts have a kernel here; measure_many: all of a
        # layer's candidates timed in interleaved rounds): without these the passes skipped the kernel checks and
        # timed candidates one after the other
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def _cost_oracle(target: Any, cpu: str | None = None):
    if cpu is not None and target != "llvm":
        raise GraphoptError(f"cpu='{cpu}' names a CPU for the llvm target, not for target={target!r}")
    if target is None or hasattr(target, "measure") or hasattr(target, "measure_variants"):
        return target
    if target == "llvm":
        if cpu is not None:
            from graphopt.targets.tvm.host import cpu_target
            cpu_target(cpu)  # a misspelt name fails now, not when a pass first asks
        return _LazyCpuOracle(cpu)
    if target in ("cuda", "cuda-sparse"):
        from graphopt.targets.tvm.gpu.cost import CudaCostOracle
        return CudaCostOracle()
    if target == "onnx":
        return _OnnxRuntimeTarget()
    raise GraphoptError(f"optimize(target=...) must be 'llvm', 'cuda', 'onnx', None or a cost oracle (an object with "
                        f"measure() and/or measure_variants()); got {target!r}")


class _OnnxRuntimeTarget:
    """target='onnx': the graph leaves as an ONNX export that ONNX Runtime runs, on whatever CPU its user has.
    Measures nothing; says which int8 kernels read the weights (quantize{weights=auto}: ONNX Runtime's u8 x s8
    kernels, which add weight pairs in int16 on x86 CPUs without VNNI)."""

    name = "onnx"

    def int8_product(self) -> str:
        return "onnxruntime"


def _hint_unfolded_batch_norms(graph: Graph) -> None:
    """compile() builds what it is given; batch norms right after a conv or linear run as kernels of their own
    unless fold-bn folded them first (a traced MobileNetV2: 1.56x the time of the folded build), and after an int8
    or sparse layer they keep it from applying them in its epilogue (int8 MobileNetV2 3.5x the time). Say so."""
    from graphopt.passes.canonicalize.fold_bn import BN_OPS, Match, match
    bns = [n for n in graph.nodes("call_function") if n.target in BN_OPS]
    foldable = [n.name for n in bns if isinstance(match(graph, n), Match)]
    if foldable:
        log.warning("compile: %d batch norm(s) after a conv or linear are not folded (%s%s); they run as separate "
                    "kernels. graphopt.optimize(graph, \"fold-bn,fold-pad,fold-constants,dce\") first folds them, "
                    "as the CLI's default pipeline does", len(foldable), ", ".join(foldable[:3]),
                    ", ..." if len(foldable) > 3 else "")
    rewritten = ("qconv2d.default", "qlinear.default", "bsr_conv1x1.default", "bsr_linear.default")
    after = [n.name for n in bns if isinstance(n.args[0], fx.Node)
             and getattr(n.args[0].target, "__name__", "") in rewritten]
    if after:
        log.warning("compile: %d batch norm(s) run as their own ops after an int8 or sparse conv or linear (%s%s), "
                    "which then cannot apply them in its own kernel. Fold them before those passes: fold-bn first "
                    "in the pipeline (quantize, mixed-precision and select-sparse-layout fold them themselves)",
                    len(after), ", ".join(after[:3]), ", ..." if len(after) > 3 else "")


def _hint_unfolded_qdq(graph: Graph) -> None:
    """A quantized graph compiles as it is: convs, linears and matmuls between dequantize and quantize ops (what
    `quantize` leaves) run as float ops with the rounding around them, not as int8 kernels, unless fold-qdq turned
    them into integer ops (quantized MobileNetV2 without fold-qdq: 117 ms against 3.9 ms with it, 2 threads). Say
    which: the ops fold-qdq's own `check` accepts."""
    from graphopt.passes.quant.fold_qdq import foldable_ops
    foldable = foldable_ops(graph)
    if foldable:
        log.warning("compile: %d quantized conv/linear/matmul op(s) are still dequantize -> float op -> quantize "
                    "(%s%s); they run as float ops, far slower than int8 kernels. Add fold-qdq after quantize in the "
                    "pipeline (\"quantize,fold-qdq\") to run them as int8", len(foldable), ", ".join(foldable[:3]),
                    ", ..." if len(foldable) > 3 else "")


def _hint_weight_only(graph: Graph, target: str) -> None:
    """Layers with int8 weights and float inputs (quantize{activations=none}: weight-only) run as float ops: the
    build dequantizes their weights once, so the artifact stores them as fp32 (weight-only MobileNetV2: 14.5 MB,
    as its fp32 build, where the report's weights line said 3.7 MB). Say so, and what keeps them int8. On the CPU
    (llvm) linears of 16+ outputs (the packed GEMM and GEMV) are exempt: the artifact keeps their int8 codes and
    makes the floats when it is loaded (targets/tvm/cpu/prepared.py; MiniLM weight-only 55.0 -> 23.3 MB)."""
    dq = ("dequantize_per_channel.default", "dequantize_per_tensor.default")

    def kept_int8(n) -> bool:
        val = n.meta.get("val")
        return (target == "llvm" and getattr(n.target, "__name__", "") == "linear.default" and val is not None
                and val.dim() >= 1 and int(val.shape[-1]) >= 16)

    layers = [n.name for n in graph.nodes("call_function")
              if getattr(n.target, "__name__", "") in ("conv2d.default", "convolution.default", "linear.default",
                                                        "conv1d.default", "conv3d.default")
              and isinstance(n.args[1], fx.Node) and getattr(n.args[1].target, "__name__", "") in dq
              and not (isinstance(n.args[0], fx.Node) and getattr(n.args[0].target, "__name__", "") in dq)
              and not kept_int8(n)]
    if layers:
        log.warning("compile: %d layer(s) have int8 weights and float inputs (weight-only, quantize{activations=none}: "
                    "%s%s); they run as float ops, and the artifact stores their weights dequantized to float (the "
                    "float build's size and speed). int8 kernels and int8 storage need quantized activations "
                    "(\"quantize,fold-qdq\" with calibration data); an ONNX export (--target onnx) keeps the int8 "
                    "weights", len(layers), ", ".join(layers[:3]), ", ..." if len(layers) > 3 else "")


def _hint_dynamic_quantize(graph: Graph, target: str) -> None:
    """An ONNX Runtime quantize_dynamic model compiles exactly as it is: its layers' inputs are rounded onto a grid
    computed on every call. On the CPU its linears with int8 weights (which fold-constants keeps integer) run
    graphopt's int8 kernels on that grid, as ONNX Runtime does; its other layers (convs, uint8 weights, and every
    layer on a GPU) run as float ops on the rounded input. Say which, and how to get int8 kernels for all:
    calibrated static scales."""
    dyn = [n for n in graph.nodes("call_function") if getattr(n.target, "__name__", "") == "dynamic_quantize.default"]
    if not dyn:
        return

    def int8_weight(w) -> bool:  # a symmetric int8 weight kept integer (uint8 ones have zero points)
        kind = getattr(w.target, "__name__", "") if getattr(w, "op", "") == "call_function" else ""
        if kind == "dequantize_per_tensor.default":
            return int(w.args[2]) == 0
        return kind == "dequantize_per_channel.default" and getattr(w.args[2], "op", "") == "get_attr" and \
            not bool(graph.get_param(w.args[2].target).any())

    layers = [u for n in dyn for u in n.users]
    floats = [u.name for u in layers if target != "llvm" or getattr(u.target, "__name__", "") != "linear.default"
              or not int8_weight(u.args[1])]
    how = ("\"--pipeline quantize,fold-qdq --inputs calib.npz\" calibrates static scales for them and runs the "
           "layers as int8 kernels")
    if not floats:
        log.info("compile: %d linear(s) read inputs quantized dynamically (an ONNX Runtime quantize_dynamic model, "
                 "or quantize{activations=dynamic}) and run graphopt's int8 kernels on each call's grid; %s "
                 "without the per-call min and max",
                 len(layers), how)
        return
    log.warning("compile: %d layer input(s) are quantized dynamically (ONNX Runtime's quantize_dynamic or graphopt's: "
                "%s%s); %d of their %d layers run as float ops on the rounded input (%s%s%s). %s",
                len(dyn), ", ".join(n.name for n in dyn[:3]), ", ..." if len(dyn) > 3 else "", len(floats),
                len(layers), ", ".join(floats[:3]), ", ..." if len(floats) > 3 else "",
                "" if target == "llvm" else "; the GPU targets have no dynamic int8 kernels", how)


def compile(graph: Graph, target: str = "llvm", tuning: Any = None, output: str | Path = "graphopt-out", *,  # noqa: A001
            cuda_arch: str = "sm_80,sm_90", precision: str = "fp16", sparse_min_speedup: float = 1.1,
            cpu: str | None = None, cuda_graph: bool = False) -> Path:
    """Compile to an artifact folder: `llvm` (TVM for this CPU, model.so), `cuda` / `cuda-sparse` (TVM for NVIDIA
    GPUs, model.so with a fatbin for each of `cuda_arch`; no GPU needed to build; "sm_90a" alone: H100/H200-only
    code, dense linears on wgmma), `onnx` (model.onnx) or `pt2`.

    `tuning` is None (no tuning) or `graphopt.Tuning(trials=..., db=...)` (llvm only). `precision` (cuda targets):
    fp16 or bf16 (convs and matmuls on half-width operands, fp32 accumulation) or fp32. `sparse_min_speedup`
    (cuda-sparse): a 2:4 layer runs on the sparse kernel when it is (measured, or estimated from the cost table) at
    least this many times faster than dense. `cuda_graph` (cuda targets): replay the model's kernels as one CUDA
    graph, captured on the first call (default: one launch a kernel; not yet measured on a GPU). `cpu` (llvm): an
    LLVM CPU name to cross-compile for (e.g.
    "sapphirerapids", "znver4": AVX-512 and VNNI int8 kernels) instead of this machine's. Returns the folder.
    """
    if not isinstance(graph, Graph):
        raise GraphoptError(f"compile() needs a graphopt Graph, got {type(graph).__name__}")
    if target in ("llvm", "cuda", "cuda-sparse"):  # (exports keep the graph's ops as they are)
        _hint_unfolded_batch_norms(graph)
        _hint_unfolded_qdq(graph)
        _hint_weight_only(graph, target)
        _hint_dynamic_quantize(graph, target)
    if cuda_graph and target not in ("cuda", "cuda-sparse"):
        raise GraphoptError(f"cuda_graph=True applies to the cuda targets, not '{target}'")
    if cpu is not None and target != "llvm":
        raise GraphoptError(f"cpu='{cpu}' names a CPU to compile for; it applies to the llvm target, not '{target}'")
    if target == "llvm":
        from graphopt.targets.tvm.build import compile_to_dir
        return compile_to_dir(graph, output, target, tuning, cpu=cpu)
    if target in ("cuda", "cuda-sparse"):
        from graphopt.targets.tvm.build import compile_gpu_to_dir
        return compile_gpu_to_dir(graph, output, target, cuda_arch, precision, tuning,
                                  sparse_min_speedup=sparse_min_speedup, cuda_graph=cuda_graph)
    if target in ("onnx", "pt2"):
        from graphopt.ir.files import atomic_dir
        from graphopt.targets.artifact import build_manifest, write_manifest
        info: dict[str, Any] = {"kind": target}
        with atomic_dir(output) as tmp:
            if target == "onnx":
                from graphopt.targets.onnx.export import export_onnx
                export_onnx(graph, tmp / "model.onnx", report=info)
            else:
                from graphopt.targets.torch.export import export_pt2
                export_pt2(graph, tmp / "model.pt2")
            write_manifest(tmp, build_manifest(graph, target, info, tuning=None, build_seconds=0.0, folder=tmp))
        return Path(output)
    raise GraphoptError(f"unknown target '{target}' (choose llvm, cuda, cuda-sparse, onnx or pt2)")


def load(folder: str | Path, threads: int | None = None):
    """Load an artifact folder as a callable (numpy in, tuple of numpy out): a TVM build on the TVM runtime, an
    `onnx` export on ONNX Runtime (`threads`: its intra-op threads), a `pt2` export on PyTorch."""
    from graphopt.runtime import load as _load
    return _load(folder, threads)
