"""graphopt's generated kernels from their TVMScript source, built once per distinct source and kept on disk."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import zlib
from pathlib import Path

log = logging.getLogger("graphopt")


def kernel_cache_dir() -> Path | None:
    """Where parsed kernels are kept: <user cache>/kernels (`files.user_cache_dir`); None when
    GRAPHOPT_KERNEL_CACHE=off."""
    if os.environ.get("GRAPHOPT_KERNEL_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    from graphopt.ir.files import user_cache_dir
    return user_cache_dir() / "kernels"


@functools.lru_cache(maxsize=1)
def _script_namespace(T):
    """tirx's script namespace `T` for parsing a kernel's source, except that its decorator `T.prim_func(private=True)`
    evaluates to `T.prim_func` itself. The parser evaluates the decorator only for its dispatch token (and reads
    `private` from the source), but tirx's `prim_func(...)` first takes `inspect.stack()`, which reads the source
    lines of every calling frame: 0.2 s a kernel under pytest (12% of a kernel test file's time), 16 ms at the top of a
    script."""

    def prim_func(func=None, **kwargs):
        return T.prim_func

    prim_func.dispatch_token = T.prim_func.dispatch_token  # (a bare `@T.prim_func` is taken for its token alone)

    class Namespace:
        def __getattr__(self, name):
            return getattr(T, name)

    namespace = Namespace()
    namespace.prim_func = prim_func
    return namespace


@functools.lru_cache(maxsize=512)
def parse_kernel(source: str):
    """The PrimFunc of a kernel's TVMScript source, cached by the source text in this process and on disk.

    Building kernels was most of lowering's time (MobileNetV2: 54 kernel sources, 9 s in TVM's parser; a BSR kernel
    ~0.4 s, 60% of select-sparse-layout's time per layer), and a model's layers of one shape share a source: MiniLM's
    36 linears have 4, MobileNetV2's blocks repeat, and the float sparse kernels leave their stored-block count
    symbolic (`sparse.NNZ`) so that every layer of a shape shares one. A source is built by `build_direct`, which
    makes the PrimFunc TVM's parser makes about 10x faster (the 1465 kernel sources of the kernel tests: 12 s against
    139-161 s, every one structurally equal); the few constructs it does not take (a name assigned again in an inner
    scope, a tuple assignment: 7 of those 1465) go to `tvm.script.parse`, and so does every source when
    GRAPHOPT_KERNEL_PARSER=tvm. On disk each kernel is TVM's JSON of the PrimFunc, compressed, named by a digest of
    the TVM and tvm-ffi versions and the source (so another TVM, or a changed kernel generator, never reads an old
    one): loading one takes about 0.7x the time of building it directly. A file that does not load is built again
    and rewritten. PrimFuncs are immutable, so the cached one is shared."""
    import tvm
    from tvm.script import tirx as T
    folder = kernel_cache_dir()
    path = None
    if folder is not None:
        try:
            import tvm_ffi
            ffi = getattr(tvm_ffi, "__version__", "")
        except ImportError:
            ffi = ""
        key = hashlib.sha256(f"{tvm.__version__}\0{ffi}\0{source}".encode()).hexdigest()[:40]
        path = folder / f"{key}.json.z"
        if path.exists():
            try:
                return tvm.ir.load_json(zlib.decompress(path.read_bytes()).decode())
            except Exception as e:  # corrupt or truncated: built again below
                log.debug("parsed-kernel cache %s unreadable (%s); building it again", path, e)
    func = None
    if os.environ.get("GRAPHOPT_KERNEL_PARSER", "").lower() != "tvm":
        try:
            func = build_direct(source, _script_namespace(T))
        except Unsupported as e:  # a construct the direct builder leaves to TVM's parser
            log.debug("kernel source left to TVMScript's parser: %s", e)
        except Exception as e:  # noqa: BLE001 - a faulty source: TVM's parser builds it or names its line
            log.debug("direct kernel build failed (%s: %s); TVMScript's parser takes the source",
                      type(e).__name__, e)
            func = None
    if func is None:
        func = tvm.script.parse(source, extra_vars={"T": _script_namespace(T)})
    if path is not None:
        from graphopt.ir.files import atomic_write_bytes
        try:
            atomic_write_bytes(path, zlib.compress(tvm.ir.save_json(func).encode(), 1))
        except OSError as e:
            log.debug("could not keep the parsed kernel in %s: %s", path, e)
    return func


class Unsupported(Exception):
    """A construct `build_direct` does not take (TVMScript's parser builds that source instead)."""


def _doc_ops():
    import ast

    from tvm.script.parser._core import doc
    names = ["Add", "Sub", "Mult", "Div", "FloorDiv", "Mod", "Pow", "LShift", "RShift", "BitOr", "BitXor",
             "BitAnd", "Eq", "NotEq", "Lt", "LtE", "Gt", "GtE", "And", "Or", "Not", "USub", "UAdd", "Invert"]
    return {getattr(ast, n): getattr(doc, n)() for n in names}


class _Direct:
    """TVM's own TVMScript parser, for the subset of TVMScript graphopt's kernel generators write, without its
    per-node cost. TVM's parser converts the source's Python AST to its own doc AST, then evaluates every
    expression node by node, each through `compile` and `eval` of a one-node Python expression: 0.2 ms a node, 3.4
    s for a 36 KB Winograd conv. This walks Python's AST once and makes the same IR builder calls with the same
    values: operators through the parser's own dispatch (`_eval_op`: TIR comparisons, `and` / `or` / `not`), calls,
    attributes and subscripts as Python evaluates them, and the statements as `tirx/script/parser/parser.py` builds
    them (for loops over frames, `T.let` bindings, `x = expr` locals, buffer stores, `T.decl_buffer` frames, if /
    else, asserts with a message, expression statements). Anything else raises `Unsupported`, and the caller parses
    that source with TVM's parser; `tests/targets/test_kernel_parse.py` checks the two agree on every kernel a set of
    models makes."""

    def __init__(self, namespace):
        import builtins

        from tvm.script.ir_builder.base import IRBuilder
        from tvm.script.ir_builder.base import IRBuilderFrame
        from tvm.script.parser.core.evaluator import _eval_op
        from tvm.tirx.script import builder as tb
        self.ir_builder, self.frame_type, self.eval_op, self.tb = IRBuilder, IRBuilderFrame, _eval_op, tb
        self.ops = _doc_ops()
        self.builtins = vars(builtins)
        self.namespace = namespace

    # expressions -------------------------------------------------------------------------------------------
    def expr(self, node, env):  # noqa: C901 (one dispatch over node types, ordered by frequency)
        import ast
        t = type(node)
        if t is ast.Constant:
            return node.value
        if t is ast.Name:
            if node.id in env:
                return env[node.id]
            if node.id in self.builtins:
                return self.builtins[node.id]
            raise Unsupported(f"undefined name {node.id!r} on line {node.lineno}")
        if t is ast.BinOp:
            return self.eval_op(self.op(node.op), [self.expr(node.left, env), self.expr(node.right, env)])
        if t is ast.Attribute:
            return getattr(self.expr(node.value, env), node.attr)
        if t is ast.Call:
            func = self.expr(node.func, env)
            args = [self.expr(a, env) for a in node.args]
            kwargs = {}
            for k in node.keywords:
                if k.arg is None:
                    raise Unsupported("**kwargs in a call")
                kwargs[k.arg] = self.expr(k.value, env)
            return func(*args, **kwargs)
        if t is ast.Subscript:
            return self.expr(node.value, env)[self.expr(node.slice, env)]
        if t is ast.Tuple:
            return tuple(self.expr(e, env) for e in node.elts)
        if t is ast.List:
            return [self.expr(e, env) for e in node.elts]
        if t is ast.UnaryOp:
            return self.eval_op(self.op(node.op), [self.expr(node.operand, env)])
        if t is ast.Compare:  # as the parser: each pair by the dispatch, joined by `and`
            values = [self.expr(node.left, env)] + [self.expr(c, env) for c in node.comparators]
            result = None
            for i, op in enumerate(node.ops):
                part = self.eval_op(self.op(op), [values[i], values[i + 1]])
                result = part if result is None else self.eval_op(self.ops[ast.And], [result, part])
            return result
        if t is ast.BoolOp:  # as the parser: Python bools short-circuit, TIR values join by the dispatch
            is_and = isinstance(node.op, ast.And)
            value = self.expr(node.values[0], env)
            for rhs in node.values[1:]:
                if isinstance(value, bool) and value != is_and:
                    return value
                value = self.eval_op(self.op(node.op), [value, self.expr(rhs, env)])
            return value
        if t is ast.Dict:
            if any(k is None for k in node.keys):
                raise Unsupported("** in a dict")
            return {self.expr(k, env): self.expr(v, env) for k, v in zip(node.keys, node.values)}
        raise Unsupported(f"{t.__name__} expression on line {getattr(node, 'lineno', '?')}")

    def op(self, op):
        try:
            return self.ops[type(op)]
        except KeyError:
            raise Unsupported(f"operator {type(op).__name__}") from None

    # statements --------------------------------------------------------------------------------------------
    def body(self, stmts, env, names):
        for s in stmts:
            self.stmt(s, env, names)

    @staticmethod
    def bind(name, value, env, names):
        if name in names:  # the parser refuses a second definition in one scope
            raise Unsupported(f"{name!r} defined twice in one scope")
        names.add(name)
        env[name] = value

    def stmt(self, s, env, names):  # noqa: C901
        import ast
        from functools import partial

        import tvm
        tb, name_of = self.tb, self.ir_builder.name
        t = type(s)
        if t is ast.Assign:
            if len(s.targets) != 1:
                raise Unsupported("a = b = c")
            lhs = s.targets[0]
            if type(lhs) is ast.Subscript:
                rhs = self.expr(s.value, env)
                if type(lhs.slice) is ast.Tuple:
                    if any(type(e) in (ast.Starred, ast.Slice) for e in lhs.slice.elts):
                        raise Unsupported("a starred or sliced store")
                    indices = [self.expr(e, env) for e in lhs.slice.elts]
                elif type(lhs.slice) is ast.Slice:
                    raise Unsupported("a sliced store")
                else:
                    indices = self.expr(lhs.slice, env)
                tb.buffer_store(self.expr(lhs.value, env), rhs, indices)
                return
            if type(lhs) is not ast.Name or lhs.id in env:
                raise Unsupported(f"assignment to {ast.unparse(lhs)} on line {s.lineno}")
            rhs = self.expr(s.value, env)
            if isinstance(rhs, self.frame_type):  # (a frame is entered until its scope's end)
                rhs.add_callback(partial(rhs.__exit__, None, None, None))
                rhs = rhs.__enter__()
            elif not tvm.tirx.is_buffer_var(rhs):  # (T.decl_buffer's buffer: it entered its own frame)
                if isinstance(rhs, (bool, int, float)):
                    rhs = tvm.tirx.const(rhs)
                if not tvm.ir.is_prim_expr(rhs) or isinstance(rhs, tvm.ir.Var) \
                        or not isinstance(rhs.ty, tvm.ir.PrimType):
                    raise Unsupported(f"assignment of a {type(rhs).__name__} on line {s.lineno}")
                scalar = tb.local_scalar(dtype=str(rhs.ty.dtype))  # x = expr: a one-element local, as the parser
                name_of(lhs.id, scalar.scalar.source)
                tb.buffer_store(scalar.scalar.source, rhs, [0])
                self.bind(lhs.id, scalar.scalar, env, names)
                return
            name_of(lhs.id, rhs)
            self.bind(lhs.id, rhs, env, names)
        elif t is ast.For:
            if s.orelse or (type(s.iter) is ast.Call and type(s.iter.func) is ast.Name):
                raise Unsupported(f"for loop on line {s.lineno}")
            frame = self.expr(s.iter, env)
            if not isinstance(frame, tb.frame.ForFrame):
                raise Unsupported(f"for loop over a {type(frame).__name__}")
            inner, inner_names = dict(env), set()
            with frame as iters:
                if type(s.target) is ast.Name:
                    targets, values = [s.target], [iters]
                elif type(s.target) is ast.Tuple and all(type(e) is ast.Name for e in s.target.elts):
                    targets, values = s.target.elts, list(iters)
                    if len(targets) != len(values):
                        raise Unsupported("loop variables and iterators differ in number")
                else:
                    raise Unsupported(f"loop target on line {s.lineno}")
                for target, value in zip(targets, values):
                    if not isinstance(value, tvm.ir.Var):
                        raise Unsupported(f"loop variable bound to a {type(value).__name__}")
                    name_of(target.id, value)
                    self.bind(target.id, value, inner, inner_names)
                self.body(s.body, inner, inner_names)
        elif t is ast.AnnAssign:
            if s.value is None or type(s.target) is not ast.Name or type(s.value) in (ast.List, ast.Tuple):
                raise Unsupported(f"annotated assignment on line {s.lineno}")
            rhs = self.expr(s.value, env)
            ann = self.expr(s.annotation, env)
            if not isinstance(ann, tb.LetAnnotation):
                raise Unsupported(f"annotation {ast.unparse(s.annotation)} on line {s.lineno}")
            if not isinstance(rhs, tvm.ir.Expr):
                rhs = tvm.ir.StringImm(rhs) if isinstance(rhs, str) else tvm.tirx.const(rhs)
            var = ann.as_var() if ann.type_spec is not None else ann.as_var(rhs_dtype=rhs.ty)
            if not isinstance(var, tvm.ir.Var) or any(v.same_as(var) for v in env.values()
                                                      if isinstance(v, tvm.ir.Var)):
                raise Unsupported(f"T.let on line {s.lineno}")
            name_of(s.target.id, var)
            self.bind(s.target.id, var, env, names)
            tb.Bind(rhs, var=var)
        elif t is ast.Expr:
            res = self.expr(s.value, env)
            if res is None or isinstance(res, str):
                return
            if isinstance(res, self.frame_type):
                res.add_callback(partial(res.__exit__, None, None, None))
                res.__enter__()
            elif tvm.ir.is_prim_expr(res):
                tb.evaluate(res)
            else:
                raise Unsupported(f"expression statement of a {type(res).__name__} on line {s.lineno}")
        elif t is ast.If:
            test = self.expr(s.test, env)
            if tvm.ir.is_prim_expr(test) or isinstance(test, tvm.tirx.expr.ExprOp):
                with tb.If(test):
                    with tb.Then():
                        self.body(s.body, dict(env), set())
                    if s.orelse:
                        with tb.Else():
                            self.body(s.orelse, dict(env), set())
            elif isinstance(test, bool):  # a Python condition opens no scope
                self.body(s.body if test else s.orelse, env, names)
            else:
                raise Unsupported(f"if condition of a {type(test).__name__} on line {s.lineno}")
        elif t is ast.Assert:  # a plain message: the parser's RuntimeError assert frame, open to the scope's end
            test = self.expr(s.test, env)
            message = self.expr(s.msg, env) if s.msg is not None else None
            if not isinstance(message, str):
                raise Unsupported(f"assert message on line {s.lineno}")
            frame = tb.Assert(test, message, error_kind="RuntimeError")
            frame.add_callback(partial(frame.__exit__, None, None, None))
            frame.__enter__()
        else:
            raise Unsupported(f"{t.__name__} statement on line {getattr(s, 'lineno', '?')}")

    # the function ------------------------------------------------------------------------------------------
    def annotation(self, node, env, names):
        """A parameter's annotation; quoted names in T.Buffer's shape are the function's symbolic dims (int32
        Vars made at their first use, as the parser's match scope does)."""
        import ast

        import tvm
        is_buffer = (type(node) is ast.Call and ast.unparse(node.func) == "T.Buffer" and node.args
                     and type(node.args[0]) is ast.Tuple and not any(k.arg == "shape" for k in node.keywords))
        if not is_buffer:
            if any(type(c) is ast.Constant and isinstance(c.value, str) for c in ast.walk(node)):
                raise Unsupported(f"annotation {ast.unparse(node)}")
            return self.expr(node, env)
        shape = []
        for dim in node.args[0].elts:
            if type(dim) is ast.Constant and isinstance(dim.value, str):
                if not dim.value.isidentifier():
                    raise Unsupported(f"shape expression {dim.value!r}")
                if dim.value not in env:
                    self.bind(dim.value, tvm.tirx.Var(dim.value, "int32"), env, names)
                shape.append(env[dim.value])
            else:
                shape.append(self.expr(dim, env))
        args = [tuple(shape)] + [self.expr(a, env) for a in node.args[1:]]
        return self.expr(node.func, env)(*args, **{k.arg: self.expr(k.value, env) for k in node.keywords})

    def function(self, source: str):
        import ast

        import tvm
        tree = ast.parse(source)
        defs = [n for n in tree.body if not (type(n) is ast.Expr and type(n.value) is ast.Constant)]
        if len(defs) != 1 or type(defs[0]) is not ast.FunctionDef:
            raise Unsupported("not one function")
        fn = defs[0]
        a = fn.args
        if fn.returns is not None or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults \
                or len(fn.decorator_list) != 1:
            raise Unsupported("the function's signature")
        deco = fn.decorator_list[0]
        keywords = deco.keywords if type(deco) is ast.Call else []
        if ast.unparse(deco.func if type(deco) is ast.Call else deco) != "T.prim_func" or type(deco) is ast.Call \
                and deco.args or any(k.arg != "private" or type(k.value) is not ast.Constant for k in keywords):
            raise Unsupported("the decorator")
        private = next((k.value.value for k in keywords), False)
        env, names = {"T": self.namespace}, set()
        tb, builder = self.tb, self.ir_builder
        with builder() as ib:
            with tb.prim_func(is_private=private, s_tir=False, persistent=False):
                tb.func_name(fn.name)
                for arg in a.args:
                    if arg.annotation is None:
                        raise Unsupported("a parameter without annotation")
                    ann = self.annotation(arg.annotation, env, names)
                    if callable(ann) and not isinstance(ann, tvm.ir.Expr):
                        ann = ann()
                    self.bind(arg.arg, tb.arg(arg.arg, ann), env, names)
                self.body(fn.body, env, names)
        func = ib.get()
        tvm.s_tir.analysis.verify_well_formed(tvm.IRModule.from_expr(func))
        if not func.attrs.get("s_tir", False):
            tvm.tirx.analysis.verify_tirx_well_formed(func)
        return func


def build_direct(source: str, namespace):
    """The PrimFunc TVMScript's parser would make of `source` (namespace: what `T` names), built directly; raises
    `Unsupported` for a construct it does not take (see `_Direct`)."""
    return _direct(namespace).function(source)


@functools.lru_cache(maxsize=4)
def _direct(namespace) -> _Direct:
    return _Direct(namespace)
