"""quantize: post-training quantization to a Q/DQ graph. Weights: per-channel symmetric int8 or int4, stored as
integers behind a dequantize node. Activations (optional): per-tensor affine int8 from streaming calibration on the
context's data, as a quantize -> dequantize pair at each conv/linear input. `fold-qdq` turns these into integer
ops; until then every graph still runs with the reference kernels."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

import graphopt.ir.quant_ops  # noqa: F401  registers the graphopt ops
from graphopt.ir.graph import Graph
from graphopt.ir.names import matches, node_labels, unmatched_patterns
from graphopt.ir.observe import observe_outputs
from graphopt.ir.precision import VALUE_MOVES, is_half, widen_half
from graphopt.ir.quant_ops import DTYPE_RANGES, pair_bounded_scales
from graphopt.passes.analysis.weights import linears_from_matmuls, weighted_ops
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.passes.canonicalize.fold_bn import fold_first
from graphopt.passes.canonicalize.transposed import convs_from_transposed
from graphopt.passes.quant.attention import decompose_attention
from graphopt.passes.quant.observers import CALIBRATORS, CalibrationError
from graphopt.pm.options import was_given
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)

aten = torch.ops.aten


def quantizable_ops(graph: Graph, exclude: list[str]) -> tuple[list[fx.Node], dict[str, str]]:
    """The conv/linear nodes with a float weight (the shared walk), minus `exclude` and those whose input no graph
    input reaches (a constant: an unrolled LSTM's first step reads its initial state, zeros, and calibration stopped
    on "calibration data reaching 'linear_1' is constant (0)"; fold-constants folds such a layer), and why others
    were skipped."""
    ops, skipped = weighted_ops(graph, exclude)
    fed: set[fx.Node] = set()
    for n in graph.gm.graph.nodes:
        if n.op == "placeholder" or any(a in fed for a in n.all_input_nodes):
            fed.add(n)
    for n in ops:
        if n.args[0] not in fed:
            skipped[n.name] = "reads no input data (a constant; fold-constants folds it)"
    return [n for n in ops if n.args[0] in fed], skipped


def prequantized_ops(graph: Graph, exclude: list[str], quantized_input: bool = False) -> list[fx.Node]:
    """conv2d/linear nodes whose weight is already a per-channel dequantized parameter (mixed-precision's output,
    or a weight-only quantize) and whose input is still float: quantize adds their activation Q/DQ and keeps the
    weight's bit width. `quantized_input`: those whose input is already dequantized from int8 instead (a Q/DQ
    model's layers, imported or quantized before)."""
    go = torch.ops.graphopt
    out = []
    for n in graph.gm.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.linear.default, aten.conv2d.default):
            continue
        w, x = n.args[1], n.args[0]
        stored = w.args[0] if isinstance(w, fx.Node) and w.args and isinstance(w.args[0], fx.Node) else None
        labels = node_labels(n) | (node_labels(stored) if stored is not None else set())
        if exclude and matches(labels, exclude):  # the node or its weight, as weighted_ops matches them
            continue
        if (isinstance(w, fx.Node) and w.target is go.dequantize_per_channel.default
                and all(isinstance(a, fx.Node) and a.op == "get_attr" for a in w.args[:3])
                and isinstance(x, fx.Node) and (x.target is go.dequantize_per_tensor.default) == quantized_input):
            out.append(n)
    return out


