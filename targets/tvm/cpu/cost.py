"""The CPU target's cost oracle: how long does this linear layer (or batch-1 pointwise conv) take with this weight
layout, measured here.

Each candidate is built the way the compiler would build it (dense: the packed GEMM / pointwise kernel, else a
Relax matmul, through graphopt's CPU pipeline and rules; sparse: the BSR kernels of `sparse.py`) and timed with TVM's
time_evaluator. Results are cached on disk by (target, shape, layout, stored blocks) so a second model with the
same layers, or a rerun, measures nothing.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from graphopt.ir.files import atomic_write_bytes
from graphopt.ir.sparse_ops import layout_block, to_bsr

log = logging.getLogger(__name__)


def default_cache() -> Path:
    base = os.environ.get("GRAPHOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphopt")
    return Path(base) / "layout_costs.json"


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

    def _key(self, op: str, shape, layout: str, nnzb: int) -> str:
        return f"{self.target}|{op}|{'x'.join(map(str, shape))}|{layout}|{nnzb}"

    def measure(self, op: str, shape: tuple[int, int, int], layout: str, weight: torch.Tensor) -> float:
        if op not in ("linear", "conv1x1"):
            raise ValueError(f"the CPU cost oracle measures linear layers and pointwise convs, not '{op}'")
        block = layout_block(layout)
        nnzb = 0 if block is None else to_bsr(weight, block).nnzb
        key = self._key(op, shape, layout, nnzb)
        if key in self._cache:
            self.hits += 1
            return float(self._cache[key])
        seconds = self._time(shape, block, weight, op == "conv1x1")
        self.measured += 1
        self._store({key: seconds})
        return seconds

    def _store(self, timings: dict[str, float]) -> None:
        self._cache.update(timings)
        try:
            atomic_write_bytes(self.cache_path, json.dumps(self._cache, indent=0).encode())
        except OSError as e:
            log.warning("could not write the layout cost cache %s: %s", self.cache_path, e)

    def measure_variants(self, key: str, variants: dict) -> dict[str, float]:
        """Seconds per call of each variant {name: (Graph, inputs)} of one layer, each compiled by graphopt's
        own llvm path and timed in interleaved rounds (so they share the machine's state); cached by key + name."""
        keys = {name: f"{self.target}|graph|{key}|{name}" for name in variants}
        if all(k in self._cache for k in keys.values()):
            self.hits += 1
            return {name: float(self._cache[k]) for name, k in keys.items()}
        import tvm
        from tvm import relax

        from graphopt.bench import interleaved_medians
        from graphopt.targets.tvm.build import build_executable
        dev = tvm.cpu()
        calls = {}
        for name, (g, inputs) in variants.items():
            vm = relax.VirtualMachine(build_executable(g)[0], dev)
            args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
            calls[name] = (lambda vm, args: lambda: vm["main"](*args))(vm, args)
        seconds = interleaved_medians(calls, runs=20, rounds=2, pause=0.05)
        self.measured += 1
        self._store({keys[name]: t for name, t in seconds.items()})
        return seconds

    def _time(self, shape, block, weight: torch.Tensor, conv: bool = False) -> float:
        import tvm
        from tvm import relax

        from graphopt.targets.tvm.cpu.gemm import emit_packed_linear
        from graphopt.targets.tvm.cpu.pipeline import build_cpu
        from graphopt.targets.tvm.cpu.rules import vector_lanes
        from graphopt.targets.tvm.cpu.conv import emit_conv1x1
        from graphopt.targets.tvm.cpu.sparse import emit_bsr_conv1x1, emit_bsr_linear

        m, k, n = shape
        bb = relax.BlockBuilder()
        x_shape = (1, k, m, 1) if conv else (m, k)
        x = relax.Var("x", relax.TensorType(x_shape, "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                if conv and block is None:  # the pointwise kernel the compiler uses
                    y = emit_conv1x1(bb, x, weight.reshape(n, k, 1, 1).contiguous().numpy(), None, x_shape,
                                     vector_lanes(self.target), None)
                elif conv:
                    s = to_bsr(weight, block)
                    y = emit_bsr_conv1x1(bb, x, relax.const(s.data.numpy()), relax.const(s.indices.numpy()),
                                         relax.const(s.indptr.numpy()), None, x_shape, n, block, s.nnzb)
                elif block is None:  # what the compiler emits for a dense linear: packed GEMM, else matmul
                    y = emit_packed_linear(bb, x, weight.contiguous().numpy(), None, (m, k),
                                           vector_lanes(self.target))
                    if y is None:
                        y = bb.emit(relax.op.matmul(x, relax.const(weight.t().contiguous().numpy())))
                else:
                    s = to_bsr(weight, block)
                    y = emit_bsr_linear(bb, x, relax.const(s.data.numpy()), relax.const(s.indices.numpy()),
                                        relax.const(s.indptr.numpy()), None, (m, k), n, block, s.nnzb)
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        ex = build_cpu(bb.get(), self.target)
        dev = tvm.cpu()
        vm = relax.VirtualMachine(ex, dev)
        arg = tvm.runtime.tensor(np.random.default_rng(0).standard_normal(x_shape).astype("float32"), dev)
        timer = vm.time_evaluator("main", dev, number=10, repeat=self.repeat, min_repeat_ms=20)
        return float(np.median(timer(arg).results))
