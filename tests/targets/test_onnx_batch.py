"""An ONNX model that came in with a dynamic batch dim goes out with one (targets/onnx/batch.py): each export is run
in ONNX Runtime at a batch other than the traced one and compared with the input model there."""
from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import graphopt
from graphopt.errors import InputMismatchError
from graphopt.report import artifact_summary
from graphopt.targets.onnx.batch import make_batch_dynamic
from graphopt.targets.onnx.export import export_onnx
from tests.frontends.quiet_export import export_legacy


class _Cnn(nn.Module):
    """conv -> BN -> ReLU -> flatten -> linear: the flatten is a Reshape whose target holds the traced batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


class _Attention(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-1, -2) / 3.0, -1) @ v
        return x + self.out(a.transpose(1, 2).reshape(b, t, d))


class _Vit(nn.Module):
    """Patches, a class token concatenated in front (a constant of the traced batch in the export), attention,
    the class token's row into a head."""

    def __init__(self):
        super().__init__()
        self.patch, self.head = nn.Conv2d(3, 16, 4, 4), nn.Linear(16, 5)
        self.cls, self.pos = nn.Parameter(torch.randn(1, 1, 16)), nn.Parameter(torch.randn(1, 5, 16))
        self.attn = _Attention()

    def forward(self, x):
        y = self.patch(x).flatten(2).transpose(1, 2)
        y = torch.cat([self.cls.expand(x.shape[0], -1, -1), y], 1) + self.pos
        return self.head(self.attn(y)[:, 0])


