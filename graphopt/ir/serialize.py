"""Save/load a Graph as a zip of JSON (the graph) and raw tensor bytes. Loading never unpickles anything.

Ops are stored by their qualified name (`aten.conv2d.default`) and resolved only inside the `torch.ops`
namespaces and a short allow-list of Python functions, so a file cannot name arbitrary code to run.
"""
from __future__ import annotations

import io
import json
import math
import operator
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from graphopt.errors import ModelFileError
from graphopt.ir.files import atomic_write_bytes
from graphopt.ir.graph import DTYPES, Graph, TensorSpec, dtype_name
from graphopt.ir.printer import target_name

FORMAT = "graphopt-graph"
VERSION = 1
ALLOWED_NAMESPACES = ("aten", "graphopt", "prims", "quantized_decomposed")
PY_FUNCTIONS = {"operator.getitem": operator.getitem}
MEMORY_FORMATS = {str(m): m for m in (torch.contiguous_format, torch.channels_last, torch.preserve_format)}


def _enc(a: Any) -> Any:
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, bool) or a is None or isinstance(a, (int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, torch.dtype):
        return {"dtype": dtype_name(a)}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a)}
    raise ModelFileError(f"cannot serialize argument of type {type(a).__name__}: {a!r}")


def _dec(a: Any, env: dict[str, fx.Node]) -> Any:
    if isinstance(a, list):
        return [_dec(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    if "node" in a:
        return env[a["node"]]
    if "tuple" in a:
        return tuple(_dec(x, env) for x in a["tuple"])
    if "float" in a:
        return float(a["float"])
    if "dtype" in a:
        return DTYPES[a["dtype"]]
    if "device" in a:
        return torch.device(a["device"])
    if "memory_format" in a:
        return MEMORY_FORMATS[a["memory_format"]]
    if "layout" in a:
        return torch.strided
    raise ModelFileError(f"unknown argument encoding {a!r}")


def resolve_target(name: str) -> Any:
    """'aten.conv2d.default' -> torch.ops.aten.conv2d.default; only torch.ops namespaces and the allow-list."""
    if name in PY_FUNCTIONS:
        return PY_FUNCTIONS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in ALLOWED_NAMESPACES:
        raise ModelFileError(f"op '{name}' is not an allowed torch op; the file may be corrupt or hostile")
    if parts[0] == "graphopt":
        import graphopt.ir.quant_ops  # noqa: F401  registers graphopt's own ops
        import graphopt.ir.sparse_ops  # noqa: F401
    try:
        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError) as e:
        raise ModelFileError(f"op '{name}' does not exist in this torch build ({e})") from None


def save_graph(g: Graph, path: str | Path) -> None:
    """Write the graph atomically to `path` (a .gopt zip)."""
    nodes, tensors = [], {}
    for n in g.gm.graph.nodes:
        rec = {"name": n.name, "op": n.op}
        if n.op == "call_function":
            rec["target"] = target_name(n.target)
            rec["args"] = _enc(tuple(n.args))["tuple"]
            rec["kwargs"] = {k: _enc(v) for k, v in n.kwargs.items()}
        elif n.op == "get_attr":
            rec["target"] = n.target
            if "source_fqn" in n.meta:
                rec["source_fqn"] = n.meta["source_fqn"]
        elif n.op == "output":
            rec["args"] = _enc(tuple(n.args))["tuple"]
        elif n.op != "placeholder":
            raise ModelFileError(f"node '{n.name}' ({n.op}) cannot be serialized; only ATen-level graphs can")
        nodes.append(rec)
    params = {}
    for name, t in g.params().items():
        t = t.detach().contiguous().cpu()
        params[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "parameter": isinstance(getattr(g.gm, name), torch.nn.Parameter)}
        tensors[name] = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    doc = {"format": FORMAT, "version": VERSION, "inputs": [s.to_json() for s in g.inputs],
           "outputs": [s.to_json() for s in g.outputs], "nodes": nodes, "params": params,
           "meta": json.loads(json.dumps(g.meta, default=str)),
           "masks": {name: list(m.shape) for name, m in g.masks.items()}}
    for name, m in g.masks.items():
        tensors[f"mask.{name}"] = np.packbits(m.reshape(-1).numpy().astype(np.uint8)).tobytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("graph.json", json.dumps(doc, indent=1))
        for name, data in tensors.items():
            z.writestr(f"tensors/{name}.bin", data)
    atomic_write_bytes(path, buf.getvalue())


def load_graph(path: str | Path) -> Graph:
    """Read a .gopt file written by save_graph; any damage is a ModelFileError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"'{path}' does not exist")
    try:
        with zipfile.ZipFile(path) as z:
            doc = json.loads(z.read("graph.json"))
            if doc.get("format") != FORMAT:
                raise ModelFileError(f"'{path}' is not a graphopt graph (format={doc.get('format')!r})")
            if doc.get("version") != VERSION:
                raise ModelFileError(f"'{path}' has graph format version {doc.get('version')}, this graphopt reads {VERSION}")
            root = torch.nn.Module()
            for name, p in doc["params"].items():
                raw = z.read(f"tensors/{name}.bin")
                dt = DTYPES[p["dtype"]]
                t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt).reshape(p["shape"]) if raw else \
                    torch.empty(p["shape"], dtype=dt)
                if p.get("parameter"):
                    root.register_parameter(name, torch.nn.Parameter(t.clone(), requires_grad=False))
                else:
                    root.register_buffer(name, t.clone())
            masks = {}
            for name, shape in doc.get("masks", {}).items():
                if name not in doc["params"] or list(doc["params"][name]["shape"]) != list(shape):
                    raise ModelFileError(f"'{path}': the sparsity mask of '{name}' matches no parameter of its shape")
                bits = np.unpackbits(np.frombuffer(z.read(f"tensors/mask.{name}.bin"), dtype=np.uint8))
                masks[name] = torch.from_numpy(bits[: int(np.prod(shape))].astype(bool)).reshape(shape)
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, RuntimeError, json.JSONDecodeError, EOFError) as e:
        raise ModelFileError(f"'{path}' is not a readable graphopt graph (corrupt or truncated?): {e}") from None
    fg = fx.Graph()
    env: dict[str, fx.Node] = {}
    try:
        for rec in doc["nodes"]:
            op = rec["op"]
            if op == "placeholder":
                node = fg.placeholder(rec["name"])
            elif op == "get_attr":
                if rec["target"] not in doc["params"]:
                    raise ModelFileError(f"'{path}': node '{rec['name']}' reads missing parameter '{rec['target']}'")
                node = fg.get_attr(rec["target"])
                if "source_fqn" in rec:
                    node.meta["source_fqn"] = rec["source_fqn"]
            elif op == "call_function":
                node = fg.call_function(resolve_target(rec["target"]), tuple(_dec(rec["args"], env)),
                                        {k: _dec(v, env) for k, v in rec["kwargs"].items()})
            elif op == "output":
                node = fg.output(_dec(rec["args"], env)[0])
            else:
                raise ModelFileError(f"'{path}': node '{rec.get('name')}' has unknown kind '{op}'")
            node.name = rec["name"]
            env[rec["name"]] = node
        g = Graph(fx.GraphModule(root, fg), [TensorSpec.from_json(s) for s in doc["inputs"]],
                  [TensorSpec.from_json(s) for s in doc["outputs"]], doc.get("meta", {}), masks)
        g.refresh()
    except ModelFileError:
        raise
    except Exception as e:  # a damaged graph can fail in many ways inside fx; name the file
        raise ModelFileError(f"'{path}' holds a graph that does not verify: {e}") from None
    return g
