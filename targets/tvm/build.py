"""Build a Graph for the host CPU with TVM and write the artifact: model.so + manifest.json, atomically."""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.ir.files import atomic_dir
from graphopt.ir.graph import Graph
from graphopt.targets.artifact import build_manifest, write_manifest
from graphopt.targets.tvm.cpu.amx import amx_usable, uses_amx
from graphopt.targets.tvm.cpu.int8 import int8_dot
from graphopt.targets.tvm.cpu.rules import vector_lanes
from graphopt.targets.tvm.cpu.threads import SERIAL_US
from graphopt.targets.tvm.host import AMX_FLAGS, cpu_target, host_cpu, missing_here, target_isa
from graphopt.targets.tvm.lower import lower_to_relax
from graphopt.targets.tvm.tuning import Tuning, TuningSummary, tune

log = logging.getLogger(__name__)

TARGETS = ("llvm", "cuda", "cuda-sparse")
GPU_TARGETS = ("cuda", "cuda-sparse")


def parse_archs(arch: str | list[str] | tuple[str, ...]) -> list[str]:
    """"sm_80,sm_90" -> ["sm_80", "sm_90"], checked against what graphopt builds for (lowest first)."""
    from graphopt.targets.tvm.gpu.pipeline import ARCHS, HOPPER_ONLY
    archs = [a.strip() for a in (arch.split(",") if isinstance(arch, str) else arch) if a.strip()]
    bad = [a for a in archs if a not in ARCHS]
    if not archs or bad:
        raise TargetError(f"unknown CUDA architecture {', '.join(bad) or repr(arch)} (choose from: {', '.join(ARCHS)};"
                          " several as sm_80,sm_90)")
    archs = sorted(set(archs), key=lambda a: int(a[3:5]))
    if HOPPER_ONLY in archs and len(archs) > 1:
        raise TargetError(f"--cuda-arch {','.join(archs)}: {HOPPER_ONLY} builds Hopper-only kernels (wgmma), which no "
                          f"other GPU runs: give {HOPPER_ONLY} alone for H100/H200, or sm_90 with the others for one "
                          "artifact that runs on all of them")
    return archs


def _check_precision(precision: str) -> None:
    from graphopt.targets.tvm.gpu.pipeline import PRECISIONS
    if precision not in PRECISIONS:
        raise TargetError(f"unknown GPU precision '{precision}' (choose one of: {', '.join(PRECISIONS)})")


def build_gpu_executable(graph: Graph, target: str = "cuda", archs=("sm_80", "sm_90"), precision: str = "fp16",
                         tuning: Tuning | None = None, sparse_min_speedup: float = 1.1, cuda_graph: bool = False):
    """Lower and build for CUDA (no GPU needed); returns (executable, tvm Target, seconds, 2:4 layer records,
    records of the linears on graphopt's dense tensor-core kernel). The kernel source is generated for the lowest
    architecture in `archs` and compiled for each of them when the library is exported."""
    from graphopt.targets.tvm.gpu.pipeline import HOPPER_ONLY, build_cuda, cuda_target

    if target not in GPU_TARGETS:
        raise TargetError(f"'{target}' is not a GPU target (choose one of: {', '.join(GPU_TARGETS)})")
    archs = parse_archs(archs)
    _check_precision(precision)
    if tuning is not None:
        from graphopt.targets.tvm.gpu.device import cuda_available
        tuning.validate()
        if not cuda_available():
            raise TargetError("tuning for the cuda targets runs kernels on the GPU and this machine has none; build "
                              "untuned (dlight schedules) here, or tune on a machine with the GPU and TVM's compiler")
    tgt = cuda_target(archs[0])
    sparse24 = None
    if target == "cuda-sparse":
        if not sparse_min_speedup >= 1.0:
            raise TargetError(f"sparse min-speedup must be >= 1 (never slower than dense), got {sparse_min_speedup}")
        sparse24 = {"min_speedup": float(sparse_min_speedup), "format": "bf16" if precision == "bf16" else "f16",
                    "measured": graph.meta.get("sparse_layout", {}), "wgmma": archs == [HOPPER_ONLY]}
    dense_tc = {"format": {"fp16": "f16", "bf16": "bf16"}.get(precision), "records": {},
                "wgmma": archs == [HOPPER_ONLY]}
    mod = lower_to_relax(graph, device="cuda", sparse24=sparse24, gpu_dense=dense_tc)
    t0 = time.perf_counter()
    try:
        database = None
        if tuning is not None:
            import tempfile

            from graphopt.targets.tvm.gpu.pipeline import tune_cuda
            work = tuning.db or tempfile.mkdtemp(prefix="graphopt-cuda-tune-")
            database = tune_cuda(mod, tgt, precision, tuning.trials, str(work))
        ex = build_cuda(mod, tgt, precision, database, cuda_graph)
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"TVM build for {target} ({archs[0]}) failed: {type(e).__name__}: {e}") from None
    return ex, tgt, time.perf_counter() - t0, (sparse24 or {}).get("records", {}), dense_tc["records"]


