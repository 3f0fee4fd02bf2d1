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
            logging.getLogger("onnx_ir.passes.common").warning("Skipped deduplication: inside")  # (constant outputs)
        folder.warning("Evaluation failed: after")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["Evaluation failed: after"]
    assert logging.getLogger("onnxscript").level == before


def _ort_ops(path, folder) -> dict:
    """The op counts of `path` after ONNX Runtime's CPU optimizations (what it will run)."""
    import collections

    import onnx
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(folder / "ort_optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


class _Block(torch.nn.Module):
    """A transformer's feed-forward block on [batch, tokens, features] (linears on 3-D inputs, as MiniLM's)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)
        self.conv1, self.conv2 = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x, img):
        return x + self.down(torch.relu(self.up(x))), self.conv2(torch.relu(self.conv1(img)))


def test_int8_onnx_export_is_in_the_form_onnxruntime_runs_on_integer_kernels(tmp_path):
    """Every int8 linear of an exported graph, and every int8 conv whose output is quantized next, runs on ONNX
    Runtime's integer kernels (QGemm / MatMulIntegerToFloat / QLinearConv): the exporter's DequantizeLinear ->
    Transpose -> MatMul and float biases had left MiniLM's linears in float, each weight dequantized on every call
    (2.3x ORT's fp32 time; 0.73x after). ORT has no int8 conv with a float output, so a conv whose output is not
    requantized (here the last; MobileNetV2's projections into residual adds) stays a float conv. The int32
    biases keep the outputs within the grid's rounding of the graph's."""
    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    net = _Block().eval()
    args = (torch.randn(1, 16, 32), torch.randn(1, 4, 8, 8))
    data = [(torch.randn(1, 16, 32), torch.randn(1, 4, 8, 8)) for _ in range(8)]
    # int7 weights: ORT's u8 x s8 kernels on CPUs without VNNI add pairs of products in int16 (AVX2's
    # vpmaddubsw), which full-range int8 weights can saturate (4.6% off here); 7-bit ones cannot, on any CPU
    g = graphopt.optimize(graphopt.trace(net, args), "quantize{weights=int7},fold-qdq", data=data)
    assert set(g.meta["weight_bits"].values()) == {"int7"}
    export_onnx(g, tmp_path / "m.onnx")
    ops = _ort_ops(tmp_path / "m.onnx", tmp_path)
    linears = sum(ops[k] for k in ("QGemm", "MatMulIntegerToFloat", "QLinearMatMul"))
    assert linears == 2 and ops["QLinearConv"] == 1 and not (ops["Gemm"] or ops["MatMul"]), ops
    assert ops["Conv"] + ops["FusedConv"] == 1, ops  # (conv2, whose output leaves the graph in float)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    for y, ref in zip(got, g.run(*args)):
        ref = ref.numpy()
        assert np.abs(y - ref).max() <= 0.02 * np.abs(ref).max(), np.abs(y - ref).max()


def test_quantized_biases_move_at_most_half_an_accumulator_step():
    """quantize_biases: the int32 bias times its scale (input scale x the weight's per-channel scales) is the float
    bias within half a step; a bias too large for int32 stays float."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.targets.onnx.qdq import quantize_biases
    rng = np.random.default_rng(0)
    w_scale = rng.uniform(0.001, 0.01, 4).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    wq = rng.integers(-127, 127, (4, 3, 1, 1)).astype(np.int8)

    def model(b):
        inits = [numpy_helper.from_array(wq, "wq"),
                 numpy_helper.from_array(w_scale, "ws"), numpy_helper.from_array(np.zeros(4, np.int8), "wz"),
                 numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
                 numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
                 helper.make_node("Conv", ["xd", "wd", "b"], ["y"])]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    m = model(bias)
    assert quantize_biases(m) == 1
    onnx.checker.check_model(m)
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    step = init["b_i32_scale"]
    assert init["b_i32"].dtype == np.int32 and "b" not in init
    np.testing.assert_allclose(step, 0.05 * w_scale, rtol=1e-6)
    assert np.all(np.abs(init["b_i32"] * step - bias) <= 0.5 * step * (1 + 1e-5))
    x = rng.normal(size=(1, 3, 4, 4)).astype(np.float32)
    ref = ort.InferenceSession(model(bias).SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert np.abs(got[0] - ref[0]).max() <= float(step.max())
    assert quantize_biases(model(np.full(4, 1e9, np.float32))) == 0  # 1e9 / 5e-5 does not fit int32


def test_zero_pads_fold_into_the_convs_they_feed_through_quantize():
    """fold_pads_into_convs: ReLU6 -> Pad (TF "SAME", bottom/right only) -> Q -> DQ -> Conv becomes ReLU6 -> Q -> DQ
    -> Conv with the pad in its `pads`, with the same outputs (a zero pad quantizes to the zero point); a Pad with a
    non-zero value, or read by anything but the Q -> DQ -> Conv chain, stays."""
    from onnx import TensorProto, helper, numpy_helper

    from graphopt.targets.onnx.qdq import fold_pads_into_convs
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)

    def model(value=0.0, extra_reader=False):
        inits = [numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "pads"),
                 numpy_helper.from_array(np.float32(value), "pv"), numpy_helper.from_array(w, "w"),
                 numpy_helper.from_array(np.float32(6 / 255), "s"), numpy_helper.from_array(np.int8(-128), "z"),
                 numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
        nodes = [helper.make_node("Clip", ["x", "lo", "hi"], ["r"]),
                 helper.make_node("Pad", ["r", "pads", "pv"], ["p"], mode="constant"),
                 helper.make_node("QuantizeLinear", ["p", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"]),
                 helper.make_node("Conv", ["d", "w"], ["y"], strides=[2, 2])]
        outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
        if extra_reader:
            nodes.append(helper.make_node("Relu", ["p"], ["y2"]))
            outs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, None))
        shapes = [helper.make_tensor_value_info(n, t, [1, 3, 9, 9]) for n, t in (("p", TensorProto.FLOAT),
                  ("q", TensorProto.INT8), ("d", TensorProto.FLOAT))]  # (as the exporter records them)
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                                  outs, inits, value_info=shapes)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])

    x = {"x": rng.normal(0, 4, size=(1, 3, 8, 8)).astype(np.float32)}
    ref = ort.InferenceSession(model().SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    m = model()
    assert fold_pads_into_convs(m) == 1
    assert [n.op_type for n in m.graph.node] == ["Clip", "QuantizeLinear", "DequantizeLinear", "Conv"]
    conv = m.graph.node[-1]
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[0, 0, 1, 1]]
    assert not m.graph.value_info  # the padded shapes recorded for p, q, d no longer hold (ORT trusted them)
    got = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert got.shape == ref.shape == (1, 4, 4, 4)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert fold_pads_into_convs(model(value=1.0)) == 0
    assert fold_pads_into_convs(model(extra_reader=True)) == 0


def test_onnx_export_names_the_interface_without_clashing_with_internal_values(tmp_path):
    """A tiny GPT-2's output is named 'view_23' in the graph, which the exporter also gave an unrelated Reshape's
    output when asked for that name: two definitions, and the export failed ONNX's check. The interface is now
    named after export, an internal value holding the name moved aside; the export runs in ORT as the graph."""
    import onnx
    from hf_tiny import tiny_decoder

    from graphopt.targets.onnx.export import export_onnx
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    g = graphopt.trace(tiny_decoder("gpt2").eval(), (ids,))
    export_onnx(g, tmp_path / "m.onnx")
    m = onnx.load(str(tmp_path / "m.onnx"))
    assert [o.name for o in m.graph.output] == [s.name for s in g.outputs]
    assert [i.name for i in m.graph.input] == [s.name for s in g.inputs]
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {g.inputs[0].name: ids.numpy()})
    for y, ref in zip(got, g.run(ids)):
        np.testing.assert_allclose(y, ref.numpy(), rtol=1e-4, atol=1e-4)


