"""LSTM and GRU layers: the input projections of every step as one packed GEMM, then the recurrence in one kernel.

Decomposed (core ATen's unrolled form, which the compiler ran before), a 50-step LSTM layer was 50 copies of a
step: a GEMV of the recurrent weight, the slice of that step's input projection, the add, the split into gates,
two fused elementwise kernels, and the VM's allocations and tuple plumbing between them -- ~12 us a step for a
256-unit layer (Zen 4, 2 threads), 49 distinct per-step kernels in the library, 1.26x ONNX Runtime's time.

Here a layer is two calls:
- xg = x W_ih^T + biases for all T steps and directions at once (`gemm.emit_packed_linear`), its rows permuted
  so that each block of U = 16 hidden units has its G gates' pre-activations together: xg [T, N, D, UB, G, U];
- the recurrence kernel: for each step, tasks over the unit blocks of every direction (a bidirectional layer's
  second direction runs the steps backwards in the same parallel loop; split over the threads) compute the
  block's G x U gate sums h_{t-1} W_hh^T (the packed weight wp [D, UB, H, G, U]: per input unit, the block's
  G x U weights are one contiguous 64-float run for an LSTM) on top of xg, then the gates (sigmoid / tanh by TVM's
  fast_exp polynomial, tanh x = 2 sigmoid(2 x) - 1) and the cell update in registers, and store h_t (into the other
  half of a double buffer, since other tasks still read h_{t-1}) and y[t]. The cell state of a block belongs to its
  task; the step's end (the parallel loop's join) orders one step's writes before the next step's reads.
Padding units (H not a multiple of 16) have zero weights and biases, so their state stays zero.

Measured (Zen 4, 2 threads, batch 1, interleaved against the unrolled form): 2-layer 256-unit LSTM over 50 steps
(80 inputs) 1.22 -> 0.84 ms, ~6 us a step of which the 1 MB recurrent weight's stream from L2 is ~4.4; the same
GRU 1.00 -> 0.71 ms; a bidirectional 128-unit LSTM over 100 steps 1.01 -> 0.55 ms with a kernel per direction,
0.54 -> 0.39 ms with both directions in one (a later, faster phase). Compile reports against ONNX Runtime: 0.77-0.87x
/ 0.61-0.72x / 0.85-0.93x its time over two runs.

LSTM (PyTorch's gate order i, f, g, o): c = f c + i g, h = o tanh(c). GRU (r, z, n): n = tanh(x_n + r (W_hn h +
b_hn)), h = (1 - z) n + z h; b_hn stays inside the product, so it is the kernel's, not the GEMM's."""
from __future__ import annotations

import numpy as np

from graphopt.targets.tvm.cpu.norm import _exp_stmts
from graphopt.targets.tvm.cpu.parse import parse_kernel

U = 16  # hidden units per block: two 8-float vectors (one 16-float one on full-width AVX-512)
GATES = {"lstm": 4, "gru": 3}
MAX_BATCH = 8  # each batch row re-reads the block's recurrent weights; past this the decomposed GEMMs do better


def rnn_applies(kind: str, t: int, n: int, i: int, h: int) -> bool:
    """float32 LSTM / GRU layers with static sizes and a small batch take the fused kernels."""
    return kind in GATES and t >= 1 and 1 <= n <= MAX_BATCH and i >= 1 and h >= 1


def _ramp(base: str) -> str:
    return f"T.ramp({base}, 1, {U})"


def _sigmoid(at: str, pad: str, scale: float = 1.0) -> str:
    """at = sigmoid(scale * at), one U-float vector in place (exp by the fast_exp polynomial)."""
    src = f"{at} * T.broadcast(T.float32({-scale!r}), {U})"
    return _exp_stmts(at, src, pad, U) + f"""
{pad}{at} = T.broadcast(T.float32(1), {U}) / (T.broadcast(T.float32(1), {U}) + {at})"""


def _tanh(at: str, pad: str) -> str:
    """at = tanh(at) = 2 sigmoid(2 at) - 1."""
    return _sigmoid(at, pad, 2.0) + f"""
{pad}{at} = {at} * T.broadcast(T.float32(2), {U}) - T.broadcast(T.float32(1), {U})"""


