"""Cost answers for the cuda-sparse target: measured on the GPU when there is one, else the documented cost table
of `graphopt.targets.tvm.gpu.sparse` (marked estimated, never passed off as a measurement)."""
from __future__ import annotations

import numpy as np


class CudaCostOracle:
    """`measure("linear", (m, k, n), layout, weight)` -> seconds (layouts: dense, sp24). Without a GPU the answer is
    relative (dense = 1 unit) and `estimated` is True."""

    layouts = ("dense", "sp24")

    def __init__(self, arch: str | None = None):
        from graphopt.targets.tvm.gpu.device import cuda_available
        self.has_gpu = cuda_available()
        self.estimated = not self.has_gpu
        self.arch = arch
        self._cache: dict = {}

    def int8_product(self) -> str:
        """The GPU's int8 tensor-core product (`mma.sync` int8, int32 accumulation): exact for any int8 weight, so
        `quantize{weights=auto}` takes full-range int8."""
        return "mma"

    def applies(self, layout: str, weight) -> str:
        """'' when `layout` can run this weight [n, k]; else why not."""
        if layout == "sp24":
            from graphopt.targets.tvm.gpu.sparse import sp24_applies
            return sp24_applies(np.asarray(weight, np.float32))
        return ""

    def measure(self, op: str, shape, layout: str, weight=None) -> float:
        if op != "linear" or layout not in self.layouts:
            raise ValueError(f"the cuda cost oracle times linear layers as {' or '.join(self.layouts)}, "
                             f"not {op}/{layout}")
        m, k, n = (int(v) for v in shape)
        if self.estimated:
            from graphopt.targets.tvm.gpu.sparse import estimated_speedup
            return 1.0 if layout == "dense" else 1.0 / estimated_speedup(m, k, n)
        key = (m, k, n, layout)
        if key not in self._cache:
            self._cache[key] = self._time_on_gpu(m, k, n, layout, weight)
        return self._cache[key]

    def _time_on_gpu(self, m: int, k: int, n: int, layout: str, weight) -> float:
        import tvm
        from tvm import relax

        from graphopt.targets.tvm.gpu.pipeline import build_cuda, cuda_target
        from graphopt.targets.tvm.gpu.sparse import dense_tc_applies, emit_dense_tc, emit_sp24
        dev = tvm.cuda(0)
        arch = self.arch or "sm_" + str(dev.compute_version).replace(".", "")
        w = weight.detach().float().numpy() if hasattr(weight, "detach") else np.asarray(weight, np.float32)
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((m, k), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                if layout == "sp24":
                    y = emit_sp24(bb, x, w, None, m, "tk")
                elif not dense_tc_applies(*w.shape):  # the dense kernel the build would use
                    y = emit_dense_tc(bb, x, w, None, m, "f16")
                else:
                    y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(w.T))))
                out = bb.emit_output(y)
            bb.emit_func_output(out)
        ex = build_cuda(bb.get(), cuda_target(arch), "fp16")
        vm = relax.VirtualMachine(ex, dev)
        xin = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((m, k)).astype(np.float32), device=dev)
        return float(vm.time_evaluator("main", dev, number=20, repeat=3)(xin).median)
