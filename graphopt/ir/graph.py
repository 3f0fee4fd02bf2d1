"""The one IR: an ATen-level torch.fx GraphModule with its parameters as attributes, plus metadata."""
from __future__ import annotations

import copy
import functools
import operator
import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from graphopt.errors import InputMismatchError, cast_hint

DTYPE_NAMES = {
    torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8",
    torch.bool: "bool",
}
DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32; the name used in text, manifests and serialized graphs."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


class _TiesInIndexOrder(TorchDispatchMode):
    """aten.topk with equal values in index order, the lower index first: ONNX's TopK rule, and what TVM's topk in
    the llvm artifacts and ONNX Runtime do; torch.topk leaves the order of ties unspecified (on the CPU it returned
    indices 1, 6, 4 of [1, 3, 3, 2, 3, 0, 3] where the artifact and ONNX Runtime give 1, 2, 4)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.topk.default:
            return _topk_ties_in_order(*args, **kwargs)
        return func(*args, **kwargs)


def _topk_ties_in_order(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002 - aten's own argument name
    values, indices = torch.sort(x, dim=dim, descending=largest, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


_CIA_MATERIALIZED: list = [None]  # the dispatcher's CompositeImplicitAutograd ops when last materialized


def run_decompositions(ep, table: dict | None = None):
    """`ep.run_decompositions(table)`, without a fixed cost of torch's.

    torch walks its C++ dispatcher's CompositeImplicitAutograd registrations (thousands of ops, a getattr each to put
    them in `torch.ops`) once per op namespace, twice a call: ~54 walks for a graph of any size, 0.13 s of a small
    graph's 0.50 s (about 10% of a kernel test file's time, where every test lowers a small graph). A walk only
    creates attributes the first one made, so while the registrations are those of the last walk, this call makes
    none; a library registered since (a new registration list) gets one walk. torch's function is swapped back when
    the call returns."""
    import torch._export.utils as export_utils

    original = export_utils._materialize_cpp_cia_ops

    def materialize_once():
        regs = frozenset(torch._C._dispatch_get_registrations_for_dispatch_key("CompositeImplicitAutograd"))
        if regs != _CIA_MATERIALIZED[0]:
            original()
            _CIA_MATERIALIZED[0] = regs
        export_utils._materialize_cpp_cia_ops = lambda: None  # the rest of this call: nothing can register

    export_utils._materialize_cpp_cia_ops = materialize_once
    operator_base = torch._ops.OperatorBase
    py_impl = operator_base.__dict__["py_impl"]
    operator_base.py_impl = _unannotated(py_impl)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree specs warn when deep-copied: not the user's
            return ep.run_decompositions(table if table is not None else {})
    finally:
        export_utils._materialize_cpp_cia_ops = original
        operator_base.py_impl = py_impl


@functools.lru_cache(maxsize=None)
def _unannotated(func):
    """`func` compiled again from its own source without the annotations of its parameters and returns, its nested
    functions' included; `func` itself where that cannot be done (no source, a closure).

    For torch's `OperatorBase.py_impl` under `run_decompositions`: torch overrides every CompositeImplicitAutograd
    op's kernels for the call (~5700 `py_impl` calls a call), and each call defines a nested function annotated
    `Callable[_P, _T]`, which Python evaluates at every definition: two generic aliases a call, 40% of a small
    graph's `run_decompositions` (0.12 -> 0.075 s, 3 x 6 calls interleaved)."""
    import ast
    import inspect
    import textwrap
    try:
        if func.__code__.co_freevars:
            return func
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError, SyntaxError, AttributeError):
        return func
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
    ast.increment_lineno(tree, func.__code__.co_firstlineno - 1)  # tracebacks name torch's own lines
    scope: dict = {}
    try:
        exec(compile(tree, inspect.getsourcefile(func) or "<unannotated>", "exec"), func.__globals__,  # noqa: S102
             scope)
    except Exception:  # noqa: BLE001 - (a decorator or default that no longer evaluates): torch's own function
        return func
    new = scope.get(func.__name__)
    return new if callable(new) else func


