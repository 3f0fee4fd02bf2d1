"""The pass manager: runs a pipeline over a Graph with verification, dumps, timing and stats per pass."""
from __future__ import annotations

import logging
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, TextIO

from graphopt.errors import GraphoptError, PassFailedError, PassOptionError
from graphopt.ir.graph import Graph
from graphopt.ir.quant_ops import rounds_activations
from graphopt.ir.sparse_ops import sparse_layout_names
from graphopt.ir.stats import graph_stats
from graphopt.pm.instruments import DumpDir, IRPrinter, write_reproducer
from graphopt.pm.numerics import (ROUNDED_EXACT_SQNR_DB, Comparison, accuracy, compare, teacher_forced,
                                  within_exact)
from graphopt.pm.options import build_options
from graphopt.pm.pipeline import PassSpec, load_pipeline
from graphopt.pm.registry import Contract, Pass, PassContext, get_pass

log = logging.getLogger("graphopt.pm")


@dataclass
class PassRecord:
    """What one pass did: for reports, the manifest and `passes.json` in the dump dir."""

    index: int
    name: str
    pipeline: str
    changed: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    before: dict[str, int] = field(default_factory=dict)
    after: dict[str, int] = field(default_factory=dict)
    verify: dict[str, Any] | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def build_passes(specs: list[PassSpec]) -> list[Pass]:
    """Instantiate each pass with validated options; errors name the pass and option before anything runs."""
    out = []
    for spec in specs:
        cls = get_pass(spec.name)
        out.append(cls(build_options(spec.name, cls.Options, spec.options)))
    return out


def _check_order(passes: list[Pass]) -> None:
    """select-sparse-layout turns masked layers into sparse ops that the weight passes cannot see: a weight pass
    after it (sparsify,select-sparse-layout,quantize) quantized nothing, with a warning, after minutes of layout
    timing. Refused before anything runs, with the order that works."""
    layout = next((i for i, p in enumerate(passes) if p.name == "select-sparse-layout"), None)
    late = [p for p in passes[layout + 1:] if p.rewrites_weights] if layout is not None else []
    if late:
        fixed = [p for p in passes if p.name != "select-sparse-layout"] + \
            [p for p in passes if p.name == "select-sparse-layout"]
        raise PassOptionError(
            f"pipeline order: '{late[0].name}' (#{passes.index(late[0]) + 1}) comes after 'select-sparse-layout' "
            f"(#{layout + 1}), which rewrites masked layers into sparse ops that '{late[0].name}' cannot read or "
            "change; select the layouts after the passes that change weights (select-sparse-layout has int8 "
            f"kernels for quantized layers): {','.join(p.spec_text() for p in fixed)}")


