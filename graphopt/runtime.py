"""Load a compiled artifact and call it. Needs only numpy and the TVM runtime (no torch at call time)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from graphopt.errors import ArtifactError, GraphoptError, InputMismatchError, cast_hint
from graphopt.targets.artifact import file_sha256, read_manifest, shape_text
from graphopt.targets.tvm.gpu.device import cuda_available, cuda_runtime_loaded  # noqa: F401  (re-exported)


class ArtifactModel:
    """What every artifact's runner shares: the manifest, inputs checked against it, timing. Call it with one
    array per input (numpy, or anything numpy or torch can hand over); it returns a tuple of numpy outputs."""

    device_kind = "cpu"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.inputs = self.manifest["inputs"]
        self.outputs = self.manifest["outputs"]
        self._dtypes = [_np_dtype(s["dtype"]) for s in self.inputs]

    def _file(self, name: str) -> Path:
        """The artifact's file `name`, as built: its size and sha256 as the manifest records them. (A model.so cut
        short by a partial copy crashed the process with SIGBUS when the loader mapped it; a changed one is not
        what the manifest describes.)"""
        path = self.folder / name
        if not path.exists():
            raise ArtifactError(f"artifact '{self.folder}' has no {name}")
        built = (self.manifest.get("files") or {}).get(name)
        if built:
            size = path.stat().st_size
            again = "copy the folder again, or build it again with graphopt compile"
            if size != built.get("bytes", size):
                raise ArtifactError(f"'{path}' is damaged: it has {size} bytes, the artifact was built with "
                                    f"{built['bytes']} (a partial copy?); {again}")
            if built.get("sha256") and file_sha256(path) != built["sha256"]:
                raise ArtifactError(f"'{path}' is damaged: it is not the file the artifact was built with (its "
                                    f"sha256 differs from the manifest's); {again}")
        return path

    def _check(self, args: tuple[Any, ...]) -> list[np.ndarray]:
        if len(args) != len(self.inputs):
            names = ", ".join(f"{s['name']}: {s['dtype']}{shape_text(s)}" for s in self.inputs)
            raise InputMismatchError(f"expected {len(self.inputs)} input(s) ({names}), got {len(args)}")
        out = []
        for spec, want, a in zip(self.inputs, self._dtypes, args):
            if hasattr(a, "detach"):
                a = _to_numpy(a)
            a = np.asarray(a)
            if list(a.shape) != list(spec["shape"]) and not _any_batch(spec, a.shape):
                raise InputMismatchError(f"input '{spec['name']}' has shape {list(a.shape)}, expected "
                                         f"{shape_text(spec)}" + _batch_hint(spec, a.shape))
            if a.dtype != want and str(a.dtype) != spec["dtype"]:  # (str(dtype) alone took 5 us)
                raise InputMismatchError(f"input '{spec['name']}' has dtype {a.dtype}, expected {spec['dtype']}"
                                         + cast_hint(str(a.dtype), spec["dtype"]))
            if "range" in spec and a.size:
                lo, hi = spec["range"]
                bad = np.flatnonzero((a < lo) | (a >= hi))
                if bad.size:
                    at = tuple(int(i) for i in np.unravel_index(bad[0], a.shape))
                    raise InputMismatchError(
                        f"input '{spec['name']}' holds {a[at]} at {list(at)} ({bad.size} value(s) out of range): "
                        f"it indexes the embedding '{spec.get('range_node', '?')}', which takes {lo}..{hi - 1}")
            out.append(a)
        batches = {spec["name"]: a.shape[0] for spec, a in zip(self.inputs, out) if "batch_dim" in spec}
        if len(set(batches.values())) > 1:  # (ONNX Runtime failed inside, on the first op joining two of them)
            sizes = ", ".join(f"'{k}' {v}" for k, v in batches.items())
            raise InputMismatchError(f"the inputs' batches differ ({sizes}); every input that takes any batch "
                                     "takes the same one in a call")
        return out

    def __call__(self, *args: Any) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def prepared(self, *args: Any):
        """A no-argument callable running the model on these inputs, for timing loops: the whole call a user
        makes (inputs checked and passed, outputs copied out), as ONNX Runtime's `run` is timed."""
        self._check(args)  # (a bad input fails here, not in the timing loop)
        return lambda: self(*args)

    def sync(self) -> None:
        """Wait for the device (GPU kernels run asynchronously; a timing must end here)."""

    def latency(self, *args: Any, warmup: int = 3, runs: int = 20) -> float:
        """Median seconds of one call (`prepared`: on the CPU the whole call, inputs and outputs included)."""
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
        return f"{type(self).__name__}('{self.folder}', inputs={self.inputs}, target={self.manifest.get('target')})"

    def __reduce__(self):
        """Pickled as its folder (a loaded library cannot be): multiprocessing's spawn and Pool workers, or a
        process pool handed the model, load the artifact again from the folder, which must be readable there; an
        artifact compiled again in between is refused (the manifest's file digests differ). Pickling had failed
        with "Module[library] does not support SaveToBytes" after a screen of TVM warnings."""
        return _reload, (str(self.folder.resolve()), getattr(self, "_threads", None), self.manifest.get("files"))


