"""Vectorizable float32 math the pipeline's FastMathTransform lacks: log and log1p (softplus, Mish, log-probability
heads), sin and cos (positional encodings, NeRF's Fourier features, SIREN). TVM legalizes `log` to libm's logf, one
scalar call per element: 400 us for 96x56x56 floats, 1.2x PyTorch's time, and softplus (log1p(exp(x))) 2.4x; sin
over 4096x64 floats took 1220 us, 5x PyTorch's. Here log is the exponent and a polynomial of the mantissa, sin and
cos a reduction by multiples of pi / 2 and two polynomials, in plain arithmetic, bit operations and selects, which
LLVM vectorizes like any elementwise loop."""
from __future__ import annotations

# log(1 + f) - f + f^2 / 2 = f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1], P's coefficients highest power first
# (a minimax fit with relative error ~1e-7 over the range, the classic single-precision one)
_LOG_P = (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
          -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1)
# ln 2 split in a part with few mantissa bits (e * _LN2_HI is exact for |e| < 2^10) and the rest
_LN2_HI, _LN2_LO = 0.693359375, -2.12194440e-4
_SMALLEST_NORMAL = 1.17549435e-38


def log_expr(v):
    """log(v) for a float32 TIR expression: v = m 2^e with m in [sqrt(1/2), sqrt(2)), log v = e ln 2 + log m.
    Subnormals are scaled by 2^23 first; 0 -> -inf, negatives -> NaN, inf and NaN pass through (as logf)."""
    from tvm import tirx
    f32 = "float32"
    sub = v < tirx.const(_SMALLEST_NORMAL, f32)
    u = tirx.Select(sub, v * tirx.const(8388608.0, f32), v)
    bits = tirx.reinterpret("int32", u)
    e = tirx.shift_right(bits, tirx.const(23, "int32")) - tirx.Select(sub, tirx.const(150, "int32"),
                                                                      tirx.const(127, "int32"))
    m = tirx.reinterpret(f32, tirx.bitwise_or(tirx.bitwise_and(bits, tirx.const(0x007FFFFF, "int32")),
                                              tirx.const(0x3F800000, "int32")))
    big = m > tirx.const(1.4142135623730951, f32)
    m = tirx.Select(big, m * tirx.const(0.5, f32), m)
    ef = (e + tirx.Select(big, tirx.const(1, "int32"), tirx.const(0, "int32"))).astype(f32)
    r = _log1p_near_zero(m - tirx.const(1.0, f32), ef)
    inf, nan = tirx.const(float("inf"), f32), tirx.const(float("nan"), f32)
    r = tirx.Select(v == tirx.const(0.0, f32), -inf, tirx.Select(v < tirx.const(0.0, f32), nan, r))
    # (tirx.isnan: TVM's simplifier folds v != v to false)
    return tirx.Select(tirx.any(tirx.isnan(v), v == inf), v, r)


def _log1p_near_zero(f, ef=None):
    """log(1 + f) + ef ln 2 for f in [sqrt(1/2) - 1, sqrt(2) - 1]."""
    from tvm import tirx
    f32 = "float32"
    z = f * f
    p = tirx.const(_LOG_P[0], f32)
    for c in _LOG_P[1:]:
        p = p * f + tirx.const(c, f32)
    if ef is None:
        return f + (p * f * z - tirx.const(0.5, f32) * z)
    return f + (p * f * z + ef * tirx.const(_LN2_LO, f32) - tirx.const(0.5, f32) * z) + ef * tirx.const(_LN2_HI, f32)


def log1p_expr(v):
    """log(1 + v), accurate for small v: the polynomial of `log_expr` straight on v in [sqrt(1/2) - 1, sqrt(2) - 1]
    (where 1 + v would round v away), log(1 + v) outside. (The usual log(w) v / (w - 1) correction does not
    survive TVM's simplifier, which folds (v + 1) - 1 to v.)"""
    from tvm import tirx
    f32 = "float32"
    near = tirx.all(v > tirx.const(-0.2928932188134524, f32), v < tirx.const(0.41421356237309515, f32))
    return tirx.Select(near, _log1p_near_zero(v), log_expr(v + tirx.const(1.0, f32)))


