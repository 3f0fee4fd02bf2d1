"""Which kernels run on one thread.

Every parallel loop of a CPU kernel is a fork and a join on TVM's thread pool: about 1 us when the pool's other
threads are spinning on a quiet machine, 6-7 us measured on this 2-vCPU host while the other vCPU was busy elsewhere
(and more when it is descheduled). A kernel whose whole work takes a few microseconds on one core pays more for that
than a second core gives back: a tiny BERT's 16x64x64 GEMM took 13 us parallel and 1.1 us serial, a 4x4-pixel
depthwise conv 7.6 us and 0.8 us. Compressed models make more such kernels (pruned channels, int8 products), and
short inputs (a 16-token sentence) do too.

So once every kernel is scheduled, `serialize_small` runs the parallel loops of each kernel whose estimated
single-thread time is under SERIAL_US per fork serially. The estimate walks the kernel, multiplying by the trip
counts of the loops around each statement (a trip count that depends on an outer index is bounded by TVM's integer
analyzer): multiply-accumulates (`acc = acc + a * b`, per lane) at MACS_PER_US, the other elements it stores (a
vector store counts its lanes) at ELEMENTS_PER_US, and the operations in those stored values and indices (a
transcendental call ten, a division four) at OPS_PER_US. The rates are conservative: over 300 kernels of twelve
models (tiny and full-size CNNs and transformers) timed on one thread here, they put no kernel slower than 6 us a
fork under the bar (the slowest they did took 5.4 us) and 188 of the 214 faster than 3 us. Where the walk meets
what it does not model (a while loop, an unbounded trip count, a node type it does not know) the kernel keeps its
threads."""
from __future__ import annotations

import logging
import math

# one thread's rates (conservative: see above) and the time under which a fork costs more than it gives back
MACS_PER_US = 50_000.0
ELEMENTS_PER_US = 20_000.0
OPS_PER_US = 200_000.0
SERIAL_US = 3.0

_HEAVY = ("exp", "erf", "tanh", "log", "sqrt", "pow", "sigmoid", "sin", "cos")


class _Unknown(Exception):
    """The walk met something it cannot bound: keep the kernel's threads."""


def _lanes(ty) -> int:
    """16 for float32x16, 1 for a scalar type."""
    head, _, tail = str(ty).rpartition("x")
    return int(tail) if head and tail.isdigit() else 1


def _expr_ops(e) -> int:
    """Operations in one evaluation of a TIR expression (index arithmetic included)."""
    import tvm.ir.expr as X
    import tvm.ir.prim.expr as E

    if e is None or isinstance(e, (E.IntImm, E.FloatImm, E.Var, X.Var, X.StringImm)):
        return 0
    if isinstance(e, X.TensorLoad):  # a buffer load
        return sum(_expr_ops(i) for i in e.indices)
    if isinstance(e, E.Ramp):
        return _expr_ops(e.base) + _expr_ops(e.stride)
    if isinstance(e, E.Broadcast):
        return _expr_ops(e.value)
    if isinstance(e, E.Let):
        return _expr_ops(e.value) + _expr_ops(e.body)
    if isinstance(e, E.Select):
        return 1 + _expr_ops(e.condition) + _expr_ops(e.true_value) + _expr_ops(e.false_value)
    if isinstance(e, (E.Cast, E.Not)):
        return 1 + _expr_ops(e.value if isinstance(e, E.Cast) else e.a)
    if isinstance(e, E.Shuffle):
        return 1 + sum(_expr_ops(v) for v in e.vectors)
    if isinstance(e, X.Call):
        name = str(getattr(e.op, "name", ""))
        return (10 if any(h in name for h in _HEAVY) else 1) + sum(_expr_ops(a) for a in e.args)
    if hasattr(e, "a") and hasattr(e, "b"):
        return (4 if isinstance(e, (E.Div, E.FloorDiv, E.FloorMod, E.Mod)) else 1) + _expr_ops(e.a) + _expr_ops(e.b)
    raise _Unknown(type(e).__name__)


def _accumulates(store) -> bool:
    """acc[i] = acc[i] + a * b (either order): a multiply-accumulate, which runs at the FMA rate."""
    import tvm.ir.expr as X
    import tvm.ir.prim.expr as E

    v = store.value
    if not isinstance(v, E.Add):
        return False
    for acc, prod in ((v.a, v.b), (v.b, v.a)):
        if isinstance(acc, X.TensorLoad) and acc.source.same_as(store.buffer) and isinstance(prod, E.Mul):
            return True
    return False


