"""A weight several layers read (a conv applied twice, an LSTM cell unrolled over its steps) is quantized once."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import graphopt


class _TwiceApplied(nn.Module):
    """One 3x3 conv applied twice, and one conv1d-like pointwise conv applied twice (fold-qdq's 2-D copy)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.point = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        a = F.relu(self.stem(x))
        b = F.relu(self.shared(F.relu(self.shared(a))))
        seq = b.flatten(2)
        return self.head(F.relu(self.point(F.relu(self.point(seq)))).mean(2))


def _int8_bytes(graph) -> dict[str, int]:
    return {k: v.numel() for k, v in graph.params().items() if v.dtype == torch.int8}


def test_a_weight_two_convs_read_is_stored_once_at_int8(tmp_path):
    """Each use had got its own int8 copy (the shared 8x8x3x3 weight twice, and its scales and zero points):
    quantizing added bytes a float model shares."""
    torch.manual_seed(0)
    model = _TwiceApplied().eval()
    x = torch.randn(1, 3, 12, 12)
    g = graphopt.trace(model, (x,))
    data = [(torch.randn(1, 3, 12, 12),) for _ in range(8)]
    q = graphopt.optimize(g, "quantize,fold-qdq", data=data)
    ints = _int8_bytes(q)
    assert sum(ints.values()) == sum(v.numel() for k, v in g.params().items() if k.endswith("weight")), ints
    assert len([k for k in ints if k.startswith("shared_weight")]) == 1
    assert len([k for k in ints if k.startswith("point_weight")]) == 1
    ref = model(x)
    got = q.run(x)[0]
    assert F.cosine_similarity(ref.flatten(), got.flatten(), 0) > 0.99
    built = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "a"))(x.numpy())[0]
    np.testing.assert_allclose(built, got.numpy(), rtol=1e-4, atol=1e-4)