def quantize_weight(w: torch.Tensor, bits: str, per_channel: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric, per output channel (or one scale for the tensor, repeated per channel so every consumer reads
    the same form): (q as int8, scales, zero points)."""
    qmin, qmax, dtype = DTYPE_RANGES[bits]
    flat = w.detach().float().reshape(w.shape[0], -1)
    amax = flat.abs().amax(1) if per_channel else flat.abs().max().expand(w.shape[0])
    scales = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))  # an all-zero channel stays exactly zero
    if bits == "int8s" and w.dim() >= 2:
        bounded = pair_bounded_scales(w, scales)
        scales = torch.where(amax > 0, bounded if per_channel else bounded.max().expand(w.shape[0]), scales)
    q = torch.clamp(torch.round(flat / scales[:, None]), -qmax, qmax).to(dtype).reshape(w.shape)
    return q, scales.float(), torch.zeros_like(scales, dtype=torch.int32)


PAIR_WIDTHS = ("int7", "int8s")  # the widths that exist for the u8 x s8 pair kernels


def pair_kernel_skips(op: fx.Node, ort: bool = False) -> str:
    """Why no u8 x s8 pair kernel reads `op`'s weight ("" when one does), so `quantize{weights=int7|int8s}` keeps
    it at plain int8. Those widths buy speed only where an integer kernel multiplies activation and weight as u8 x
    s8 pairs (AVX2's `vpmaddubsw`, exact when no pair can saturate): linears with rows to tile and convs
    (pointwise, im2col, the flat and pixel-row int8 convs, stems included; a grouped conv runs each group on
    them: SKNet's 4-group 3x3 convs had taken int8 im2col and the exact int16 pair kernel for their full-range
    int8 weights, 1.25x the fp32 model's time). A depthwise conv and a one-row linear (a weight stream) compute
    in float on the dequantized weight, where a coarser step only costs resolution: on MobileNetV2 int7
    everywhere had 12.7 dB SQNR to fp32 against int8's 16.4, and 15.2 dB with those layers int8;
    EfficientNet-Lite0 14.9 -> 16.3 (int8 19.6). `ort`: the layer runs on ONNX Runtime (an
    ONNX export), whose u8 x s8 kernels read every linear and every conv but a depthwise one."""
    groups = op.args[8] if op.target is aten.convolution.default else op.args[6] if len(op.args) > 6 else 1
    w = op.args[1].meta.get("val") if isinstance(op.args[1], fx.Node) else None
    depthwise = op.target is not aten.linear.default and int(groups) > 1 and (w is None or w.shape[1] == 1)
    if ort:
        return "ONNX Runtime's depthwise int8 conv adds no pairs" if depthwise else ""
    if op.target is aten.linear.default:
        val = op.args[0].meta.get("val") if isinstance(op.args[0], fx.Node) else None
        rows = 1
        for d in (val.shape[:-1] if val is not None else ()):
            rows *= int(d)
        return (f"a linear of {rows} row(s) (under 6) has no u8 x s8 kernel" if val is not None and rows < 6
                else "")
    return f"a depthwise conv ({int(groups)} groups) has no u8 x s8 kernel" if depthwise else ""


def _resolve_width(weights: str, ctx: PassContext) -> tuple[str, str]:
    """weights=auto: int8s where the context's target multiplies int8 with AVX2's `vpmaddubsw` (exact only for
    pair-bounded weights), int8 elsewhere (VNNI is exact for any int8 weight; other targets, or none, take int8).
    Returns (width, why) with why empty unless auto chose."""
    if weights != "auto":
        return weights, ""
    product = _int8_product(ctx)
    if product == "onnxruntime":
        return "int8s", ("int8s: the export runs on ONNX Runtime, whose u8 x s8 kernels add weight pairs in int16 on "
                         "x86 CPUs without VNNI (exact there and everywhere at int8s)")
    if product == "ubsw":
        return "int8s", "int8s: the target multiplies int8 with vpmaddubsw (AVX2, no VNNI)"
    if product == "vnni":
        return "int8", "int8: the target's vpdpbusd (VNNI) is exact for any int8 weight"
    if product == "mma":
        return "int8", "int8: the GPU's int8 tensor-core product is exact for any int8 weight"
    asked = callable(getattr(ctx.target, "int8_product", None))
    return "int8", ("int8: the target has no u8 x s8 int8 kernels" if asked else "int8: no target to ask")


def _int8_product(ctx: PassContext) -> str | None:
    """The instruction the context's target multiplies int8 with ("vnni", "ubsw", "onnxruntime", "mma"), or None
    (no int8 kernels, or a target that does not say)."""
    ask = getattr(ctx.target, "int8_product", None)
    return ask() if callable(ask) else None


def _resolve_matmul(matmul: str, ctx: PassContext) -> tuple[bool, str]:
    """matmul=auto: false where the context's target multiplies int8 with `vpmaddubsw` (AVX2, no VNNI), true
    elsewhere. Returns (quantize them, why) with why empty unless auto chose false."""
    if matmul != "auto":
        return matmul == "true", ""
    if _int8_product(ctx) == "ubsw":
        return False, ("false: the target multiplies int8 with vpmaddubsw (AVX2, no VNNI); its fused float "
                       "attention kernel is faster than int8 matmuls there")
    return True, ""


def layer_width(op: fx.Node, bits: str, ort: bool = False) -> str:
    """The width `quantize{weights=bits}` stores `op`'s weight at: `bits`, or int8 where a pair width buys nothing
    (on ONNX Runtime when `ort`)."""
    return "int8" if bits in PAIR_WIDTHS and pair_kernel_skips(op, ort) else bits


def quantize_op_weight(graph: Graph, op: fx.Node, bits: str, per_channel: bool = True) -> None:
    """Store `op`'s weight as per-channel int8/int4 behind a dequantize node (the op reads the dequantized weight).
    A weight several ops read (a conv applied twice, an RNN's cell unrolled over its steps, ALBERT's shared layers)
    is stored once at a width: each op had got its own copy, a 50-step unrolled LSTM 50 of them."""
    w = op.args[1]
    key = (str(w.target), bits, per_channel)
    made = before_in_graph(graph, op, lambda n: n.meta.get("quantized_from") == key)
    if made is not None:
        op.args = (op.args[0], made, *op.args[2:])
        return
    q, scales, zps = quantize_weight(graph.get_param(w.target), bits, per_channel)
    nq = graph.add_param(f"{w.target}_q", q, before=op)
    ns = graph.add_param(f"{w.target}_scale", scales, before=op)
    nz = graph.add_param(f"{w.target}_zp", zps, before=op)
    with graph.gm.graph.inserting_before(op):
        dq = graph.gm.graph.call_function(torch.ops.graphopt.dequantize_per_channel.default, (nq, ns, nz, 0))
    dq.meta["quantized_from"] = key
    nq.meta["source_fqn"] = w.meta.get("source_fqn", w.target)
    op.args = (op.args[0], dq, *op.args[2:])


def before_in_graph(graph: Graph, op: fx.Node, test) -> fx.Node | None:
    """The first node ahead of `op` in `graph` for which `test` holds (one it may read), or None."""
    for n in graph.gm.graph.nodes:
        if n is op:
            return None
        if test(n):
            return n
    return None


def quantize_embeddings(graph: Graph, exclude: list[str], skipped: dict[str, str]) -> list[str]:
    """Every embedding table (a float parameter only embeddings read) stored as int8 rows with one scale per row:
    the rows and their scales are gathered together and multiplied, `dequantize(take(q, ids)) * take(s, ids)`
    (round to nearest, each row's largest magnitude at 127: a row's error is at most its 1/254). A small
    transformer's vocabulary is most of its bytes (MiniLM: 11.7 M of 22.7 M parameters). Returns the tables'
    names; tables read any other way (tied to a head) go to `skipped`."""
    g, done = graph.gm.graph, []
    for n in list(g.nodes):
        if n.op != "call_function" or n.target is not aten.embedding.default:
            continue
        w = n.args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or (exclude and matches(
                node_labels(n) | node_labels(w), exclude)):
            continue
        table = graph.get_param(w.target)
        if not table.is_floating_point() or table.dim() != 2:
            continue
        others = [u.name for u in w.users if u.target is not aten.embedding.default or u.args[0] is not w]
        if others:
            skipped[n.name] = f"embedding table also read by {', '.join(others[:3])}: kept float"
            continue
        q, scales, _ = quantize_weight(table, "int8", per_channel=True)
        nq = graph.add_param(f"{w.target}_q", q, before=n)
        ns = graph.add_param(f"{w.target}_scale", scales.reshape(-1, 1).contiguous(), before=n)
        nq.meta["source_fqn"] = w.meta.get("source_fqn", w.target)
        with g.inserting_before(n):
            rows = g.call_function(aten.embedding.default, (nq, *n.args[1:]), dict(n.kwargs))
            deq = g.call_function(torch.ops.graphopt.dequantize_per_tensor.default, (rows, 1.0, 0))
            scale = g.call_function(aten.embedding.default, (ns, *n.args[1:]), dict(n.kwargs))
            y = g.call_function(aten.mul.Tensor, (deq, scale))
        n.replace_all_uses_with(y)
        g.erase_node(n)
        done.append(str(w.target))
    return done


def _function_chains(graph: Graph, layers: list[fx.Node], linears: bool) -> dict[fx.Node, fx.Node]:
    """{layer: the end of the activation function chain it alone feeds} for each of `layers` (convs; linears too
    with `linears`) whose output goes only through elementwise functions of itself (`tables.forward_chain`) to a
    node that is neither a graph output nor read by a conv or linear kept float: `tables` puts grids on both ends,
    and fold-qdq makes the chain a table."""
    from graphopt.passes.quant.tables import forward_chain
    float_layers = {n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target in (
        aten.linear.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
        aten.convolution.default)} - set(layers)
    out = {}
    for layer in layers:
        found = None if layer.target is aten.linear.default and not linears else forward_chain(graph, layer)
        if found is not None and all(u.op != "output" and u not in float_layers for u in found[1].users):
            out[layer] = found[1]
    return out


def residual_adds(graph: Graph) -> list[fx.Node]:
    """aten.add.Tensor nodes of two float activations of one 4-D shape where one is a conv's output (residual
    connections)."""
    out = []
    for n in graph.gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.add.Tensor or len(n.args) != 2:
            continue
        a, b = n.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a.op == "get_attr" or b.op == "get_attr":
            continue
        va, vb = a.meta.get("val"), b.meta.get("val")
        if va is None or vb is None or va.dim() != 4 or tuple(va.shape) != tuple(vb.shape) \
                or not va.dtype.is_floating_point:
            continue
        if any(x.target in (aten.conv2d.default, aten.convolution.default) for x in (a, b)):
            out.append(n)
    return out


# ops whose outputs lie in a known range, quantized over all of it by the minmax calibrator: calibration sees the
# typical case, and a decoder's first step attends to one key with probability 1.0, which a grid calibrated on
# later steps (max 0.52) clipped (output 0.93 off against 0.006 on the steps it was calibrated on). MiniLM's
# sentence cosine to fp32 moved 0.99370 -> 0.99353. The clipping calibrators keep their choice (entropy's MiniLM
# cosine would drop 0.938 -> 0.912 at [0, 1]).
BOUNDED = {aten._softmax.default: (0.0, 1.0), aten.softmax.int: (0.0, 1.0), aten._safe_softmax.default: (0.0, 1.0),
           aten.sigmoid.default: (0.0, 1.0), aten.hardsigmoid.default: (0.0, 1.0), aten.tanh.default: (-1.0, 1.0)}


def output_bounds(x: fx.Node) -> tuple[float, float] | None:
    """The range every value of activation x lies in when it is a bounded op's output (`BOUNDED`), read through
    ops that only move values (views, copies, slices: `VALUE_MOVES`); else None."""
    while x.op == "call_function" and x.target in VALUE_MOVES and isinstance(x.args[0], fx.Node):
        x = x.args[0]
    return BOUNDED.get(x.target) if x.op == "call_function" else None


def insert_qdq(graph: Graph, x: fx.Node, qparams: tuple[float, int], done: dict[str, fx.Node]) -> fx.Node:
    """x -> int8 quantize -> dequantize, returning the dequantize; one pair per activation (`done` caches them by
    name), shared by its readers."""
    if x.name not in done:
        scale, zp = qparams
        qmin, qmax, _ = DTYPE_RANGES["int8"]
        g = graph.gm.graph
        with g.inserting_after(x):
            qn = g.call_function(torch.ops.graphopt.quantize_per_tensor.default,
                                 (x, float(scale), int(zp), qmin, qmax, torch.int8))
        with g.inserting_after(qn):
            done[x.name] = g.call_function(torch.ops.graphopt.dequantize_per_tensor.default,
                                           (qn, float(scale), int(zp)))
    return done[x.name]


def correct_biases(graph: Graph, ops: list[fx.Node], batches, bits: str, per_channel: bool = True, ort: bool = False
                   ) -> dict[str, float]:
    """Bias correction: weight rounding shifts each output channel's mean by E[op(x, W - dequant(q(W)))]; measure
    that shift on the calibration data (float inputs, streamed: one running sum per channel) and add it to the bias.
    Call before the weights are replaced. Returns node name -> largest shift corrected (in output units)."""
    by_input: dict[str, list[fx.Node]] = {}
    for op in ops:
        if isinstance(op.args[0], fx.Node):
            by_input.setdefault(op.args[0].name, []).append(op)
    err_w, sums, counts = {}, {}, {}
    for op in ops:
        w = graph.get_param(op.args[1].target).float()
        q, scales, _ = quantize_weight(w, layer_width(op, bits, ort), per_channel)
        err_w[op.name] = w - q.float() * scales.reshape(-1, *[1] * (w.dim() - 1))

    def record(name: str, x: torch.Tensor) -> None:
        for op in by_input[name]:
            shift = op.target(x.float(), err_w[op.name], None, *op.args[3:])  # the op on the weight's error alone
            # (a conv's channels follow its batch dim; an unbatched conv1d's [C, L] has none)
            channel_dim = shift.dim() - 1 if op.target == aten.linear.default else \
                1 if shift.dim() == err_w[op.name].dim() else 0
            dims = [d for d in range(shift.dim()) if d != channel_dim]
            sums[op.name] = sums.get(op.name, 0) + shift.mean(dims)
            counts[op.name] = counts.get(op.name, 0) + 1

    observe_outputs(graph, by_input, batches, record)
    corrected = {}
    for op in ops:
        if op.name not in sums:
            continue
        delta = sums[op.name] / counts[op.name]
        b = op.args[2] if len(op.args) > 2 else None
        old = graph.get_param(b.target).float() if isinstance(b, fx.Node) else torch.zeros_like(delta)
        if b is not None and not isinstance(b, fx.Node):
            continue  # a computed bias: left as it is
        nb = graph.add_param(f"{op.args[1].target}_bias_corrected", old + delta, before=op)
        op.args = (op.args[0], op.args[1], nb, *op.args[3:])
        corrected[op.name] = float(delta.abs().max())
    return corrected


def calibrate(graph: Graph, inputs: list[tuple[fx.Node, str]], batches, calibrator: str) -> dict[str, object]:
    """An observer for each activation (node, the op that reads it); two streaming passes when a histogram is
    needed."""
    cls = CALIBRATORS[calibrator]
    watch = {}
    for x, reader in inputs:
        watch.setdefault(x.name, cls(f"{reader} (input '{x.name}')"))
    if not batches:
        raise CalibrationError("quantize with activations needs calibration data: the data loader yielded nothing")

    observe_outputs(graph, watch, batches, lambda name, x: watch[name].observe_range(x))
    if cls.needs_histogram:  # second pass: a fixed-range histogram, so memory does not grow with the data
        observe_outputs(graph, watch, batches, lambda name, x: watch[name].observe_histogram(x))
    return watch


def activation_matmuls(graph: Graph, exclude: list[str]) -> list[fx.Node]:
    """matmul/bmm nodes whose two operands are both computed activations (attention), minus `exclude`."""
    out = []
    for n in graph.gm.graph.nodes:
        if n.op != "call_function" or n.target not in (aten.matmul.default, aten.bmm.default):
            continue
        if exclude and matches(node_labels(n), exclude):
            continue
        a, b = n.args[:2]
        if all(isinstance(t, fx.Node) and t.op == "call_function" and t.meta.get("val") is not None
               and t.meta["val"].is_floating_point() for t in (a, b)):
            out.append(n)
    return out


def _drop_dynamic_quantize(graph: Graph, layers: list[fx.Node]) -> int:
    """Remove each graphopt.dynamic_quantize (an ONNX Runtime quantize_dynamic model's per-call activation
    rounding) that only `layers` read (the prequantized layers this run quantizes): they, whose weights are
    already int8 behind a dequantize, then get calibrated static activation scales like any other, which fold-qdq
    can turn into integer kernels. One that an excluded layer also reads stays, and keeps its rounding."""
    keep = set(layers)
    dyn = [n for n in graph.gm.graph.nodes if n.target is torch.ops.graphopt.dynamic_quantize.default
           and n.users and set(n.users) <= keep]
    for n in dyn:
        n.replace_all_uses_with(n.args[0])
        graph.gm.graph.erase_node(n)
    return len(dyn)


def _quantize_dynamically(graph: Graph, layers: list[fx.Node]) -> int:
    """Each of `layers` (linears with int8 weights) reads its input through graphopt.dynamic_quantize (one per
    input, shared by the layers reading it; an input already rounded so stays as it is). Returns how many were
    added."""
    g, added = graph.gm.graph, {}
    for op in layers:
        x = op.args[0]
        if not isinstance(x, fx.Node) or x.target is torch.ops.graphopt.dynamic_quantize.default:
            continue
        if x not in added:
            with g.inserting_after(x):
                added[x] = g.call_function(torch.ops.graphopt.dynamic_quantize.default, (x,))
        op.args = (added[x], *op.args[1:])
    return len(added)


def _rewidth_kept(graph: Graph, ops: list[fx.Node], width: str, per_channel: bool, chosen: dict, ort: bool = False
                  ) -> tuple[int, dict[str, str]]:
    """Kept integer weights that graphopt's kernels would not take as they are get rounded again from their
    dequantized values (one more rounding): nonzero zero points (uint8 weights of an imported ONNX Runtime model)
    become symmetric int8, the kernels' form; and where the run asks for a pair width (int8s / int7: weights=auto
    on a CPU without VNNI), imported full-range int8 weights take it, for the exact u8 x s8 pair kernels. Widths
    that mixed-precision chose (`chosen`) stay. Returns (weights made symmetric, {op: new width})."""
    symmetric, widths = 0, {}
    for op in ops:
        dq = op.args[1]
        q, scales, zps = (graph.get_param(a.target) for a in dq.args[:3])
        asymmetric = bool((zps != 0).any())
        bits = layer_width(op, width, ort) if width in PAIR_WIDTHS and op.name not in chosen else "int8"
        if not asymmetric and bits == "int8":
            continue
        w = torch.ops.graphopt.dequantize_per_channel.default(q, scales, zps, int(dq.args[3]))
        op.args = (op.args[0], graph.add_param(f"{dq.args[0].target}_float", w, before=op), *op.args[2:])
        quantize_op_weight(graph, op, bits, per_channel)
        symmetric += asymmetric
        if bits != "int8":
            widths[op.name] = bits
    return symmetric, widths


@register_pass
class Quantize(Pass):
    name = "quantize"
    summary = ("Post-training quantization to Q/DQ: per-channel symmetric int8/int8s/int7/int4 weights, optional "
               "per-tensor affine int8 activations calibrated on the context's data (streaming).")
    contract = Contract.BOUNDED
    rewrites_weights = True
    min_sqnr_db = 12.0  # int4 weights on small layers sit around 15-20 dB; below 12 something is wrong

    @dataclass
    class Options:
        weights: Literal["int8", "int8s", "int7", "int4", "auto"] = field(default="auto", metadata={
            "help": "weight bit width. auto (the default): int8s where the target multiplies int8 with AVX2's "
                    "vpmaddubsw (no VNNI; on ten architectures 0.66-0.89x the time of int8, output error 0.9-1.5x "
                    "int8's), else int8 (compile/opt ask the run's target: this CPU, --cpu's, or the GPU; for an "
                    "ONNX export (target onnx), ONNX Runtime's kernels: int8s, which no x86 CPU saturates). int8s: "
                    "int8 whose per-channel scale is just coarse enough that no pair of weights AVX2's exact u8 x "
                    "s8 kernel adds (input channels 2m, 2m+1 at one tap; ONNX Runtime's: neighbours in the filter "
                    "flattened channels-last) can saturate int16: that kernel's speed (~1.25x the int8 GEMM "
                    "without VNNI) at a median 1.3x the int8 step; int7: values in [-63, 63], the same kernel at 2x "
                    "the step. Depthwise convs and one-row linears, which no such kernel of graphopt's reads, stay "
                    "int8 under both (for target onnx only depthwise convs: ONNX Runtime pairs the rest). An "
                    "imported int8 model's weights (ORT QDQ / dynamic files) keep their int8 unless a width is "
                    "given (auto, int8s or int7 round them again where they resolve to a pair width) or the run "
                    "exports to ONNX Runtime; a Q/DQ model's layers keep their activation grids and need no "
                    "calibration data for that"})
        embeddings: Literal["int8", "fp32"] = field(default="int8", metadata={
            "help": "embedding tables (token vocabularies): int8 rows with one scale per row, gathered with the "
                    "row (~4x smaller; most of a small transformer's bytes), or fp32 (kept float)"})
        activations: Literal["int8", "dynamic", "none"] = field(default="int8", metadata={
            "help": "int8: quantize conv/linear inputs on calibrated static grids (needs data); dynamic: linears "
                    "only, each input rounded onto a uint8 grid computed from it on every call (ONNX Runtime's "
                    "quantize_dynamic; no data needed; the CPU runs them on int8 kernels); none: weight-only "
                    "(the ONNX export keeps the int8 weights; graphopt's CPU and GPU builds run such layers in "
                    "float and store their weights dequantized, at fp32's size)"})
        calibrator: Literal["minmax", "percentile", "mse", "entropy"] = field(default="minmax", metadata={
            "help": "how activation ranges are chosen: minmax, the range seen (a softmax, sigmoid or tanh output: the "
                    "op's whole range, which a decoder's first step reaches); percentile / mse / entropy clip rare "
                    "values from it"})
        calib_batches: int = field(default=32, metadata={"help": "calibration batches used at most"})
        exclude: list[str] = field(default_factory=list, metadata={
            "help": "node or parameter names (glob) kept in float"})
        matmul: Literal["auto", "true", "false"] = field(default="auto", metadata={
            "help": "also quantize activation x activation matmuls (both operands per-tensor int8): attention's "
                    "scores and outputs; scaled_dot_product_attention is rewritten into explicit matmuls first. "
                    "auto: false where the target multiplies int8 with AVX2's vpmaddubsw (no VNNI), whose fused "
                    "float attention kernel was faster (MiniLM int8 14.5 against 15.8 ms on a Zen 3; four small "
                    "attention blocks 4-15% faster, with less error), true elsewhere (VNNI / AMX, GPUs, ONNX "
                    "Runtime, no target)"})
        adds: Literal["auto", "true", "false"] = field(default="auto", metadata={
            "help": "also quantize residual adds of a conv's output: both inputs and the output on int8 grids (one "
                    "more rounding of each branch), the form ONNX Runtime runs in integer end to end (QLinearAdd; "
                    "the convs before them become QLinearConv). auto: true for target onnx (MobileNetV2 in ORT "
                    "1.44x faster, 0.9 dB SQNR lost), false for graphopt's kernels (no faster there)"})
        tables: Literal["auto", "true", "false"] = field(default="auto", metadata={
            "help": "activation functions after quantized layers (SiLU, GELU, sigmoid, tanh, hardswish, Mish: float "
                    "elementwise functions of the layer's output alone, whose result is not a model output) as int8 "
                    "lookup tables: the layer's output and the function's result get int8 grids (one more rounding "
                    "each, where they had none; float readers of the result, a squeeze-excite's pool, read it from "
                    "its grid too), and fold-qdq evaluates the function once per code (graphopt.lut), so the layer "
                    "stores int8 and the function is a byte lookup (EfficientNet-B0 int8 0.71-0.73x the time, its max "
                    "error 0.7 -> 1.2% of the output range; ONNX Runtime's int8 1.3%). auto: after convs (SiLU "
                    "CNNs), not after linears (a transformer's GELU: MiniLM 0.94-0.95x the time, but its worst "
                    "sentence's cosine to fp32 0.990 -> 0.988), and none for target onnx (ONNX Runtime runs its own "
                    "activations); true: after linears too"})
        per_channel: bool = field(default=True, metadata={
            "help": "weights: one scale per output channel (true) or one per tensor (false)"})
        symmetric: bool = field(default=False, metadata={
            "help": "activations: symmetric around 0 (zero point 0) instead of affine over the observed range; "
                    "weights are always symmetric"})
        bias_correction: Literal["auto", "true", "false"] = field(default="auto", metadata={
            "help": "add each layer's mean output shift caused by weight rounding back to its bias, measured on "
                    "the calibration data. auto: the convs, when data is given (EfficientNet-Lite0 int8s 15.3 -> "
                    "21.6 dB SQNR, MobileNetV2 17.9 -> 19.5; a transformer's linears lost a little, MiniLM cosine "
                    "0.9940 -> 0.9931); true: every conv and linear (needs data; helps most for int4); false: none"})
        fold_bn: bool = field(default=True, metadata={
            "help": "first fold the inference batch norms (and per-channel constant muls / adds) after convs and "
                    "linears into them, as the fold-bn pass does, so the int8 kernel applies them; false leaves "
                    "each one a float op after its int8 layer (MobileNetV2 int8 ran 3.5x slower so)"})

        def validate(self) -> str:
            return "option 'calib-batches' must be >= 1" if self.calib_batches < 1 else ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        half = is_half(graph)
        graph = widen_half(graph)  # (float16 / bfloat16 graphs: the quantization ops are float32)
        for pat in unmatched_patterns(graph, o.exclude):
            raise CalibrationError(f"quantize option 'exclude': '{pat}' matches no node or parameter")
        # a batch norm left after a layer would run in float on that layer's float output: fold it first
        folded = fold_first(graph) if o.fold_bn else {}
        as_linear = linears_from_matmuls(graph, o.exclude)  # (x @ W.T, GPT-2's addmm: weight passes take linears)
        # transposed convs (generators', UNet decoders') as a conv of their phase kernels (or a linear): they had
        # stayed float; dynamic activations quantize linears only, so they stay as they are there
        transposed_kept: dict[str, str] = {}
        as_conv = convs_from_transposed(graph, o.exclude, transposed_kept) if o.activations != "dynamic" else []
        # the default width is auto: int8s where the target's int8 product is AVX2's vpmaddubsw (0.66-0.89x the
        # int8 time on ten architectures, error 0.9-1.5x int8's), for an ONNX export the one ONNX Runtime runs
        # exactly on every CPU (full-range int8 exported ran an SE-block CNN in ORT 11% off its graph on AVX2)
        weights, auto_reason = _resolve_width(o.weights, ctx)
        if not was_given(o, "weights"):
            auto_reason = "the default (auto); " + auto_reason
        ort = ctx.onnx_export  # (an ONNX export: ONNX Runtime's kernels decide which layers pair weights)
        # an imported int8 model's weights keep their int8 unless a width is asked for (or the run exports to
        # ONNX Runtime, whose x86 kernels saturate full-range pairs): the default rounds only float weights
        kept_width = weights if was_given(o, "weights") or ort else "int8"
        ops, skipped = quantizable_ops(graph, o.exclude)
        skipped.update(transposed_kept)
        # layers mixed-precision measured and left in float stay float: its choice, not quantize's default width
        chosen = graph.meta.get("weight_bits") or {}
        kept_float = [op.name for op in ops if chosen.get(op.name) == "fp32"]
        for name in kept_float:
            skipped[name] = "kept fp32 by mixed-precision"
        ops = [op for op in ops if op.name not in kept_float]
        for n in graph.gm.graph.nodes:  # (one op each; the CPU's recurrence kernels are float32)
            if n.op == "call_function" and n.target in (aten.lstm.input, aten.gru.input, aten.rnn_tanh.input,
                                                        aten.rnn_relu.input):
                skipped[n.name] = "recurrent layer (LSTM / GRU / RNN): its weights stay float32"
        dynamic = o.activations == "dynamic"
        kept_bits = prequantized_ops(graph, o.exclude) if o.activations in ("int8", "dynamic") else []
        if dynamic:  # linears only: a conv's weight alone would buy nothing (the target runs it in float)
            for op in [op for op in ops + kept_bits if op.target is not aten.linear.default]:
                skipped[op.name] = ("activations=dynamic quantizes linears only (graphopt has no int8 conv kernel "
                                    "on a per-call grid): kept as it was")
            ops = [op for op in ops if op.target is aten.linear.default]
            kept_bits = [op for op in kept_bits if op.target is aten.linear.default]
        for op in kept_bits:
            skipped.pop(op.name, None)
        made_static = 0 if dynamic else _drop_dynamic_quantize(graph, kept_bits)
        made_symmetric, rewidth = _rewidth_kept(graph, kept_bits, kept_width, o.per_channel, chosen, ort)
        # a Q/DQ model's layers (an ONNX Runtime QDQ / QOperator file): their activation grids stay; a pair width
        # rounds their int8 weights again, for the exact u8 x s8 kernels (ONNX Runtime's, for an export)
        full = prequantized_ops(graph, o.exclude, quantized_input=True) if kept_width in PAIR_WIDTHS else []
        full_symmetric, full_widths = _rewidth_kept(graph, full, kept_width, o.per_channel, chosen, ort)
        made_symmetric += full_symmetric
        rewidth.update(full_widths)
        if not ops and not kept_bits and (full_widths or full_symmetric):
            eliminate_dead_code(graph)
            graph.meta["weight_bits"] = {**graph.meta.get("weight_bits", {}), **rewidth}
            return PassResult(graph, True, {"weights_quantized": 0, "kept_weights_rounded_to_pair_width": len(rewidth),
                                            "asymmetric_weights_made_symmetric": made_symmetric,
                                            "weight_bits": weights,
                                            **({"weights_auto": auto_reason} if auto_reason else {}),
                                            **folded, "skipped": skipped})
        if not ops and not kept_bits:
            why = ("no linear with a float weight to quantize dynamically" if dynamic else
                   "no conv or linear with a float weight to quantize")
            why += f" ({len(kept_float)} kept fp32 by mixed-precision)" if kept_float else ""
            return PassResult(graph, bool(folded), {**folded, "skipped": skipped}, why)
        observers, matmuls, attention_kept, adds, functions = {}, [], {}, [], {}
        matmul, matmul_auto = _resolve_matmul(o.matmul, ctx)
        if o.activations == "int8":
            if not ctx.data:
                raise CalibrationError("quantize{activations=int8} needs calibration data (optimize(..., data=...) "
                                       "or --inputs); use activations=none for weight-only")
            if matmul:
                _, attention_kept = decompose_attention(graph)
                matmuls = activation_matmuls(graph, o.exclude)
            watched = [(op.args[0], op.name) for op in ops + kept_bits if isinstance(op.args[0], fx.Node)]
            watched += [(t, mm.name) for mm in matmuls for t in mm.args[:2]]
            adds = residual_adds(graph) if o.adds == "true" or (o.adds == "auto" and ort) else []
            watched += [(t, a.name) for a in adds for t in (*a.args[:2], a)]
            if o.tables == "true" or (o.tables == "auto" and not ort):
                functions = _function_chains(graph, ops + kept_bits, linears=o.tables == "true")
            watched += [(t, f"{op.name}'s activation function") for op, end in functions.items() for t in (op, end)]
            observers = calibrate(graph, watched, list(ctx.data)[: o.calib_batches], o.calibrator)
        corrected = {}
        if o.bias_correction == "true" and not ctx.data:
            raise CalibrationError("quantize{bias-correction=true} measures the rounding shift on data: give "
                                   "calibration data (optimize(..., data=...) or --inputs)")
        if o.bias_correction == "true":
            corrected_ops = ops
        elif o.bias_correction == "auto" and ctx.data:  # (the convs: where it paid; see the option's help)
            corrected_ops = [op for op in ops if op.target is not aten.linear.default]
        else:
            corrected_ops = []
        if corrected_ops:
            corrected = correct_biases(graph, corrected_ops, list(ctx.data)[: o.calib_batches], weights,
                                       o.per_channel, ort)
        qmin, qmax, _ = DTYPE_RANGES["int8"]
        g = graph.gm.graph
        act_q = {}

        def dequantized(x: fx.Node) -> fx.Node:
            if x.op != "placeholder" and observers[x.name].all_zero():
                # zero on every batch inside the model while its inputs vary (a norm over a 1x1 map, a masked
                # branch): it stays float, exact (it had stopped calibration, "is constant"; zero data for the
                # model's own inputs still is that error)
                if x.name not in zero_kept:
                    log.warning("quantize: '%s' was 0 on every calibration batch; the layers reading it keep a float "
                                "input", x.name)
                zero_kept[x.name] = ", ".join(u.name for u in x.users)
                return x
            bounds = output_bounds(x) if o.calibrator == "minmax" else None  # (the others clip on purpose)
            if bounds is not None:
                full_range[x.name] = bounds
            return insert_qdq(graph, x, observers[x.name].qparams(qmin, qmax, o.symmetric, bounds), act_q)

        kept_int8, bits, zero_kept, full_range = {}, {}, {}, {}
        for op in [n for n in g.nodes if n in set(ops) | set(kept_bits)]:
            if op not in kept_bits:
                bits[op.name] = layer_width(op, weights, ort)
                if bits[op.name] != weights:
                    kept_int8[op.name] = pair_kernel_skips(op, ort)
                quantize_op_weight(graph, op, bits[op.name], o.per_channel)
            x = op.args[0]
            if observers and isinstance(x, fx.Node) and x.name in observers:
                op.args = (dequantized(x), *op.args[1:])
        for mm in matmuls:
            mm.args = (dequantized(mm.args[0]), dequantized(mm.args[1]), *mm.args[2:])
        on_tables = 0
        for layer, end in functions.items():
            out = dequantized(layer)
            end_q = dequantized(end)  # (the grid its quantized readers take, made by now, or its own)
            if out is layer or end_q is end:
                continue
            layer.replace_all_uses_with(out, delete_user_cb=lambda u, q=out.args[0]: u is not q)
            # float readers of the function's result (a squeeze-excite's pool and scale) read it from its grid
            end.replace_all_uses_with(end_q, delete_user_cb=lambda u, q=end_q.args[0]: u is not q)
            on_tables += 1
        for add in (adds if observers else []):
            made = set(act_q.values())  # (a residual add's output, already rerouted to its dequantize)
            add.args = tuple(a if a in made else dequantized(a) for a in add.args[:2]) + tuple(add.args[2:])
            out = dequantized(add)
            add.replace_all_uses_with(out, delete_user_cb=lambda u, q=out.args[0]: u is not q)
        dynamic_inputs = _quantize_dynamically(graph, ops + kept_bits) if dynamic else 0
        tables = quantize_embeddings(graph, o.exclude, skipped) if o.embeddings == "int8" else []
        eliminate_dead_code(graph)
        graph.meta["weight_bits"] = {**graph.meta.get("weight_bits", {}), **rewidth, **bits}
        return PassResult(graph, True, {"weights_quantized": len(ops), "matmuls_as_linears": as_linear,
                                        "transposed_convs_as_convs": len(as_conv),
                                        **folded,
                                        "half_model_computed_in_float32": half,
                                        "weight_bits_kept": len(kept_bits), "kept_fp32": len(kept_float),
                                        "activations_quantized": len(act_q), "matmuls_quantized": len(matmuls),
                                        "functions_on_tables": on_tables,
                                        "bounded_activations_at_full_range": len(full_range),
                                        "embeddings_quantized": len(tables),
                                        "inputs_quantized_dynamically": dynamic_inputs,
                                        "dynamic_made_static": made_static,
                                        "asymmetric_weights_made_symmetric": made_symmetric,
                                        "kept_weights_rounded_to_pair_width": len(rewidth),
                                        "attention_kept_fused": attention_kept,
                                        "weight_bits": weights, "pair_width_kept_int8": kept_int8,
                                        **({"weights_auto": auto_reason} if auto_reason else {}),
                                        **({"matmul_auto": matmul_auto} if matmul_auto else {}),
                                        "calibrator": o.calibrator if observers else None,
                                        "bias_corrected": len(corrected),
                                        "largest_bias_shift": max(corrected.values(), default=0.0),
                                        "skipped": skipped,
                                        **({"zero_inputs_kept_float": zero_kept} if zero_kept else {})})