class _Walk:
    """Operations and forks of one kernel."""

    def __init__(self):
        from tvm.sym import Analyzer

        self.analyzer = Analyzer()
        self.macs = 0.0
        self.elements = 0.0
        self.ops = 0.0
        self.forks = 0.0

    def trips(self, loop) -> int:
        import tvm

        if isinstance(loop.extent, tvm.tirx.IntImm):
            return int(loop.extent)
        bound = self.analyzer.const_int_bound(loop.extent).max_value
        if bound >= 2 ** 40:
            raise _Unknown("unbounded trip count")
        return max(int(bound), 0)

    def stmt(self, st, mult: float) -> None:
        import tvm
        from tvm import s_tir, tirx

        if isinstance(st, tirx.For):
            n = self.trips(st)
            if n > 0:
                self.analyzer.bind(st.loop_var, tvm.ir.Range(st.min, st.min + n))
            if st.kind == tirx.ForKind.PARALLEL:
                self.forks += mult
            self.stmt(st.body, mult * n)
        elif isinstance(st, tirx.SeqStmt):
            for s in st.seq:
                self.stmt(s, mult)
        elif isinstance(st, tirx.IfThenElse):
            self.ops += mult * _expr_ops(st.condition)
            self.stmt(st.then_case, mult)
            if st.else_case is not None:
                self.stmt(st.else_case, mult)
        elif isinstance(st, tirx.AttrStmt):
            self.stmt(st.body, mult)
        elif isinstance(st, s_tir.SBlockRealize):
            self.stmt(st.block, mult)
        elif isinstance(st, s_tir.SBlock):
            self.stmt(st.body, mult)
            if st.init is not None:
                self.stmt(st.init, mult)
        elif isinstance(st, tirx.BufferStore) and _accumulates(st):
            self.macs += mult * _lanes(st.value.ty)
        elif isinstance(st, tirx.BufferStore):
            self.elements += mult * _lanes(st.value.ty)
            self.ops += mult * (_expr_ops(st.value) + sum(_expr_ops(i) for i in st.indices))
        elif isinstance(st, tirx.Bind):
            self.analyzer.bind(st.var, st.value)
            self.ops += mult * _expr_ops(st.value)
        elif isinstance(st, tirx.Evaluate):
            self.elements += mult
            self.ops += mult * _expr_ops(st.value)
        elif isinstance(st, (tirx.AllocBuffer, tirx.DeclBuffer, tirx.AssertStmt)):
            pass
        else:  # While and anything newer: its cost is unknown
            raise _Unknown(type(st).__name__)


def estimate(func) -> tuple[float, float]:
    """(single-thread microseconds, forks per call) of a PrimFunc; (inf, forks or 0) where it cannot be bounded."""
    walk = _Walk()
    try:
        walk.stmt(func.body, 1.0)
    except _Unknown:
        return math.inf, walk.forks
    except Exception as e:  # an optimization must not fail the build: this kernel keeps its threads
        logging.getLogger("graphopt").debug("threads: could not estimate a kernel (%s: %s); it stays parallel",
                                            type(e).__name__, e)
        return math.inf, walk.forks
    return walk.macs / MACS_PER_US + walk.elements / ELEMENTS_PER_US + walk.ops / OPS_PER_US, walk.forks


def _serial(st):
    """`st` with its parallel loops serial (the same node where it has none)."""
    from tvm import s_tir, tirx

    if isinstance(st, tirx.For):
        body = _serial(st.body)
        if st.kind != tirx.ForKind.PARALLEL and body.same_as(st.body):
            return st
        kind = tirx.ForKind.SERIAL if st.kind == tirx.ForKind.PARALLEL else st.kind
        return tirx.For(st.loop_var, st.min, st.extent, kind, body, st.thread_binding, st.annotations, st.step,
                        st.span)
    if isinstance(st, tirx.SeqStmt):
        seq = [_serial(s) for s in st.seq]
        return st if all(a.same_as(b) for a, b in zip(seq, st.seq)) else tirx.SeqStmt(seq, st.span)
    if isinstance(st, tirx.IfThenElse):
        then = _serial(st.then_case)
        other = _serial(st.else_case) if st.else_case is not None else None
        if then.same_as(st.then_case) and (other is None or other.same_as(st.else_case)):
            return st
        return tirx.IfThenElse(st.condition, then, other, st.span)
    if isinstance(st, tirx.AttrStmt):
        body = _serial(st.body)
        return st if body.same_as(st.body) else tirx.AttrStmt(st.node, st.attr_key, st.value, body, st.span)
    if isinstance(st, s_tir.SBlockRealize):
        block = _serial(st.block)
        return st if block.same_as(st.block) else s_tir.SBlockRealize(st.iter_values, st.predicate, block, st.span)
    if isinstance(st, s_tir.SBlock):
        body = _serial(st.body)
        init = _serial(st.init) if st.init is not None else None
        if body.same_as(st.body) and (init is None or init.same_as(st.init)):
            return st
        return s_tir.SBlock(st.iter_vars, st.reads, st.writes, st.name_hint, body, init, st.alloc_buffers,
                            st.match_buffers, st.annotations, st.span)
    return st  # stores, binds, allocations: no loops inside (estimate() refused the kinds it does not know)


def serialize_small(mod) -> tuple[object, list[str]]:
    """`mod` (updated in place: the build pipeline's own intermediate module) with the parallel loops of its small
    kernels serial, and the names of those kernels. The kernels' function objects themselves are not changed."""
    import tvm

    changed = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        us, forks = estimate(func)
        if forks and us < SERIAL_US * forks:
            changed[gv] = func.with_body(_serial(func.body))
    for gv, func in changed.items():
        mod[gv] = func
    return mod, sorted(gv.name_hint for gv in changed)
