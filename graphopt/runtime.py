"""Load a compiled artifact and call it. Needs only numpy and the TVM runtime (no torch at call time)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ArtifactError, InputMismatchError
from graphopt.targets.artifact import read_manifest


class CompiledModel:
    """A callable over numpy arrays: checks inputs against the manifest, returns a tuple of numpy outputs."""

    def __init__(self, folder: str | Path):
        import tvm
        from tvm import relax

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        lib_path = self.folder / "model.so"
        if not lib_path.exists():
            raise ArtifactError(f"artifact '{folder}' has no model.so")
        try:
            self._lib = tvm.runtime.load_module(str(lib_path))
            self._vm = relax.VirtualMachine(self._lib, tvm.cpu())
        except Exception as e:
            raise ArtifactError(f"cannot load '{lib_path}': {e}") from None
        self._fn = self._vm[self.manifest.get("entry", "main")]
        self._tvm = tvm
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]

    def _convert(self, args: tuple[Any, ...]) -> list:
        if len(args) != len(self.inputs):
            names = ", ".join(f"{s['name']}: {s['dtype']}{s['shape']}" for s in self.inputs)
            raise InputMismatchError(f"expected {len(self.inputs)} input(s) ({names}), got {len(args)}")
        out = []
        for spec, a in zip(self.inputs, args):
            if hasattr(a, "detach"):
                a = a.detach().cpu().numpy()
            a = np.asarray(a)
            if list(a.shape) != list(spec["shape"]):
                raise InputMismatchError(f"input '{spec['name']}' has shape {list(a.shape)}, expected {spec['shape']}")
            if str(a.dtype) != spec["dtype"]:
                raise InputMismatchError(f"input '{spec['name']}' has dtype {a.dtype}, expected {spec['dtype']}")
            out.append(self._tvm.runtime.tensor(np.ascontiguousarray(a)))
        return out

    def __call__(self, *args: Any) -> tuple[np.ndarray, ...]:
        res = self._fn(*self._convert(args))
        if hasattr(res, "numpy"):
            return (res.numpy(),)
        return tuple(r.numpy() for r in res)

    def prepared(self, *args: Any):
        """A no-argument callable running the model on these inputs, converted once (for timing loops)."""
        conv = self._convert(args)
        return lambda: self._fn(*conv)

    def latency(self, *args: Any, warmup: int = 3, runs: int = 20) -> float:
        """Median seconds of one call (inputs converted once, outside the timed region)."""
        call = self.prepared(*args)
        for _ in range(warmup):
            call()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    def __repr__(self) -> str:
        return f"CompiledModel('{self.folder}', inputs={self.inputs}, target={self.manifest.get('target')})"


def load(folder: str | Path) -> CompiledModel:
    """Load an artifact folder written by graphopt.compile / `graphopt compile`."""
    return CompiledModel(folder)
