"""Row scatters (graph neural networks' message passing, `x[idx] += v`) on the row scatter kernel
(`targets/tvm/cpu/scatter.py`): index_add, scatter_add / scatter / scatter_reduce with an index repeated along the
features, index_put with one index vector, and ONNX ScatterND over rows. Each checks the kernel it lowers to (a
one-hot product took 60 ms for a 2000-node, 10000-edge graph; the kernel 0.05) and the built output against
PyTorch, repeated indices included (and negative ones where PyTorch wraps them: index_put)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets.tvm.lower import lower_to_relax

from tests.targets.test_cpu_kernels import _run_built


def _check(model, *xs, kernel="scatter_rows_add", tol=1e-5):
    """`model` lowers to the row scatter kernel (`kernel`: the name's start; None: it must not) and its build
    matches PyTorch."""
    g = graphopt.trace(model, xs)
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    if kernel is None:
        assert not any(n.startswith("scatter_rows") for n in names), names
    else:
        assert any(n.startswith(kernel) for n in names), names
    got = _run_built(g, *xs)
    want = model(*xs).detach().numpy()
    assert got.dtype == want.dtype
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


class IndexAdd(torch.nn.Module):
    def __init__(self, dim, alpha=1):
        super().__init__()
        self.dim, self.alpha = dim, alpha

    def forward(self, x, index, src):
        return x.index_add(self.dim, index, src, alpha=self.alpha)


@pytest.mark.parametrize("shape,dim,rows,alpha", [((20, 32), 0, 50, 1), ((3, 20, 5), 1, 40, 2.0), ((20,), 0, 30, 1),
                                                  ((4, 6, 33), -1, 9, 1)])
def test_index_add_accumulates_rows_in_order(shape, dim, rows, alpha):
    """Rows of src along dim add into x's rows index[i]; repeated indices accumulate; alpha scales; 1-D x, a middle
    and the last axis."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    n = shape[dim]
    index = torch.randint(0, n, (rows,))
    src_shape = list(shape)
    src_shape[dim] = rows
    _check(IndexAdd(dim, alpha), x, index, torch.randn(*src_shape))


def test_index_add_of_integers_counts_degrees():
    """A node degree count (ones index_added into zeros, int64): exact."""
    class Degree(torch.nn.Module):
        def forward(self, dst):
            return torch.zeros(12, dtype=torch.int64).index_add(0, dst, torch.ones_like(dst))
    _check(Degree(), torch.randint(0, 12, (100,)))


class MessagePassing(torch.nn.Module):
    """A GCN-like aggregation: gather the source rows, scatter them into the targets through an expanded index."""
    def __init__(self, op, include_self=True):
        super().__init__()
        self.op, self.include_self = op, include_self

    def forward(self, h, src, dst):
        msg = h[src] * 0.5
        index = dst[:, None].expand(-1, h.shape[1])
        if self.op == "scatter_add":
            return torch.zeros_like(h).scatter_add_(0, index, msg)
        if self.op == "put":
            return h.scatter(0, index, msg)
        return h.scatter_reduce(0, index, msg, self.op, include_self=self.include_self)


@pytest.mark.parametrize("op,include_self,kernel", [
    ("scatter_add", True, "scatter_rows_add"), ("sum", True, "scatter_rows_add"), ("put", True, "scatter_rows_put"),
    ("sum", False, "scatter_rows_add_reset"), ("amax", True, "scatter_rows_max"),
    ("amax", False, "scatter_rows_max_reset"), ("amin", False, "scatter_rows_min_reset"),
    ("prod", False, "scatter_rows_prod_reset"), ("mean", True, "scatter_rows_add"),
    ("mean", False, "scatter_rows_add_reset")])
def test_scatter_with_an_index_expanded_over_features_runs_whole_rows(op, include_self, kernel):
    """scatter_add / scatter_reduce / scatter (distinct targets: PyTorch leaves repeated ones undefined) with
    `dst[:, None].expand(-1, D)` run the row kernel: PNA's max / min / mean / std aggregators (include_self=False:
    a node no edge reaches keeps its row; TVM's element scatters took 6-12 ms each on a 2000-node, 20000-edge
    graph's 64 features)."""
    torch.manual_seed(0)
    h = torch.randn(30, 20)
    edges = 60 if op != "put" else 25
    dst = torch.randint(0, 25, (edges,)) if op != "put" else torch.randperm(30)[:edges]  # (nodes 25-29: none)
    _check(MessagePassing(op, include_self), h, torch.randint(0, 30, (edges,)), dst, kernel=kernel)


def test_integer_scatter_max_keeps_the_element_scatter():
    """An integer max (no float identity to reset from here) keeps Relax's scatter_elements, exact."""
    class IntMax(torch.nn.Module):
        def forward(self, h, dst):
            return h.scatter_reduce(0, dst[:, None].expand(-1, 4), h[:8] * 3, "amax", include_self=False)
    _check(IntMax(), torch.randint(-50, 50, (10, 4)), torch.randint(0, 10, (8,)), kernel=None)


class IndexPut(torch.nn.Module):
    def __init__(self, accumulate, value=None):
        super().__init__()
        self.accumulate, self.value = accumulate, value

    def forward(self, x, idx, v):
        return torch.index_put(x, (idx,), v if self.value is None else torch.tensor(self.value),
                               accumulate=self.accumulate)


@pytest.mark.parametrize("accumulate,v_shape,value", [(True, (40, 3, 8), None), (True, (8,), None),
                                                      (False, (10, 3, 8), None), (True, None, 2.5)])
def test_index_put_with_one_index_vector_writes_rows(accumulate, v_shape, value):
    """x[idx] += v (repeated indices accumulate) and x[idx] = v (distinct targets), values broadcast over the rows,
    a scalar value."""
    torch.manual_seed(0)
    x = torch.randn(12, 3, 8)
    rows = v_shape[0] if v_shape and len(v_shape) == 3 else 40
    idx = torch.randint(-12, 12, (rows,)) if accumulate else torch.randperm(12)[:rows]
    v = torch.randn(*(v_shape or (1,)))
    _check(IndexPut(accumulate, value), x, idx, v, kernel="scatter_rows_add" if accumulate else "scatter_rows_put")


def test_onnx_scatternd_with_add_over_rows_runs_the_row_kernel(tmp_path):
    """ONNX ScatterND (reduction add) whose index tuples address rows: the importer's row form runs the kernel."""
    from onnx import TensorProto, helper

    node = helper.make_node("ScatterND", ["data", "indices", "updates"], ["out"], reduction="add")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [16, 24]),
                                            helper.make_tensor_value_info("indices", TensorProto.INT64, [50, 1]),
                                            helper.make_tensor_value_info("updates", TensorProto.FLOAT, [50, 24])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [16, 24])])
    g = _onnx_on_row_kernel(tmp_path, graph, "scatter_rows_add")
    rng = np.random.default_rng(0)
    data, upd = rng.standard_normal((16, 24), np.float32), rng.standard_normal((50, 24), np.float32)
    idx = rng.integers(0, 16, (50, 1))
    want = data.copy()
    np.add.at(want, idx[:, 0], upd)
    got = _run_built(g, torch.from_numpy(data), torch.from_numpy(idx), torch.from_numpy(upd))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scatter_rows_source_splits_columns_not_rows():
    """The scatter runs the rows serially inside each task and splits the columns between tasks, so repeated
    targets never race (the earlier per-element parallel scatter lost updates)."""
    from graphopt.targets.tvm.cpu.scatter import scatter_rows_source
    src = scatter_rows_source(1, 10, 100, 64, "float32", "int64", "sum", cores=2)
    scatter = src[src.index("index[e]") - 400:]
    assert "for e in T.serial(100)" in scatter and "T.parallel(2)" in scatter


