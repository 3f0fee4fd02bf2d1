"""The Relax build pipeline for NVIDIA GPUs: optional fp16 compute, legalize and fuse, MetaSchedule records (if any),
dlight's GPU rules for everything else, then lower. Building needs no GPU; the CUDA kernels are compiled to a fatbin
by `graphopt.targets.tvm.gpu.fatbin` when the library is exported."""
from __future__ import annotations

import logging

import tvm
from tvm import relax
from tvm.relax.backend.cuda import pipeline as cuda_generic
from tvm.s_tir import dlight as dl

log = logging.getLogger(__name__)

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
# sm_90a: Hopper's architecture-specific code (H100/H200 and no other GPU): dense linears on wgmma (gpu/wgmma.py)
HOPPER_ONLY = "sm_90a"
PRECISIONS = ("fp16", "bf16", "fp32")


def cuda_target(arch: str = "sm_80"):
    """`Target({"kind": "cuda", "arch": arch}, host=llvm)`; the host is plain x86-64 (the GPU machine's CPU is not
    this one, so no -mcpu of ours)."""
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})


class _FloatMatmul(dl.gpu.Matmul):
    """dlight's GPU matmul rule for float operands only: its int8 tensor-core path fails to lower in TVM 0.27
    (software pipelining finds no WMMA fragment), so int8 matmuls take the reduction/fallback rules. Only the
    reduction's operands count: the int8 MiniLM's attention scores (fp16 q @ k^T fused with an int8 mask's `where`)
    were declined for the mask and took dlight's reduction rule -- one block of 256 threads an output element."""

    def apply(self, func, target, tunable):
        if _reduces_int8(func):
            return None
        return super().apply(func, target, tunable)


def _reduces_int8(func) -> bool:
    """Whether a reduction block of the PrimFunc reads an int8 / uint8 buffer."""
    from tvm import s_tir
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    try:
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
    except Exception:  # noqa: BLE001 - not analysable: decide by the parameters, as before
        infos = None
    if infos is None:
        return any(str(getattr(p, "dtype", "")) in ("int8", "uint8") for p in func.params)
    return any(str(r.source.dtype) in ("int8", "uint8") for info in infos if info.is_reduction()
               for r in sch.get(info.block_rv).reads)


class _Guarded(dl.ScheduleRule):
    """A dlight rule that declines (returns None, so the next rule gets the function) where it raises: TVM 0.27's
    rules assert on some fused shapes (EfficientNet-Lite0: "consumers of the cache-write stage that are not properly
    inlined"), and one such function must not fail the whole build."""

    def __init__(self, rule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except Exception as e:  # noqa: BLE001 - any failure of a rule means "not this rule"
            log.debug("dlight %s declined a function: %s", type(self.rule).__name__, e)
            return None


def gpu_rules():
    return (*(_Guarded(r) for r in (_FloatMatmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction())),
            dl.gpu.Fallback())


@relax.expr_functor.mutator
class _HalfCompute(relax.PyExprMutator):
    """conv2d and matmul read fp16 (or bf16) operands and accumulate in fp32 (out_dtype float32); every other op
    stays fp32.
    Written out rather than Relax's ToMixedPrecision, which rejects clip's scalar bounds and graphopt's own
    call_tir kernels (the 2:4 one). Casts of constant weights fold away, so weights are stored in half width."""

    def __init__(self, dtype: str = "float16"):
        super().__init__()
        self.dtype = dtype

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call
        name = call.op.name
        if name == "relax.take" and isinstance(call.args[0], tvm.ir.expr.Constant) and call.args[0].ty.dtype == "float32":
            # an embedding table: stored and gathered in half width, the gathered rows widened back to fp32
            table, idx = call.args[0], call.args[1]
            axis = call.attrs.axis if call.attrs is not None else None
            # the gather keeps its bounds mode (the embedding's "nan": a NaN row for an id outside the table; the
            # default "fast" reads past the table on a bad id)
            mode = str(call.attrs.mode) if call.attrs is not None else "wrap"
            return relax.op.astype(relax.op.take(relax.op.astype(table, self.dtype), idx, axis, mode=mode),
                                   "float32")
        if name not in ("relax.nn.conv2d", "relax.matmul"):
            return call
        x, w = call.args[:2]
        if x.ty.dtype != "float32" or w.ty.dtype != "float32":
            return call
        x16, w16 = relax.op.astype(x, self.dtype), relax.op.astype(w, self.dtype)
        if name == "relax.matmul":
            return relax.op.matmul(x16, w16, out_dtype="float32")
        a = call.attrs
        return relax.op.nn.conv2d(x16, w16, strides=a.strides, padding=a.padding, dilation=a.dilation,
                                  groups=a.groups, data_layout=a.data_layout, kernel_layout=a.kernel_layout,
                                  out_layout=a.out_layout, out_dtype="float32")


def half_compute(dtype: str = "float16"):
    """The pass: convs and matmuls on `dtype` operands with fp32 accumulation."""

    @tvm.transform.module_pass(opt_level=0, name="GraphoptHalfCompute")
    def _pass(mod, _ctx):
        mod = mod.clone()  # the caller's module stays as it was (tuning and the build each run this)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = _HalfCompute(dtype).visit_expr(func)
        return mod

    return _pass


@relax.expr_functor.mutator
class _BoolAsInt8(relax.PyExprMutator):
    """Bool tensors cross kernel boundaries as int8: TVM 0.27's CUDA codegen loads a vector of bools as `ushort2`
    (two bytes a bool: wrong data) and applies `!` to it, which nvcc rejects; it broke the int8 MiniLM's fused
    attention-scores kernel, whose mask is a bool tensor six layers read. Every op reading a bool variable reads
    an int8 copy instead (made once, fused into the bool's producer) and compares it with 0 in registers;
    logical_not reads it as `== 0`."""

    def __init__(self, mod=None):
        super().__init__(mod)
        self.copies: dict = {}

    def _int8(self, var):
        key = var.id_ if hasattr(var, "id_") else var
        if key not in self.copies:
            self.copies[key] = self.builder_.emit(relax.op.astype(var, "int8"))
        return self.copies[key]

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.Op):
            return call

        def is_bool_var(a):
            return isinstance(a, relax.Var) and getattr(a.ty, "dtype", None) == "bool" \
                and getattr(a.ty, "ndim", 0) > 0
        if not any(is_bool_var(a) for a in call.args):
            return call
        zero = relax.const(0, "int8")
        if call.op.name == "relax.logical_not":
            return relax.op.equal(self._int8(call.args[0]), zero)
        args = [relax.op.not_equal(self._int8(a), zero) if is_bool_var(a) else a for a in call.args]
        return relax.Call(call.op, args, call.attrs, call.ty_args, call.span)


