"""CPU schedule rules applied without tuning (dlight-style): register-blocked, vectorized, parallel kernels for
the reduction-with-epilogue functions (conv2d, depthwise conv, matmul/dense) and vectorized elementwise ones.

One tile = `reg` rows of the second-innermost output axis x `vec` lanes of the innermost one, accumulated in
registers over the whole reduction, epilogue (bias, activation) fused on the tile, outer axes parallel.
Functions a rule does not understand keep TVM's default schedule; MetaSchedule records, when present, win.
"""
from __future__ import annotations

import logging
import math

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

log = logging.getLogger(__name__)


# The vector width graphopt's kernels are shaped for on AVX-512 CPUs: None picks it by CPU (`avx512_vector_bits`);
# tests and experiments set 256 or 512 to force one.
AVX512_VECTOR_BITS: int | None = None
# CPUs that execute AVX-512 as two 256-bit halves. On Zen 4 every kernel shaped for 512 bits was slower, whole
# models 11-33% (MobileNetV2 5.6 vs 3.8 ms, EfficientNet-Lite0 10.2 vs 7.2, MiniLM 18.4 vs 16.3: one interleaved
# run, 2 threads), the 7x7 pointwise convs 3x (a 49-pixel map in 32-pixel tiles). Only the tile shapes follow
# this: a kernel's 16-float vector (a GEMM tile row) is still one zmm, and the code has AVX-512's 32 registers and
# VNNI (forbidding zmm with LLVM's prefer-256-bit was mixed, 0.92-1.24x by model, and is not done).
HALF_WIDTH_AVX512 = ("znver4",)


def avx512_vector_bits(target: Target) -> int:
    """512 on CPUs with full-width AVX-512 units (Intel's, Zen 5), 256 on HALF_WIDTH_AVX512 ones. On Emerald Rapids
    (2 threads, interleaved, same process) the 512-bit shapes took 0.78-0.91x the 256-bit ones' time: MobileNetV2
    5.37 vs 6.21 ms, EfficientNet-Lite0 6.97 vs 7.67, MiniLM 17.04 vs 21.95, ResNet-18 21.73 vs 26.66."""
    if AVX512_VECTOR_BITS is not None:
        return AVX512_VECTOR_BITS
    return 256 if str(target.attrs.get("mcpu", "")) in HALF_WIDTH_AVX512 else 512


def half_width_vnni(target: Target) -> bool:
    """AVX512-VNNI on a CPU that runs AVX-512 as two 256-bit halves (`HALF_WIDTH_AVX512`): the float kernels keep
    256-bit tiles there, but the int8 pointwise kernel's 512-bit `vpdpbusd` tile is faster (`int8.qconv1x1_knobs`)."""
    from tvm.target import codegen
    try:
        return codegen.llvm_cpu_has_features(["avx512vnni"], target) and avx512_vector_bits(target) == 256
    except Exception:
        return False


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Lanes of the vectors graphopt's kernels use on the CPU (fp32: 8 with AVX2, 8 or 16 with AVX-512 by
    `avx512_vector_bits`; 4 otherwise).

    Feature flags, not llvm_get_vector_width: that answers 512 on AVX2-only Zen 3 here."""
    from tvm.target import codegen
    try:
        if codegen.llvm_cpu_has_features(["avx512f"], target):
            bits = avx512_vector_bits(target)
        elif codegen.llvm_cpu_has_features(["avx2"], target) or codegen.llvm_cpu_has_features(["avx"], target):
            bits = 256
        else:
            bits = 128
    except Exception:
        bits = 128
    return max(1, bits // dtype_bits)


def vector_registers(target: Target) -> int:
    """The vector registers a kernel's register tile may fill: 32 with AVX-512 (also where it runs at 256 bits), 16
    otherwise."""
    from tvm.target import codegen
    try:
        return 32 if codegen.llvm_cpu_has_features(["avx512f"], target) else 16
    except Exception:
        return 16


def has_gather(target: Target | None) -> bool:
    """Whether the target has AVX2's vector gathers (`csr_gemv`)."""
    from tvm.target import codegen
    try:
        return target is not None and bool(codegen.llvm_cpu_has_features(["avx2"], target))
    except Exception:
        return False