def test_onnx_scatter_elements_max_over_expanded_rows_runs_the_row_kernel(tmp_path):
    """ONNX ScatterElements (reduction max) whose index is a row vector expanded over the features: the importer
    wraps negative indices with a where, which the row kernel sees through (TVM's element scatter took 8.5 ms for
    a 2000-node, 20000-edge graph's 64 features)."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Unsqueeze", ["dst", "ax"], ["col"]),
             helper.make_node("Expand", ["col", "shape"], ["idx"]),
             helper.make_node("ScatterElements", ["data", "idx", "updates"], ["out"], axis=0, reduction="max")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [16, 24]),
                     helper.make_tensor_value_info("dst", TensorProto.INT64, [50]),
                     helper.make_tensor_value_info("updates", TensorProto.FLOAT, [50, 24])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [16, 24])],
        [helper.make_tensor("ax", TensorProto.INT64, [1], [1]), helper.make_tensor("shape", TensorProto.INT64, [2],
                                                                                    [50, 24])])
    g = _onnx_on_row_kernel(tmp_path, graph, "scatter_rows_max")
    rng = np.random.default_rng(0)
    data, upd = rng.standard_normal((16, 24), np.float32), rng.standard_normal((50, 24), np.float32)
    dst = rng.integers(-16, 16, 50)
    want = data.copy()
    np.maximum.at(want, np.where(dst < 0, dst + 16, dst), upd)
    got = _run_built(g, torch.from_numpy(data), torch.from_numpy(dst), torch.from_numpy(upd))
    np.testing.assert_array_equal(got, want)


def _onnx_on_row_kernel(tmp_path, graph, kernel: str):
    """The ONNX `graph` saved (opset 18) and imported; it lowers to the row kernel `kernel`."""
    import onnx
    from onnx import helper
    path = tmp_path / "scatter.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    g = graphopt.load_onnx(str(path))
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    assert any(n.startswith(kernel) for n in names), names
    return g


@pytest.mark.parametrize("wrap,kernel", [(16, "scatter_rows_max_reset"), (7, None)])
def test_negative_index_wrap_is_seen_through_only_by_the_axis_size(wrap, kernel):
    """where(i < 0, i + n, i) over an expanded row index (ONNX import's wrap) runs the row kernel, which wraps by
    the axis's size itself; a wrap by another size (7 on an axis of 16) keeps Relax's scatter_elements. Both
    builds match PyTorch."""
    class Wrapped(torch.nn.Module):
        def forward(self, h, d):
            i = d[:, None].expand(-1, h.shape[1])
            return h.scatter_reduce(0, torch.where(i < 0, i + wrap, i), h[:10] * 2.0, "amax", include_self=False)
    _check(Wrapped(), torch.randn(16, 4), torch.randint(-7, 16, (10,)), kernel=kernel)


class ConstantIndexScatter(torch.nn.Module):
    """scatter_reduce with a constant [E, D] index (a buffer, as torch's ONNX export writes PNA's expanded index);
    `rows_repeat=False` scrambles one column so the rows no longer repeat."""

    def __init__(self, op: str, rows_repeat: bool = True):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        idx = torch.randint(0, 25, (60,), generator=g)[:, None].expand(-1, 20).contiguous()
        if not rows_repeat:
            idx[:, 7] = torch.randint(0, 25, (60,), generator=g)
        self.register_buffer("idx", idx)
        self.op = op

    def forward(self, h, msg):
        return h.scatter_reduce(0, self.idx, msg, self.op, include_self=False)


@pytest.mark.parametrize("op,rows_repeat,kernel", [("amax", True, "scatter_rows_max_reset"),
                                                    ("sum", True, "scatter_rows_add_reset"),
                                                    ("amax", False, None)])
def test_scatter_with_a_constant_index_repeating_over_features_runs_whole_rows(op, rows_repeat, kernel):
    """A constant index whose rows repeat one value (PNA's ONNX route: 18-19 -> 6.6 ms, as traced) takes the row
    kernel with its first column as the index vector; one that does not keeps the element scatter. Both match
    PyTorch."""
    torch.manual_seed(0)
    _check(ConstantIndexScatter(op, rows_repeat), torch.randn(30, 20), torch.randn(60, 20), kernel=kernel)
