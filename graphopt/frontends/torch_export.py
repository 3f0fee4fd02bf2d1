"""PyTorch frontend: torch.export -> Graph, and safe loading of weight files."""
from __future__ import annotations

import contextlib
import io
import logging
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from graphopt.errors import GraphoptError, InputMismatchError, ModelFileError
from graphopt.frontends import dynamic_dims_error, given_shape, open_batch
from graphopt.ir.graph import Graph

log = logging.getLogger(__name__)


def trace(module: torch.nn.Module, example_inputs: Sequence[Any] | Any = (), *,
          example_kwargs: dict[str, Any] | None = None, input_names: Sequence[str] | None = None,
          output_names: Sequence[str] | None = None) -> Graph:
    """Export `module` with static shapes taken from `example_inputs` (positional) and `example_kwargs` (keyword:
    `model(input_ids=..., attention_mask=...)`, as Hugging Face models are called) and return graphopt's Graph,
    whose inputs are the positional ones then the keyword ones, by name (`graph.inputs`).

    The module is put in eval mode on a copy of its state only for the duration of the export and is not modified.
    """
    if not isinstance(module, torch.nn.Module):
        raise GraphoptError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, (torch.Tensor,)) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if not example_inputs and not example_kwargs:
        raise GraphoptError("trace() needs example inputs: trace(model, (x,)) or trace(model, example_kwargs={...})")
    # each submodule's own mode back afterwards (module.train(flag) would set every submodule to the top's flag: a
    # wrapper in train mode around an eval-mode model left the model in train mode)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    # on a failed trace torch logs a warning with the partial graph and prints that graph to stderr again; the
    # error below says what failed (what stderr got is replayed after a trace that works, logged at debug after one
    # that fails)
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    err = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # torch warns on every nn.LSTM / GRU / RNN that its own `_flat_weights` list "must be registered as
            # buffers": nothing the user can change, and the weights are traced right
            warnings.filterwarnings("ignore", message=r"The tensor attributes? ([\w.]+\._flat_weights\[\d+\](, )?)+ "
                                                      r"(was|were) assigned during export")
            ep = torch.export.export(module, tuple(example_inputs), kwargs=example_kwargs or None, strict=False)
        sys.stderr.write(err.getvalue())
    except Exception as e:
        log.debug("torch.export's output before it failed:\n%s", err.getvalue())
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = ("; the model branches on, or sizes a tensor by, tensor values (a Python `if` on a tensor, x[mask], "
                ".item()), and graphopt compiles one static graph: use torch.where or a fixed-size form, or "
                "torch.cond for a branch") if "data-dependent" in first else ""
        raise GraphoptError(f"torch.export could not trace {type(module).__name__}: {first}{hint}") from e
    finally:
        shapes_log.setLevel(level)
        for m, training in modes:
            m.training = training
    return Graph.from_exported_program(ep, input_names, output_names, source=f"torch:{type(module).__name__}")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a .pth/.pt state dict with weights_only=True: tensors only, never arbitrary pickled objects."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"weights file '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"'{path}' contains pickled Python objects other than tensors; graphopt refuses to unpickle them "
            f"(weights_only=True). Re-save it with torch.save(model.state_dict()). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ModelFileError(f"'{path}' is not a readable PyTorch weights file (corrupt or truncated?): "
                             f"{str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"'{path}' does not hold a state dict (name -> tensor)")
    return state


def _pt2_refuse(path: Path, why: str) -> ModelFileError:
    return ModelFileError(f"'{path}': {why}. graphopt reads .pt2 archives only when nothing in them needs unpickling; "
                          "re-save the program with torch.export.save (torch 2.13) from plain tensor weights, or "
                          "export the model to ONNX")


