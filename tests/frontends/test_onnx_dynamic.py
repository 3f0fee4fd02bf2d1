"""ONNX Runtime's dynamically quantized files (quantize_dynamic: Hugging Face Optimum's and transformers.js's
model_quantized.onnx): DynamicQuantizeLinear, MatMulInteger, ConvInteger and com.microsoft's DynamicQuantizeMatMul
/ MatMulIntegerToFloat import with ONNX Runtime's results; each quantized layer becomes a float conv / linear of
graphopt.dynamic_quantize(x) and its int8 weight, which `quantize` makes static for fold-qdq's integer kernels.

ONNX Runtime is compared exactly only where its kernels are exact: uint8 x uint8 products. Its uint8 x int8
MatMulInteger on AVX2 CPUs without VNNI adds pairs of products in int16 (vpmaddubsw), which saturates, so there
the int8-weight files are held to ONNX Runtime's own distance from the float model instead."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from tests.frontends.quiet_export import export_legacy
from graphopt.errors import UnsupportedOpError


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.fc, self.fc2 = torch.nn.Linear(8 * 4 * 4, 10), torch.nn.Linear(10, 6, bias=False)

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x))).flatten(1)
        return self.fc2(torch.relu(self.fc(y)))


def _ort(path, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    tmp = tmp_path_factory.mktemp("dyn")
    torch.manual_seed(0)
    fp32 = tmp / "net.onnx"
    export_legacy(_Net().eval(), (torch.randn(1, 3, 8, 8),), fp32, input_names=["image"], output_names=["logits"],
                  opset_version=17)
    out = {"fp32": fp32}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, wt, pc in (("u8", QuantType.QUInt8, False), ("u8_pc", QuantType.QUInt8, True),
                             ("s8", QuantType.QInt8, False)):
            out[name] = tmp / f"{name}.onnx"
            quantize_dynamic(str(fp32), str(out[name]), weight_type=wt, per_channel=pc,
                             op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    return out, tmp


def _ops(g) -> Counter:
    return Counter(getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in g.nodes("call_function"))


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 8, 8)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("name", ["u8", "u8_pc"])
def test_dynamic_file_imports_as_layers_of_rounded_inputs_with_ort_results(files, name):
    paths, _ = files
    types = {n.op_type for n in onnx.load(str(paths[name])).graph.node}
    assert {"DynamicQuantizeLinear", "ConvInteger", "MatMulInteger", "Cast"} <= types and "Conv" not in types
    g = graphopt.load_onnx(paths[name])
    ops = _ops(g)
    # every layer is the float op of its rounded input and dequantized integer weight; the integer form is gone
    assert ops["dynamic_quantize"] == 4 and ops["conv2d"] == 2 and ops["linear"] == 2
    assert ops["dequantize_per_channel"] == 4 and not ops["amin"] and not ops["round"]
    for x in _images(3, 1):
        got, ref = g.run(torch.from_numpy(x))[0].numpy(), _ort(paths[name], {"image": x})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)  # the same integers, scaled


def test_int8_weight_file_is_at_least_as_close_to_the_float_model_as_ort(files):
    paths, _ = files
    g = graphopt.load_onnx(paths["s8"])
    assert _ops(g)["dynamic_quantize"] == 4
    for x in _images(3, 2):
        ref = _ort(paths["fp32"], {"image": x})[0]
        ours = np.abs(g.run(torch.from_numpy(x))[0].numpy() - ref).max()
        theirs = np.abs(_ort(paths["s8"], {"image": x})[0] - ref).max()
        assert ours <= theirs * 1.01 + 1e-6 and ours < 0.05 * np.abs(ref).max()


def _model(nodes, inputs, outputs, inits, path):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path))
    return path


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_dynamic_quantize_outputs_used_any_other_way_import_exactly(tmp_path):
    """Both MatMulInteger operands computed (no layer), and the codes, scale and zero point as graph outputs: the
    ops' own integer semantics."""
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("DynamicQuantizeLinear", ["y"], ["yq", "ys", "yz"]),
             helper.make_node("MatMulInteger", ["xq", "yq", "xz", "yz"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xs", "ys"], ["s"]),
             helper.make_node("Mul", ["accf", "s"], ["out"])]
    outs = [_f("out", [4, 5]), helper.make_tensor_value_info("xq", TensorProto.UINT8, [4, 6]),
            _f("xs", []), helper.make_tensor_value_info("xz", TensorProto.UINT8, [])]
    path = _model(nodes, [_f("x", [4, 6]), _f("y", [6, 5])], outs, {}, tmp_path / "mm.onnx")
    g = graphopt.load_onnx(path)
    rng = np.random.default_rng(3)
    for _ in range(3):
        x, y = rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 5)).astype(np.float32) + 0.5
        got = [t.numpy() for t in g.run(torch.from_numpy(x), torch.from_numpy(y))]
        ref = _ort(path, {"x": x, "y": y})
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
        assert got[1].dtype == np.uint8 and np.array_equal(got[1], ref[1])  # the codes
        assert float(got[2]) == pytest.approx(float(ref[2]), rel=1e-7) and int(got[3]) == int(ref[3])


