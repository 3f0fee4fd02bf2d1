"""ONNX Runtime's QOperator files (quantize_static(quant_format=QOperator), the format of the ONNX model zoo's int8
models: QLinearConv, QLinearMatMul and com.microsoft's QLinear* / QGemm, with Reshape, MaxPool, Resize, Pad ...
applied to the uint8 codes themselves) import onto graphopt's Q/DQ ops with ORT's results, and fold-qdq turns
every conv and linear in them into an integer op. (quantize_dynamic's files: test_onnx_dynamic.py.)"""
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
from onnx import helper

import graphopt
from tests.frontends.quiet_export import export_legacy
from graphopt.errors import UnsupportedOpError


class _Net(torch.nn.Module):
    """Every op ORT's QOperator quantizer rewrites: convs (one depthwise), leaky ReLU, residual add, concat,
    max pool, sigmoid, mul (also by a constant), average pool, nearest resize, zero pad, linears, softmax."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c3, self.c4 = torch.nn.Conv2d(16, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2)  # its input padded asymmetrically (see _fold_pad_into_conv)
        self.fc, self.fc2 = torch.nn.Linear(8, 10), torch.nn.Linear(10, 10)

    def forward(self, x):
        a = F.leaky_relu(self.c1(x), 0.1)
        b = torch.relu(self.c2(a)) + a
        c = F.max_pool2d(torch.cat([a, b], 1), 2)
        d = torch.sigmoid(self.c3(c)) * c[:, :8]
        d = F.interpolate(F.avg_pool2d(d, 2), scale_factor=2.0, mode="nearest")
        d = F.pad(self.c4(d), (1, 1, 1, 1))
        d = self.down(F.pad(d, (0, 1, 0, 1)))
        logits = self.fc2(self.fc(d.mean((2, 3))) * 4) * 4
        return logits, torch.softmax(logits, -1)


def _fold_pad_into_conv(model: onnx.ModelProto) -> None:
    """The Pad before `down` (F.pad(d, (0, 1, 0, 1)): one row and column at the end) as that Conv's asymmetric pads,
    as TF converters and graphopt's own ONNX export write it."""
    g = model.graph
    conv = next(n for n in g.node if n.op_type == "Conv" and n.input[1] == "down.weight")
    pad = next(n for n in g.node if n.op_type == "Pad" and n.output[0] == conv.input[0])
    for a in conv.attribute:
        if a.name == "pads":
            assert list(a.ints) == [0, 0, 0, 0]
            a.ints[:] = [0, 0, 1, 1]  # H, W begins; H, W ends
    conv.input[0] = pad.input[0]
    g.node.remove(pad)


def _reference(path, x):
    """ONNX Runtime with every optimization off (its optimized session agrees on these files)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so).run(None, {"image": x})


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from graphopt.bench import calibration_reader
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    tmp = tmp_path_factory.mktemp("qop")
    torch.manual_seed(0)
    fp32 = tmp / "net.onnx"
    export_legacy(_Net().eval(), (torch.randn(1, 3, 16, 16),), fp32, input_names=["image"],
                  output_names=["logits", "probs"], opset_version=13)
    model = onnx.load(str(fp32))
    _fold_pad_into_conv(model)
    onnx.save(model, str(fp32))
    rng = np.random.default_rng(0)
    feeds = [{"image": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(8)]
    out = {}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fmt, act in (("qop_u8", QuantFormat.QOperator, QuantType.QUInt8),
                               ("qop_s8", QuantFormat.QOperator, QuantType.QInt8),
                               ("qdq_u8", QuantFormat.QDQ, QuantType.QUInt8)):
            out[name] = tmp / f"{name}.onnx"
            # uint8 x int8 products: ORT's AVX2 kernel (no VNNI) adds pairs in int16, which saturates on 8-bit
            # weights; its reduce_range (7-bit weights, ORT's advice for such CPUs) keeps it exact on every CPU
            quantize_static(str(fp32), str(out[name]), calibration_reader(feeds),
                            quant_format=fmt, per_channel=True, reduce_range=act == QuantType.QUInt8,
                            activation_type=act, weight_type=QuantType.QInt8)
    return out, tmp


def _op_types(path):
    return {(n.domain + "." if n.domain else "") + n.op_type for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("name", ["qop_u8", "qop_s8"])
def test_qoperator_file_imports_with_ort_results_and_folds_every_layer(quantized, name):
    paths, tmp = quantized
    ops = _op_types(paths[name])
    # the file really is QOperator, with codes moved, pooled, resized and padded by plain ops
    assert {"QLinearConv", "com.microsoft.QGemm", "com.microsoft.QLinearAdd", "com.microsoft.QLinearConcat",
            "com.microsoft.QLinearSigmoid", "com.microsoft.QLinearMul", "com.microsoft.QLinearAveragePool",
            "com.microsoft.QLinearLeakyRelu", "com.microsoft.QLinearSoftmax", "MaxPool", "Resize", "Pad"} <= ops
    assert "Conv" not in ops and "Gemm" not in ops
    g = graphopt.load_onnx(paths[name])
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
        for got, ref in zip(g.run(torch.from_numpy(x)), _reference(paths[name], x)):
            np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=1e-6)  # same integers, same outputs
    q = graphopt.optimize(g, "fold-qdq")
    stats = q.meta["history"][-1]["stats"]
    assert stats["folded"] == 7 and not stats["kept"]  # 5 convs (the asymmetrically padded one too), 2 linears
    art = graphopt.load(graphopt.compile(q, "llvm", output=tmp / f"art_{name}"))
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    logits, ref = art(x)[0], _reference(paths[name], x)[0]
    step = float(np.diff(np.unique(ref)).min())  # the logits' quantization step
    assert np.abs(logits - ref).max() <= 3 * step  # integer kernels: ORT's integers up to a rounding flip or two


def test_asymmetric_conv_padding_keeps_a_qdq_conv_foldable(quantized):
    """A conv with pads [0, 0, 1, 1] reads a zero-padded copy of its input; in a QDQ file the pad is quantized
    again onto the input's grid (exact), so fold-qdq still sees a quantized input."""
    paths, _ = quantized
    g = graphopt.load_onnx(paths["qdq_u8"])
    x = np.random.default_rng(2).standard_normal((1, 3, 16, 16)).astype(np.float32)
    logits, ref = g.run(torch.from_numpy(x))[0].numpy(), _reference(paths["qdq_u8"], x)[0]
    # float ops between the Q/DQ pairs (average pool, mean) round differently from ORT's in the last bit, which
    # can flip a code: the logits agree up to a step or two
    assert np.abs(logits - ref).max() <= 2 * float(np.diff(np.unique(ref)).min())
    stats = graphopt.optimize(g, "fold-qdq").meta["history"][-1]["stats"]
    assert stats["folded"] == 7 and not stats["kept"]


def test_unknown_contrib_op_names_the_ones_that_import(tmp_path):
    node = helper.make_node("FusedGemm", ["image", "image"], ["y"], domain="com.microsoft", name="fused")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [2, 2])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 2])])
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13),
                                                      helper.make_opsetid("com.microsoft", 1)]), str(path))
    with pytest.raises(UnsupportedOpError, match=r"'com.microsoft.FusedGemm' at node 'fused'.*com.microsoft.QGemm"):
        graphopt.load_onnx(path)
