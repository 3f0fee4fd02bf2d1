"""ONNX translations of graphopt's Q/DQ ops: standard QuantizeLinear / DequantizeLinear (the QDQ format ONNX
Runtime fuses into integer kernels)."""
from __future__ import annotations

import onnx
from onnxscript import opset18 as op

import graphopt.ir.quant_ops  # noqa: F401  the ops must exist before they can be looked up


def _int8_scalar(v: int, uint8: bool = False):
    kind = onnx.TensorProto.UINT8 if uint8 else onnx.TensorProto.INT8
    return op.Constant(value=onnx.helper.make_tensor("zp", kind, [], [int(v)]))


def _is_uint8(q) -> bool:
    """q holds uint8 codes (an imported ONNX Runtime table kept as stored: a quantize_dynamic model's Gather), so its
    zero point must be uint8 too (DequantizeLinear binds both to one type)."""
    return str(getattr(q, "dtype", "")).upper().endswith("UINT8")


def quantize_per_tensor(x, scale: float, zero_point: int, qmin: int, qmax: int, dtype):
    import torch
    return op.QuantizeLinear(x, op.Constant(value_float=float(scale)),
                             _int8_scalar(zero_point, dtype == torch.uint8))


def dequantize_per_tensor(q, scale: float, zero_point: int):
    return op.DequantizeLinear(q, op.Constant(value_float=float(scale)), _int8_scalar(zero_point, _is_uint8(q)))


def dequantize_per_channel(q, scales, zero_points, axis: int):
    kind = onnx.TensorProto.UINT8 if _is_uint8(q) else onnx.TensorProto.INT8
    return op.DequantizeLinear(q, scales, op.Cast(zero_points, to=kind), axis=axis)


def dynamic_quantize(x):
    """ONNX's own op for the per-call uint8 grid, then back to float (what an ORT quantize_dynamic model computes
    before each integer layer)."""
    q, scale, zp = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(q, scale, zp)


def lut(q, table):
    """table[q + 128] (an activation function between int8 grids): a Gather of the 256 table bytes."""
    idx = op.Add(op.Cast(q, to=onnx.TensorProto.INT32),
                 op.Constant(value=onnx.helper.make_tensor("c128", onnx.TensorProto.INT32, [], [128])))
    return op.Gather(table, idx, axis=0)


def translation_table() -> dict:
    import torch
    return {torch.ops.graphopt.lut.default: lut,
            torch.ops.graphopt.quantize_per_tensor.default: quantize_per_tensor,
            torch.ops.graphopt.dequantize_per_tensor.default: dequantize_per_tensor,
            torch.ops.graphopt.dequantize_per_channel.default: dequantize_per_channel,
            torch.ops.graphopt.dynamic_quantize.default: dynamic_quantize}


