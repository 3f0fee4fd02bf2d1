"""ONNX export of a Graph (for ONNX Runtime pipelines), written atomically."""
from __future__ import annotations

import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

from graphopt.errors import TargetError
from graphopt.ir.files import atomic_file, plain_mode
from graphopt.ir.graph import Graph

log = logging.getLogger(__name__)


def export_onnx(graph: Graph, path: str | Path, opset: int = 18, report: dict | None = None,
                dynamic_batch: bool = True) -> Path:
    """Write `graph` as an ONNX model (torch's dynamo exporter over the re-exported program). `report`, when given,
    receives "ort_pair_saturation": the int8 weights whose pairs can saturate ONNX Runtime's u8 x s8 kernels on x86
    CPUs without VNNI (weight name -> largest pair sum; warned about), and for a model imported with a dynamic batch
    dim "dynamic_batch" (input / output -> dim name) where the export keeps it (`dynamic_batch`, checked in ONNX
    Runtime; see batch.py) or "batch_fixed" (why not)."""
    import onnx
    import torch

    from graphopt.ir.sparse_ops import densify
    from graphopt.ir.quant_ops import unfold_integer_ops
    # ONNX has no block-sparse op: sparse layers go out dense (exact zeros); integer ops go out in QDQ form
    from graphopt.targets.onnx.decompose import for_exporter
    ep = for_exporter(_without_exporter_names(_exportable(unfold_integer_ops(densify(graph)))).to_exported_program())
    try:
        with warnings.catch_warnings(), _quiet():
            warnings.simplefilter("ignore")
            from graphopt.targets.onnx.qdq import translation_table
            prog = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, verbose=False,
                                     custom_translation_table=translation_table(), optimize=True)
    except Exception as e:
        raise TargetError(_export_failure(e)) from None
    model = prog.model_proto
    _name_interface(model, [s.name for s in graph.inputs], [s.name for s in graph.outputs])
    from graphopt.targets.onnx.qdq import (activations_to_uint8, dynamic_matmuls_to_integer, fold_pads_into_convs,
                                           fold_weight_transposes, ort_saturating_layers, quantize_biases)
    fold_weight_transposes(model)  # (the forms ONNX Runtime fuses into integer kernels; see each)
    dynamic_matmuls_to_integer(model)
    quantize_biases(model)
    fold_pads_into_convs(model)
    activations_to_uint8(model)
    saturating = ort_saturating_layers(model)
    if report is not None:
        report["ort_pair_saturation"] = saturating
    if saturating:
        names = list(saturating)
        log.warning("onnx export: %d int8 weight(s) (%s%s) have pairs past 128 in magnitude: ONNX Runtime's u8 x "
                    "s8 kernels add such pairs in int16 on x86 CPUs without VNNI (AVX2, AVX-512F) and saturate, so "
                    "its outputs there drift from this graph's. quantize's default width (auto) is full-range "
                    "int8 where the run's target is a VNNI CPU or none: ask for quantize{weights=int8s}, or leave "
                    "the width unsaid in a run for target 'onnx' (graphopt.optimize(..., target='onnx'), which "
                    "compile --target onnx and opt -o *.onnx are), whose pairs stay within 128, exact on every "
                    "CPU", len(names), ", ".join(names[:3]),
                    ", ..." if len(names) > 3 else "")
    dims = graph.meta.get("dynamic_batch") if dynamic_batch else None
    path = Path(path)
    if _weight_bytes(model) <= SINGLE_FILE_LIMIT:
        if dims:
            model = _with_dynamic_batch(graph, model, dims, report)
        _check_model(model)
        with atomic_file(path) as tmp:
            onnx.save(model, str(tmp))
        return path
    # past protobuf's 2 GB one file cannot hold the model ("Failed to serialize proto"): its weights go beside it in
    # `<name>.data`, ONNX's external data, which ONNX Runtime and onnx.load read from the model's folder
    data = f"{path.name}.data"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as staging:
        stage = Path(staging)
        onnx.save_model(model, str(stage / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=EXTERNAL_TENSOR_BYTES)  # (the proto refers to them now)
        if dims:
            model = _with_dynamic_batch(graph, model, dims, report, folder=stage)
            onnx.save_model(model, str(stage / path.name))
        _check_model(stage / path.name)
        for name in [n for n in (data, path.name) if (stage / n).exists()]:  # (the model last: a reader finding it
            plain_mode(stage / name)  # finds its weights; onnx writes them 0600)
            os.replace(stage / name, path.parent / name)
    log.info("onnx export: %s past 2 GB: weights written beside it in %s", path, data)
    return path


SINGLE_FILE_LIMIT = (2 << 30) - (64 << 20)  # weights past this go to external data (protobuf's 2 GB, less the graph)
EXTERNAL_TENSOR_BYTES = 1 << 20  # and there each tensor of this size or more (small constants stay in the model)


def _row_adds(graph: Graph) -> list:
    """index_add and index_put(accumulate=True) with one index vector: the row adds torch's exporter writes as
    ScatterND with reduction=add."""
    import torch
    aten = torch.ops.aten
    out = []
    for n in graph.gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target is aten.index_add.default:
            out.append(n)
        elif (n.target is aten.index_put.default
              and bool(n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False))
              and len(n.args[1]) == 1 and n.args[1][0] is not None and n.args[1][0].meta["val"].dim() == 1
              and not n.args[1][0].meta["val"].dtype == torch.bool):
            out.append(n)
    return out