def _lstm_onnx(tmp_path, direction: str):
    torch.manual_seed(0)
    lstm = nn.LSTM(16, 32, batch_first=True).eval()
    x = torch.randn(1, 20, 16)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(lstm, (x,), str(tmp_path / "lstm.onnx"), dynamo=False, opset_version=17)
    model = onnx.load(str(tmp_path / "lstm.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "LSTM")
    for a in node.attribute:
        if a.name == "direction":
            a.s = direction.encode()
    if not any(a.name == "direction" for a in node.attribute):
        node.attribute.append(onnx.helper.make_attribute("direction", direction))
    onnx.save(model, str(tmp_path / "lstm.onnx"))
    return graphopt.load_onnx(tmp_path / "lstm.onnx"), x


def test_an_unrolled_onnx_lstm_quantizes_with_one_recurrent_weight(tmp_path):
    """An ONNX LSTM that imports unrolled over its steps (a reverse-only one; forward and bidirectional ones import
    as one layer), every step reading the one recurrent weight: quantize stopped on the first step (it reads the
    initial state, a constant: "calibration data reaching 'linear_1' is constant (0)"), and would have stored the
    weight once per step. That layer is skipped (fold-constants folds it), the recurrent weight is stored once at
    int8, and the outputs stay close to fp32."""
    g, x = _lstm_onnx(tmp_path, "reverse")
    data = [(torch.randn(1, 20, 16),) for _ in range(8)]
    q = graphopt.optimize(g, "quantize", data=data)
    rec = q.meta["history"][0]
    assert rec["changed"]
    assert any("reads no input data" in why for why in rec["stats"]["skipped"].values()), rec["stats"]
    ints = _int8_bytes(q)
    assert sorted(ints.values()) == [128 * 16, 128 * 32], ints  # input and recurrent weights, once each
    ref, got = g.run(x)[0], q.run(x)[0]
    assert F.cosine_similarity(ref.flatten(), got.flatten(), 0) > 0.99


def test_a_whole_lstm_layer_stays_float_and_says_so(tmp_path):
    """A forward ONNX LSTM imports as PyTorch's layer (one op, for the float recurrence kernels): quantize leaves
    its weights float and lists it as skipped, with the reason, instead of passing over it silently."""
    g, x = _lstm_onnx(tmp_path, "forward")
    q = graphopt.optimize(g, "quantize", data=[(torch.randn(1, 20, 16),) for _ in range(4)], warn_unchanged=False)
    skipped = q.meta["history"][0]["stats"]["skipped"]
    assert any("recurrent layer" in why for why in skipped.values()), skipped
    assert not _int8_bytes(q)
    np.testing.assert_array_equal(q.run(x)[0].numpy(), g.run(x)[0].numpy())


def test_a_layer_whose_input_is_zero_on_every_batch_keeps_it_float(tmp_path):
    """A map centred over its own 1x1 extent (a norm over one value per group) is 0 whatever the image (a tiny
    MobileViT's pooled stage was): quantize stopped on "calibration data reaching 'conv2d_1' is constant"; that
    input stays float (exact) and the rest quantizes. Zero data for the model's own input is still that error."""
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.gate = nn.Conv2d(8, 8, 1)
            self.out = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            a = torch.relu(self.stem(x))
            p = F.adaptive_avg_pool2d(a, 1)
            g = self.gate(p - p.mean((2, 3), keepdim=True))  # centred over one value: 0
            return self.out(a * torch.sigmoid(g))
    torch.manual_seed(0)
    model = Head().eval()
    x = torch.randn(1, 3, 8, 8)
    g = graphopt.trace(model, (x,))
    # (tables=false: the gate's sigmoid as a table would round the float gate conv's output onto a grid, where a
    # float rounding difference in the build can move a code, beyond the 1e-4 the build is held to below)
    q = graphopt.optimize(g, "quantize{tables=false},fold-qdq", data=[(torch.randn(1, 3, 8, 8),) for _ in range(4)])
    stats = q.meta["history"][0]["stats"]
    assert list(stats["zero_inputs_kept_float"].values()) == ["conv2d_1"], stats
    assert stats["activations_quantized"] == 2  # the stem's and the output conv's inputs
    assert F.cosine_similarity(model(x).flatten(), q.run(x)[0].flatten(), 0) > 0.999
    built = graphopt.load(graphopt.compile(q, "llvm", output=tmp_path / "a"))(x.numpy())[0]
    np.testing.assert_allclose(built, q.run(x)[0].numpy(), rtol=1e-4, atol=1e-4)


class _FixedTimes:
    """Every layer 1 ms in fp32, 0.5 ms at int8."""

    def measure_variants(self, key, variants):
        return {c: 1e-3 if c == "fp32" else 0.5e-3 for c in variants}


@pytest.mark.parametrize("budget", ["size target=0.5", "latency target=0.8"])
def test_mixed_precision_gives_a_shared_weight_one_width(budget):
    """mixed-precision chose per use: ALBERT's one layer run 4 times got int8 in some uses and fp32 in others,
    storing both copies (its size budget 0.3 gave an artifact 0.93x the float one), and the size budget counted
    a shared weight's bytes once per use. One width per weight now, and the stored bytes are what it reports."""
    torch.manual_seed(0)
    model = _TwiceApplied().eval()
    x = torch.randn(1, 3, 12, 12)
    g = graphopt.trace(model, (x,))
    data = [(torch.randn(1, 3, 12, 12),) for _ in range(4)]
    q = graphopt.optimize(g, f"mixed-precision{{budget={budget} candidates=fp32,int8}}", data=data,
                          target=_FixedTimes())
    bits = q.meta["weight_bits"]
    reads = {}
    for n in g.graph.nodes:
        if n.op == "call_function" and n.name in bits:
            reads.setdefault(n.args[1].target, set()).add(bits[n.name])
    assert reads["shared_weight"] and all(len(widths) == 1 for widths in reads.values()), reads
    assert set(bits.values()) == {"fp32", "int8"}  # (a mix: the budget is between the two)
    names = set(q.params())
    assert not any(k in names and f"{k}_q" in names for k in ("shared_weight", "point_weight")), sorted(names)
    if budget.startswith("size"):
        stored = sum(v.numel() * v.element_size() for v in q.params().values())
        float_bytes = sum(v.numel() * 4 for v in g.params().values())
        frac = q.meta["history"][-1]["stats"]["size_fraction"]
        assert frac <= 0.5 and abs(stored / float_bytes - frac) < 0.05, (stored / float_bytes, frac)
    got = q.run(x)[0]
    assert F.cosine_similarity(model(x).flatten(), got.flatten(), 0) > 0.99
