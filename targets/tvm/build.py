"""Build a Graph for the host CPU with TVM and write the artifact: model.so + manifest.json, atomically."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.ir.files import atomic_dir
from graphopt.ir.graph import Graph
from graphopt.targets.artifact import build_manifest, write_manifest
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax
from graphopt.targets.tvm.tuning import Tuning, TuningSummary, tune

log = logging.getLogger(__name__)

TARGETS = ("llvm",)


def build_executable(graph: Graph, target: str = "llvm", tuning: Tuning | None = None, rules: bool = True):
    """Lower and build; returns (executable, tvm Target, TuningSummary or None, seconds to build).

    Tuned kernels come from the MetaSchedule database; every other kernel gets graphopt's CPU schedule rules
    (rules=False leaves those to TVM's default loop nests, for comparison)."""
    from graphopt.targets.tvm.cpu.pipeline import build_cpu

    if target not in TARGETS:
        raise TargetError(f"unknown target '{target}' (choose one of: {', '.join(TARGETS)})")
    if tuning is not None:
        tuning.validate()
    tgt = cpu_target()
    mod = lower_to_relax(graph)
    t0 = time.perf_counter()
    summary = None
    try:
        if tuning is not None:
            database, summary = tune(mod, tgt, tuning)
            # the pipeline fuses the original module the same way tuning did, so the workload keys match
            ex = build_cpu(mod, tgt, database, rules)
        else:
            ex = build_cpu(mod, tgt, None, rules)
    except TargetError:
        raise
    except Exception as e:
        raise TargetError(f"TVM build for {tgt} failed: {type(e).__name__}: {e}") from None
    return ex, tgt, summary, time.perf_counter() - t0


def compile_to_dir(graph: Graph, output: str | Path, target: str = "llvm", tuning: Tuning | None = None) -> Path:
    """Build and write the artifact folder `output` (replaced atomically; a foreign folder is never overwritten)."""
    ex, tgt, summary, seconds = build_executable(graph, target, tuning)
    with atomic_dir(output) as tmp:
        # -s: no debug sections (generated kernels have no source to step through; they were a tenth of an int8 .so)
        ex.export_library(str(tmp / "model.so"), options=["-s"])
        (tmp / "graph.ir").write_text(graph.text())
        manifest = build_manifest(graph, str(tgt), {"kind": target, "mcpu": str(tgt.attrs.get("mcpu", "")),
                                                    "num_cores": int(tgt.attrs.get("num-cores", 0))},
                                  tuning=(summary or TuningSummary()).to_json() if tuning else None,
                                  build_seconds=round(seconds, 2), folder=tmp)
        write_manifest(tmp, manifest)
    return Path(output)
