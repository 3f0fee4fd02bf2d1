"""Batched matmuls of two activations (attention's scores and context) on small, odd-sized matrices.

c[b] = a[b] @ w[b] for a [B, M, K] and w [B, K, N] (or, `trans_b`, w given as its transpose [B, N, K]: attention's
keys, no transposed copy of them in between). Each task takes one batch and a chunk of its rows, stages that batch's
w as zero-padded panels wp[ceil(N/nr), K, nr] in a buffer of its own (TVM's workspace; gathering its columns for
`trans_b`: 4-5% over the plain kernel), and runs the register-blocked micro-kernel of the packed GEMM (gemm.py) over
panels x row tiles: a tile of mr x nr outputs summed over all of K. Rows that do not fill a tile get one smaller
tile, and the last panel's columns past N are computed on the zero padding and not stored, so no operand or result
is padded or cut in memory. Relax's matmul with the schedule rule needs register rows dividing M and a vector's
worth of columns dividing N; Swin's 49-token windows and ViT's 197 tokens ran it on zero-padded copies cut
afterwards (pads, a generic broadcast-and-pad copy and the cut: 3.8 ms of a 2-block Swin stage's 12). Where the rule
tiles the shape this kernel measured the same (MiniLM's 12 x 128 x 32 heads: 1.01x its time) and is not used.
"""
from __future__ import annotations

from graphopt.targets.tvm.cpu.parse import parse_kernel

MIN_TASKS = 8  # row chunks per batch until there are this many tasks (ViT: 3 heads of 197 rows)
STAGE_ALL_BYTES = 1 << 20  # a task's staged panels, all at once (a core's L2 here)
SPLIT_PANELS_TILES = 16  # row tiles up to which per-panel staging splits the panels over the tasks, not the rows


def bmm_tiles(n: int, lanes: int) -> tuple[int, int]:
    """(mr, nr): 6 rows x 2 vectors, as the packed GEMM; 8 x 1 vector where N fills under two vectors."""
    return (6, 2 * lanes) if n > lanes else (8, lanes)


