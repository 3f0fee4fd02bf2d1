"""Instruments the pass manager switches on: IR printing, numbered dumps, reproducers."""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np
import torch

from graphopt.ir.files import atomic_write_bytes
from graphopt.ir.graph import DTYPES, Graph
from graphopt.ir.names import input_name
from graphopt.ir.printer import graph_diff

log = logging.getLogger(__name__)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


class IRPrinter:
    """--print-ir-after-all / --print-ir-after-change: the IR (or its diff) after passes, to a stream."""

    def __init__(self, stream: TextIO, after_all: bool, after_change: bool, diff: bool = False):
        self.stream, self.after_all, self.after_change, self.diff = stream, after_all, after_change, diff

    def after_pass(self, index: int, name: str, before: Graph, after: Graph, changed: bool) -> None:
        if not (self.after_all or (self.after_change and changed)):
            return
        self.stream.write(f"// ----- IR after #{index} {name}{'' if changed else ' (unchanged)'} -----\n")
        self.stream.write(graph_diff(before, after, "before", name) if self.diff else after.text())
        self.stream.flush()


class DumpDir:
    """--dump-dir: one numbered text file per pass (00-input.ir, 01-fold-bn.ir, ...), plus the run record."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def dump(self, index: int, name: str, graph: Graph, diff_from: Graph | None = None) -> Path:
        path = self.root / f"{index:02d}-{slug(name)}.ir"
        body = graph.text()
        if diff_from is not None:
            d = graph_diff(diff_from, graph, "before", name)
            body += "\n// ----- diff against the previous IR -----\n" + (d or "// (no change)\n")
        atomic_write_bytes(path, body.encode())
        return path

    def record(self, records: list[dict]) -> None:
        atomic_write_bytes(self.root / "passes.json", json.dumps(records, indent=1, default=str).encode())


def write_reproducer(root: str | os.PathLike | None, index: int, pass_text: str, graph: Graph,
                     inputs: Sequence[Sequence[torch.Tensor]], why: str) -> Path:
    """Write input graph + one-pass pipeline + inputs so the failure replays with one command; return the folder."""
    base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="graphopt-"))
    name = pass_text.split("{")[0]
    folder = base / f"reproducer-{index:02d}-{slug(name)}"
    folder.mkdir(parents=True, exist_ok=True)
    graph.save(folder / "input.gopt")
    arrays = {f"b{b}_{i}": _numpy(t) for b, batch in enumerate(inputs) for i, t in enumerate(batch)}
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npz", delete=False) as f:
        np.savez(f, **arrays)
    os.replace(f.name, folder / "inputs.npz")
    atomic_write_bytes(folder / "pipeline.txt", (pass_text + "\n").encode())
    cmd = (f"graphopt opt {folder / 'input.gopt'} --pipeline '{pass_text}' --verify-each "
           f"--inputs {folder / 'inputs.npz'} -o {folder / 'output.gopt'}")
    atomic_write_bytes(folder / "README.txt", f"{why}\n\nReplay:\n  {cmd}\n".encode())
    return folder


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # (exact: every bfloat16 is a float32)


def _is_labels_key(key: str, names: list[str]) -> bool:
    return "labels" not in names and re.fullmatch(r"(b\d+_)?labels", key) is not None


def load_labels_npz(path: str | os.PathLike, graph: Graph,
                    batches: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor] | None:
    """The labels an inputs .npz holds for training passes (None where it holds none): "labels", one per sample
    (split as the inputs were: batches of the graph's batch size), or "b<batch>_labels" beside b<batch>_<input>
    keys. Integer class ids for the trainer's cross-entropy."""
    from graphopt.errors import InputMismatchError
    names = [s.name for s in graph.inputs]
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):  # (an .npy: one input's array, no labels)
        return None
    with loaded as npz:  # (the labels only, read and the file closed)
        data = {k: npz[k] for k in npz.files if _is_labels_key(k, names)}
    keys = list(data)
    if not keys:
        return None
    sizes = [int(b[0].shape[0]) if b and b[0].dim() else 1 for b in batches]
    if "labels" in keys:
        arr = data["labels"]
        if arr.ndim == 0 or arr.shape[0] != sum(sizes):
            raise InputMismatchError(f"'{path}': 'labels' has shape {list(arr.shape)}; it needs one label per sample, "
                                     f"{sum(sizes)} for the inputs' {len(batches)} batch(es)")
        cuts = np.cumsum([0] + sizes)
        parts = [arr[cuts[i]:cuts[i + 1]] for i in range(len(batches))]
    else:
        found = {int(re.fullmatch(r"b(\d+)_labels", k).group(1)): data[k] for k in keys}
        order = sorted(found)
        if len(order) != len(batches):
            raise InputMismatchError(f"'{path}': {len(order)} b<batch>_labels key(s) for {len(batches)} batch(es) "
                                     "of inputs: give every batch its labels, or none")
        parts = [found[b] for b in order]
        for b, part, size in zip(order, parts, sizes):
            if part.ndim == 0 or part.shape[0] != size:
                raise InputMismatchError(f"'{path}': b{b}_labels has shape {list(part.shape)}; its batch has {size} "
                                         "sample(s)")
    if not all(np.issubdtype(p.dtype, np.integer) for p in parts):
        raise InputMismatchError(f"'{path}': labels must be integer class ids (they are {parts[0].dtype}); a "
                                 "regression target needs a loss of your own (optimize(..., loss=...))")
    return [torch.from_numpy(np.ascontiguousarray(p).astype(np.int64)) for p in parts]