@dataclass(frozen=True)
class TensorSpec:
    """Name, static shape and dtype of a graph input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{','.join(map(str, self.shape))}]"


def _attr_name(fqn: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", fqn) or "param"
    if base[0].isdigit():
        base = "p_" + base
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _inlined_cond(new: fx.Graph, node: fx.Node, owner: torch.nn.Module, env: dict) -> bool:
    """Copy a torch.cond (and what reads it) into `new` as both branches inlined and a where per output, the
    predicate choosing: a static graph computes both sides (TVM has no branch on data here; the branches of a cond
    have the same output shapes and no side effects). True when `node` was one of its parts: the branch modules'
    get_attr (nothing to copy), the cond (a tuple of its outputs' nodes in env), a getitem of it."""
    if node.op == "get_attr" and isinstance(getattr(owner, node.target, None), fx.GraphModule):
        return True
    if node.op == "call_function" and node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
        env[node] = env[node.args[0]][node.args[1]]
        return True
    if not (node.op == "call_function" and node.target is torch.ops.higher_order.cond):
        return False
    pred, true_gm, false_gm, operands = node.args[:4]
    operands = [env[a] if isinstance(a, fx.Node) else a for a in operands]
    sides = []
    for branch in (true_gm, false_gm):
        sub = getattr(owner, branch.target)
        local = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], operands))
        for n in sub.graph.nodes:
            if n.op == "output":
                sides.append([fx.node.map_arg(o, lambda a: local[a]) for o in n.args[0]])
            elif n.op != "placeholder" and not _inlined_cond(new, n, sub, local):
                local[n] = new.node_copy(n, lambda a: local[a])
    if not isinstance(pred, fx.Node):  # a predicate known at export: its side alone
        env[node] = tuple(sides[0] if pred else sides[1])
        return True
    env[node] = tuple(new.call_function(torch.ops.aten.where.self, (env[pred], t, f)) for t, f in zip(*sides))
    return True


_ITEM = (torch.ops.aten.item.default, torch.ops.aten._local_scalar_dense.default)


def _model_line(node: fx.Node) -> str:
    """' (model.py:99: idx[best])': the last frame of the node's stack trace, the user's line; '' without one."""
    lines = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [i for i, ln in enumerate(lines) if ln.strip().startswith("File ")]
    if not frames:
        return ""
    m = re.match(r'\s*File "([^"]+)", line (\d+)', lines[frames[-1]])
    if not m:
        return ""
    code = lines[frames[-1] + 1].strip() if frames[-1] + 1 < len(lines) else ""
    return f" ({m.group(1).rsplit('/', 1)[-1]}:{m.group(2)}{': ' + code if code else ''})"


def _item_as_tensor(new: fx.Graph, node: fx.Node, env: dict) -> bool:
    """A tensor's value read as a Python number (`.item()`, or indexing with a 0-d tensor, which torch reads as a
    number: a Viterbi backtrace's `back[t][best]`, a greedy decoder's `table[token]`) is traced by torch.export as
    an unbacked number, which a static graph cannot hold (shape propagation had failed with torch's
    DataDependentOutputException). Where the number is select's index, the select becomes aten.index with the 0-d
    tensor (the same element, negative indices too); where it is an argument the op takes as a Tensor
    (`y * s.item()`), the 0-d tensor itself (a 0-d tensor promotes types as a Python number does). True when `node`
    was copied here; any other use (a size, a fill value, a slice bound, Python arithmetic) is refused naming
    the node and the model's line."""
    from graphopt.errors import UnsupportedOpError
    from graphopt.ir.printer import target_name

    if node.op != "call_function":
        return False
    if node.target in _ITEM:
        for user in node.users:
            if _select_by_item(user) or (user.op == "call_function" and isinstance(user.target, torch._ops.OpOverload)
                                         and all(isinstance(a.type, torch.TensorType) for a, v in
                                                 zip(user.target._schema.arguments, user.args) if v is node)
                                         and node not in user.kwargs.values()):
                continue
            raise UnsupportedOpError(
                user.name, target_name(user.target),
                f"it takes a tensor's value as a Python number (`{node.name}`: .item(), int(t), or indexing with a "
                f"0-d tensor){_model_line(user) or _model_line(node)}, which a static graph cannot hold: keep it a "
                "tensor (torch.where(t > 0, a, b), x.gather(dim, idx), x * t instead of x * t.item())")
        src, val = env[node.args[0]], node.args[0].meta.get("val")
        if val is not None and val.dim():  # (.item() of a one-element [1]: a 0-d tensor broadcasts as a number)
            src = new.call_function(torch.ops.aten.reshape.default, (src, []))
        if val is not None and val.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
            src = new.call_function(torch.ops.aten._to_copy.default, (src,), {"dtype": torch.int64})  # (index's)
        env[node] = src
        return True
    if _select_by_item(node):
        x, dim, _ = node.args
        dim = dim % max(1, node.args[0].meta["val"].dim())
        env[node] = new.call_function(torch.ops.aten.index.Tensor, (env[x], [None] * dim + [env[node.args[2]]]))
        env[node].meta.update({k: v for k, v in node.meta.items() if k not in ("val", "unbacked_bindings")})
        return True
    return False


