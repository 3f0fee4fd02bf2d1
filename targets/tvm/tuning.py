"""MetaSchedule tuning that works on a small machine: in-process builder and runner, a persistent database,
a progress bar, and reuse of workloads already tuned in an earlier run.

TVM's LocalBuilder starts worker processes that take ~35 s each to import TVM and then time out; building and
measuring in this process avoids that entirely.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import TargetError

log = logging.getLogger(__name__)
_now = time.perf_counter  # one clock for budgets (tests replace it)


@dataclass
class Tuning:
    """Tuning budget and database. `db` is a folder reused across runs and models (it must exist)."""

    trials: int = 64
    db: str | None = None
    trials_per_iter: int = 16
    seed: int = 0
    retune: bool = False          # tune workloads again even if the database already has records for them
    progress: bool = True
    minutes: float | None = None  # wall-clock budget; tuning stops (keeping what it found) when it runs out
    plateau: int = 2              # stop a task after this many measured batches without a 1% gain (0: never)

    def validate(self) -> None:
        if self.trials < 1:
            raise TargetError(f"tuning trials must be >= 1, got {self.trials}")
        if self.trials_per_iter < 1:
            raise TargetError(f"tuning trials per iteration must be >= 1, got {self.trials_per_iter}")
        if self.minutes is not None and not self.minutes > 0:
            raise TargetError(f"tuning minutes must be > 0, got {self.minutes}")
        if self.db is not None and not Path(self.db).is_dir():
            raise TargetError(f"tuning database folder '{self.db}' does not exist; create it (mkdir -p {self.db}) "
                              "or leave --tune-db out to tune into a fresh temporary database")


@dataclass
class TuningSummary:
    trials: int = 0
    tasks: int = 0
    tasks_tuned: int = 0
    tasks_reused: int = 0
    tasks_skipped: int = 0
    tasks_own: int = 0            # graphopt's own kernels (scheduled already; their knobs are measured instead)
    kept_tuned: int = 0           # tasks whose tuned kernel beat graphopt's rule-scheduled one
    kept_rules: int = 0           # tasks where the rule-scheduled kernel was at least as fast
    stopped: str = ""
    seconds: float = 0.0
    db: str | None = None
    per_task: list[dict[str, Any]] = field(default_factory=list)
    knobs: dict[str, Any] = field(default_factory=dict)  # graphopt's own kernels' knobs (cpu/knobs.py KnobSummary)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _ms():
    from tvm.s_tir import meta_schedule as ms
    return ms


def _make_builder():
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder.local_builder import default_build, default_export

    @derived_object
    class InProcessBuilder(PyBuilder):
        """Builds candidates in this process (no worker start-up cost)."""

        def build(self, build_inputs):
            results = []
            for bi in build_inputs:
                try:
                    results.append(BuilderResult(default_export(default_build(bi.mod, bi.target, None)), None))
                except Exception as e:  # a candidate that fails to build is recorded as such, not fatal
                    results.append(BuilderResult(None, f"InProcessBuilder: {type(e).__name__}: {e}"))
            return results

    return InProcessBuilder()


def _make_runner(number: int = 3, repeat: int = 1, min_repeat_ms: int = 20):
    import tvm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.runner import PyRunner
    from tvm.s_tir.meta_schedule.runner.config import EvaluatorConfig
    from tvm.s_tir.meta_schedule.runner.local_runner import LocalRunnerFuture
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common, run_evaluator_common

    cfg = EvaluatorConfig._normalized(EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                                      enable_cpu_cache_flush=False))
    fill = tvm.get_global_func("tvm.contrib.random.random_fill_for_measure")

    @derived_object
    class InProcessRunner(PyRunner):
        """Measures built candidates in this process with TVM's time evaluator."""

        def run(self, runner_inputs):
            out = []
            for ri in runner_inputs:
                try:
                    rt = tvm.runtime.load_module(str(ri.artifact_path))
                    dev = tvm.runtime.device(str(ri.device_type), 0)
                    args = alloc_argument_common(fill, dev, tuple(a.as_json() for a in ri.args_info), 1)
                    out.append(LocalRunnerFuture(res=run_evaluator_common(rt, dev, cfg, args), error_message=None))
                except Exception as e:
                    out.append(LocalRunnerFuture(res=None, error_message=f"InProcessRunner: {e}"))
                finally:
                    try:
                        os.remove(str(ri.artifact_path))
                    except OSError:
                        pass
            return out

    return InProcessRunner()


class _StopTuning(Exception):
    """Raised from the measure callback to end a task early (budget spent or no more gains)."""


