"""benchmarks/gpu_check.py runs once on a lent GPU with no second chance to fix a typo, so its glue (data, packing,
references, ratios, report) runs here against a fake GPU: torch tensors stay on the CPU, and a fake TVM VM computes
each kernel's result the way the kernel should (the 2:4 ones from their packed operands through the CPU model of
the instruction layout). The kernels themselves are tested in tests/targets/test_gpu.py."""
from __future__ import annotations

import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeVM:
    def __init__(self, lib, dev):
        self.kind = Path(lib).name.rsplit("_", 1)[0]

    def _run(self, *args):
        import tvm

        from graphopt.targets.tvm.gpu.sparse import unpack_fragments
        a = [x.numpy() for x in args]
        if self.kind in ("dense16", "int8"):
            x, w = a
            y = x.astype(np.float64) @ w.astype(np.float64).T
            return tvm.runtime.tensor(y.astype(np.int32 if self.kind == "int8" else np.float32))
        if self.kind.startswith("peak_"):  # the instruction alone: one value a thread
            return tvm.runtime.tensor(np.zeros(a[0].shape, np.float32))
        if self.kind in ("dense16p", "int8p", "dense16w", "int8w"):  # graphopt's dense kernels: x, packed weight, bias
            from graphopt.targets.tvm.gpu.sparse import unpack_dense_fragments
            fmt = "s8" if self.kind.startswith("int8") else "f16"
            y = a[0].astype(np.float64) @ unpack_dense_fragments(a[1], fmt).astype(np.float64).T
            return tvm.runtime.tensor(y.astype(np.int32 if fmt == "s8" else np.float32))
        if self.kind.startswith("sp24"):
            fmt = "s8" if self.kind.endswith("s8") else "f16"
            w = unpack_fragments(a[1], a[2], fmt).astype(np.float64)
            y = a[0].astype(np.float64) @ w.T
            return tvm.runtime.tensor(y.astype(np.int32 if fmt == "s8" else np.float32))
        x, w = (torch.from_numpy(v.astype(np.float32)) for v in a)  # conv16: MobileNetV2 shapes
        groups = x.shape[1] // w.shape[1]
        stride = 2 if "/2" in self.name else 1
        return tvm.runtime.tensor(torch.nn.functional.conv2d(x, w, stride=stride, padding=w.shape[2] // 2,
                                                             groups=groups).numpy())

    def __getitem__(self, name):
        return self._run

    def time_evaluator(self, *a, **k):
        return lambda *args: types.SimpleNamespace(median=1e-4)


class FakeEvent:
    def __init__(self, **k):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 0.05


def test_gpu_check_glue_against_a_fake_gpu(tmp_path, monkeypatch):
    import tvm
    import tvm.runtime.vm

    import graphopt.runtime
    data = tmp_path / "data"
    (data / "kernels").mkdir(parents=True)
    kernels = [{"name": "minilm 128x384x384", "kind": k, "shape": [32, 128, 48], "file": f"{k}_{i}.so"}
               for i, k in enumerate(["dense16", "int8", "sp24", "sp24s8"])]
    # the multistage kernels at the build's tiles (build_default) and another shape, and the wgmma ones
    kernels += [{"name": "minilm 128x384x384", "kind": k, "shape": [32, 128, 48], "file": f"{k}_{i}.so",
                 "tiles": t, "build_default": d}
                for i, (k, t, d) in enumerate([
                    ("dense16p", [1, 4, 2, 2, 2, 4], True), ("int8p", [1, 4, 2, 2, 2, 4], True),
                    ("sp24p", [1, 4, 2, 2, 1, 4], True), ("sp24ps8", [1, 4, 2, 2, 1, 4], True),
                    ("dense16p", [4, 8, 2, 2, 2, 4], False), ("dense16w", [2, 128, 4, 4], True),
                    ("int8w", [2, 128, 4, 4, 1], True), ("sp24w", [2, 128, 2, 4, 1], True),
                    ("sp24ws8", [1, 16, 2, 4, 1], True)], start=10)]
    kernels.append({"name": "f16 mma.sync alone", "kind": "peak_f16", "shape": [256], "file": "peak_f16_30.so",
                    "ops": 10 ** 9})
    kernels.append({"name": "mnv2 stem 3->32 3x3/2", "kind": "conv16", "shape": [3, 8, 16, 3, 2, 1],
                    "file": "conv16_6.so"})
    (data / "kernels" / "index.json").write_text(json.dumps({"arch": "sm_90", "kernels": kernels}))
    names = {k["file"]: k["name"] for k in kernels}

    def fake_vm(lib, dev):
        vm = FakeVM(lib, dev)
        vm.name = names[Path(lib).name]
        return vm

    def on_cpu(fn):
        def wrapped(*a, **k):
            k.pop("device", None)
            return fn(*a, **k)
        return wrapped

    for name in ("randn", "randint", "zeros"):
        monkeypatch.setattr(torch, name, on_cpu(getattr(torch, name)))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(graphopt.runtime, "cuda_runtime_loaded", lambda: True)
    monkeypatch.setattr(tvm, "cuda", lambda *a: tvm.cpu())
    monkeypatch.setattr(tvm.runtime, "load_module", lambda path: path)
    monkeypatch.setattr(tvm.runtime.vm, "VirtualMachine", fake_vm)
    out = tmp_path / "report.json"
    assert load_script().main(["--data", str(data), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    recs = {r["kind"]: r for r in report["kernels"] if r.get("build_default") is not False}
    assert "error" not in json.dumps(report["kernels"]), report["kernels"]
    assert all(r["ok"] for r in recs.values()), recs
    assert recs["int8"]["max_rel_err"] == 0 and recs["sp24ps8"]["max_rel_err"] == 0
    assert recs["sp24"]["speedup_vs_dense"] == pytest.approx(1.0) and recs["sp24s8"]["speedup_vs_dense"] > 0
    # graphopt's dense kernels: exact int8; the 2:4 multistage kernel against the dense one at its build tiles
    assert recs["int8p"]["max_rel_err"] == 0 and recs["int8w"]["max_rel_err"] == 0 and recs["dense16w"]["ok"]
    assert recs["sp24p"]["speedup_vs_dense"] == pytest.approx(1.0)
    # the 2:4 wgmma kernels against the dense wgmma ones; int8's metadata layouts probed as for mma.sp
    assert recs["sp24w"]["ok"] and recs["sp24w"]["speedup_vs_dense"] == pytest.approx(1.0)
    assert recs["sp24ws8"]["max_rel_err"] == 0 and recs["sp24ws8"]["meta_layouts_exact"]["rows-inner"]
    other = [r for r in report["kernels"] if r.get("build_default") is False]
    assert len(other) == 1 and other[0]["ok"] and other[0]["tiles"] == [4, 8, 2, 2, 2, 4]
    assert recs["sp24s8"]["meta_layouts_exact"] == {"rows-inner": True, "rows-outer": False, "pairs": False}
    assert recs["peak_f16"]["tflops"] == pytest.approx(1e9 / 1e-4 / 1e12)  # ops / the fake timer's 100 us
