"""Pre-quantized ONNX models (QDQ, as ONNX Runtime's quantize_static writes them) import onto graphopt's
quantization ops with the exact QDQ semantics, and fold-qdq turns them into integer convs/linears."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from tests.frontends.quiet_export import export_legacy
from graphopt.errors import UnsupportedOpError


def _reference(path, x):
    """ONNX Runtime with every optimization off: the QDQ graph computed as written (its fused int8 kernels may
    saturate on CPUs without VNNI, so they are no reference)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so).run(None, {"image": x})[0]


@pytest.fixture(scope="module")
def ort_quantized(tmp_path_factory):
    """A conv -> ReLU6 -> 1x1 conv -> flatten -> linear net quantized by ORT with int8 and with uint8 activations."""
    from graphopt.bench import calibration_reader
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    tmp = tmp_path_factory.mktemp("qdq")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(), torch.nn.Conv2d(8, 4, 1),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5)).eval()
    fp32 = tmp / "net.onnx"
    export_legacy(net, (torch.randn(1, 3, 8, 8),), fp32, input_names=["image"], opset_version=13)
    feeds = [{"image": torch.randn(1, 3, 8, 8).numpy()} for _ in range(8)]
    out = {}
    for name, act in (("s8", QuantType.QInt8), ("u8", QuantType.QUInt8)):
        out[name] = tmp / f"net_{name}.onnx"
        with contextlib.redirect_stderr(io.StringIO()):
            quantize_static(str(fp32), str(out[name]), calibration_reader(feeds),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=act, weight_type=QuantType.QInt8)
    return out, tmp


@pytest.mark.parametrize("act", ["s8", "u8"])
def test_ort_qdq_model_imports_exactly_and_folds_to_integer_ops(ort_quantized, act):
    paths, tmp = ort_quantized
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    ref = _reference(paths[act], x)
    g = graphopt.load_onnx(paths[act])
    ops = {str(n.target) for n in g.gm.graph.nodes if n.op == "call_function"}
    assert {"graphopt.quantize_per_tensor.default", "graphopt.dequantize_per_channel.default"} <= ops
    np.testing.assert_allclose(g.run(torch.from_numpy(x))[0].numpy(), ref, rtol=0, atol=1e-6)
    q = graphopt.optimize(g, "fold-qdq")
    assert q.meta["history"][-1]["stats"]["folded"] == 3  # both convs and the linear
    targets = {str(n.target) for n in q.gm.graph.nodes if n.op == "call_function"}
    assert {"graphopt.qconv2d.default", "graphopt.qlinear.default"} <= targets
    art = graphopt.load(graphopt.compile(q, "llvm", output=tmp / f"art_{act}"))
    model = onnx.load(paths[act])
    last_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]
    out_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == last_q.input[1])))
    assert np.abs(art(x)[0] - ref).max() <= 2 * out_scale  # integer kernels: within a rounding step or two


def test_ort_qdq_3d_conv_model_folds_to_int8_convs_over_depth_taps(tmp_path):
    """ORT's quantize_static of a 3-D conv net (a 3x3x3 conv and a temporal (3, 1, 1) one): the CLI's QDQ pipeline
    folds both into graphopt's int8 2-D conv (over the depth taps; a 3 x 1 conv over [C, D, H W]), which had
    stayed float convs on dequantized weights; the artifact agrees with the QDQ graph as ONNX Runtime computes it
    without its fused kernels, within two steps of the output grid."""
    from graphopt.bench import calibration_reader
    from graphopt.cli import DEFAULT_QDQ_PIPELINE
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv3d(8, 8, (3, 1, 1), padding=(1, 0, 0))).eval()
    fp32, q8 = tmp_path / "net.onnx", tmp_path / "net8.onnx"
    export_legacy(net, (torch.randn(1, 3, 4, 6, 6),), fp32, input_names=["image"], opset_version=13)
    feeds = [{"image": torch.randn(1, 3, 4, 6, 6).numpy()} for _ in range(4)]
    with contextlib.redirect_stderr(io.StringIO()):
        quantize_static(str(fp32), str(q8), calibration_reader(feeds), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    q = graphopt.optimize(graphopt.load_onnx(q8), DEFAULT_QDQ_PIPELINE, warn_unchanged=False)
    ops = [n.target.__name__ for n in q.gm.graph.nodes if n.op == "call_function"]
    assert ops.count("qconv2d.default") == 2 and "depth_taps.default" in ops and "conv3d.default" not in ops, ops
    x = np.random.default_rng(1).standard_normal((1, 3, 4, 6, 6)).astype(np.float32)
    ref = _reference(q8, x)
    art = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "art"))
    model = onnx.load(q8)
    last_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"][-1]
    out_scale = float(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == last_q.input[1])))
    assert np.abs(art(x)[0] - ref).max() <= 2 * out_scale


