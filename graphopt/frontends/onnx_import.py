"""ONNX frontend: our own importer from ONNX to the Graph IR (ATen level, through torch.export).

Shapes are static, so every value computed only from shapes and constants (Shape -> Gather -> Concat -> Reshape,
dynamic Pad, ConstantOfShape, Range, ...) is evaluated at import time. That is why files from torch's classic
exporter, which TVM's own `from_onnx` rejects, import here. Each ONNX op is written once in torch terms; `emit`
either computes it (all inputs constant) or records it as a node of an fx graph (some input depends on data).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F

from graphopt.errors import InputMismatchError, ModelFileError, UnsupportedOpError
from graphopt.frontends import dynamic_dims_error, given_shape, open_batch
from graphopt.ir.graph import Graph
from graphopt.ir.names import input_name
from graphopt.ir.quant_ops import dynamic_qparams  # (also registers torch.ops.graphopt)

log = logging.getLogger(__name__)


@dataclass
class Const:
    """A value known at import time; `name` is the ONNX initializer it came from, if any."""
    t: torch.Tensor
    name: str = ""


@dataclass
class Dyn:
    """A value that depends on the model's inputs: an fx node plus an example tensor for its shape."""
    node: fx.Node
    example: torch.Tensor


@dataclass
class Seq:
    """An ONNX sequence (SequenceEmpty / SequenceInsert ... ConcatFromSequence, as torch's exporter writes a list
    appended to in a loop): its tensors, known at import as a list (loops that build one are unrolled)."""
    items: list


Value = Const | Dyn


def _onnx_dtype(elem_type: int) -> torch.dtype:
    from onnx import TensorProto as T
    table = {T.FLOAT: torch.float32, T.DOUBLE: torch.float64, T.FLOAT16: torch.float16, T.BFLOAT16: torch.bfloat16,
             T.INT64: torch.int64, T.INT32: torch.int32, T.INT16: torch.int16, T.INT8: torch.int8,
             T.UINT8: torch.uint8, T.BOOL: torch.bool}
    if elem_type not in table:
        raise UnsupportedOpError("<tensor>", f"dtype {elem_type}", "only float, int and bool tensors are supported")
    return table[elem_type]


class Importer:
    """Walks the ONNX graph in order, keeping a Value per tensor name."""

    def __init__(self, model, input_shapes: dict[str, Sequence[int]] | None, base_dir: str = ""):
        self.model = model
        self.base_dir = base_dir  # the folder external data is read from (load_onnx leaves it out of the proto)
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        self.g = fx.Graph()
        self.root = torch.nn.Module()
        self.env: dict[str, Value] = {}
        self.param_nodes: dict[int, fx.Node] = {}
        self.folded: dict[tuple, tuple] = {}  # `_fold_key` -> (its input tensors, the Const)
        self.param_names: set[str] = set()
        self.source_names: dict[str, str] = {}
        self.input_shapes = dict(input_shapes or {})
        self.example_inputs: list[torch.Tensor] = []
        self.input_names: list[str] = []
        self.node_name = ""
        self.dynamic_quantized: dict[int, Value] = {}  # a DynamicQuantizeLinear's dynamic_quantize(x), made once
        self.dynamic_batch: dict[str, str] = {}  # input -> its dynamic dim 0's name, unless a shape fixed it
        self.decided_ifs: list[str] = []  # If nodes whose condition was known at import (their branch inlined)

    # ---- values -------------------------------------------------------------------------------------------
    @staticmethod
    def _fold_key(fn: Callable, args, kwargs) -> tuple | None:
        """The same op on the same constants gives the same constant: one weight several nodes read through a
        Transpose each (torch's exporter writes one per use: ALBERT's shared layer, run 4 times, imported as 4
        copies of every weight, 4x the artifact). None (fold anew) for an op on no constant or a random one."""
        if "rand" in getattr(fn, "__name__", ""):
            return None
        seen = []

        def part(a):
            if isinstance(a, Const):
                seen.append(a)
                return ("const", id(a.t))
            if isinstance(a, (list, tuple)):
                return tuple(part(x) for x in a)
            if a is None or a is Ellipsis or isinstance(a, (bool, int, float, str, slice, torch.dtype, torch.device)):
                return (type(a).__name__, repr(a))
            raise TypeError  # (a bare tensor, a sequence value: not keyed by their text)
        try:
            key = (fn, tuple(part(a) for a in args), tuple((k, part(v)) for k, v in sorted(kwargs.items())))
        except TypeError:
            return None
        return key if seen else None

    def _param_node(self, t: torch.Tensor, hint: str) -> fx.Node:
        key = id(t)
        if key not in self.param_nodes:
            base = "".join(c if c.isalnum() else "_" for c in hint) or "const"
            base = base if not base[0].isdigit() else "c_" + base
            name, k = base, 1
            while name in self.param_names:
                name, k = f"{base}_{k}", k + 1
            self.param_names.add(name)
            self.root.register_buffer(name, t)
            self.source_names[name] = hint
            self.param_nodes[key] = self.g.get_attr(name)
            self.param_nodes[key].meta["source_fqn"] = hint
        return self.param_nodes[key]

    def emit(self, fn: Callable, *args: Any, _fold: bool = True, **kwargs: Any) -> Value:
        """Compute fn now if every tensor argument is constant (unless _fold is False: a dequantized weight stays a
        node on its integer parameter), else add a node calling fn."""
        flat = list(args) + list(kwargs.values())
        if _fold and not any(isinstance(a, Dyn) or (isinstance(a, (list, tuple)) and any(isinstance(x, Dyn) for x in a))
                             for a in flat):
            def unwrap(a):
                if isinstance(a, Const):
                    return a.t
                if isinstance(a, (list, tuple)):
                    return type(a)(unwrap(x) for x in a)
                return a
            key = self._fold_key(fn, args, kwargs)
            if key is not None and key in self.folded:
                return self.folded[key][1]
            with torch.no_grad():
                out = Const(fn(*[unwrap(a) for a in args], **{k: unwrap(v) for k, v in kwargs.items()}))
            named = [a.name for a in flat if isinstance(a, Const)]
            if fn in (torch.permute, torch.transpose, _transposed) and len(named) == 1:
                out.name = named[0]  # (a weight's layout change keeps the weight's name: layer.qkv.weight)
            if key is not None:  # (the inputs kept alive with it: the key holds their ids)
                self.folded[key] = ([a.t for a in flat if isinstance(a, Const)], out)
            return out

        def as_node(a):
            if isinstance(a, Dyn):
                return a.node
            if isinstance(a, Const):
                return self._param_node(a.t, a.name or self.node_name)
            if isinstance(a, (list, tuple)):
                return type(a)(as_node(x) for x in a)
            return a

        def as_example(a):
            if isinstance(a, Dyn):
                return a.example
            if isinstance(a, Const):
                return a.t
            if isinstance(a, (list, tuple)):
                return type(a)(as_example(x) for x in a)
            return a
        with torch.no_grad():
            example = fn(*[as_example(a) for a in args], **{k: as_example(v) for k, v in kwargs.items()})
        node = self.g.call_function(fn, tuple(as_node(a) for a in args), {k: as_node(v) for k, v in kwargs.items()})
        return Dyn(node, example)

    def const(self, v: Value | None, what: str) -> torch.Tensor:
        """The value of an input that must be known at import time (shapes, axes, pads...)."""
        if v is None:
            raise UnsupportedOpError(self.node_name, self.op, f"missing {what}")
        if isinstance(v, Dyn):
            raise UnsupportedOpError(self.node_name, self.op, f"its {what} depends on the input data; only shapes "
                                     "computable at import time are supported (static shapes)")
        return v.t

    def ints(self, v: Value | None, what: str) -> list[int]:
        return [int(x) for x in self.const(v, what).reshape(-1).tolist()]

    @staticmethod
    def shape(v: Value) -> tuple[int, ...]:
        return tuple((v.t if isinstance(v, Const) else v.example).shape)

    @staticmethod
    def example(v: Value) -> torch.Tensor:
        return v.t if isinstance(v, Const) else v.example

    # ---- driver -------------------------------------------------------------------------------------------
    @staticmethod
    def _given_shape(name: str, tt, given) -> list[int]:
        """A user-given shape for input `name`, checked against the rank and the fixed dims the model declares."""
        declared = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        return given_shape(name, given, declared or None)

    def import_nodes(self, nodes) -> None:
        """Import `nodes` in order (the graph's, or a constant-condition If's branch), each output into env."""
        for node in nodes:
            self.node_name = node.name or (node.output[0] if node.output else node.op_type)
            self.op = node.op_type
            self.n_outputs = len(node.output)
            key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            handler = HANDLERS.get(key)
            if key in _DYNAMIC_QUANT:
                raise UnsupportedOpError(self.node_name, key, "this is ONNX Runtime's dynamic quantization "
                                         "(quantize_dynamic), whose activation scales are computed on every call; "
                                         "graphopt's int8 kernels take calibrated scales. Give the float model and "
                                         "quantize it here (--pipeline quantize,fold-qdq with --inputs), or use ORT's "
                                         "quantize_static, whose QDQ and QOperator files import")
            if handler is None and node.domain not in ("", "ai.onnx"):
                contrib = sorted(k for k in HANDLERS if "." in k)
                raise UnsupportedOpError(self.node_name, key, "custom-domain op; supported: ONNX's standard ops and "
                                         f"{', '.join(contrib)}. Export the model with standard ONNX ops")
            if handler is None:
                std = sorted(k for k in HANDLERS if "." not in k)
                raise UnsupportedOpError(self.node_name, node.op_type,
                                         f"no importer for this ONNX op (supported: {', '.join(std)})")
            ins = [self.env[n] if n else None for n in node.input]
            for n, v in zip(node.input, ins):
                if n and v is None:
                    raise ModelFileError(f"node '{self.node_name}' reads '{n}', which nothing produces")
            attrs = {a.name: _attr(a) for a in node.attribute}
            try:
                if any(_coded(v) for v in ins) and key not in _READS_CODES and "." not in key:
                    outs = _on_codes(self, key, handler, ins, attrs)
                else:
                    outs = handler(self, ins, attrs)
            except (UnsupportedOpError, ModelFileError):
                raise
            except Exception as e:
                raise UnsupportedOpError(self.node_name, node.op_type, f"import failed: {type(e).__name__}: {e}") from e
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            for name, v in zip(node.output, outs):
                if name:
                    self.env[name] = v

    def run(self) -> Graph:
        import onnx.numpy_helper as nh
        graph = self.model.graph
        inits = {i.name for i in graph.initializer}
        for init in graph.initializer:
            try:
                arr = nh.to_array(init, self.base_dir)  # (weights in external data are read from their file here)
            except (OSError, ValueError) as e:  # (a data file cut short)
                raise ModelFileError(f"initializer '{init.name}' could not be read ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''}); is its data file whole?") from None
            self.env[init.name] = Const(torch.from_numpy(np.array(arr, copy=True)), init.name)
        names = [inp.name for inp in graph.input if inp.name not in inits]
        safe_names = {input_name(n): n for n in names}  # (the graph's name, "input_1" for "input.1", is taken too)
        self.input_shapes = {k if k in names else safe_names.get(k, k): v for k, v in self.input_shapes.items()}
        unknown = sorted(set(self.input_shapes) - set(names))
        if unknown:
            raise InputMismatchError(f"input shape given for {', '.join(map(repr, unknown))}, which the model does "
                                     f"not have; its inputs: {', '.join(map(repr, names))}")
        unfixed = [(inp.name, [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else d.dim_param or "?"
                               for d in inp.type.tensor_type.shape.dim])
                   for inp in graph.input if inp.name not in inits and inp.name not in self.input_shapes]
        unfixed = [(n, dims) for n, dims in unfixed if any(isinstance(d, str) for d in dims[1:])]
        if unfixed:
            raise dynamic_dims_error(unfixed)
        for inp in graph.input:
            if inp.name in inits:
                continue
            tt = inp.type.tensor_type
            dims = []
            given = self.input_shapes.get(inp.name)
            if given is not None:
                dims = self._given_shape(inp.name, tt, given)
            for k, d in enumerate(tt.shape.dim if given is None else ()):
                if d.HasField("dim_value") and d.dim_value > 0:
                    dims.append(int(d.dim_value))
                else:  # (the batch: any other dynamic dim was refused above)
                    log.warning("input '%s' has a dynamic batch dim '%s'; tracing and compiling at batch 1 (an ONNX "
                                "export keeps it dynamic; choose another with --input-shape %s=..., input_shapes= in "
                                "Python)", inp.name, d.dim_param, inp.name)
                    dims.append(1)
            dt = _onnx_dtype(tt.elem_type)
            ex = torch.randn(dims).to(dt) if dt.is_floating_point else torch.zeros(dims, dtype=dt)
            safe = input_name(inp.name)
            first = tt.shape.dim[0] if len(tt.shape.dim) else None
            if (given is None or open_batch(inp.name, given)) and first is not None and not (
                    first.HasField("dim_value") and first.dim_value > 0):
                self.dynamic_batch[safe] = first.dim_param or "batch"
            node = self.g.placeholder(safe)
            self.env[inp.name] = Dyn(node, ex)
            self.example_inputs.append(ex)
            self.input_names.append(safe)
        self.import_nodes(graph.node)
        outputs, out_names = [], []
        for o in graph.output:
            v = self.env[o.name]
            if isinstance(v, Const):  # an output that does not depend on the inputs
                v = Dyn(self.g.call_function(torch.clone, (self._param_node(v.t, o.name),)), v.t.clone())
            if v.node.meta.get("onnx_uint8"):  # a uint8 QuantizeLinear output, kept as int8 inside: shifted back
                v = self.emit(_int8_to_uint8, v)
            outputs.append(v.node)
            out_names.append(o.name)
        self.g.output(tuple(outputs))
        self.g.eliminate_dead_code()  # e.g. a dynamic layer's integer form, superseded by its float one
        gm = fx.GraphModule(self.root, self.g)
        try:
            ep = torch.export.export(gm, tuple(self.example_inputs), strict=False)
        except Exception as e:
            raise ModelFileError(f"the imported ONNX graph could not be exported to ATen: {e}") from e
        g = Graph.from_exported_program(ep, self.input_names, out_names, source="onnx",
                                        source_names=self.source_names, copy=False)
        if self.dynamic_batch and self.decided_ifs:
            # (an If on the traced batch would run its batch-1 branch on every batch of a dynamic export, and the
            # export's own check, rows batched against rows alone, runs that one branch both ways)
            shapes = dict(zip(self.input_names, self.example_inputs))
            log.warning("the model's If node(s) %s were decided at import, at the traced shapes: an ONNX export "
                        "keeps the traced batch (%s)", ", ".join(map(repr, self.decided_ifs)),
                        ", ".join(f"{k}: {list(shapes[k].shape)}" for k in self.dynamic_batch))
            self.dynamic_batch = {}
        if self.dynamic_batch:  # what an ONNX export gives back (targets/onnx/batch.py): the interface taken in
            g.meta["dynamic_batch"] = {"inputs": dict(self.dynamic_batch), "outputs": _output_batch_dims(graph)}
        return g