def load_inputs_npz(path: str | os.PathLike, graph: Graph) -> list[tuple[torch.Tensor, ...]]:
    """Batches from an .npz written by write_reproducer (b<batch>_<input index>; b<batch>_<input name> too) or with
    one array per input, or from an .npy (one array) for a graph of one input; an array whose first dimension is a
    multiple of the graph's fixed batch (8 images for a batch-1 model) is split into that many batches. "labels"
    keys are the training passes' (load_labels_npz); any other key that names no input is refused."""
    from graphopt.errors import InputMismatchError
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputMismatchError(f"cannot read inputs file '{path}': {e}") from None
    names = [s.name for s in graph.inputs]
    n_in = len(graph.inputs)
    if isinstance(data, np.ndarray):  # an .npy: the one input's array (it had crashed on data.keys())
        if n_in != 1:
            raise InputMismatchError(f"'{path}' holds one array (.npy) and the graph has {n_in} inputs "
                                     f"({', '.join(names)}): write an .npz with one array per input "
                                     f"(numpy.savez(path, {names[0]}=..., ...))")
        data = {names[0]: data}
    keys = [k for k in data.keys() if not _is_labels_key(k, names)]
    if all(n in keys for n in names):
        extra = [k for k in keys if k not in names]
        if extra:  # (an array meant for something else had been dropped without a word)
            raise InputMismatchError(f"'{path}': key(s) {', '.join(map(repr, extra))} name no graph input (the "
                                     f"inputs: {', '.join(names)}; 'labels' holds class ids for training passes)")
    tagged = [re.fullmatch(r"b(\d+)_(.+)", k) for k in keys]
    if keys and all(tagged) and not all(n in keys for n in names):
        # b<batch>_<input>: the input by its index (write_reproducer's keys) or by its name ("b0_input.1")
        groups: dict[int, dict[int, np.ndarray]] = {}
        for key, m in zip(keys, tagged):
            tag = m.group(2)
            tag = tag if tag.isdigit() or tag in names else input_name(tag)  # an ONNX input's own name too
            slot = int(tag) if tag.isdigit() else names.index(tag) if tag in names else None
            if slot is None or slot >= n_in:
                raise InputMismatchError(f"'{path}': key '{key}' names no graph input (the inputs: "
                                         f"{', '.join(names)}; use b<batch>_<input index or name>)")
            groups.setdefault(int(m.group(1)), {})[slot] = data[key]
        for b, arrays in sorted(groups.items()):
            if len(arrays) != n_in:
                missing = [names[i] for i in range(n_in) if i not in arrays]
                raise InputMismatchError(f"'{path}': batch {b} has no array for input(s) {', '.join(missing)}")
        batches = [tuple(torch.from_numpy(arrays[i]) for i in range(n_in)) for _, arrays in sorted(groups.items())]
    else:
        order = names if all(n in keys for n in names) else keys
        arrays = [data[k] for k in order[:n_in]]
        batches = [tuple(torch.from_numpy(a) for a in arrays)]
        # arrays holding several of the graph's fixed batches (4 images for a batch-1 model): one batch each; a
        # scalar input (0-d: a temperature, a threshold) goes with every batch (it had made the file one batch)
        shapes = [list(s.shape) for s in graph.inputs]
        split = [(a, sh) for a, sh in zip(arrays, shapes) if sh or a.ndim]
        if (len(arrays) == n_in and split and all(
                len(a.shape) == len(sh) and len(sh) and isinstance(sh[0], int) and sh[0] > 0
                and list(a.shape[1:]) == sh[1:] and a.shape[0] % sh[0] == 0 for a, sh in split)
                and len({a.shape[0] // sh[0] for a, sh in split}) == 1):
            n_b = split[0][0].shape[0] // split[0][1][0]
            batches = [tuple(torch.from_numpy(np.ascontiguousarray(a[b * sh[0]:(b + 1) * sh[0]])) if sh or a.ndim
                             else torch.from_numpy(a) for a, sh in zip(arrays, shapes)) for b in range(n_b)]
    # numpy has no bfloat16: float32 arrays for bfloat16 inputs (what write_reproducer saves) are rounded to it
    half = [DTYPES[s.dtype] if s.dtype == "bfloat16" else None for s in graph.inputs]
    batches = [tuple(t.to(h) if h is not None and t.dtype == torch.float32 else t for t, h in zip(b, half))
               for b in batches]
    for b in batches:
        try:
            graph.check_inputs(b)
        except InputMismatchError as e:
            raise InputMismatchError(f"{e} (in '{path}': one array per input, whose first dimension may hold several "
                                     f"batches of the graph's size, or b<batch>_<input> keys)") from None
    return batches
