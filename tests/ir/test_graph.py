"""The Graph IR: tracing, text, diff, running, statistics, and safe save/load."""
from __future__ import annotations

import io
import warnings
import zipfile

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import InputMismatchError, ModelFileError
from graphopt.ir import Graph, graph_diff


def test_trace_runs_like_eager_and_keeps_params_as_attributes(cnn_graph):
    g, model, x = cnn_graph
    assert g.inputs[0].shape == (1, 3, 16, 16) and g.inputs[0].dtype == "float32"
    assert g.outputs[0].shape == (1, 10)
    torch.testing.assert_close(g.run(x)[0], model(x), rtol=0, atol=0)
    params = g.params()
    assert any(t.shape == (8, 3, 3, 3) for t in params.values())
    assert all(n.op != "placeholder" or n.name == "x" for n in g.graph.nodes)


def test_model_is_not_modified_by_trace(cnn):
    model, x = cnn
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt.trace(model, (x,))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_trace_restores_each_submodules_own_mode(cnn):
    """A wrapper in train mode around an eval-mode model: trace put everything back to the wrapper's mode, so the
    model's batch norms and dropouts were training afterwards."""
    model, x = cnn
    wrapper = torch.nn.Sequential(model.eval())
    wrapper.training = True
    graphopt.trace(wrapper, (x,))
    assert wrapper.training and not any(m.training for m in model.modules())


def test_a_data_dependent_branch_is_one_error_with_the_fix_and_no_graph_dumps(capfd):
    """A Python `if` on a tensor cannot be traced to one static graph: the error says so and what to write
    instead, and torch's two WARNING dumps of the partial graph stay off stderr."""
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x - 1

    with pytest.raises(graphopt.GraphoptError, match=r"could not trace Branchy: .*data-dependent.*torch\.where"):
        graphopt.trace(Branchy(), (torch.randn(4),))
    err = capfd.readouterr().err
    assert "def forward" not in err, err
    import logging
    assert logging.getLogger("torch.fx.experimental.symbolic_shapes").level == logging.NOTSET  # given back

    class Chatty(nn.Module):  # a trace that works gives back what was written to stderr meanwhile
        def forward(self, x):
            import sys
            print("model says hello", file=sys.stderr)
            return x + 1

    graphopt.trace(Chatty(), (torch.randn(4),))
    assert "model says hello" in capfd.readouterr().err


class _Cond(nn.Module):
    """The branch the trace error suggests: torch.cond on the data, a module's parameters in one side, a nested
    cond, two outputs."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        def pos(x):
            return self.lin(x) * 2, x.sum(0)

        def neg(x):
            inner = torch.cond(x.mean() < -0.5, lambda x: x * 0 - 7, lambda x: x - 1, (x,))
            return inner, x.amax(0)

        return torch.cond(x.sum() > 0, pos, neg, (x,))


def test_torch_cond_builds_both_branches_and_picks_at_run_time(tmp_path):
    """torch.cond, which the data-dependent-branch error recommends, failed in trace ("'Module' object has no
    attribute 'true_graph_0'"): its branches are submodules the graph did not hold. Both are inlined and a where
    per output picks the side; the artifact follows the predicate of each call's data, nested conds included."""
    m = _Cond().eval()
    g = graphopt.trace(m, (torch.ones(3, 4),))
    assert not any("cond" in str(n.target) for n in g.graph.nodes)
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "c"))
    for x in (torch.ones(3, 4), -torch.ones(3, 4), torch.full((3, 4), -0.1)):  # each side, the inner cond's too
        with torch.no_grad():
            ref = m(x)
        for got, r in zip(art(x.numpy()), ref):
            torch.testing.assert_close(torch.from_numpy(got), r, rtol=1e-6, atol=1e-6)
        for got, r in zip(g.run(x), ref):
            torch.testing.assert_close(got, r, rtol=1e-6, atol=1e-6)


class _Backtrace(nn.Module):
    """Indexing with 0-d tensors as decoders do: a Viterbi backtrace over argmax pointers (int64 and int32), a
    negative index, `...` before it, and a tensor's value as a number in arithmetic (`* y.max().item()`)."""

    def forward(self, x, y):
        best = x[-1].amax(0).argmax()
        path = [best]
        for t in (3, 2, 1):
            best = x[t - 1].argmax(0).to(torch.int32)[best]
            path.append(best)
        neg = (x[0, :1] > 0).long().sum() - 2  # -1 or -2
        return torch.stack(path), y[..., neg] * y.max().item(), y[best.long()]