def _output_batch_dims(graph) -> dict[str, str | None]:
    """Each output's declared dim 0: its name where dynamic, None where the model does not declare it (a fixed dim 0
    is left out)."""
    out: dict[str, str | None] = {}
    for o in graph.output:
        dims = o.type.tensor_type.shape.dim
        if not len(dims):
            out[o.name] = None
        elif not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            out[o.name] = dims[0].dim_param or None
    return out


def _attr(a):
    import onnx.helper as oh
    v = oh.get_attribute_value(a)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list) and v and isinstance(v[0], bytes):
        return [x.decode() for x in v]
    return v


# ---- helpers that become fx call targets (module level, so generated code can name them) ----------------------
def _int8_to_uint8(q):
    return (q.to(torch.int16) + 128).to(torch.uint8)


def _slice(x, axes, starts, ends, steps):
    index = [slice(None)] * x.dim()
    for a, s, e, st in zip(axes, starts, ends, steps):
        index[a] = slice(s, e, st)
    return x[tuple(index)]


def _gather(x, idx, axis):
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    out = torch.index_select(x, axis, idx.reshape(-1))
    return out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1:]))


def _softmax_2d(x, axis, log):
    shape = x.shape
    flat = x.reshape(math.prod(shape[:axis]), -1)
    y = torch.log_softmax(flat, 1) if log else torch.softmax(flat, 1)
    return y.reshape(shape)


def _hard_sigmoid(x, alpha, beta):
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _conv(x, w, b, stride, padding, dilation, groups):
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return fn(x, w, b, stride, padding, dilation, groups)


def _flatten(x, axis):
    return x.reshape(math.prod(x.shape[:axis]), -1)


# ---- op handlers -------------------------------------------------------------------------------------------------
HANDLERS: dict[str, Callable] = {}


def op(*names):
    def deco(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn
    return deco


def _binary(fn):
    return lambda im, ins, at: im.emit(fn, ins[0], ins[1])


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Pow": torch.pow, "Equal": torch.eq,
                   "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
                   "And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
                   "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
                   "BitwiseXor": torch.bitwise_xor}.items():
    if _fn is not None:
        HANDLERS[_name] = _binary(_fn)


@op("Div")
def _div(im, ins, at):
    a = im.example(ins[0])
    if not a.is_floating_point():
        return im.emit(torch.div, ins[0], ins[1], rounding_mode="trunc")
    return im.emit(torch.div, ins[0], ins[1])


@op("Mod")
def _mod(im, ins, at):
    return im.emit(torch.fmod if at.get("fmod", 0) else torch.remainder, ins[0], ins[1])


for _name, _fn in {"Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Erf": torch.erf,
                   "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt, "Neg": torch.neg, "Abs": torch.abs,
                   "Reciprocal": torch.reciprocal, "Not": torch.logical_not, "Floor": torch.floor,
                   "Ceil": torch.ceil, "Sin": torch.sin, "Cos": torch.cos, "Sign": torch.sign,
                   "Softplus": F.softplus, "HardSwish": F.hardswish, "Round": torch.round,
                   "IsNaN": torch.isnan, "Tan": torch.tan, "Asin": torch.asin, "Acos": torch.acos,
                   "Atan": torch.atan, "Sinh": torch.sinh, "Cosh": torch.cosh, "Asinh": torch.asinh,
                   "Acosh": torch.acosh, "Atanh": torch.atanh, "BitwiseNot": torch.bitwise_not}.items():
    HANDLERS[_name] = (lambda f: (lambda im, ins, at: im.emit(f, ins[0])))(_fn)


def _is_inf(x, negative: bool, positive: bool):
    if negative and positive:
        return torch.isinf(x)
    return torch.isneginf(x) if negative else torch.isposinf(x) if positive else torch.zeros_like(x, dtype=torch.bool)


@op("IsInf")
def _is_inf_op(im, ins, at):
    return im.emit(_is_inf, ins[0], bool(at.get("detect_negative", 1)), bool(at.get("detect_positive", 1)))


@op("Identity", "Dropout")
def _identity(im, ins, at):
    return [ins[0]]


@op("Constant")
def _constant(im, ins, at):
    import onnx.numpy_helper as nh
    if "value" in at:
        return Const(torch.from_numpy(np.array(nh.to_array(at["value"]), copy=True)))
    for k, dt in (("value_float", torch.float32), ("value_int", torch.int64)):
        if k in at:
            return Const(torch.tensor(at[k], dtype=dt))
    for k, dt in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if k in at:
            return Const(torch.tensor(list(at[k]), dtype=dt))
    raise UnsupportedOpError(im.node_name, "Constant", f"attribute {sorted(at)} not supported")


@op("LeakyRelu")
def _leaky(im, ins, at):
    return im.emit(F.leaky_relu, ins[0], float(at.get("alpha", 0.01)))


@op("Elu")
def _elu(im, ins, at):
    return im.emit(F.elu, ins[0], float(at.get("alpha", 1.0)))


@op("HardSigmoid")
def _hsig(im, ins, at):
    return im.emit(_hard_sigmoid, ins[0], float(at.get("alpha", 0.2)), float(at.get("beta", 0.5)))


@op("Gelu")
def _gelu(im, ins, at):
    return im.emit(F.gelu, ins[0], approximate=at.get("approximate", "none"))


@op("Clip")
def _clip(im, ins, at):
    lo = at.get("min") if im.opset < 11 else (float(im.const(ins[1], "min")) if len(ins) > 1 and ins[1] else None)
    hi = at.get("max") if im.opset < 11 else (float(im.const(ins[2], "max")) if len(ins) > 2 and ins[2] else None)
    return im.emit(torch.clamp, ins[0], lo, hi)


@op("Softmax", "LogSoftmax")
def _softmax(im, ins, at):
    rank = len(im.shape(ins[0]))
    log_ = im.op == "LogSoftmax"
    axis = int(at.get("axis", -1 if im.opset >= 13 else 1))
    axis = axis + rank if axis < 0 else axis
    if im.opset >= 13 or axis == rank - 1:
        return im.emit(torch.log_softmax if log_ else torch.softmax, ins[0], axis)
    return im.emit(_softmax_2d, ins[0], axis, log_)


@op("MatMul")
def _matmul(im, ins, at):
    a, b = ins
    if isinstance(a, Dyn) and len(im.shape(b)) == 2:
        # a constant (or dequantized constant) right operand is a linear layer's weight: keep it as one for the
        # passes
        w = _linear_weight(im, b, transposed=False)
        if w is not None:
            return im.emit(F.linear, a, w)
    return im.emit(torch.matmul, a, b)


@op("Gemm")
def _gemm(im, ins, at):
    a, b = ins[0], ins[1]
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = float(at.get("alpha", 1.0)), float(at.get("beta", 1.0))
    if at.get("transA", 0):
        a = im.emit(torch.transpose, a, 0, 1)
    w = _linear_weight(im, b, bool(at.get("transB", 0))) if alpha == 1.0 and len(im.shape(b)) == 2 else None
    if w is not None:
        bias = None
        if c is not None and isinstance(c, Const) and c.t.numel() == im.shape(w)[0]:
            bias = Const((c.t.reshape(-1) * beta).contiguous(), c.name)
            c = None
        y = im.emit(F.linear, a, w, bias)
    else:
        if at.get("transB", 0):
            b = im.emit(torch.transpose, b, 0, 1)
        y = im.emit(torch.matmul, a, b)
        if alpha != 1.0:
            y = im.emit(torch.mul, y, alpha)
    if c is not None:
        y = im.emit(torch.add, y, im.emit(torch.mul, c, beta) if beta != 1.0 else c)
    return y


def _pads_same(in_sizes, kernel, strides, dilations, upper):
    pads_b, pads_e = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        pads_b.append(small if upper else big)
        pads_e.append(big if upper else small)
    return pads_b + pads_e


def _spatial_pads(im, at, x_shape, kernel, strides, dilations):
    nd = len(kernel)
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        return _pads_same(x_shape[2:], kernel, strides, dilations, auto == "SAME_UPPER")
    if auto == "VALID":
        return [0] * (2 * nd)
    return list(at.get("pads", [0] * (2 * nd)))


def _torch_pad_order(begins, ends):
    out = []
    for b, e in zip(reversed(begins), reversed(ends)):
        out += [b, e]
    return out


@op("Conv")
def _conv_op(im, ins, at):
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    wshape = im.shape(w)
    nd = len(wshape) - 2
    kernel = list(at.get("kernel_shape", wshape[2:]))
    strides = list(at.get("strides", [1] * nd))
    dil = list(at.get("dilations", [1] * nd))
    pads = _spatial_pads(im, at, im.shape(x), kernel, strides, dil)
    begins, ends = pads[:nd], pads[nd:]
    if begins != ends:
        x = _pad_quantized(im, x, _torch_pad_order(begins, ends))
        begins = [0] * nd
    return im.emit(_conv, x, w, b, strides, begins, dil, int(at.get("group", 1)))


def _pad_quantized(im, x, pads) -> Value:
    """Zero-pad a conv's input; a dequantized one (a Q/DQ or QOperator file) is quantized again onto its grid
    after the pad (exact: 0 is the zero point's code), so fold-qdq still finds the conv's quantized input."""
    y = im.emit(F.pad, x, pads)
    if isinstance(x, Dyn) and x.node.target is torch.ops.graphopt.dequantize_per_tensor.default:
        scale, zp = float(x.node.args[1]), int(x.node.args[2])
        q = _emit_quantize(im, y, scale, zp, False)
        y = im.emit(torch.ops.graphopt.dequantize_per_tensor.default, q, scale, zp)
    return y


def _conv_transpose(x, w, b, stride, output_padding, dilation, groups, crop_begin, crop_end):
    fn = {3: F.conv_transpose1d, 4: F.conv_transpose2d, 5: F.conv_transpose3d}[w.dim()]
    y = fn(x, w, b, stride, 0, output_padding, groups, dilation)
    index = [slice(None), slice(None)] + [slice(a, y.shape[2 + i] - e) for i, (a, e) in
                                          enumerate(zip(crop_begin, crop_end))]
    return y[tuple(index)]


@op("ConvTranspose")
def _conv_transpose_op(im, ins, at):
    """Transposed conv: computed unpadded, then ONNX's pads (any, asymmetric too) cropped off; output_shape and
    auto_pad give the pads as the spec defines them."""
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    wshape, xshape = im.shape(w), im.shape(x)
    nd = len(wshape) - 2
    kernel = list(at.get("kernel_shape", wshape[2:]))
    strides = list(at.get("strides", [1] * nd))
    dil = list(at.get("dilations", [1] * nd))
    out_pad = list(at.get("output_padding", [0] * nd))
    full = [s * (i - 1) + op + (k - 1) * d + 1 for s, i, op, k, d in zip(strides, xshape[2:], out_pad, kernel, dil)]
    auto = at.get("auto_pad", "NOTSET")
    if "output_shape" in at or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = list(at["output_shape"])[-nd:] if "output_shape" in at else [i * s for i, s in zip(xshape[2:], strides)]
        total = [f - t for f, t in zip(full, target)]
        if any(t < 0 for t in total):
            raise UnsupportedOpError(im.node_name, "ConvTranspose", f"output_shape {target} is larger than the "
                                     f"unpadded output {full}")
        begins = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        ends = [t - bg for t, bg in zip(total, begins)]
    else:
        pads = list(at.get("pads", [0] * (2 * nd)))
        begins, ends = pads[:nd], pads[nd:]
    return im.emit(_conv_transpose, x, w, b, strides, out_pad, dil, int(at.get("group", 1)), begins, ends)


def _prelu(x, slope):
    return torch.where(x >= 0, x, x * slope)


@op("PRelu")
def _prelu_op(im, ins, at):
    return im.emit(_prelu, ins[0], ins[1])


def _arg_reduce(x, axis: int, keepdims: bool, largest: bool, last: bool):
    fn = torch.argmax if largest else torch.argmin
    if not last:
        return fn(x, axis, keepdims)
    return x.shape[axis] - 1 - fn(torch.flip(x, [axis]), axis, keepdims)


@op("ArgMax", "ArgMin")
def _arg_op(im, ins, at):
    axis = int(at.get("axis", 0)) % len(im.shape(ins[0]))
    return im.emit(_arg_reduce, ins[0], axis, bool(at.get("keepdims", 1)), im.op == "ArgMax",
                   bool(at.get("select_last_index", 0)))


@op("BitShift")
def _bit_shift(im, ins, at):
    """ONNX's BitShift is on unsigned integers only: a shift by the width or more gives 0, as C on uint64 gives."""
    left = at["direction"] == "LEFT"
    return im.emit(torch.bitwise_left_shift if left else torch.bitwise_right_shift, ins[0], ins[1])


@op("Swish")
def _swish(im, ins, at):
    alpha = float(at.get("alpha", 1.0))
    return im.emit(F.silu, ins[0]) if alpha == 1.0 else im.emit(torch.mul, ins[0], im.emit(
        torch.sigmoid, im.emit(torch.mul, ins[0], alpha)))


def _grid_sample_onnx(x, grid, mode: str, padding: str, align: bool):
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=align)


@op("GridSample")
def _grid_sample(im, ins, at):
    """GridSample (torch's F.grid_sample exports to it from opset 16): ONNX's modes by their torch names (opset 20
    renamed bilinear / bicubic to linear / cubic)."""
    mode = {"linear": "bilinear", "cubic": "bicubic"}.get(at.get("mode", "bilinear"), at.get("mode", "bilinear"))
    return im.emit(_grid_sample_onnx, ins[0], ins[1], mode, at.get("padding_mode", "zeros"),
                   bool(at.get("align_corners", 0)))


@op("AffineGrid")
def _affine_grid(im, ins, at):
    return im.emit(F.affine_grid, ins[0], [int(d) for d in im.ints(ins[1], "size")],
                   align_corners=bool(at.get("align_corners", 0)))


@op("GroupNormalization")
def _group_norm(im, ins, at):
    """GroupNormalization (opset 21: a scale and bias per channel; onnx's checker refuses opset 18's per-group
    form as deprecated)."""
    return im.emit(F.group_norm, ins[0], int(at["num_groups"]), ins[1], ins[2], float(at.get("epsilon", 1e-5)))


def _rms_norm_onnx(x, scale, axis: int, eps: float):
    dims = list(range(axis % x.dim(), x.dim()))
    return x * torch.rsqrt((x * x).mean(dims, keepdim=True) + eps) * scale


@op("RMSNormalization")
def _rms_norm(im, ins, at):
    return im.emit(_rms_norm_onnx, ins[0], ins[1], int(at.get("axis", -1)), float(at.get("epsilon", 1e-5)))


