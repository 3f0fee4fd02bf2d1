"""ONNX and .pt2 export targets: the exported model runs in its runtime and agrees with the graph."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
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