def test_contrib_dynamic_matmuls_import_with_ort_results(tmp_path):
    rng = np.random.default_rng(4)
    w1, w2 = (rng.integers(0, 256, (6, 5), dtype=np.uint8) for _ in range(2))
    inits = {"w1": w1, "w1s": np.float32(0.02), "w1z": np.uint8(120), "b1": rng.standard_normal(5).astype(np.float32),
             "w2": w2, "w2s": np.float32(0.03), "w2z": np.uint8(131)}
    nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "w1", "w1s", "w1z", "b1"], ["h"], domain="com.microsoft"),
             helper.make_node("Concat", ["h", "h1"], ["h6"], axis=1),
             helper.make_node("DynamicQuantizeLinear", ["h6"], ["hq", "hs", "hz"]),
             helper.make_node("MatMulIntegerToFloat", ["hq", "w2", "hs", "w2s", "hz", "w2z"], ["out"],
                              domain="com.microsoft")]
    inits["h1"] = rng.standard_normal((3, 1)).astype(np.float32)
    path = _model(nodes, [_f("x", [3, 6])], [_f("out", [3, 5])], inits, tmp_path / "contrib.onnx")
    g = graphopt.load_onnx(path)
    ops = _ops(g)
    assert ops["dynamic_quantize"] == 2 and ops["linear"] == 2
    for _ in range(3):
        x = rng.standard_normal((3, 6)).astype(np.float32)
        np.testing.assert_allclose(g.run(torch.from_numpy(x))[0].numpy(), _ort(path, {"x": x})[0],
                                   rtol=1e-5, atol=1e-5)


def test_quantize_makes_the_dynamic_layers_static_and_fold_qdq_folds_them(files):
    paths, _ = files
    g = graphopt.load_onnx(paths["u8_pc"])
    calib = [(torch.from_numpy(x),) for x in _images(4, 5)]
    q = graphopt.optimize(g, "quantize,fold-qdq", data=calib)
    stats = [h["stats"] for h in q.meta["history"][-2:]]
    assert stats[0]["dynamic_made_static"] == 4 and stats[0]["weight_bits_kept"] == 4
    assert stats[0]["asymmetric_weights_made_symmetric"] >= 1  # uint8 weights: zero points near 128
    assert stats[1]["folded"] == 4 and not stats[1]["kept"]
    assert not _ops(q)["dynamic_quantize"]
    # a layer left out keeps its file's per-call rounding (and stays a float op)
    part = graphopt.optimize(g, "quantize{exclude=linear_1},fold-qdq", data=calib)
    assert part.meta["history"][-2]["stats"]["dynamic_made_static"] == 3 and _ops(part)["dynamic_quantize"] == 1
    assert part.meta["history"][-1]["stats"]["folded"] == 3
    for x in _images(3, 6):
        ref = g.run(torch.from_numpy(x))[0].numpy()
        err = q.run(torch.from_numpy(x))[0].numpy() - ref
        sqnr = 10 * np.log10((ref ** 2).sum() / (err ** 2).sum())
        # static int8 activations from 4 calibration images against per-call grids: 25-45 dB on these inputs
        assert sqnr > 20