@op("EyeLike")
def _eye_like(im, ins, at):
    """Ones on the k-th diagonal of the input's 2-D shape (a constant)."""
    n, m = (int(d) for d in im.example(ins[0]).shape)
    dtype = _onnx_dtype(at["dtype"]) if "dtype" in at else im.example(ins[0]).dtype
    return Const((torch.arange(m)[None] - torch.arange(n)[:, None] == int(at.get("k", 0))).to(dtype))


def _window(kind: str, size: int, periodic: bool, dtype):
    n = torch.arange(size, dtype=torch.float64)
    length = size if periodic else size - 1
    a = 2 * torch.pi * n / max(length, 1)
    if kind == "HannWindow":
        w = 0.5 - 0.5 * torch.cos(a)
    elif kind == "HammingWindow":
        w = 25 / 46 - 21 / 46 * torch.cos(a)
    else:
        w = 0.42 - 0.5 * torch.cos(a) + 0.08 * torch.cos(2 * a)
    return w.to(dtype)


@op("HannWindow", "HammingWindow", "BlackmanWindow")
def _windows(im, ins, at):
    """The spectral windows (a constant of the size given): ONNX's definitions (Hamming's 25/46, 21/46)."""
    return Const(_window(im.op, int(im.const(ins[0], "size").reshape(-1)[0]), bool(at.get("periodic", 1)),
                         _onnx_dtype(at.get("output_datatype", 1))))


def _attention_onnx(q, k, v, mask, past_k, past_v, nonpad, scale, causal: bool, q_heads, kv_heads, softcap: float,
                    mode: int):
    """ONNX Attention (opset 23+; torch's exporter writes scaled_dot_product_attention as it from opset 23), as
    ONNX's reference computes it: 3-D inputs split into heads, the past keys / values prepended (and returned), a
    mask shorter than the keys padded as masked, a bool mask (True attends) or an additive one, a causal mask
    aligned bottom-right (a query sees the past and itself), per-batch valid lengths (nonpad_kv_seqlen), grouped
    key / value heads repeated, Q and K each scaled by sqrt(scale), softcap before the mask, a row with no key
    allowed all zero. Returns (Y, present_key, present_value, the QK output `mode` asks for)."""
    three = q.dim() == 3
    if three:
        b = q.shape[0]
        q = q.reshape(b, q.shape[1], q_heads, -1).transpose(1, 2)
        k = k.reshape(b, k.shape[1], kv_heads, -1).transpose(1, 2)
        v = v.reshape(b, v.shape[1], kv_heads, -1).transpose(1, 2)
    if past_k is not None:
        k, v = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
    present_k, present_v = k, v
    lq, lk = q.shape[2], k.shape[2]
    s = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(q.shape[3]))
    inf = torch.tensor(float("-inf"), dtype=q.dtype)
    bias = torch.zeros(lq, lk, dtype=q.dtype)
    if mask is not None:
        if mask.shape[-1] < lk:
            fill = torch.zeros if mask.dtype == torch.bool else (lambda *sh, dtype: torch.full(sh, float("-inf"),
                                                                                               dtype=dtype))
            mask = torch.cat([mask, fill(*mask.shape[:-1], lk - mask.shape[-1], dtype=mask.dtype)], -1)
        bias = bias + (torch.where(mask, torch.zeros((), dtype=q.dtype), inf) if mask.dtype == torch.bool else mask)
    rows, cols = torch.arange(lq)[:, None], torch.arange(lk)[None]
    if causal:
        if past_k is None and nonpad is not None:  # per batch: j <= i + valid[b] - lq
            allowed = cols[None] <= rows[None] + (nonpad.reshape(-1, 1, 1) - lq)
            bias = bias + torch.where(allowed, 0.0, inf)[:, None]
        else:
            bias = bias + torch.where(cols <= rows + (past_k.shape[2] if past_k is not None else 0), 0.0, inf)
    if nonpad is not None:
        bias = bias + torch.where(cols[0] < nonpad.reshape(-1, 1), 0.0, inf).reshape(-1, 1, 1, lk)
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each key / value head serves its group
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    qk = torch.matmul(q * s, k.transpose(-1, -2) * s)
    if softcap > 0:
        qk = torch.tanh(qk / softcap) * softcap
    scores = qk + bias
    p = torch.softmax(scores, -1)
    p = torch.where(torch.amax(bias, -1, keepdim=True) == float("-inf"), torch.zeros((), dtype=p.dtype), p)
    y = torch.matmul(p, v)
    if three:
        y = y.transpose(1, 2).reshape(y.shape[0], lq, -1)
    return y, present_k, present_v, {0: qk, 1: qk, 2: scores}.get(mode, p)


@op("Attention")
def _attention(im, ins, at):
    ins = list(ins) + [None] * (7 - len(ins))
    if at.get("left_window_size", -1) != -1 or at.get("right_window_size", -1) != -1:
        raise UnsupportedOpError(im.node_name, "Attention", "a sliding-window Attention; export with the window "
                                 "as an attention mask")
    out = im.emit(_attention_onnx, *ins[:7], at.get("scale"), bool(at.get("is_causal", 0)), at.get("q_num_heads"),
                  at.get("kv_num_heads"), float(at.get("softcap", 0.0)), int(at.get("qk_matmul_output_mode", 0)))
    return [im.emit(_getitem, out, i) for i in range(im.n_outputs)]


def _lp_pool_onnx(x, kernel, strides, pads, p: float, ceil: bool):
    """LpPool: (sum over each window of |x|^p)^(1/p), padding counting as zeros (as ORT): an average pool of |x|^p
    that counts the padding, times the window's size."""
    nd = len(kernel)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    if any(pads[i] != pads[i + nd] for i in range(nd)):  # (uneven padding first, the pool's own even)
        x = F.pad(x, [v for i in reversed(range(nd)) for v in (pads[i], pads[i + nd])])
        pads = [0] * (2 * nd)
    mean = pool(x.abs() ** p, kernel, strides, pads[:nd], ceil, True)
    return (mean * math.prod(kernel)) ** (1.0 / p)


@op("LpPool")
def _lp_pool(im, ins, at):
    kernel = list(at["kernel_shape"])
    nd = len(kernel)
    if at.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(d != 1 for d in at.get("dilations", [])):
        raise UnsupportedOpError(im.node_name, "LpPool", "auto_pad SAME_* or dilations; give explicit pads, no "
                                 "dilation")
    return im.emit(_lp_pool_onnx, ins[0], kernel, list(at.get("strides", [1] * nd)),
                   list(at.get("pads", [0] * 2 * nd)), float(at.get("p", 2)), bool(at.get("ceil_mode", 0)))


def _reverse_sequence(x, lens, batch_axis: int, time_axis: int):
    """Each batch entry's first lens[b] steps along the time axis reversed, the rest kept (a gather)."""
    t = torch.arange(x.shape[time_axis]).reshape([-1 if d == time_axis else 1 for d in range(x.dim())])
    n = lens.to(torch.int64).reshape([-1 if d == batch_axis else 1 for d in range(x.dim())])
    return torch.gather(x, time_axis, torch.where(t < n, n - 1 - t, t).expand(x.shape))


@op("ReverseSequence")
def _reverse_sequence_op(im, ins, at):
    return im.emit(_reverse_sequence, ins[0], ins[1], int(at.get("batch_axis", 1)), int(at.get("time_axis", 0)))


def _center_crop_pad(x, shape, axes):
    """Each axis cut or zero-padded to its size about the centre (an odd difference's extra at the end)."""
    for a, size in zip(axes, shape):
        dim = x.shape[a]
        if size < dim:
            x = x.narrow(a, (dim - size) // 2, size)
        elif size > dim:
            before = (size - dim) // 2
            zeros = [list(x.shape) for _ in range(2)]
            zeros[0][a], zeros[1][a] = before, size - dim - before
            x = torch.cat([x.new_zeros(zeros[0]), x, x.new_zeros(zeros[1])], a)
    return x


@op("CenterCropPad")
def _center_crop_pad_op(im, ins, at):
    rank = len(im.shape(ins[0]))
    shape = [int(v) for v in im.ints(ins[1], "shape")]
    axes = [int(a) % rank for a in at.get("axes", range(rank))]
    return im.emit(_center_crop_pad, ins[0], shape, axes)


@op("InstanceNormalization")
def _instance_norm(im, ins, at):
    return im.emit(F.instance_norm, ins[0], None, None, ins[1], ins[2], True, 0.0, float(at.get("epsilon", 1e-5)))


def _depth_to_space(x, bs: int, crd: bool):
    if crd:
        return F.pixel_shuffle(x, bs)
    n, c, h, w = x.shape
    y = x.reshape(n, bs, bs, c // (bs * bs), h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // (bs * bs), h * bs, w * bs)


def _space_to_depth(x, bs: int):
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs * bs, h // bs, w // bs)


@op("DepthToSpace")
def _d2s(im, ins, at):
    return im.emit(_depth_to_space, ins[0], int(at["blocksize"]), at.get("mode", "DCR") == "CRD")


@op("SpaceToDepth")
def _s2d(im, ins, at):
    return im.emit(_space_to_depth, ins[0], int(at["blocksize"]))


def _selu(x, alpha, gamma):
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@op("Selu")
def _selu_op(im, ins, at):
    return im.emit(_selu, ins[0], float(at.get("alpha", 1.67326319217681884765625)),
                   float(at.get("gamma", 1.05070102214813232421875)))


@op("Celu")
def _celu(im, ins, at):
    return im.emit(F.celu, ins[0], float(at.get("alpha", 1.0)))


def _softsign(x):
    return x / (1 + torch.abs(x))


@op("Softsign")
def _softsign_op(im, ins, at):
    return im.emit(_softsign, ins[0])


def _shrink(x, lambd: float, bias: float):
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, torch.zeros_like(x)))


@op("Shrink")
def _shrink_op(im, ins, at):
    return im.emit(_shrink, ins[0], float(at.get("lambd", 0.5)), float(at.get("bias", 0.0)))


def _thresholded_relu(x, alpha: float):
    return torch.where(x > alpha, x, torch.zeros_like(x))


@op("ThresholdedRelu")
def _thresholded_relu_op(im, ins, at):
    return im.emit(_thresholded_relu, ins[0], float(at.get("alpha", 1.0)))


@op("Mish")
def _mish_op(im, ins, at):
    return im.emit(F.mish, ins[0])


@op("LRN")
def _lrn_op(im, ins, at):
    """Cross-channel LRN: x / (bias + alpha / size * sum of squares over `size` channels)^beta, as
    F.local_response_norm (whose alpha is divided by size the same way)."""
    return im.emit(F.local_response_norm, ins[0], int(at["size"]), float(at.get("alpha", 1e-4)),
                   float(at.get("beta", 0.75)), float(at.get("bias", 1.0)))


def _hardmax(x, axis: int):
    return F.one_hot(torch.argmax(x, axis), x.shape[axis]).to(x.dtype).movedim(-1, axis)


@op("Hardmax")
def _hardmax_op(im, ins, at):
    rank = len(im.shape(ins[0]))
    axis = int(at.get("axis", -1 if im.opset >= 13 else 1)) % rank
    if im.opset < 13 and axis != rank - 1:
        raise UnsupportedOpError(im.node_name, "Hardmax", "opset < 13 flattens the axes from `axis` on; export with "
                                 "opset 13 or later")
    return im.emit(_hardmax, ins[0], axis)


def _one_hot(idx, depth: int, off, on, axis: int):
    idx = torch.where(idx < 0, idx + depth, idx)
    hot = F.one_hot(idx.clamp(0, depth - 1).long(), depth) * ((idx >= 0) & (idx < depth)).unsqueeze(-1)
    return (off + (on - off) * hot.to(on.dtype)).movedim(-1, axis)


@op("Col2Im")
def _col2im(im, ins, at):
    """Col2Im (opset 18; what the dynamo exporter writes for F.fold: MobileViT-v2's patch folding): F.fold with
    the constant image and block shapes; asymmetric pads are refused by name (fold pads both sides alike)."""
    image = [int(v) for v in im.const(ins[1], "image_shape").tolist()]
    block = [int(v) for v in im.const(ins[2], "block_shape").tolist()]
    nd = len(image)
    pads = [int(v) for v in at.get("pads", [0] * (2 * nd))]
    if pads[:nd] != pads[nd:]:
        raise UnsupportedOpError(im.node_name, "Col2Im", f"asymmetric pads {pads} are not supported")
    return im.emit(F.fold, ins[0], image, block, [int(v) for v in at.get("dilations", [1] * nd)], pads[:nd],
                   [int(v) for v in at.get("strides", [1] * nd)])


def _dft(x, length, axis: int, inverse: bool, onesided: bool):
    """ONNX DFT of x [..., 1] (real) or [..., 2] ((re, im) pairs) along signal axis `axis`, by torch.fft's
    transforms (which graphopt's lowering runs as DFT-matrix GEMMs): the complex result as pairs, IRFFT's real one
    as [..., 1]."""
    z = torch.view_as_complex(x) if x.shape[-1] == 2 else x[..., 0]
    if onesided and inverse:
        return torch.fft.irfft(z, n=length, dim=axis)[..., None]
    if onesided:
        return torch.view_as_real(torch.fft.rfft(z, n=length, dim=axis))
    return torch.view_as_real((torch.fft.ifft if inverse else torch.fft.fft)(z, n=length, dim=axis))


@op("DFT")
def _dft_op(im, ins, at):
    """DFT (opset 17: axis an attribute, 20: an input) with its constant dft_length; onesided forward (RFFT) and
    inverse (IRFFT, opset 20's real output)."""
    rank = len(im.shape(ins[0]))
    length = int(im.const(ins[1], "dft_length").reshape(-1)[0]) if len(ins) > 1 and ins[1] else None
    if im.opset >= 20:
        axis = int(im.const(ins[2], "axis").reshape(-1)[0]) if len(ins) > 2 and ins[2] else -2
    else:
        axis = int(at.get("axis", 1))
    axis %= rank
    if axis == rank - 1:
        raise UnsupportedOpError(im.node_name, "DFT", "the axis is the last one, which holds (real, imag): "
                                 "transform a signal axis")
    return im.emit(_dft, ins[0], length, axis, bool(at.get("inverse", 0)), bool(at.get("onesided", 0)))


def _stft(x, step: int, window, frame_length: int, onesided: bool):
    """ONNX STFT of a real signal x [batch, length, 1]: torch.stft without centring or normalization (graphopt's
    lowering runs it as frames x one DFT-matrix GEMM), as [batch, frames, bins, (re, im)]."""
    y = torch.stft(x[..., 0], frame_length, step, frame_length, window, center=False, onesided=onesided,
                   return_complex=True)
    return torch.view_as_real(y.transpose(-1, -2))