class _Upsample(nn.Module):
    """A strided conv, then interpolate back to the input's size: a Resize whose constant sizes hold the batch."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        up = nn.functional.interpolate(torch.relu(self.conv(x)), size=x.shape[2:], mode="bilinear")
        return self.fc(up.flatten(1))


def _export(module: nn.Module, path, shape=(2, 3, 8, 8)):
    torch.manual_seed(0)
    module = module.eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # (batch norm statistics away from identity)
    export_legacy(module, (torch.randn(*shape),), path, input_names=["x"], output_names=["y"],
                  dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    return path


def _dims(model):
    m = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(m.graph.input) + list(m.graph.output)}


@pytest.mark.parametrize("module", [_Cnn, _Vit, _Upsample])
def test_an_export_takes_any_batch_where_the_model_did(tmp_path, module):
    src = _export(module(), tmp_path / "src.onnx")
    g = graphopt.load_model(src)  # (traced at batch 1, with a warning)
    assert g.meta["dynamic_batch"]["inputs"] == {"x": "N"}
    opt = graphopt.optimize(g, "sparsify{sparsity=0.5}", target="onnx")
    art = graphopt.compile(opt, "onnx", output=tmp_path / "art")
    assert _dims(art / "model.onnx") == {"x": ["N", 3, 8, 8], "y": ["N", 5]}
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    got = graphopt.load(art)(x)[0]  # (the runtime takes any batch for it)
    with torch.no_grad():  # the optimized graph (traced at batch 1), row by row
        want = np.concatenate([opt.gm(torch.from_numpy(x[r:r + 1]))[0].numpy() for r in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    source = ort.InferenceSession(str(src)).run(None, {"x": x})[0]
    assert np.abs(got - source).max() > 1e-3  # (the pass changed what it computes: half the weights are gone)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["inputs"][0]["batch_dim"] == "N" and manifest["outputs"][0]["batch_dim"] == "N"
    assert "x [N, 3, 8, 8] float32" in artifact_summary(art)
    with pytest.raises(InputMismatchError, match=r"expected \[N, 3, 8, 8\]"):
        graphopt.load(art)(x[:, :, :7])


def test_a_given_shape_fixes_the_batch_of_the_export(tmp_path):
    src = _export(_Cnn(), tmp_path / "src.onnx")
    g = graphopt.load_model(src, {"x": (2, 3, 8, 8)})
    assert "dynamic_batch" not in g.meta
    out = export_onnx(g, tmp_path / "fixed.onnx")
    assert _dims(out) == {"x": [2, 3, 8, 8], "y": [2, 5]}


def test_a_batch_held_elsewhere_keeps_the_traced_batch_and_says_why(tmp_path, caplog):
    class Rnn(nn.Module):  # (torch's GRU export: sequence-major inside, the batch in dim 1 of its Reshapes)
        def __init__(self):
            super().__init__()
            self.rnn, self.fc = nn.GRU(4, 6, batch_first=True), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(self.rnn(x)[0][:, -1])
    src = _export(Rnn(), tmp_path / "rnn.onnx", shape=(2, 5, 4))
    g = graphopt.load_model(src)
    info: dict = {}
    with caplog.at_level(logging.WARNING):
        out = export_onnx(g, tmp_path / "rnn_out.onnx", report=info)
    assert "takes batch 1 only" in caplog.text and "--input-shape" in caplog.text
    assert "batch of 3" in info["batch_fixed"]
    assert _dims(out) == {"x": [1, 5, 4], "y": [1, 3]}
    x = np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, {"x": x})[0],
                               ort.InferenceSession(str(src)).run(None, {"x": x})[0], rtol=1e-4, atol=1e-5)


def _batch_mean_model(axis: int) -> onnx.ModelProto:
    """x - its mean over `axis` (0: over the batch)."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[axis], keepdims=1),
             helper.make_node("Sub", ["x", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_check_refuses_an_export_that_mixes_rows():
    """x - mean over the batch: ONNX Runtime runs it at any batch, and a row batched with others is not what it is
    alone, so the batch stays fixed (a Reshape-only rewrite cannot see this); over each row it is batchable."""
    dims = {"inputs": {"x": "N"}, "outputs": {"y": "N"}}
    model = _batch_mean_model(axis=0)
    out, why = make_batch_dynamic(model, dims, 1)
    assert out is model and "differs from the same row run alone" in why
    out, why = make_batch_dynamic(_batch_mean_model(axis=1), dims, 1)
    assert why == "" and _dims(out) == {"x": ["N", 4], "y": ["N", 4]}


def test_a_shape_given_with_an_open_batch_keeps_it_dynamic(tmp_path, capsys):
    """Batch and sequence both dynamic (a Hugging Face encoder's export): the sequence must be given, and
    `--input-shape ids=Nx7` (None first in Python) leaves the batch open: traced at 1, any batch in the export."""
    from tests.frontends.test_onnx_import import _dynamic_model
    from conftest import cli_main
    src = _dynamic_model(tmp_path / "pool.onnx")
    g = graphopt.load_model(src, {"ids": (None, 7)})
    assert g.inputs[0].shape == (1, 7) and g.meta["dynamic_batch"]["inputs"] == {"ids": "batch"}
    out = export_onnx(g, tmp_path / "pool_out.onnx")
    assert _dims(out)["ids"] == ["batch", 7]
    ids = np.random.default_rng(0).integers(0, 50, (5, 7)).astype(np.int64)
    np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, {"ids": ids})[0],
                               ort.InferenceSession(str(src)).run(None, {"ids": ids})[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputMismatchError, match="only the batch can stay dynamic"):
        graphopt.load_model(src, {"ids": (2, None)})
    assert cli_main("inspect", str(src), "--input-shape", "ids=Nx7") == 0
    assert "ids: int64[1,7]  (batch dim 'batch' dynamic: traced at 1" in capsys.readouterr().out


def test_a_per_sample_gather_follows_the_batch():
    """GatherND whose constant indices pick data row b in index b (a Hugging Face attention mask built by vmap,
    traced at batch 1: always row 0) becomes a batch_dims=1 gather: each sample reads its own row."""
    idx = np.array([[[0, 3], [0, 1]]], np.int64)  # [1, 2, 2]: (row, column) pairs of sample 0
    nodes = [helper.make_node("GatherND", ["x", "idx"], ["g"]), helper.make_node("Relu", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
                              initializer=[onnx.numpy_helper.from_array(idx, "idx")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    out, why = make_batch_dynamic(model, {"inputs": {"x": "N"}, "outputs": {"y": "N"}}, 1)
    assert why == ""
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    got = ort.InferenceSession(out.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, np.maximum(x[:, [3, 1]], 0))


def test_bench_times_a_dynamic_export_at_the_batch_asked(tmp_path, capsys):
    """`graphopt bench --batch N`: the export, ORT on the original .onnx and PyTorch on it traced at batch N,
    per-sample times beside;
    a fixed-batch artifact is refused with how to get one."""
    from conftest import cli_main
    src = _export(_Cnn(), tmp_path / "src.onnx")
    dynamic = graphopt.compile(graphopt.load_model(src), "onnx", output=tmp_path / "dyn")
    fixed = graphopt.compile(graphopt.load_model(src, {"x": (1, 3, 8, 8)}), "onnx", output=tmp_path / "fixed")
    capsys.readouterr()
    assert cli_main("bench", str(dynamic), "--model", str(src), "--batch", "3", "--runs", "2") == 0
    out = capsys.readouterr().out
    assert "batch 3)" in out and "ms / sample" in out and "PyTorch eager" in out  # (the model traced at batch 3)
    ort_row = next(line for line in out.splitlines() if line.startswith("ONNX Runtime")).split()
    assert float(ort_row[-1]) == pytest.approx(float(ort_row[2]) / 3, abs=0.0011)  # (per sample; printed to us)
    assert cli_main("bench", str(fixed), "--model", str(src), "--batch", "3") == 1
    assert "takes batch 1 only" in capsys.readouterr().err


def test_inputs_that_take_any_batch_take_the_same_one(tmp_path):
    """Two batch-led inputs of different batches: one error naming both (ONNX Runtime failed inside, on the first
    op joining them, and the CLI showed its traceback)."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, a, b):
            return self.fc(a * b)
    export_legacy(Two().eval(), (torch.randn(2, 4), torch.randn(2, 4)), tmp_path / "two.onnx", input_names=["a", "b"],
                  output_names=["y"], dynamic_axes={"a": {0: "N"}, "b": {0: "N"}, "y": {0: "N"}})
    model = graphopt.load(graphopt.compile(graphopt.load_model(tmp_path / "two.onnx"), "onnx", output=tmp_path / "a"))
    a = np.ones((3, 4), np.float32)
    assert model(a, a)[0].shape == (3, 2)
    with pytest.raises(InputMismatchError, match="batches differ \\('a' 3, 'b' 2\\)"):
        model(a, a[:2])


def test_a_rewrite_that_fails_costs_the_dynamic_batch_not_the_export(tmp_path, monkeypatch, caplog):
    """Anything a rewrite did not foresee (here: shape inference raising) leaves the fixed-batch export whole,
    with the reason in the report and a warning."""
    import logging

    from graphopt.targets.onnx import batch

    def broken(model):
        raise ValueError("cannot infer")
    monkeypatch.setattr(batch, "_static_shapes", broken)
    g = graphopt.load_model(_export(_Cnn(), tmp_path / "src.onnx"))
    info: dict = {}
    with caplog.at_level(logging.WARNING):
        out = export_onnx(g, tmp_path / "out.onnx", report=info)
    assert "the batch rewrite failed (ValueError: cannot infer)" in info["batch_fixed"]
    assert "takes batch 1 only" in caplog.text
    assert _dims(out) == {"x": [1, 3, 8, 8], "y": [1, 5]}
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(ort.InferenceSession(str(out)).run(None, {"x": x})[0],
                                   g.gm(torch.from_numpy(x))[0].numpy(), rtol=1e-4, atol=1e-5)