class PassManager:
    """Runs passes in order; each gets a clone, so the caller's graph is never mutated."""

    def __init__(self, pipeline: str | list[PassSpec] | list[Pass], *, verify: bool = False, strict: bool = False,
                 dump_dir: str | None = None, print_ir_after_all: bool = False, print_ir_after_change: bool = False,
                 print_diff: bool = False, stream: TextIO | None = None, warn_unchanged: bool = True):
        if isinstance(pipeline, str):
            pipeline = load_pipeline(pipeline)
        self.passes: list[Pass] = [p if isinstance(p, Pass) else build_passes([p])[0] for p in pipeline]
        _check_order(self.passes)
        self.verify, self.strict = verify, strict
        # a pass that changes nothing is a warning when the user asked for it; in a default pipeline it is normal
        # (the record and the report say so either way)
        self.warn_unchanged = warn_unchanged
        self.dump = DumpDir(dump_dir) if dump_dir else None
        self.dump_root = dump_dir
        self.printer = IRPrinter(stream or sys.stderr, print_ir_after_all, print_ir_after_change, print_diff)
        self.records: list[PassRecord] = []

    @property
    def text(self) -> str:
        return ",".join(p.spec_text() for p in self.passes)

    def run(self, graph: Graph, ctx: PassContext | None = None) -> Graph:
        ctx = ctx or PassContext()
        ctx.strict = ctx.strict or self.strict
        if ctx.reference is None:
            ctx.reference = graph
        inputs = ctx.batches(graph) if self.verify else []
        prev_outputs = [graph.run(*b) for b in inputs]
        ref_outputs = prev_outputs
        # labels for the data (ctx extras: optimize(labels=), --inputs 'labels'): each pass's accuracy on them
        labels = ctx.extras.get("labels") if ctx.data and len(ctx.extras.get("labels") or ()) == len(inputs) else None
        input_accuracy = accuracy([o[0] for o in ref_outputs], labels) if labels is not None else None
        current = graph
        if self.dump:
            self.dump.dump(0, "input", current)
        for i, p in enumerate(self.passes, start=1):
            laid_out = sparse_layout_names(current) if p.rewrites_weights else []
            if laid_out:
                raise PassFailedError(
                    f"pass #{i} '{p.name}' rewrites dense conv/linear weights, but {len(laid_out)} layer(s) of this "
                    f"graph are already in a sparse layout ('{laid_out[0]}'{', ...' if len(laid_out) > 1 else ''}; "
                    f"select-sparse-layout made them): run '{p.name}' on the graph from before select-sparse-layout "
                    "and select it after the passes that change weights")
            before_stats = graph_stats(current)
            work = current.clone()
            t0 = time.perf_counter()
            try:
                res = p.run(work, ctx)
                res.graph.refresh()
            except GraphoptError as e:
                repro = write_reproducer(self.dump_root, i, p.spec_text(), current, inputs or [current.example_inputs()],
                                         f"pass '{p.name}' raised: {e}")
                # (torch.fx's interpreter appends "While executing %node ... Original traceback: None Use tlparse
                # ..." to an error raised inside it, such as calibration's NaN check, which names its layer already)
                msg = str(e).split("\n\nWhile executing ")[0]
                raise PassFailedError(f"pass #{i} '{p.name}' failed: {msg}", str(repro)) from e
            except Exception as e:
                repro = write_reproducer(self.dump_root, i, p.spec_text(), current, inputs or [current.example_inputs()],
                                         f"pass '{p.name}' crashed:\n{traceback.format_exc()}")
                log.debug("pass %s crashed", p.name, exc_info=True)
                raise PassFailedError(f"pass #{i} '{p.name}' crashed ({type(e).__name__}: {e})", str(repro)) from e
            seconds = time.perf_counter() - t0
            after = res.graph
            after_stats = graph_stats(after)
            rec = PassRecord(i, p.name, p.spec_text(), res.changed, round(seconds, 4), dict(res.stats), res.reason,
                             before_stats.to_json(), after_stats.to_json())
            if not res.changed:
                msg = f"pass '{p.name}' changed nothing" + (f": {res.reason}" if res.reason else "")
                if ctx.strict:
                    raise PassFailedError(msg + " (--strict)")
                (log.warning if self.warn_unchanged else log.info)(msg)
            if self.verify:
                outs = [after.run(*b) for b in inputs]
                step = compare(prev_outputs, outs)
                total = compare(ref_outputs, outs)
                rounds = rounds_activations(current)
                ok = self._within_contract(p, step, rounds)
                forced = None
                if not ok and rounds:  # (a step moved by rounding early on spreads through a quantized network)
                    pairs = teacher_forced(current, after, inputs, prev_outputs)
                    forced = compare(*pairs) if pairs is not None else None
                    ok = forced is not None and self._within_contract(p, forced, rounds)
                rec.verify = {"step": step.to_json(), "vs_reference": total.to_json(), "contract": p.contract.value,
                              "ok": ok, **({"graph_rounds": True} if rounds else {}),
                              **({"step_teacher_forced": forced.to_json()} if forced is not None else {})}
                acc = accuracy([o[0] for o in outs], labels) if input_accuracy is not None else None
                if acc is not None:
                    rec.verify["accuracy"] = {"after": acc[0], "input": input_accuracy[0], "samples": acc[1]}
                log.info("verify #%d %s: %s (vs reference: %s)", i, p.name, step, total)
                if not ok:
                    repro = write_reproducer(self.dump_root, i, p.spec_text(), current, inputs,
                                             f"pass '{p.name}' broke its {p.contract.value} contract: {step}")
                    bound = (f"; its bound is SQNR >= {p.min_sqnr_db:g} dB against the graph before it: if this "
                             "loss is what the options ask for (int4, a coarse width), run without --verify-each "
                             "and judge the result by the compile report's fidelity line"
                             if p.contract == Contract.BOUNDED else
                             f" (the graph rounds activations onto grids, so down to {ROUNDED_EXACT_SQNR_DB:g} dB "
                             "SQNR would have passed)" if rounds else "")
                    forced_text = (f"; with each rounding given the previous graph's values (teacher-forced): "
                                   f"{forced}" if forced is not None else "")
                    raise PassFailedError(f"pass #{i} '{p.name}' broke its {p.contract.value} numerical contract: "
                                          f"{step}{forced_text}{bound}", str(repro))
                prev_outputs = outs
            self.printer.after_pass(i, p.name, current, after, res.changed)
            if self.dump:
                self.dump.dump(i, p.name, after, diff_from=current)
            after.meta.setdefault("history", []).append(rec.to_json())
            self.records.append(rec)
            current = after
        if self.dump:
            self.dump.record([r.to_json() for r in self.records])
        current.meta["pipeline"] = ",".join(
            filter(None, [current.meta.get("pipeline_prefix", "")] + [r.pipeline for r in self.records]))
        return current

    @staticmethod
    def _within_contract(p: Pass, c: Comparison, rounds: bool = False) -> bool:
        if p.contract == Contract.EXACT:
            return within_exact(c, p.rtol, rounds=rounds)
        if p.contract == Contract.BOUNDED:
            return c.sqnr_db >= p.min_sqnr_db
        return True
