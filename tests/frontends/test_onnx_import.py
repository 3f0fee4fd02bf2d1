"""ONNX import: files from both torch exporters (incl. dynamic Pad/ConstantOfShape), bad files, unknown ops."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

import graphopt
from graphopt.errors import ModelFileError, UnsupportedOpError


class ShapeDependent(nn.Module):
    """Padding computed from the input's shape: the classic exporter emits Shape/Gather/ConstantOfShape/dynamic Pad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        w = x.shape[-1]
        x = F.pad(x, (0, (4 - w % 4) % 4 + 1, 1, 0))
        y = torch.relu(self.bn(self.conv(x)))
        y = F.max_pool2d(y, 2)
        z = self.ln(y.flatten(2).transpose(1, 2))
        att = torch.softmax(z @ z.transpose(1, 2) / 8 ** 0.5, -1) @ z
        return self.fc(att.mean(1)), torch.sigmoid(y[:, :4]).sum((2, 3))


def export(model, x, path, dynamo: bool):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["x"])
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], opset_version=13)
    return path


@pytest.mark.parametrize("dynamo", [False, True], ids=["classic-exporter", "dynamo-exporter"])
def test_import_matches_onnxruntime(tmp_path, dynamo):
    torch.manual_seed(0)
    model = ShapeDependent().eval()
    x = torch.randn(2, 3, 15, 15)
    path = export(model, x, tmp_path / "m.onnx", dynamo)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    if not dynamo:
        assert {"Shape", "Pad"} <= ops  # the file really has shape-dependent padding
    g = graphopt.load_onnx(path)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})
    outs = g.run(x)
    assert len(outs) == 2
    for o, r in zip(outs, ref):
        np.testing.assert_allclose(o.numpy(), r, rtol=1e-4, atol=1e-5)
    # the imported graph is ATen-level and compiles like a traced one
    assert any("conv2d" in str(n.target) for n in g.graph.nodes)


def test_corrupt_and_truncated_files(tmp_path):
    model = ShapeDependent().eval()
    path = export(model, torch.randn(1, 3, 8, 8), tmp_path / "ok.onnx", dynamo=False)
    data = path.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError, match="trunc.onnx"):
        graphopt.load_onnx(tmp_path / "trunc.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(ModelFileError, match="junk.onnx"):
        graphopt.load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(ModelFileError, match="does not exist"):
        graphopt.load_onnx(tmp_path / "nope.onnx")


def _single_op_model(op_type: str, domain: str = "", **attrs) -> onnx.ModelProto:
    node = helper.make_node(op_type, ["x"], ["y"], name="mystery_node", domain=domain, **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(graph, opset_imports=opsets)


def test_unknown_op_names_node_and_op(tmp_path):
    path = tmp_path / "u.onnx"
    onnx.save(_single_op_model("Det"), str(path))
    with pytest.raises(UnsupportedOpError) as e:
        graphopt.load_onnx(path)
    assert e.value.node == "mystery_node" and e.value.op == "Det"
    assert "supported:" in str(e.value)


def test_custom_domain_op_is_unsupported(tmp_path):
    path = tmp_path / "c.onnx"
    onnx.save(_single_op_model("FusedThing", domain="com.example"), str(path))
    with pytest.raises(UnsupportedOpError, match="com.example.FusedThing"):
        graphopt.load_onnx(path)


def _dynamic_model(path):
    """An embedding + mean-pool + linear exported with dynamic batch and sequence dims."""
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 8), nn.Linear(8, 3)

        def forward(self, ids):
            return self.fc(self.emb(ids).mean(1))
    torch.manual_seed(0)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Pool().eval(), (torch.randint(0, 50, (2, 7)),), str(path), dynamo=False,
                          input_names=["ids"], dynamic_axes={"ids": {0: "batch", 1: "seq"}})
    return path


