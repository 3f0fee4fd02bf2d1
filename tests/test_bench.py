"""graphopt.bench's ONNX Runtime baselines: the int8 model every benchmark compares against."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import graphopt
from graphopt.bench import ort_quantize_dynamic, ort_quantize_static, ort_session, reference_onnx


@pytest.mark.parametrize("reduce_range,activations", [(False, "int8"), (True, "int8"), (False, "uint8")])
def test_ort_quantize_static_writes_a_calibrated_qdq_model(tmp_path, reduce_range, activations):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    fp32 = reference_onnx(graphopt.trace(model, (x,)), str(tmp_path))
    name = ort_session(fp32, 1).get_inputs()[0].name
    feeds = [{name: torch.randn(8, 32).numpy()} for _ in range(4)]
    q = ort_quantize_static(fp32, tmp_path / "int8.onnx", feeds, reduce_range=reduce_range, activations=activations)
    model_q = onnx.load(str(q))
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model_q.graph.node}
    zero_points = {i.data_type for i in model_q.graph.initializer if i.name.endswith("zero_point")
                   and i.dims == []}  # the activations' (per-tensor) zero points: their type is the grid's
    assert zero_points == {onnx.TensorProto.INT8 if activations == "int8" else onnx.TensorProto.UINT8}
    got = ort_session(q, 1).run(None, {name: x.numpy()})[0]
    ref = model(x).detach().numpy()
    # quantized (not bit-equal to fp32) and calibrated: without reduce_range ORT's u8 x s8 pairs saturate int16 on
    # this AVX2 CPU (the README's ORT int8 rows lose accuracy for it), so only reduce_range is held to 10% RMS
    err = float(np.sqrt(((got - ref) ** 2).mean() / (ref ** 2).mean()))
    cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert err > 0 and cos > 0.9, (err, cos)
    if reduce_range:
        assert err < 0.1, err


def test_ort_quantize_dynamic_writes_a_dynamically_quantized_model(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    fp32 = reference_onnx(graphopt.trace(model, (x,)), str(tmp_path))
    q = ort_quantize_dynamic(fp32, tmp_path / "dyn.onnx")
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "MatMul" not in ops and "Gemm" not in ops
    sess = ort_session(q, 1)
    got, ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], model(x).detach().numpy()
    cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
    assert cos > 0.9 and not np.array_equal(got, ref)  # (int16 pair saturation on AVX2 CPUs: no tighter bound)


def test_compare_variants_times_every_variant_with_shared_baselines_once_a_round(tmp_path, monkeypatch):
    """Variants of one model built from one graph share its ORT and PyTorch timings (one call set a round); a
    variant with its own graph gets its own baselines."""
    import graphopt.bench as bench
    def medians(calls, runs, rounds):  # each call run once; "timed" at 1, 2, 3 ... ms in the order given
        return {k: (fn(), 0.001 * (i + 1))[1] for i, (k, fn) in enumerate(calls.items())}
    monkeypatch.setattr(bench, "interleaved_medians", medians)
    model = torch.nn.Linear(4, 3).eval()
    other = torch.nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    onnx_a = reference_onnx(graphopt.trace(model, (x,)), str(tmp_path / "a"))
    onnx_b = reference_onnx(graphopt.trace(other, (x,)), str(tmp_path / "b"))
    prepared = []

    class Art:
        def __init__(self, name):
            self.name = name

        def prepared(self, *args):
            prepared.append((self.name, [a.shape for a in args]))
            return lambda: None
    got = bench.compare_variants({"untuned": (Art("u"), onnx_a, model), "tuned": (Art("t"), onnx_a, model),
                                  "pruned": (Art("p"), onnx_b, other)}, [x], threads=1, runs=3, rounds=1)
    assert prepared == [("u", [(2, 4)]), ("t", [(2, 4)]), ("p", [(2, 4)])]
    # the calls in order: three artifacts (1-3 ms), then ORT a (4), PyTorch model (5), ORT b (6), PyTorch other (7)
    assert [round(got[k].graphopt_s * 1e3) for k in ("untuned", "tuned", "pruned")] == [1, 2, 3]
    assert round(got["untuned"].ort_s * 1e3) == round(got["tuned"].ort_s * 1e3) == 4
    assert round(got["untuned"].torch_s * 1e3) == round(got["tuned"].torch_s * 1e3) == 5
    assert (round(got["pruned"].ort_s * 1e3), round(got["pruned"].torch_s * 1e3)) == (6, 7)
    assert got["tuned"].ratios()["vs_ort"] == pytest.approx(0.5)



def test_timing_rounds_rest_as_long_as_graphopt_bench_pause_says(monkeypatch):
    """Every round of every runtime rests `round_pause()` seconds first: 0.3 by default, GRAPHOPT_BENCH_PAUSE when
    set (0 included); an explicit pause wins; a value that is no number >= 0 is an error naming the variable."""
    import graphopt.bench as bench
    from graphopt.errors import GraphoptError
    rests = []
    monkeypatch.setattr(bench.time, "sleep", rests.append)
    calls = {"a": lambda: None, "b": lambda: None}
    for value, want in ((None, 0.3), ("0.05", 0.05), ("0", 0.0)):
        if value is None:
            monkeypatch.delenv("GRAPHOPT_BENCH_PAUSE", raising=False)
        else:
            monkeypatch.setenv("GRAPHOPT_BENCH_PAUSE", value)
        rests.clear()
        bench.interleaved_medians(calls, runs=6, rounds=3)
        assert rests == [want] * 6, (value, rests)
    rests.clear()
    bench.interleaved_medians(calls, runs=6, rounds=2, pause=0.01)
    assert rests == [0.01] * 4
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("GRAPHOPT_BENCH_PAUSE", bad)
        with pytest.raises(GraphoptError, match=f"GRAPHOPT_BENCH_PAUSE='{bad}'.*number >= 0"):
            bench.interleaved_medians(calls, runs=6, rounds=3)


def test_a_model_onnx_runtime_cannot_load_is_timed_without_it(tmp_path, monkeypatch, caplog):
    """A user's ONNX file graphopt compiles but ORT refuses (one with external data ORT's shape inference cannot
    read) crashed the compile report with ORT's traceback, after the artifact was built. The report now times
    graphopt and PyTorch and says why ORT has no time."""
    import logging

    import graphopt.bench as bench
    monkeypatch.setattr(bench, "interleaved_medians",
                        lambda calls, runs, rounds: {k: 0.001 * (i + 1) for i, k in enumerate(calls)})
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    model = torch.nn.Linear(4, 3).eval()

    class Art:
        def prepared(self, *args):
            return lambda: None
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        got = bench.compare_latency(Art(), [torch.randn(2, 4)], threads=1, onnx_path=bad, torch_fn=model, runs=3,
                                    rounds=1)
    assert got.ort_s is None and got.torch_s == pytest.approx(0.002)
    assert any("ONNX Runtime cannot run" in r.getMessage() and "bad.onnx" in r.getMessage() for r in caplog.records)

def test_reference_onnx_is_exported_once_per_graph_and_reexported_when_damaged(tmp_path, monkeypatch):
    """The ORT baseline's ONNX file is kept under a digest of the graph: a second compile of one model copies it
    instead of exporting again; another weight is another file; a damaged file is exported again; `off` keeps
    nothing."""
    import graphopt.targets.onnx.export as export_mod
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GRAPHOPT_REFERENCE_CACHE", raising=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    g = graphopt.trace(model, (x,))
    exports = []
    real = export_mod.export_onnx
    monkeypatch.setattr(export_mod, "export_onnx", lambda *a, **k: (exports.append(1), real(*a, **k))[1])
    first = reference_onnx(g, str(tmp_path / "a"))
    second = reference_onnx(graphopt.trace(model, (x,)), str(tmp_path / "b"))  # traced again: same digest
    assert len(exports) == 1 and first != second and first.read_bytes() == second.read_bytes()
    (cached,) = (tmp_path / "cache" / "reference").iterdir()
    name = ort_session(second, 1).get_inputs()[0].name
    np.testing.assert_allclose(ort_session(second, 1).run(None, {name: x.numpy()})[0], model(x).detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    bias = model[2].bias.detach().clone()
    with torch.no_grad():
        model[2].bias[0] += 1.0  # one changed value: another graph, another file
    reference_onnx(graphopt.trace(model, (x,)), str(tmp_path / "c"))
    assert len(exports) == 2 and len(list((tmp_path / "cache" / "reference").iterdir())) == 2
    cached.write_bytes(b"not onnx")
    with torch.no_grad():
        model[2].bias.copy_(bias)
    again = reference_onnx(graphopt.trace(model, (x,)), str(tmp_path / "d"))
    assert len(exports) == 3 and again.read_bytes() == first.read_bytes() == cached.read_bytes()
    monkeypatch.setenv("GRAPHOPT_REFERENCE_CACHE", "off")
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "other"))
    reference_onnx(g, str(tmp_path / "e"))
    assert len(exports) == 4 and not (tmp_path / "other").exists()


def test_benchmark_helpers_randomize_batch_norms_and_pick_models():
    """Benchmarks' random models get trained-looking batch-norm statistics (1-D and 2-D) within the asked ranges,
    the same for the same seed; --only picks models by name, and an unknown name is a usage error naming the
    choices."""
    import argparse

    from graphopt.bench import randomize_batch_norms, selected
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.BatchNorm1d(4))
    randomize_batch_norms(model, 0.5, (0.5, 2.0))
    for bn in model:
        assert 0 < bn.running_mean.abs().max() <= 0.5
        assert 0.5 <= bn.running_var.min() and bn.running_var.max() <= 2.0 and bn.running_var.std() > 0
    again = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.BatchNorm1d(4))
    randomize_batch_norms(again, 0.5, (0.5, 2.0))
    torch.testing.assert_close(again[0].running_var, model[0].running_var)
    ap = argparse.ArgumentParser(prog="bench")
    choices = {"a": 1, "b": 2, "c": 3}
    assert selected(ap, "", choices) == ["a", "b", "c"] and selected(ap, "c,a", choices) == ["c", "a"]
    with pytest.raises(SystemExit):
        selected(ap, "a,zz", choices)