def test_a_tensor_read_as_a_number_stays_a_tensor_in_the_graph(tmp_path):
    """Indexing with a 0-d tensor (torch reads it as a number: `.item()` under export) had failed in trace with
    torch's DataDependentOutputException and no word of what to change; the select becomes aten.index with the
    0-d tensor, the number in arithmetic the 0-d tensor itself, and graph and artifact give PyTorch's values for
    inputs whose pointers differ."""
    m = _Backtrace().eval()
    torch.manual_seed(0)
    x, y = torch.randn(4, 5, 5), torch.randn(5, 3)
    g = graphopt.trace(m, (x, y))
    targets = [n.target for n in g.graph.nodes]
    assert torch.ops.aten.item.default not in targets and torch.ops.aten.index.Tensor in targets
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "b"))
    seen = set()
    for seed in range(4):
        torch.manual_seed(seed)
        x, y = torch.randn(4, 5, 5), torch.randn(5, 3)
        ref = m(x, y)
        seen.add(tuple(ref[0].tolist()))
        for got, r in zip(g.run(x, y), ref):
            torch.testing.assert_close(got, r, rtol=0, atol=0)
        for got, r in zip(art(x.numpy(), y.numpy()), ref):
            torch.testing.assert_close(torch.from_numpy(got), r, rtol=1e-6, atol=1e-6)
    assert len(seen) == 4  # (the pointers were followed, not frozen at the traced values)


def test_a_number_read_from_a_tensor_as_a_size_names_the_node_and_the_line():
    class Fill(nn.Module):
        def forward(self, x):
            return x + torch.full((2,), x.argmax().item())

    with pytest.raises(graphopt.GraphoptError, match=r"node 'full'.*\(test_graph\.py:\d+: return x \+ torch\.full"):
        graphopt.trace(Fill(), (torch.randn(2),))