def _batch_hint(spec: dict, shape: tuple[int, ...]) -> str:
    """Where only the batch differs from a fixed-batch artifact's: how to get one for that batch."""
    want = list(spec["shape"])
    if "batch_dim" in spec or len(shape) != len(want) or not want or list(shape[1:]) != want[1:]:
        return ""
    dims = "x".join(str(d) for d in [shape[0]] + want[1:])
    return (f": this artifact was built for batch {want[0]}; call it per batch of {want[0]}, or build one for "
            f"batch {shape[0]} (graphopt compile ... --input-shape {spec['name']}={dims}; an ONNX export of a model "
            "with a dynamic batch takes any)")


def _any_batch(spec: dict, shape: tuple[int, ...]) -> bool:
    """An input whose dim 0 the artifact takes at any size (an ONNX export of a model that came with a dynamic batch:
    spec "batch_dim", its name), the other dims as recorded."""
    return ("batch_dim" in spec and len(shape) == len(spec["shape"]) >= 1 and shape[0] >= 1
            and list(shape[1:]) == list(spec["shape"][1:]))


class CompiledModel(ArtifactModel):
    """A TVM artifact (model.so, CPU or CUDA), run by TVM's Relax VM: numpy and the TVM runtime only.

    Safe to call from several threads at once (a server's request threads): a Relax VM keeps its registers and
    frames in the VM object, and two threads calling one VM crashed the process (a segfault within a few calls),
    so on the CPU each calling thread runs its own VM over the one loaded library (a VM costs microseconds and no
    memory: the constants stay the library's). TVM gives each calling thread its own worker pool, so N threads
    calling at once run N x `TVM_NUM_THREADS` workers. On a GPU, where a VM copies the constants to the device,
    calls take turns on one VM."""

    def __init__(self, folder: str | Path):
        import tvm
        from tvm.runtime.vm import VirtualMachine  # relax's VM; importable from a runtime-only TVM too

        super().__init__(folder)
        lib_path = self._file("model.so")
        self.device_kind = self.manifest.get("target_info", {}).get("device", "cpu")
        if self.device_kind == "cuda":
            self.device = _cuda_device(self.manifest)
        else:
            _check_isa(self.manifest)
            self.device = tvm.cpu()
        private = _private_link(lib_path)
        try:
            self._lib = tvm.runtime.load_module(str(private))
            self._vm_class = VirtualMachine
            self._fn = self._new_function()
            self._weights = self._prepared_weights()
        except Exception as e:
            raise ArtifactError(f"cannot load '{lib_path}': {e}") from None
        finally:
            private.unlink(missing_ok=True)  # (the loaded library stays mapped)
        self._tvm = tvm
        self._owner = threading.get_ident()  # the thread whose VM is self._fn
        self._local = threading.local()
        self._gpu_lock = threading.Lock() if self.device_kind != "cpu" else None
        fresh = self.manifest.get("target_info", {}).get("fresh_outputs") or []
        self._fresh = [f is True for f in fresh] if len(fresh) == len(self.manifest.get("outputs") or []) else []

    def _new_function(self):
        """The entry function of a fresh VM over the loaded library."""
        return self._vm_class(self._lib, self.device)[self.manifest.get("entry", "main")]

    def _prepared_weights(self) -> list:
        """The weights the artifact makes once, at load (int4 nibbles widened, weight-only int8 codes dequantized:
        targets/tvm/cpu/prepared.py), passed to every call after the inputs; none for other artifacts."""
        count = int(self.manifest.get("target_info", {}).get("prepared_weights") or 0)
        if not count:
            return []
        import tvm
        seed = tvm.runtime.tensor(np.zeros(1, np.int8), self.device)  # (never read)
        weights = list(self._vm_class(self._lib, self.device)["prepare"](seed))
        if len(weights) != count:
            raise ArtifactError(f"the manifest's target_info.prepared_weights says {count}, but the library's "
                                f"prepare function made {len(weights)}: the manifest and model.so come from "
                                "different compiles; compile the model again")
        return weights

    def _function(self):
        """This thread's entry function (see the class doc): the loading thread's is self._fn."""
        if self._gpu_lock is not None or threading.get_ident() == self._owner:
            return self._fn
        fn = getattr(self._local, "fn", None)
        if fn is None:
            fn = self._local.fn = self._new_function()
        return fn

    def _invoke(self, args: list):
        args = args + self._weights if self._weights else args
        if self._gpu_lock is None:
            if _Fork.thread == threading.get_ident():
                return _Fork.helper().submit(lambda: self._function()(*args)).result()
            return self._function()(*args)
        with self._gpu_lock:
            return self._fn(*args)

    def _convert(self, args: tuple[Any, ...]) -> list:
        return [self._tensor(a) for a in self._check(args)]

    def _tensor(self, a: np.ndarray):
        """An input as a TVM tensor. On the CPU a C-contiguous array on a 64-byte boundary (what TVM's and
        torch's allocators give, and what a kernel may assume of its arguments) is passed as it is, through DLPack:
        tvm.runtime.tensor's allocate-and-copy took ~25 us of Python a call, more than a small model's kernels. No
        kernel writes its inputs, and outputs are copied out (`_numpy`), so the caller's array is never aliased."""
        a = np.ascontiguousarray(a).reshape(a.shape)  # (keeping a 0-d input 0-d: ascontiguousarray gives 1-d)
        if self.device_kind == "cpu":
            try:
                t = _wrap(a)
                if t.data_ptr() % 64:  # (checked here: tvm.runtime.from_dlpack's own check raises, ~30 us)
                    t = _wrap(_aligned_copy(a))
                return t
            except (BufferError, RuntimeError, TypeError, ValueError):
                pass  # a read-only array (numpy < 2.1), ml_dtypes' bfloat16: copied below
        return self._tvm.runtime.tensor(a, device=self.device)

    def _numpy(self, r, fresh: bool = False) -> np.ndarray:
        """An output as a numpy array of its own. Through DLPack on the CPU (Tensor.numpy() spent ~10 us of Python
        on each output): the VM's own tensor where the build found it allocated for this output in this call
        (manifest target_info "fresh_outputs", `pipeline.fresh_outputs`), else a copy: the VM may hand back a
        constant, an input it was given, or two views of one tensor."""
        if self.device_kind == "cpu":
            try:
                a = np.from_dlpack(r)
                return a if fresh else a.copy()
            except (BufferError, RuntimeError, TypeError, ValueError):
                pass  # bfloat16, which numpy's DLPack import lacks
        return r.numpy()

    def __call__(self, *args: Any) -> tuple[np.ndarray, ...]:
        res = self._invoke(self._convert(args))
        fresh = self._fresh
        if hasattr(res, "numpy"):
            return (self._numpy(res, bool(fresh) and fresh[0]),)
        return tuple(self._numpy(r, i < len(fresh) and fresh[i]) for i, r in enumerate(res))

    def prepared(self, *args: Any):
        """As `ArtifactModel.prepared` on the CPU; on a GPU the inputs are copied to the device once, and the
        callable returns when the kernels have finished (they run asynchronously)."""
        if self.device_kind == "cpu":
            return super().prepared(*args)
        conv = self._convert(args)

        def call():
            out = self._invoke(conv)
            self.sync()
            return out
        return call

    def sync(self) -> None:
        if self.device_kind != "cpu":
            self.device.sync()