def target_cores(target: Target | None) -> int:
    """The target's `num-cores` (what `host.cpu_target` sets), 0 when it has none."""
    try:
        return int(target.attrs.get("num-cores", 0)) if target is not None else 0
    except (TypeError, ValueError):
        return 0


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _divisor(n: int, candidates: tuple[int, ...]) -> int:
    for c in candidates:
        if c <= n and n % c == 0:
            return c
    return 1


def _is_spatial(block_info) -> bool:
    return all(it.kind == "S" for it in block_info.iters)


class ReductionTile(ScheduleRule):
    """One reduction block (conv / matmul / depthwise) with optional injective producers and epilogue."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        reductions = [b for b in infos if not _is_spatial(b)]
        if len(reductions) != 1:
            return None
        red = reductions[0]
        idx = infos.index(red)
        name = sch.get(red.block_rv).name_hint
        if "pool" in name:
            return None
        # window reductions (depthwise): inlining the padding puts a bounds check in the inner loop, which costs
        # more than the tile gains; keep the padded copy as its own (vectorized) loop instead
        window = "group_conv" in name or "depthwise" in name
        acc_dtype = str(sch.get(red.block_rv).writes[0].source.dtype)
        if window and acc_dtype.startswith("float"):
            return None  # measured: TVM's default loop nest is faster for float depthwise (0.33 vs 1.7 ms)
        # producers (padding, layout copies) go inline; so do epilogue blocks except the last
        n_spatial = sum(1 for it in red.iters if it.kind == "S")
        out_shape = [int(it.dom) for it in red.iters if it.kind == "S"]
        epilogue, tail = [], []
        for b in infos[idx + 1:]:  # same-shape epilogue (bias, activation) joins the tile; a pad after it does not
            same = not tail and [int(it.dom) for it in b.iters] == out_shape
            (epilogue if same else tail).append(b)
        # a producer binding a Let that is broadcast into the reduction keeps its own loop (`_let_broadcast`:
        # SchNet's cosine cutoff on the pair distances, summed over neighbours times their features)
        domain = 1
        for it in red.iters:
            domain *= int(it.dom) if isinstance(it.dom, (int, tirx.IntImm)) else 1 << 30
        try:
            for b in infos[:idx]:
                if window or _let_broadcast(sch, b.block_rv, domain):
                    _parallel_vectorize(sch, b.block_rv, vector_lanes(target))
                else:
                    sch.compute_inline(b.block_rv)
            for b in epilogue[:-1]:
                sch.compute_inline(b.block_rv)
        except Exception:  # a producer that cannot be inlined: leave this function to the default schedule
            return None
        for b in tail:
            _parallel_vectorize(sch, b.block_rv, vector_lanes(target))
        anchor = epilogue[-1].block_rv if epilogue else red.block_rv
        s_loops = sch.get_loops(anchor)
        if epilogue:
            if len(s_loops) != n_spatial:
                return None
        else:
            s_loops = s_loops[:n_spatial]
        if not s_loops:
            return None
        exts = [_extent(sch, lp) for lp in s_loops]
        if any(e is None for e in exts):
            return None
        lanes = vector_lanes(target)
        # a whole number of vectors if possible, else the largest divisor that nearly fills one (7 of 14 or 28)
        vec = _divisor(exts[-1], (2 * lanes, lanes, *range(lanes - 1, lanes // 2 - 1, -1))) if lanes > 1 else 1
        if vec < 4:
            return None
        if len(s_loops) == 1:
            # matrix-vector (batch-1 linear): the register block also comes from the output axis
            reg = _divisor(exts[0] // vec, (4, 5, 3, 2))
            outer = []
            r_o, r_i, v_i = sch.split(s_loops[0], [None, reg, vec])
            v_o = r_i
            sch.reorder(r_o, r_i, v_i)
            tile_loop = r_o
        else:
            # register block: the other output axis with the most work that splits evenly
            cands = [(e % 8 == 0, e % 4 == 0, e, k) for k, e in enumerate(exts[:-1])]
            r_axis = max(cands)[3]
            reg = _divisor(exts[r_axis], (4,) if vec > lanes else (8, 4, 3, 2))
            r_loop, v_loop = s_loops[r_axis], s_loops[-1]
            outer = [lp for k, lp in enumerate(s_loops[:-1]) if k != r_axis]
            r_o, r_i = sch.split(r_loop, [None, reg])
            v_o, v_i = sch.split(v_loop, [None, vec])
            sch.reorder(*outer, r_o, v_o, r_i, v_i)
            tile_loop = v_o
        if epilogue:
            sch.compute_at(red.block_rv, tile_loop, preserve_unit_loops=True)
            sch.vectorize(v_i)
        red_loops = sch.get_loops(red.block_rv)
        n_r = sum(1 for it in red.iters if it.kind == "R")
        r_inner = red_loops[len(red_loops) - n_r:]
        n_tile = len(outer) + (1 if len(s_loops) == 1 else 2)
        below = red_loops[n_tile:len(red_loops) - n_r]
        s_inner = [lp for lp in below if _extent(sch, lp) != 1]  # compute_at keeps unit loops; skip them
        if len(s_inner) == 1 and _extent(sch, s_inner[0]) == reg * vec:  # one output axis: split it again
            s_inner = list(sch.split(s_inner[0], [reg, vec]))
        if len(s_inner) != 2 or not r_inner:
            return None
        sch.reorder(*r_inner, *s_inner)
        # parallel over the outer tile loops (fused); must precede decompose_reduction (two writers after it)
        par = sch.fuse(*outer, r_o) if outer else r_o
        sch.parallel(par)
        sch.unroll(s_inner[0])
        sch.vectorize(s_inner[1])
        sch.decompose_reduction(red.block_rv, r_inner[0])
        return sch


# blocks an elementwise function may have for the rule to inline them: TVM's compute_inline grows with the
# function (an SRU's 64-step elementwise recurrence, imported from ONNX, fused into one function: the rule ran
# for over 5 minutes before it was stopped); past this, TVM's default loop nest
ELEMENTWISE_MAX_BLOCKS = 128


class Elementwise(ScheduleRule):
    """Purely spatial functions: inline into the last block, vectorize the innermost axis, parallel outside."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or "cpu" not in target.keys:
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or not all(_is_spatial(b) for b in infos) or len(infos) > ELEMENTWISE_MAX_BLOCKS:
            return None
        # every block but the outputs inlined; several outputs (a split or chunk Relax fused with the activation
        # before it) each get their own loop nest: with one, the rule gave up and TVM's default loop ran the
        # function serially and unvectorized (SiLU + chunk on 96x80x80: 475 us against PyTorch's 134)
        try:
            outputs = {sch.get(b).name_hint for b in sch.get_output_blocks("root")}
            widest = max(_elements(sch, b.block_rv) for b in infos if b.name in outputs)
            own = [b for b in infos if b.name not in outputs and _let_broadcast(sch, b.block_rv, widest)]
            for b in infos:
                if b.name not in outputs and b not in own:
                    sch.compute_inline(b.block_rv)
        except Exception:
            return None
        try:
            for b in infos:
                if (b.name in outputs or b in own) and not _parallel_vectorize(sch, b.block_rv,
                                                                              vector_lanes(target)):
                    return None
        except Exception as e:  # (a schedule primitive refused: TVM's default loop rather than a failed build)
            log.debug("elementwise rule left %s: %s", func.attrs and func.attrs.get("global_symbol"), e)
            return None
        return sch