def _as_scatter_add(fx_graph, node) -> None:
    """Replace the row add `node` (`_row_adds`) by scatter_add over an index expanded to the source's shape
    (ScatterElements add, which ONNX Runtime computes correctly on several threads)."""
    import torch
    aten = torch.ops.aten
    x = node.args[0]
    x_val = x.meta["val"]
    if node.target is aten.index_add.default:
        dim = int(node.args[1]) % max(x_val.dim(), 1)
        idx, src = node.args[2], node.args[3]
        alpha = node.args[4] if len(node.args) > 4 else node.kwargs.get("alpha", 1)
        shape = list(src.meta["val"].shape)
    else:
        dim, idx, src, alpha = 0, node.args[1][0], node.args[2], 1
        shape = [int(idx.meta["val"].shape[0]), *x_val.shape[1:]]
    view = [1] * len(shape)
    view[dim] = int(shape[dim])
    with fx_graph.inserting_before(node):
        if list(src.meta["val"].shape) != shape:  # (index_put's values broadcast over the rows)
            src = fx_graph.call_function(aten.expand.default, (src, shape))
        if alpha != 1:
            src = fx_graph.call_function(aten.mul.Tensor, (src, alpha))
        wide = fx_graph.call_function(aten.view.default, (idx, view))
        wide = fx_graph.call_function(aten.expand.default, (wide, shape))
        added = fx_graph.call_function(aten.scatter_add.default, (x, dim, wide, src))
    node.replace_all_uses_with(added)
    fx_graph.erase_node(node)


def _exportable(graph: Graph) -> Graph:
    """`graph` with the ops torch's ONNX exporter gets wrong rewritten: scatter_reduce(mean) goes out as a sum
    divided by a count scattered the same way (the exporter's ScatterElements gave other values: error 1.4-2.0 on
    unit-scale inputs); row adds (index_add, index_put accumulating over one index vector) as scatter_add over an
    expanded index, since the exporter's ScatterND(reduction=add) races in ONNX Runtime's threads over repeated
    indices (error 3.3 on 20000 rows into 2000 with 2 threads, 0 with 1; PNA's export: 0.05 of the range).
    logcumsumexp is left, and named in a warning: the exporter shifts the whole axis by its maximum, so a prefix ~87
    or more below it underflows to -inf (minGRU over 512 steps: error 0.98 in ONNX Runtime). cat and stack of
    several dtypes get their inputs cast to the result's (the exporter wrote a Concat of mixed types, an invalid
    model: a stack of int64 and int32 indices)."""
    import torch
    aten = torch.ops.aten
    means = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is aten.scatter_reduce.two
             and str(n.args[4]) == "mean"]
    adds = {n.name for n in _row_adds(graph)}
    mixed = {n.name for n in graph.gm.graph.nodes if n.op == "call_function"
             and n.target in (aten.cat.default, aten.stack.default)
             and any(t.meta["val"].dtype != n.meta["val"].dtype for t in n.args[0])}
    lse = [n.name for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is aten.logcumsumexp.default]
    if lse:
        log.warning("onnx export: torch's exporter shifts logcumsumexp (%s) by its axis's maximum: where a prefix "
                    "lies ~87 or more below it, the ONNX model gives -inf there (graphopt's own build is exact)",
                    ", ".join(lse[:3]))
    if not means and not adds and not mixed:
        return graph
    g = graph.clone()
    fx_graph = g.gm.graph
    for node in [n for n in fx_graph.nodes if n.name in mixed]:
        dt = node.meta["val"].dtype
        with fx_graph.inserting_before(node):
            node.args = ([t if t.meta["val"].dtype == dt else fx_graph.call_function(
                aten._to_copy.default, (t,), {"dtype": dt}) for t in node.args[0]], *node.args[1:])
    for node in [n for n in fx_graph.nodes if n.name in adds]:
        _as_scatter_add(fx_graph, node)
    for node in [n for n in fx_graph.nodes if n.name in {m.name for m in means}]:
        x, dim, idx, src = node.args[:4]
        include_self = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("include_self", True))
        floating = node.meta["val"].dtype.is_floating_point
        with fx_graph.inserting_before(node):
            total = fx_graph.call_function(aten.scatter_reduce.two, (x, dim, idx, src, "sum"),
                                           {"include_self": include_self})
            start = fx_graph.call_function(aten.full_like.default, (x, float(include_self) if floating
                                                                    else int(include_self)))
            ones = fx_graph.call_function(aten.ones_like.default, (src,))
            count = fx_graph.call_function(aten.scatter_reduce.two, (start, dim, idx, ones, "sum"))
            count = fx_graph.call_function(aten.clamp_min.default, (count, 1))
            # (a position no index names: its sum is self's, its count 0 -> 1 without self)
            mean = fx_graph.call_function(aten.div.Tensor, (total, count)) if floating else \
                fx_graph.call_function(aten.div.Tensor_mode, (total, count), {"rounding_mode": "floor"})
        node.replace_all_uses_with(mean)
        fx_graph.erase_node(node)
    g.refresh()
    return g


