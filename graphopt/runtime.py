"""Load a compiled artifact and call it. Needs only numpy and the TVM runtime (no torch at call time)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ArtifactError, InputMismatchError
from graphopt.targets.artifact import read_manifest
from graphopt.targets.tvm.gpu.device import cuda_available, cuda_runtime_loaded  # noqa: F401  (re-exported)


class CompiledModel:
    """A callable over numpy arrays: checks inputs against the manifest, returns a tuple of numpy outputs."""

    def __init__(self, folder: str | Path):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # relax's VM; importable from a runtime-only TVM too

        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        lib_path = self.folder / "model.so"
        if not lib_path.exists():
            raise ArtifactError(f"artifact '{folder}' has no model.so")
        self.device_kind = self.manifest.get("target_info", {}).get("device", "cpu")
        if self.device_kind == "cuda":
            self.device = _cuda_device(self.manifest)
        else:
            _check_isa(self.manifest)
            self.device = tvm.cpu()
        private = _private_link(lib_path)
        try:
            self._lib = tvm.runtime.load_module(str(private))
            self._vm = VirtualMachine(self._lib, self.device)
        except Exception as e:
            raise ArtifactError(f"cannot load '{lib_path}': {e}") from None
        finally:
            private.unlink(missing_ok=True)  # (the loaded library stays mapped)
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
                a = _to_numpy(a)
            a = np.asarray(a)
            if list(a.shape) != list(spec["shape"]):
                raise InputMismatchError(f"input '{spec['name']}' has shape {list(a.shape)}, expected {spec['shape']}")
            if str(a.dtype) != spec["dtype"]:
                raise InputMismatchError(f"input '{spec['name']}' has dtype {a.dtype}, expected {spec['dtype']}")
            if "range" in spec and a.size:
                lo, hi = spec["range"]
                bad = np.flatnonzero((a < lo) | (a >= hi))
                if bad.size:
                    at = tuple(int(i) for i in np.unravel_index(bad[0], a.shape))
                    raise InputMismatchError(
                        f"input '{spec['name']}' holds {a[at]} at {list(at)} ({bad.size} value(s) out of range): "
                        f"it indexes the embedding '{spec.get('range_node', '?')}', which takes {lo}..{hi - 1}")
            out.append(self._tvm.runtime.tensor(np.ascontiguousarray(a), device=self.device))
        return out

    def __call__(self, *args: Any) -> tuple[np.ndarray, ...]:
        res = self._fn(*self._convert(args))
        if hasattr(res, "numpy"):
            return (res.numpy(),)
        return tuple(r.numpy() for r in res)

    def prepared(self, *args: Any):
        """A no-argument callable running the model on these inputs, converted once (for timing loops); on a GPU
        it returns only when the kernels have finished (they run asynchronously)."""
        conv = self._convert(args)
        if self.device_kind == "cpu":
            return lambda: self._fn(*conv)

        def call():
            out = self._fn(*conv)
            self.sync()
            return out
        return call

    def sync(self) -> None:
        """Wait for the device (GPU kernels run asynchronously; a timing must end here)."""
        if self.device_kind != "cpu":
            self.device.sync()

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


def _to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy; bfloat16 (which numpy lacks) as ml_dtypes' bfloat16, which TVM takes."""
    import torch  # (loaded already: t is a torch tensor)
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.view(dtype=torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def missing_isa(manifest: dict) -> list[str]:
    """The ISA extensions a CPU artifact's code may use and this machine lacks (empty: it runs here)."""
    from graphopt.targets.tvm.host import missing_here
    return missing_here(manifest.get("target_info", {}).get("isa", []))


def _check_isa(manifest: dict) -> None:
    """An artifact cross-compiled (`--cpu`) for a CPU with extensions this one lacks would die on an illegal
    instruction at its first call: refuse it at load, naming what is missing."""
    info = manifest.get("target_info", {})
    missing = missing_isa(manifest)
    if missing:
        raise ArtifactError(f"this artifact was compiled for {info.get('mcpu') or 'another CPU'}, and its code uses "
                            f"{', '.join(missing)}, which this CPU lacks (it would stop on an illegal instruction): "
                            "run it on such a CPU, or compile again here without --cpu")


def _cuda_device(manifest: dict):
    import tvm
    archs = ",".join(manifest.get("target_info", {}).get("archs", []))
    if not cuda_available():
        raise ArtifactError(f"this artifact runs on an NVIDIA GPU ({archs}) and no CUDA GPU or driver was found "
                            "here; run it on the GPU machine, or compile with --target llvm for this CPU")
    dev = tvm.cuda(0)
    have = "sm_" + str(dev.compute_version).replace(".", "")
    built = manifest.get("target_info", {}).get("archs", [])
    if built and int(have[3:]) < int(built[0][3:]):
        raise ArtifactError(f"this GPU is {have}; the artifact's kernels need at least {built[0]} (built for "
                            f"{archs}): compile again with --cuda-arch {have}")
    return dev


def _private_link(lib_path: Path) -> Path:
    """A fresh path to the artifact's library (a hard link, else a copy, in the temp folder). The dynamic loader
    keys libraries by path: loading model.so again after compiling into the same folder returned the library
    loaded first, so the old model ran (a notebook's edit-compile-load loop)."""
    import os
    import shutil
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix="graphopt-model-", suffix=".so")
    os.close(fd)
    os.unlink(tmp)
    try:
        os.link(lib_path, tmp)
    except OSError:  # another file system
        shutil.copyfile(lib_path, tmp)
    return Path(tmp)


def load(folder: str | Path) -> CompiledModel:
    """Load an artifact folder written by graphopt.compile / `graphopt compile`."""
    return CompiledModel(folder)
