"""Scaled dot-product attention in one float32 kernel: softmax(q k^T * scale + mask) v per batch and head, the
scores of a block of query rows kept in a buffer of the task's own (in L1 or L2) from their product to their use.

Decomposed (PyTorch's math form, which the compiler ran before), attention is five kernels and four tensors in
memory: the scores [B, H, L, S] written by one batched matmul, rewritten by the mask's add, read and written by the
softmax and read by the second matmul, plus the transposes of q, k and v into heads and of the result back. MiniLM
at 128 tokens spent 19% of its fp32 time there (Zen 4, 2 threads), at 512 tokens 32% (the scores 12 MB a layer).

Here a task takes one (batch, head) and a run of query-row blocks: it copies that head's keys transposed into
kt [E, S'] (S' = S in whole vectors; the columns past S score -inf), then for each block of R rows
- scores: tiles of 4 rows x 4 vectors of keys (2 with AVX2's 16 registers) accumulate q[r, e] (broadcast) *
  kt[e, :] over E, scaled, plus the additive mask (a boolean mask comes as 0 / -inf), -inf above the diagonal
  when causal;
- softmax per row in place: the max, exp(s - max) by TVM's fast_exp polynomial (norm.py) and the sum, kept as
  1 / sum; a row that is -inf everywhere (every key masked) gives zeros, as PyTorch's SDPA does;
- out: tiles of 4 rows x up to 4 vectors of the value width accumulate p[r, s] (broadcast) * v[s, :] over S, then
  scale by 1 / sum as they are stored.
q, k, v and out are read and written through (batch, head, row) strides, so the heads of a [B, L, H * E] linear
output are read where they are (no transposed copy) and the result can be written as [B, L, H, Ev], the layout the
output projection reads."""
from __future__ import annotations

from graphopt.targets.tvm.cpu.norm import _exp_stmts, _vconst, mask_elements
from graphopt.targets.tvm.cpu.parse import parse_kernel

MR = 4  # query rows of a register tile
MIN_TASKS = 8  # row chunks per head until there are this many tasks
SCORES_BYTES = 32 * 1024  # a block's scores (R rows x S' floats) stay within this where S allows 4 rows
KEYS_BYTES = 1 << 20  # a head's transposed keys (E x S' floats) at most this (a core's L2 here)