def rnn_source(kind: str, t: int, n: int, h: int, dirs: int = 1) -> str:
    """TVMScript of one layer's recurrence, `dirs` directions (2: the second runs the steps backwards) in one
    parallel loop per step (see the module docstring). Buffers: xg [T, N, D, UB, G, U] (input projections with
    biases), wp [D, UB, H, G, U], h0 / c0 [D, N, HP] (initial states, zero-padded to HP = UB U units), bhn [D, HP]
    (GRU: the recurrent bias of n); outputs y [T, N, D, H] (PyTorch's output layout), hb [2, D, N, HP] (h double
    buffer: the last step's h is in half T % 2), cb [D, N, HP] (LSTM: the last cell state)."""
    g = GATES[kind]
    ub = -(-h // U)
    hp = ub * U
    gu = g * U
    state = dirs * n * hp
    pad = " " * 16
    acc = lambda k: _ramp(f"{k * U}")  # noqa: E731
    h_at = f"(d * {n} + b) * {hp} + u * {U}"
    y_store = f"y[((sd * {n} + b) * {dirs} + d) * {h} + u * {U} + v] = acc[{(g - 1) * U} + v]"
    if h % U:
        y_store = f"""if u * {U} + v < {h}:
                        {y_store}"""
    if kind == "lstm":
        gates = (_sigmoid(f"acc[{acc(0)}]", pad) + _sigmoid(f"acc[{acc(1)}]", pad) + _tanh(f"acc[{acc(2)}]", pad)
                 + _sigmoid(f"acc[{acc(3)}]", pad))
        update = f"""
{pad}cb[{_ramp(h_at)}] = acc[{acc(1)}] * cb[{_ramp(h_at)}] + acc[{acc(0)}] * acc[{acc(2)}]
{pad}acc[{acc(2)}] = cb[{_ramp(h_at)}]{_tanh(f"acc[{acc(2)}]", pad)}
{pad}acc[{acc(3)}] = acc[{acc(3)}] * acc[{acc(2)}]"""
        init_c = f"""
    for j in T.serial({state}):
        cb[j] = c0[j]"""
        n_extra = ""
    else:
        # n = tanh(x_n + r * (W_hn h + b_hn)): the recurrent part of n is kept apart from x_n until r is known
        gates = _sigmoid(f"acc[{acc(0)}]", pad) + _sigmoid(f"acc[{acc(1)}]", pad)
        bias_n = f"bhn[{_ramp(f'd * {hp} + u * {U}')}]"
        update = f"""
{pad}acc[{acc(2)}] = xn[{_ramp('0')}] + acc[{acc(0)}] * (acc[{acc(2)}] + {bias_n}){_tanh(f"acc[{acc(2)}]", pad)}
{pad}acc[{acc(2)}] = acc[{acc(2)}] + acc[{acc(1)}] * (hb[{_ramp(f'cur + {h_at}')}] - acc[{acc(2)}])"""
        init_c = ""
        n_extra = f"""
                xn = T.decl_buffer(({U},), "float32", scope="global")
                for v in T.vectorized({U}):
                    xn[v] = acc[{2 * U} + v]
                    acc[{2 * U} + v] = T.float32(0)"""
    c_args = (f'c0: T.Buffer(({state},), "float32"), ' if kind == "lstm" else
              f'bhn: T.Buffer(({dirs * hp},), "float32"), ')
    c_out = f', cb: T.Buffer(({state},), "float32")' if kind == "lstm" else ""
    return f"""
@T.prim_func(private=True)
def rnn(xg: T.Buffer(({t * n * dirs * ub * gu},), "float32"), wp: T.Buffer(({dirs * ub * h * gu},), "float32"),
        h0: T.Buffer(({state},), "float32"), {c_args}y: T.Buffer(({t * n * dirs * h},), "float32"),
        hb: T.Buffer(({2 * state},), "float32"){c_out}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    for j in T.serial({state}):
        hb[j] = h0[j]{init_c}
    for s in T.serial({t}):
        for du in T.parallel({dirs * ub}):
            d: T.let = du // {ub}
            u: T.let = du % {ub}
            sd: T.let = s + d * ({t - 1} - 2 * s)
            cur: T.let = (s % 2) * {state}
            nxt: T.let = ((s + 1) % 2) * {state}
            for b in T.serial({n}):
                acc = T.decl_buffer(({gu},), "float32", scope="global")
                t = T.decl_buffer(({U},), "float32", scope="global")
                n = T.decl_buffer(({U},), "float32", scope="global")
                for v in T.vectorized({gu}):
                    acc[v] = xg[(((sd * {n} + b) * {dirs} + d) * {ub} + u) * {gu} + v]{n_extra}
                for k in T.serial({h}):
                    for q in T.unroll({g}):
                        for v in T.vectorized({U}):
                            acc[q * {U} + v] = acc[q * {U} + v] + wp[(((d * {ub} + u) * {h} + k) * {g} + q) * {U}
                                                                     + v] * hb[cur + (d * {n} + b) * {hp} + k]
{gates}{update}
                hb[{_ramp(f'nxt + {h_at}')}] = acc[{acc(g - 1)}]
                for v in T.serial({U}):
                    {y_store}
"""


def _gate_rows(h: int, g: int) -> np.ndarray:
    """Row index into a [G H, ...] PyTorch gate-stacked weight for each row of the blocked layout [UB, G, U]
    (-1 for padding units)."""
    ub = -(-h // U)
    idx = np.full((ub, g, U), -1, np.int64)
    for blk in range(ub):
        for q in range(g):
            for v in range(U):
                if blk * U + v < h:
                    idx[blk, q, v] = q * h + blk * U + v
    return idx.reshape(-1)


def _take_rows(a: np.ndarray, rows: np.ndarray) -> np.ndarray:
    out = np.zeros((len(rows), *a.shape[1:]), np.float32)
    keep = rows >= 0
    out[keep] = a[rows[keep]]
    return out


def pack_recurrent(w_hh: np.ndarray, h: int, g: int) -> np.ndarray:
    """W_hh [G H, H] -> wp [UB, H, G, U] (the kernel's per-input-unit runs of G x U weights)."""
    ub = -(-h // U)
    blocked = _take_rows(w_hh, _gate_rows(h, g)).reshape(ub, g, U, h)
    return np.ascontiguousarray(blocked.transpose(0, 3, 1, 2)).reshape(-1)


def emit_rnn_layer(bb, kind: str, x, t: int, n: int, i: int, h: int, weights: list, h0, c0, lanes: int):
    """One layer on Relax values, every direction in one kernel: x [T, N, I], weights [(w_ih, w_hh, b_ih or None,
    b_hh or None)] per direction (the second runs backwards), h0 / c0 [D, N, H] (c0 None for a GRU). Returns
    (y [T, N, D H], h_T [D, N, H], c_T [D, N, H] or None)."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.gemm import emit_packed_linear
    g = GATES[kind]
    dirs = len(weights)
    ub = -(-h // U)
    hp = ub * U
    rows = _gate_rows(h, g)
    w_rows, b_rows, packed, b_hn = [], [], [], []
    for w_ih, w_hh, b_ih, b_hh in weights:
        zeros = np.zeros(g * h, np.float32)
        bias = (zeros if b_ih is None else b_ih.astype(np.float32)).copy()
        b_hh = zeros if b_hh is None else b_hh.astype(np.float32)
        if kind == "lstm":
            bias += b_hh
        else:  # r and z take both biases; n's recurrent bias stays inside r * (...)
            bias[:2 * h] += b_hh[:2 * h]
        w_rows.append(_take_rows(w_ih.astype(np.float32), rows))
        b_rows.append(_take_rows(bias[:, None], rows)[:, 0])
        packed.append(pack_recurrent(w_hh, h, g))
        b_hn.append(np.pad(b_hh[2 * h:], (0, hp - h)))
    w_all, b_all = np.concatenate(w_rows), np.concatenate(b_rows)
    x2 = bb.emit(relax.op.reshape(x, (t * n, i)))
    xg = emit_packed_linear(bb, x2, w_all, relax.const(b_all), (t * n, i), lanes)
    if xg is None:  # (one step of one row)
        xg = bb.emit(relax.op.linear(x2, relax.const(w_all), relax.const(b_all)))

    def padded(states):
        s = bb.emit(relax.op.reshape(states, (dirs, n, h)))
        if hp != h:
            s = bb.emit(relax.op.nn.pad(s, [0, 0, 0, 0, 0, hp - h]))
        return bb.emit(relax.op.reshape(s, (dirs * n * hp,)))

    args = [bb.emit(relax.op.reshape(xg, (t * n * dirs * ub * g * U,))), relax.const(np.concatenate(packed)),
            padded(h0)]
    outs = [relax.TensorType((t * n * dirs * h,), "float32"), relax.TensorType((2 * dirs * n * hp,), "float32")]
    if kind == "lstm":
        args.append(padded(c0))
        outs.append(relax.TensorType((dirs * n * hp,), "float32"))
    else:
        args.append(relax.const(np.concatenate(b_hn).astype(np.float32)))
    src = rnn_source(kind, t, n, h, dirs)
    gv = bb.add_func(parse_kernel(src), f"{kind}_{t}x{n}x{h}" + ("_bidirectional" if dirs == 2 else ""))
    res = bb.emit(relax.call_tir(gv, args, outs))
    y = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(res, 0)), (t, n, dirs * h)))

    def state(k: int, half: int):
        s = bb.emit(relax.op.reshape(bb.emit(relax.TupleGetItem(res, k)), (-1, dirs, n, hp)))
        s = bb.emit(relax.op.strided_slice(s, axes=[0, 3], begin=[half, 0], end=[half + 1, h]))
        return bb.emit(relax.op.reshape(s, (dirs, n, h)))

    return y, state(1, t % 2), state(2, 0) if kind == "lstm" else None