def _index(g: onnx.GraphProto) -> tuple[dict, dict, dict]:
    """A graph's initializers by name, each value's producing node, and each value's reading nodes."""
    inits = {i.name: i for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return inits, producer, users


def _drop_value_info(g: onnx.GraphProto, names: set[str]) -> None:
    """Forget the recorded shapes of values a rewrite reshaped or removed: ONNX Runtime trusts a stale one (a conv
    fed a tensor recorded at its padded size inferred a wrong output shape)."""
    for v in [v for v in g.value_info if v.name in names]:
        g.value_info.remove(v)


def _drop_unused_initializers(g: onnx.GraphProto, inits: dict) -> None:
    used = {i for n in g.node for i in n.input}
    for name in [i.name for i in g.initializer if i.name not in used]:
        g.initializer.remove(inits[name])


def fold_weight_transposes(model: onnx.ModelProto) -> int:
    """Store each int8 weight that the exporter dequantizes and then transposes (a linear's `x @ W.T` goes out as
    DequantizeLinear -> Transpose -> MatMul) already transposed, dequantized along the other axis, feeding the
    MatMul directly. ONNX Runtime fuses DequantizeLinear -> MatMul into one integer kernel, but not through a
    Transpose: an int8 MiniLM exported that way dequantized and transposed every weight on every call and ran 2.3x
    ORT's fp32 time. Returns how many weights it rewrote (in place)."""
    from onnx import numpy_helper

    g = model.graph
    inits, producer, users = _index(g)
    outputs = {o.name for o in g.output}
    dead, done, gone = [], 0, set()
    for t in g.node:
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        dq = producer.get(t.input[0]) if t.op_type == "Transpose" else None
        if dq is None or dq.op_type != "DequantizeLinear" or perm != [1, 0] or len(users[dq.output[0]]) != 1 \
                or dq.output[0] in outputs:
            continue
        if not all(i in inits for i in dq.input if i):
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale_shape = tuple(inits[dq.input[1]].dims)
        if q.ndim != 2 or (scale_shape not in ((), (1,)) and axis not in (0, -2)):
            continue  # (only 2-D weights, per tensor or per output channel along axis 0)
        name = f"{dq.input[0]}_t"
        if name not in inits:
            inits[name] = numpy_helper.from_array(q.T.copy(), name)
            g.initializer.append(inits[name])
        dq.input[0] = name
        del dq.attribute[:]
        dq.attribute.append(onnx.helper.make_attribute("axis", 1))
        gone.add(dq.output[0])
        dq.output[0] = t.output[0]  # (the Transpose's consumers now read the DequantizeLinear)
        dead.append(t)
        done += 1
    for t in dead:
        g.node.remove(t)
    _drop_value_info(g, gone)
    _drop_unused_initializers(g, inits)
    return done


def quantize_biases(model: onnx.ModelProto) -> int:
    """Give each int8 Conv / Gemm / MatMul(+Add) an int32 bias, dequantized with the product of its input's and its
    weight's scales (zero point 0), the form ONNX Runtime's QDQ fusions require: with a float bias a DQ/DQ -> Gemm
    or Conv is not fused (every operand must come from a DequantizeLinear) and runs in float, its weight dequantized
    on every call; an int8 MiniLM export ran 2.2x ORT's fp32 time, 0.65x with its biases quantized. The bias moves
    by at most half a unit of the accumulator's scale (input scale x weight scale). A bias whose quotient does not
    fit int32 stays float. Returns how many biases it rewrote (in place)."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits, producer, users = _index(g)

    def const_dq(name: str):
        dq = producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or not all(i in inits for i in dq.input[1:] if i):
            return None
        return dq

    def scale(dq) -> "np.ndarray":
        return numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)

    before: dict[int, list] = {}  # node index -> DequantizeLinear nodes to insert before it
    done = 0
    for idx, n in enumerate(g.node):
        if n.op_type in ("Conv", "Gemm") and len(n.input) == 3 and n.input[2] in inits:
            target, slot = n, 2
        elif n.op_type == "MatMul" and len(users.get(n.output[0], [])) == 1 \
                and users[n.output[0]][0].op_type == "Add":
            target = users[n.output[0]][0]
            slot = 1 if target.input[0] == n.output[0] else 0
            if target.input[slot] not in inits:
                continue
        else:
            continue
        a, w = const_dq(n.input[0]), const_dq(n.input[1])
        if a is None or w is None or w.input[0] not in inits or scale(a).size != 1:
            continue
        bias = numpy_helper.to_array(inits[target.input[slot]]).astype(np.float64)
        sw = scale(w)
        if bias.ndim != 1 or sw.size not in (1, bias.size):
            continue
        acc_scale = (scale(a).reshape(()) * np.broadcast_to(sw.reshape(-1), bias.shape)).astype(np.float32)
        if not (acc_scale > 0).all():
            continue
        q = np.round(bias / acc_scale.astype(np.float64))
        if np.abs(q).max(initial=0) >= 2 ** 31 - 1:
            continue
        name = target.input[slot]
        qn, sn, out = f"{name}_i32", f"{name}_i32_scale", f"{name}_dequantized"
        if qn in inits:  # (a bias shared by two layers with other scales: keep the first's, leave this one float)
            continue
        for t in (numpy_helper.from_array(q.astype(np.int32), qn), numpy_helper.from_array(acc_scale, sn)):
            inits[t.name] = t
            g.initializer.append(t)
        dq = onnx.helper.make_node("DequantizeLinear", [qn, sn], [out], name=f"{name}_DequantizeLinear", axis=0)
        at = next(k for k, m in enumerate(g.node) if m is target)
        before.setdefault(at, []).append(dq)
        target.input[slot] = out
        done += 1
    if before:
        nodes = [m for k, n in enumerate(g.node) for m in (*before.get(k, ()), n)]
        del g.node[:]
        g.node.extend(nodes)
    _drop_unused_initializers(g, inits)
    return done


def fold_pads_into_convs(model: onnx.ModelProto) -> int:
    """Fold each zero Pad of the spatial dims that reaches only Convs, directly or through one quantize /
    dequantize pair, into the Convs' `pads` (the exporter writes EfficientNet's TF "SAME" pads, which torch's conv
    cannot hold, as Pad ops). Exact: a zero pad quantizes to the zero point and dequantizes back to zero. Left in,
    each Pad ran in float between a ReLU6 and its Quantize, so neither the conv before (its ReLU6 no longer next to
    a Quantize) nor the one after fused into integer kernels: an int8 EfficientNet-Lite0 export ran 2.2x ORT's fp32
    time, 7 of its 28 ms in the Pads. Returns how many Pads it removed (in place)."""
    from onnx import numpy_helper

    g = model.graph
    inits, producer, users = _index(g)
    outputs = {o.name for o in g.output}

    def const(name: str):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        c = producer.get(name)
        if c is not None and c.op_type == "Constant" and c.attribute and c.attribute[0].name == "value":
            return numpy_helper.to_array(c.attribute[0].t)
        return None

    def convs_reached(name: str, through_q: bool):
        """The Convs (as data input) `name` feeds, through at most one Quantize -> Dequantize; None if anything
        else reads it."""
        got = []
        if name in outputs:
            return None
        for u in users.get(name, []):
            if u.op_type == "Conv" and u.input[0] == name and len(u.input) >= 2:
                got.append(u)
            elif through_q and u.op_type == "QuantizeLinear" and u.input[0] == name:
                for d in users.get(u.output[0], []):
                    if d.op_type != "DequantizeLinear" or u.output[0] in outputs:
                        return None
                    more = convs_reached(d.output[0], False)
                    if more is None:
                        return None
                    got += more
            else:
                return None
        return got

    dead, resized = [], set()
    for pad in g.node:
        if pad.op_type != "Pad" or len(pad.input) < 2:
            continue
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        pads = const(pad.input[1])
        value = const(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else 0
        axes = pad.input[3] if len(pad.input) > 3 else ""
        if mode != b"constant" or pads is None or value is None or axes or float(value) != 0.0:
            continue
        pads = [int(v) for v in pads.reshape(-1)]
        rank = len(pads) // 2
        if rank < 3 or any(pads[i] or pads[rank + i] for i in range(2)) or min(pads) < 0:
            continue
        convs = convs_reached(pad.output[0], True)
        if not convs or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET") for c in convs for a in c.attribute):
            continue
        spatial = rank - 2
        for c in convs:
            old = next((list(a.ints) for a in c.attribute if a.name == "pads"), [0] * (2 * spatial))
            new = [old[i] + pads[2 + i] for i in range(spatial)] + [old[spatial + i] + pads[rank + 2 + i]
                                                                  for i in range(spatial)]
            for a in list(c.attribute):
                if a.name == "pads":
                    c.attribute.remove(a)
            c.attribute.append(onnx.helper.make_attribute("pads", new))
        for u in users.get(pad.output[0], []):  # the Quantize (or the Convs) read the unpadded tensor
            for k, i in enumerate(u.input):
                if i == pad.output[0]:
                    u.input[k] = pad.input[0]
            if u.op_type == "QuantizeLinear":  # (its output and the dequantized one shrink)
                resized.add(u.output[0])
                resized.update(d.output[0] for d in users.get(u.output[0], []))
        dead.append(pad)
    for pad in dead:
        g.node.remove(pad)
    _drop_value_info(g, resized | {p.output[0] for p in dead})
    _drop_unused_initializers(g, inits)
    return len(dead)


def dynamic_matmuls_to_integer(model: onnx.ModelProto) -> int:
    """Write each MatMul (or Gemm without bias, alpha, beta or transposed input) of a dynamically quantized input
    (DynamicQuantizeLinear -> DequantizeLinear) and a constant int8 weight with zero zero points behind a
    DequantizeLinear in ONNX Runtime's own quantize_dynamic form: MatMulInteger of the codes and the int8 weight
    (zero point: the call's), Cast to float, Mul by the call's scale times the weight's scales. The same numbers
    by ONNX's definitions; ONNX Runtime fuses this form into DynamicQuantizeMatMul, while the dequantized form it
    ran in float at 1.9x the time (MiniLM). Only weights whose neighbours along the reduction pair within 128
    (int7, int8s: `quantize{weights=auto}` for target onnx) go this way: ONNX Runtime's u8 x s8 kernels add pairs
    of products in int16 on x86 CPUs without VNNI, and full-range int8 weights saturated them (a test layer off by
    21-30% of its range, as on ORT's own quantize_dynamic files). Those stay dequantized, which ORT runs in float
    for a MatMul but still fuses into its integer QGemm for a Gemm (the export names them:
    `ort_saturating_layers`). A Gemm's bias is added after. Returns the count."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = model.graph
    inits, producer, users = _index(g)
    outputs = {o.name for o in g.output}
    done, dead, nodes = 0, set(), list(g.node)
    for mm in nodes:
        if mm.op_type not in ("MatMul", "Gemm") or len(mm.input) != (2 if mm.op_type == "MatMul" else len(
                mm.input)) or len(mm.input) > 3:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in mm.attribute}
        if mm.op_type == "Gemm" and (attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                                     or attrs.get("beta", 1.0) != 1.0):
            continue
        xdq, wdq = producer.get(mm.input[0]), producer.get(mm.input[1])
        dql = producer.get(xdq.input[0]) if xdq is not None and xdq.op_type == "DequantizeLinear" else None
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or list(xdq.input) != list(dql.output) \
                or wdq is None or wdq.op_type != "DequantizeLinear" or not all(i in inits for i in wdq.input if i):
            continue
        q = numpy_helper.to_array(inits[wdq.input[0]])
        scale = numpy_helper.to_array(inits[wdq.input[1]]).astype(np.float32)
        zp = numpy_helper.to_array(inits[wdq.input[2]]) if len(wdq.input) > 2 and wdq.input[2] else np.zeros(1)
        axis = next((a.i for a in wdq.attribute if a.name == "axis"), 1) % 2 if q.ndim == 2 else None
        if q.dtype != np.int8 or q.ndim != 2 or np.any(zp != 0) or not _pairs_bounded_kn(q.T if not (
                mm.op_type == "Gemm" and attrs.get("transB", 0)) else q):
            continue
        transb = mm.op_type == "Gemm" and attrs.get("transB", 0)
        per_row = scale.ndim == 1 and scale.size > 1
        if per_row and axis != (0 if transb else 1):
            continue  # (scales along the reduction: not a per-output-channel weight)
        w = q.T.copy() if transb else q
        name = f"{wdq.input[0]}_kn" if transb else wdq.input[0]
        if name not in inits:
            inits[name] = numpy_helper.from_array(w, name)
            g.initializer.append(inits[name])
        sname = f"{mm.output[0]}_wscale"
        g.initializer.append(numpy_helper.from_array(scale.reshape(-1), sname))
        acc, accf, both = (f"{mm.output[0]}_{s}" for s in ("acc", "accf", "scale"))
        new = [helper.make_node("MatMulInteger", [dql.output[0], name, dql.output[2]], [acc],
                                name=f"{mm.name or mm.output[0]}_integer"),
               helper.make_node("Cast", [acc], [accf], to=onnx.TensorProto.FLOAT),
               helper.make_node("Mul", [dql.output[1], sname], [both]),
               helper.make_node("Mul", [accf, both], [mm.output[0]])]
        if len(mm.input) == 3 and mm.input[2]:  # Gemm's C (beta 1), added to the product
            new[-1].output[0] = f"{mm.output[0]}_product"
            new.append(helper.make_node("Add", [new[-1].output[0], mm.input[2]], [mm.output[0]]))
        at = list(g.node).index(mm)
        g.node.remove(mm)
        for k, n in enumerate(new):
            g.node.insert(at + k, n)
        dead.update((xdq.output[0], wdq.output[0]))
        done += 1
    if done:  # dequantizes nothing reads any more
        read = {i for n in g.node for i in n.input} | outputs
        for n in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in dead
                  and n.output[0] not in read]:
            g.node.remove(n)
        _drop_value_info(g, dead)
        _drop_unused_initializers(g, inits)
    return done


