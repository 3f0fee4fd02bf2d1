"""A dynamic batch dim for an ONNX export of a model that came in with one.

graphopt traces at one batch (an imported ONNX model's dynamic dim 0 at 1, or at the batch --input-shape gave), and
torch's exporter writes that batch into the file: into the interface, and into every Reshape's target shape. A
model that took any batch came back taking one, and a deploy pipeline that batches requests failed on the first
batch of 4 ("Got invalid dimensions for input: x ... Got: 4 Expected: 1"). `make_batch_dynamic` gives the interface
its dynamic dim back and rewrites each Reshape whose target names the traced batch so that it follows the batch
(-1 for the dim the batch is in, or 0, ONNX's "copy the input's dim", beside another -1), each constant concatenated
to batch-led activations, each per-sample GatherND and each Resize to a fixed size likewise, then checks the result in
ONNX Runtime: a batch of several rows must give each row what it gives that row alone. A model whose
batch is pinned some other way (a class token expanded to the traced batch, a Slice or Gather over dim 0) fails
that check and keeps its fixed batch, with the reason.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

# the check's tolerance on each output, as the RMS of the difference over the RMS of the fixed-batch output: a batch
# run differs from row-by-row runs by float summation order (and a requantized code that rounding flips); a Reshape
# that mixes rows is off by the output's size. DynamicQuantizeLinear takes its scale over the whole batch, so rows
# there see a slightly different grid than alone (MiniLM int8 dynamic: 0.02-0.05 in one run).
TOLERANCE = 1e-3
TOLERANCE_DYNAMIC_QUANT = 0.15


def make_batch_dynamic(model: onnx.ModelProto, dims: dict, batch: int,
                       folder: Path | None = None) -> tuple[onnx.ModelProto, str]:
    """`model` (written at batch `batch`) with the inputs and outputs `dims` names ({"inputs": {name: dim name},
    "outputs": {name: dim name or None}}) taking any batch, checked in ONNX Runtime. Returns (the dynamic model,
    "") or, where the check fails, (`model` unchanged, why). `folder`: where the weights `model` refers to lie,
    for a model past 2 GB (its small constants stay in it)."""
    g = model.graph
    inputs = {i.name: i for i in g.input}
    names = {k: v for k, v in dims.get("inputs", {}).items() if k in inputs}
    if not names:
        return model, "none of its dynamic inputs is in the export"
    for o in g.output:
        d = o.type.tensor_type.shape.dim
        if not len(d) or not d[0].HasField("dim_value") or d[0].dim_value != batch:
            return model, f"output '{o.name}' does not lead with the batch dim"
    default = next(iter(names.values()))
    out = copy.deepcopy(model)
    og = out.graph
    for i in og.input:
        if i.name in names:
            _set_dim0(i, names[i.name])
    for o in og.output:
        _set_dim0(o, dims.get("outputs", {}).get(o.name) or default)
    try:
        shapes = _static_shapes(model)
        del og.value_info[:]  # (inferred again by ONNX Runtime; they said batch `batch`)
        read_before = {i for n in og.node for i in n.input}
        _follow_batch_in_reshapes(og, shapes, batch)
        _expand_constants_in_concats(og, shapes, batch)
        _per_sample_gathers(og, shapes, batch)
        _resize_spatial_only(og, shapes, batch)
        _drop_orphans(og, read_before)
        _check(out, list(names), batch, folder)
    except _NotBatchable as e:
        return model, str(e)
    except Exception as e:  # noqa: BLE001 - a rewrite meeting a graph it did not foresee costs the dynamic batch,
        # never the export (the fixed-batch model is whole)
        return model, f"the batch rewrite failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return out, ""


class _NotBatchable(Exception):
    pass


def _set_dim0(value: onnx.ValueInfoProto, name: str) -> None:
    d = value.type.tensor_type.shape.dim[0]
    d.Clear()
    d.dim_param = name


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        d = v.type.tensor_type.shape.dim
        if len(d) and all(x.HasField("dim_value") for x in d):
            shapes[v.name] = [int(x.dim_value) for x in d]
    return shapes


def _namer(g: onnx.GraphProto):
    """A function giving names no initializer or node output of `g` has (nor any it gave before)."""
    taken = {i.name for i in g.initializer} | {o for n in g.node for o in n.output}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            name, k = f"{base}{k}", k + 1
        taken.add(name)
        return name
    return fresh


def _follow_batch_in_reshapes(g: onnx.GraphProto, shapes: dict[str, list[int]], batch: int) -> int:
    """Rewrite the constant target shape of each Reshape that carries the batch so that it follows it: a target
    leading with the batch (or with the batch times the data's next dims, the batch merged into rows) gets -1
    there, or 0 beside another -1 where the data leads with the batch too. Returns how many were rewritten."""
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    fresh = _namer(g)
    changed = 0
    for n in g.node:
        if n.op_type != "Reshape" or len(n.input) < 2 or n.input[0] not in shapes:
            continue
        target = _constant(n.input[1], inits, consts)
        if target is None or target.ndim != 1 or not target.size:
            continue
        data = shapes[n.input[0]]
        first, rest = int(target[0]), [int(x) for x in target[1:]]
        new = None
        if data and data[0] == batch:  # the batch leads the data
            merged = {batch * int(np.prod(data[1:j], dtype=np.int64)) for j in range(1, len(data) + 1)}
            if -1 not in rest and first in merged:
                new = -1
            elif -1 in rest and first == batch and 0 not in rest:
                new = 0  # (with allowzero=0, below: torch's exporter writes 1, a literal 0-sized dim)
        elif first == batch and -1 not in rest:  # the batch merged into the data's rows, split out again
            new = -1
        if new is None:
            continue
        name = fresh(f"{n.input[1]}_batch")
        g.initializer.append(numpy_helper.from_array(np.array([new] + rest, dtype=np.int64), name))
        n.input[1] = name
        if new == 0:
            for a in n.attribute:
                if a.name == "allowzero":
                    a.i = 0
        changed += 1
    return changed


def _drop_orphans(g: onnx.GraphProto, read_before: set[str]) -> None:
    """Remove the constants the rewrites left unread (ONNX Runtime warns of each on loading)."""
    read = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    orphaned = read_before - read
    keep = [i for i in g.initializer if i.name not in orphaned]
    del g.initializer[:]
    g.initializer.extend(keep)
    for n in [n for n in g.node if n.op_type == "Constant" and n.output and n.output[0] in orphaned]:
        g.node.remove(n)


def _expand_constants_in_concats(g: onnx.GraphProto, shapes: dict[str, list[int]], batch: int) -> int:
    """Expand each constant that a Concat joins, along another axis than 0, to batch-led activations, to their
    batch: a ViT's class token, one row written as a constant of the traced batch, took no other. Returns how many
    were expanded."""
    inits = {i.name: i for i in g.initializer}
    fresh = _namer(g)

    changed, nodes = 0, list(g.node)
    for n in nodes:
        if n.op_type != "Concat":
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        live = [i for i in n.input if i not in inits and shapes.get(i, [None])[0] == batch]
        rank = len(shapes.get(live[0], [])) if live else 0
        if not live or axis % max(rank, 1) == 0:
            continue
        for k, name in enumerate(n.input):
            if name not in inits or len(inits[name].dims) != rank or inits[name].dims[0] != batch:
                continue
            dim0 = fresh(f"{name}_batch_dim")
            tail = fresh(f"{name}_tail_dims")
            target = fresh(f"{name}_batch_shape")
            out = fresh(f"{name}_batched")
            g.initializer.append(numpy_helper.from_array(np.array(list(inits[name].dims[1:]), dtype=np.int64), tail))
            made = [onnx.helper.make_node("Shape", [live[0]], [dim0], start=0, end=1, name=fresh(f"{n.name}_dim0")),
                    onnx.helper.make_node("Concat", [dim0, tail], [target], axis=0, name=fresh(f"{n.name}_shape")),
                    onnx.helper.make_node("Expand", [name, target], [out], name=fresh(f"{n.name}_expand"))]
            at = list(g.node).index(n)
            for j, m in enumerate(made):
                g.node.insert(at + j, m)
            n.input[k] = out
            changed += 1
    return changed


def _per_sample_gathers(g: onnx.GraphProto, shapes: dict[str, list[int]], batch: int) -> int:
    """Rewrite each GatherND whose constant indices pick, in index b, from data row b (batch-led data): the traced
    form of a per-sample lookup (a Hugging Face attention mask built with vmap: mask[batch_idx, kv_idx], batch_idx
    traced as the constants 0..batch-1), which at another batch read row 0 for every sample. It becomes GatherND
    with batch_dims=1 over the indices without their batch coordinate, expanded to the batch. Returns how many."""
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    fresh = _namer(g)

    changed = 0
    for n in list(g.node):
        if n.op_type != "GatherND" or any(a.name == "batch_dims" and a.i != 0 for a in n.attribute):
            continue
        data = shapes.get(n.input[0])
        idx = _constant(n.input[1], inits, consts)
        if not data or data[0] != batch or idx is None or idx.ndim < 2 or idx.shape[0] != batch or idx.shape[-1] < 2:
            continue
        rows = np.arange(batch).reshape((batch,) + (1,) * (idx.ndim - 1))
        if not np.array_equal(idx[..., 0], np.broadcast_to(rows[..., 0], idx.shape[:-1])):
            continue
        rest = fresh(f"{n.input[1]}_per_sample")
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(idx[:1, ..., 1:]).astype(np.int64), rest))
        dim0, tail, target, wide = (fresh(f"{n.name}_{k}") for k in ("batch_dim", "tail_dims", "shape", "indices"))
        g.initializer.append(numpy_helper.from_array(np.array(idx.shape[1:-1] + (idx.shape[-1] - 1,), np.int64),
                                                     tail))
        made = [onnx.helper.make_node("Shape", [n.input[0]], [dim0], start=0, end=1, name=fresh(f"{n.name}_dim0")),
                onnx.helper.make_node("Concat", [dim0, tail], [target], axis=0, name=fresh(f"{n.name}_shape")),
                onnx.helper.make_node("Expand", [rest, target], [wide], name=fresh(f"{n.name}_expand"))]
        at = list(g.node).index(n)
        for j, m in enumerate(made):
            g.node.insert(at + j, m)
        n.input[1] = wide
        for a in list(n.attribute):
            if a.name == "batch_dims":
                n.attribute.remove(a)
        n.attribute.append(onnx.helper.make_attribute("batch_dims", 1))
        changed += 1
    return changed


def _resize_spatial_only(g: onnx.GraphProto, shapes: dict[str, list[int]], batch: int) -> int:
    """Give each Resize whose constant `sizes` lead with the traced batch and the data's channels (an interpolate
    to a given size) those sizes for its other axes only (opset 18's `axes`), so that it keeps any batch. Returns
    how many."""
    inits = {i.name: i for i in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant" and n.output}
    fresh = _namer(g)
    changed = 0
    for n in g.node:
        if n.op_type != "Resize" or len(n.input) < 4 or not n.input[3] or any(a.name == "axes" for a in n.attribute):
            continue
        data, sizes = shapes.get(n.input[0]), _constant(n.input[3], inits, consts)
        if not data or sizes is None or sizes.ndim != 1 or len(sizes) != len(data) or len(data) < 3:
            continue
        if data[0] != batch or sizes[0] != batch or sizes[1] != data[1]:
            continue
        name = fresh(f"{n.input[3]}_spatial")
        g.initializer.append(numpy_helper.from_array(np.asarray(sizes[2:], dtype=np.int64), name))
        n.input[3] = name
        n.attribute.append(onnx.helper.make_attribute("axes", list(range(2, len(data)))))
        changed += 1
    return changed


def _constant(name: str, inits: dict, consts: dict) -> np.ndarray | None:
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = consts.get(name)
    if node is not None:
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
            if a.name == "value_ints":
                return np.array(list(a.ints), dtype=np.int64)
    return None


def _check(dynamic: onnx.ModelProto, batched: list[str], batch: int, folder: Path | None = None) -> None:
    """Raise _NotBatchable unless `dynamic` run on rows batched together gives each row what it gives that row
    alone. (Both runs on the dynamic model: ONNX Runtime fuses a fixed-shape QDQ model differently, into QGemm, and
    that alone moved one random MiniLM input 4.5% while the unfused, dynamic form kept to QDQ's own arithmetic.)"""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        if folder is None:
            sess = ort.InferenceSession(dynamic.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        else:  # (ONNX Runtime finds external data beside the model's file)
            onnx.save_model(dynamic, str(folder / ".batch_check.onnx"))
            sess = ort.InferenceSession(str(folder / ".batch_check.onnx"), opts, providers=["CPUExecutionProvider"])
            (folder / ".batch_check.onnx").unlink()
    except Exception as e:
        raise _NotBatchable(f"ONNX Runtime refused it: {_first_line(e)}") from None
    rows = 3 if batch != 3 else 2
    rng = np.random.default_rng(0)
    inits = {x.name for x in dynamic.graph.initializer}
    feed = {}
    for i in dynamic.graph.input:
        if i.name not in inits:
            shape = [rows if k == 0 and i.name in batched else int(d.dim_value)
                     for k, d in enumerate(i.type.tensor_type.shape.dim)]
            feed[i.name] = _sample(rng, shape, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
    try:
        got = sess.run(None, feed)
    except Exception as e:
        raise _NotBatchable(f"ONNX Runtime failed on a batch of {rows}: {_first_line(e)}") from None
    quant = any(n.op_type == "DynamicQuantizeLinear" for n in dynamic.graph.node)
    tol = TOLERANCE_DYNAMIC_QUANT if quant else TOLERANCE
    for r in range(rows):
        try:
            want = sess.run(None, {name: (a[r:r + 1] if name in batched else a) for name, a in feed.items()})
        except Exception as e:
            raise _NotBatchable(f"ONNX Runtime failed on a batch of 1: {_first_line(e)}") from None
        for o, w, y in zip(dynamic.graph.output, want, got):
            if y.shape[0] != rows or y.shape[1:] != w.shape[1:]:
                raise _NotBatchable(f"output '{o.name}' has shape {list(y.shape)} on a batch of {rows}, "
                                    f"{list(w.shape)} on one")
            ref = w[0].astype(np.float64)
            err = np.sqrt(np.mean((y[r].astype(np.float64) - ref) ** 2)) / max(np.sqrt(np.mean(ref ** 2)), 1e-12)
            if not err <= tol:
                raise _NotBatchable(f"on a batch of {rows}, row {r} of output '{o.name}' differs from the same row "
                                    f"run alone (relative RMS {err:.2g}): something other than Reshape holds the "
                                    f"traced batch")


def _sample(rng, shape: list[int], dtype) -> np.ndarray:
    """Rows that differ (a check on equal rows could not see rows mixed up): normal floats, integers 0/1 (in range
    for any embedding table, mask or token-type input)."""
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(dtype)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