def _select_by_item(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.ops.aten.select.int and len(node.args) == 3
            and isinstance(node.args[2], fx.Node) and node.args[2].target in _ITEM)


def _refuse_data_dependent_shapes(ep) -> None:
    """An op whose output size depends on the input's values (nonzero, x[mask], unique, bincount): torch.export
    traces it with an unbacked size, which no static-shape compile can take (it failed later, inside shape
    propagation, with torch's DynamicOutputShapeException)."""
    from graphopt.errors import UnsupportedOpError
    from graphopt.ir.printer import target_name

    def symbolic(val) -> bool:
        return isinstance(val, torch.Tensor) and any(not isinstance(d, int) for d in val.shape)

    if any(symbolic(n.meta.get("val")) for n in ep.graph.nodes if n.op == "placeholder"):
        return  # (dynamic input dims: not this case)
    for n in ep.graph.nodes:
        vals = n.meta.get("val")
        if n.op == "call_function" and any(symbolic(v) for v in (vals if isinstance(vals, (tuple, list)) else [vals])):
            raise UnsupportedOpError(n.name, target_name(n.target), "its output's size depends on the input's values; "
                                     "graphopt compiles static shapes: use a fixed-size form (torch.where(mask, x, 0) "
                                     "for x[mask], a one-hot sum for bincount, topk with a fixed k for nonzero)")


