"""LSTM and GRU layers on the recurrence kernels (targets/tvm/cpu/rnn.py): compiled models against PyTorch over
the layer options (layers, directions, batch-first, initial states, sizes off the 16-unit blocks, no biases),
that the kernels are what runs, and that a layer they do not take sends every one to the decomposed steps."""
import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt.targets.tvm.lower import lower_to_relax

TOL = dict(rtol=2e-5, atol=2e-5)  # fast_exp's ~1e-7 relative error, carried through the steps


def _functions(g) -> set[str]:
    return {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}


class Recurrent(nn.Module):
    def __init__(self, kind, i, h, layers=1, bidirectional=False, batch_first=True, bias=True, states=False,
                 head=None):
        super().__init__()
        cls = nn.LSTM if kind == "lstm" else nn.GRU
        self.rnn = cls(i, h, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
        self.kind, self.states = kind, states
        self.head = head

    def forward(self, x, *hx):
        if self.states:
            y, st = self.rnn(x, hx if self.kind == "lstm" else hx[0])
        else:
            y, st = self.rnn(x)
        st = st if isinstance(st, tuple) else (st,)
        return (y if self.head is None else self.head(y), *st)


def _check(model, inputs, tmp_path, kernel=True):
    model.eval()
    with torch.no_grad():
        ref = model(*inputs)
    g = graphopt.trace(model, inputs)
    names = _functions(g)
    assert any(n.startswith(("lstm_", "gru_")) for n in names) == kernel, sorted(names)
    run = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "art"))
    got = run(*[t.numpy() for t in inputs])
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(a, b.numpy(), **TOL)
    return names


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("t,n,i,h,layers,bidir,batch_first,bias,states", [
    (9, 1, 12, 32, 2, False, True, True, False),  # stacked, batch-first (a keyword spotter's shape)
    (7, 3, 5, 20, 1, True, False, True, True),  # bidirectional, seq-first, 3 rows, 20 units (a partial block)
    (5, 2, 16, 16, 2, True, True, False, True),  # no biases, given initial states, both directions stacked
    (1, 1, 4, 8, 1, False, True, True, False),  # one step of one row (the projection is a plain linear)
])
def test_recurrent_layers_match_torch(kind, t, n, i, h, layers, bidir, batch_first, bias, states, tmp_path):
    torch.manual_seed(0)
    m = Recurrent(kind, i, h, layers, bidir, batch_first, bias, states)
    x = torch.randn((n, t, i) if batch_first else (t, n, i))
    hx = ()
    if states:
        shape = (layers * (2 if bidir else 1), n, h)
        hx = (torch.randn(shape), torch.randn(shape)) if kind == "lstm" else (torch.randn(shape),)
    names = _check(m, (x, *hx), tmp_path)
    # one kernel for both directions, shared by the layers (they have the same steps, rows and units)
    expect = {f"{kind}_{t}x{n}x{h}" + ("_bidirectional" if bidir else "")}
    assert {f for f in names if f.startswith(kind + "_")} == expect


def test_saturating_gates_stay_finite(tmp_path):
    """Large pre-activations (weights x 30) saturate sigmoid and tanh: the gates reach 0 and 1 exactly enough that
    the states match PyTorch's, and nothing overflows to NaN."""
    torch.manual_seed(1)
    m = Recurrent("lstm", 6, 24, head=nn.Linear(24, 3))
    with torch.no_grad():
        for p in m.rnn.parameters():
            p.mul_(30)
    _check(m, (torch.randn(1, 12, 6),), tmp_path)


def test_large_batch_decomposes(tmp_path):
    """Past rnn.MAX_BATCH rows each row would re-read the recurrent weights: the layer decomposes into the
    unrolled steps (every recurrent layer of the graph does, so one graph never mixes both forms)."""
    torch.manual_seed(0)
    m = Recurrent("gru", 4, 8)
    _check(m, (torch.randn(9, 3, 4),), tmp_path, kernel=False)


def test_weights_given_as_inputs_decompose(tmp_path):
    """An LSTM whose weights are model inputs (not parameters) has no weights to pack at compile time: it runs as
    the unrolled steps instead of failing to import ("KeyError: 'wih'" before)."""

    class InputWeights(nn.Module):
        def forward(self, x, wih, whh):
            return torch.lstm(x, (torch.zeros(1, 1, 8), torch.zeros(1, 1, 8)), [wih, whh], False, 1, 0.0, False,
                              False, True)[:1]

    torch.manual_seed(0)
    _check(InputWeights(), (torch.randn(1, 5, 4), torch.randn(32, 4), torch.randn(32, 8)), tmp_path, kernel=False)


def test_recurrence_kernel_is_one_function_per_layer_shape():
    """A 50-step layer is one kernel and one GEMM, not 50 copies of a step (the unrolled form had 49 distinct
    per-step functions per layer)."""
    torch.manual_seed(0)
    g = graphopt.trace(Recurrent("lstm", 8, 16, layers=2).eval(), (torch.randn(1, 50, 8),))
    names = _functions(g)
    assert {n for n in names if n.startswith("lstm_")} == {"lstm_50x1x16"}
    assert len(names) < 12, sorted(names)
