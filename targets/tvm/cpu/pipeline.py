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
            mod = tvm.transform.Sequential(list(cpu_generic.dataflow_lower_passes(target))
                                           + list(cpu_generic.finalize_passes(target)))(mod)
            if stats is not None:
                stats["one_thread"] = one_thread
                mains = [f for g, f in mod.functions.items() if g.name_hint == "main"]
                stats["fresh_outputs"] = fresh_outputs(mains[0]) if mains else []
            return mod

    return _pipeline


def build_cpu(mod, target, database=None, rules: bool = True, stats: dict | None = None):
    """relax.build with the graphopt CPU pipeline (inside the database's context when there is one)."""
    with target, tvm.transform.PassContext(opt_level=3):
        if database is not None:
            with database:
                return relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target, database, rules, stats))
        return relax.build(mod, target=target, relax_pipeline=cpu_pipeline(target, None, rules, stats))


def fresh_outputs(func) -> list[bool]:
    """For each output of a lowered Relax VM function (its return tuple, or its one tensor): whether the tensor the
    VM returns is memory of its own, allocated in this call for this output alone (a storage with one tensor in
    it, or a reshape view of one) and no other output's. Those are handed to the caller as they are
    (`CompiledModel`); an input, a constant, a planned intermediate's storage, or a second view of another output's
    memory is copied out. Copying out every output had cost more than the kernels: two 16 MB outputs 7.5 ms of a
    10 ms call (fresh pages, then the copy)."""
    values, storage_uses = {}, {}
    for block in func.body.blocks:
        for b in block.bindings:
            values[b.var] = b.value
            if _op_name(b.value) == "relax.vm.alloc_tensor":
                storage_uses[b.value.args[0]] = storage_uses.get(b.value.args[0], 0) + 1

    def root(e, depth=0):
        """The alloc_tensor binding `e` is (through reshape views), or None."""
        if not isinstance(e, relax.Var) or e not in values or depth > 64:
            return None
        v = values[e]
        name = _op_name(v)
        if name == "vm.builtin.reshape":
            return root(v.args[0], depth + 1)
        if name == "relax.vm.alloc_tensor":
            s = v.args[0]
            own = isinstance(s, relax.Var) and _op_name(values.get(s)) == "relax.vm.alloc_storage" \
                and storage_uses.get(s) == 1
            return e if own else None
        if isinstance(v, relax.Var):
            return root(v, depth + 1)
        return None

    ret = func.body.body
    if isinstance(ret, relax.Var) and isinstance(values.get(ret), relax.Tuple):
        fields = list(values[ret].fields)
    elif isinstance(ret, relax.Tuple):
        fields = list(ret.fields)
    else:
        fields = [ret]
    seen, fresh = set(), []
    for f in fields:
        r = root(f)
        fresh.append(r is not None and r not in seen)
        if r is not None:
            seen.add(r)
    return fresh


def _op_name(v) -> str | None:
    if not isinstance(v, relax.Call):
        return None
    op = v.op
    if isinstance(op, relax.ExternFunc):
        return str(op.global_symbol)
    return getattr(op, "name", None)