def _lower_with_tuned_knobs(graph: Graph, tgt, tuning: Tuning, final=contextlib.nullcontext):
    """Lower, measure the knobs of graphopt's own kernels inside the model (`cpu/knobs.py`: MetaSchedule cannot
    rewrite them) within half the time budget at most, and lower again with the records where any differs from the
    rule. Returns the module, the KnobSummary, and the Tuning for MetaSchedule with what is left of the budget.
    `final`: a context the returned module's lowerings run in (not the measured ones)."""
    import dataclasses

    from graphopt.targets.tvm.cpu import knobs
    start = knobs._now()
    with knobs.collecting() as col, final():
        mod = lower_to_relax(graph, target=tgt)
    deadline = None if tuning.minutes is None else start + 30.0 * tuning.minutes
    inputs = [t.numpy() for t in graph.example_inputs()]

    def measure(todo, base, until):
        return knobs.measure_in_model(todo, lambda: lower_to_relax(graph, target=tgt), tgt, inputs, base, until,
                                      tuning.progress)

    records, summary = knobs.tune_sites(col.sites, tgt, measure, tuning.db, deadline, tuning.retune)
    if any(records[name] != col.sites[name].default for name in records):
        with knobs.applied(records), final():
            mod = lower_to_relax(graph, target=tgt)
    if tuning.minutes is not None:
        spent = (knobs._now() - start) / 60.0
        tuning = dataclasses.replace(tuning, minutes=max(tuning.minutes - spent, 0.05))
    return mod, summary, tuning


def build_executable(graph: Graph, target: str = "llvm", tuning: Tuning | None = None, rules: bool = True,
                     cpu: str | None = None, stats: dict | None = None, prepare: bool = False):
    """Lower and build; returns (executable, tvm Target, TuningSummary or None, seconds to build).

    Tuned kernels come from the MetaSchedule database; every other kernel gets graphopt's CPU schedule rules
    (rules=False leaves those to TVM's default loop nests, for comparison). `cpu` (an LLVM CPU name) cross-compiles
    for that CPU instead of this one: its vector width and int8 dot product (VNNI `vpdpbusd` where it has one).
    (A tvm Target as `cpu` is built for as it is.) `stats` (a dict), when given, receives what the build decided:
    "one_thread", the kernels run serially; "amx",
    whether an AMX tile kernel was built (the artifact then needs AMX where it runs). `prepare` (artifacts): the
    weights with a load-time kernel (int4 nibbles of the kernels that read a whole int8 weight, the int8 codes of
    weight-only linears on the packed GEMM) are stored narrow and made once, by the executable's function
    `prepare`, and passed to `main` after the inputs (`cpu.prepared`; how many: stats["prepared_weights"]);
    without it they are stored whole."""
    from graphopt.targets.tvm.cpu.pipeline import build_cpu

    if target != "llvm":
        raise TargetError(f"unknown CPU target '{target}' (choose llvm; GPUs: {', '.join(GPU_TARGETS)})")
    tgt = cpu_target(cpu)
    if tuning is not None:
        tuning.validate()
        missing = missing_here(target_isa(tgt) + (list(AMX_FLAGS) if amx_usable(tgt) else []))
        if missing:
            raise TargetError(f"tuning measures kernels on this machine ({host_cpu()}), which lacks "
                              f"{', '.join(missing)} that --cpu {cpu} code uses: tune on a {cpu} machine, "
                              "or build untuned here")
    from graphopt.targets.tvm.cpu.prepared import hoist, load_time_weights
    final = load_time_weights if prepare else contextlib.nullcontext
    if tuning is not None:
        mod, knobs_summary, tuning = _lower_with_tuned_knobs(graph, tgt, tuning, final)
    else:
        with final():
            mod = lower_to_relax(graph, target=tgt)
    if stats is not None:
        stats["amx"] = uses_amx(mod)
    if prepare:
        mod, count = hoist(mod)
        if stats is not None:
            stats["prepared_weights"] = count
    t0 = time.perf_counter()
    summary = None
    try:
        if tuning is not None:
            database, summary = tune(mod, tgt, tuning)
            summary.knobs = knobs_summary.to_json()
            # the pipeline fuses the original module the same way tuning did, so the workload keys match
            ex = build_cpu(mod, tgt, database, rules, stats)
        else:
            ex = build_cpu(mod, tgt, None, rules, stats)
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"TVM build for {tgt} failed: {type(e).__name__}: {e}") from None
    return ex, tgt, summary, time.perf_counter() - t0