def emit_log(bb, x, plus_one: bool = False):
    """log(x) (log1p with `plus_one`) of a float32 Relax tensor as one elementwise TE function."""
    from tvm import te, tirx
    fn = log1p_expr if plus_one else log_expr

    def compute(t):
        def element(*i):
            # bound once: the expressions read it a dozen times, and an exp Relax fuses in front would be
            # inlined into every read
            v = tirx.Var("v", "float32")
            return tirx.Let(v, t(*i), fn(v))
        return te.compute(t.shape, element, name="log1p" if plus_one else "log")
    return bb.emit_te(compute, x, primfunc_name_hint="vlog1p" if plus_one else "vlog")


# sin r = r + r^3 S(r^2), cos r = 1 - r^2 / 2 + r^4 C(r^2) on |r| <= pi / 4 (the classic single-precision minimax
# fits, highest power first); pi / 2 as fdlibm splits it in float64 (k * _PIO2_HI is exact for |k| < 2^20)
_SIN_P = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_P = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)
_PIO2_HI, _PIO2_LO = 1.57079632673412561417e+00, 6.07710050650619224932e-11


def sin_expr(v, cos: bool = False):
    """sin(v) (cos with `cos`) for a float32 TIR expression: k = round(v 2 / pi) and r = v - k pi / 2 in float64
    (pi / 2 in two parts), then +-sin r or +-cos r in float32 by the quadrant k (+ 1 for cos) mod 4. Within ~1.2e-7
    of libm's sinf for |v| up to ~1.6e6 (k < 2^20: the reduction exact to float32), and measured so up to 1e12;
    past that it may lose accuracy (no Payne-Hanek), the result stays in [-1, 1]. NaN and +-inf give NaN, as
    sinf."""
    from tvm import tirx
    f32, f64 = "float32", "float64"
    c = lambda x: tirx.const(x, f32)  # noqa: E731
    d = lambda x: tirx.const(x, f64)  # noqa: E731
    vd = v.astype(f64)
    kd = tirx.call_llvm_pure_intrin(f64, "llvm.nearbyint", vd * d(0.63661977236758134308))
    r = ((vd - kd * d(_PIO2_HI)) - kd * d(_PIO2_LO)).astype(f32)
    r = tirx.max(tirx.min(r, c(0.7854)), c(-0.7854))  # (bounded where the reduction is no longer exact)
    z = r * r
    ps, pc = c(_SIN_P[0]), c(_COS_P[0])
    for a, b in zip(_SIN_P[1:], _COS_P[1:]):
        ps, pc = ps * z + c(a), pc * z + c(b)
    sin_r = r + r * z * ps
    cos_r = c(1.0) - c(0.5) * z + z * z * pc
    quadrant = kd - d(4.0) * tirx.floor(kd * d(0.25))  # (k mod 4 in float64: k itself may pass int32)
    q = quadrant.astype("int32") + tirx.const(1 if cos else 0, "int32")
    odd = tirx.bitwise_and(q, tirx.const(1, "int32")) == tirx.const(1, "int32")
    y = tirx.Select(odd, cos_r, sin_r)
    y = tirx.Select(tirx.bitwise_and(q, tirx.const(2, "int32")) == tirx.const(2, "int32"), -y, y)
    bad = tirx.any(tirx.isnan(v), v == c(float("inf")), v == c(float("-inf")))
    return tirx.Select(bad, c(float("nan")), y)


def emit_sin(bb, x, cos: bool = False):
    """sin(x) (cos with `cos`) of a float32 Relax tensor as one elementwise TE function."""
    from tvm import te, tirx

    def compute(t):
        def element(*i):
            v = tirx.Var("v", "float32")
            return tirx.Let(v, t(*i), sin_expr(v, cos))
        return te.compute(t.shape, element, name="cos" if cos else "sin")
    return bb.emit_te(compute, x, primfunc_name_hint="vcos" if cos else "vsin")
