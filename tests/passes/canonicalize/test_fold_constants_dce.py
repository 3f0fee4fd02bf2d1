"""fold-constants and dce: change the graph, keep outputs exact."""
from __future__ import annotations

import torch
from torch import nn

import graphopt


class ParamMath(nn.Module):
    """Weight preprocessing inside forward: a constant subgraph that fold-constants precomputes."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 4))
        self.scale = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        w = (self.w * self.scale[:, None]).t()  # depends only on parameters
        return x @ w


def test_fold_constants_precomputes_parameter_math():
    torch.manual_seed(0)
    m = ParamMath().eval()
    x = torch.randn(2, 4)
    g = graphopt.trace(m, (x,))
    n_before = g.stats().nodes
    out = graphopt.optimize(g, "fold-constants", verify=True)
    assert out.stats().nodes < n_before
    ops = {str(n.target) for n in out.graph.nodes if n.op == "call_function"}
    assert ops == {"aten.matmul.default"}, ops
    torch.testing.assert_close(out.run(x)[0], m(x), rtol=1e-6, atol=1e-6)
    assert out.meta["history"][0]["stats"]["folded"] >= 2


def test_fold_constants_splits_a_parameter_into_parameters():
    """nn.MultiheadAttention's cross attention splits its packed in-projection: q = linear(x, W[:E]), kv =
    linear(mem, W[E:]). The split of a parameter is folded, so each linear reads a parameter of its own (the
    lowering's packed GEMM; an unfolded getitem left DETR's 400x256x512 kv projection on TVM's default matmul,
    2x slower)."""
    torch.manual_seed(0)
    m = nn.MultiheadAttention(16, 2, batch_first=True).eval()
    q, mem = torch.randn(1, 3, 16), torch.randn(1, 10, 16)
    g = graphopt.trace(m, (q, mem, mem))
    out = graphopt.optimize(g, "fold-constants,dce", verify=True)
    nodes = [n for n in out.graph.nodes if n.op == "call_function"]
    assert not [n for n in nodes if "split" in str(n.target)], "the parameter's split was left in the graph"
    linears = [n for n in nodes if str(n.target) == "aten.linear.default"]
    assert len(linears) >= 3 and all(n.args[1].op == "get_attr" for n in linears)
    torch.testing.assert_close(out.run(q, mem, mem)[0], m(q, mem, mem, need_weights=False)[0], rtol=1e-6,
                               atol=1e-6)


def test_fold_constants_skips_growing_results():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.randn(1, 8))

        def forward(self, x):
            return x + self.b.expand(64, 8)

    m = Expand().eval()
    x = torch.randn(64, 8)
    out = graphopt.optimize(graphopt.trace(m, (x,)), "fold-constants{max-growth=4}")
    assert not out.meta["history"][0]["changed"]
    assert out.meta["history"][0]["stats"]["skipped"]
    torch.testing.assert_close(out.run(x)[0], m(x))


def test_dce_removes_dead_ops_and_unused_params(cnn_graph):
    g, model, x = cnn_graph
    # a dead op plus an unread parameter (BN's num_batches_tracked is read by nobody after export)
    work = g.clone()
    node = next(n for n in work.graph.nodes if n.op == "placeholder")
    with work.graph.inserting_after(node):
        work.graph.call_function(torch.ops.aten.relu.default, (node,))
    work.refresh()
    n_params, n_nodes = len(work.params()), work.stats().nodes
    out = graphopt.optimize(work, "dce", verify=True)
    assert out.stats().nodes == n_nodes - 1
    assert len(out.params()) < n_params
    assert not any("num_batches_tracked" in k for k in out.params())
    torch.testing.assert_close(out.run(x)[0], model(x), rtol=0, atol=0)


class _LoopedLayer(nn.Module):
    """One weight used 4 times as `w.t()` and a scale computed from a parameter on every use (a layer run in a
    loop, ALBERT-style sharing), and a split of one parameter twice."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.s = nn.Parameter(torch.randn(16) / 4)
        self.packed = nn.Parameter(torch.randn(32, 16) / 4)

    def forward(self, x):
        for _ in range(4):
            x = torch.relu(x @ self.w.t()) * self.s.exp()
        a, _ = self.packed.split(16)
        b, _ = self.packed.split(16)
        return x @ a.t() + x @ b.t()


def test_fold_constants_folds_the_same_op_on_the_same_parameters_once():
    """Each use's `w.t()` had become a parameter of its own: the folded graph held the layer's weights once per
    use (4x the traced model's). The same op on the same values now folds once, the uses share it."""
    torch.manual_seed(0)
    m = _LoopedLayer().eval()
    x = torch.randn(2, 16)
    g = graphopt.trace(m, (x,))
    out = graphopt.optimize(g, "fold-constants,dce", verify=True)
    assert out.stats().params <= g.stats().params, {k: tuple(v.shape) for k, v in out.params().items()}
    assert out.meta["history"][0]["stats"]["shared"] >= 6
    torch.testing.assert_close(out.run(x)[0], m(x), rtol=1e-5, atol=1e-5)