class _Heads(torch.nn.Module):
    """Reshapes into heads and back around two linears: the exporter makes up shape constants ("val_N") for it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        h = self.a(x).reshape(1, 8, 4, 8).transpose(1, 2).reshape(1, 8, 32)
        return self.b(torch.relu(h))


def test_an_onnx_model_torch_exported_imports_and_exports_again(tmp_path):
    """A model torch's ONNX exporter wrote (the zoo's MiniLM as ONNX, ONNX Runtime's quantize_dynamic of one) names
    its initializers "val_N"; imported, they became parameters of those names, and exporting again failed on the
    exporter's own "val_N" constants ("Initializer 'val_123' is already registered"). And a uint8 table dequantized
    (quantize_dynamic's Gather) exported with an int8 zero point, which ONNX Runtime refused to load."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 32)
    first = tmp_path / "first.onnx"
    torch.onnx.export(_Heads().eval(), (x,), str(first), dynamo=True, input_names=["x"], output_names=["y"])
    import onnx
    inits = [i.name for i in onnx.load(str(first)).graph.initializer]
    g = graphopt.load_onnx(first)
    names = {n.target for n in g.nodes("get_attr")}
    assert any(n.startswith("val_") for n in inits) and names & set(inits)
    again = graphopt.compile(g, "onnx", output=tmp_path / "again")
    got = ort.InferenceSession(str(again / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got[0], g.run(x)[0].numpy(), rtol=1e-5, atol=1e-5)
    assert {n.target for n in g.nodes("get_attr")} == names  # (the caller's graph keeps its names)


class _Head(torch.nn.Module):
    """A depthwise conv and a one-row classifier: the layers graphopt's own kernels read without u8 x s8 pairs."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 1)
        self.dw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, img):
        return self.fc(torch.relu(self.dw(torch.relu(self.conv(img)))).mean((2, 3)))


def test_int8_weights_that_saturate_onnxruntime_are_named_and_auto_for_onnx_bounds_them(tmp_path, caplog):
    """ONNX Runtime's u8 x s8 kernels add pairs of products in int16 on x86 CPUs without VNNI: a graph quantized
    at full-range int8 exported, and ORT's outputs there drifted from the graph's (MobileNetV2: 17.9 dB SQNR in
    graphopt's kernels, 9.2 dB in ORT on a Zen 3). The export names those weights (warning, manifest, report);
    quantize{weights=auto} optimized for target 'onnx' takes int8s on every layer ORT pairs (the one-row classifier
    too, which graphopt's own kernels read without pairs; not the depthwise conv) and ORT runs it as the graph."""
    import logging

    from graphopt.report import compile_report
    torch.manual_seed(0)
    net = _Head().eval()
    for layer in (net.conv, net.fc):  # (same-sign neighbours of full magnitude: pairs past 128 at int8)
        layer.weight.data = layer.weight.data.abs() + 0.5
    args = (torch.rand(1, 8, 6, 6),)
    data = [(torch.rand(1, 8, 6, 6),) for _ in range(4)]
    g = graphopt.trace(net, args)
    full = graphopt.optimize(g, "quantize{weights=int8}", data=data)
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        out = graphopt.compile(full, "onnx", output=tmp_path / "int8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["target_info"]["ort_pair_saturation"]) == {"conv_weight_q", "fc_weight_q"}
    assert "onnx export: 2 int8 weight(s) (conv_weight_q, fc_weight_q) have pairs past 128" in caplog.text
    assert "ORT int8   2 int8 weight(s) with pairs past 128" in compile_report(g, full, out, manifest, None, None)

    bounded = graphopt.optimize(g, "quantize{weights=auto}", data=data, target="onnx")
    assert bounded.meta["weight_bits"] == {"conv2d": "int8s", "conv2d_1": "int8", "linear": "int8s"}
    kept = graphopt.optimize(g, "quantize{weights=int8s}", data=data, target="llvm")
    assert kept.meta["weight_bits"]["linear"] == "int8"  # (graphopt's one-row linear is a weight stream: no pairs)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="graphopt"):
        out = graphopt.compile(bounded, "onnx", output=tmp_path / "int8s")
    assert "onnx export" not in caplog.text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target_info"]["ort_pair_saturation"] == {}
    assert "ORT int8" not in compile_report(g, bounded, out, manifest, None, None)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: args[0].numpy()})[0]
    ref = bounded.run(*args)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-3 * np.abs(ref).max(), np.abs(got - ref).max()


def _qdq_conv(w: np.ndarray, group: int = 1):
    """x -> QuantizeLinear -> DequantizeLinear -> Conv(DequantizeLinear(int8 w)) -> QuantizeLinear -> Dequantize."""
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(w.astype(np.int8), "w"), numpy_helper.from_array(
        np.full(w.shape[0], 0.01, np.float32), "ws"), numpy_helper.from_array(np.zeros(w.shape[0], np.int8), "wz")]
    inits += [numpy_helper.from_array(np.array(v, dt), n) for n, v, dt in
              (("xs", 1 / 127, np.float32), ("xz", 0, np.int8), ("ys", 0.5, np.float32), ("yz", 0, np.int8))]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["yc"], group=group, name="conv"),
             helper.make_node("QuantizeLinear", ["yc", "ys", "yz"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]
    cin = w.shape[1] * group
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_onnxruntime_pairs_conv_weights_flattened_channels_last():
    """ORT's conv pairs consecutive weights of the filter flattened (kh, kw, c): with 3 input channels a pair
    crosses taps (channel 2 of one tap with channel 0 of the next). Crafted weights whose channel pairs at a tap
    cancel but whose cross-tap pairs add to 200 are named; the same magnitudes alternating along the flattened
    order are not, nor is a depthwise conv (its own kernel) or anything within 128. The graph's int8s scales bound
    both pairings."""
    from graphopt.ir.quant_ops import PAIR_BOUND, flat_pairs, pair_bounded_scales, weight_pairs, worst_pair_sums
    from graphopt.targets.onnx.qdq import ort_saturating_layers
    cross = np.zeros((4, 3, 3, 3))
    cross[:, 0], cross[:, 1], cross[:, 2] = 100, -100, 100
    alternating = (np.arange(27).reshape(3, 3, 3).transpose(2, 0, 1) % 2 * 2 - 1) * 100.0  # [c, kh, kw]
    alternating = np.broadcast_to(alternating, (4, 3, 3, 3))
    cases = [(_qdq_conv(cross), {"w": 200}), (_qdq_conv(alternating), {}),
             (_qdq_conv(np.full((8, 1, 3, 3), 100.0), group=8), {}), (_qdq_conv(np.full((4, 3, 3, 3), 42.0)), {})]
    for model, named in cases:
        assert ort_saturating_layers(model) == named
        # where this CPU's ORT does saturate (x86 without VNNI), it is exactly on the named layers
        blob = model.SerializeToString()
        x = {"x": np.ones((1, model.graph.input[0].type.tensor_type.shape.dim[1].dim_value, 6, 6), np.float32)}
        fused = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, x)[0]
        exact = ort.InferenceSession(blob, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=["QDQSelectorActionTransformer"]).run(None, x)[0]
        assert named or np.abs(fused - exact).max() == 0
    w = torch.from_numpy(cross).float()
    assert int(worst_pair_sums(weight_pairs(w)).max()) == 100  # graphopt's pairing alone would keep the step
    scales = pair_bounded_scales(w, torch.full((4,), 100 / 127))
    q = torch.round(w / scales[:, None, None, None])
    assert int(worst_pair_sums(flat_pairs(q)).max()) <= PAIR_BOUND
    assert int(worst_pair_sums(weight_pairs(q)).max()) <= PAIR_BOUND


class _Residual(torch.nn.Module):
    """Two inverted-residual-style blocks: expand, depthwise, project, + the block's input (MobileNetV2's adds)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(
            torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU6(), torch.nn.Conv2d(16, 16, 3, padding=1, groups=16),
            torch.nn.ReLU6(), torch.nn.Conv2d(16, 8, 1)) for _ in range(2))
        self.head = torch.nn.Conv2d(8, 12, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def test_residual_adds_quantized_for_onnxruntime_run_in_integer_end_to_end(tmp_path, monkeypatch):
    """For target onnx, quantize puts residual adds on int8 grids (adds=auto) and the export moves activation grids
    to uint8 (zero point + 128: the same numbers): ONNX Runtime then runs every conv but the last as QLinearConv and
    the adds as QLinearAdd (MobileNetV2's export: 0.79x ORT fp32's time, was 1.14x, as its own U8S8 file's 0.73x).
    For graphopt's kernels (llvm) the adds stay float, where quantizing them bought no speed."""
    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    net = _Residual().eval()
    x = torch.rand(1, 3, 8, 8)
    data = [(torch.rand(1, 3, 8, 8),) for _ in range(8)]
    g = graphopt.trace(net, (x,))
    onnx_q = graphopt.optimize(g, "quantize{weights=auto}", data=data, target="onnx")
    cpu_q = graphopt.optimize(g, "quantize{weights=auto}", data=data, target="llvm")
    count = {k: sum(str(n.target) == "graphopt.quantize_per_tensor.default" for n in q.gm.graph.nodes)
             for k, q in (("onnx", onnx_q), ("llvm", cpu_q))}
    assert count == {"onnx": 10, "llvm": 8}, count  # (+ each add's projection input and the last add's output)
    export_onnx(onnx_q, tmp_path / "m.onnx")
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(tmp_path / "m.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert {inits[n.input[2]].dtype.name for n in model.graph.node if n.op_type == "QuantizeLinear"} == {"uint8"}
    ops = _ort_ops(tmp_path / "m.onnx", tmp_path)
    assert ops["QLinearAdd"] == 2 and ops["QLinearConv"] == 7 and not ops["Add"], ops
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL

    def as_written(path):  # (ONNX's definitions, every fusion off)
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    import graphopt.targets.onnx.qdq as qdq
    monkeypatch.setattr(qdq, "activations_to_uint8", lambda m: 0)  # the same export with int8 grids
    export_onnx(onnx_q, tmp_path / "s8.onnx")
    s8 = onnx.load(str(tmp_path / "s8.onnx"))
    s8_inits = {i.name: numpy_helper.to_array(i) for i in s8.graph.initializer}
    assert {s8_inits[n.input[2]].dtype.name for n in s8.graph.node if n.op_type == "QuantizeLinear"} == {"int8"}
    np.testing.assert_array_equal(as_written(tmp_path / "m.onnx"), as_written(tmp_path / "s8.onnx"))
    ref = onnx_q.run(x)[0].numpy()  # (the int32 biases: within the grid's rounding of the graph's)
    np.testing.assert_allclose(as_written(tmp_path / "m.onnx"), ref, rtol=0, atol=0.01 * np.abs(ref).max())
    fused = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(fused.run(None, {"x": x.numpy()})[0] - ref).max() <= 0.05 * np.abs(ref).max()
    # asked for on graphopt's kernels (adds=true), the quantized adds compile and match too
    cpu_adds = graphopt.optimize(g, "quantize{adds=true},fold-qdq", data=data, target="llvm")
    art = graphopt.load(graphopt.compile(cpu_adds, "llvm", output=tmp_path / "cpu"))
    want = cpu_adds.run(x)[0].numpy()
    assert np.abs(art(x.numpy())[0] - want).max() <= 0.02 * np.abs(want).max()


def test_onnxruntime_failing_on_an_input_is_an_error_naming_the_export(tmp_path):
    """A gather index out of range (not an embedding table's ids, which the manifest bounds-checks): ORT fails
    inside the run; graphopt.load's export says which file failed and ORT's first line (it was ORT's own exception
    type, a traceback from the CLI)."""
    import onnx
    from onnx import TensorProto, helper
    from graphopt.errors import GraphoptError
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph([helper.make_node("Gather", ["x", "i"], ["y"], axis=1)], "g", [x, i],
                                                [y]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "gather.onnx"))
    art = graphopt.load(graphopt.compile(graphopt.load_model(tmp_path / "gather.onnx"), "onnx", output=tmp_path / "a"))
    ones = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(art(ones, np.array([0, 3, 1]))[0], np.ones((2, 3), np.float32))
    with pytest.raises(GraphoptError, match="ONNX Runtime failed running '.*model.onnx'"):
        art(ones, np.array([0, 9, 1]))


def test_an_export_past_2gb_puts_its_weights_beside_it(tmp_path, monkeypatch, caplog):
    """Past protobuf's 2 GB one .onnx cannot hold a model: the export failed "to serialize proto" (a traceback
    from `graphopt opt big.onnx -o out.onnx` on a 2.1 GB linear). Its weights go to `model.onnx.data` beside it
    (ONNX's external data), readable by every user as model.onnx is, with the batch kept dynamic and checked, and
    the artifact checks that file too. (The limits lowered stand in for the 2 GB.)"""
    import logging
    import onnx
    from graphopt.errors import ArtifactError
    from graphopt.targets.onnx import export as ex
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)).eval()
    torch.onnx.export(model, (torch.randn(2, 64),), str(tmp_path / "in.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "N"}, "y": {0: "N"}})
    g = graphopt.load_model(tmp_path / "in.onnx")
    monkeypatch.setattr(ex, "SINGLE_FILE_LIMIT", 16 << 10)
    monkeypatch.setattr(ex, "EXTERNAL_TENSOR_BYTES", 4 << 10)
    with caplog.at_level(logging.WARNING):
        out = graphopt.compile(g, "onnx", output=tmp_path / "a")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert "takes batch" not in caplog.text
    for name in ("model.onnx", "model.onnx.data"):
        assert (out / name).stat().st_mode & 0o044 == 0o044, name
    inline = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert {t.name for t in inline.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}  # weights out
    assert (out / "model.onnx").stat().st_size < (out / "model.onnx.data").stat().st_size
    x = torch.randn(3, 64)
    y = ort.InferenceSession(str(out / "model.onnx")).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(y, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(graphopt.load(out)(x.numpy())[0], y, rtol=1e-6, atol=1e-6)
    data = (out / "model.onnx.data").read_bytes()
    (out / "model.onnx.data").write_bytes(data[:-4])
    with pytest.raises(ArtifactError, match="model.onnx.data' is damaged"):
        graphopt.load(out)
    # opt -o FILE.onnx writes the pair as well, and leaves no staging folder
    ex.export_onnx(g, tmp_path / "o" / "m.onnx")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["m.onnx", "m.onnx.data"]


def test_a_0_d_input_reaches_every_artifact_as_0_d(tmp_path):
    """A scalar input (a temperature, a threshold) beside a bool mask: the artifact's call made it 1-d on the way in
    (np.ascontiguousarray's ndim >= 1), and TVM refused it ("expect Tensor with ndim 0 but get 1")."""
    import onnx
    from onnx import TensorProto as T, helper
    v = helper.make_tensor_value_info
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Cast", ["m"], ["mf"], to=T.FLOAT),
             helper.make_node("Mul", ["xs", "mf"], ["y"])]
    graph = helper.make_graph(nodes, "g", [v("x", T.FLOAT, [2, 4]), v("s", T.FLOAT, []), v("m", T.BOOL, [2, 4])],
                              [v("y", T.FLOAT, [2, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "s.onnx"))
    g = graphopt.load_model(tmp_path / "s.onnx")
    x = np.random.default_rng(0).random((2, 4), np.float32)
    s, m = np.array(3.0, np.float32), np.array([[True, False, True, True], [False, True, False, True]])
    want = x * 3.0 * m
    np.testing.assert_allclose(g.run(x, s, m)[0].numpy(), want, rtol=1e-6)
    for target in ("llvm", "onnx", "pt2"):
        art = graphopt.load(graphopt.compile(g, target, output=tmp_path / target))
        np.testing.assert_allclose(art(x, s, m)[0], want, rtol=1e-6, err_msg=target)


def test_onnx_exports_of_an_input_passed_through_and_a_constant_output(tmp_path):
    """An ONNX model whose outputs include its input itself, or a constant: the export renamed the input's Identity
    to the input's name ('x' defined twice) or lost the constant ("Graph output 'c' is not an output of any node"),
    invalid models both. TVM and pt2 builds of them ran."""
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper
    v = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [v("x", T.FLOAT, [2, 3])],
                              [v("y", T.FLOAT, [2, 3]), v("x", T.FLOAT, [2, 3]), v("c", T.FLOAT, [3])],
                              [numpy_helper.from_array(np.arange(3, dtype=np.float32), "c")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "in.onnx"))
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    want = ort.InferenceSession(str(tmp_path / "in.onnx")).run(None, {"x": x})
    out = graphopt.compile(graphopt.load_model(tmp_path / "in.onnx"), "onnx", output=tmp_path / "a")
    sess = ort.InferenceSession(str(out / "model.onnx"))
    assert [o.name for o in sess.get_outputs()] == ["y", "x", "c"]
    for got, ref in zip(sess.run(None, {"x": x}), want):
        np.testing.assert_array_equal(got, ref)


class _ScatterMean(torch.nn.Module):
    def __init__(self, include_self):
        super().__init__()
        self.include_self = include_self
        self.register_buffer("dst", torch.randint(0, 25, (60,), generator=torch.Generator().manual_seed(0)))

    def forward(self, h):
        idx = self.dst[:, None].expand(-1, h.shape[1])
        return h.scatter_reduce(0, idx, h[:60] * 0.5 + 1, "mean", include_self=self.include_self)


@pytest.mark.parametrize("include_self", [True, False])
def test_onnx_export_of_a_scatter_mean_runs_in_onnxruntime_as_pytorch(tmp_path, include_self):
    """scatter_reduce(mean) goes out as a sum over a count scattered the same way (torch's exporter's own form
    gave other values: error 1.4-2.0); rows no index names keep self's."""
    import onnxruntime as ort

    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    h = torch.randn(80, 8)
    model = _ScatterMean(include_self).eval()
    path = export_onnx(graphopt.trace(model, (h,)), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: h.numpy()})[0]
    np.testing.assert_allclose(got, model(h).numpy(), rtol=1e-6, atol=1e-6)


def test_onnx_export_of_logcumsumexp_warns_naming_the_node(tmp_path, caplog):
    """torch's exporter shifts logcumsumexp by its axis's maximum (far prefixes underflow to -inf in the ONNX
    model): the export says so, naming the node."""
    import logging

    from graphopt.targets.onnx.export import export_onnx

    class Scan(torch.nn.Module):
        def forward(self, x):
            return torch.logcumsumexp(x, 1)
    with caplog.at_level(logging.WARNING, logger="graphopt.targets.onnx.export"):
        export_onnx(graphopt.trace(Scan().eval(), (torch.randn(2, 30),)), tmp_path / "m.onnx")
    assert any("logcumsumexp" in r.getMessage() and "-inf" in r.getMessage() for r in caplog.records)


class _RowAdds(torch.nn.Module):
    """index_add (dim, alpha) and index_put(accumulate=True), 4000 rows into 100: repeated indices throughout."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.register_buffer("dst", torch.randint(0, 100, (4000,), generator=torch.Generator().manual_seed(1)))

    def forward(self, h):
        if self.op == "index_add":
            return torch.zeros(100, 16).index_add(0, self.dst, h, alpha=0.5)
        if self.op == "index_add_dim1":
            return torch.zeros(16, 100).index_add(1, self.dst, h.t())
        if self.op == "index_put_row":  # values broadcast over the rows
            return torch.zeros(100, 16).index_put((self.dst,), h[0], accumulate=True)
        return torch.zeros(100, 16).index_put((self.dst,), h, accumulate=True)


@pytest.mark.parametrize("op", ["index_add", "index_add_dim1", "index_put", "index_put_row"])
def test_onnx_export_of_row_adds_runs_in_onnxruntime_threads_as_pytorch(tmp_path, op):
    """Row adds go out as ScatterElements(add) over an expanded index: torch's exporter's ScatterND(add) races in
    ONNX Runtime's threads over repeated indices (error 3.3 at 2 threads on 20000 rows into 2000)."""
    import onnx
    import onnxruntime as ort

    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    h = torch.randn(4000, 16)
    model = _RowAdds(op).eval()
    path = export_onnx(graphopt.trace(model, (h,)), tmp_path / "m.onnx")
    kinds = {(n.op_type, next((a.s.decode() for a in n.attribute if a.name == "reduction"), ""))
             for n in onnx.load(str(path)).graph.node if n.op_type.startswith("Scatter")}
    assert kinds == {("ScatterElements", "add")}, kinds
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        got = sess.run(None, {sess.get_inputs()[0].name: h.numpy()})[0]
        np.testing.assert_allclose(got, model(h).numpy(), rtol=1e-5, atol=1e-5)


class _ExporterGaps(torch.nn.Module):
    """Ops torch's ONNX exporter has no function for, or refuses in the form a model writes them."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.randn(7, 6))
        self.bag = torch.nn.EmbeddingBag(40, 6, mode="max", padding_idx=2)
        self.bag_w = torch.nn.EmbeddingBag(40, 6, mode="sum")

    def forward(self, x, ids, flat, offsets, w):
        d = torch.cdist(x, self.p, p=1.0) + torch.cdist(x, self.p) + torch.cdist(x, self.p, p=3.0)  # cdist
        r = torch.nn.functional.rrelu(x, training=False)  # rrelu in eval mode
        pooled = torch.nn.functional.adaptive_max_pool2d(x[None], (3, 4))[0]  # windows of uneven sizes
        bound = x - x.abs().amax()  # amax over every dim
        order = torch.sort(x, dim=1, descending=True, stable=True).values
        scans = torch.cummax(x, 1).values + torch.cummin(x, 0).values
        bags = self.bag(ids) + self.bag_w(flat, offsets, per_sample_weights=w)  # bags of a row; offsets, weights
        return d, r, pooled, bound, order, scans, bags


def test_onnx_export_of_ops_the_exporter_lacks_runs_in_onnxruntime_as_pytorch(tmp_path):
    """torch.cdist (p = 1, 2, 3), rrelu in eval mode, adaptive max pooling, amax over every dim, a stable sort,
    cummax / cummin values and nn.EmbeddingBag (max with padding_idx over rows, sum with offsets, an empty bag and
    per-sample weights) compiled with graphopt but failed `--target onnx` ("No ONNX function found for
    aten._cdist_forward"; EmbeddingBag: an invalid model). They go out decomposed (targets/onnx/decompose.py) and
    ONNX Runtime computes PyTorch's outputs. cummax's indices read are still refused, naming the op and node."""
    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    model = _ExporterGaps().eval()
    ids = torch.randint(0, 40, (3, 5))
    ids[0] = 2  # a bag of padding only: zeros
    ids[1, 1] = 2
    args = (torch.randn(5, 6), ids, torch.randint(0, 40, (9,)), torch.tensor([0, 4, 4]), torch.rand(9))
    path = export_onnx(graphopt.trace(model, args), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    with torch.no_grad():
        want = model(*args)
    assert len(got) == len(want) == 7
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)

    class Indices(torch.nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1).indices
    with pytest.raises(graphopt.errors.TargetError, match=r"no ONNX function for aten\.cummax.*\(node 'cummax'\)"):
        export_onnx(graphopt.trace(Indices().eval(), (torch.randn(2, 5),)), tmp_path / "i.onnx")
    assert not (tmp_path / "i.onnx").exists()


class _MoreExporterGaps(torch.nn.Module):
    """cumprod, median (along a dim and of everything), kthvalue and adaptive average pooling over a volume."""

    def forward(self, x, vol):
        scan = torch.cumprod(x, 1)
        middle = x.median(1).values + x.kthvalue(2, 1, keepdim=True).values.squeeze(1) + x.median()
        return scan, middle, torch.nn.functional.adaptive_avg_pool3d(vol, (2, 3, 2))  # uneven windows


def test_onnx_export_of_scans_order_statistics_and_volume_pooling_runs_as_pytorch(tmp_path):
    """cumprod ("no ONNX function for prims.prod"), median, kthvalue and adaptive_avg_pool3d had no function in
    torch's exporter; they go out as a log-step scan, a sort and separable window means, and ONNX Runtime gives
    PyTorch's values (median's indices read stay refused, naming the op). An LSTM with projections (proj_size),
    which the exporter wrote as a model ONNX Runtime refused to run (one layer) or to load (two), is refused at
    export naming the op and node, and nothing is written."""
    from graphopt.targets.onnx.export import export_onnx
    torch.manual_seed(0)
    args = (torch.rand(3, 7) + 0.5, torch.randn(1, 2, 5, 7, 4))
    model = _MoreExporterGaps().eval()
    path = export_onnx(graphopt.trace(model, args), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    for g, w in zip(got, model(*args)):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-6)

    class Where(torch.nn.Module):
        def forward(self, x):
            return x.median(1).indices
    with pytest.raises(graphopt.errors.TargetError, match=r"no ONNX function for aten\.median"):
        export_onnx(graphopt.trace(Where().eval(), (torch.randn(2, 5),)), tmp_path / "w.onnx")

    class Projected(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(6, 8, proj_size=4, batch_first=True)

        def forward(self, x):
            return self.lstm(x)[0]
    with pytest.raises(graphopt.errors.TargetError, match=r"aten\.lstm\.input \(node 'lstm'\): .*proj_size"):
        export_onnx(graphopt.trace(Projected().eval(), (torch.randn(2, 5, 6),)), tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()

def test_an_exported_model_that_fails_shape_inference_is_refused_naming_the_op_it_came_from():
    """onnx's checker alone passed models that ONNX Runtime refused to load (a Concat of ranks 1 and 2, as torch's
    exporter wrote a projected LSTM); the export check runs shape inference too, and the error names the graph op
    and node the failing ONNX node was exported from (the exporter's fx_node record)."""
    import onnx
    from onnx import TensorProto, helper

    from graphopt.targets.onnx.export import _check_model
    node = helper.make_node("Concat", ["a", "b"], ["y"], name="node_Concat_7", axis=0)
    node.metadata_props.add(key="pkg.torch.onnx.fx_node",
                            value="%lstm : [num_users=1] = call_function[target=torch.ops.aten.lstm.input](args = ())")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2]),
                                            helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)  # (what passed before)
    with pytest.raises(graphopt.errors.TargetError, match=r"invalid model \(torch's ONNX for aten\.lstm\.input "
                                                          r"\(node 'lstm'\)\): .*Concat.*--target llvm"):
        _check_model(model)

