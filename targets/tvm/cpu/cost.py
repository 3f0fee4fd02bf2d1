"""The CPU target's cost oracle: how long does this linear layer (or batch-1 pointwise conv) take with this weight
layout, measured here.

Each candidate is built the way the compiler would build it (dense: the packed GEMM / pointwise kernel, else a
Relax matmul, through graphopt's CPU pipeline and rules; sparse: the BSR kernels of `sparse.py`) and timed with TVM's
time_evaluator. Results are cached on disk by (target, kernel source digest, shape, layout, stored blocks) so a
second model with the same layers, or a rerun, measures nothing, and changed kernels are measured anew.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from graphopt.ir.files import atomic_write_bytes, user_cache_dir
from graphopt.ir.sparse_ops import layout_block, to_bsr

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def kernels_tag() -> str:
    """A digest of the CPU kernel generators' source: part of every cache key, so timings measured with older
    kernels (an upgrade, or a kernel edited in place) are measured again rather than served from the cache. This
    file is part of it too: how a layer is timed changes what the numbers mean."""
    digest, here = hashlib.sha1(), Path(__file__).parent
    for path in [here / f"{name}.py" for name in ("conv", "gemm", "int8", "sparse", "rules", "pipeline", "threads",
                                                  "norm", "cost", "winograd", "amx")] + [
            here.parent / "lower.py"]:  # which kernel a layer gets is decided there
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def default_cache() -> Path:
    return user_cache_dir() / "layout_costs.json"


class CpuCostOracle:
    """`measure("linear", (M, K, N), layout, weight)` -> seconds per call on this CPU (cached); "conv1x1" with M the
    pixels of a batch-1 pointwise conv and weight [N = Cout, K = Cin]."""

    def __init__(self, target=None, cache: str | Path | None = None, repeat: int = 5):
        from graphopt.targets.tvm.host import cpu_target
        self.target = target if target is not None else cpu_target()
        self.cache_path = Path(cache) if cache is not None else default_cache()
        self.repeat = repeat
        self.hits = self.measured = 0
        try:
            self._cache = json.loads(self.cache_path.read_text()) if self.cache_path.exists() else {}
        except (OSError, json.JSONDecodeError):
            log.warning("layout cost cache %s is unreadable; starting a new one", self.cache_path)
            self._cache = {}

    def describe(self) -> str:
        return str(self.target)

    def _check_runs_here(self) -> None:
        """Timing runs the target's kernels on this machine: a cross-compile target (`--cpu`) whose ISA this CPU
        lacks would stop on an illegal instruction, so say what is missing and what to do instead."""
        from graphopt.errors import TargetError
        from graphopt.targets.tvm.host import missing_here, target_isa
        missing = missing_here(target_isa(self.target))
        if missing:
            raise TargetError(f"choosing by measured cost times each kernel on the target CPU "
                              f"({self.target.attrs.get('mcpu', self.target)}), and this machine lacks "
                              f"{', '.join(missing)}, so its kernels cannot run here: run the pipeline on such a CPU, "
                              "or leave out --cpu (optimize(cpu=)) to choose for this one")

    def int8_product(self) -> str | None:
        """The instruction this target's int8 kernels multiply with: "vnni" (`vpdpbusd`, exact for any int8
        weight), "ubsw" (AVX2 `vpmaddubsw`, exact for pair-bounded weights: `quantize{weights=int8s|int7}`) or None
        (no int8 kernels). `quantize{weights=auto}` asks it."""
        from graphopt.targets.tvm.cpu.int8 import int8_dot
        return int8_dot(self.target)

    def _key(self, op: str, shape, layout: str, nnzb: int, weight=None) -> str:
        key = f"{self.target}|{kernels_tag()}|{op}|{'x'.join(map(str, shape))}|{layout}|{nnzb}"
        if op.startswith("q") and weight is not None:  # which dense int8 kernel the weight gets depends on its range
            from graphopt.targets.tvm.cpu.int8 import fits_int4, ubsw_exact
            w = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight).reshape(weight.shape[0], -1)
            key += "|w4" if fits_int4(w) else ("|w7" if ubsw_exact(np.pad(w, ((0, 0), (0, -w.shape[1] % 4))))
                                               else "|w8")
        if op == "qlinear":  # the dense int8 GEMM is AMX tiles or VNNI as the build will pick (GRAPHOPT_AMX)
            from graphopt.targets.tvm.cpu.amx import amx_usable
            key += "|amx" if amx_usable(self.target) else ""
        return key

    def applies(self, layout: str, weight, op: str = "linear", tokens: int | None = None) -> str:
        """Why `layout` has no kernel for this weight here ("" when it has one). Float layers: every layout whose
        blocks tile the weight. int8 linears and pointwise convs ("qlinear", "qconv1x1"): dense; csr over at least
        16 tokens (pixels; `tokens`, when given) on any CPU with int8 kernels; bsr8x4 where the target's quad
        product is exact for the weight (VNNI, or 7-bit weights on AVX2); bsr16x64 for linears of 16+ tokens where
        the target has AMX tiles."""
        block = layout_block(layout)
        if op in ("qlinear", "qconv1x1") and layout == "csr":
            from graphopt.targets.tvm.cpu.int8 import int8_dot
            from graphopt.targets.tvm.cpu.sparse import qcsr_applies
            if int8_dot(self.target) is None:
                return "this CPU has no int8 kernels (AVX2 or VNNI)"
            return qcsr_applies(tokens) if tokens is not None else ""
        n, k = weight.shape[0], weight.shape[1]
        if op == "qconv1x1" and block is not None:  # input channels are staged in zero-padded quads
            k = -(-k // 4) * 4
        if block is not None and (n % block[0] or k % block[1]):
            return f"weight [{n}, {k}] is not divisible into {block[0]}x{block[1]} blocks"
        if op not in ("qlinear", "qconv1x1") or block is None:
            return ""
        from graphopt.targets.tvm.cpu import amx
        if block == amx.QBSR_BLOCK:
            if op != "qlinear":
                return "bsr16x64 (AMX tiles) is a layout of int8 linears; int8 pointwise convs take bsr8x4 or csr"
            if not amx.amx_usable(self.target):
                return "bsr16x64 runs on AMX tiles, which this target does not have (or GRAPHOPT_AMX=0)"
            return amx.amx_bsr_applies(16 if tokens is None else tokens, k, n)
        from graphopt.targets.tvm.cpu.int8 import int8_dot, ubsw_exact
        from graphopt.targets.tvm.cpu.sparse import bsr_qlinear_applies
        why = bsr_qlinear_applies(1, k, n, block)
        if why:
            return why
        dot = int8_dot(self.target)
        w = weight.numpy() if hasattr(weight, "numpy") else weight
        w = np.pad(w, ((0, 0), (0, k - w.shape[1])))
        if dot is None or (dot == "ubsw" and not ubsw_exact(w)):
            return ("the int8 sparse kernel needs VNNI, or pair-bounded weights (quantize{weights=int8s} or "
                    "int7) on AVX2: u8 x s8 pairs of these weights could saturate vpmaddubsw")
        return ""

    def measure(self, op: str, shape: tuple[int, int, int], layout: str, weight: torch.Tensor) -> float:
        return self.measure_many(op, shape, [layout], weight)[layout]

    def measure_many(self, op: str, shape: tuple[int, int, int], layouts: list[str],
                     weight: torch.Tensor) -> dict[str, float]:
        """Seconds per call of each layout for this layer. Unless every one is cached, all are built and timed in
        interleaved rounds (a slow moment of a shared machine then hits every candidate alike, instead of the one
        that happened to be measured in it), and cached."""
        if op not in ("linear", "conv1x1", "qlinear", "qconv1x1"):
            raise ValueError(f"the CPU cost oracle measures linear layers and pointwise convs, float or int8 "
                             f"(linear, conv1x1, qlinear, qconv1x1), not '{op}'")
        keys = {}
        for layout in layouts:
            why = self.applies(layout, weight, op, shape[0])
            if why:
                raise ValueError(why)
            block = layout_block(layout)
            keys[layout] = self._key(op, shape, layout, 0 if block is None else to_bsr(weight, block).nnzb, weight)
        if all(k in self._cache for k in keys.values()):
            self.hits += len(keys)
            return {lay: float(self._cache[k]) for lay, k in keys.items()}
        self._check_runs_here()
        timers = self._timers({lay: (self._spec_int8 if op.startswith("q") else self._spec)(
            shape, layout_block(lay), weight, op.endswith("conv1x1")) for lay in keys})
        samples: dict[str, list[float]] = {lay: [] for lay in keys}
        for _ in range(self.repeat):
            for lay, timer in timers.items():
                samples[lay].append(timer())
        seconds = {lay: float(np.median(v)) for lay, v in samples.items()}
        self.measured += len(keys)
        self._store({keys[lay]: t for lay, t in seconds.items()})
        return seconds

    def _store(self, timings: dict[str, float]) -> None:
        tag = f"|{kernels_tag()}|"
        self._cache = {k: v for k, v in self._cache.items() if tag in k}  # other kernels' timings never serve again
        self._cache.update(timings)
        try:
            atomic_write_bytes(self.cache_path, json.dumps(self._cache, indent=0).encode())
        except OSError as e:
            log.warning("could not write the layout cost cache %s: %s", self.cache_path, e)

    def measure_variants(self, key: str, variants: dict) -> dict[str, float]:
        """Seconds per call of each variant {name: (Graph, inputs)} of one layer, each compiled by graphopt's
        own llvm path and timed in interleaved rounds (so they share the machine's state); cached by key + name."""
        keys = {name: f"{self.target}|{kernels_tag()}|graph|{key}|{name}" for name in variants}
        if all(k in self._cache for k in keys.values()):
            self.hits += 1
            return {name: float(self._cache[k]) for name, k in keys.items()}
        import tvm
        from tvm import relax

        from graphopt.bench import interleaved_medians
        from graphopt.targets.tvm.build import build_executable
        self._check_runs_here()
        dev = tvm.cpu()
        calls = {}
        for name, (g, inputs) in variants.items():
            vm = relax.VirtualMachine(build_executable(g, cpu=self.target)[0], dev)
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
            calls[name] = (lambda vm, args: lambda: vm["main"](*args))(vm, args)
        seconds = interleaved_medians(calls, runs=20, rounds=2, pause=0.05)
        self.measured += 1
        self._store({keys[name]: t for name, t in seconds.items()})
        return seconds

    def _spec_int8(self, shape, block, weight: torch.Tensor, conv: bool = False):
        """(emit, x_shape, dtype) for `_timers`: an int8 linear or pointwise conv (int8 activation in, float out) as
        the compiler lowers it: the dense int8 kernel, or the int8 BSR or CSR one; unit weight scales (the kernels'
        speed does not depend on them)."""
        from tvm import relax

        from graphopt.targets.tvm.cpu.amx import QBSR_BLOCK, amx_cores
        from graphopt.targets.tvm.cpu.int8 import emit_qconv1x1, emit_qlinear, int8_dot
        from graphopt.targets.tvm.cpu.rules import target_cores, vector_lanes
        from graphopt.targets.tvm.cpu.sparse import emit_amx_bsr_qlinear, emit_bsr_qlinear, emit_csr_qlinear

        m, k, n = shape
        w = weight.numpy().astype(np.int8)
        scales = np.full(n, 1e-2)
        dot = int8_dot(self.target)
        sparse = "" if block is None else {(1, 1): "csr", QBSR_BLOCK: "bsr16x64"}.get(block, "bsr8x4")
        if conv:
            x_shape = (1, k, m, 1)
            return (lambda bb, x: emit_qconv1x1(bb, x, w.reshape(n, k, 1, 1), scales, None, 0.02, 0, x_shape, None,
                                                None, False, dot, sparse, vector_lanes(self.target),
                                                target_cores(self.target)), x_shape, "int8")

        def emit(bb, x):
            if sparse == "csr":
                return emit_csr_qlinear(bb, x, w, scales, None, 0.02, 0, (m, k), dot)
            if sparse == "bsr16x64":
                return emit_amx_bsr_qlinear(bb, x, w, scales, None, 0.02, 0, (m, k), amx_cores(self.target))
            if block is None:
                y = (emit_qlinear(bb, x, w, scales, None, 0.02, 0, (m, k), dot, vector_lanes(self.target),
                                  amx_cores(self.target)) if dot else None)
                if y is None:  # no int8 kernel for this shape: TVM's generic integer lowering
                    y = bb.emit(relax.op.matmul(relax.op.astype(x, "float32"),
                                                relax.const(w.T.astype(np.float32))))
                return y
            return emit_bsr_qlinear(bb, x, w, scales, None, 0.02, 0, (m, k), dot, vector_lanes(self.target))
        return emit, (m, k), "int8"

    @staticmethod
    def layer_module(emit, x_shape, dtype: str, name: str = "main", bb=None):
        """The one-input Relax module `_timers` times: emit(bb, x) with its trailing reshapes left out, as function
        `name`; with `bb` (a BlockBuilder) the function is added to it and nothing returned."""
        from tvm import relax
        own = bb is None
        bb = relax.BlockBuilder() if own else bb
        x = relax.Var("x", relax.TensorType(x_shape, dtype))
        with bb.function(name, [x]):
            with bb.dataflow():
                y = emit(bb, x)
                # inside a model the layer's trailing reshapes are views (or fuse into the next op); as the
                # function's output Relax copies them (11 us of a 25 us sparse 768x768 layer), so time the layer
                # without them
                while (call := bb.lookup_binding(y)) is not None and getattr(call.op, "name", "") == "relax.reshape":
                    y = call.args[0]
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        return bb.get() if own else None

    def _timers(self, specs: dict):
        """{name: timer} (no arguments -> seconds per call, >= 10 ms of calls) for {name: (emit, x_shape, dtype)}:
        each a one-input Relax function (`layer_module`), all built by graphopt's CPU pipeline as one module. One
        build instead of one per layout: a 384x384 layer's five candidates built in 0.26 s against ~0.55 s."""
        import tvm
        from tvm import relax

        from graphopt.targets.tvm.cpu.pipeline import build_cpu
        bb = relax.BlockBuilder()
        for name, (emit, x_shape, dtype) in specs.items():
            self.layer_module(emit, x_shape, dtype, f"layer_{name}", bb)
        dev = tvm.cpu()
        vm = relax.VirtualMachine(build_cpu(bb.get(), self.target), dev)
        timers = {}
        for name, (_, x_shape, dtype) in specs.items():
            rng = np.random.default_rng(0)
            data = rng.integers(-128, 128, x_shape).astype(dtype) if dtype == "int8" else \
                rng.standard_normal(x_shape).astype(dtype)
            arg = tvm.runtime.tensor(data, dev)
            timer = vm.time_evaluator(f"layer_{name}", dev, number=10, repeat=1, min_repeat_ms=10)
            timer(arg)  # warm-up
            timers[name] = (lambda timer, arg: lambda: float(timer(arg).mean))(timer, arg)
        return timers

    def _spec(self, shape, block, weight: torch.Tensor, conv: bool = False):
        """(emit, x_shape, dtype) for `_timers`: a float linear or pointwise conv as the compiler lowers it, dense
        (`block` None) or BSR / CSR."""
        from tvm import relax

        from graphopt.targets.tvm.cpu.conv import emit_conv1x1
        from graphopt.targets.tvm.cpu.gemm import emit_packed_linear
        from graphopt.targets.tvm.cpu.rules import has_gather, target_cores, vector_lanes
        from graphopt.targets.tvm.cpu.sparse import emit_bsr_conv1x1, emit_bsr_linear

        m, k, n = shape
        x_shape = (1, k, m, 1) if conv else (m, k)

        def emit(bb, x):
            if conv and block is None:  # the pointwise kernel the compiler uses
                return emit_conv1x1(bb, x, weight.reshape(n, k, 1, 1).contiguous().numpy(), None, x_shape,
                                    vector_lanes(self.target), None)
            if conv:
                s = to_bsr(weight, block)
                arrays = [s.data.numpy(), s.indices.numpy(), s.indptr.numpy()]
                return emit_bsr_conv1x1(bb, x, *(relax.const(a) for a in arrays), None, x_shape, n, block, s.nnzb,
                                        lanes=vector_lanes(self.target), cores=target_cores(self.target),
                                        arrays=arrays)
            if block is None:  # what the compiler emits for a dense linear: packed GEMM, else matmul
                y = emit_packed_linear(bb, x, weight.contiguous().numpy(), None, (m, k), vector_lanes(self.target))
                if y is None:
                    y = bb.emit(relax.op.matmul(x, relax.const(weight.t().contiguous().numpy())))
                return y
            s = to_bsr(weight, block)
            arrays = [s.data.numpy(), s.indices.numpy(), s.indptr.numpy()]
            return emit_bsr_linear(bb, x, *(relax.const(a) for a in arrays), None, (m, k), n, block, s.nnzb, arrays,
                                   vector_lanes(self.target), target_cores(self.target), has_gather(self.target))
        return emit, x_shape, "float32"