@op("STFT")
def _stft_op(im, ins, at):
    """STFT (opset 17) of a real signal with a constant frame step and frame length (the window's, when not
    given)."""
    if im.shape(ins[0])[-1] != 1:
        raise UnsupportedOpError(im.node_name, "STFT", "the signal is complex: graphopt's STFT takes real signals")
    step = int(im.const(ins[1], "frame_step").reshape(-1)[0])
    window = ins[2] if len(ins) > 2 and ins[2] else None
    if len(ins) > 3 and ins[3]:
        length = int(im.const(ins[3], "frame_length").reshape(-1)[0])
    elif window is not None:
        length = int(im.shape(window)[0])
    else:
        raise UnsupportedOpError(im.node_name, "STFT", "neither a window nor a frame_length gives the frame size")
    return im.emit(_stft, ins[0], step, window, length, bool(at.get("onesided", 1)))


@op("OneHot")
def _one_hot_op(im, ins, at):
    depth = int(_scalar(im, ins[1], "depth"))
    values = im.const(ins[2], "values")
    rank = len(im.shape(ins[0])) + 1
    axis = int(at.get("axis", -1)) % rank
    return im.emit(_one_hot, ins[0], depth, Const(values[0].clone()), Const(values[1].clone()), axis)


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}  # ONNX's names -> torch's


def _scatter_elements(x, idx, upd, axis: int, reduction: str):
    idx = torch.where(idx < 0, idx + x.shape[axis], idx)
    if reduction == "none":
        return torch.scatter(x, axis, idx, upd)
    return torch.scatter_reduce(x, axis, idx, upd, _SCATTER_REDUCE[reduction], include_self=True)


@op("ScatterElements", "Scatter")
def _scatter_elements_op(im, ins, at):
    rank = len(im.shape(ins[0]))
    red = at.get("reduction", "none")
    red = red.decode() if isinstance(red, bytes) else red
    return im.emit(_scatter_elements, ins[0], ins[1], ins[2], int(at.get("axis", 0)) % rank, red)


def _scatter_nd(x, idx, upd, reduction: str):
    k = idx.shape[-1]
    flat = torch.zeros((), dtype=torch.int64)
    for d in range(k):  # row-major offset of each index tuple into x's first k dims
        i = idx[..., d]
        flat = flat * x.shape[d] + torch.where(i < 0, i + x.shape[d], i)
    rows = x.reshape(-1, *x.shape[k:])
    upd = upd.reshape(-1, *x.shape[k:])
    flat = flat.reshape(-1, *([1] * (rows.dim() - 1))).expand_as(upd)  # each update row's destination row
    if reduction == "none":
        out = torch.scatter(rows, 0, flat, upd)
    else:
        out = torch.scatter_reduce(rows, 0, flat, upd, _SCATTER_REDUCE[reduction], include_self=True)
    return out.reshape(x.shape)


@op("ScatterND")
def _scatter_nd_op(im, ins, at):
    red = at.get("reduction", "none")
    red = red.decode() if isinstance(red, bytes) else red
    return im.emit(_scatter_nd, ins[0], ins[1], ins[2], red)


def _recurrent(kind: str, x, w, r, b, h0, c0, reverse: bool, linear_before_reset: bool):
    """One direction of ONNX's LSTM / GRU / RNN over x [T, N, I] with their default activations: w [G H, I] and
    r [G H, H] in ONNX's gate order (LSTM i o f c, GRU z r h), b [2 G H] (input then recurrent biases) or None.
    The input projection of all steps is one linear; the steps are unrolled (T is static). Returns (Y [T, N, H],
    last h, last c or None)."""
    hidden = r.shape[1]
    g = r.shape[0] // hidden
    wb = rb = None
    if b is not None:
        wb, rb = b[:g * hidden], b[g * hidden:]
    xw = F.linear(x, w, wb)
    h, c = h0, c0
    outs = [None] * x.shape[0]
    for t in (range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])):
        if kind == "GRU":
            rz, rr, rh = F.linear(h, r, rb).chunk(3, -1)
            xz, xr, xh = xw[t].chunk(3, -1)
            z, rg = torch.sigmoid(xz + rz), torch.sigmoid(xr + rr)
            if linear_before_reset:
                n = torch.tanh(xh + rg * rh)
            else:  # the reset gate applied before the recurrent projection
                n = torch.tanh(xh + F.linear(rg * h, r[2 * hidden:], None if rb is None else rb[2 * hidden:]))
            h = (1 - z) * n + z * h
        else:
            pre = xw[t] + F.linear(h, r, rb)
            if kind == "RNN":
                h = torch.tanh(pre)
            else:
                i, o, f, cc = pre.chunk(4, -1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(cc)
                h = torch.sigmoid(o) * torch.tanh(c)
        outs[t] = h
    return torch.stack(outs, 0), h, c


def _recurrent_both(kind: str, x, ws, rs, bs, h0s, c0s, directions, linear_before_reset: bool):
    """The directions of `_recurrent` stacked as ONNX's outputs: Y [T, D, N, H], Y_h [D, N, H], Y_c [D, N, H]."""
    runs = [_recurrent(kind, x, w, r, b, h0, c0, rev, linear_before_reset)
            for w, r, b, h0, c0, rev in zip(ws, rs, bs, h0s, c0s, directions)]
    y = torch.stack([a[0] for a in runs], 1)
    y_h = torch.stack([a[1] for a in runs], 0)
    y_c = torch.stack([a[2] for a in runs], 0) if kind == "LSTM" else y_h
    return y, y_h, y_c


def _recurrent_torch(kind: str, x, params: list, h0, c0, bidirectional: bool):
    """ONNX's LSTM / GRU as PyTorch's one recurrent layer (weights already in PyTorch's gate order), with ONNX's
    outputs: Y [T, D, N, H], Y_h, Y_c [D, N, H]. Kept whole in the graph (aten.lstm.input / aten.gru.input), so
    the compiler's recurrence kernels take it."""
    if kind == "LSTM":
        y, y_h, y_c = torch.lstm(x, (h0, c0), params, len(params) > 2 * (2 if bidirectional else 1), 1, 0.0, False,
                                 bidirectional, False)
    else:
        y, y_h = torch.gru(x, h0, params, len(params) > 2 * (2 if bidirectional else 1), 1, 0.0, False,
                           bidirectional, False)
        y_c = y_h
    d = 2 if bidirectional else 1
    return y.reshape(y.shape[0], y.shape[1], d, -1).permute(0, 2, 1, 3), y_h, y_c


@op("LSTM", "GRU", "RNN")
def _recurrent_op(im, ins, at):
    """torch.onnx's nn.LSTM / nn.GRU / nn.RNN: ONNX's recurrent ops with their default activations, forward,
    reverse or bidirectional, optional biases and initial states, layout 0; unrolled over the static sequence."""
    kind = im.op
    ins = list(ins) + [None] * (8 - len(ins))
    x, w, r, b, seq_lens, h0, c0 = ins[:7]
    direction = at.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}.get(direction)
    if directions is None:
        raise UnsupportedOpError(im.node_name, kind, f"direction '{direction}': ONNX defines forward, reverse and "
                                 "bidirectional")
    default = {"LSTM": ["sigmoid", "tanh", "tanh"], "GRU": ["sigmoid", "tanh"], "RNN": ["tanh"]}[kind]
    acts = [a.decode() if isinstance(a, bytes) else str(a) for a in at.get("activations", [])]
    if acts and [a.lower() for a in acts] != default * len(directions) or any(
            name in at for name in ("activation_alpha", "activation_beta", "clip")):
        raise UnsupportedOpError(im.node_name, kind, f"activations {acts or default} with alpha / beta / clip: "
                                 f"only the defaults ({', '.join(default)}) without a clip are supported")
    if int(at.get("layout", 0)) or int(at.get("input_forget", 0)) or (len(ins) > 7 and ins[7] is not None):
        raise UnsupportedOpError(im.node_name, kind, "layout=1, input_forget and peepholes are not supported")
    if seq_lens is not None:
        lens = im.const(seq_lens, "sequence_lens")
        if not bool((lens == im.shape(x)[0]).all()):
            raise UnsupportedOpError(im.node_name, kind, "sequence_lens shorter than the sequence (padded batches) "
                                     "are not supported; run each sequence at its length")
    wt, rt = im.const(w, "W"), im.const(r, "R")
    bt = im.const(b, "B") if b is not None else None
    hidden, n = rt.shape[-1], im.shape(x)[1]
    zeros = torch.zeros(n, hidden, dtype=wt.dtype)

    def state(v, d):
        if v is None:
            return Const(zeros.clone())
        return Const(im.const(v, "initial state")[d].clone()) if isinstance(v, Const) else im.emit(_getitem, v, d)
    d_range = range(len(directions))
    if kind != "RNN" and directions != [True] and (kind == "LSTM" or int(at.get("linear_before_reset", 0))):
        # PyTorch's layer (the form torch.onnx exported it from): gates reordered from ONNX's (LSTM i o f c, GRU
        # z r h) to PyTorch's (i f g o, r z n); GRU's linear_before_reset=1 is PyTorch's reset gate
        g = rt.shape[1] // hidden
        order = [0, 2, 3, 1] if kind == "LSTM" else [1, 0, 2]

        def gates(v):
            return Const(torch.cat([v[k * hidden:(k + 1) * hidden] for k in order]).contiguous())
        params = []
        for d in d_range:
            params += [gates(wt[d]), gates(rt[d])]
            if bt is not None:
                params += [gates(bt[d][:g * hidden]), gates(bt[d][g * hidden:])]

        def states(v):
            if v is None:
                return Const(torch.zeros(len(directions), n, hidden, dtype=wt.dtype))
            return Const(im.const(v, "initial state").clone()) if isinstance(v, Const) else v
        out = im.emit(_recurrent_torch, kind, x, params, states(h0), states(c0) if kind == "LSTM" else None,
                      len(directions) == 2)
        return [im.emit(_getitem, out, i) for i in range(3 if kind == "LSTM" else 2)]
    out = im.emit(_recurrent_both, kind, x, [Const(wt[d].contiguous()) for d in d_range],
                  [Const(rt[d].contiguous()) for d in d_range],
                  [None if bt is None else Const(bt[d].contiguous()) for d in d_range],
                  [state(h0, d) for d in d_range],
                  [state(c0, d) if kind == "LSTM" else None for d in d_range], directions,
                  bool(int(at.get("linear_before_reset", 0))))
    return [im.emit(_getitem, out, i) for i in range(3 if kind == "LSTM" else 2)]


def _cumsum(x, axis: int, exclusive: bool, reverse: bool):
    y = torch.flip(x, [axis]) if reverse else x
    y = torch.cumsum(y, axis)
    if exclusive:
        y = y - (torch.flip(x, [axis]) if reverse else x)
    return torch.flip(y, [axis]) if reverse else y


@op("CumSum")
def _cumsum_op(im, ins, at):
    axis = int(im.ints(ins[1], "axis")[0]) % len(im.shape(ins[0]))
    return im.emit(_cumsum, ins[0], axis, bool(at.get("exclusive", 0)), bool(at.get("reverse", 0)))