def bool_as_int8():
    @tvm.transform.module_pass(opt_level=0, name="GraphoptBoolAsInt8")
    def _pass(mod, _ctx):
        mod = mod.clone()
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = _BoolAsInt8(mod).visit_expr(func)
        return mod

    return _pass


def fuse_for_cuda(mod, target, precision: str = "fp16"):
    """The pipeline's first half: half-width compute, legalize, fuse. Tuning extracts its tasks from exactly this,
    so the database's workloads match the build's."""
    with target:
        if precision in ("fp16", "bf16"):
            mod = half_compute("float16" if precision == "fp16" else "bfloat16")(mod)
        mod = bool_as_int8()(mod)
        passes = list(cuda_generic.library_dispatch_passes(target))
        passes += [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                   relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
        return tvm.transform.Sequential(passes)(mod)


def tunable_functions(fused) -> list[str]:
    """Names of the fused functions MetaSchedule may tune (graphopt's own kernels are scheduled already)."""
    from tvm import tirx
    return sorted(gv.name_hint for gv, f in fused.functions.items()
                  if isinstance(f, tirx.PrimFunc) and not (f.attrs and f.attrs.get("tirx.is_scheduled")))


def tune_cuda(mod, target, precision: str, trials: int, work_dir: str):
    """MetaSchedule over the fused module's tunable functions, measured on this machine's GPU (LocalRunner);
    returns the database the build applies before dlight schedules the rest."""
    from tvm.s_tir import meta_schedule as ms

    from graphopt.targets.tvm.tuning import quiet_ms_logger
    fused = fuse_for_cuda(mod, target, precision)
    names = tunable_functions(fused)
    if not names:
        return None
    quiet_ms_logger()
    return ms.relax_integration.tune_relax(fused, {}, target, work_dir, max_trials_global=int(trials),
                                           op_names=names, num_trials_per_iter=min(64, int(trials)))


def cuda_pipeline(target, precision: str = "fp16", database=None):
    """A relax_pipeline for relax.build. fp16 / bf16: convs and matmuls read fp16 / bf16 and accumulate in fp32;
    the model's inputs and outputs stay fp32."""

    @tvm.transform.module_pass(opt_level=3, name="GraphoptCUDAPipeline")
    def _pipeline(mod: tvm.ir.IRModule, _ctx: tvm.transform.PassContext) -> tvm.ir.IRModule:
        with target:
            mod = fuse_for_cuda(mod, target, precision)
            if database is not None:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            mod = dl.ApplyDefaultSchedule(*gpu_rules())(mod)
            return tvm.transform.Sequential(list(cuda_generic.dataflow_lower_passes(target))
                                            + list(cuda_generic.finalize_passes(target)))(mod)

    return _pipeline


def build_cuda(mod, target, precision: str = "fp16", database=None, cuda_graph: bool = False):
    """relax.build for CUDA. cuda_graph: TVM's RewriteCUDAGraph lifts the kernels that read only constants and
    statically planned buffers (all but the first kernels reading the inputs and the last writing the outputs) into
    one CUDA graph, captured on the first call and replayed after -- one launch instead of one a kernel. Off by
    default until measured on a GPU (benchmarks/gpu_check_prepare.py builds mobilenet_v2 / _graph to compare)."""
    with target, tvm.transform.PassContext(opt_level=3, config={"relax.backend.use_cuda_graph": bool(cuda_graph)}):
        if database is not None:
            with database:
                return relax.build(mod, target=target, relax_pipeline=cuda_pipeline(target, precision, database))
        return relax.build(mod, target=target, relax_pipeline=cuda_pipeline(target, precision))