def test_dynamic_dims_take_given_shapes(tmp_path):
    from graphopt.errors import InputMismatchError
    path = _dynamic_model(tmp_path / "dyn.onnx")
    with pytest.raises(InputMismatchError, match=r"input 'ids' \[batch, seq\] has dynamic dims besides the batch.*"
                                                 r"--input-shape ids=Nx<seq> with numbers"):
        graphopt.load_model(path)
    # every input that needs a shape in one error: the user learns all of them from one try
    xy = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 4]) for n in ("x", "y")]
    two = tmp_path / "two.onnx"
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", xy,
                                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])), two)
    with pytest.raises(InputMismatchError, match=r"inputs 'x' \[b, s, 4\], 'y' \[b, s, 4\] have dynamic dims.*"
                                                 r"--input-shape x=Nx<s>x4 --input-shape y=Nx<s>x4"):
        graphopt.load_model(two)
    assert graphopt.load_model(two, {"x": (None, 5, 4), "y": (None, 5, 4)}).inputs[1].shape == (1, 5, 4)
    g = graphopt.load_model(path, {"ids": (3, 11)})
    ids = np.random.default_rng(0).integers(0, 50, (3, 11)).astype(np.int64)
    ref = ort.InferenceSession(str(path)).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(g.gm(torch.from_numpy(ids))[0].detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    for bad, msg in [({"idz": (3, 11)}, "does not have; its inputs: 'ids'"), ({"ids": (3,)}, "rank 2"),
                     ({"ids": (3, 0)}, "<= 0")]:
        with pytest.raises(InputMismatchError, match=msg):
            graphopt.load_model(path, bad)


def test_cli_input_shape_option(tmp_path, capsys):
    from conftest import cli_main
    path = _dynamic_model(tmp_path / "dyn.onnx")
    assert cli_main("inspect", str(path), "--input-shape", "ids=4x9") == 0
    assert "ids: int64[4,9]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main("inspect", str(path), "--input-shape", "ids=4xq")
    assert "is not NAME=DIMS" in capsys.readouterr().err


def _indexing_model():
    """x [2, 3, 4] (float) and int64 indices from the graph input: GatherElements, GatherND (batch_dims 0 and 1,
    negative indices), IsNaN and IsInf (negative only) on the gathered values: the ops HF BERT exports use."""
    rng = np.random.default_rng(0)
    ge_idx = rng.integers(-3, 3, (2, 2, 4))
    nd_idx = np.array([[[0, -1], [1, 2]], [[-2, 0], [1, 1]]])  # [2, 2, 2]: pairs into (dim1, dim2) per batch
    nd0_idx = np.array([[1, 0], [-1, 2]])  # [2, 2]: pairs into (dim0, dim1)
    c = lambda name, a: helper.make_tensor(name, TensorProto.INT64, a.shape, a.reshape(-1).tolist())  # noqa: E731
    nodes = [helper.make_node("GatherElements", ["x", "ge"], ["a"], axis=1),
             helper.make_node("GatherND", ["x", "nd"], ["b"], batch_dims=1),
             helper.make_node("GatherND", ["x", "nd0"], ["d"]),
             helper.make_node("Log", ["a"], ["la"]),
             helper.make_node("IsNaN", ["la"], ["n"]),
             helper.make_node("IsInf", ["la"], ["i"], detect_positive=0),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["i"], ["if"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
                               [("a", [2, 2, 4]), ("b", [2, 2]), ("d", [2, 4]), ("nf", [2, 2, 4]), ("if", [2, 2, 4])]],
                              initializer=[c("ge", ge_idx), c("nd", nd_idx), c("nd0", nd0_idx)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_indexing_ops_match_onnxruntime_and_compile(tmp_path):
    path = tmp_path / "idx.onnx"
    onnx.save(_indexing_model(), str(path))
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float32)
    x[:, :, 0] = 0.0  # log -> -inf (negatives give nan)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})
    assert ref[3].any() and ref[4].any()  # the NaN and -inf cases are exercised
    g = graphopt.load_onnx(path)
    got = [t.detach().numpy() for t in g.gm(torch.from_numpy(x))]
    for r, o in zip(ref, got):
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-6)
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "art"))
    for r, o in zip(ref, art(x)):
        np.testing.assert_allclose(np.asarray(o), r, rtol=1e-6, atol=1e-6)


def _external_matmul(path, w: np.ndarray):
    """x @ w saved at `path` with w beside it in `<name>.data` (ONNX's external data, as exporters write big
    models)."""
    from onnx import numpy_helper
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
                              initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
              save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data",
              size_threshold=0)


