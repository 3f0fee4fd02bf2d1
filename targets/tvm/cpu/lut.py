"""graphopt.lut on the CPU: an int8 -> int8 function as a 256-byte table (an activation function between two int8
grids, `passes/quant/tables.py`).

With AVX512-VBMI one `vpermi2b` looks up 64 codes in 128 table bytes (two 64-byte registers, chosen by the index's
bit 6, the byte by its low six bits): the codes as they are index table half [128, 256) for x >= 0 and, through
their sign bit, half [0, 128) for x < 0 (x & 0x7f = x + 128 there), so two lookups and a byte blend by the sign
make 64 outputs (not timed alone; whole models in the README). Without VBMI, a byte load per element."""
from __future__ import annotations

from graphopt.targets.tvm.cpu.parse import parse_kernel

BLOCK = 64  # codes per lookup
GROUP = 16  # blocks per parallel task


def lut_vbmi(target) -> bool:
    """Whether `target` has the byte permutes (AVX512-VBMI) the vector kernel uses."""
    from tvm.target import codegen
    try:
        return bool(codegen.llvm_cpu_has_features(["avx512vbmi", "avx512bw"], target))
    except Exception:
        return False


def lut_source(n: int, vbmi: bool) -> str:
    """TVMScript of y = table[x + 128] over n int8 codes."""
    if not vbmi or n < BLOCK:
        return f"""
@T.prim_func(private=True)
def lut_bytes(x: T.Buffer(({n},), "int8"), table: T.Buffer((256,), "int8"), y: T.Buffer(({n},), "int8")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for i in T.parallel({n}):
        y[i] = table[T.Cast("int32", x[i]) + 128]
"""
    blocks = -(-n // BLOCK)
    groups = -(-blocks // GROUP)
    at = f"T.ramp(T.min((g * {GROUP} + b) * {BLOCK}, {n - BLOCK}), 1, {BLOCK})"

    def half(lo: int) -> str:
        return (f'T.call_llvm_pure_intrin("int8x{BLOCK}", "llvm.x86.avx512.vpermi2var.qi.512", '
                f"table[T.ramp({lo}, 1, {BLOCK})], x[{at}], table[T.ramp({lo + BLOCK}, 1, {BLOCK})])")
    return f"""
@T.prim_func(private=True)
def lut_vbmi(x: T.Buffer(({n},), "int8"), table: T.Buffer((256,), "int8"), y: T.Buffer(({n},), "int8")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for g in T.parallel({groups}):
        for b in T.serial(T.min({GROUP}, {blocks} - g * {GROUP})):
            y[{at}] = T.Select(x[{at}] < T.broadcast(T.int8(0), {BLOCK}), {half(0)}, {half(128)})
"""


def emit_lut(bb, xq, table, shape, target):
    """graphopt.lut of the int8 Relax value `xq` (static `shape`) with the 256-byte Relax constant `table`."""
    from tvm import relax
    n = 1
    for d in shape:
        n *= int(d)
    vbmi = lut_vbmi(target)
    gv = bb.add_func(parse_kernel(lut_source(n, vbmi)), f"lut_{'vbmi' if vbmi and n >= BLOCK else 'bytes'}_{n}")
    flat = bb.emit(relax.op.reshape(xq, (n,)))
    y = bb.emit(relax.call_tir(gv, [flat, table], relax.TensorType((n,), "int8")))
    return bb.emit(relax.op.reshape(y, tuple(int(d) for d in shape)))