def _make_progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    bar = tqdm(total=total, desc="tuning", unit="trial", disable=None if enabled else True, leave=True)
    state = {"trials": 0, "deadline": None, "task_limit": None, "task_trials": 0, "best": None, "stale": 0,
             "plateau": 0, "reason": ""}

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        """Advances the progress bar; ends the task when the time budget is spent or its best time plateaus."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            n = len(measure_candidates)
            state["trials"] += n
            state["task_trials"] += n
            bar.update(n)
            ok = [float(sum(float(x) for x in r.run_secs) / len(r.run_secs)) for r in runner_results
                  if r.run_secs is not None and len(r.run_secs)]
            if ok:
                best = min(ok)
                bar.set_postfix_str(f"best {best * 1e6:.0f} us")
                if state["best"] is None or best < 0.99 * state["best"]:
                    state["best"], state["stale"] = best, 0
                else:
                    state["stale"] += 1
            if state["deadline"] is not None and _now() > state["deadline"]:
                state["reason"] = state["stop"] = "time budget spent"
                raise _StopTuning(state["reason"])
            if state["plateau"] and state["stale"] >= state["plateau"]:
                state["stop"] = "plateau"
                raise _StopTuning("plateau")

    return ProgressCallback(), bar, state
def fuse_for_tuning(mod, target):
    """The same preparation compile_relax applies before looking up the database, so workload keys match."""
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as relax_pipeline

    try:
        dispatch = list(relax_pipeline.library_dispatch_passes(target))
    except (ValueError, AttributeError):
        dispatch = []
    from graphopt.targets.tvm.cpu.pipeline import legalize_ops
    legalize = legalize_ops() if str(target.kind.name) == "llvm" else relax.transform.LegalizeOps()
    seq = tvm.transform.Sequential([*dispatch, legalize, relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                    relax.transform.FuseTIR()])
    with target, tvm.transform.PassContext(opt_level=3):
        return seq(mod)


def task_cost(task) -> float:
    """FLOPs of one call times how often the model calls it: what tuning this task can save, at best."""
    from tvm.s_tir.analysis import estimate_tir_flops
    try:
        return float(estimate_tir_flops(task.dispatched[0])) * int(task.weight)
    except Exception:  # some kernels have no countable FLOPs; tune them last
        return 0.0


def _is_scheduled(task) -> bool:
    """Whether every function of the task is scheduled already (graphopt's own kernels are)."""
    return all("tirx.is_scheduled" in (f.attrs or {}) for m in task.dispatched for f in m.functions.values())


def _tune_by_flops(ms, todo, work_dir, database, tuning: Tuning, summary: "TuningSummary", t0: float) -> None:
    """Tune the tasks one by one, heaviest first, each with trials in proportion to its share of the FLOPs,
    sharing one cost model; stop a task on a plateau and everything when the time budget is spent."""
    costs = [task_cost(t) for t in todo]
    order = sorted(range(len(todo)), key=lambda i: -costs[i])
    total_cost = sum(costs) or 1.0
    per_iter = min(tuning.trials_per_iter, tuning.trials)  # a budget under one batch still tunes the heaviest task
    # each task's planned share; what a task leaves unused (a plateau, or a small design space: a reshape has one
    # candidate) goes on to the next -- with the shares reserved up front, MobileNetV2's 64 trials went to four
    # reshapes, which measured one candidate each, and 30 tasks were left untuned with 60 trials unspent
    planned = {i: max(per_iter, int(round(tuning.trials * costs[i] / total_cost / per_iter)) * per_iter)
               for i in order}
    population = int(min(512, max(32, 4 * per_iter)))
    strategy = ms.search_strategy.EvolutionarySearch(population_size=population,
                                                     init_min_unmeasured=min(50, population // 2))
    cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=1)
    callback, bar, state = _make_progress(tuning.trials, tuning.progress)
    if tuning.minutes is not None:
        state["deadline"] = t0 + 60.0 * tuning.minutes
    state["plateau"] = tuning.plateau
    summary.tasks_skipped = len(todo)
    try:
        for i in order:
            left = tuning.trials - state["trials"]
            if left < 1:
                break
            share = min(planned[i], left)
            if state["deadline"] is not None and _now() > state["deadline"]:
                summary.stopped = "time budget spent"
                break
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                [todo[i]], work_dir, strategy=strategy, seed=tuning.seed, num_threads=1)
            state.update(task_trials=0, best=None, stale=0, stop="")
            quiet_ms_logger()
            try:
                ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work_dir,
                                   max_trials_global=share, num_trials_per_iter=min(per_iter, share),
                                   builder=_make_builder(), runner=_make_runner(), database=database,
                                   cost_model=cost_model, task_scheduler="round-robin",
                                   measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                                                      callback])
            except Exception as e:  # our callback's stop arrives re-wrapped by the FFI; anything else is an error
                if not state["stop"]:
                    raise TargetError(f"tuning task '{todo[i].task_name}' failed: {type(e).__name__}: {e}") from None
                if state["reason"]:
                    summary.stopped = state["reason"]
                    break
            summary.tasks_tuned += 1
            summary.tasks_skipped -= 1
    finally:
        summary.trials = state["trials"]
        bar.total = state["trials"]  # (the budget was the bar's total; it ends at what was spent)
        bar.refresh()
        bar.close()