def bmm_source(batch: int, m: int, k: int, n: int, mr: int, nr: int, trans_b: bool, alpha: float = 1.0) -> str:
    nt = -(-n // nr)
    tiles = -(-m // mr)
    # all panels staged once a task while they fit a core's L2; past that each panel right before its row tiles,
    # and fewer row chunks, each of which stages every panel again (4 x 256 x 2304 x 256: 8 tasks 91, 4 tasks 103
    # GMAC/s)
    per_panel = nt * nr * k * 4 > STAGE_ALL_BYTES
    chunks = max(1, min(tiles, -(-(MIN_TASKS // 2 if per_panel else MIN_TASKS) // batch)))
    # few rows and many panels (a 64-channel computed-weight conv over 56x56 pixels): tasks take ranges of panels
    # with every row instead, each panel staged once
    pchunks = max(1, min(nt, -(-MIN_TASKS // batch)))
    split = per_panel and tiles <= SPLIT_PANELS_TILES and pchunks > 1
    rows_per = -(-tiles // chunks) * mr
    chunks = -(-m // rows_per)
    last_rows = m - (chunks - 1) * rows_per
    tasks = pchunks if split else chunks
    w_shape = (batch, n, k) if trans_b else (batch, k, n)
    w_at = "w[bi, p * {nr} + v, kk]" if trans_b else "w[bi, kk, p * {nr} + v]"
    w_at = w_at.format(nr=nr) + ("" if alpha == 1.0 else f" * T.float32({alpha!r})")
    full = n // nr  # panels with every column inside N

    def stage(p0: str, count: int, guard: bool) -> str:
        if count == 0 or per_panel:
            return ""
        src = f"T.if_then_else(p * {nr} + v < {n}, {w_at}, T.float32(0))" if guard else w_at
        return f"""
        for pp in T.serial({count}):
            for kk in T.serial({k}):
                for v in T.vectorized({nr}):
                    p: T.let = {p0} + pp
                    wp[p, kk, v] = {src}"""

    def stage_panel(p: str, guard: bool, indent: str) -> str:
        """Panel p alone into wp[0] (`per_panel`), right before the row tiles that read it."""
        src = (f"T.if_then_else({p} * {nr} + v < {n}, {w_at}, T.float32(0))" if guard else w_at).replace(
            "p * ", f"{p} * ")
        return f"""
{indent}for kk in T.serial({k}):
{indent}    for v in T.vectorized({nr}):
{indent}        wp[0, kk, v] = {src}"""

    names = iter(range(1 << 30))

    def tile(rows: int, r0: str, p: str, cols: int, indent: str) -> str:
        acc = f"acc{next(names)}"  # one name per tile: two tiles may share a scope (TVMScript refuses a redefinition)
        store = (f"""
{indent}    for v in T.vectorized({nr}):
{indent}        c[bi, {r0} + i, {p} * {nr} + v] = {acc}[i, v]""" if cols == nr else f"""
{indent}    for v in T.serial({cols}):
{indent}        c[bi, {r0} + i, {p} * {nr} + v] = {acc}[i, v]""")
        return f"""
{indent}{acc} = T.decl_buffer(({rows}, {nr}), "float32", scope="global")
{indent}for i in T.unroll({rows}):
{indent}    for v in T.vectorized({nr}):
{indent}        {acc}[i, v] = T.float32(0)
{indent}for kk in T.serial({k}):
{indent}    for i in T.unroll({rows}):
{indent}        for v in T.vectorized({nr}):
{indent}            {acc}[i, v] = {acc}[i, v] + a[bi, {r0} + i, kk] * wp[{"0" if per_panel else p}, kk, v]
{indent}for i in T.unroll({rows}):{store}"""

    def rows_body(rows: int, indent: str) -> str:
        """The panels x row tiles of a chunk of `rows` rows starting at r0."""
        mt, rem = divmod(rows, mr)
        out = ""
        for p0, count, cols in ((0, full, nr), (full, nt - full, n - full * nr)):
            if count == 0:
                continue
            p = "p" if count > 1 else str(p0)
            inner = indent + "    " if count > 1 else indent
            body = stage_panel(p, p0 == full, inner) if per_panel else ""
            if mt:
                body += f"""
{inner}for ti in T.serial({mt}):""" + tile(mr, f"r0 + ti * {mr}", p, cols, inner + "    ")
            if rem:
                body += tile(rem, f"r0 + {mt * mr}", p, cols, inner)
            out += (f"""
{indent}for p in T.serial({p0}, {p0 + count}):""" if count > 1 else "") + body
        return out

    if split:  # every row of the batch, over this task's range of panels (the partial one with the last range)
        mt, rem = divmod(m, mr)
        per = -(-full // pchunks) if full else 0
        compute = ""
        if full:
            body = stage_panel("p", False, " " * 12)
            if mt:
                body += f"""
            for ti in T.serial({mt}):""" + tile(mr, f"ti * {mr}", "p", nr, " " * 16)
            if rem:
                body += tile(rem, str(mt * mr), "p", nr, " " * 12)
            compute += f"""
        for p in T.serial(T.min(pc * {per}, {full}), T.min(pc * {per} + {per}, {full})):{body}"""
        if nt > full:
            body = stage_panel(str(full), True, " " * 12)
            if mt:
                body += f"""
            for ti in T.serial({mt}):""" + tile(mr, f"ti * {mr}", str(full), n - full * nr, " " * 16)
            if rem:
                body += tile(rem, str(mt * mr), str(full), n - full * nr, " " * 12)
            compute += f"""
        if pc == {pchunks - 1}:{body}"""
    elif chunks == 1 or last_rows == rows_per:
        compute = rows_body(rows_per if chunks > 1 else m, "        ")
    else:
        compute = f"""
        if t % {chunks} < {chunks - 1}:{rows_body(rows_per, "            ")}
        else:{rows_body(last_rows, "            ")}"""
    return f"""
@T.prim_func(private=True)
def bmm(a: T.Buffer(({batch}, {m}, {k}), "float32"), w: T.Buffer({w_shape}, "float32"),
        c: T.Buffer(({batch}, {m}, {n}), "float32")):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for t in T.parallel({batch * tasks}):
        bi: T.let = t // {tasks}
        {"pc" if split else "r0"}: T.let = (t % {tasks}){"" if split else f" * {rows_per}"}
        wp = T.decl_buffer(({1 if per_panel else nt}, {k}, {nr}), "float32", scope="global"){stage("0", full, False)}{
            stage(str(full), nt - full, True)}{compute}
"""


def bmm_applies(batch: int, m: int, k: int, n: int, lanes: int, per_panel: bool = False) -> bool:
    """Right operands whose staged panels take at most 1 MB a task (a core's L2 here); with `per_panel`, whose one
    panel does (it is then staged right before its row tiles). Against Relax's matmul on padded operands (SDPA, 2
    threads, Zen 4): DETR's 8 x 850 x 32 heads 0.55x its time, ViT-B/384's 12 x 577 x 64 0.54x, 16 x 1025 x 64
    (262 KB staged) 0.55x, Whisper's 6 x 1500 x 64 (384 KB) 0.91x."""
    mr, nr = bmm_tiles(n, lanes)
    staged = nr * k * 4 if per_panel else -(-n // nr) * nr * k * 4
    return m >= 1 and k >= 1 and n >= 1 and staged <= STAGE_ALL_BYTES


def bmm_beats_rule(k: int, n: int) -> bool:
    """Where the kernel beats Relax's matmul under the schedule rule even on shapes the rule tiles: large right
    operands (K N >= 2^17; 2 threads, Zen 4, GMAC/s kernel vs rule: 8 x 256 x 512 x 256 94 vs 84, 512^3 92 vs 70,
    StyleGAN2's 4 x 256 x 2304 x 256 94-103 vs 69-75); on smaller ones the rule is ahead (12 x 128 x 64 x 128 93
    vs 103, 4 x 64 x 1024 x 64 88 vs 98)."""
    return k * n >= 1 << 17


def emit_bmm(bb, a, w, batch: int, m: int, k: int, n: int, trans_b: bool, lanes: int, alpha: float = 1.0):
    """c = a @ (alpha w) (a [B, M, K]; w [B, K, N], or [B, N, K] with trans_b), Relax values, float32; alpha
    scales w as it is staged, each element rounded as PyTorch's own scaling of it."""
    from tvm import relax

    mr, nr = bmm_tiles(n, lanes)
    src = bmm_source(batch, m, k, n, mr, nr, trans_b, alpha)
    gv = bb.add_func(parse_kernel(src),
                     f"bmm_{batch}x{m}x{k}x{n}" + ("_bt" if trans_b else "") + ("_scaled" if alpha != 1.0 else ""))
    return bb.emit(relax.call_tir(gv, [a, w], relax.TensorType((batch, m, n), "float32")))

