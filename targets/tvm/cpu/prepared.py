"""Weights an artifact makes once, when it is loaded, instead of storing them or making them at every call.

int4 weights of the kernels that read a whole int8 weight (the int8 GEMMs, the flat and AMX convs) are stored in an
artifact as nibbles and widened by `int8.widen_nibbles_source` (`int8.weight_const`); weight-only int8 linears
(`quantize{activations=none}`) store their packed weight as int8 and the float GEMM's panels are dequantized from
it (`gemm.emit_packed_linear`). Such a load-time kernel takes the weight's constants and, last, a 1-element int8
seed it never reads, and carries the function attribute `LOAD_TIME`. Within `load_time_weights` the lowering emits
them (`load_time_call`; outside it the weights are plain constants: the builds that only time kernels, the cost
oracle and knob tuning, get the artifact's speed that way); `hoist` then moves every such call out of `main` into
a function `prepare(seed)` that returns them all, and `main` takes them as extra arguments after the model's
inputs. The seed keeps the build's constant folding (which evaluates calls whose arguments are all constants) from
making the weights at compile time and storing them whole. The loaders call `prepare` once and pass its results
with every call: `graphopt.load` (runtime.py) and the C++ runner (deploy/run_artifact.cc); the manifest's
target_info counts them (`prepared_weights`). Left in `main`, MiniLM int4's 36 widenings (10.6 MB) cost 3-14% of
each call, the widened weights written out and read back every time.
"""
from __future__ import annotations

import contextlib
import contextvars

PREPARE = "prepare"  # the artifact's function that makes the prepared weights
LOAD_TIME = "graphopt_load_time"  # the PrimFunc attribute of a load-time kernel
SEED_DTYPE = "int8"  # prepare's one argument, a 1-element tensor never read (the loaders pass zeros)


def kernel_head(pad: str = "    ") -> tuple[str, str]:
    """The two TVMScript lines a load-time kernel's body needs (its last parameter `seed: T.Buffer((1,), "int8")`):
    its attributes (opaque to fusion, `LOAD_TIME`), and the read that names the seed in the body, to go after any
    match_buffer (a call with one used input would pass for a reshape in the build's RewriteDataflowReshape, which
    crashed on these kernels)."""
    return (f'{pad}T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8, '
            f'"{LOAD_TIME}": True}})', f"{pad}T.evaluate(seed[0])")

_ACTIVE = contextvars.ContextVar("graphopt_load_time_weights", default=False)


@contextlib.contextmanager
def load_time_weights():
    """Within it the lowering emits load-time kernels for the weights that have one (`load_time_call`); a build
    that lowers in it must `hoist` them (`build_executable(prepare=True)` does both)."""
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get()


def load_time_call(bb, gv, consts: list, out_ty):
    """Emit the load-time kernel `gv` (last parameter: the unread int8 seed) on the constants `consts`; a
    placeholder seed stands in until `hoist` moves the call into `prepare`."""
    import numpy as np
    from tvm import relax
    return bb.emit(relax.call_tir(gv, [*consts, relax.const(np.zeros(1, SEED_DTYPE))], out_ty))


def _load_time(mod, value) -> bool:
    from tvm import relax
    if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir"):
        return False
    func = mod[value.args[0]]
    return bool(func.attrs is not None and LOAD_TIME in func.attrs and func.attrs[LOAD_TIME])


def hoist(mod):
    """(module, count): `mod` with main's load-time kernel calls moved into `prepare` and passed to main as its
    last arguments (see the module doc); the module unchanged and 0 when main has none."""
    from tvm import relax
    main = mod["main"]
    body = main.body
    found = [b for block in body.blocks for b in block.bindings
             if isinstance(b, relax.VarBinding) and _load_time(mod, b.value)]
    if not found:
        return mod, 0
    params = {b.var: relax.Var(f"prepared{i}", b.var.ty) for i, b in enumerate(found)}
    blocks = []
    for block in body.blocks:  # each call becomes an alias of its new parameter (a later pass folds it)
        bindings = [relax.VarBinding(b.var, params[b.var]) if b.var in params else b for b in block.bindings]
        blocks.append(relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(bindings))
    new_main = relax.Function(list(main.params) + list(params.values()), relax.SeqExpr(blocks, body.body),
                              main.ret_ty, main.is_pure, main.attrs)
    bb = relax.BlockBuilder(mod)
    seed = relax.Var("seed", relax.TensorType((1,), SEED_DTYPE))
    with bb.function(PREPARE, [seed]):
        outs = [bb.emit(relax.call_tir(b.value.args[0], [*b.value.args[1].fields[:-1], seed], b.var.ty))
                for b in found]
        bb.emit_func_output(relax.Tuple(outs))
    out = bb.get()
    out["main"] = new_main
    out = relax.transform.CanonicalizeBindings()(out)
    return relax.transform.DeadCodeElimination(["main", PREPARE])(out), len(found)