def _export_failure(e: Exception) -> str:
    """The error for a failed torch.onnx.export: the op it has no ONNX function for and the graph node holding it,
    where its message says (the first line alone said only "Failed to convert the exported program")."""
    import re
    text = str(e)
    op = re.search(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>", text)
    node = re.search(r"Error when translating node %(\w+)", text)
    if op:
        where = f" (node '{node.group(1)}')" if node else ""
        return (f"ONNX export failed: torch's ONNX exporter has no ONNX function for {op.group(1)}.{op.group(2)}"
                f"{where}: graphopt's own targets compile it (--target llvm), or replace the op in the model")
    first = text.splitlines()[0] if text else ""
    return f"ONNX export failed: {type(e).__name__}: {first}" + (f" (at node '{node.group(1)}')" if node else "")


def _weight_bytes(model) -> int:
    """The bytes of `model`'s initializers, from their shapes (a proto past 2 GB cannot even say its ByteSize)."""
    import numpy as np
    from onnx import TensorProto, helper
    return sum(int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer if t.data_type != TensorProto.STRING)


def _check_model(model) -> None:
    """onnx's checker on `model` (a ModelProto, or the path of one whose weights lie beside it), shape inference
    included: torch's exporter wrote an LSTM with projections (proj_size) as a Concat of tensors of different
    ranks, which the checker alone passed and ONNX Runtime refused to load. The error names the graph's op and
    node that the failing ONNX node was made from, where the exporter recorded it."""
    import onnx
    try:
        onnx.checker.check_model(str(model) if isinstance(model, Path) else model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        text = " ".join(str(e).split())
        origin = _exported_from(model, text)
        raise TargetError(f"ONNX export wrote an invalid model{origin}: {text[:300]}"
                          + (". graphopt's own targets compile it (--target llvm), or replace the op in the model"
                             if origin else "")) from None


def _exported_from(model, text: str) -> str:
    """' (torch's ONNX for aten.OP (node 'NAME'))' for the ONNX node the checker's message names, from the fx node
    the exporter recorded on it; '' where there is none."""
    import re
    m = re.search(r"node name: ([^)\s]+)", text)
    if m is None or isinstance(model, Path):
        return ""
    node = next((n for n in model.graph.node if n.name == m.group(1)), None)
    fx = next((p.value for p in (node.metadata_props if node is not None else ()) if p.key.endswith(".fx_node")), "")
    found = re.match(r"%(\S+) : .*?target=torch\.ops\.([\w.]+)", fx)
    return f" (torch's ONNX for {found.group(2)} (node '{found.group(1)}'))" if found else ""


def _with_dynamic_batch(graph: Graph, model, dims: dict, report: dict | None, folder: Path | None = None):
    """`model` taking any batch where the imported model did (see batch.py); else as it is, with a warning why.
    `folder`: where the weights `model` refers to lie (external data)."""
    from graphopt.targets.onnx.batch import make_batch_dynamic
    batched = [s for s in graph.inputs if s.name in dims.get("inputs", {})]
    batch = batched[0].shape[0] if batched and batched[0].shape else 1
    model, why = make_batch_dynamic(model, dims, batch, folder)
    if why:
        log.warning("onnx export: the batch dim is dynamic (the model came so, or --input-shape left it open), but "
                    "the export takes batch %d only: %s. "
                    "Batch-%d calls work; for another batch give its shape (--input-shape NAME=DIMS, input_shapes= "
                    "in Python)", batch, why, batch)
        if report is not None:
            report["batch_fixed"] = why
    elif report is not None:
        report["dynamic_batch"] = {v.name: v.type.tensor_type.shape.dim[0].dim_param
                                   for v in list(model.graph.input) + list(model.graph.output)
                                   if v.type.tensor_type.shape.dim[0].dim_param}
    return model


def _without_exporter_names(graph: Graph) -> Graph:
    """`graph` with its parameters and values named like the ones torch's ONNX exporter makes up ("val_123") renamed
    "p_val_123". A model that exporter wrote, imported back (ONNX Runtime's quantize_dynamic of a torch export, the
    zoo's MiniLM as ONNX), has such names, and the exporter then registered its own constant under a name taken:
    "Initializer 'val_123' is already registered", no export at all."""
    import re
    pattern = re.compile(r"val_\d+$")
    if not any(pattern.match(n.name) or (n.op == "get_attr" and pattern.match(str(n.target)))
               for n in graph.gm.graph.nodes):
        return graph
    graph = graph.clone()
    taken = {n.name for n in graph.gm.graph.nodes} | set(dict(graph.gm.named_parameters())) | set(
        dict(graph.gm.named_buffers()))

    def fresh(base: str) -> str:
        name, k = f"p_{base}", 1
        while name in taken:
            name, k = f"p_{base}_{k}", k + 1
        taken.add(name)
        return name

    for n in graph.gm.graph.nodes:
        if n.op == "get_attr" and pattern.match(str(n.target)):
            value = graph.get_param(n.target)
            new = fresh(n.target)
            delattr(graph.gm, n.target)
            graph.gm.register_buffer(new, value)
            n.target = new
        if pattern.match(n.name):
            n._rename(fresh(n.name))
    graph.gm.recompile()
    return graph


def _name_interface(model, inputs: list[str], outputs: list[str]) -> None:
    """Give the exported graph's inputs and outputs the Graph's names, renaming first any other value that already
    holds one of them. (Asked of the exporter through input_names / output_names, a tiny GPT-2's output
    'view_23' was also the name of an unrelated Reshape's output: two definitions, an invalid model.)"""
    import onnx
    g = model.graph
    if len(g.input) != len(inputs) or len(g.output) != len(outputs):
        raise TargetError(f"ONNX export has {len(g.input)} input(s) and {len(g.output)} output(s), the graph "
                          f"{len(inputs)} and {len(outputs)}")
    taken = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    wanted = set(inputs) | set(outputs)

    def rename(old: str, new: str) -> None:
        for n in g.node:
            n.input[:] = [new if i == old else i for i in n.input]
            n.output[:] = [new if o == old else o for o in n.output]
        for coll in (g.input, g.output, g.value_info, g.initializer):
            for v in coll:
                if v.name == old:
                    v.name = new
        taken.discard(old)
        taken.add(new)

    # an output that is an input passed through comes as Identity(input): ONNX lets the output be the input itself,
    # and under the input's name it must (renamed, the Identity's output had defined 'x' twice: an invalid model)
    producers = {o: nd for nd in g.node for o in nd.output}
    for out, want in zip(g.output, outputs):
        src = producers.get(out.name)
        if want in inputs and src is not None and src.op_type == "Identity" and src.input[0] == g.input[
                inputs.index(want)].name:
            g.node.remove(src)
            out.name = src.input[0]
    pairs = [(v.name, want) for v, want in zip(list(g.input) + list(g.output), inputs + outputs)]
    interface = {old for old, _ in pairs}
    done: set[tuple[str, str]] = set()
    for old, want in pairs:
        if old == want or (old, want) in done:  # (an input passed through is renamed once, with its output)
            continue
        done.add((old, want))
        if want in taken and want not in interface:  # an internal value holds the name: move it aside first
            k = 1
            while f"{want}__{k}" in taken or f"{want}__{k}" in wanted:
                k += 1
            rename(want, f"{want}__{k}")
        rename(old, want)
    # an output that is a constant comes as an initializer, which the clean-ups below drop as read by no node (an
    # output defined nowhere, an invalid model): it is read by an Identity giving the output
    inits = {i.name: i for i in g.initializer}
    for out in g.output:
        if out.name in inits:
            inits[out.name].name = f"{out.name}__value"
            g.node.append(onnx.helper.make_node("Identity", [f"{out.name}__value"], [out.name]))


class _quiet:
    """Silence the exporter's progress prints on stdout and, on stderr, its registry's warnings (torchvision ops it
    skips, which a graph never uses) and onnxscript's constant folder's (a node it could not evaluate stays as it
    is: "Evaluation failed: cannot reshape array of size 1 into shape (1,128)" on a sparsified MiniLM's mask)."""

    LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")  # (onnx_ir: "Skipped deduplication of initializer ..." on a
    # constant output)

    def __enter__(self):
        import contextlib
        self._logs = [logging.getLogger(name) for name in self.LOGGERS]
        self._levels = [log_.level for log_ in self._logs]
        for log_ in self._logs:
            log_.setLevel(logging.ERROR)
        self._ctx = contextlib.redirect_stdout(io.StringIO())
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        for log_, level in zip(self._logs, self._levels):
            log_.setLevel(level)
        return self._ctx.__exit__(*exc)