def test_tracing_recurrent_layers_does_not_warn_about_torchs_own_weight_list():
    """torch.export warns that nn.GRU's `_flat_weights` "must be registered as buffers" on every trace of one:
    torch's internals, nothing the user can change; its warning about the model's own attributes still shows."""
    class Rec(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.lstm = nn.GRU(8, 8), nn.LSTM(8, 8, bidirectional=True)

        def forward(self, x):
            return self.gru(x)[0] + self.lstm(x)[0][..., :8]

    class Own(nn.Module):
        def __init__(self):
            super().__init__()
            self.last = torch.zeros(1)

        def forward(self, x):
            self.last = x * 2  # (an attribute of the model's own, set in forward)
            return self.last + 1

    for model, shown in ((Rec(), False), (Own(), True)):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            graphopt.trace(model, (torch.randn(5, 1, 8),))
        texts = [str(w.message) for w in seen if "assigned during export" in str(w.message)]
        assert bool(texts) == shown and all("_flat_weights" not in t for t in texts)


def test_text_is_stable_and_readable(cnn_graph):
    g, _, _ = cnn_graph
    t1, t2 = g.text(), g.clone().text()
    assert t1 == t2
    assert "aten.conv2d.default(%x" in t1
    assert "float32[1,10]" in t1.splitlines()[0]


def test_diff_shows_only_the_change(cnn_graph):
    g, _, _ = cnn_graph
    assert graph_diff(g, g.clone()) == ""
    g2 = graphopt.optimize(g, "fold-bn")
    d = graph_diff(g, g2)
    assert "-  %batch_norm" in d and "+" in d


def test_stats_counts_macs_exactly():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(4, 6, 3, padding=1, groups=2)
            self.l = nn.Linear(6, 5)

        def forward(self, x):
            return self.l(self.c(x).mean((2, 3)))

    g = graphopt.trace(M().eval(), (torch.randn(2, 4, 7, 7),))
    s = g.stats()
    conv_macs = 2 * 6 * 7 * 7 * (4 // 2) * 3 * 3
    assert s.macs == conv_macs + 2 * 5 * 6
    assert s.params == 6 * 2 * 9 + 6 + 5 * 6 + 5
    assert s.bytes == 4 * s.params


def test_stats_count_einsum_products():
    """einsum counted no work (a mixture of experts' expert MLPs by einsum reported 0 MACs beside its gate): each
    pairwise contraction counts every index it spans, an ellipsis broadcast, three operands left to right."""
    from graphopt.ir.stats import einsum_macs

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 5))

        def forward(self, x):
            return torch.einsum("td,edf->tef", x, self.w), torch.einsum("...ij,...jk->...ik", x[None], x.t())

    g = graphopt.trace(M().eval(), (torch.randn(4, 8),))
    assert g.stats().macs == 4 * 8 * 3 * 5 + 4 * 8 * 4
    assert einsum_macs("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]) == 2 * 3 * 4 + 2 * 4 * 5
    assert einsum_macs("ii->i", [(3, 3)]) == 0 and einsum_macs("ij,jk", [(2, 3), (3, 4)]) == 24


def test_input_checks_name_the_input(cnn_graph):
    g, _, x = cnn_graph
    with pytest.raises(InputMismatchError, match="input 'x' has shape"):
        g.run(torch.randn(1, 3, 8, 8))
    with pytest.raises(InputMismatchError, match="dtype"):
        g.run(x.double())
    with pytest.raises(InputMismatchError, match="expected 1 input"):
        g.run(x, x)


def test_save_load_roundtrip(tmp_path, cnn_graph):
    g, model, x = cnn_graph
    g.meta["note"] = "kept"
    path = tmp_path / "m.gopt"
    g.save(path)
    g2 = Graph.load(path)
    assert g2.text() == g.text()
    assert g2.meta["note"] == "kept"
    torch.testing.assert_close(g2.run(x)[0], model(x), rtol=0, atol=0)


def test_load_rejects_corrupt_and_truncated(tmp_path, cnn_graph):
    g, _, _ = cnn_graph
    path = tmp_path / "m.gopt"
    g.save(path)
    data = path.read_bytes()
    (tmp_path / "trunc.gopt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="trunc.gopt"):
        Graph.load(tmp_path / "trunc.gopt")
    (tmp_path / "junk.gopt").write_bytes(b"not a zip at all")
    with pytest.raises(ModelFileError, match="junk.gopt"):
        Graph.load(tmp_path / "junk.gopt")
    with pytest.raises(ModelFileError, match="does not exist"):
        Graph.load(tmp_path / "missing.gopt")


def test_load_refuses_ops_outside_torch_ops(tmp_path, cnn_graph):
    """A hostile file cannot name an arbitrary Python callable (e.g. os.system) as an op."""
    import json
    g, _, _ = cnn_graph
    path = tmp_path / "m.gopt"
    g.save(path)
    with zipfile.ZipFile(path) as z:
        files = {n: z.read(n) for n in z.namelist()}
    doc = json.loads(files["graph.json"])
    for n in doc["nodes"]:
        if n["op"] == "call_function":
            n["target"] = "os.system"
            break
    files["graph.json"] = json.dumps(doc).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    (tmp_path / "evil.gopt").write_bytes(buf.getvalue())
    with pytest.raises(ModelFileError, match="not an allowed torch op"):
        Graph.load(tmp_path / "evil.gopt")


def test_failed_save_leaves_existing_file(tmp_path, cnn_graph, monkeypatch):
    g, _, _ = cnn_graph
    path = tmp_path / "m.gopt"
    path.write_bytes(b"precious")
    import graphopt.ir.serialize as ser

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ser, "_enc", boom)
    with pytest.raises(RuntimeError):
        g.save(path)
    assert path.read_bytes() == b"precious"


def test_trace_takes_keyword_inputs_as_hugging_face_models_are_called(tmp_path):
    """`model(input_ids=..., attention_mask=...)`: trace had no way to give keyword inputs (a TypeError), so an
    optional mask could not be traced in. The graph takes them after the positional ones, by name."""
    import numpy as np

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.e = nn.Embedding(50, 8)

        def forward(self, input_ids, attention_mask=None):
            h = self.e(input_ids)
            return (h if attention_mask is None else h * attention_mask[..., None]).sum(1)
    torch.manual_seed(0)
    m = Masked().eval()
    ids, mask = torch.randint(0, 50, (2, 5)), torch.ones(2, 5)
    mask[0, 3:] = 0
    g = graphopt.trace(m, example_kwargs={"input_ids": ids, "attention_mask": mask})
    assert [s.name for s in g.inputs] == ["input_ids", "attention_mask"]
    want = m(ids, attention_mask=mask).detach()
    torch.testing.assert_close(g.run(ids, mask)[0], want)
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "a"))
    np.testing.assert_allclose(art(ids.numpy(), mask.numpy())[0], want.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(graphopt.GraphoptError, match="needs example inputs"):
        graphopt.trace(m)


def test_adopting_an_exported_programs_tensors_never_shares_memory_between_parameters():
    """copy=False (an ONNX import's own tensors, adopted: no second copy of a 2 GB model) still copies a tensor whose
    memory another parameter already holds, so a pass writing one in place (sparsify's masks, training) leaves the
    other as it was."""
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            t = torch.arange(8.0)
            self.register_buffer("a", t)
            self.register_buffer("b", t[:4])

        def forward(self, x):
            return x * self.a[:4] + self.b
    ep = torch.export.export(Views(), (torch.ones(4),), strict=False)
    g = Graph.from_exported_program(ep, copy=False)
    a, b = (t for _, t in sorted(g.params().items()))
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    a.mul_(0)
    torch.testing.assert_close(b, torch.arange(4.0))
    torch.testing.assert_close(g.run(torch.ones(4))[0], torch.arange(4.0))


def test_run_decompositions_gives_torchs_program_and_leaves_torch_as_it_was(cnn_graph):
    """graphopt.ir.graph.run_decompositions skips torch's re-walk of the CompositeImplicitAutograd registrations
    while they are unchanged: the program is the one torch's own call gives, with linear kept or decomposed as the
    table says; the walk runs again when the registrations change, and torch's function is back afterwards."""
    import torch._export.utils as export_utils
    from torch.export import default_decompositions

    from graphopt.ir import graph as graph_mod
    g, _, _ = cnn_graph
    ep = g.to_exported_program()
    original = export_utils._materialize_cpp_cia_ops
    py_impl = torch._ops.OperatorBase.__dict__["py_impl"]
    for keep_linear in (False, True):
        table = default_decompositions()
        if keep_linear:
            table.pop(torch.ops.aten.linear.default, None)
        ours = graph_mod.run_decompositions(ep, table)
        assert export_utils._materialize_cpp_cia_ops is original
        assert torch._ops.OperatorBase.__dict__["py_impl"] is py_impl
        theirs = ep.run_decompositions(table)
        assert str(ours.graph) == str(theirs.graph)
        assert ("aten.linear.default" in str(ours.graph)) == keep_linear
    walks = []
    export_utils._materialize_cpp_cia_ops = lambda: walks.append(1)
    try:
        graph_mod._CIA_MATERIALIZED[0] = None  # as after a library registered new ops
        graph_mod.run_decompositions(ep, default_decompositions())
        graph_mod.run_decompositions(ep, default_decompositions())
    finally:
        export_utils._materialize_cpp_cia_ops = original
    assert walks == [1]


def test_run_decompositions_registers_torchs_kernels_without_evaluating_their_annotations():
    """Under graphopt's run_decompositions torch's `py_impl` (called ~5700 times a call) is the same code without
    the annotations its nested function evaluates at every call; torch's own function is back afterwards, also
    when the call fails."""
    from graphopt.ir import graph as graph_mod
    py_impl = torch._ops.OperatorBase.__dict__["py_impl"]
    relu, key = torch.ops.aten.relu.default, torch._C.DispatchKey.CPU
    assert py_impl(relu, key).__annotations__  # torch's: Callable[_P, _T] evaluated at each definition
    seen = []

    class _Program:
        def run_decompositions(self, table):
            seen.append(torch._ops.OperatorBase.py_impl)
            raise RuntimeError("torch failed")

    with pytest.raises(RuntimeError, match="torch failed"):
        graph_mod.run_decompositions(_Program())
    assert torch._ops.OperatorBase.__dict__["py_impl"] is py_impl
    inner = seen[0](relu, key)
    assert seen[0] is not py_impl and inner.__annotations__ == {}
    assert inner.__code__.co_filename == py_impl.__code__.co_filename
    assert inner.__code__.co_firstlineno == py_impl(relu, key).__code__.co_firstlineno


def test_a_function_whose_source_does_not_compile_again_is_kept_as_it_is(tmp_path, monkeypatch):
    """_unannotated keeps torch's own function where its source cannot be run again (here: a decorator name its
    module no longer has), so run_decompositions never fails for the speed-up's sake."""
    import importlib

    from graphopt.ir import graph as graph_mod
    (tmp_path / "gone_decorator.py").write_text("def gone(f):\n    return f\n\n\n@gone\ndef f(x: int) -> int:\n"
                                                "    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("gone_decorator")
    assert graph_mod._unannotated(module.f) is not module.f  # its source runs again while `gone` is there
    graph_mod._unannotated.cache_clear()
    del module.gone
    assert graph_mod._unannotated(module.f) is module.f