def _elements(sch: s_tir.Schedule, block) -> int:
    n = 1
    for e in sch.get(block).writes[0].source.shape:
        n *= int(e) if isinstance(e, tirx.IntImm) else 1 << 30
    return n


BROADCAST_RUN_MAX = 256  # (floats: 16 zmm registers' worth)


def _broadcast_loops(sch: s_tir.Schedule, block) -> int:
    """How many innermost loops some input of a spatial block does not vary along (the fewest such, over inputs
    that vary at all; 0: none): 2 for a per-channel scale over a map's pixels. Fused with the outer loops and cut
    into vectors that straddle that run's boundary, the input was gathered lane by lane (SKNet's per-channel
    branch weights over 128x28x28, vectors of 32 across 784 pixels: 115 us; vectors inside the run: 24)."""
    blk = sch.get(block)
    ivs = [iv.var for iv in blk.iter_vars]
    fewest = 0
    for r in blk.reads:
        used = [u for rng in r.region for u in tirx.analysis.undefined_vars(rng.min)]
        if not any(v.same_as(u) for v in ivs for u in used):
            continue
        m = 0
        for v in reversed(ivs):
            if any(v.same_as(u) for u in used):
                break
            m += 1
        if m and (not fewest or m < fewest):
            fewest = m
    return fewest


