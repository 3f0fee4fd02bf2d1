"""ONNX and .pt2 export targets: the exported model runs in its runtime and agrees with the graph."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import graphopt


def test_onnx_export_runs_in_onnxruntime(tmp_path, cnn_graph):
    g, model, x = cnn_graph
    g = graphopt.optimize(g, "fold-bn")
    out = graphopt.compile(g, "onnx", output=tmp_path / "o")
    sess = ort.InferenceSession(str(out / "model.onnx"))
    assert [i.name for i in sess.get_inputs()] == ["x"]
    y = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert json.loads((out / "manifest.json").read_text())["target"] == "onnx"
    # and it imports back into the same IR
    back = graphopt.load_onnx(out / "model.onnx")
    torch.testing.assert_close(back.run(x)[0], g.run(x)[0], rtol=1e-4, atol=1e-5)


def test_pt2_export_loads_with_torch(tmp_path, cnn_graph):
    g, model, x = cnn_graph
    out = graphopt.compile(g, "pt2", output=tmp_path / "p")
    ep = torch.export.load(str(out / "model.pt2"))
    torch.testing.assert_close(ep.module()(x)[0], model(x), rtol=1e-5, atol=1e-6)


class _SparseWins:
    """A cost oracle under which every sparse layout beats dense (select-sparse-layout rewrites each layer)."""

    def measure(self, op, shape, layout, weight):
        return 1.0 if layout == "dense" else 0.1


@pytest.mark.parametrize("pipeline", ["quantize,fold-qdq", "select-sparse-layout{candidates=dense,csr}"])
def test_pt2_of_int8_and_sparse_graphs_loads_in_a_pytorch_without_graphopt(tmp_path, pipeline):
    """A .pt2 of an int8 or sparse graph held graphopt's own ops, so `torch.export.load` failed unless graphopt was
    imported first: it now holds plain ATen (Q/DQ as round/clamp/casts with the int8 weights kept; sparse layers
    dense, exact zeros) and loads in a bare interpreter, agreeing with the graph (int8: within the grid's
    rounding)."""
    import subprocess
    import sys

    from graphopt.targets.torch.export import export_pt2
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(16 * 8 * 8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    x = torch.randn(4, 3, 8, 8)
    data = [(torch.randn(4, 3, 8, 8),) for _ in range(4)]
    g = graphopt.optimize(graphopt.trace(net, (x,)), f"sparsify{{sparsity=0.8}},{pipeline}", data=data,
                          target=_SparseWins())
    ops = {str(n.target) for n in g.nodes("call_function")}
    int8 = pipeline.startswith("quantize")
    expected = {"graphopt.qconv2d.default", "graphopt.qlinear.default"} if int8 else {"graphopt.bsr_linear.default"}
    assert expected <= ops, ops
    np.save(tmp_path / "x.npy", x.numpy())
    export_pt2(g, tmp_path / "m.pt2")
    script = ("import sys, numpy as np, torch; ep = torch.export.load(sys.argv[1]); "
              "assert 'graphopt' not in sys.modules; "
              "print(sorted({str(n.target) for n in ep.graph.nodes if n.op == 'call_function'})); "
              "np.save(sys.argv[2], ep.module()(torch.from_numpy(np.load(sys.argv[3])))[0].numpy())")
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m.pt2"), str(tmp_path / "y.npy"),
                          str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "graphopt" not in res.stdout and ("aten.round.default" in res.stdout) == int8, res.stdout
    got, ref = np.load(tmp_path / "y.npy"), g.run(x)[0].numpy()
    assert np.abs(got - ref).max() <= (0.05 if int8 else 1e-5) * np.abs(ref).max(), np.abs(got - ref).max()
    weights = torch.export.load(str(tmp_path / "m.pt2")).state_dict.values()
    assert len([w for w in weights if w.dtype == torch.int8]) == (3 if int8 else 0)  # int8 weights stay int8


def test_onnx_export_quiets_onnxscript_constant_folding_then_restores_it(caplog):
    """The exporter's optimizer logs a warning for each node its constant folder cannot evaluate (the node stays as
    it is; a sparsified MiniLM printed "Evaluation failed: cannot reshape array ..." twice in every compile report):
    the export silences onnxscript's loggers as it does torch.onnx's, and gives them their levels back after."""
    import logging

    from graphopt.targets.onnx.export import _quiet
    folder = logging.getLogger("onnxscript.optimizer._constant_folding")
    before = logging.getLogger("onnxscript").level
    with caplog.at_level(logging.WARNING):
        with _quiet():
            folder.warning("Evaluation failed: inside")
            logging.getLogger("torch.onnx").warning("registry: inside")
        folder.warning("Evaluation failed: after")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Evaluation failed: after"]
    assert logging.getLogger("onnxscript").level == before