class _Binning(torch.nn.Module):
    """Quantile binning: searchsorted left / right / batched / int32 and bucketize."""

    def __init__(self):
        super().__init__()
        self.register_buffer("edges", torch.tensor([-1.0, -0.5, 0.0, 0.0, 0.5, 1.0]))

    def forward(self, x, rows):
        left = torch.searchsorted(self.edges, x)
        right = torch.searchsorted(self.edges, x, side="right")
        batched = torch.searchsorted(rows, x, out_int32=True)  # rows [2, 6] of boundaries against x [2, 7]
        return left, right, batched, torch.bucketize(x, self.edges, right=True)


def test_onnx_export_of_searchsorted_and_bucketize_bins_as_pytorch(tmp_path):
    """torch.searchsorted had no ONNX function ("no ONNX function for aten.searchsorted.Tensor"): it goes out as a
    comparison with every boundary, summed. ONNX Runtime gives PyTorch's bins exactly, values on a boundary (left
    and right differ there), duplicated boundaries, NaN (past every boundary), batched boundaries and int32
    included."""
    from graphopt.targets.onnx.export import export_onnx
    x = torch.tensor([[-2.0, -1.0, -0.7, 0.0, 0.3, 1.0, float("nan")], [0.5, 2.0, -0.5, 0.25, -3.0, 0.0, 1.5]])
    rows = torch.sort(torch.randn(2, 6), -1).values
    model = _Binning().eval()
    path = export_onnx(graphopt.trace(model, (x, rows)), tmp_path / "b.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy(), "rows": rows.numpy()})
    want = model(x, rows)
    assert [g.dtype for g in got] == [np.int64, np.int64, np.int32, np.int64]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w.numpy())


class _MixedCat(torch.nn.Module):
    def forward(self, x):
        return (torch.cat([x, (x * 2).int(), x.half()], 0), torch.stack([x.long(), x.int()]),
                torch.cat([x.int(), x > 0]))


@pytest.mark.parametrize("target", ["llvm", "onnx"])
def test_cat_and_stack_of_several_dtypes_promote_as_pytorch(tmp_path, target):
    """torch.cat / stack promote mixed inputs (a decoder's stack of int64 and int32 pointers): TVM's concat had
    refused them ("Concat expects all input tensors to have the same dtype") and torch's exporter wrote a Concat
    of mixed types, an invalid ONNX model."""
    x = torch.tensor([-2.7, 0.4, 3.9])
    out = graphopt.compile(graphopt.trace(_MixedCat(), (x,)), target, output=tmp_path / target)
    if target == "onnx":
        sess = ort.InferenceSession(str(out / "model.onnx"))
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    else:
        got = graphopt.load(out)(x.numpy())
    for g, r in zip(got, _MixedCat()(x)):
        assert g.dtype == r.numpy().dtype
        np.testing.assert_array_equal(g, r.numpy())