def _let_broadcast(sch: s_tir.Schedule, block, consumer_elements: int) -> bool:
    """Whether `block` binds a Let (vmath's log / sin read their input once through one) and writes fewer values
    than its consumer: inlined there, the Let's value is the same in every lane of the consumer's vector, and TVM's
    vectorizer visits such a Let twice under a multiply and refuses it ("Let cannot bind the same var to two
    different values": Sinkhorn's -logsumexp broadcast back over the cost matrix). Such a block keeps its own
    loop."""
    return "T.Let(" in str(sch.get(block).body) and _elements(sch, block) < consumer_elements


def _walk(e, visit) -> None:
    """visit(node) for every expression node under e (TVM 0.27 has no Python expression visitor)."""
    import tvm
    visit(e)
    for f in ("a", "b", "value", "condition", "true_value", "false_value", "body", "base"):
        x = getattr(e, f, None)
        if isinstance(x, tvm.ir.expr.Expr):
            _walk(x, visit)
    for f in ("args", "indices"):
        for x in getattr(e, f, None) or ():
            if isinstance(x, tvm.ir.expr.Expr):
                _walk(x, visit)


PARTITION_MAX = 64  # most pieces a concat's axis is cut into
PARALLEL_ROWS_MIN = 16  # fewest rows before a concat's axis its threads split (fewer: each piece's run is split)
PIECE_RUN_MIN = 4  # the shortest piece (times the axes after the concat's) worth a vector loop of its own


def _concat_pieces(sch: s_tir.Schedule, block) -> tuple[int, list[int], int] | None:
    """(axis, piece lengths, row) where every if_then_else / select in a spatial block's value that tests the
    position (no loaded value in the test) tests one and the same iter var, and its extent (or each `row` of it,
    where the tests read the var modulo `row`) cuts into pieces over each of which every such test is constant: a
    concat (Relax's concatenate tests the position along its axis to pick the input), nested concats of computed
    features, a 1-D pad, the same flattened. None otherwise."""
    import tvm
    from tvm.sym import Analyzer
    blk = sch.get(block)
    value = getattr(blk.body, "value", None)
    if value is None:
        return None
    conds = []

    def visit(n):
        if isinstance(n, tvm.ir.Call) and getattr(n.op, "name", "") == "prim.if_then_else":
            conds.append(n.args[0])
        elif isinstance(n, tirx.Select):
            conds.append(n.condition)
    _walk(value, visit)
    if not conds:
        return None
    ivs = [iv.var for iv in blk.iter_vars]
    axis, tests = None, []
    for c in conds:
        loads = []
        _walk(c, lambda n: loads.append(n) if hasattr(n, "indices") else None)
        used = tirx.analysis.undefined_vars(c)
        hit = [k for k, v in enumerate(ivs) if any(v.same_as(u) for u in used)]
        if loads or len(hit) != len(used):
            continue  # a test of values (a where, vmath's selects), not of the position
        if len(hit) != 1 or axis not in (None, hit[0]):
            return None
        axis = hit[0]
        tests.append(c)
    if axis is None:
        return None
    conds = tests
    dom = blk.iter_vars[axis].dom
    if not isinstance(dom.extent, tirx.IntImm) or not isinstance(dom.min, tirx.IntImm) or int(dom.min.value):
        return None
    extent = int(dom.extent.value)
    # a flattened concat (a reshape or quantize Relax fused after it: [R, C] written as R * C values) tests the
    # position within each row, v % C: the pieces of one row, repeated
    mods = []
    for c in conds:
        _walk(c, lambda n: mods.append(n) if isinstance(n, tirx.FloorMod) and isinstance(n.b, tirx.IntImm)
              and ivs[axis].same_as(n.a) else None)
    period = {int(m.b.value) for m in mods}
    if len(period) > 1:
        return None
    row = period.pop() if period else extent
    if extent % row:
        return None
    pieces: list[int] = []
    truths: list[list[bool]] = []

    def split(lo: int, hi: int) -> bool:
        """Cut [lo, hi) into ranges each test is constant over, in order (halving where one is not)."""
        an = Analyzer()
        an.bind(ivs[axis], tvm.ir.Range(lo, hi))
        tests = [an.simplify(c) for c in conds]
        if all(isinstance(t, tirx.IntImm) for t in tests):
            truth = [bool(t.value) for t in tests]
            if truths and truths[-1] == truth:
                pieces[-1] += hi - lo  # the same tests as the piece before: one piece
            else:
                pieces.append(hi - lo)
                truths.append(truth)
            return len(pieces) <= PARTITION_MAX
        if hi - lo < 2:
            return False
        mid = (lo + hi) // 2
        return split(lo, mid) and split(mid, hi)
    if not split(0, row):
        return None
    return (axis, pieces, row) if 1 < len(pieces) <= PARTITION_MAX else None