def _pairs_bounded_kn(w_nk) -> bool:
    """Whether an int8 weight [N, K] has no pair of neighbours along K past 128 (ONNX Runtime's u8 x s8 kernels are
    exact on it on every CPU: int7 and int8s weights)."""
    import torch

    from graphopt.ir.quant_ops import PAIR_BOUND, flat_pairs, worst_pair_sums
    return int(worst_pair_sums(flat_pairs(torch.from_numpy(w_nk.astype("int32")))).max()) <= PAIR_BOUND


def ort_saturating_layers(model: onnx.ModelProto) -> dict[str, int]:
    """The layers ONNX Runtime runs on its u8 x s8 kernels whose int8 weights can saturate them: MatMul, Gemm and
    (not depthwise) Conv of a quantized input (QuantizeLinear or DynamicQuantizeLinear, then DequantizeLinear) and
    a constant int8 weight behind a DequantizeLinear. ONNX Runtime fuses those into integer kernels that, on x86
    CPUs without VNNI (AVX2, AVX-512F), add pairs of u8 x s8 products in int16 (`vpmaddubsw`): a pair of same-sign
    weights whose magnitudes sum past 128 overflows it for large inputs (MobileNetV2 int8: 17.9 dB SQNR to fp32 in
    graphopt's kernels, 9.4 dB in ONNX Runtime on a Zen 3). Pairs are consecutive weights of each output channel's
    filter flattened channels-last, as its NHWC im2col reads them (checked against ONNX Runtime 1.32 on crafted
    weights). Returns the int8 weight's name -> its largest same-sign pair sum, for the layers over 128."""
    import torch
    from onnx import helper, numpy_helper

    from graphopt.ir.quant_ops import PAIR_BOUND, flat_pairs, worst_pair_sums

    g = model.graph
    inits, producer, _ = _index(g)
    found = {}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        xdq, wdq = producer.get(node.input[0]), producer.get(node.input[1])
        xq = producer.get(xdq.input[0]) if xdq is not None and xdq.op_type == "DequantizeLinear" else None
        if xq is None or xq.op_type not in ("QuantizeLinear", "DynamicQuantizeLinear") \
                or wdq is None or wdq.op_type != "DequantizeLinear" or wdq.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[wdq.input[0]])
        if q.dtype.name != "int8" or q.ndim < 2:
            continue  # (uint8 weights: ONNX Runtime's u8 x u8 kernels widen to int16 first and cannot saturate)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            if int(attrs.get("group", 1)) > 1 and q.shape[1] == 1:
                continue  # depthwise: its own kernel, no pairs
            w = torch.from_numpy(q.astype("int32"))  # [M, C/g, kh, kw]
        elif node.op_type == "Gemm" and attrs.get("transB", 0):
            w = torch.from_numpy(q.astype("int32"))  # [N, K]
        else:
            w = torch.from_numpy(q.astype("int32")).T  # [K, N] -> [N, K]
        worst = int(worst_pair_sums(flat_pairs(w)).max())
        if worst > PAIR_BOUND:
            found[wdq.input[0]] = worst
    return found