class OnnxExport(ArtifactModel):
    """An `onnx` target artifact (model.onnx) run by ONNX Runtime on the CPU, with the interface of a compiled one:
    `graphopt run` and `bench`, and the compile report, run what the user deploys. `threads`: ORT's intra-op
    threads (default: ORT's own choice, one per physical core)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__(folder)
        path = self._file("model.onnx")
        if "model.onnx.data" in (self.manifest.get("files") or {}):  # (the weights of an export past 2 GB)
            self._file("model.onnx.data")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ArtifactError(f"'{path}' runs on ONNX Runtime, which is not installed: pip install onnxruntime") \
                from None
        self._threads = threads
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.log_severity_level = 4  # (its error logs repeat the exception, which __call__ words as ours)
        try:
            self._sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - ORT raises its own kinds on a damaged or unsupported file
            raise ArtifactError(f"ONNX Runtime cannot load '{path}': {str(e).splitlines()[0][:300]}") from None
        self._names = [i.name for i in self._sess.get_inputs()]

    def __call__(self, *args: Any) -> tuple[np.ndarray, ...]:
        feed = dict(zip(self._names, self._check(args)))
        try:
            outs = self._sess.run(None, feed)
        except Exception as e:  # noqa: BLE001 - ORT raises its own kinds (a bad id, a node it cannot run)
            raise GraphoptError(f"ONNX Runtime failed running '{self.folder / 'model.onnx'}': "
                                f"{str(e).strip().splitlines()[0][:300]}") from None
        return tuple(np.asarray(o) for o in outs)


class Pt2Export(ArtifactModel):
    """A `pt2` target artifact (model.pt2) run by PyTorch eager (the program's `module()`), read without
    unpickling anything, with the interface of a compiled one. PyTorch's thread count is the process's."""

    def __init__(self, folder: str | Path):
        super().__init__(folder)
        from graphopt.frontends.torch_export import read_exported_program
        try:
            self._module = read_exported_program(self._file("model.pt2")).module()
        except GraphoptError as e:
            raise ArtifactError(str(e)) from None

    def __call__(self, *args: Any) -> tuple[np.ndarray, ...]:
        import torch
        with torch.inference_mode():
            out = self._module(*[torch.from_numpy(np.ascontiguousarray(a).reshape(a.shape)) for a in self._check(args)])
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return tuple(_to_numpy(o) for o in outs)


class _Fork:
    """TVM's worker pool belongs to the thread that launched kernels, and a forked child inherits it without its
    workers: a model loaded and called in a parent, then called in a child forked from it (multiprocessing's
    default on Linux, gunicorn's --preload), waited forever at its first parallel kernel. In a forked child the
    thread that forked (the child's only thread then) hands its calls to a helper thread, which gets a fresh pool;
    threads the child starts itself have fresh pools already."""

    thread: int | None = None  # in a forked child: the thread that forked
    _helper = None

    @classmethod
    def after_fork_in_child(cls) -> None:
        cls.thread, cls._helper = threading.get_ident(), None

    @classmethod
    def helper(cls):
        if cls._helper is None:
            from concurrent.futures import ThreadPoolExecutor
            cls._helper = ThreadPoolExecutor(1, thread_name_prefix="graphopt-after-fork")
        return cls._helper


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_Fork.after_fork_in_child)


def _wrap(a: np.ndarray):
    """A TVM tensor over a C-contiguous numpy array's memory (no copy)."""
    import tvm_ffi
    return tvm_ffi.from_dlpack(a, require_alignment=0, require_contiguous=True)


def _np_dtype(name: str):
    """numpy's dtype for a manifest dtype name (None where numpy has none: bfloat16)."""
    try:
        return np.dtype(name)
    except TypeError:
        return None


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    """A copy of `a` starting on a 64-byte boundary (TVM's allocation alignment, which its kernels may assume)."""
    raw = np.empty(a.nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


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
    why = gpu_mismatch(manifest.get("target_info", {}).get("archs", []), have)
    if why:
        raise ArtifactError(why)
    return dev


def gpu_mismatch(built: list[str], have: str) -> str:
    """'' when kernels built for the architectures `built` run on a GPU of architecture `have` (e.g. "sm_86");
    else why not. sm_XY code runs on sm_XY and later GPUs (their PTX on newer ones); sm_90a (Hopper's wgmma) on
    sm_90 alone."""
    import re

    def number(arch: str) -> int:
        return int(re.match(r"sm_(\d+)", arch).group(1))
    archs = ",".join(built)
    if "sm_90a" in built and have != "sm_90":
        return (f"this GPU is {have}; the artifact was built for sm_90a, whose Hopper-only kernels run on H100/H200 "
                "(sm_90) alone: compile again with --cuda-arch sm_80,sm_90 (portable kernels; PTX for later GPUs)")
    if number(have) < 80:
        return (f"this GPU is {have}; graphopt's CUDA kernels need sm_80 or later (A100, RTX 30-series and newer): "
                "compile with --target llvm and run on the CPU")
    if built and number(have) < number(built[0]):
        return (f"this GPU is {have}; the artifact's kernels need at least {built[0]} (built for {archs}): compile "
                f"again with --cuda-arch {have}")
    return ""


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


def _reload(folder: str, threads: int | None, files: dict | None) -> ArtifactModel:
    """Unpickling an ArtifactModel: the artifact loaded again from its folder, if it is the one pickled."""
    model = load(folder, threads)
    if files and model.manifest.get("files") != files:
        raise ArtifactError(f"the artifact in '{folder}' changed since this model was pickled (compiled again?): "
                            "load it anew with graphopt.load")
    return model


def load(folder: str | Path, threads: int | None = None) -> ArtifactModel:
    """Load an artifact folder written by graphopt.compile / `graphopt compile`: a TVM build (CPU or CUDA) runs on
    the TVM runtime, an `onnx` export on ONNX Runtime (`threads`: its intra-op threads), a `pt2` export on PyTorch.
    Each is called the same way: one array per input, a tuple of numpy outputs back."""
    kind = read_manifest(Path(folder)).get("target_info", {}).get("kind")
    if kind == "onnx":
        return OnnxExport(folder, threads)
    if kind == "pt2":
        return Pt2Export(folder)
    return CompiledModel(folder)