def _partitioned(sch: s_tir.Schedule, block, loops, exts, lanes: int) -> bool:
    """A concat's (`_concat_pieces`) loop nest: the axes before the concat's parallel, the concat's axis cut into
    its pieces, each piece with the axes after it one vectorized run. Fused and cut into vectors across the
    pieces, every lane tested which input it reads and loaded on its own (Relax's concat of [16 | 32] features
    with a ReLU and a scale over 20000 rows: 1761 us, PyTorch's 472; PNA's 13 aggregated feature blocks of 64
    with their sqrt / scalers: 3.1 ms, PyTorch's 1.07). A quantize's int8 store takes vectors twice as wide; a
    flattened concat's rows get a loop of their own first (PNA's int8 build quantizes its concat into a flat
    buffer: 5.7 ms -> under 0.37)."""
    found = _concat_pieces(sch, block)
    if found is None:
        return False
    axis, pieces, row = found
    inner = math.prod(exts[axis + 1:])
    if min(pieces) * inner < PIECE_RUN_MIN or (axis == 0 and row == exts[0]):
        return False  # (x and y coordinates stacked into [.., 2]: vectors across the rows, as before)
    if row < exts[axis]:  # a flattened concat: its rows as a loop of their own before the pieces
        loops = [*loops[:axis], *sch.split(loops[axis], [None, row]), *loops[axis + 1:]]
        exts = [*exts[:axis], exts[axis] // row, row, *exts[axis + 1:]]
        axis += 1
    outer = sch.fuse(*loops[:axis]) if axis > 1 else loops[0]
    parts = sch.loop_partition(loops[axis], [*pieces[:-1], None])
    cands = (lanes * 2, lanes, lanes // 2, 4)
    # few rows before the concat's axis (a batch-1 channel concat): each piece is parallel within itself instead
    inside = math.prod(exts) >= 4096 and math.prod(exts[:axis]) < PARALLEL_ROWS_MIN
    for part, n in zip(parts, pieces):
        # the piece's loop and those after it (the piece sits in a block of its own: its loops start there)
        run_loops = sch.get_loops(sch.get_child_blocks(part)[0])[-(len(exts) - axis):]
        run = sch.fuse(*run_loops) if len(run_loops) > 1 else run_loops[0]
        length = n * inner
        vec = _divisor(length, cands)
        if inside and length >= 4096 and vec >= 4:
            o, i = sch.split(run, [None, vec * 64])
            sch.parallel(o)
            sch.vectorize(sch.split(i, [None, vec])[1])
        elif length <= BROADCAST_RUN_MAX:
            sch.vectorize(run)  # (LLVM cuts a run no vector width divides into whole registers and a short one)
        elif vec >= 4:
            sch.vectorize(sch.split(run, [None, vec])[1])
    if math.prod(exts) >= 4096 and not inside:
        sch.parallel(outer)
    return True


def _parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> bool:
    """Fuse a spatial block's loops, vectorize the innermost run and parallelize the rest. `lanes` is the fp32
    vector width; a block writing 8-bit values (an activation quantize) takes a whole 8-bit register per step: with
    16 lanes LLVM scalarized the float -> int8 narrowing and re-vectorized across the outer loop with strided
    loads (82 us for 512 x 512 values), with 32 it packs whole vectors (24 us)."""
    loops = sch.get_loops(block)
    if not loops:
        return False
    exts = [_extent(sch, lp) for lp in loops]
    if any(e is None for e in exts):
        return False
    total = 1
    for e in exts:
        total *= e
    out_bits = sch.get(block).writes[0].source.dtype.bits
    # an 8-bit value anywhere in the block (a quantize's narrowing, also inside a quantize -> dequantize pair with a
    # float output) needs whole 8-bit registers too: at 16 lanes the same scalarization gathered a 224x224 image's
    # fake quantize lane by lane (96 -> 21-33 us)
    narrow = out_bits == 8 or "int8" in str(sch.get(block).body)
    if len(loops) == len(sch.get(block).iter_vars) and _partitioned(sch, block, loops, exts,
                                                                     lanes * 2 if narrow else lanes):
        return True
    widest = lanes * 4 if narrow else lanes * 2
    cands = (widest, lanes * 2, lanes, lanes // 2, 2)
    m = _broadcast_loops(sch, block) if len(loops) == len(sch.get(block).iter_vars) else 0
    period = math.prod(exts[len(exts) - m:]) if 0 < m < len(exts) else 0
    vec = _divisor(period, cands) if period else 0
    if period and vec < max(4, lanes // 2) and period <= BROADCAST_RUN_MAX:
        # a run no vector width divides (a 7x7 or 14x14 map's pixels): the run is one vector of its own length
        # (LLVM splits it into whole registers and a short one), the loops outside it parallel. Per-channel scale
        # over 512x7x7: 50 -> 17 us; 256x14x14: 60 -> 19 us (emeraldrapids, 2 threads)
        outer = sch.fuse(*loops[:len(loops) - m]) if len(loops) - m > 1 else loops[0]
        inner = sch.fuse(*loops[len(loops) - m:]) if m > 1 else loops[-1]
        if total >= 4096:
            sch.parallel(outer)
        sch.vectorize(inner)
        return True
    fused = sch.fuse(*loops)
    if vec < max(4, lanes // 2):
        vec = _divisor(total, cands)
    if total >= 4096:
        o, i = sch.split(fused, [None, vec * 64])
        sch.parallel(o)
        _, vi = sch.split(i, [None, vec])
        sch.vectorize(vi)
    elif vec > 1:
        _, vi = sch.split(fused, [None, vec])
        sch.vectorize(vi)
    return True


class Normalization(ScheduleRule):
    """Softmax and layer norm: TVM's dlight CPU reduction rule (it slows down plain means, so only these)."""

    def __init__(self):
        from tvm.s_tir.dlight import cpu as dl_cpu
        self.inner = dl_cpu.Reduction()

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool):
        if not isinstance(func, tirx.PrimFunc):
            return None
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs:  # graphopt's own row kernels (norm.py)
            return None
        text = func.script()
        if "softmax" not in text and "layer_norm" not in text:
            return None
        return self.inner.apply(func, target, tunable)


def default_cpu_rules() -> list[ScheduleRule]:
    """graphopt's rules first; TVM's dlight CPU reduction rule for softmax and layer norm after them."""
    return [ReductionTile(), Elementwise(), Normalization()]