def attention_applies(l: int, s: int, e: int, ev: int, lanes: int) -> bool:
    """Shapes the kernel takes: value widths in whole vectors, a head's transposed keys within KEYS_BYTES."""
    sp = -(-s // lanes) * lanes
    return min(l, s, e, ev) >= 1 and ev % lanes == 0 and e * sp * 4 <= KEYS_BYTES


def attention_plan(bh: int, l: int, s: int, lanes: int) -> tuple[int, int, int, int]:
    """(rows per block R, register tile rows, row blocks, chunks of blocks per head). R: a multiple of the tile's
    rows with R x S' floats within SCORES_BYTES (at least one tile), at most L; the last block starts at L - R
    (overlapping the one before, its rows computed twice and stored alike). Heads are split into chunks of blocks
    until there are MIN_TASKS tasks (each chunk copies the head's keys once)."""
    sp = -(-s // lanes) * lanes
    mr = min(MR, l)
    r = max(mr, min(l, SCORES_BYTES // (4 * sp)) // mr * mr)
    blocks = -(-l // r)
    chunks = max(1, min(blocks, -(-MIN_TASKS // bh)))
    return r, mr, blocks, chunks


def _value_panel(ev: int, lanes: int, regs: int) -> int:
    """Vectors of the value width a register tile holds: MR rows x that many accumulators leave room for the
    loads (regs: the target's vector registers, 16 with AVX2, 32 with AVX-512)."""
    most = 4 if regs >= 32 else 3
    n = ev // lanes
    return max(d for d in range(1, most + 1) if n % d == 0)


def attention_source(b: int, h: int, l: int, s: int, e: int, ev: int, strides: dict, scale: float,
                     mask: tuple[int, int, int] | None, causal: bool, lanes: int = 8, regs: int = 32) -> str:
    """TVMScript of the fused kernel (see the module's docstring). `strides`: for "q", "k", "v" and "out", the
    (batch, head, row) strides of flat buffers whose last axis (E or Ev) is contiguous; `mask`: the additive
    mask's (batch, head, query row) strides (0 where it broadcasts; its key axis contiguous, S long) or None."""
    sp = -(-s // lanes) * lanes
    nr = (4 if regs >= 32 else 2) * lanes  # a score tile's columns: 4 x 4 (2) vectors of accumulators
    r, mr, blocks, chunks = attention_plan(b * h, l, s, lanes)
    w = _value_panel(ev, lanes, regs) * lanes
    # the operands' sizes: strides permute (batch, head, row) within them, never reach past them
    sizes = {"q": b * h * l * e, "k": b * h * s * e, "v": b * h * s * ev, "out": b * h * l * ev}

    def at(name: str, row: str, col: str) -> str:
        sb, sh, sr = strides[name]
        return f"{name}[bi * {sb} + hi * {sh} + ({row}) * {sr} + {col}]"

    ninf = 'T.float32("-inf")'
    # every tile loops over whole vectors of `lanes` (cv / vv), never one vector as wide as the tile: LLVM split a
    # 24-float vector (MobileViT's head width) into pieces and ran the kernel at 0.48x the speed of 8-float ones
    row_at, col_at = f"r0 + rt * {mr} + i", f"c0 + cv * {lanes} + c"
    score = f"acc[i, cv * {lanes} + c] * T.float32({scale!r})"
    mask_arg = ""
    if mask is not None:
        mb, mh, ml = mask
        score += f" + bias[bi * {mb} + hi * {mh} + ({row_at}) * {ml} + {col_at}]"
        mask_arg = f' bias: T.Buffer(({mask_elements(b, h, l, s, mask)},), "float32"),'
    if causal:  # PyTorch's is_causal: key j is seen by query i where j <= i
        score = f"T.Select({col_at} <= {row_at}, {score}, {ninf})"

    def score_tiles(c0: str, width: int, pad: str) -> str:
        """Tiles of mr rows x `width` key columns from column c0 (over the block's rows), stored scaled and
        masked; columns at or past S (only in the last, narrower panel) score -inf, the mask not read there."""
        nv = width // lanes
        store = f"""
{pad}    for i in T.unroll({mr}):
{pad}        for cv in T.unroll({nv}):
{pad}            for c in T.vectorized({lanes}):
{pad}                sc[(rt * {mr} + i) * {sp} + {col_at}] = {score}"""
        if c0 != "c0" and int(c0) + width > s:
            store = f"""
{pad}    for i in T.unroll({mr}):
{pad}        for cv in T.serial({nv}):
{pad}            for c in T.serial({lanes}):
{pad}                if {col_at} < {s}:
{pad}                    sc[(rt * {mr} + i) * {sp} + {col_at}] = {score}
{pad}                else:
{pad}                    sc[(rt * {mr} + i) * {sp} + {col_at}] = {ninf}"""
        head = "" if c0 == "c0" else f"""
{pad}c0: T.let = {c0}"""
        return head + f"""
{pad}for rt in T.serial({r // mr}):
{pad}    acc = T.decl_buffer(({mr}, {width}), "float32", scope="global")
{pad}    for i in T.unroll({mr}):
{pad}        for cv in T.unroll({nv}):
{pad}            for c in T.vectorized({lanes}):
{pad}                acc[i, cv * {lanes} + c] = T.float32(0)
{pad}    for ee in T.serial({e}):
{pad}        for i in T.unroll({mr}):
{pad}            for cv in T.unroll({nv}):
{pad}                for c in T.vectorized({lanes}):
{pad}                    acc[i, cv * {lanes} + c] = acc[i, cv * {lanes} + c] + {at("q", row_at, "ee")} * kt[
{pad}                        ee * {sp} + {col_at}]{store}"""

    full = s // nr  # panels of nr columns inside S; the rest (whole vectors, < nr) one narrower panel
    scores = ""
    if full:
        scores += f"""
            for p in T.serial({full}):
                c0: T.let = p * {nr}""" + score_tiles("c0", nr, " " * 16)
    if sp > full * nr:
        scores += score_tiles(str(full * nr), sp - full * nr, " " * 12)
    lane = f"T.ramp(0, 1, {lanes})"
    row = f"T.ramp(i * {sp} + j * {lanes}, 1, {lanes})"
    exp = _exp_stmts(f"sc[{row}]", f"sc[{row}] - T.broadcast(stat[0], {lanes})", " " * 20, lanes)
    softmax = f"""
            for i in T.serial({r}):
                mx[{lane}] = sc[T.ramp(i * {sp}, 1, {lanes})]
                for j in T.serial(1, {sp // lanes}):
                    mx[{lane}] = T.max(mx[{lane}], sc[{row}])
                stat[0] = mx[0]
                for u in T.serial(1, {lanes}):
                    stat[0] = T.max(stat[0], mx[u])
                if stat[0] < T.float32(-3.4028234663852886e38):
                    inv[i] = T.float32(0)
                    for j in T.serial({sp}):
                        sc[i * {sp} + j] = T.float32(0)
                else:
                    mx[{lane}] = {_vconst(0.0, lanes)}
                    for j in T.serial({sp // lanes}):{exp.replace(chr(10), chr(10) + "    ")}
                        mx[{lane}] = mx[{lane}] + sc[{row}]
                    stat[1] = T.float32(0)
                    for u in T.serial({lanes}):
                        stat[1] = stat[1] + mx[u]
                    inv[i] = T.float32(1) / stat[1]"""
    values = f"""
            for rt in T.serial({r // mr}):
                for vp in T.serial({ev // w}):
                    acc2 = T.decl_buffer(({mr}, {w}), "float32", scope="global")
                    for i in T.unroll({mr}):
                        for vv in T.unroll({w // lanes}):
                            for c in T.vectorized({lanes}):
                                acc2[i, vv * {lanes} + c] = T.float32(0)
                    for ss in T.serial({s}):
                        for i in T.unroll({mr}):
                            for vv in T.unroll({w // lanes}):
                                for c in T.vectorized({lanes}):
                                    acc2[i, vv * {lanes} + c] = acc2[i, vv * {lanes} + c] + sc[
                                        (rt * {mr} + i) * {sp} + ss] * {at("v", "ss", f"vp * {w} + vv * {lanes} + c")}
                    for i in T.unroll({mr}):
                        for vv in T.unroll({w // lanes}):
                            for c in T.vectorized({lanes}):
                                {at("out", f"r0 + rt * {mr} + i", f"vp * {w} + vv * {lanes} + c")} = acc2[
                                    i, vv * {lanes} + c] * inv[rt * {mr} + i]"""
    stage = f"""
        for ss in T.serial({s}):
            for ee in T.serial({e}):
                kt[ee * {sp} + ss] = {at("k", "ss", "ee")}"""
    if sp > s:
        stage += f"""
        for ss in T.serial({s}, {sp}):
            for ee in T.serial({e}):
                kt[ee * {sp} + ss] = T.float32(0)"""
    return f"""
@T.prim_func(private=True)
def attention(q: T.Buffer(({sizes["q"]},), "float32"), k: T.Buffer(({sizes["k"]},), "float32"),
              v: T.Buffer(({sizes["v"]},), "float32"),{mask_arg}
              out: T.Buffer(({sizes["out"]},), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}})
    for task in T.parallel({b * h * chunks}):
        bi: T.let = task // {chunks} // {h}
        hi: T.let = task // {chunks} % {h}
        kt = T.decl_buffer(({e * sp},), "float32", scope="global")
        sc = T.decl_buffer(({r * sp},), "float32", scope="global")
        inv = T.decl_buffer(({r},), "float32", scope="global")
        mx = T.decl_buffer(({lanes},), "float32", scope="global")
        t = T.decl_buffer(({lanes},), "float32", scope="global")
        n = T.decl_buffer(({lanes},), "float32", scope="global")
        stat = T.decl_buffer((2,), "float32", scope="global"){stage}
        for blk in T.serial((task % {chunks}) * {blocks} // {chunks}, (task % {chunks} + 1) * {blocks} // {chunks}):
            r0: T.let = T.min(blk * {r}, {l - r}){scores}{softmax}{values}
"""


def emit_attention(bb, q, k, v, bias, geometry: dict, lanes: int, regs: int):
    """The fused kernel on Relax values: q, k, v as their geometry's strides read them (each reshaped flat), bias
    the additive float32 mask or None; returns the output flat (the caller reshapes it to its layout).
    `geometry`: b, h, l, s, e, ev, scale, causal, strides (q, k, v, out) and mask strides (see
    `attention_source`)."""
    from tvm import relax
    g = geometry
    src = attention_source(g["b"], g["h"], g["l"], g["s"], g["e"], g["ev"], g["strides"], g["scale"],
                           g["mask"] if bias is not None else None, g["causal"], lanes, regs)
    name = (f"attention_{g['b'] * g['h']}x{g['l']}x{g['s']}x{g['e']}" + ("_masked" if bias is not None else "")
            + ("_causal" if g["causal"] else ""))
    gv = bb.add_func(parse_kernel(src), name)
    b, h, l, s, e, ev = (g[x] for x in ("b", "h", "l", "s", "e", "ev"))
    sizes = [b * h * l * e, b * h * s * e, b * h * s * ev]
    if bias is not None:
        sizes.append(mask_elements(b, h, l, s, g["mask"]))
    flat = [bb.emit(relax.op.reshape(t, (n,))) for t, n in zip([q, k, v, bias], sizes)]
    return bb.emit(relax.call_tir(gv, flat, relax.TensorType((g["b"] * g["h"] * g["l"] * g["ev"],), "float32")))