def _time_with_rules(task, target) -> float | None:
    """Seconds per call of the task's kernel under graphopt's CPU rules (None if no rule applies)."""
    import numpy as np
    import tvm
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from graphopt.targets.tvm.cpu.rules import default_cpu_rules
    mod = task.dispatched[0]
    with target:
        sched = dl.ApplyDefaultSchedule(*default_cpu_rules())(mod)
    gv = sched.get_global_vars()[0]
    func = sched[gv]
    if "tirx.is_scheduled" not in func.attrs:
        return None
    try:
        lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target).jit()
        args = [tvm.runtime.tensor(np.zeros([int(d) for d in a.shape], dtype=str(a.dtype)))
                for a in ArgInfo.from_prim_func(func)]
        return float(lib.time_evaluator("main", tvm.cpu(), number=3, repeat=1, min_repeat_ms=20)(*args).mean)
    except Exception:  # the rule's kernel does not build standalone: let the tuned record decide
        return None


def keep_faster_than_rules(database, tasks, target, summary: "TuningSummary"):
    """A database holding only the tuned kernels that beat the rule-scheduled ones; the rules do the rest.

    A small tuning budget often finds kernels slower than graphopt's rules; applying them blindly would make
    a tuned artifact slower than an untuned one."""
    ms = _ms()
    kept = ms.database.MemoryDatabase()
    for task, entry in zip(tasks, summary.per_task):
        for m in task.dispatched:
            if not database.has_workload(m):
                continue
            recs = database.get_top_k(database.commit_workload(m), 1)
            if not recs or not recs[0].run_secs:
                continue
            tuned = float(sum(float(x) for x in recs[0].run_secs) / len(recs[0].run_secs))
            rule = _time_with_rules(task, target)
            entry["rules_us"] = None if rule is None else round(rule * 1e6, 2)
            if rule is not None and rule <= tuned:
                summary.kept_rules += 1
                entry["chosen"] = "rules"
                break
            r = recs[0]
            kept.commit_tuning_record(ms.database.TuningRecord(r.trace, kept.commit_workload(m), r.run_secs,
                                                               r.target, r.args_info))
            summary.kept_tuned += 1
            entry["chosen"] = "tuned"
            break
    return kept


def quiet_ms_logger() -> None:
    """MetaSchedule's logging config resets its logger to DEBUG on every tuning call: keep its console quiet. It
    also rebuilds the logger's config from its handlers' names and crashes ('NoneType' object has no attribute
    'format') on a handler without one, which something in a long process (seen once in the full test run) can
    leave on it: such handlers are dropped (MetaSchedule adds its own, named, again)."""
    ms_log = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_log.setLevel(logging.WARNING)
    for h in list(ms_log.handlers):
        if h.get_name() is None:
            ms_log.removeHandler(h)


def tune(mod, target, tuning: Tuning):
    """Tune the Relax module's kernels; return (database, TuningSummary). The database may be a temporary one."""
    import tvm

    from graphopt.targets.tvm.fast_import import import_tensor_intrinsics
    import_tensor_intrinsics()
    ms = _ms()
    tuning.validate()
    t0 = _now()
    work_dir = tuning.db or tempfile.mkdtemp(prefix="graphopt-tune-")
    quiet_ms_logger()
    database = ms.database.JSONDatabase(work_dir=work_dir)
    fused = fuse_for_tuning(mod, target)
    with target, tvm.transform.PassContext(opt_level=3):
        tasks = ms.relax_integration.extract_tasks(fused, target)
    # graphopt's own kernels come scheduled (MetaSchedule's one candidate for such a function is the function,
    # and its database is not applied to them): left in, they took the FLOP-weighted trial budget -- all 2000 of
    # a --tune-minutes run on a small CNN -- one useless trial each, and the tunable tasks got none
    own = [t for t in tasks if _is_scheduled(t)]
    tasks = [t for t in tasks if not _is_scheduled(t)]
    summary = TuningSummary(tasks=len(tasks), db=tuning.db, tasks_own=len(own))
    todo = []
    for task in tasks:
        seen = (not tuning.retune) and any(database.has_workload(m) and
                                          database.get_top_k(database.commit_workload(m), 1) for m in task.dispatched)
        if seen:
            summary.tasks_reused += 1
        else:
            todo.append(task)
    if todo:
        _tune_by_flops(ms, todo, work_dir, database, tuning, summary, t0)
    for task in tasks:
        best = None
        for m in task.dispatched:
            if database.has_workload(m):
                recs = database.get_top_k(database.commit_workload(m), 1)
                if recs and recs[0].run_secs:
                    best = float(sum(float(x) for x in recs[0].run_secs) / len(recs[0].run_secs))
        summary.per_task.append({"task": task.task_name, "weight": int(task.weight),
                                 "best_us": None if best is None else round(best * 1e6, 2)})
    chosen = keep_faster_than_rules(database, tasks, target, summary)
    summary.seconds = round(_now() - t0, 2)
    return chosen, summary