@dataclass
class Graph:
    """A runnable, printable, serializable model: fx graph at ATen level + parameters + metadata.

    `meta` holds provenance: `source` (where the model came from) and `history` (one record per pass run).
    `masks` holds sparsity masks by parameter name (bool, True = kept); `meta["sparse"][name]["pattern"]` says
    how each was made ("unstructured", "2:4", ...). Training passes keep masked weights at exact zero.
    """

    gm: fx.GraphModule
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    meta: dict[str, Any] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_exported_program(cls, ep: torch.export.ExportedProgram, input_names: Sequence[str] | None = None,
                              output_names: Sequence[str] | None = None, source: str = "",
                              source_names: dict[str, str] | None = None, copy: bool = True) -> "Graph":
        """Turn an ExportedProgram into graphopt's canonical form: flat inputs, params as get_attr attributes.
        `copy`: the parameters are copies (a traced model's are the user's own tensors); False adopts them, for a
        program whose tensors nobody else holds (an ONNX import's: a copy had been a fourth of a 2 GB model's peak
        memory)."""
        from torch.export.graph_signature import InputKind, OutputKind

        if any(n.op == "call_function" and isinstance(n.target, torch._ops.HigherOrderOperator)
               and n.target.name().startswith("wrap_with") for n in ep.graph.nodes):
            # a `with torch.autocast(...)` (or set_grad_enabled) region in forward exports as a wrapper op around
            # a submodule, which the graph does not hold ("'Module' object has no attribute 'submod_1'"); retraced
            # to ATen it is inline, autocast's casts explicit
            ep = run_decompositions(ep)
        sig = ep.graph_signature
        _refuse_data_dependent_shapes(ep)
        state = dict(ep.state_dict)
        state.update(ep.constants)
        lifted = {}
        adopted: set[int] = set()  # storages of the tensors taken as they are (copy=False)
        for spec in sig.input_specs:
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                lifted[spec.arg.name] = (spec.target, spec.kind)
        root = torch.nn.Module()
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        taken: set[str] = set()
        user_inputs = []
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                if node.name in lifted:
                    fqn, kind = lifted[node.name]
                    value = state[fqn].detach()
                    storage = value.untyped_storage().data_ptr()
                    if copy or storage in adopted:  # (two adopted tensors sharing memory: a pass writing one in
                        value = value.clone()  # place, sparsify's masking, training, would change the other)
                    adopted.add(storage)
                    attr = _attr_name(fqn, taken)
                    if kind == InputKind.PARAMETER and value.is_floating_point():
                        root.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
                    else:
                        root.register_buffer(attr, value)
                    env[node] = new.get_attr(attr)
                    env[node].meta["source_fqn"] = (source_names or {}).get(fqn, fqn)
                else:
                    user_inputs.append(node)
                    env[node] = new.placeholder(node.name)
                env[node].meta["val"] = node.meta.get("val")
            elif node.op == "output":
                outs = [a for a, s in zip(node.args[0], sig.output_specs) if s.kind == OutputKind.USER_OUTPUT]
                dropped = [f"#{i} ({a!r})" for i, a in enumerate(outs) if not isinstance(a, fx.Node)]
                if dropped:  # (a None or a number among the outputs: the artifact returns tensors only)
                    logging.getLogger(__name__).warning(
                        "output(s) %s of the model are not tensors; the graph returns its tensor outputs only",
                        ", ".join(dropped))
                new.output(tuple(env[a] for a in outs if isinstance(a, fx.Node)))
            elif not _inlined_cond(new, node, ep.graph_module, env) and not _item_as_tensor(new, node, env):
                env[node] = new.node_copy(node, lambda n: env[n])
        taken_inputs = set()
        if input_names:
            for node, name in zip(user_inputs, input_names):
                node_new = env[node]
                node_new.name = node_new.target = _attr_name(name, taken_inputs)
        gm = fx.GraphModule(root, new)
        inputs = [TensorSpec(env[n].name, tuple(int(s) for s in n.meta["val"].shape), dtype_name(n.meta["val"].dtype))
                  for n in user_inputs]
        graph = cls(gm, inputs, [], {"source": source, "history": []})
        graph.refresh()
        if output_names:
            graph.outputs = [TensorSpec(nm, o.shape, o.dtype) for nm, o in zip(output_names, graph.outputs)]
        return graph

    # ---- structure ----------------------------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def nodes(self, op: str | None = None, target: Any = None) -> list[fx.Node]:
        """Nodes in order, optionally only those of one fx op kind and/or one call target."""
        out = []
        for n in self.gm.graph.nodes:
            if op is not None and n.op != op:
                continue
            if target is not None and n.target is not target and n.target not in (target if isinstance(target, tuple) else ()):
                continue
            out.append(n)
        return out

    def params(self) -> dict[str, torch.Tensor]:
        """Every tensor a get_attr node reads, by attribute name."""
        return {n.target: self.get_param(n.target) for n in self.gm.graph.nodes if n.op == "get_attr"}

    def get_param(self, name: str) -> torch.Tensor:
        t = getattr(self.gm, name)
        return t.data if isinstance(t, torch.nn.Parameter) else t

    def set_param(self, name: str, value: torch.Tensor) -> None:
        """Replace a parameter's tensor (shape may change: call refresh() afterwards)."""
        old = getattr(self.gm, name)
        if name in self.masks and tuple(self.masks[name].shape) != tuple(value.shape):
            self.masks[name] = value.detach() != 0  # channel pruning sliced the weight: the zeros are the mask
        if isinstance(old, torch.nn.Parameter):
            setattr(self.gm, name, torch.nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad))
        else:
            self.gm.register_buffer(name, value.detach().clone())

    def add_param(self, base: str, value: torch.Tensor, before: fx.Node | None = None) -> fx.Node:
        """Register a new parameter under a fresh name and return a get_attr node for it."""
        taken = set(dict(self.gm.named_parameters()).keys()) | set(dict(self.gm.named_buffers()).keys())
        taken |= {n.name for n in self.gm.graph.nodes}
        name = _attr_name(base, taken)
        if value.is_floating_point():
            self.gm.register_parameter(name, torch.nn.Parameter(value.detach().clone(), requires_grad=False))
        else:
            self.gm.register_buffer(name, value.detach().clone())
        anchor = before if before is not None else next(n for n in self.gm.graph.nodes if n.op != "placeholder")
        with self.gm.graph.inserting_before(anchor):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = value
        return node

    def remove_unused_params(self) -> int:
        """Delete attributes that no get_attr node reads any more; returns how many."""
        used = {n.target for n in self.gm.graph.nodes if n.op == "get_attr"}
        names = [k for k, _ in self.gm.named_parameters(recurse=False)] + [k for k, _ in self.gm.named_buffers(recurse=False)]
        removed = 0
        for name in names:
            if name not in used:
                delattr(self.gm, name)
                self.masks.pop(name, None)
                self.meta.get("sparse", {}).pop(name, None)
                removed += 1
        return removed

    def refresh(self) -> None:
        """Recompile the module and recompute every node's shape/dtype (meta['val']) with fake tensors."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.passes.fake_tensor_prop import FakeTensorProp

        self.gm.graph.lint()
        self.gm.recompile()
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fakes = [mode.from_tensor(torch.empty(s.shape, dtype=DTYPES[s.dtype])) for s in self.inputs]
        FakeTensorProp(self.gm, mode).propagate(*fakes)
        out_node = self.output_node()
        names = [s.name for s in self.outputs]
        specs = []
        for i, arg in enumerate(out_node.args[0]):
            val = arg.meta["val"]
            name = names[i] if i < len(names) else (arg.name if isinstance(arg, fx.Node) else f"output{i}")
            specs.append(TensorSpec(name, tuple(int(s) for s in val.shape), dtype_name(val.dtype)))
        self.outputs = specs

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")

    def clone(self) -> "Graph":
        """A deep copy: passes work on clones, so the caller's graph is never mutated."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree specs warn when deep-copied
            gm = copy.deepcopy(self.gm)
        return Graph(gm, list(self.inputs), list(self.outputs), copy.deepcopy(self.meta),
                     {k: v.clone() for k, v in self.masks.items()})

    # ---- sparsity -----------------------------------------------------------------------------------------
    def set_mask(self, name: str, mask: torch.Tensor, pattern: str) -> None:
        """Record a sparsity mask for parameter `name` and zero the weights it removes."""
        w = self.get_param(name)
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask for '{name}' has shape {list(mask.shape)}, the weight {list(w.shape)}")
        self.masks[name] = mask.detach().to(torch.bool).clone()
        self.meta.setdefault("sparse", {})[name] = {"pattern": pattern}
        self.apply_masks([name])

    @torch.no_grad()
    def apply_masks(self, names: Sequence[str] | None = None) -> None:
        """Zero every masked-out weight (after an optimizer step, a rewind, a re-initialization)."""
        for name in (names if names is not None else list(self.masks)):
            getattr(self.gm, name).data.mul_(self.masks[name].to(self.get_param(name).dtype))

    def sparsity_report(self) -> dict[str, dict]:
        """Per masked parameter: pattern, shape, density and the fraction of exact zeros in the weight now."""
        out = {}
        for name, m in self.masks.items():
            w = self.get_param(name)
            out[name] = {"pattern": self.meta.get("sparse", {}).get(name, {}).get("pattern", "unstructured"),
                         "shape": list(w.shape), "sparsity": round(1.0 - float(m.float().mean()), 6),
                         "zeros": round(float((w == 0).float().mean()), 6)}
        return out

    # ---- running ------------------------------------------------------------------------------------------
    def check_inputs(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        """Convert numpy/torch inputs to tensors and check count, shape and dtype against the input specs."""
        if len(inputs) != len(self.inputs):
            raise InputMismatchError(f"expected {len(self.inputs)} input(s) ({', '.join(map(str, self.inputs))}), "
                                     f"got {len(inputs)}")
        out = []
        for spec, x in zip(self.inputs, inputs):
            t = torch.from_numpy(np.ascontiguousarray(x).reshape(x.shape)) if isinstance(x, np.ndarray) else x
            if not isinstance(t, torch.Tensor):
                raise InputMismatchError(f"input '{spec.name}' must be a tensor or numpy array, got {type(x).__name__}")
            if tuple(t.shape) != spec.shape:
                raise InputMismatchError(f"input '{spec.name}' has shape {list(t.shape)}, expected {list(spec.shape)}")
            if dtype_name(t.dtype) != spec.dtype:
                raise InputMismatchError(f"input '{spec.name}' has dtype {dtype_name(t.dtype)}, expected {spec.dtype}"
                                         + cast_hint(dtype_name(t.dtype), spec.dtype))
            out.append(t)
        return out

    @torch.no_grad()
    def run(self, *inputs: Any) -> tuple[torch.Tensor, ...]:
        """Run the graph eagerly (reference kernels) and return its outputs as a tuple. topk breaks ties by index
        (see _TiesInIndexOrder), as the compiled artifacts and ONNX do."""
        args = self.check_inputs(inputs)
        if any(n.op == "call_function" and n.target is torch.ops.aten.topk.default for n in self.graph.nodes):
            with _TiesInIndexOrder():
                outs = self.gm(*args)
        else:
            outs = self.gm(*args)
        return tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)

    def example_inputs(self, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Random inputs of the right shapes and dtypes: integers index the whole table where an input feeds an
        embedding (token ids), else they are in [0, 2) (masks)."""
        g = torch.Generator().manual_seed(seed)
        ranges = self.input_ranges()
        out = []
        for s in self.inputs:
            dt = DTYPES[s.dtype]
            if dt.is_floating_point:
                out.append(torch.randn(s.shape, generator=g).to(dt))
            elif dt == torch.bool:
                out.append(torch.randint(0, 2, s.shape, generator=g).bool())
            else:
                lo, hi = ranges[s.name]["range"] if s.name in ranges else (0, 2)
                out.append(torch.randint(lo, hi, s.shape, generator=g).to(dt))
        return tuple(out)

    def input_ranges(self) -> dict[str, dict]:
        """{input name: {"range": [lo, hi), "node": embedding}} for integer inputs that index an embedding table
        (through casts and reshapes): the values the model accepts there; anything else is out of bounds."""
        through = {"to", "_to_copy", "view", "reshape", "flatten", "unsqueeze", "squeeze", "clone", "contiguous",
                   "alias", "expand", "_unsafe_view"}
        specs = {s.name: s for s in self.inputs}
        out: dict[str, dict] = {}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        for spec_name, ph in zip(specs, placeholders):
            if DTYPES[specs[spec_name].dtype].is_floating_point or specs[spec_name].dtype == "bool":
                continue
            todo, seen = [ph], set()
            while todo:
                node = todo.pop()
                for user in node.users:
                    if user in seen or user.op != "call_function":
                        continue
                    seen.add(user)
                    name = getattr(getattr(user.target, "_overloadpacket", None), "__name__", str(user.target))
                    if name == "embedding" and len(user.args) > 1 and user.args[1] is node:
                        rows = int(user.args[0].meta["val"].shape[0]) if "val" in user.args[0].meta else None
                        if rows is not None and (spec_name not in out or rows < out[spec_name]["range"][1]):
                            out[spec_name] = {"range": [0, rows], "node": user.name}
                    elif name in through:
                        todo.append(user)
        return out

    def to_exported_program(self) -> torch.export.ExportedProgram:
        """Re-export (parameters lifted again) for consumers that take an ExportedProgram: TVM, ONNX, .pt2."""
        example = tuple(torch.zeros(s.shape, dtype=DTYPES[s.dtype]) for s in self.inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's pytree specs warn when deep-copied
            return torch.export.export(self.gm, example, strict=False)

    def digest(self) -> str:
        """A hex digest of what the graph computes: its fx code, interface and every attribute tensor's dtype, shape
        and bytes (not `meta`, whose pass history holds timings). Equal graphs traced in different processes have
        equal digests; any changed weight, op or argument changes it."""
        import hashlib
        h = hashlib.sha256(self.gm.code.encode())
        for spec in self.inputs + self.outputs:
            h.update(f"\0{spec.name}:{spec.dtype}:{tuple(spec.shape)}".encode())
        for name, t in sorted(self.params().items()):
            t = t.detach().cpu().reshape(-1).contiguous()
            h.update(f"\0{name}:{t.dtype}:{tuple(getattr(self.gm, name).shape)}\0".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    # ---- views --------------------------------------------------------------------------------------------
    def text(self) -> str:
        from graphopt.ir.printer import graph_text
        return graph_text(self)

    def stats(self):
        from graphopt.ir.stats import graph_stats
        return graph_stats(self)

    def save(self, path) -> None:
        from graphopt.ir.serialize import save_graph
        save_graph(self, path)

    @staticmethod
    def load(path) -> "Graph":
        from graphopt.ir.serialize import load_graph
        return load_graph(path)

    def __str__(self) -> str:
        return self.text()
