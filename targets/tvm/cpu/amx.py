"""int8 GEMMs and k x k convs on AMX tiles (Intel Sapphire Rapids and later: AMX-INT8, `tdpbssd` / `tdpbsud`).

A tile register holds 16 rows of 64 bytes; one `tdpbssd` multiplies a 16 x 64 int8 tile by a 64 x 16 one (stored
as 16 rows of 16 columns x 4 consecutive k: the quad layout `int8.pack_gemm_quads` already writes) into a 16 x 16
int32 tile: 16384 multiply-adds, signed x signed, so the int8 activations go in as the quantize wrote them (no +128
shift, and the offset is the zero point's alone). On the Emerald Rapids development machine one thread ran
~2000 G int8 MAC/s of `tdpbssd` against ~250 for 512-bit `vpdpbusd`.

The kernel (`qgemm_amx_source`) keeps a 32 x 32 block of the output in four accumulator tiles (tmm0-3), two A
tiles (tmm4-5: rows r0 .. r0 + 31 of the activation, 64 k a step) and two B tiles (tmm6-7: two 16-column panels of
the packed weight): four `tdpbssd` per four tile loads. Each thread takes a contiguous run of the row-major blocks,
configures the tiles once (`ldtilecfg`, a 64-byte constant the artifact carries), writes each finished block to a
4 KB stack buffer (`tilestored64`) and runs the epilogue from there -- (acc - offset) * multiplier (+ float bias)
in 16-lane vectors -- then releases the tiles. The last row block overlaps the one before it (M >= 32; fewer rows
are padded), N and K are padded to 32 and 64 (zero weights). The dense k x k int8 conv runs the same blocks over
its quad planes read in place (`qconv_flat_amx_source`).

Linux hands out the 8 KB of tile state per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`);
an AMX instruction before that stops the process. Every kernel therefore asks first (one syscall per call, ~0.1
us: granted once, later requests return at once) and fails with a TVM error naming the cause if the OS refuses,
so an artifact never crashes the program that loads it. Compiling picks AMX only where LLVM's CPU has AMX-INT8 and,
building for this machine, where the OS grants it here (`amx_usable`); GRAPHOPT_AMX=0 turns it off. The manifest
lists amx-int8 / amx-tile among the artifact's ISA extensions only when an AMX kernel was built.
"""
from __future__ import annotations

import ctypes
import os
from functools import lru_cache

import numpy as np

ROWS, COLS, KSTEP = 32, 32, 64  # one task's output block and one reduction step (bytes of a tile row)
ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA, SYS_ARCH_PRCTL = 0x1023, 18, 158
KERNEL_PREFIX = "qgemm_amx"  # how the build finds AMX kernels in a module (`uses_amx`)


@lru_cache(maxsize=None)
def host_grants_amx() -> bool:
    """Whether this process may use AMX tiles: Linux on x86-64 with amx_int8 in /proc/cpuinfo, and the OS grants
    the tile state (the request is the one every AMX kernel makes before its first tile instruction)."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return False
    if "amx_int8" not in flags or "amx_tile" not in flags:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def amx_usable(target) -> bool:
    """Whether graphopt's int8 GEMMs run on AMX for `target`: its CPU has AMX-INT8 (LLVM's model of it) and, when
    it is this machine's CPU, this machine's OS grants the tiles (a VM may hide them); GRAPHOPT_AMX=0 disables."""
    if os.environ.get("GRAPHOPT_AMX", "").strip().lower() in ("0", "off", "no", "false"):
        return False
    from tvm.target import codegen

    from graphopt.targets.tvm.host import host_cpu
    try:
        if target is None or str(target.kind.name) != "llvm" or \
                not codegen.llvm_cpu_has_features(["amx-int8", "amx-tile"], target):
            return False
    except Exception:
        return False
    mcpu = str(target.attrs.get("mcpu", ""))
    return host_grants_amx() if mcpu in ("", host_cpu()) else True


def amx_cores(target) -> int:
    """`emit_qlinear`'s amx_cores for `target`: its cores where AMX is usable, else 0 (no AMX)."""
    if not amx_usable(target):
        return 0
    from graphopt.targets.tvm.cpu.rules import target_cores
    return max(1, target_cores(target))