def test_quantize_rounds_imported_int8_weights_to_a_requested_pair_width(files):
    """weights=int7 / int8s (what weights=auto takes on a CPU without VNNI) applies to the file's full-range int8
    weights where the pair kernels read them (the two convs, the grouped one per group; one-row linears keep
    int8). The default width (auto, int8s on such a CPU) rounds only float weights: the file's int8 stay as they
    are."""
    paths, _ = files
    g = graphopt.load_onnx(paths["s8"])
    calib = [(torch.from_numpy(x),) for x in _images(4, 5)]
    kept = graphopt.optimize(g, "quantize,fold-qdq", data=calib, cpu="znver3")
    assert kept.meta["history"][-2]["stats"]["kept_weights_rounded_to_pair_width"] == 0
    asked = graphopt.optimize(g, "quantize{weights=auto},fold-qdq", data=calib, cpu="znver3")
    assert asked.meta["history"][-2]["stats"]["kept_weights_rounded_to_pair_width"] == 2
    q = graphopt.optimize(g, "quantize{weights=int7},fold-qdq", data=calib)
    assert q.meta["history"][-2]["stats"]["kept_weights_rounded_to_pair_width"] == 2
    assert q.meta["weight_bits"] == {"conv2d": "int7", "conv2d_1": "int7"}
    assert q.meta["history"][-1]["stats"]["folded"] == 4
    conv = next(n for n in q.nodes("call_function") if getattr(n.target, "__name__", "") == "qconv2d.default")
    w = q.get_param(conv.args[3].target)
    assert int(w.min()) >= -64 and int(w.max()) <= 63 and int(w.abs().max()) > 60  # the int7 grid, used
    for x in _images(2, 6):
        ref = kept.run(torch.from_numpy(x))[0].numpy()
        assert np.abs(q.run(torch.from_numpy(x))[0].numpy() - ref).max() < 0.1 * np.abs(ref).max()


def test_dynamic_file_compiles_and_exports_as_it_is_and_says_how_to_get_int8_kernels(files, caplog):
    paths, tmp = files
    g = graphopt.load_onnx(paths["u8"])
    with caplog.at_level(logging.WARNING):
        art = graphopt.load(graphopt.compile(g, "llvm", output=tmp / "art"))
    assert "4 layer input(s) are quantized dynamically" in caplog.text and "quantize,fold-qdq" in caplog.text
    onnx_dir = graphopt.compile(g, "onnx", output=tmp / "export")  # as DynamicQuantizeLinear -> DequantizeLinear
    types = {n.op_type for n in onnx.load(str(onnx_dir / "model.onnx")).graph.node}
    assert "DynamicQuantizeLinear" in types
    for x in _images(2, 7):
        want = g.run(torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(art(x)[0], want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_ort(onnx_dir / "model.onnx", {"image": x})[0], want, rtol=1e-4, atol=1e-5)


def test_dynamic_quantized_lstm_is_refused_with_what_to_do(tmp_path):
    node = helper.make_node("DynamicQuantizeLSTM", ["x"], ["y"], domain="com.microsoft", name="lstm")
    path = _model([node], [_f("x", [1, 2, 4])], [_f("y", [1, 2, 4])], {}, tmp_path / "lstm.onnx")
    with pytest.raises(UnsupportedOpError, match=r"DynamicQuantizeLSTM.*quantize_dynamic"):
        graphopt.load_onnx(path)


def test_dynamic_quantize_of_a_non_float32_input_names_the_node(tmp_path):
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"], name="dql")
    outs = [helper.make_tensor_value_info("q", TensorProto.UINT8, [2, 3])]
    path = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 3])], outs, {},
                  tmp_path / "h.onnx")
    with pytest.raises(UnsupportedOpError, match=r"DynamicQuantizeLinear.*'dql'.*float32 input"):
        graphopt.load_onnx(path)