def test_missing_external_weights_are_a_clear_error(tmp_path):
    """Exporters put big weights beside the .onnx (external data); without that file the model cannot load."""
    path = tmp_path / "ext.onnx"
    _external_matmul(path, np.ones((4, 4), np.float32))
    assert graphopt.load_onnx(path).run(torch.ones(1, 4))[0].sum() == 16.0
    data = (tmp_path / "ext.onnx.data").read_bytes()
    (tmp_path / "ext.onnx.data").write_bytes(data[:10])  # cut short: named with its tensor
    with pytest.raises(ModelFileError, match="initializer 'w' could not be read.*data file whole"):
        graphopt.load_onnx(path)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelFileError, match="external data.*'ext.onnx.data' .tensor 'w'. is not beside it.*Keep "
                                             "the data file"):
        graphopt.load_onnx(path)


def test_a_model_past_protobufs_2gb_in_external_data_imports(tmp_path, monkeypatch):
    """Weights beside the .onnx, together past protobuf's 2 GB: onnx's in-memory check cannot serialize the loaded
    model (a 2.1 GB linear's file failed "to serialize proto", a traceback); such a model is checked from its file.
    (onnx's limit lowered to 1 kB stands in for the 2 GB.)"""
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 1000
    path = tmp_path / "big.onnx"
    _external_matmul(path, w)
    monkeypatch.setattr(onnx.checker, "MAXIMUM_PROTOBUF", 1024)
    y = graphopt.load_onnx(path).run(torch.ones(1, 64))[0]
    torch.testing.assert_close(y, torch.from_numpy(w).sum(0, keepdim=True))



def test_a_given_shape_may_name_the_input_as_the_graph_does(tmp_path):
    """An ONNX input "ids.1" is the graph's "ids_1" (what artifacts, reports and error hints call it); a shape
    given under either name fixes it (the graph's name was "not an input of the model")."""
    x = helper.make_tensor_value_info("ids.1", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["ids.1"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    for name in ("ids.1", "ids_1"):
        g = graphopt.load_model(path, {name: (2, 5)})
        assert g.inputs[0].name == "ids_1" and g.inputs[0].shape == (2, 5)


def test_outputs_that_declare_no_shape_import_as_onnxruntime_runs_them(tmp_path):
    """An output with a type but no shape: ONNX Runtime runs the file, onnx's checker refused it ("Field 'shape' of
    'type' is required but missing"), and so did the import. The graph computes every shape itself."""
    v = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])], "g",
                              [v("x", TensorProto.FLOAT, [2, 3])], [v("y", TensorProto.FLOAT, None),
                                                                    v("z", TensorProto.FLOAT, [2, 3])])
    path = tmp_path / "noshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = ort.InferenceSession(str(path)).run(None, {"x": x})
    g = graphopt.load_onnx(path)
    assert [(s.name, tuple(s.shape)) for s in g.outputs] == [("y", (2, 3)), ("z", (2, 3))]
    for got, ref in zip(g.run(torch.from_numpy(x)), want):
        np.testing.assert_array_equal(got.numpy(), ref)


def test_a_weight_several_nodes_read_through_transposes_is_imported_once(tmp_path):
    """torch's exporter writes a Transpose per use of a shared weight (ALBERT's one layer run 4 times): each had
    been folded into a constant of its own, so the import held 4 copies of every weight (796k parameters against
    the file's 206k) and so did the artifact. The same op on the same constant folds once, keeping the weight's
    name; a MatMul on the weight as stored (no Transpose) shares it too."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(np.float32)  # [out, in], as torch stores it
    nodes = [helper.make_node("Transpose", ["layer.weight"], [f"wt{i}"], perm=[1, 0]) for i in range(3)]
    y = "x"
    for i in range(3):
        nodes += [helper.make_node("MatMul", [y, f"wt{i}"], [f"m{i}"]), helper.make_node("Relu", [f"m{i}"], [f"r{i}"])]
        y = f"r{i}"
    nodes.append(helper.make_node("MatMul", [y, "layer.weight"], ["out"]))  # (as stored: one more constant)
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 16])],
                              [onnx.numpy_helper.from_array(w, "layer.weight")])
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    g = graphopt.load_onnx(path)
    params = g.params()
    assert sum(v.numel() for v in params.values()) == 2 * w.size, {k: tuple(v.shape) for k, v in params.items()}
    assert all(k.startswith("layer_weight") for k, v in params.items() if v.numel() == w.size), list(params)
    x = rng.standard_normal((2, 16)).astype(np.float32)
    ref = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(g.run(torch.from_numpy(x))[0].numpy(), ref, rtol=1e-5, atol=1e-5)