def uses_amx(mod) -> bool:
    """Whether the lowered module `mod` calls an AMX kernel (its artifact then needs AMX where it runs)."""
    return any(gv.name_hint.startswith(KERNEL_PREFIX) for gv in mod.functions)


def tile_config(step: int = KSTEP) -> np.ndarray:
    """`ldtilecfg`'s 64 bytes: palette 1; accumulator tiles 0-3 of 16 rows x 16 int32; A tiles 4-5 of 16 rows x
    `step` bytes (the reduction step: 64, or a short K rounded up to 4), B tiles 6-7 of step / 4 rows x 64 bytes."""
    if step % 4 or not 4 <= step <= KSTEP:
        raise ValueError(f"an AMX reduction step is 4..64 bytes in fours, not {step}")
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    colsb, rows = cfg[16:32].view(np.uint16), cfg[48:56]
    colsb[:8] = KSTEP
    colsb[4:6] = step
    rows[:8] = 16
    rows[6:8] = step // 4
    return cfg


def amx_qlinear_applies(m: int, k: int) -> bool:
    """Rows enough to fill half a block at least (fewer take the quad GEMV / GEMM) and a whole reduction step."""
    return m >= 16 and k >= KSTEP


def padded_shape(m: int, k: int, n: int) -> tuple[int, int, int]:
    """The kernel's (M, K, N): rows to one block at least, K to whole steps, N to whole 32-column blocks."""
    return max(m, ROWS), -(-k // KSTEP) * KSTEP, -(-n // COLS) * COLS


def flat_quads_step(cin: int) -> int:
    """Input quads per reduction step of the flat conv (`qconv_flat_amx_source`), 0 where it does not apply: all
    of Cin's quads at a tap when 16 or fewer (Cin <= 64), else 16 when they divide them (Cin % 64 == 0)."""
    k4 = -(-cin // 4)
    return k4 if k4 <= 16 else (16 if k4 % 16 == 0 else 0)


def amx_flat_qconv_applies(cin: int, n: int, qmax: int) -> bool:
    """Batch 1, a reduction step (`flat_quads_step`) and a flat output range of one 32-position block at least."""
    return n == 1 and flat_quads_step(cin) > 0 and qmax >= COLS


def pack_flat_weight(wq: np.ndarray) -> np.ndarray:
    """int8 W [Cout, Cin, kh, kw] -> int8 [Cout padded to 32, kh * kw * ceil(Cin / 4) * 4]: each output channel's
    row in the flat conv's reduction order (tap, input quad, the quad's 4 channels); zeros pad both."""
    cout, cin, kh, kw = wq.shape
    k4 = -(-cin // 4)
    w = np.zeros((-(-cout // ROWS) * ROWS, k4 * 4, kh, kw), np.int8)
    w[:cout, :cin] = wq
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(-1)


def _intrin(name: str, *args: str) -> str:
    return f'T.evaluate(T.call_llvm_intrin("void", "llvm.x86.{name}"{"".join(", " + a for a in args)}))'


def _block(a_tiles: list[str], a_stride: str, b_tiles: list[str], b_stride: str, dot: str = "tdpbssd",
           halves: bool = False) -> tuple[str, str, str]:
    """TVMScript of a 32 x 32 output block's tile code: (zero the four accumulators, at 12 spaces; one reduction
    step: two A and two B tile loads from the given addresses and row strides, four `dot` (`tdpbssd`: signed x
    signed; `tdpbsud`: signed A x unsigned B), at 16; store the accumulators to the 32 x 32 int32 buffer `acc`,
    at 12, or with `halves` to two 32 x 16 buffers acc0 and acc1, the block's left and right 16 columns)."""
    nl = "\n" + " " * 16
    step = "".join(nl + _intrin("tileloadd64", f"T.int8({4 + h})", a_tiles[h], f"T.int64({a_stride})")
                   for h in range(2))
    step += "".join(nl + _intrin("tileloadd64", f"T.int8({6 + j})", b_tiles[j], f"T.int64({b_stride})")
                    for j in range(2))
    step += "".join(nl + _intrin(dot, f"T.int8({c})", f"T.int8({4 + c // 2})", f"T.int8({6 + c % 2})")
                    for c in range(4))
    nl = "\n" + " " * 12
    zero = "".join(nl + _intrin("tilezero", f"T.int8({c})") for c in range(4))
    if halves:
        dest = [(f"acc{c % 2}[{(c // 2) * 16 * 16}]", 64) for c in range(4)]
    else:
        dest = [(f"acc[{(c // 2) * ROWS * COLS // 2 + (c % 2) * 16}]", 4 * COLS) for c in range(4)]
    store = "".join(nl + _intrin("tilestored64", f"T.int8({c})", f"T.address_of({addr})", f"T.int64({stride})")
                    for c, (addr, stride) in enumerate(dest))
    return zero, step, store


def qgemm_amx_source(m: int, k: int, n: int, float_bias: bool = False, cores: int = 2) -> str:
    """TVMScript of out[M, N] = (a[M, K] @ W^T - off) * mult (+ bias) for int8 a, W packed by
    `int8.pack_gemm_quads` (N % 32 == 0, K % 64 == 0, M >= 32): see the module docstring."""
    if n % COLS or k % KSTEP or m < ROWS:
        raise ValueError(f"qgemm_amx needs M >= {ROWS}, K % {KSTEP} == 0, N % {COLS} == 0; got {m}x{k}x{n}")
    mb, nb, kq = -(-m // ROWS), n // COLS, k // 4
    tasks = mb * nb
    workers = max(1, min(int(cores) or 1, tasks))
    a_tile = [f"T.address_of(a[(r0 + {16 * h}) * {k} + kk * {KSTEP}])" for h in range(2)]
    b_tile = [f"T.address_of(wp[((p0 + {j}) * {kq} + kk * 16) * 64])" for j in range(2)]
    zero, step, store = _block(a_tile, str(k), b_tile, "64")
    cols = "T.ramp(p0 * 16 + h * 16, 1, 16)"
    value = f'T.Cast("float32x16", acc[T.ramp(i * 32 + h * 16, 1, 16)] - off[{cols}]) * mult[{cols}]'
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if float_bias else ""
    if float_bias:
        value += f" + bias[{cols}]"
    return f"""
@T.prim_func(private=True)
def {KERNEL_PREFIX}(a: T.Buffer(({m * k},), "int8"), wp: T.Buffer(({n * k},), "int8"), cfg: T.Buffer((64,), "uint8"),
              off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),{bias_arg}
              out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{_permission()}
    for w in T.parallel({workers}):
        acc = T.decl_buffer(({ROWS * COLS},), "int32", scope="global")
        {_intrin('ldtilecfg', 'T.address_of(cfg[0])')}
        for t in T.serial(w * {tasks} // {workers}, (w + 1) * {tasks} // {workers}):
            r0 = T.min((t // {nb}) * {ROWS}, {m - ROWS})
            p0 = (t % {nb}) * 2{zero}
            for kk in T.serial({k // KSTEP}):{step}{store}
            for i in T.serial({ROWS}):
                for h in T.unroll(2):
                    out[T.ramp((r0 + i) * {n} + p0 * 16 + h * 16, 1, 16)] = {value}
        {_intrin('tilerelease')}
"""


def _permission() -> str:
    return (f'    assert T.call_extern("int64", "syscall", T.int64({SYS_ARCH_PRCTL}), T.int64({ARCH_REQ_XCOMP_PERM}), '
            f'T.int64({XFEATURE_XTILEDATA})) == T.int64(0), "the OS refused this process AMX tile state (arch_prctl '
            f'ARCH_REQ_XCOMP_PERM); compile with GRAPHOPT_AMX=0 for this machine"')


def qconv_flat_amx_source(cout: int, cin: int, h: int, wd: int, kh: int, kw: int, stride: int, padding,
                          clamp=None, out_q=None, dequantized: bool = False, float_bias: bool = False,
                          cores: int = 2) -> str:
    """TVMScript of the int8 dense k x k conv on AMX tiles, over the quad planes of `int8.quad_planes_source` (the
    input + 128 as uint8, 4 channels of a pixel side by side, split into stride phases, the zero point as padding):
    the implicit GEMM of `int8.qconv_flat_source` with output channels as A's rows (`pack_flat_weight`) and the
    flat output positions (numbered over the planes' width) as B's columns. A reduction step is one tap and up to
    16 input quads (`flat_quads_step`): each B tile row is one quad's run of 16 positions, read in place from the
    planes (rows a plane apart), so nothing is staged or copied. `tdpbsud` (signed weights x unsigned planes);
    the offsets hold (zero point + 128) x sum(w). Each task takes a 32-channel x 32-position block (the last
    overlapping the one before it) and stores its valid positions: 16-lane vectors where the 16 lie in one output
    row, else position by position."""
    from graphopt.targets.tvm.cpu.conv import staged_tiling
    from graphopt.targets.tvm.cpu.int8 import _requantized
    sq = flat_quads_step(cin)
    if not sq:
        raise ValueError(f"qconv_flat_amx needs Cin <= 64 or Cin % 64 == 0, not {cin}")
    k4 = -(-cin // 4)
    g = staged_tiling(cout, h, wd, kh, kw, stride, padding, k4 * kh * kw)
    oh, ow, wq, plane, ph, qmax, offs = (g[n] for n in ("oh", "ow", "wq", "plane", "ph", "qmax", "offs"))
    if qmax < COLS:
        raise ValueError(f"qconv_flat_amx needs {COLS} flat output positions or more, not {qmax}")
    kbytes = kh * kw * k4 * 4
    cpad = -(-cout // ROWS) * ROWS
    pb = -(-qmax // COLS)
    tasks = cpad // ROWS * pb
    workers = max(1, min(int(cores) or 1, tasks))
    a_tile = [f"T.address_of(w[(r0 + {16 * hh}) * {kbytes} + (tp * {k4} + qb * {sq}) * 4])" for hh in range(2)]
    b_tile = [f"T.address_of(xq[(qb * {sq * ph * plane} + tap_off + q0 + {16 * j}) * 4])" for j in range(2)]
    zero, body, store = _block(a_tile, str(kbytes), b_tile, str(ph * plane * 4), "tdpbsud", halves=True)
    body = body.replace("\n" + " " * 16, "\n" + " " * 20)
    otype = "int8" if out_q and not dequantized else "float32"
    bias_arg = f' bias: T.Buffer(({cpad},), "float32"),' if float_bias else ""

    def val(hh: int) -> str:
        return _requantized(f"acc{hh}[i * 16 + v]", "r0 + i", clamp, out_q, dequantized, float_bias)
    halves = ""
    for hh in range(2):
        x, y = f"((q0 + {16 * hh}) % {wq})", f"((q0 + {16 * hh}) // {wq})"
        halves += f"""
                    if {x} + 16 <= {ow}:
                        for v in T.vectorized(16):
                            out[(r0 + i) * {oh * ow} + {y} * {ow} + {x} + v] = {val(hh)}
                    else:
                        for v in T.serial(16):
                            if ({x} + v) % {wq} < {ow}:
                                out[(r0 + i) * {oh * ow} + ({y} + ({x} + v) // {wq}) * {ow}
                                    + ({x} + v) % {wq}] = {val(hh)}"""
    return f"""
@T.prim_func(private=True)
def {KERNEL_PREFIX}_flat(xq: T.Buffer(({k4 * ph * plane * 4},), "uint8"), w: T.Buffer(({cpad * kbytes},), "int8"),
              cfg: T.Buffer((64,), "uint8"), off: T.Buffer(({cpad},), "int32"),
              mult: T.Buffer(({cpad},), "float32"),{bias_arg}
              offs: T.Buffer(({len(offs)},), "int32"), qp: T.Buffer((4,), "float32"),
              out: T.Buffer(({cout * oh * ow},), "{otype}")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
{_permission()}
    for wk in T.parallel({workers}):
        acc0 = T.decl_buffer(({ROWS * 16},), "int32", scope="global")
        acc1 = T.decl_buffer(({ROWS * 16},), "int32", scope="global")
        {_intrin('ldtilecfg', 'T.address_of(cfg[0])')}
        for t in T.serial(wk * {tasks} // {workers}, (wk + 1) * {tasks} // {workers}):
            r0 = (t // {pb}) * {ROWS}
            q0 = T.min((t % {pb}) * {COLS}, {qmax - COLS}){zero}
            for tp in T.serial({kh * kw}):
                tap_off = offs[tp]
                for qb in T.serial({k4 // sq}):{body}{store}
            for i in T.serial({ROWS}):
                if r0 + i < {cout}:{halves}
        {_intrin('tilerelease')}
"""


QBSR_BLOCK = (16, KSTEP)  # bsr16x64: 16 output rows x 64 inputs, one B tile (a 16 x 16 x 4 quad panel)


def amx_bsr_applies(m: int, k: int, n: int) -> str:
    """Why the AMX block-sparse int8 linear cannot take this layer ("" when it can): 16+ rows and a weight of
    whole 16 x 64 blocks."""
    if m < 16:
        return f"{m} row(s): the AMX block-sparse kernel takes 16 or more (one tile of rows)"
    if n % QBSR_BLOCK[0] or k % QBSR_BLOCK[1]:
        return f"weight [{n}, {k}] does not divide into {QBSR_BLOCK[0]}x{QBSR_BLOCK[1]} blocks (bsr16x64)"
    return ""


def pack_bsr_blocks(data: np.ndarray) -> np.ndarray:
    """int8 BSR blocks [nnzb, 16, 64] (rows = outputs, columns = inputs) -> int8 [nnzb, 16 quads, 16 outputs, 4]:
    each block the B tile `tdpbssd` reads, 1 KB."""
    if data.ndim != 3 or tuple(data.shape[1:]) != QBSR_BLOCK:
        raise ValueError(f"bsr16x64 blocks are [nnzb, 16, 64], not {list(data.shape)}")
    quads = data.astype(np.int8).reshape(len(data), 16, 16, 4)  # block, output, quad, k
    return np.ascontiguousarray(quads.transpose(0, 2, 1, 3)).reshape(-1)


def qbsr_amx_source(m: int, k: int, n: int, nnzb: int, float_bias: bool = False, cores: int = 2) -> str:
    """TVMScript of out[M, N] = (a[M, K] @ W^T - off) * mult (+ bias) for int8 a and W in 16 x 64 blocks
    (`pack_bsr_blocks`; `indptr` [N/16 + 1] and `indices` (the block's K / 64) as to_bsr gives them), M >= 32.
    A task is one block row (16 outputs) x 32 rows of a (accumulator tiles tmm0-1); per stored block one B tile
    load (tmm6), two A loads (tmm4-5) and two `tdpbssd`, so zero blocks cost nothing. (64 rows a task, four
    accumulators and an A register loaded twice a block, ran 1.5-1.7x slower at 50-100% of the blocks: the second
    load waits for the product reading the register.) Tasks run the block rows of one row chunk in turn (its rows
    stay in cache); the last chunk overlaps the one before it. A block row with no stored block skips the tiles
    and stores the epilogue of zero."""
    if n % QBSR_BLOCK[0] or k % QBSR_BLOCK[1] or m < ROWS:
        raise ValueError(f"qbsr_amx needs M >= {ROWS}, N % 16 == 0, K % 64 == 0; got {m}x{k}x{n}")
    rows, nbr = ROWS, n // 16
    chunks = -(-m // rows)
    tasks = chunks * nbr
    workers = max(1, min(int(cores) or 1, tasks))
    nl = "\n" + " " * 20
    step = nl + "kb = indices[j]"
    step += nl + _intrin("tileloadd64", "T.int8(6)", "T.address_of(wb[j * 1024])", "T.int64(64)")
    for c in range(2):  # accumulator c: rows r0 + 16c .. r0 + 16c + 15, their activation tile in tmm4 + c
        tile = f"T.address_of(a[(r0 + {16 * c}) * {k} + kb * {KSTEP}])"
        step += nl + _intrin("tileloadd64", f"T.int8({4 + c})", tile, f"T.int64({k})")
        step += nl + _intrin("tdpbssd", f"T.int8({c})", f"T.int8({4 + c})", "T.int8(6)")
    nl = "\n" + " " * 16
    zero = "".join(nl + _intrin("tilezero", f"T.int8({c})") for c in range(2))
    store = "".join(nl + _intrin("tilestored64", f"T.int8({c})", f"T.address_of(acc[{c * 256}])", "T.int64(64)")
                    for c in range(2))
    cols = "T.ramp(p * 16, 1, 16)"
    value = f'T.Cast("float32x16", acc[T.ramp(i * 16, 1, 16)] - off[{cols}]) * mult[{cols}]'
    bias_arg = f' bias: T.Buffer(({n},), "float32"),' if float_bias else ""
    if float_bias:
        value += f" + bias[{cols}]"
    empty = value.replace("acc[T.ramp(i * 16, 1, 16)]", "T.Broadcast(T.int32(0), 16)")
    return f"""
@T.prim_func(private=True)
def {KERNEL_PREFIX}_bsr(a: T.Buffer(({m * k},), "int8"), wb: T.Buffer(({nnzb * 1024},), "int8"),
              indices: T.Buffer(({nnzb},), "int32"), indptr: T.Buffer(({nbr + 1},), "int32"),
              cfg: T.Buffer((64,), "uint8"), off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),
             {bias_arg} out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
{_permission()}
    for w in T.parallel({workers}):
        acc = T.decl_buffer(({rows * 16},), "int32", scope="global")
        {_intrin('ldtilecfg', 'T.address_of(cfg[0])')}
        for t in T.serial(w * {tasks} // {workers}, (w + 1) * {tasks} // {workers}):
            r0 = T.min((t // {nbr}) * {rows}, {m - rows})
            p = t % {nbr}
            if indptr[p] < indptr[p + 1]:{zero}
                for j in T.serial(indptr[p], indptr[p + 1]):{step}{store}
                for i in T.serial({rows}):
                    out[T.ramp((r0 + i) * {n} + p * 16, 1, 16)] = {value}
            else:  # a block row with no stored block: its outputs are the epilogue of zero
                for i in T.serial({rows}):
                    out[T.ramp((r0 + i) * {n} + p * 16, 1, 16)] = {empty}
        {_intrin('tilerelease')}
"""


def amx_qbmm_step(k: int) -> int:
    """The reduction step (bytes of an A tile row) of the attention matmul on tiles: 32 or 64 where K is 32 or
    whole 64s (attention's head widths), else 0 (no tile form; a's row sums go 32 bytes at a time)."""
    return k if k in (32, KSTEP) else (KSTEP if k % KSTEP == 0 else 0)


def amx_qbmm_applies(m: int, k: int, n: int) -> bool:
    """A 32-row block of a at least, whole 32-column blocks of b and a reduction step (`amx_qbmm_step`)."""
    return m >= ROWS and n % COLS == 0 and amx_qbmm_step(k) > 0


def qbmm_amx_source(bt: int, m: int, k: int, n: int, cores: int = 2) -> str:
    """out[b] = ((a[b] - za) @ (b[b] - zb)) * scale for int8 a [B, M, K], b [B, K, N] known only at run time
    (attention's scores and outputs), float32 out, on AMX tiles: `int8.qbmm_source`'s task on 32 x 32 blocks.
    A task is one batch's run of 32-row blocks; its first packs the batch's b as B tiles (16 columns x 4 inputs a
    64-byte row, the layout the VNNI kernel packs) and each column's sum, then every block runs `tdpbssd` over
    a's rows read in place (signed x signed) and stores (acc - zb * rowsum(a) - za * colsum(b) + K za zb) *
    scale, exact in int32. `tile_config(amx_qbmm_step(K))`."""
    from graphopt.targets.tvm.cpu.int8 import quad_dot
    step = amx_qbmm_step(k)
    if not amx_qbmm_applies(m, k, n):
        raise ValueError(f"qbmm_amx needs M >= {ROWS}, N % {COLS} == 0 and K = 32 or K % 64 == 0; "
                         f"got {m}x{k}x{n}")
    k4, npn, mb = k // 4, n // 16, -(-m // ROWS)
    tasks = bt * mb
    workers = max(1, min(int(cores) or 1, tasks))
    order = [j * 16 + c for c in range(16) for j in range(4)]
    rows = ", ".join(f"b[T.ramp((bi * {k} + 4 * q + {j}) * {n} + pn * 16, 1, 16)]" for j in range(4))
    ones_u8 = "T.broadcast(T.uint8(1), 32)"
    cs8 = "cs[T.ramp(pn * 16 + {h}, 1, 8)]"
    packed = lambda h: f'T.reinterpret("int8x32", bq[T.ramp((pn * {k4} + q) * 16 + {h * 8}, 1, 8)])'  # noqa: E731
    colsum = "".join(f"""
                        {cs8.format(h=h * 8)} = {quad_dot(cs8.format(h=h * 8), ones_u8, packed(h), "vnni")}"""
                     for h in range(2))
    a_u8 = (f'T.bitwise_xor(T.reinterpret("uint8x32", a[T.ramp((bi * {m} + r0 + i) * {k} + q * 32, 1, 32)]), '
            f'T.broadcast(T.uint8(128), 32))')  # 32 bytes of a row + 128
    ones_s8 = 'T.reinterpret("int8x32", T.broadcast(T.int32(16843009), 8))'
    a_tile = [f"T.address_of(a[(bi * {m} + r0 + {16 * h}) * {k} + kk * {step}])" for h in range(2)]
    b_tile = [f"T.address_of(bq[((p0 + {j}) * {k4} + kk * {step // 4}) * 16])" for j in range(2)]
    zero, body, store = _block(a_tile, str(k), b_tile, "64")
    body = body.replace("\n" + " " * 16, "\n" + " " * 20)
    zero = zero.replace("\n" + " " * 12, "\n" + " " * 16)
    store = store.replace("\n" + " " * 12, "\n" + " " * 16)
    cols = "T.ramp(p0 * 16 + h * 16, 1, 16)"
    return f"""
@T.prim_func(private=True)
def {KERNEL_PREFIX}_qbmm(a: T.Buffer(({bt * m * k},), "int8"), b: T.Buffer(({bt * k * n},), "int8"),
              cfg: T.Buffer((64,), "uint8"), zp: T.Buffer((2,), "int32"), scale: T.Buffer((1,), "float32"),
              out: T.Buffer(({bt * m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
{_permission()}
    for w in T.parallel({workers}):
        acc = T.decl_buffer(({ROWS * COLS},), "int32", scope="global")
        bq = T.decl_buffer(({npn * k4 * 16},), "int32", scope="global")
        cs = T.decl_buffer(({n},), "int32", scope="global")
        rs = T.decl_buffer(({ROWS},), "int32", scope="global")
        rv = T.decl_buffer((8,), "int32", scope="global")
        {_intrin('ldtilecfg', 'T.address_of(cfg[0])')}
        for t in T.serial(w * {tasks} // {workers}, (w + 1) * {tasks} // {workers}):
            bi = t // {mb}
            if T.Or(t == w * {tasks} // {workers}, t % {mb} == 0):  # this batch's b as B tiles, and its column sums
                for pn in T.serial({npn}):
                    for h in T.unroll(2):
                        {cs8.format(h="h * 8")} = T.broadcast(T.int32(0), 8)
                    for q in T.serial({k4}):
                        bq[T.ramp((pn * {k4} + q) * 16, 1, 16)] = T.reinterpret("int32x16", T.Shuffle([{rows}],
                                                                                                     {order})){colsum}
                    for h in T.unroll(2):  # za colsum(b) - K zb (za + 128): the column part, rowsum(a + 128) below
                        {cs8.format(h="h * 8")} = ({cs8.format(h="h * 8")} * T.broadcast(zp[0], 8)
                                                     - T.broadcast({k} * zp[1] * (zp[0] + 128), 8))
            r0 = T.min((t % {mb}) * {ROWS}, {m - ROWS})
            for i in T.serial({ROWS}):
                rv[T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                for q in T.serial({k // 32}):
                    rv[T.ramp(0, 1, 8)] = {quad_dot('rv[T.ramp(0, 1, 8)]', a_u8, ones_s8, 'vnni')}
                rs[i] = (rv[0] + rv[1] + rv[2] + rv[3] + rv[4] + rv[5] + rv[6] + rv[7]) * zp[1]
            for pb in T.serial({npn // 2}):
                p0 = pb * 2{zero}
                for kk in T.serial({k // step}):{body}{store}
                for i in T.serial({ROWS}):
                    for h in T.unroll(2):
                        out[T.ramp((bi * {m} + r0 + i) * {n} + p0 * 16 + h * 16, 1, 16)] = T.Cast("float32x16",
                            acc[T.ramp(i * 32 + h * 16, 1, 16)] - T.broadcast(rs[i], 16) - cs[{cols}]) * T.broadcast(
                            scale[0], 16)
        {_intrin('tilerelease')}
"""
