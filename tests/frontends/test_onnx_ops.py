"""Single-op ONNX models for the ops exporters write beyond the basics (transposed convs, resizes, PReLU, arg
reductions, instance norm, depth/space shuffles, top-k, cumsum, SELU family): graphopt's import against ONNX
Runtime, and the TVM build of the imported graph against both."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.errors import UnsupportedOpError

RNG = np.random.default_rng(0)


def _model(op, x_shape, out_shapes, inits=(), n_inputs=1, **attrs):
    """One node `op`(x, *inits) -> outputs y0, y1...; inits are (name, array) pairs (constant inputs, in order;
    None for an omitted optional input)."""
    names = ["x"] + [("" if a is None else n) for n, a in inits]
    tensors = [numpy_helper.from_array(a, n) for n, a in inits if a is not None]
    outs = [f"y{i}" for i in range(len(out_shapes))]
    node = helper.make_node(op, names[:n_inputs + len(inits)], outs, name="the_node", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(o, t, s) for o, (t, s) in zip(outs, out_shapes)],
                              initializer=tensors)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


F32, I64 = TensorProto.FLOAT, TensorProto.INT64
W_T = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # ConvTranspose weight [Cin, Cout/groups, kh, kw]
W_G = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
CASES = {
    "prelu": ("PRelu", [1, 3, 4, 4], [(F32, None)], [("slope", RNG.random((3, 1, 1)).astype(np.float32))], {}),
    "argmax": ("ArgMax", [2, 5, 3], [(I64, None)], [], {"axis": 1, "keepdims": 0}),
    "argmin_last": ("ArgMin", [2, 5, 3], [(I64, None)], [], {"axis": 2, "keepdims": 1, "select_last_index": 1}),
    "conv_t_stride2": ("ConvTranspose", [1, 4, 5, 5], [(F32, None)],
                       [("w", W_T), ("b", RNG.standard_normal(3).astype(np.float32))],
                       {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    "conv_t_groups_asym": ("ConvTranspose", [1, 4, 5, 6], [(F32, None)], [("w", W_G)],
                           {"group": 2, "pads": [0, 1, 1, 0], "strides": [1, 2]}),
    "conv_t_output_shape": ("ConvTranspose", [1, 4, 5, 5], [(F32, None)], [("w", W_T)],
                            {"strides": [2, 2], "output_shape": [10, 10]}),
    "resize_nearest": ("Resize", [1, 2, 3, 4], [(F32, None)],
                       [("roi", None), ("scales", np.array([1, 1, 2, 3], np.float32))],
                       {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}),
    "resize_linear_sizes": ("Resize", [1, 2, 5, 4], [(F32, None)],
                            [("roi", None), ("scales", None), ("sizes", np.array([1, 2, 9, 7], np.int64))],
                            {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}),
    "resize_linear_align": ("Resize", [1, 2, 3, 4], [(F32, None)],
                            [("roi", None), ("scales", np.array([1, 1, 2, 2], np.float32))],
                            {"mode": "linear", "coordinate_transformation_mode": "align_corners"}),
    "resize_cubic": ("Resize", [1, 2, 4, 4], [(F32, None)],
                     [("roi", None), ("scales", np.array([1, 1, 2, 2], np.float32))],
                     {"mode": "cubic", "coordinate_transformation_mode": "half_pixel", "cubic_coeff_a": -0.75}),
    "instance_norm": ("InstanceNormalization", [2, 3, 4, 5], [(F32, None)],
                      [("s", RNG.random(3).astype(np.float32)), ("b", RNG.random(3).astype(np.float32))],
                      {"epsilon": 1e-4}),
    "depth_to_space_dcr": ("DepthToSpace", [1, 8, 2, 3], [(F32, None)], [], {"blocksize": 2, "mode": "DCR"}),
    "depth_to_space_crd": ("DepthToSpace", [1, 8, 2, 3], [(F32, None)], [], {"blocksize": 2, "mode": "CRD"}),
    "space_to_depth": ("SpaceToDepth", [1, 2, 4, 6], [(F32, None)], [], {"blocksize": 2}),
    "selu": ("Selu", [2, 7], [(F32, None)], [], {}),
    "celu": ("Celu", [2, 7], [(F32, None)], [], {"alpha": 0.7}),
    "softsign": ("Softsign", [2, 7], [(F32, None)], [], {}),
    "cumsum_excl_rev": ("CumSum", [3, 5], [(F32, None)], [("axis", np.array(1, np.int64))],
                        {"exclusive": 1, "reverse": 1}),
    "topk": ("TopK", [2, 9], [(F32, None), (I64, None)], [("k", np.array([3], np.int64))], {"largest": 0}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime_imported_and_compiled(case, tmp_path):
    op, x_shape, outs, inits, attrs = CASES[case]
    path = tmp_path / f"{case}.onnx"
    x = RNG.standard_normal(x_shape).astype(np.float32)
    if op.startswith("Arg"):
        x = np.round(x)  # ties: which index wins is part of the op
    model = _model(op, x_shape, outs, inits, **attrs)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})
    # exporters write every output's shape (onnx.checker requires the field): take them from ORT's run
    onnx.save(_model(op, x_shape, [(t, list(r.shape)) for (t, _), r in zip(outs, ref)], inits, **attrs), str(path))
    g = graphopt.load_onnx(path)
    got = [t.numpy() for t in g.run(x)]
    built = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "art"))(x)
    for r, a, b in zip(ref, got, built):
        assert a.shape == r.shape and a.dtype == r.dtype, (a.shape, r.shape, a.dtype, r.dtype)
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(b), r, rtol=1e-4, atol=1e-4)


def test_resize_modes_without_a_faithful_mapping_are_named(tmp_path):
    path = tmp_path / "r.onnx"
    onnx.save(_model("Resize", [1, 1, 2, 2], [(F32, [1, 1, 4, 4])], [("roi", None),
                                                            ("scales", np.array([1, 1, 2, 2], np.float32))],
                     mode="nearest", coordinate_transformation_mode="tf_crop_and_resize"), str(path))
    with pytest.raises(UnsupportedOpError, match="the_node.*tf_crop_and_resize"):
        graphopt.load_onnx(path)