def compile_gpu_to_dir(graph: Graph, output: str | Path, target: str = "cuda", archs=("sm_80", "sm_90"),
                       precision: str = "fp16", tuning: Tuning | None = None, sparse_min_speedup: float = 1.1,
                       cuda_graph: bool = False) -> Path:
    """Build for CUDA and write the artifact: model.so whose CUDA kernels are a fatbin for every arch in `archs`
    (compiled here with nvcc, so the GPU machine needs only the TVM runtime and a driver)."""
    from graphopt.targets.tvm.gpu.fatbin import fatbin_packer

    archs = parse_archs(archs)
    ex, tgt, seconds, sparse, dense_tc = build_gpu_executable(graph, target, archs, precision, tuning,
                                                               sparse_min_speedup, cuda_graph)
    record: dict = {}
    with atomic_dir(output) as tmp:
        t0 = time.perf_counter()
        ex.export_library(str(tmp / "model.so"), fpack_imports=fatbin_packer(archs, record), options=["-s"])
        (tmp / "graph.ir").write_text(graph.text())
        info = {"kind": target, "device": "cuda", "archs": archs, "precision": precision,
                "cuda_graph": bool(cuda_graph),
                "kernels": record.get("cuda_modules", []),
                "sparse_kernels": sparse, "tensor_core_linears": dense_tc}
        manifest = build_manifest(graph, str(tgt), info, tuning=None,
                                  build_seconds=round(seconds + time.perf_counter() - t0, 2), folder=tmp)
        write_manifest(tmp, manifest)
    return Path(output)


def compile_to_dir(graph: Graph, output: str | Path, target: str = "llvm", tuning: Tuning | None = None,
                   cpu: str | None = None) -> Path:
    """Build and write the artifact folder `output` (replaced atomically; a foreign folder is never overwritten).
    The manifest lists the ISA extensions the code may use (`isa`); `graphopt.load` checks them against the CPU."""
    stats: dict = {}
    ex, tgt, summary, seconds = build_executable(graph, target, tuning, cpu=cpu, stats=stats, prepare=True)
    with atomic_dir(output) as tmp:
        # -s: no debug sections (generated kernels have no source to step through; they were a tenth of an int8 .so)
        ex.export_library(str(tmp / "model.so"), options=["-s"])
        (tmp / "graph.ir").write_text(graph.text())
        manifest = build_manifest(graph, str(tgt), {"kind": target, "mcpu": str(tgt.attrs.get("mcpu", "")),
                                                    "num_cores": int(tgt.attrs.get("num-cores", 0)),
                                                    "without": [str(a)[1:] for a in tgt.attrs.get("mattr", [])
                                                                if str(a).startswith("-")],
                                                    "isa": target_isa(tgt) + (list(AMX_FLAGS) if stats.get("amx")
                                                                              else []),
                                                    "int8_dot": int8_dot(tgt), "amx": bool(stats.get("amx")),
                                                    "vector_bits": 32 * vector_lanes(tgt),
                                                    "one_thread_kernels": stats.get("one_thread", []),
                                                    "one_thread_under_us": SERIAL_US,
                                                    "fresh_outputs": stats.get("fresh_outputs", []),
                                                    "prepared_weights": stats.get("prepared_weights", 0)},
                                  tuning=(summary or TuningSummary()).to_json() if tuning else None,
                                  build_seconds=round(seconds, 2), folder=tmp)
        write_manifest(tmp, manifest)
    return Path(output)
