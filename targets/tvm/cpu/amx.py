"""int8 GEMM on AMX tiles (Intel Sapphire Rapids and later: AMX-INT8, `tdpbssd`).

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
are padded), N and K are padded to 32 and 64 (zero weights).

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


def tile_config() -> np.ndarray:
    """`ldtilecfg`'s 64 bytes: palette 1, tiles 0-7 of 16 rows x 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:] = KSTEP
    cfg[48:56] = 16
    return cfg


def amx_qlinear_applies(m: int, k: int) -> bool:
    """Rows enough to fill half a block at least (fewer take the quad GEMV / GEMM) and a whole reduction step."""
    return m >= 16 and k >= KSTEP


def padded_shape(m: int, k: int, n: int) -> tuple[int, int, int]:
    """The kernel's (M, K, N): rows to one block at least, K to whole steps, N to whole 32-column blocks."""
    return max(m, ROWS), -(-k // KSTEP) * KSTEP, -(-n // COLS) * COLS


def _intrin(name: str, *args: str) -> str:
    return f'T.evaluate(T.call_llvm_intrin("void", "llvm.x86.{name}"{"".join(", " + a for a in args)}))'


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
    step = "".join(f"\n                {_intrin('tileloadd64', f'T.int8({4 + h})', a_tile[h], f'T.int64({k})')}"
                   for h in range(2))
    step += "".join(f"\n                {_intrin('tileloadd64', f'T.int8({6 + j})', b_tile[j], 'T.int64(64)')}"
                    for j in range(2))
    step += "".join(f"\n                {_intrin('tdpbssd', f'T.int8({c})', f'T.int8({4 + c // 2})', f'T.int8({6 + c % 2})')}"
                    for c in range(4))
    zero = "".join(f"\n            {_intrin('tilezero', f'T.int8({c})')}" for c in range(4))
    store = "".join(f"\n            {_intrin('tilestored64', f'T.int8({c})', f'T.address_of(acc[{(c // 2) * 512 + (c % 2) * 16}])', 'T.int64(128)')}"
                    for c in range(4))
    cols = "T.ramp(p0 * 16 + h * 16, 1, 16)"
    value = f'T.Cast("float32x16", acc[T.ramp(i * 32 + h * 16, 1, 16)] - off[{cols}]) * mult[{cols}]'
    if float_bias:
        value += f" + bias[{cols}]"
    return f"""
@T.prim_func(private=True)
def {KERNEL_PREFIX}(a: T.Buffer(({m * k},), "int8"), wp: T.Buffer(({n * k},), "int8"), cfg: T.Buffer((64,), "uint8"),
              off: T.Buffer(({n},), "int32"), mult: T.Buffer(({n},), "float32"),{' bias: T.Buffer((' + str(n) + ',), "float32"),' if float_bias else ''}
              out: T.Buffer(({m * n},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    assert T.call_extern("int64", "syscall", T.int64({SYS_ARCH_PRCTL}), T.int64({ARCH_REQ_XCOMP_PERM}), T.int64({XFEATURE_XTILEDATA})) == T.int64(0), "the OS refused this process AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM); compile with GRAPHOPT_AMX=0 for this machine"
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
