"""Weights the artifact makes once, when it is loaded, instead of at every call.

int4 weights of the kernels that read a whole int8 weight (the int8 GEMMs, the flat and AMX convs) are stored as
nibbles in an artifact and widened by `int8.widen_nibbles_source` (`int8.weight_const`, within
`int8.nibble_weights`). Left in `main`, that widening runs at every call: on MiniLM int4 (36 GEMM weights, 10.6 MB
once widened) it cost 3-14% of the call, the widened weights written out and read back each time. `hoist_widening` moves those calls out of `main` into a function `prepare`
that returns them all (its one argument, a 1-byte seed, keeps the build's constant folding from evaluating the
widening at compile time and storing the int8 bytes), and `main` takes them as extra arguments after the model's
inputs. The loaders call `prepare` once and pass its results with every call: `graphopt.load` (runtime.py) and
the C++ runner (deploy/run_artifact.cc); the manifest's target_info records how many (`prepared_weights`).
"""
from __future__ import annotations

PREPARE = "prepare"  # the artifact's function that makes the prepared weights
SEED_DTYPE = "int8"  # prepare's one argument: a 1-element tensor of this dtype, never read


def _is_widening(value) -> bool:
    from tvm import relax
    return (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir"
            and value.args[0].name_hint.startswith("widen_nibbles"))


def hoist_widening(mod):
    """(module, count): `mod` with main's nibble widenings moved into `prepare` and passed to main as its last
    arguments (see the module doc); the module unchanged and 0 when main has none."""
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import widen_nibbles_source
    from graphopt.targets.tvm.cpu.parse import parse_kernel
    main = mod["main"]
    body = main.body
    found = [b for block in body.blocks for b in block.bindings
             if isinstance(b, relax.VarBinding) and _is_widening(b.value)]
    if not found:
        return mod, 0
    params = {b.var: relax.Var(f"prepared{i}", b.var.ty) for i, b in enumerate(found)}
    blocks = []
    for block in body.blocks:  # each widening becomes an alias of its new parameter (a later pass folds it)
        bindings = [relax.VarBinding(b.var, params[b.var]) if b.var in params else b for b in block.bindings]
        blocks.append(relax.DataflowBlock(bindings) if isinstance(block, relax.DataflowBlock)
                      else relax.BindingBlock(bindings))
    new_main = relax.Function(list(main.params) + list(params.values()), relax.SeqExpr(blocks, body.body),
                              main.ret_ty, main.is_pure, main.attrs)
    bb = relax.BlockBuilder(mod)
    seed = relax.Var("seed", relax.TensorType((1,), SEED_DTYPE))
    with bb.function(PREPARE, [seed]):
        outs = []
        for b in found:
            dtype = str(b.var.ty.dtype)
            gv = bb.add_func(parse_kernel(widen_nibbles_source(SEED_DTYPE, dtype)),
                             f"widen_nibbles_{dtype}_{SEED_DTYPE}")
            outs.append(bb.emit(relax.call_tir(gv, [b.value.args[1].fields[0], seed], b.var.ty)))
        bb.emit_func_output(relax.Tuple(outs))
    out = bb.get()
    out["main"] = new_main
    out = relax.transform.CanonicalizeBindings()(out)
    return relax.transform.DeadCodeElimination(["main", PREPARE])(out), len(found)
