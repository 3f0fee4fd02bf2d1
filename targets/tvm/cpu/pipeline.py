"""The Relax build pipeline for the CPU: legalize and fuse, apply MetaSchedule records (if any), then graphopt's
CPU schedule rules to every function still unscheduled, then lower."""
from __future__ import annotations

import tvm
from tvm import relax
from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
from tvm.s_tir import dlight as dl

from graphopt.targets.tvm.cpu.rules import default_cpu_rules
from graphopt.targets.tvm.cpu.threads import serialize_small


def _round_half_even(bb, call):
    """relax.round of a float32 tensor as LLVM's nearbyint intrinsic, element by element (half to even, as
    torch.round). TVM legalizes it to T.nearbyint, which its vectorizer scalarizes together with the whole
    expression around it: a quantize of a 3x320x320 input (divide, round, add, clip, cast) took 296 us, against
    18 with the intrinsic, which LLVM vectorizes (`vrndscaleps`)."""
    from tvm import te, tirx, topi
    x = call.args[0]
    if str(getattr(x.ty, "dtype", "")) != "float32":
        return bb.call_te(topi.round, x, primfunc_name_hint="tir_round")
    return bb.call_te(lambda t: te.compute(
        t.shape, lambda *i: tirx.call_llvm_pure_intrin("float32", "llvm.nearbyint", t(*i)), name="round"),
        x, primfunc_name_hint="tir_round")


def legalize_ops():
    """Relax's LegalizeOps for the CPU, with relax.round on LLVM's nearbyint (`_round_half_even`)."""
    return relax.transform.LegalizeOps(customize_legalize_map={"relax.round": _round_half_even})


def cpu_pipeline(target, database=None, rules: bool = True, stats: dict | None = None):
    """A relax_pipeline for relax.build. With a database its records win; the rules schedule the rest; kernels
    too small to pay for a fork run on one thread (their names land in stats["one_thread"] when stats is given)."""

    @tvm.transform.module_pass(opt_level=3, name="GraphoptCPUPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            # polynomial exp/erf/tanh and fast softmax: vectorizable (libm's are scalar calls), error ~1e-7
            mod = relax.transform.FastMathTransform()(mod)
            mod = tvm.transform.Sequential(list(cpu_generic.library_dispatch_passes(target)) + [legalize_ops()]
                                           + list(cpu_generic.legalize_passes(target))[1:])(mod)
            if database is not None:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            if rules:
                mod = dl.ApplyDefaultSchedule(*default_cpu_rules())(mod)
            mod, one_thread = serialize_small(mod)
            if stats is not None:
                stats["one_thread"] = one_thread
            return tvm.transform.Sequential(list(cpu_generic.dataflow_lower_passes(target))
                                            + list(cpu_generic.finalize_passes(target)))(mod)

    return _pipeline


def build_cpu(mod, target, database=None, rules: bool = True, stats: dict | None = None):
    """relax.build with the graphopt CPU pipeline (inside the database's context when there is one)."""
    with target, tvm.transform.PassContext(opt_level=3):
        if database is not None:
            with database:
                return relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target, database, rules, stats))
        return relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target, None, rules, stats))