class _Tokens(torch.nn.Module):
    """A transformers.js-style block: linears over 8 tokens (the int8 GEMM's shape), a one-token head (its GEMV)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = torch.nn.Linear(64, 48), torch.nn.Linear(48, 32), torch.nn.Linear(32, 24)

    def forward(self, x):
        y = self.b(torch.relu(self.a(x)))
        return y, self.head(y[:, 0])


@pytest.fixture(scope="module")
def token_files(tmp_path_factory):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    tmp = tmp_path_factory.mktemp("tok")
    torch.manual_seed(1)
    fp32 = tmp / "tok.onnx"
    export_legacy(_Tokens().eval(), (torch.randn(1, 8, 64),), fp32, input_names=["x"], output_names=["y", "h"],
                  opset_version=17)
    out = {}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, wt, pc in (("s8", QuantType.QInt8, True), ("u8_pc", QuantType.QUInt8, True)):
            out[name] = tmp / f"{name}.onnx"
            quantize_dynamic(str(fp32), str(out[name]), weight_type=wt, per_channel=pc)
    return out, tmp


def _tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 8, 64)).astype(np.float32)


def test_default_compile_runs_int8_weight_linears_as_int8_kernels_on_the_per_call_grid(token_files, caplog):
    """fold-constants keeps a dynamically quantized linear's int8 weight integer (folded, the artifact stored it as
    float: MiniLM 22.7 -> 54.7 MB), and the CPU target runs the layer as ONNX Runtime's MatMulInteger does: the
    per-call uint8 codes times the int8 weight on graphopt's int8 kernels (GEMM over tokens, GEMV for one row), the
    call's scale and zero point applied after. Equal to the float layer on the rounded input up to float rounding."""
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.host import cpu_target
    from graphopt.targets.tvm.lower import lower_to_relax
    paths, tmp = token_files
    g = graphopt.load_onnx(paths["s8"])
    opt = graphopt.optimize(g, "fold-bn,fold-pad,fold-constants,dce")
    skipped = opt.meta["history"][2]["stats"]["skipped"]
    assert len(skipped) == 3 and all("kept integer" in why for why in skipped.values())
    assert _ops(opt)["dequantize_per_channel"] == 3 and opt.stats().bytes < 0.4 * (64 * 48 + 48 * 32 + 32 * 24) * 4
    if int8_dot(cpu_target()) is None:
        pytest.skip("this CPU has no int8 kernels (AVX2 or newer)")
    funcs = {gv.name_hint for gv in lower_to_relax(opt).functions}
    assert sum(f.startswith("qgemm") for f in funcs) == 2 and sum(f.startswith("qgemv") for f in funcs) == 1
    with caplog.at_level(logging.INFO):
        art = graphopt.load(graphopt.compile(opt, "llvm", output=tmp / "art"))
    assert "3 linear(s) read inputs quantized dynamically" in caplog.text and "int8 kernels" in caplog.text
    # the command line's report says so
    from conftest import cli_main
    assert cli_main("compile", paths["s8"], "-o", tmp / "cli") == 0
    report = (tmp / "cli" / "report.txt").read_text()
    assert "dynamic    3 layer input(s) rounded onto each call's own uint8 grid" in report
    for s in range(3):
        x = _tokens(s)
        for got, want in zip(art(x), g.run(torch.from_numpy(x))):
            # (a value at a rounding boundary may take the next code: one step of a layer's grid)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-3 * np.abs(want.numpy()).max())


def test_uint8_weights_with_zero_points_run_dequantized_and_gpus_fold_the_kept_weights(token_files, caplog):
    from graphopt.passes.canonicalize.fold_constants import dequantize_kept_weights
    paths, tmp = token_files
    g = graphopt.load_onnx(paths["u8_pc"])
    opt = graphopt.optimize(g, "fold-constants")
    zps = [opt.get_param(n.args[2].target) for n in opt.nodes("call_function")
           if getattr(n.target, "__name__", "") == "dequantize_per_channel.default"]
    assert len(zps) == 3 and any(bool(z.any()) for z in zps)  # asymmetric: no int8 kernel takes them
    with caplog.at_level(logging.WARNING):
        art = graphopt.load(graphopt.compile(opt, "llvm", output=tmp / "u8"))
    assert "run as float ops on the rounded input" in caplog.text
    folded = dequantize_kept_weights(opt)  # what the cuda targets lower
    assert not _ops(folded)["dequantize_per_channel"] and _ops(opt)["dequantize_per_channel"] == 3
    for s in range(2):
        x = _tokens(s + 5)
        want = g.run(torch.from_numpy(x))
        for got, f, w in zip(art(x), folded.run(torch.from_numpy(x)), want):
            np.testing.assert_allclose(got, w.numpy(), rtol=1e-4, atol=1e-3 * np.abs(w.numpy()).max())
            np.testing.assert_allclose(f.numpy(), w.numpy(), rtol=1e-6, atol=1e-6)


def test_sparsifying_a_quantized_files_integer_weights_says_to_start_from_the_float_model(token_files):
    paths, _ = token_files
    opt = graphopt.optimize(graphopt.load_onnx(paths["s8"]), "fold-constants")
    with pytest.raises(graphopt.errors.GraphoptError, match=r"3 layer\(s\) \(linear, linear_1, linear_2\) read "
                                                            r"integer weights.*sparsify or prune the float model"):
        graphopt.optimize(opt, "sparsify{sparsity=0.5}")