def _check_pt2_safe(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse a torch.export archive whose loading would unpickle anything or load compiled code: torch's loader
    unpickles weights and constants marked use_pickle, custom/opaque objects and legacy .pt payloads with
    weights_only=False, and retries sample inputs the same way when a tensors-only load fails."""
    import io
    import json

    from torch.export.pt2_archive import constants as c

    names = zf.namelist()
    rel = {n.split("/", 1)[1]: n for n in names if "/" in n}
    if c.ARCHIVE_FORMAT_PATH not in rel or zf.read(rel[c.ARCHIVE_FORMAT_PATH]).decode(errors="replace").strip() \
            != c.ARCHIVE_FORMAT_VALUE:
        raise _pt2_refuse(path, "this is not a torch.export archive of the current format (no archive_format "
                                "'pt2'; older torch wrote pickled state dicts)")
    for r in rel:
        if r.startswith(c.AOTINDUCTOR_DIR) or r.startswith(c.EXECUTORCH_DIR) or r.startswith(c.MTIA_DIR):
            raise _pt2_refuse(path, f"it carries compiled code ('{r}'), which graphopt never loads")
        if r.startswith((c.WEIGHTS_DIR, c.CONSTANTS_DIR)) and r.endswith(".pt"):
            raise _pt2_refuse(path, f"'{r}' is a pickled payload of the legacy format")
    for r, full in rel.items():
        is_w = r.startswith(c.WEIGHTS_DIR) and r.endswith("_weights_config.json")
        is_c = r.startswith(c.CONSTANTS_DIR) and r.endswith("_constants_config.json")
        if not (is_w or is_c):
            continue
        try:
            config = json.loads(zf.read(full))["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelFileError(f"'{path}': '{r}' is not a readable payload config (corrupt?): {e}") from None
        for fqn, meta in config.items():
            if meta.get("use_pickle"):
                raise _pt2_refuse(path, f"{'weight' if is_w else 'constant'} '{fqn}' is stored pickled")
            if is_c and not str(meta.get("path_name", "")).startswith(c.TENSOR_CONSTANT_FILENAME_PREFIX):
                raise _pt2_refuse(path, f"constant '{fqn}' is a pickled Python/script object, not a tensor")
    for r, full in rel.items():
        if r.startswith(c.SAMPLE_INPUTS_DIR):
            try:
                torch.load(io.BytesIO(zf.read(full)), weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure means torch would retry with weights_only=False
                raise _pt2_refuse(path, f"its sample inputs '{r}' hold more than tensors "
                                        f"({str(e).splitlines()[0][:120]})") from None


def read_exported_program(path: str | Path):
    """The ExportedProgram in a torch.export archive (its program named 'model', else the first by name), after
    checking that reading it unpickles nothing and loads no compiled code (ModelFileError otherwise)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model '{path}' does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            _check_pt2_safe(path, zf)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ModelFileError(f"'{path}' is not a readable .pt2 archive (corrupt or truncated?): {e}") from None
    from torch.export.pt2_archive._package import load_pt2 as _load_pt2
    try:
        contents = _load_pt2(str(path), load_weights_from_disk=False)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds on a damaged archive
        raise ModelFileError(f"'{path}': torch could not deserialize the exported program: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    programs = contents.exported_programs
    if not programs:
        raise ModelFileError(f"'{path}' holds no exported program")
    name = "model" if "model" in programs else sorted(programs)[0]
    if len(programs) > 1:
        log.warning("%s holds %d exported programs (%s); importing '%s'", path, len(programs),
                    ", ".join(sorted(programs)), name)
    return programs[name]


def load_pt2(path: str | Path, input_shapes: dict[str, Sequence[int]] | None = None) -> Graph:
    """Import a torch.export archive (`torch.export.save(ep, "m.pt2")`, or graphopt's `--target pt2`) into a Graph
    (`read_exported_program`: nothing unpickled).

    A program exported with dynamic dims (`dynamic_shapes=`) is traced again at static ones, as an ONNX model's are:
    `input_shapes` {input name: shape} where given, else a dynamic batch dim at 1 (or its export's lower bound),
    with a warning; any other dynamic dim must be given. (Such a program had been taken at its example's sizes
    without a word, a batch of 2 as often as not, and --input-shape was refused for it.) The batch stays dynamic in
    an ONNX export (graph.meta "dynamic_batch")."""
    path = Path(path)
    ep = read_exported_program(path)
    users = _user_inputs(ep)
    names = [n.name for n in users]
    given = dict(input_shapes or {})
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputMismatchError(f"input shape given for {', '.join(map(repr, unknown))}, which the model does not "
                                 f"have; its inputs: {', '.join(map(repr, names))}")
    dynamic = {n.name: [k for k, d in enumerate(n.meta["val"].shape) if not isinstance(d, int)] for n in users}
    if not any(dynamic.values()):
        if given:
            raise GraphoptError(f"input shapes apply to a program's dynamic dims; '{path}' has none (it was "
                                "exported at fixed shapes): export it again with dynamic_shapes=")
        return Graph.from_exported_program(ep, source=f"pt2:{path.name}")
    unfixed = [(n.name, [d if isinstance(d, int) else str(d) for d in n.meta["val"].shape]) for n in users
               if n.name not in given and any(not isinstance(d, int) for d in n.meta["val"].shape[1:])]
    if unfixed:
        raise dynamic_dims_error(unfixed)
    examples, batch_dims = [], {}
    for n in users:
        val = n.meta["val"]
        if n.name in given:
            shape = _given_pt2_shape(n.name, val, given[n.name], ep)
            if open_batch(n.name, given[n.name]) and not isinstance(val.shape[0], int):  # (traced at 1)
                batch_dims[n.name] = "batch"
        else:
            shape = []
            for k, d in enumerate(val.shape):
                if isinstance(d, int):
                    shape.append(d)
                else:  # (the batch: any other dynamic dim was refused above)
                    shape.append(_lowest_batch(ep, d))
                    batch_dims[n.name] = "batch"  # (a saved program keeps its symbols, s0.., not the Dim's name)
            if n.name in batch_dims:
                log.warning("input '%s' has a dynamic batch dim; tracing and compiling at batch %d (an ONNX export "
                            "keeps it dynamic; choose another with --input-shape %s=..., input_shapes= in Python)",
                            n.name, shape[0], n.name)
        examples.append(torch.zeros(shape, dtype=val.dtype) if not val.dtype.is_floating_point
                        else torch.randn(shape, dtype=val.dtype))
    outputs = list(ep.graph_signature.user_outputs)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            static = torch.export.export(ep.module(), tuple(examples), strict=False)
    except Exception as e:
        raise InputMismatchError(f"'{path}' does not run at shapes "
                                 f"{', '.join(f'{k}={list(x.shape)}' for k, x in zip(names, examples))}: "
                                 f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    graph = Graph.from_exported_program(static, names, outputs, source=f"pt2:{path.name}")
    if batch_dims:
        graph.meta["dynamic_batch"] = {"inputs": batch_dims, "outputs": {}}
    return graph


def _user_inputs(ep) -> list:
    users = set(ep.graph_signature.user_inputs)
    return [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]


def _lowest_batch(ep, dim) -> int:
    """1, or the smallest batch the program's range constraints allow (torch.export's Dim defaults to 2..)."""
    try:
        lower = int(ep.range_constraints[dim.node.expr].lower)
    except Exception:
        lower = 1
    return max(1, lower)


def _given_pt2_shape(name: str, val, given, ep) -> list[int]:
    declared = [d if isinstance(d, int) else None for d in val.shape]
    lowest = 1 if isinstance(val.shape[0], int) else _lowest_batch(ep, val.shape[0])
    return given_shape(name, given, declared, open_at=lowest)