def activations_to_uint8(model: onnx.ModelProto) -> int:
    """Move each int8 activation grid (a QuantizeLinear with a constant scalar int8 zero point whose codes only
    DequantizeLinears with the same scale and zero point read) to uint8: zero point + 128, the same grid and the
    same numbers by ONNX's definitions; ONNX Runtime fuses residual adds (QLinearAdd) only on uint8 activations.
    Returns the count."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    inits, _, users = _index(g)
    outputs = {o.name for o in g.output}

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    done = 0
    for q in [n for n in g.node if n.op_type == "QuantizeLinear" and len(n.input) == 3]:
        zp, scale = const(q.input[2]), const(q.input[1])
        readers = users.get(q.output[0], [])
        if zp is None or scale is None or zp.dtype != np.int8 or zp.size != 1 or scale.size != 1 \
                or not readers or q.output[0] in outputs:
            continue
        if not all(r.op_type == "DequantizeLinear" and len(r.input) == 3 and r.input[0] == q.output[0]
                   and const(r.input[1]) is not None and const(r.input[2]) is not None
                   and const(r.input[2]).dtype == np.int8 and np.array_equal(const(r.input[1]), scale)
                   and np.array_equal(const(r.input[2]), zp) for r in readers):
            continue
        name = f"{q.input[2]}_u8"
        if name not in inits:
            inits[name] = numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name)
            g.initializer.append(inits[name])
        for n in (q, *readers):
            n.input[2] = name
        done += 1
    if done:
        _drop_value_info(g, {q.output[0] for q in g.node if q.op_type == "QuantizeLinear"})
        _drop_unused_initializers(g, inits)
    return done