def test_a_uint8_vocabulary_round_trips_through_onnx_export(tmp_path):
    """quantize_dynamic's Gather of a uint8 table and its DequantizeLinear import as stored (uint8, zero point 200);
    exported, the zero point had gone out as int8, and ONNX Runtime refused the model (DequantizeLinear binds the
    codes and the zero point to one type)."""
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (10, 4)).astype(np.uint8)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["rows"]),
             helper.make_node("DequantizeLinear", ["rows", "s", "z"], ["out"])]
    path = _model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])], [_f("out", [1, 3, 4])],
                  {"table": table, "s": np.array(0.05, np.float32), "z": np.array(200, np.uint8)},
                  tmp_path / "vocab.onnx")
    g = graphopt.load_onnx(path)
    out = graphopt.compile(g, "onnx", output=tmp_path / "export")
    ids = np.array([[0, 7, 9]], np.int64)
    want = (table[ids].astype(np.float32) - 200) * np.float32(0.05)
    np.testing.assert_allclose(g.run(torch.from_numpy(ids))[0].numpy(), want, rtol=1e-6)
    np.testing.assert_allclose(_ort(out / "model.onnx", {"ids": ids})[0], want, rtol=1e-6)


def test_dynamic_linears_export_in_onnx_runtimes_integer_form_where_its_kernels_are_exact(token_files, tmp_path):
    """quantize{activations=dynamic} exported to ONNX: linears whose weights pair within 128 along the reduction
    (int7; int8s, what weights=auto takes for target onnx) go out as ONNX Runtime's own quantize_dynamic form
    (MatMulInteger of the codes, Cast, Mul by both scales), which it fuses into one integer kernel (the dequantized
    form ran in float: MiniLM int8s 43 ms against 21, ORT's own dynamic file 21) and which is exact on any of its
    kernels; full-range int8 weights, which its AVX2 kernels saturate, stay dequantized."""
    paths, _ = token_files
    fp32 = paths["s8"].parent / "tok.onnx"
    g0 = graphopt.load_onnx(fp32)
    # (for llvm the one-row head keeps int8 at int7: graphopt has no pair kernel for it; ONNX Runtime pairs it)
    for width, target, integer in (("int7", "llvm", 2), ("int8", "llvm", 0), ("auto", "onnx", 3)):
        g = graphopt.optimize(g0, f"quantize{{activations=dynamic weights={width}}}", target=target)
        out = graphopt.compile(g, "onnx", output=tmp_path / width) / "model.onnx"
        types = Counter(n.op_type for n in onnx.load(str(out)).graph.node)
        assert types["MatMulInteger"] == integer and types["DynamicQuantizeLinear"] == 3, (width, types)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        for s in range(2):
            x = _tokens(40 + s)
            for got, want in zip(sess.run(None, {"x": x}), g.run(torch.from_numpy(x))):
                np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=2e-2 * np.abs(want.numpy()).max())


def test_dynamic_grids_are_coded_once_per_value_and_the_bias_adds_fold(files, tmp_path):
    """ONNX Runtime's dynamic CNN file through the default pipeline: each per-call grid is one graphopt kernel
    that computes the scale and zero point once (as Relax ops the scale's arithmetic, three float divisions, was
    redone for every value: MobileNetV2's file 9.0 -> 7.2 ms), writing the values a float conv reads or the codes
    an int8 linear reads, equal to the graph's; and fold-bn folds the Adds that hold the file's biases into the
    layers (conv epilogues add them: 7.2 -> 6.4 ms)."""
    from graphopt.targets.tvm.lower import lower_to_relax
    paths, _ = files
    g = graphopt.load_onnx(paths["u8"])
    folded = graphopt.optimize(g, "fold-bn,fold-pad,fold-constants,dce", warn_unchanged=False)
    assert folded.meta["history"][0]["stats"]["affine_ops"] == 3  # (the two convs and the first linear)
    assert _ops(folded)["add"] == 0 and _ops(g)["add"] == 3
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.host import cpu_target
    names = [gv.name_hint for gv in lower_to_relax(folded).functions]
    # fc's input as codes (fc2's 10: Relax ops) where fc (one row, 10 outputs) runs an int8 kernel: the quad
    # products pad its row to a tile; on AVX2 without VNNI the int16 GEMM needs whole row tiles, so fc stays float
    quads = int8_dot(cpu_target()) == "vnni"
    assert sum(n.startswith("dynamic_values_") for n in names) == 3 - quads, names  # the convs' inputs (and fc's)
    assert sum(n.startswith("dynamic_codes_") for n in names) == quads, names
    art = graphopt.load(graphopt.compile(folded, "llvm", output=tmp_path / "art"))
    for x in _images(3, 5):
        want = folded.run(torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(art(x)[0], want, rtol=1e-4, atol=1e-5)
        ref = _ort(paths["u8"], {"image": x})[0]  # the folded biases round a code apart now and then
        assert np.abs(want - ref).max() <= 0.02 * np.abs(ref).max()