def _cumprod(x, axis: int, exclusive: bool, reverse: bool):
    """CumProd: exclusive shifts the products one place (a leading 1), not a division (zeros stay exact)."""
    y = torch.flip(x, [axis]) if reverse else x
    if exclusive:
        ones = torch.ones_like(y.narrow(axis, 0, 1))
        y = torch.cat([ones, y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    y = torch.cumprod(y, axis)
    return torch.flip(y, [axis]) if reverse else y


@op("CumProd")
def _cumprod_op(im, ins, at):
    axis = int(im.ints(ins[1], "axis")[0]) % len(im.shape(ins[0]))
    return im.emit(_cumprod, ins[0], axis, bool(at.get("exclusive", 0)), bool(at.get("reverse", 0)))


def _tensor_scatter(cache, update, where, axis: int, circular: bool):
    """TensorScatter (opset 24, a static KV cache's write): update's positions along `axis` written into the cache
    from where[b] on for each batch b (wrapping in circular mode)."""
    steps = update.shape[axis]
    starts = torch.zeros(cache.shape[0], dtype=torch.int64) if where is None else where.to(torch.int64)
    pos = starts.reshape(-1, *[1] * (cache.dim() - 1)) + torch.arange(steps).reshape(
        [steps if d == axis else 1 for d in range(cache.dim())])
    if circular:
        pos = pos % cache.shape[axis]
    return cache.scatter(axis, pos.expand(update.shape), update)


@op("TensorScatter")
def _tensor_scatter_op(im, ins, at):
    rank = len(im.shape(ins[0]))
    return im.emit(_tensor_scatter, ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                   int(at.get("axis", -2)) % rank, at.get("mode", "linear") == "circular")


def _topk(x, k: int, axis: int, largest: bool):
    return torch.topk(x, k, axis, largest, True)


@op("TopK")
def _topk_op(im, ins, at):
    axis = int(at.get("axis", -1)) % len(im.shape(ins[0]))
    k = int(at["k"]) if im.opset < 10 else im.ints(ins[1], "K")[0]  # (an attribute before opset 10)
    out = im.emit(_topk, ins[0], k, axis, bool(at.get("largest", 1)))
    if isinstance(out, Const):
        return [Const(out.t[0]), Const(out.t[1])]
    return [im.emit(_getitem, out, 0), im.emit(_getitem, out, 1)]


def _resize(x, size, scales, mode: str, align_corners):
    if size is not None:
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    return F.interpolate(x, scale_factor=scales, mode=mode, align_corners=align_corners,
                         recompute_scale_factor=False)


@op("Resize", "Upsample")
def _resize_op(im, ins, at):
    """The modes PyTorch and TF exporters write: nearest (asymmetric + floor as PyTorch's nearest, the other
    coordinate and rounding modes through index tables), linear/cubic with half_pixel (align_corners=False) or
    align_corners, antialiased only when upscaling (where the filter is the plain interpolation); N and C
    unscaled."""
    x = ins[0]
    rank = len(im.shape(x))
    mode = at.get("mode", "nearest")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    # opset 10's Resize is Upsample's (X, scales), asymmetric with floor: its later attributes did not exist yet
    # (it had read scales from a third input: "neither scales nor sizes given" for torch's opset-10 exports)
    upsample = im.op == "Upsample" or im.opset < 11
    coord = at.get("coordinate_transformation_mode", "asymmetric" if upsample else "half_pixel")
    coord = coord.decode() if isinstance(coord, bytes) else coord
    nearest = at.get("nearest_mode", "floor" if upsample else "round_prefer_floor")
    nearest = nearest.decode() if isinstance(nearest, bytes) else nearest
    if upsample:  # (opset 7-8's Upsample holds its scales as an attribute)
        scales = [float(v) for v in at["scales"]] if "scales" in at else im.const(ins[1], "scales").tolist()
        sizes = None
    else:
        scales = im.const(ins[2], "scales").tolist() if len(ins) > 2 and ins[2] is not None else []
        sizes = im.ints(ins[3], "sizes") if len(ins) > 3 and ins[3] is not None else None
        if not scales and sizes is None:
            raise UnsupportedOpError(im.node_name, "Resize", "neither scales nor sizes given")
        if scales == []:
            scales = None
    if sizes is not None and (list(sizes[:2]) != list(im.shape(x)[:2])) or \
            scales is not None and any(float(v) != 1.0 for v in scales[:2]):
        raise UnsupportedOpError(im.node_name, im.op, "only the spatial dims may be resized (N and C scales 1)")
    torch_mode = {3: "linear", 4: "bilinear", 5: "trilinear"}.get(rank) if mode == "linear" else \
        ("bicubic" if mode == "cubic" else "nearest")
    if mode == "nearest" and not (coord == "asymmetric" and nearest == "floor"):
        return _nearest_by_index(im, x, sizes, scales, coord, nearest)
    if int(at.get("antialias", 0)) and mode != "nearest" and (
            any(int(o) < int(i) for o, i in zip((sizes or [])[2:], im.shape(x)[2:]))
            or any(float(v) < 1.0 for v in (scales or [])[2:])):
        raise UnsupportedOpError(im.node_name, im.op, "antialiased downscaling (antialias=1) is not supported; "
                                 "resize without antialias or outside the model")
    if mode == "nearest":
        ok, align = True, None
    elif mode in ("linear", "cubic"):
        ok = coord in ("half_pixel", "pytorch_half_pixel", "align_corners") and \
            (mode == "linear" or float(at.get("cubic_coeff_a", -0.75)) == -0.75)
        align = coord == "align_corners"
    else:
        ok, align = False, None
    if not ok or torch_mode is None:
        raise UnsupportedOpError(im.node_name, im.op, f"mode {mode} with coordinate_transformation_mode {coord}"
                                 + (f" and nearest_mode {nearest}" if mode == "nearest" else "")
                                 + "; supported: nearest (asymmetric, floor), linear/cubic (half_pixel, "
                                 "pytorch_half_pixel, align_corners)")
    if coord == "pytorch_half_pixel" and any(o == 1 for o in (sizes or [])[2:]):
        raise UnsupportedOpError(im.node_name, im.op, "pytorch_half_pixel with an output size of 1")
    return im.emit(_resize, x, None if sizes is None else [int(v) for v in sizes[2:]],
                   None if scales is None else [float(v) for v in scales[2:]], torch_mode, align)


def _nearest_source(out: int, inp: int, scale: float, coord: str, rounding: str) -> np.ndarray:
    """ONNX Resize's nearest source index of each output position along one axis (float32, as ORT computes)."""
    x = np.arange(out, dtype=np.float32)
    s = np.float32(scale)
    if coord in ("half_pixel", "pytorch_half_pixel"):
        src = (x + np.float32(0.5)) / s - np.float32(0.5) if out > 1 or coord == "half_pixel" else np.zeros(out)
    elif coord == "asymmetric":
        src = x / s
    elif coord == "align_corners":
        src = x * np.float32((inp - 1) / (out - 1)) if out > 1 else np.zeros(out)
    elif coord == "tf_half_pixel_for_nn":
        src = (x + np.float32(0.5)) / s
    else:
        raise ValueError(coord)
    src = src.astype(np.float32)
    idx = {"floor": np.floor(src), "ceil": np.ceil(src), "round_prefer_floor": np.ceil(src - np.float32(0.5)),
           "round_prefer_ceil": np.floor(src + np.float32(0.5))}[rounding]
    return np.clip(idx, 0, inp - 1).astype(np.int64)


def _nearest_by_index(im, x, sizes, scales, coord, rounding):
    """Nearest Resize with coordinates or rounding PyTorch's nearest has no mode for (TF exporters' half_pixel +
    round_prefer_floor, tf_half_pixel_for_nn, ...): each spatial axis gathered through ONNX's index table."""
    shape = im.shape(x)
    if coord not in ("half_pixel", "pytorch_half_pixel", "asymmetric", "align_corners", "tf_half_pixel_for_nn") or \
            rounding not in ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"):
        raise UnsupportedOpError(im.node_name, im.op, f"nearest with coordinate_transformation_mode {coord} and "
                                 f"nearest_mode {rounding} is not supported")
    y = x
    for a in range(2, len(shape)):
        inp = int(shape[a])
        out = int(sizes[a]) if sizes is not None else int(math.floor(inp * float(scales[a])))
        scale = float(scales[a]) if scales is not None else out / inp
        idx = _nearest_source(out, inp, scale, coord, rounding)
        if out != inp or (idx != np.arange(inp)).any():
            y = im.emit(torch.index_select, y, a, Const(torch.from_numpy(idx)))
    return y


@op("BatchNormalization")
def _bn(im, ins, at):
    x, scale, bias, mean, var = ins[:5]
    eps = float(at.get("epsilon", 1e-5))
    if not at.get("training_mode", 0):
        return [im.emit(F.batch_norm, x, mean, var, scale, bias, False, 0.0, eps)]
    # training_mode=1: the statistics of this input (BiT's weight standardization exports so, a batch norm over
    # the conv weight, in an eval-mode model), population variance; the optional running-stat outputs as ONNX
    # defines them (input * momentum + current * (1 - momentum))
    y = im.emit(F.batch_norm, x, None, None, scale, bias, True, 0.0, eps)
    if im.n_outputs == 1:
        return [y]
    dims = [0, *range(2, len(im.shape(x)))]
    momentum = float(at.get("momentum", 0.9))
    cur_mean, cur_var = im.emit(torch.mean, x, dims), im.emit(torch.var, x, dims, False)
    return [y] + [im.emit(torch.add, im.emit(torch.mul, run, momentum), im.emit(torch.mul, cur, 1.0 - momentum))
                  for run, cur in ((mean, cur_mean), (var, cur_var))]


@op("LayerNormalization")
def _ln(im, ins, at):
    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    shape = im.shape(x)
    axis = int(at.get("axis", -1))
    axis = axis + len(shape) if axis < 0 else axis
    return [im.emit(F.layer_norm, x, list(shape[axis:]), scale, bias, float(at.get("epsilon", 1e-5)))]


@op("GlobalAveragePool", "GlobalMaxPool")
def _gpool(im, ins, at):
    dims = list(range(2, len(im.shape(ins[0]))))
    fn = torch.mean if im.op == "GlobalAveragePool" else torch.amax
    return im.emit(fn, ins[0], dims, True)


def _lp_normalize(x, p: int, axis: int):
    return x / torch.linalg.vector_norm(x, p, dim=axis, keepdim=True)


@op("LpNormalization")
def _lp_normalize_op(im, ins, at):
    """x over its L1 or L2 norm along `axis` (no epsilon, as ONNX: a zero vector gives NaN there too); face
    recognition models write it for their embeddings."""
    p = int(at.get("p", 2))
    if p not in (1, 2):
        raise UnsupportedOpError(im.node_name, "LpNormalization", f"p={p} (ONNX defines p 1 and 2 only)")
    return im.emit(_lp_normalize, ins[0], p, int(at.get("axis", -1)))


def _global_lp_pool(x, p: int, dims: list[int]):
    return torch.linalg.vector_norm(x, p, dim=dims, keepdim=True)


@op("GlobalLpPool")
def _global_lp_pool_op(im, ins, at):
    return im.emit(_global_lp_pool, ins[0], int(at.get("p", 2)), list(range(2, len(im.shape(ins[0])))))


def _mean_variance_normalize(x, axes: list[int]):
    centered = x - x.mean(axes, keepdim=True)
    return centered / torch.sqrt((centered * centered).mean(axes, keepdim=True) + 1e-9)


@op("MeanVarianceNormalization")
def _mean_variance_normalize_op(im, ins, at):
    """(x - mean) / sqrt(variance + 1e-9) over `axes` (default N, H, W: per channel), ONNX's definition."""
    rank = len(im.shape(ins[0]))
    axes = sorted(int(a) % rank for a in at.get("axes", [0, 2, 3]))
    return im.emit(_mean_variance_normalize, ins[0], axes)


@op("MaxPool", "AveragePool")
def _pool(im, ins, at):
    x = ins[0]
    kernel = list(at["kernel_shape"])
    nd = len(kernel)
    strides = list(at.get("strides", [1] * nd))
    dil = list(at.get("dilations", [1] * nd))
    pads = _spatial_pads(im, at, im.shape(x), kernel, strides, dil)
    begins, ends = pads[:nd], pads[nd:]
    ceil = bool(at.get("ceil_mode", 0))
    is_max = im.op == "MaxPool"
    if begins != ends:  # torch pools pad symmetrically: pad explicitly first
        x = im.emit(F.pad, x, _torch_pad_order(begins, ends), "constant", -math.inf if is_max else 0.0)
        begins = [0] * nd
    if is_max:
        fn = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[nd]
        if im.n_outputs > 1:
            return _max_pool_indices(im, ins, at, x, fn, kernel, strides, begins, dil, ceil)
        return [im.emit(fn, x, kernel, strides, begins, dil, ceil)]
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[nd]
    include = bool(at.get("count_include_pad", 0))
    if x is not ins[0] and not include:
        # padded explicitly (asymmetric pads: SAME_UPPER with an even kernel), the pad must not count: the window
        # averages over the padded map divided by each window's share of real pixels (a constant)
        inside = F.pad(torch.ones(1, 1, *im.shape(ins[0])[2:]), _torch_pad_order(pads[:nd], pads[nd:]))
        share = fn(inside, kernel, strides, begins, ceil, True)
        return [im.emit(torch.div, im.emit(fn, x, kernel, strides, begins, ceil, True), Const(share))]
    return [im.emit(fn, x, kernel, strides, begins, ceil, include)]


def _plane_offsets(shape) -> torch.Tensor:
    """(n * C + c) * H * W ... per plane of an [N, C, *spatial] tensor, shaped [N, C, 1, ...]: ONNX's pooling
    indices count over the whole tensor, PyTorch's within a plane."""
    n, c, *sp = (int(d) for d in shape)
    return (torch.arange(n * c, dtype=torch.int64) * math.prod(sp)).reshape(n, c, *[1] * len(sp))


def _max_pool_indices(im, ins, at, x, fn, kernel, strides, begins, dil, ceil):
    """MaxPool's second output, Indices (SegNet / ENet encoders, for a MaxUnpool): PyTorch's plane-local argmax
    indices plus each plane's offset, as ONNX counts them (row-major over the whole input)."""
    if x is not ins[0] or int(at.get("storage_order", 0)):
        raise UnsupportedOpError(im.node_name, "MaxPool", "its Indices output with asymmetric pads or "
                                 "storage_order=1; use symmetric pads and row-major indices")
    both = im.emit(fn, x, kernel, strides, begins, dil, ceil, True)
    values, local = im.emit(_getitem, both, 0), im.emit(_getitem, both, 1)
    return [values, im.emit(torch.add, local, Const(_plane_offsets(im.shape(x))))]


@op("MaxUnpool")
def _max_unpool(im, ins, at):
    """MaxUnpool(X, I[, output_shape]): X's values at ONNX's whole-tensor indices I in a zero tensor (2-D maps:
    PyTorch's max_unpool2d on the plane-local indices)."""
    shape = im.shape(ins[0])
    kernel = list(at["kernel_shape"])
    nd = len(kernel)
    if nd != 2:
        raise UnsupportedOpError(im.node_name, "MaxUnpool", f"{nd}-D unpooling (2-D maps only)")
    strides, pads = list(at.get("strides", [1] * nd)), list(at.get("pads", [0] * 2 * nd))
    if len(ins) > 2 and ins[2] is not None:
        out = [int(d) for d in im.ints(ins[2], "output_shape")]
    else:
        out = [*shape[:2], *((shape[2 + i] - 1) * strides[i] - pads[i] - pads[nd + i] + kernel[i] for i in range(nd))]
    least = [(shape[2 + i] - 1) * strides[i] + 1 for i in range(nd)]  # (the last window's first row / column)
    if len(out) != 4 or out[:2] != list(shape[:2]) or any(o < m for o, m in zip(out[2:], least)):
        raise ModelFileError(f"node '{im.node_name}' (MaxUnpool): output_shape {out} does not fit its input "
                             f"{list(shape)} (N and C as the input's, each map at least {least}); give the "
                             "unpooled tensor's shape, as the MaxPool's input had it")
    local = im.emit(torch.sub, ins[1], Const(_plane_offsets(out)))
    return [im.emit(F.max_unpool2d, ins[0], local, kernel, strides, pads[:nd], out[2:])]


@op("Flatten")
def _flatten_op(im, ins, at):
    rank = len(im.shape(ins[0]))
    axis = int(at.get("axis", 1))
    return im.emit(_flatten, ins[0], axis + rank if axis < 0 else axis)


@op("Reshape")
def _reshape(im, ins, at):
    shape = im.ints(ins[1], "shape")
    src = im.shape(ins[0])
    if not at.get("allowzero", 0):
        shape = [src[i] if s == 0 else s for i, s in enumerate(shape)]
    return im.emit(torch.reshape, ins[0], shape)


@op("Transpose")
def _transpose(im, ins, at):
    rank = len(im.shape(ins[0]))
    perm = list(at.get("perm", list(reversed(range(rank)))))
    return im.emit(torch.permute, ins[0], perm)


def _axes(im, ins, at, idx=1):
    if "axes" in at:
        return list(at["axes"])
    if len(ins) > idx and ins[idx] is not None:
        return im.ints(ins[idx], "axes")
    return None


@op("Squeeze")
def _squeeze(im, ins, at):
    shape = im.shape(ins[0])
    axes = _axes(im, ins, at)
    axes = [i for i, s in enumerate(shape) if s == 1] if axes is None else [a % len(shape) for a in axes]
    new = [s for i, s in enumerate(shape) if i not in axes]
    return im.emit(torch.reshape, ins[0], new)


@op("Unsqueeze")
def _unsqueeze(im, ins, at):
    shape = list(im.shape(ins[0]))
    given = _axes(im, ins, at) or []
    axes = sorted(a % (len(shape) + len(given)) for a in given)
    for a in axes:
        shape.insert(a, 1)
    return im.emit(torch.reshape, ins[0], shape)


@op("Concat")
def _concat(im, ins, at):
    vals = [v for v in ins if v is not None]
    nonempty = [v for v in vals if math.prod(im.shape(v)) > 0]
    return im.emit(torch.cat, nonempty or vals[:1], int(at["axis"]))


@op("Split")
def _split(im, ins, at):
    shape = im.shape(ins[0])
    axis = int(at.get("axis", 0)) % len(shape)
    if "split" in at:
        sizes = list(at["split"])
    elif len(ins) > 1 and ins[1] is not None:
        sizes = im.ints(ins[1], "split")
    else:
        n = int(at.get("num_outputs", 0)) or im.n_outputs
        step = -(-shape[axis] // n)
        sizes = [min(step, shape[axis] - i * step) for i in range(n)]
    out = im.emit(torch.split, ins[0], sizes, axis)
    if isinstance(out, Const):
        return [Const(t) for t in out.t]
    return [im.emit(_getitem, out, i) for i in range(len(sizes))]


def _getitem(x, i):
    return x[i]


@op("Slice")
def _slice_op(im, ins, at):
    shape = im.shape(ins[0])
    if im.opset < 10:
        starts, ends = list(at["starts"]), list(at["ends"])
        axes = list(at.get("axes", range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = im.ints(ins[1], "starts"), im.ints(ins[2], "ends")
        axes = im.ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
        steps = im.ints(ins[4], "steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    axes = [a % len(shape) for a in axes]
    if any(s <= 0 for s in steps):
        if isinstance(ins[0], Const):
            arr = ins[0].t.numpy()
            idx = [slice(None)] * arr.ndim
            for a, s, e, st in zip(axes, starts, ends, steps):
                idx[a] = slice(s, e if abs(e) < 2**62 else None, st)
            return Const(torch.from_numpy(np.ascontiguousarray(arr[tuple(idx)])))
        if any(s == 0 for s in steps):
            raise UnsupportedOpError(im.node_name, "Slice", "a step of 0 is not a slice; fix the exporter's steps")
        # reversed axes of an activation (torch.flip exports as Slice with step -1): the axis's index list as
        # ONNX defines it (Python's slice semantics, INT_MIN ends as open), a flip when it is the whole axis
        # reversed, else an index_select
        x = ins[0]
        for a, st, e, st_ in zip(axes, starts, ends, steps):
            n = shape[a]
            idx = list(range(n))[slice(st, e if abs(e) < 2**62 else None, st_)]
            if idx == list(range(n)):
                continue
            if idx == list(range(n - 1, -1, -1)):
                x = im.emit(torch.flip, x, [a])
            else:
                x = im.emit(torch.index_select, x, a, Const(torch.tensor(idx, dtype=torch.int64)))
        return x
    clamp = lambda v, n: max(-n, min(v, n))  # noqa: E731
    starts = [clamp(s, shape[a]) for s, a in zip(starts, axes)]
    ends = [clamp(e, shape[a]) for e, a in zip(ends, axes)]
    return im.emit(_slice, ins[0], axes, starts, ends, steps)


@op("Gather")
def _gather_op(im, ins, at):
    data, idx = ins
    axis = int(at.get("axis", 0)) % len(im.shape(data))
    if axis == 0 and isinstance(data, Const) and isinstance(idx, Dyn) and data.t.dim() == 2:
        return im.emit(F.embedding, idx, data)
    if isinstance(idx, Const) and idx.t.dim() == 0:
        i = int(idx.t)
        i = i + im.shape(data)[axis] if i < 0 else i
        return im.emit(torch.select, data, axis, i)
    return im.emit(_gather, data, idx, axis)


def _gather_elements(x, idx, axis):
    return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))


@op("GatherElements")
def _gather_elements_op(im, ins, at):
    data, idx = ins
    axis = int(at.get("axis", 0)) % len(im.shape(data))
    return im.emit(_gather_elements, data, idx, axis)


def _gather_nd(x, idx, b):
    """ONNX GatherND: idx[..., :k] picks along x's dims b..b+k-1, the first b dims are shared batch dims."""
    bshape, k = tuple(x.shape[:b]), idx.shape[-1]
    nb = math.prod(bshape)
    xf, idf = x.reshape((nb,) + tuple(x.shape[b:])), idx.reshape((nb,) + tuple(idx.shape[b:]))
    mid = tuple(idf.shape[1:-1])
    sizes = torch.tensor(xf.shape[1:1 + k], dtype=idf.dtype)
    idf = torch.where(idf < 0, idf + sizes, idf)
    batch = torch.arange(nb).reshape((nb,) + (1,) * len(mid))
    out = xf[(batch,) + tuple(idf[..., j] for j in range(k))]
    return out.reshape(bshape + mid + tuple(xf.shape[1 + k:]))


@op("GatherND")
def _gather_nd_op(im, ins, at):
    return im.emit(_gather_nd, ins[0], ins[1], int(at.get("batch_dims", 0)))


def _scalar(im, v, what: str) -> float:
    t = im.const(v, what)
    if t.numel() != 1:
        raise UnsupportedOpError(im.node_name, im.op, f"per-axis {what} ({t.numel()} values) on an activation; only "
                                 "weights (constant inputs) are quantized per channel")
    return t.reshape(-1)[0].item()


@op("QuantizeLinear")
def _quantize_linear(im, ins, at):
    """x -> graphopt.quantize_per_tensor. uint8 (ORT's default activation type) is kept as int8 with the zero
    point moved down by 128: the same grid, so fold-qdq and the int8 kernels take it."""
    x = ins[0]
    scale = float(_scalar(im, ins[1], "scale"))
    zp_t = im.const(ins[2], "zero point") if len(ins) > 2 and ins[2] is not None else torch.zeros(1, dtype=torch.uint8)
    zp = int(_scalar(im, ins[2], "zero point")) if len(ins) > 2 and ins[2] is not None else 0
    if zp_t.dtype == torch.uint8:
        zp -= 128
    elif zp_t.dtype != torch.int8:
        raise UnsupportedOpError(im.node_name, "QuantizeLinear", f"output type {zp_t.dtype}; int8 and uint8 are "
                                 "supported")
    if not scale > 0:
        raise UnsupportedOpError(im.node_name, "QuantizeLinear", f"scale {scale} is not positive")
    if isinstance(x, Const):  # a quantized constant (x * 4 in a QOperator file): its codes as ONNX types them
        lo, hi = (0, 255) if zp_t.dtype == torch.uint8 else (-128, 127)
        code_zp = zp + 128 if zp_t.dtype == torch.uint8 else zp
        return Const(torch.clamp(torch.round(x.t.float() / scale) + code_zp, lo, hi).to(zp_t.dtype))
    return _emit_quantize(im, x, scale, zp, zp_t.dtype == torch.uint8)


def _emit_quantize(im, x, scale: float, zp: int, uint8: bool) -> Value:
    """quantize_per_tensor into int8 codes (zp already moved down by 128 for a uint8 grid); the codes remember
    their grid (`onnx_qparams`), which ops that ONNX Runtime runs on the codes themselves need (see _on_codes)."""
    y = im.emit(torch.ops.graphopt.quantize_per_tensor.default, x, scale, zp, -128, 127, torch.int8)
    if isinstance(y, Dyn):
        y.node.meta["onnx_qparams"] = (scale, zp)
        if uint8:
            y.node.meta["onnx_uint8"] = True  # a DequantizeLinear without a zero point must shift it back too
    return y


def _dq_weight(im, w: Const, scale: torch.Tensor, zp: torch.Tensor, axis: int) -> Dyn:
    """graphopt.dequantize_per_channel of a constant integer weight, remembered on the node (for a linear that
    needs the weight transposed)."""
    y = im.emit(torch.ops.graphopt.dequantize_per_channel.default, w, Const(scale), Const(zp), axis, _fold=False)
    y.node.meta["onnx_dq_weight"] = (w, scale, zp, axis)
    return y


def _transposed(t: torch.Tensor) -> torch.Tensor:
    return t.t().contiguous()


def _linear_weight(im, b, transposed: bool):
    """A linear layer's weight [N, K] from a MatMul/Gemm operand: a constant (transposed as needed), or a
    dequantized constant integer weight re-emitted per output channel (axis 0), so fold-qdq sees linear <- DQ.
    None when b is neither (a computed operand: a matmul)."""
    if isinstance(b, Const):
        return b if transposed else Const(im.emit(_transposed, b).t, b.name)  # (folded once per constant)
    dq = b.node.meta.get("onnx_dq_weight") if isinstance(b, Dyn) else None
    if dq is None or dq[0].t.dim() != 2:
        return None
    w, scale, zp, axis = dq
    if transposed:
        return b
    per_tensor = bool((scale == scale[0]).all() and (zp == zp[0]).all())
    if axis != 1 and not per_tensor:  # scales along K: no per-output-channel form
        return None
    n = w.t.shape[1]
    if per_tensor:
        scale, zp = scale[:1].repeat(n), zp[:1].repeat(n)
    return _dq_weight(im, Const(w.t.t().contiguous(), w.name), scale, zp, 0)


def _dequantize_ref(q, scale, zp, axis):
    shape = [1] * q.dim()
    if scale.numel() > 1:
        shape[axis] = -1
    return (q.to(torch.float32) - zp.to(torch.float32).reshape(shape)) * scale.to(torch.float32).reshape(shape)


@op("DequantizeLinear")
def _dequantize_linear(im, ins, at):
    """int8/uint8 activations (from QuantizeLinear) -> graphopt.dequantize_per_tensor; a constant int8/uint8
    weight -> graphopt.dequantize_per_channel on the integer parameter (per-tensor scales repeated along axis 0),
    which fold-qdq turns into an integer conv/linear; a constant int32 bias is dequantized at import."""
    q = ins[0]
    scale = im.const(ins[1], "scale").to(torch.float32)
    has_zp = len(ins) > 2 and ins[2] is not None
    zp = im.const(ins[2], "zero point") if has_zp else torch.zeros(scale.shape, dtype=im.example(q).dtype)
    rank = len(im.shape(q))
    axis = int(at.get("axis", 1)) % max(rank, 1)
    qdt = im.example(q).dtype
    if isinstance(q, Const) and (qdt not in (torch.int8, torch.uint8) or q.t.dim() < 2):
        # an int32 bias, a quantized scalar (x * 4 in a QDQ file) or vector: no layer's weight, dequantized now
        return im.emit(_dequantize_ref, q, Const(scale), Const(zp), axis)
    # uint8 grids are stored as int8 (see QuantizeLinear); without a zero point the type is the input's
    was_uint8 = isinstance(q, Dyn) and q.node.meta.get("onnx_uint8", False)
    shift = 128 if zp.dtype == torch.uint8 or (not has_zp and was_uint8) else 0
    if isinstance(q, Const):
        w = q.t
        if w.dtype == torch.uint8:
            w = (w.to(torch.int16) - 128).to(torch.int8)
        if scale.numel() == 1:  # per-tensor: one scale per output channel all the same
            axis = 0
            scale = scale.reshape(1).repeat(w.shape[0]) if rank else scale.reshape(1)
            zp = zp.reshape(1).repeat(w.shape[0]) if rank else zp.reshape(1)
        zpi = zp.to(torch.int32) - shift
        return _dq_weight(im, Const(w, q.name), scale.reshape(-1), zpi.reshape(-1), axis)
    if scale.numel() != 1:
        raise UnsupportedOpError(im.node_name, "DequantizeLinear", "per-axis scales on an activation; only weights "
                                 "(constant inputs) are dequantized per channel")
    if qdt == torch.uint8:  # a genuine uint8 tensor (a graph input): its own grid, no shift
        shift = 0
    return im.emit(torch.ops.graphopt.dequantize_per_tensor.default, q, float(scale.reshape(-1)[0]),
                   int(zp.reshape(-1)[0]) - shift)


# ---- ONNX Runtime's QOperator format (quantize_static(quant_format=QOperator), the ONNX model zoo's int8 models) --
# Each QLinear* op is its float op between a dequantize of every quantized input and a quantize of the output: the
# same Q/DQ graph the QDQ format gives, which fold-qdq turns into integer ops.

def _float_op(im, op_type: str, ins, at) -> Value:
    """The float handler of op_type on already dequantized inputs (im.op set to it: some handlers read it)."""
    saved, im.op = im.op, op_type
    try:
        y = HANDLERS[op_type](im, ins, at)
    finally:
        im.op = saved
    return y[0] if isinstance(y, (list, tuple)) else y


def _dq_input(im, x, scale, zp) -> Value:
    """A QLinear op's activation operand dequantized; a constant one (x 4 written as a QLinearMul) at import."""
    if isinstance(x, Const):
        zp_t = im.const(zp, "zero point") if zp is not None else torch.zeros(1)
        return Const(_dequantize_ref(x.t, im.const(scale, "scale"), zp_t, 0))
    return _dequantize_linear(im, [x, scale, zp], {})


def _dq_weight_input(im, w, scale, zp, axis: int) -> Value:
    """A QLinear op's quantized operand: per-channel along `axis` when it is a constant (a weight), per-tensor
    otherwise."""
    if isinstance(w, Const):
        return _dequantize_linear(im, [w, scale, zp], {"axis": axis})
    return _dq_input(im, w, scale, zp)


def _int32_bias(im, b, x_scale, w_scale) -> Const | None:
    """An int32 bias at the accumulator's scale (x_scale x w_scale, per output channel) as float."""
    if b is None:
        return None
    s = im.const(x_scale, "input scale").double().reshape(-1) * im.const(w_scale, "weight scale").double().reshape(-1)
    return Const((im.const(b, "bias").double().reshape(-1) * s).float(), b.name)


def _q_output(im, y, scale, zp) -> Value:
    return y if scale is None else _quantize_linear(im, [y, scale, zp], {})


def _no_channels_last(im, at):
    if at.get("channels_last", 0):
        raise UnsupportedOpError(im.node_name, im.op, "channels_last=1 (NHWC) is not supported; ONNX Runtime "
                                 "writes it only when optimizing for NHWC: give the model as quantized, before that")


def _opt(ins, k):
    return ins[k] if len(ins) > k else None


@op("QLinearConv")
def _qlinear_conv(im, ins, at):
    x, xs, xz, w, ws, wz, ys, yz = (_opt(ins, k) for k in range(8))
    wf = _dq_weight_input(im, w, ws, wz, 0)
    return _q_output(im, _float_op(im, "Conv", [_dq_input(im, x, xs, xz), wf, _int32_bias(im, _opt(ins, 8), xs, ws)],
                                   at), ys, yz)


@op("QLinearMatMul")
def _qlinear_matmul(im, ins, at):
    a, as_, az, b, bs, bz, ys, yz = (_opt(ins, k) for k in range(8))
    bf = _dq_weight_input(im, b, bs, bz, len(im.shape(b)) - 1)
    return _q_output(im, _float_op(im, "MatMul", [_dq_input(im, a, as_, az), bf], at), ys, yz)


@op("com.microsoft.QGemm")
def _qgemm(im, ins, at):
    a, as_, az, b, bs, bz, c, ys, yz = (_opt(ins, k) for k in range(9))
    bf = _dq_weight_input(im, b, bs, bz, 0 if at.get("transB", 0) else 1)
    y = _float_op(im, "Gemm", [_dq_input(im, a, as_, az), bf, _int32_bias(im, c, as_, bs)],
                  {k: v for k, v in at.items() if k in ("transA", "transB", "alpha")})
    return _q_output(im, y, ys, yz)


def _qlinear_binary(op_type):
    def handler(im, ins, at):
        a, as_, az, b, bs, bz, ys, yz = (_opt(ins, k) for k in range(8))
        return _q_output(im, _float_op(im, op_type, [_dq_input(im, a, as_, az), _dq_input(im, b, bs, bz)], at),
                         ys, yz)
    return handler


def _qlinear_unary(op_type):
    def handler(im, ins, at):
        _no_channels_last(im, at)
        x, xs, xz, ys, yz = (_opt(ins, k) for k in range(5))
        at = {k: v for k, v in at.items() if k != "channels_last"}
        return _q_output(im, _float_op(im, op_type, [_dq_input(im, x, xs, xz)], at), ys, yz)
    return handler


for _name in ("Add", "Mul"):
    HANDLERS[f"com.microsoft.QLinear{_name}"] = _qlinear_binary(_name)
for _name in ("GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Softmax"):
    HANDLERS[f"com.microsoft.QLinear{_name}"] = _qlinear_unary(_name)


@op("com.microsoft.QLinearConcat")
def _qlinear_concat(im, ins, at):
    ys, yz, rest = ins[0], ins[1], ins[2:]
    parts = [_dq_input(im, *rest[k:k + 3]) for k in range(0, len(rest), 3)]
    return _q_output(im, _float_op(im, "Concat", parts, at), ys, yz)


# Ops that ONNX Runtime's QOperator files apply to the uint8/int8 codes themselves. Moving codes around is exact
# on graphopt's int8 codes (uint8 ones are kept shifted down by 128, an order-preserving shift), and the result keeps
# its input's grid; Resize and Pad (whose constant is a code) run on the dequantized values and are quantized back
# onto the same grid. Any other op reads the raw codes, as ONNX defines (uint8 ones shifted back first).
_CODE_MOVES = {"Reshape", "Squeeze", "Unsqueeze", "Transpose", "Flatten", "Split", "Gather", "Slice", "Concat",
               "MaxPool", "Identity", "Expand", "Tile", "DepthToSpace", "SpaceToDepth", "ArgMax", "ArgMin"}
_ON_DEQUANTIZED = {"Resize", "Upsample", "Pad"}
_READS_CODES = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "Shape", "Size"}


def _coded(v) -> bool:
    return isinstance(v, Dyn) and "onnx_qparams" in v.node.meta


def _on_codes(im, key: str, handler, ins, at):
    """Run a float op's handler on inputs of which some are int8 codes of a QOperator file (see _CODE_MOVES)."""
    coded = [v for v in ins if _coded(v)]
    grids = {(v.node.meta["onnx_qparams"], bool(v.node.meta.get("onnx_uint8"))) for v in coded}
    if key in _CODE_MOVES:
        outs = handler(im, ins, at)
        if len(grids) == 1:
            (qparams, uint8), = grids
            for o in outs if isinstance(outs, (list, tuple)) else [outs]:
                if isinstance(o, Dyn) and o.example.dtype == torch.int8:
                    o.node.meta["onnx_qparams"] = qparams
                    if uint8:
                        o.node.meta["onnx_uint8"] = True
        return outs
    if key in _ON_DEQUANTIZED:
        if len(grids) != 1:
            raise UnsupportedOpError(im.node_name, key, "quantized inputs on different grids")
        ((scale, zp), uint8), = grids
        deq = [im.emit(torch.ops.graphopt.dequantize_per_tensor.default, v, scale, zp) if _coded(v) else v
               for v in ins]
        if key == "Pad":  # its constant is a code on the input's grid
            code_zp = zp + 128 if uint8 else zp
            if len(deq) > 2 and deq[2] is not None:
                deq[2] = Const((im.const(deq[2], "constant value").double() - code_zp).float() * scale)
            elif "value" in at:
                at = dict(at, value=(float(at["value"]) - code_zp) * scale)
            elif im.opset >= 11:  # no constant: pads with code 0, which is not the grid's zero
                deq = (deq + [None] * 3)[:2] + [Const(torch.tensor(-code_zp * scale, dtype=torch.float32))]
            else:
                at = dict(at, value=-code_zp * scale)
        outs = handler(im, deq, at)
        single = not isinstance(outs, (list, tuple))
        outs = [_emit_quantize(im, o, scale, zp, uint8) if im.example(o).is_floating_point() else o
                for o in ([outs] if single else outs)]
        return outs[0] if single else outs
    return handler(im, [im.emit(_int8_to_uint8, v) if _coded(v) and v.node.meta.get("onnx_uint8") else v
                        for v in ins], at)


_DYNAMIC_QUANT = {"com.microsoft.DynamicQuantizeLSTM"}


# ---- ONNX Runtime's dynamic quantization (quantize_dynamic: Hugging Face Optimum's and transformers.js's
# "model_quantized.onnx"): x -> DynamicQuantizeLinear -> (codes, scale, zero point), MatMulInteger / ConvInteger of
# the codes and an integer weight, Cast, and a Mul by (scale x the weight's scale). Every op imports exactly on its
# own (integer values in float); where the whole pattern is there, the layer becomes what it computes: a float
# linear / conv of graphopt.dynamic_quantize(x) (x on its own per-call uint8 grid) and the dequantized int8 weight,
# which `quantize` makes static (calibrated) and fold-qdq turns into integer kernels.

def _dyn_codes(x):
    scale, zp = dynamic_qparams(x)
    return torch.clamp(torch.round(x / scale) + zp, 0, 255).to(torch.uint8)


def _dyn_scale(x):
    return dynamic_qparams(x)[0]


def _dyn_zero_point(x):
    return dynamic_qparams(x)[1].to(torch.uint8)


def _dynq(v) -> dict | None:
    """What a DynamicQuantizeLinear output (or a product of its scale) is, from the importer's notes."""
    return v.node.meta.get("onnx_dynq") if isinstance(v, Dyn) else None


@op("DynamicQuantizeLinear")
def _dynamic_quantize_linear(im, ins, at):
    x = ins[0]
    if im.example(x).dtype != torch.float32:
        raise UnsupportedOpError(im.node_name, "DynamicQuantizeLinear", "a float32 input is supported")
    outs = [im.emit(f, x) for f in (_dyn_codes, _dyn_scale, _dyn_zero_point)]
    if isinstance(x, Dyn):
        for role, v in zip(("codes", "scale", "zp"), outs):
            v.node.meta["onnx_dynq"] = {"role": role, "x": x, "id": id(outs[0].node)}
    return outs


def _shifted(im, q, zp, axis: int) -> Value:
    """float(q) - zero point (a scalar, or a vector along `axis`): the integer operand an integer op multiplies."""
    zp = zp if zp is not None else Const(torch.zeros((), dtype=torch.float32))
    return im.emit(_minus_zero_point, q, zp, axis)


def _minus_zero_point(q, zp, axis):
    shape = [1] * q.dim()
    shape[axis] = -1
    zp = zp.to(torch.float32)
    return q.to(torch.float32) - (zp.reshape(shape) if zp.numel() > 1 else zp.reshape(()))


def _integer_op(op_type: str):
    """MatMulInteger / ConvInteger: the float op of the zero-point-shifted integer operands (exact while the sums
    stay under 2^24), as int32; noted for the Mul that scales it when A is a DynamicQuantizeLinear's codes."""
    def handler(im, ins, at):
        a, b = ins[0], ins[1]
        a_zp = ins[2] if len(ins) > 2 else None
        b_zp = ins[3] if len(ins) > 3 else None
        b_axis = 1 if op_type == "MatMul" else 0  # a MatMul's B zero points are per column, a Conv's per filter
        acc = _float_op(im, op_type, [_shifted(im, a, a_zp, 0), _shifted(im, b, b_zp, b_axis)], at)
        y = im.emit(torch.Tensor.to, im.emit(torch.round, acc), torch.int32)
        dq, dz = _dynq(a), _dynq(a_zp)
        if (isinstance(y, Dyn) and dq and dq["role"] == "codes" and dz and dz["role"] == "zp" and dz["id"] == dq["id"]
                and isinstance(b, Const) and b.t.dtype in (torch.int8, torch.uint8) and b.t.dim() >= 2
                and (b_zp is None or isinstance(b_zp, Const))):
            y.node.meta["onnx_dyn_acc"] = {"op": op_type, "dynq": dq, "w": b, "w_zp": b_zp, "at": dict(at)}
        return y
    return handler


HANDLERS["MatMulInteger"] = _integer_op("MatMul")
HANDLERS["ConvInteger"] = _integer_op("Conv")


def _dynamic_layer(im, acc: dict, w_scale: torch.Tensor) -> Value:
    """linear / conv of dynamic_quantize(x) and the dequantized integer weight: what MatMulInteger -> Cast -> Mul
    by (x's scale x the weight's) computes."""
    dq = acc["dynq"]
    cache = im.dynamic_quantized
    if dq["id"] not in cache:
        cache[dq["id"]] = im.emit(torch.ops.graphopt.dynamic_quantize.default, dq["x"])
    w, w_zp = acc["w"], acc["w_zp"]
    axis = 1 if acc["op"] == "MatMul" else 0
    zp = w_zp.t if w_zp is not None else torch.zeros((), dtype=w.t.dtype)
    w_dq = _dequantize_linear(im, [w, Const(w_scale.reshape(-1)), Const(zp.reshape(-1))], {"axis": axis})
    return _float_op(im, acc["op"], [cache[dq["id"]], w_dq], acc["at"])


def _mul_dynamic(im, ins, at):
    """Mul, noting a DynamicQuantizeLinear scale times a constant (the weight's scale), and completing the dynamic
    layer pattern when an integer op's accumulator is multiplied by that product."""
    y = im.emit(torch.mul, ins[0], ins[1])
    for p, q in ((ins[0], ins[1]), (ins[1], ins[0])):
        d = _dynq(p)
        if d and d["role"] == "scale" and isinstance(q, Const) and isinstance(y, Dyn):
            y.node.meta["onnx_dynq"] = {"role": "scale_product", "id": d["id"], "w_scale": q.t.to(torch.float32)}
        acc = p.node.meta.get("onnx_dyn_acc") if isinstance(p, Dyn) else None
        prod = _dynq(q)
        if acc and prod and prod["role"] == "scale_product" and prod["id"] == acc["dynq"]["id"]:
            n_out = acc["w"].t.shape[1 if acc["op"] == "MatMul" else 0]
            if prod["w_scale"].numel() in (1, n_out):
                return _dynamic_layer(im, acc, prod["w_scale"])
    return y


HANDLERS["Mul"] = _mul_dynamic


def _cast_keeping_notes(im, ins, at):
    """Cast; an integer op's accumulator cast to float stays noted (ORT writes MatMulInteger -> Cast -> Mul)."""
    y = _cast(im, ins, at)
    acc = ins[0].node.meta.get("onnx_dyn_acc") if isinstance(ins[0], Dyn) else None
    if acc and isinstance(y, Dyn) and y.example.dtype == torch.float32:
        y.node.meta["onnx_dyn_acc"] = acc
    return y


@op("com.microsoft.DynamicQuantizeMatMul")
def _dynamic_quantize_matmul(im, ins, at):
    """A = float; B integer, its scale and zero point; optional bias: linear(dynamic_quantize(A), dequantized B)."""
    a, b, b_scale = ins[0], ins[1], ins[2]
    b_zp = ins[3] if len(ins) > 3 else None
    bias = ins[4] if len(ins) > 4 else None
    a_q = im.emit(torch.ops.graphopt.dynamic_quantize.default, a)
    zp = b_zp if b_zp is not None else Const(torch.zeros((), dtype=im.example(b).dtype))
    y = _float_op(im, "MatMul", [a_q, _dequantize_linear(im, [b, b_scale, zp], {"axis": 1})], {})
    return im.emit(torch.add, y, bias) if bias is not None else y


@op("com.microsoft.MatMulIntegerToFloat")
def _matmul_integer_to_float(im, ins, at):
    """(A - a_zp) a_scale @ (B - b_zp) b_scale (+ bias); A's scale may be computed (a DynamicQuantizeLinear's)."""
    a, b, a_scale, b_scale = ins[:4]
    a_zp = ins[4] if len(ins) > 4 else None
    b_zp = ins[5] if len(ins) > 5 else None
    bias = ins[6] if len(ins) > 6 else None
    dq, ds = _dynq(a), _dynq(a_scale)
    if (dq and dq["role"] == "codes" and ds and ds["role"] == "scale" and ds["id"] == dq["id"]
            and isinstance(b, Const) and isinstance(b_scale, Const) and (b_zp is None or isinstance(b_zp, Const))):
        acc = {"op": "MatMul", "dynq": dq, "w": b, "w_zp": b_zp, "at": {}}
        y = _dynamic_layer(im, acc, b_scale.t.to(torch.float32))
    else:
        a_f = im.emit(torch.mul, _shifted(im, a, a_zp, 0), a_scale)
        b_f = im.emit(torch.mul, _shifted(im, b, b_zp, 1), b_scale)
        y = _float_op(im, "MatMul", [a_f, b_f], {})
    return im.emit(torch.add, y, bias) if bias is not None else y


@op("Shape")
def _shape_op(im, ins, at):
    shape = list(im.shape(ins[0]))
    start, end = at.get("start", 0), at.get("end", len(shape))
    return Const(torch.tensor(shape[start:end], dtype=torch.int64))


@op("Size")
def _size(im, ins, at):
    return Const(torch.tensor(math.prod(im.shape(ins[0])), dtype=torch.int64))


@op("ConstantOfShape")
def _cos(im, ins, at):
    import onnx.numpy_helper as nh
    shape = im.ints(ins[0], "shape")
    value = torch.from_numpy(np.array(nh.to_array(at["value"]), copy=True)).reshape(-1) if "value" in at else \
        torch.zeros(1)
    return Const(torch.full(shape, value[0].item(), dtype=value.dtype))


@op("Expand")
def _expand(im, ins, at):
    shape = im.ints(ins[1], "shape")
    target = list(np.broadcast_shapes(im.shape(ins[0]), tuple(shape)))
    return im.emit(torch.Tensor.expand, ins[0], target)


@op("Range")
def _range(im, ins, at):
    s, e, d = (im.const(v, "range bound") for v in ins)
    return Const(torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype))


@op("Cast")
def _cast(im, ins, at):
    return im.emit(torch.Tensor.to, ins[0], _onnx_dtype(int(at["to"])))


HANDLERS["Cast"] = _cast_keeping_notes


@op("CastLike")
def _castlike(im, ins, at):
    return im.emit(torch.Tensor.to, ins[0], im.example(ins[1]).dtype)


@op("Where")
def _where(im, ins, at):
    return im.emit(torch.where, ins[0], ins[1], ins[2])


@op("Min", "Max", "Sum", "Mean")
def _variadic(im, ins, at):
    fn = {"Min": torch.minimum, "Max": torch.maximum, "Sum": torch.add, "Mean": torch.add}[im.op]
    acc = ins[0]
    for v in ins[1:]:
        acc = im.emit(fn, acc, v)
    if im.op == "Mean":
        acc = im.emit(torch.div, acc, float(len(ins)))
    return acc


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare", "ReduceL1",
    "ReduceLogSum", "ReduceLogSumExp")
def _reduce(im, ins, at):
    rank = len(im.shape(ins[0]))
    axes = list(at["axes"]) if "axes" in at else (im.ints(ins[1], "axes") if len(ins) > 1 and ins[1] is not None
                                                  else None)
    keep = bool(at.get("keepdims", 1))
    if not axes:
        if at.get("noop_with_empty_axes", 0):
            return ins[0]
        axes = list(range(rank))
    axes = [a % rank for a in axes]
    x = ins[0]
    if im.op == "ReduceMean":
        return im.emit(torch.mean, x, axes, keep)
    if im.op == "ReduceSum":
        return im.emit(torch.sum, x, axes, keep)
    if im.op == "ReduceSumSquare":
        return im.emit(torch.sum, im.emit(torch.mul, x, x), axes, keep)
    if im.op == "ReduceL2":
        return im.emit(torch.sqrt, im.emit(torch.sum, im.emit(torch.mul, x, x), axes, keep))
    if im.op == "ReduceL1":
        return im.emit(torch.sum, im.emit(torch.abs, x), axes, keep)
    if im.op == "ReduceLogSum":
        return im.emit(torch.log, im.emit(torch.sum, x, axes, keep))
    if im.op == "ReduceLogSumExp":
        return im.emit(torch.logsumexp, x, axes, keep)
    if im.op == "ReduceMax":
        return im.emit(torch.amax, x, axes, keep)
    if im.op == "ReduceMin":
        return im.emit(torch.amin, x, axes, keep)
    for a in sorted(axes, reverse=True):
        x = im.emit(torch.prod, x, a, keep)
    return x


@op("Pad")
def _pad(im, ins, at):
    rank = len(im.shape(ins[0]))
    mode = at.get("mode", "constant")
    if im.opset < 11:
        pads, value = list(at["pads"]), float(at.get("value", 0.0))
    else:
        pads = im.ints(ins[1], "pads")
        value = float(im.const(ins[2], "constant value").reshape(-1)[0]) if len(ins) > 2 and ins[2] is not None \
            else 0.0
    axes = im.ints(ins[3], "axes") if len(ins) > 3 and ins[3] is not None else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    n = len(axes)
    for k, a in enumerate(axes):
        begins[a % rank], ends[a % rank] = pads[k], pads[k + n]
    torch_pads = _torch_pad_order(begins, ends)
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    tmode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
    if tmode == "constant":
        return im.emit(F.pad, ins[0], torch_pads, "constant", value)
    return im.emit(F.pad, ins[0], torch_pads, tmode)


@op("Tile")
def _tile(im, ins, at):
    return im.emit(torch.Tensor.repeat, ins[0], im.ints(ins[1], "repeats"))


@op("Einsum")
def _einsum(im, ins, at):
    return im.emit(torch.einsum, at["equation"], *ins)


def _subgraph_constants(im, graph) -> dict:
    """A control-flow body's own initializers (an If branch's, a Loop or Scan body's) as constants by name."""
    import onnx.numpy_helper as nh
    return {i.name: Const(torch.from_numpy(np.array(nh.to_array(i, im.base_dir), copy=True)), i.name)
            for i in graph.initializer}


@op("If")
def _if_op(im, ins, at):
    """An If whose condition is known at import (a shape check an exporter left in, a constant flag): the branch
    it takes, inlined (its nodes read the outer graph's values as ONNX scoping allows). One whose condition depends on
    the input data: both branches inlined and a where per output picking the side on each call (both computed), when
    the branches' outputs have one shape and dtype; else refused by name (graphopt compiles one static graph)."""
    name = im.node_name
    cond = ins[0]

    def branch_outputs(branch):
        im.env.update(_subgraph_constants(im, branch))
        im.import_nodes(branch.node)
        im.node_name, im.op = name, "If"
        return [im.env[o.name] for o in branch.output]

    if isinstance(cond, Dyn):  # on the data: both branches, a where per output (one static graph)
        sides = [branch_outputs(at["then_branch"]), branch_outputs(at["else_branch"])]
        shape, dtype = im.shape, (lambda v: im.example(v).dtype)
        for k, (t, f) in enumerate(zip(*sides)):
            if shape(t) != shape(f) or dtype(t) != dtype(f):
                raise UnsupportedOpError(name, "If", f"its condition depends on the input data and its branches' "
                                         f"output {k} differ ({list(shape(t))} {dtype(t)} against {list(shape(f))} "
                                         f"{dtype(f)}); graphopt compiles one static graph: export the model with "
                                         "the branch fixed, or cut the If out")
        pick = im.emit(torch.reshape, cond, [])
        return [im.emit(torch.where, pick, t, f) for t, f in zip(*sides)]
    branch = at["then_branch"] if bool(cond.t.reshape(-1)[0]) else at["else_branch"]
    im.decided_ifs.append(name)
    return branch_outputs(branch)


def _seq(im, v, what: str) -> list:
    if not isinstance(v, Seq):
        raise UnsupportedOpError(im.node_name, im.op, f"its {what} is not a sequence built in the model")
    return v.items


def _index(im, v, n: int, what: str, insert: bool = False) -> int:
    """A sequence position known at import, counted from the back when negative (ONNX: [-n, n - 1], or [-n, n]
    to insert)."""
    i, top = im.ints(v, what)[0], n + 1 if insert else n
    if not -n <= i < top:
        raise UnsupportedOpError(im.node_name, im.op, f"{what} {i} is outside a sequence of {n}")
    return i + n if i < 0 else i


@op("SequenceEmpty")
def _sequence_empty(im, ins, at):
    return Seq([])


@op("SequenceConstruct")
def _sequence_construct(im, ins, at):
    return Seq(list(ins))


@op("SequenceInsert")
def _sequence_insert(im, ins, at):
    items = list(_seq(im, ins[0], "first input"))
    pos = len(items) if len(ins) < 3 or ins[2] is None else _index(im, ins[2], len(items), "position", True)
    items.insert(pos, ins[1])
    return Seq(items)


@op("SequenceErase")
def _sequence_erase(im, ins, at):
    items = list(_seq(im, ins[0], "first input"))
    if not items:
        raise UnsupportedOpError(im.node_name, "SequenceErase", "its sequence is empty")
    del items[len(items) - 1 if len(ins) < 2 or ins[1] is None else _index(im, ins[1], len(items), "position")]
    return Seq(items)


@op("SplitToSequence")
def _split_to_sequence(im, ins, at):
    x, axis = im.example(ins[0]), int(at.get("axis", 0))
    size = x.shape[axis]
    if len(ins) < 2 or ins[1] is None:  # each slice alone, the axis kept or dropped
        parts = [im.emit(torch.narrow, ins[0], axis, i, 1) for i in range(size)]
        return Seq(parts if at.get("keepdims", 1) else [im.emit(torch.squeeze, p, axis) for p in parts])
    split = im.const(ins[1], "split").reshape(-1).tolist()
    sizes = [int(split[0])] * (size // int(split[0])) + ([size % int(split[0])] if size % int(split[0]) else []) \
        if len(split) == 1 else [int(v) for v in split]
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    return Seq([im.emit(torch.narrow, ins[0], axis, int(a), int(b)) for a, b in zip(starts, sizes)])


@op("SequenceAt")
def _sequence_at(im, ins, at):
    items = _seq(im, ins[0], "first input")
    return items[_index(im, ins[1], len(items), "position")]


@op("SequenceLength")
def _sequence_length(im, ins, at):
    return Const(torch.tensor(len(_seq(im, ins[0], "input")), dtype=torch.int64))


@op("ConcatFromSequence")
def _concat_from_sequence(im, ins, at):
    items = _seq(im, ins[0], "input")
    if not items:
        raise UnsupportedOpError(im.node_name, "ConcatFromSequence", "its sequence is empty")
    axis = int(at["axis"])
    return im.emit(torch.stack if at.get("new_axis", 0) else torch.cat, list(items), axis)


LOOP_NODES = 200_000  # body nodes a Loop may unroll to in all (iterations x body size)


@op("Loop")
def _loop_op(im, ins, at):
    """A Loop whose trip count and stopping condition are known at import (a scripted `for i in range(n)` over
    fixed sizes, a loop an exporter kept): unrolled, each iteration's body imported with its iteration number a
    constant and the carried values of the one before; the scan outputs stacked. One that runs a number of times the
    input data decides is refused by name (graphopt compiles one static graph)."""
    name, body = im.node_name, at["body"]
    trips_in = ins[0] if ins else None
    cond_in = ins[1] if len(ins) > 1 else None

    def refuse(why: str):
        raise UnsupportedOpError(name, "Loop", f"{why}; graphopt compiles one static graph: export the model traced "
                                 "(torch.onnx.export unrolls a Python loop over fixed sizes), or cut the loop out")

    if isinstance(trips_in, Dyn) or isinstance(cond_in, Dyn):
        refuse("its trip count or first condition depends on the input data (a loop run at run time)")
    trips = None if trips_in is None else int(trips_in.t.reshape(-1)[0])
    keep = True if cond_in is None else bool(cond_in.t.reshape(-1)[0])
    if trips is None and cond_in is None:
        refuse("it has neither a trip count nor a condition (an endless loop)")
    b_in, b_out = [i.name for i in body.input], [o.name for o in body.output]
    carried = list(ins[2:])
    scans: list[list] = [[] for _ in range(len(b_out) - 1 - len(carried))]
    inits = _subgraph_constants(im, body)
    i = 0
    while keep and (trips is None or i < trips):
        if (i + 1) * max(len(body.node), 1) > LOOP_NODES:
            refuse(f"unrolled it would pass {LOOP_NODES} nodes ({len(body.node)} a step)")
        im.env.update(inits)
        im.env[b_in[0]] = Const(torch.tensor(i, dtype=torch.int64))
        im.env[b_in[1]] = Const(torch.tensor(keep))
        im.env.update(zip(b_in[2:], carried))
        im.import_nodes(body.node)
        im.node_name, im.op = name, "Loop"
        outs = [im.env[o] for o in b_out]
        if isinstance(outs[0], Dyn):
            refuse("it stops on a condition computed from the input data (a loop run at run time)")
        keep = bool(outs[0].t.reshape(-1)[0])
        carried = outs[1:1 + len(carried)]
        for acc, v in zip(scans, outs[1 + len(carried):]):
            acc.append(v)
        i += 1
    if scans and i == 0:
        refuse("it runs no iteration, so its scan outputs have no shape to take")
    return carried + [im.emit(torch.stack, acc, 0) for acc in scans]


@op("Scan")
def _scan_op(im, ins, at):
    """Scan (tf2onnx's recurrences): unrolled over the scan inputs' length, known at import, each step's body
    imported on that step's slices (reversed where a direction is 1) and the states of the one before; the scan
    outputs stacked along their axes (in reverse where asked)."""
    name, body = im.node_name, at["body"]
    m = int(at["num_scan_inputs"])
    states, xs = list(ins[:len(ins) - m]), list(ins[len(ins) - m:])
    in_axes = list(at.get("scan_input_axes", [0] * m))
    in_dirs = list(at.get("scan_input_directions", [0] * m))
    shape = im.shape
    lengths = {shape(x)[a % len(shape(x))] for x, a in zip(xs, in_axes)}
    if len(lengths) != 1:
        raise UnsupportedOpError(name, "Scan", f"its scan inputs have different lengths ({sorted(lengths)})")
    steps = lengths.pop()
    if steps * max(len(body.node), 1) > LOOP_NODES:
        raise UnsupportedOpError(name, "Scan", f"unrolled it would pass {LOOP_NODES} nodes ({len(body.node)} a "
                                 "step); graphopt compiles one static graph")
    b_in, b_out = [i.name for i in body.input], [o.name for o in body.output]
    k = len(b_out) - len(states)
    out_axes = list(at.get("scan_output_axes", [0] * k))
    out_dirs = list(at.get("scan_output_directions", [0] * k))
    scans: list[list] = [[] for _ in range(k)]
    inits = _subgraph_constants(im, body)
    for t in range(steps):
        im.env.update(inits)
        im.env.update(zip(b_in, states))
        for nm, x, a, d in zip(b_in[len(states):], xs, in_axes, in_dirs):
            im.env[nm] = im.emit(torch.select, x, a % len(shape(x)), steps - 1 - t if d else t)
        im.import_nodes(body.node)
        im.node_name, im.op = name, "Scan"
        outs = [im.env[o] for o in b_out]
        states = outs[:len(states)]
        for acc, v in zip(scans, outs[len(states):]):
            acc.append(v)
    stacked = []
    for acc, a, d in zip(scans, out_axes, out_dirs):
        if not acc:
            raise UnsupportedOpError(name, "Scan", "its scan inputs are empty, so its outputs have no shape")
        rank = len(shape(acc[0])) + 1
        stacked.append(im.emit(torch.stack, acc[::-1] if d else acc, a % rank))
    return states + stacked


@op("Trilu")
def _trilu(im, ins, at):
    k = int(im.const(ins[1], "k")) if len(ins) > 1 and ins[1] is not None else 0
    return im.emit(torch.triu if at.get("upper", 1) else torch.tril, ins[0], k)


def load_onnx(path: str | Path, input_shapes: dict[str, Sequence[int]] | None = None) -> Graph:
    """Read an ONNX file and import it. Corrupt files are ModelFileError; unknown ops are UnsupportedOpError."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"ONNX file '{path}' does not exist")
    from onnx.external_data_helper import uses_external_data
    try:
        model = onnx.load(str(path), load_external_data=False)
        # a model whose weights lie beside it is checked from its file below: loaded, it may pass protobuf's 2 GB
        # limit, past which the in-memory check cannot serialize it (a 2.1 GB linear had failed "to serialize proto")
        external = any(uses_external_data(t) for t in model.graph.initializer)
    except onnx.checker.ValidationError as e:  # (external data is read later, tensor by tensor: see below)
        raise ModelFileError(f"'{path}' is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise ModelFileError(f"'{path}' is not a readable ONNX model (corrupt or truncated?): "
                             f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not model.graph.node:
        raise ModelFileError(f"'{path}' holds no ONNX graph nodes (corrupt, truncated, or not an ONNX model)")
    if external:
        from onnx.external_data_helper import ExternalDataInfo
        for t in model.graph.initializer:
            where = ExternalDataInfo(t).location if uses_external_data(t) else ""
            if where and not (path.parent / where).is_file():
                raise ModelFileError(f"'{path}': its weights are stored outside it (external data) and could not be "
                                     f"read: '{where}' (tensor '{t.name}') is not beside it. Keep the data file(s) "
                                     "next to the .onnx, as exported")
    shapeless = [o for o in model.graph.output if o.type.HasField("tensor_type")
                 and not o.type.tensor_type.HasField("shape")]
    for o in shapeless:  # (ONNX Runtime runs a file whose outputs declare no shape, onnx's checker refuses it:
        o.type.tensor_type.shape.SetInParent()  # the import computes every shape and reads only the outputs' names)
    if shapeless:
        log.info("outputs %s declare no shape; taken as the graph computes them", [o.name for o in shapeless])
    try:
        onnx.checker.check_model(str(path) if external else model)
    except onnx.checker.ValidationError as e:
        raise ModelFileError(f"'{path}' is not a valid ONNX model: {str(e).splitlines()[0]}") from None
    # weights in external data are read tensor by tensor as the import copies them, never into the proto (which
    # holds what it parsed until the import ends: a 2.16 GB linear's import had peaked at 4x its size)
    return Importer(model, input_shapes, str(path.parent) if external else "").run()