def test_a_pair_width_rounds_an_imported_qdq_models_weights_again_without_calibration(ort_quantized):
    """quantize{weights=int8s} (or auto, for an AVX2 CPU or an ONNX export) on a Q/DQ file's layers: the weights are
    rounded again to the pair width, the file's activation grids stay, and no calibration data is needed (it had
    changed nothing: 'no conv or linear with a float weight to quantize'). For target onnx the one-row linear takes
    it too (ONNX Runtime pairs its weights), not for graphopt's kernels (they stream it); the model moves by about
    the coarser step."""
    from graphopt.ir.quant_ops import flat_pairs, pairs_bounded, worst_pair_sums
    paths, _ = ort_quantized
    g = graphopt.load_onnx(paths["s8"])
    dq = "graphopt.dequantize_per_channel.default"
    weights = {n.args[0].target for n in g.gm.graph.nodes if str(n.target) == dq}
    assert any(not pairs_bounded(g.get_param(w)) for w in weights)  # (ORT's full-range int8)
    grids = sorted((float(n.args[1]), int(n.args[2])) for n in g.gm.graph.nodes
                   if str(n.target) == "graphopt.quantize_per_tensor.default")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32))
    ref = g.run(x)[0]
    for target, widths in (("llvm", {"conv2d": "int8s", "conv2d_1": "int8s"}),
                           ("onnx", {"conv2d": "int8s", "conv2d_1": "int8s", "linear": "int8s"})):
        q = graphopt.optimize(g, "quantize{weights=int8s}", target=target)
        rec = q.meta["history"][-1]
        assert rec["changed"] and rec["stats"]["kept_weights_rounded_to_pair_width"] == len(widths)
        assert q.meta["weight_bits"] == widths
        assert grids == sorted((float(n.args[1]), int(n.args[2])) for n in q.gm.graph.nodes
                               if str(n.target) == "graphopt.quantize_per_tensor.default")
        for n in q.gm.graph.nodes:
            if str(n.target) == dq and any(u.name in widths for u in n.users):
                w = q.get_param(n.args[0].target)
                assert int(worst_pair_sums(flat_pairs(w.int())).max()) <= 128 and pairs_bounded(w)
        err = float((q.run(x)[0] - ref).abs().max() / ref.abs().max())
        assert 0 < err < 0.1, err


def _matmul_qdq(path, per_axis_activation: bool = False):
    """x [2, 6] -> Q/DQ -> MatMul with a DQ'd int8 weight [6, 4] (scales per column, axis 1) -> y."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (6, 4)).astype(np.int8)
    ws = (rng.random(4) * 0.01 + 0.005).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w_q"), numpy_helper.from_array(ws, "w_s"),
             numpy_helper.from_array(np.zeros(4, np.int8), "w_z"),
             numpy_helper.from_array(np.array(0.02, np.float32) if not per_axis_activation
                                     else np.full(6, 0.02, np.float32), "x_s"),
             numpy_helper.from_array(np.array(3, np.int8) if not per_axis_activation
                                     else np.full(6, 3, np.int8), "x_z")]
    nodes = [helper.make_node("QuantizeLinear", ["image", "x_s", "x_z"], ["xq"], name="quant_x", axis=1),
             helper.make_node("DequantizeLinear", ["xq", "x_s", "x_z"], ["xd"], axis=1),
             helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_z"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_matmul_with_column_scaled_weight_becomes_a_foldable_linear(tmp_path):
    path = _matmul_qdq(tmp_path / "mm.onnx")
    x = np.random.default_rng(2).standard_normal((2, 6)).astype(np.float32)
    g = graphopt.load_onnx(path)
    assert any(str(n.target) == "aten.linear.default" for n in g.gm.graph.nodes)
    np.testing.assert_allclose(g.run(torch.from_numpy(x))[0].numpy(), _reference(path, x), rtol=1e-6, atol=1e-6)
    q = graphopt.optimize(g, "fold-qdq")
    assert q.meta["history"][-1]["stats"]["folded"] == 1
    np.testing.assert_allclose(q.run(torch.from_numpy(x))[0].numpy(), _reference(path, x), rtol=1e-5, atol=1e-5)


def test_per_axis_activation_quantize_names_the_node(tmp_path):
    with pytest.raises(UnsupportedOpError, match="quant_x.*per-axis scale"):
        graphopt.load_onnx(_matmul_qdq(tmp_path / "pa.onnx", per_axis_activation=True))


def test_uint8_quantize_without_zero_points_round_trips(tmp_path):
    """QuantizeLinear and DequantizeLinear with the optional zero point left out mean uint8 with zero point 0: the
    pair must stay a uint8 round trip (clamping negatives to 0) although graphopt stores the grid as int8."""
    nodes = [helper.make_node("QuantizeLinear", ["image", "s"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [2, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5])],
                              initializer=[numpy_helper.from_array(np.array(0.05, np.float32), "s")])
    path = tmp_path / "q.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.random.default_rng(3).standard_normal((2, 5)).astype(np.float32) * 5
    ref = _reference(path, x)
    assert (ref == 0).any() and ref.max() > 1  # negatives clamp to 0, the rest survive
    np.testing.assert_allclose(graphopt.load_onnx(path).run(torch.from_numpy(x))[0].numpy(), ref, atol=1e-6)
