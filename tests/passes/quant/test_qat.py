"""qat: int4-weight + int8-activation digits CNN recovers to <= 0.5 points below fp32 (mean over 3 seeds), LSQ
learns scales, the result stays a Q/DQ graph that fold-qdq turns into integer ops, and bad input is a clear error."""
from __future__ import annotations

import pytest
import torch

import graphopt
from digits import accuracy, batches, label_batches

INT4 = "fold-bn,quantize{weights=int4 calibrator=percentile}"


def test_int4_qat_recovers_digits_accuracy(digits):
    ptq_drops, qat_drops = [], []
    for seed, (model, (xtr, xte, ytr, yte)) in enumerate(digits):
        base = accuracy(model, xte, yte)
        g = graphopt.trace(model, (xtr[:64],))
        kw = dict(data=batches(xtr), labels=label_batches(ytr), seed=seed)
        ptq = graphopt.optimize(g, INT4, **kw)
        qat = graphopt.optimize(g, INT4 + ",qat{epochs=4 lr=5e-4}", **kw)
        ints = [t for k, t in qat.params().items() if t.dtype == torch.int8]
        assert ints and all(int(t.abs().max()) <= 7 for t in ints)  # still int4 weights
        ptq_drops.append(base - accuracy(ptq.gm, xte, yte))
        qat_drops.append(base - accuracy(qat.gm, xte, yte))
    print(f"int4 weights + int8 activations: PTQ drop {[round(d * 100, 2) for d in ptq_drops]} points, "
          f"after QAT {[round(d * 100, 2) for d in qat_drops]}")
    assert sum(qat_drops) / 3 <= 0.005
    assert sum(qat_drops) <= sum(ptq_drops)


def test_lsq_learns_scales_and_fold_qdq_follows(digits):
    model, (xtr, xte, ytr, yte) = digits[0]
    g = graphopt.trace(model, (xtr[:64],))
    kw = dict(data=batches(xtr), labels=label_batches(ytr))
    ptq = graphopt.optimize(g, INT4, **kw)
    lsq = graphopt.optimize(g, INT4 + ",qat{epochs=2 lr=5e-4 lsq=true}", **kw)
    scales = [k for k in ptq.params() if k.endswith("_scale")]
    assert any(not torch.equal(ptq.get_param(k), lsq.get_param(k)) for k in scales)
    folded = graphopt.optimize(lsq, "fold-qdq")
    names = {str(n.target) for n in folded.nodes("call_function")}
    assert any("qconv2d" in n or "qlinear" in n for n in names)
    a, b = accuracy(lsq.gm, xte, yte), accuracy(folded.gm, xte, yte)
    assert abs(a - b) <= 0.01  # integer ops equal the Q/DQ graph up to requantization rounding


def test_qat_needs_a_quantized_graph_and_data(cnn):
    model, x = cnn
    g = graphopt.trace(model, (x,))
    with pytest.raises(graphopt.PassFailedError, match="run `quantize` first"):
        graphopt.optimize(g, "qat", data=[(x,)])
    q = graphopt.optimize(g, "quantize", data=[(x,)])
    with pytest.raises(graphopt.PassFailedError, match="needs training data"):
        graphopt.optimize(q, "qat")


def test_int4_width_is_read_from_the_weights_when_history_is_gone(digits):
    model, (xtr, _, ytr, _) = digits[0]
    g = graphopt.trace(model, (xtr[:64],))
    q = graphopt.optimize(g, INT4, data=batches(xtr)[:4])
    q.meta["history"] = []  # e.g. a graph assembled elsewhere: only the stored int4 values say the width
    out = graphopt.optimize(q, "qat{epochs=1}", data=batches(xtr)[:4], labels=label_batches(ytr)[:4])
    assert out.meta["history"][-1]["stats"]["weight_qmax"] == 7
    assert all(int(t.abs().max()) <= 7 for t in out.params().values() if t.dtype == torch.int8)


def test_qat_keeps_each_layers_width_when_int7_keeps_depthwise_int8():
    """quantize{weights=int7} leaves the depthwise conv int8: qat fake-quantizes and writes back each layer in
    its own range (one range for the graph clipped the depthwise weights to [-63, 63])."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 8, 1)).eval()
    data = [(torch.randn(2, 3, 10, 10),) for _ in range(4)]
    g = graphopt.trace(model, data[0])
    q = graphopt.optimize(g, "quantize{weights=int7},qat{epochs=1 lr=1e-3}", data=data)
    amax = [int(t.abs().max()) for t in q.params().values() if t.dtype == torch.int8]
    assert amax == [63, 127, 63], amax
    assert q.meta["history"][-1]["stats"]["weight_widths"] == {"int7": 2, "int8": 1}


def test_qat_keeps_int8s_pairs_within_the_u8s8_bound():
    """Training moves int8s weights past their pair bound; the write-back coarsens those channels' scales so every
    pair still fits the u8 x s8 kernel, and the layers keep values past int7's 63."""
    from graphopt.ir.quant_ops import PAIR_BOUND, weight_pairs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    data = [(torch.randn(2, 8, 10, 10),) for _ in range(4)]
    g = graphopt.trace(model, data[0])
    ptq = graphopt.optimize(g, "quantize{weights=int8s}", data=data)
    unrecorded = ptq.clone()
    unrecorded.meta["weight_bits"] = {}  # e.g. a graph assembled elsewhere: the stored pairs say the width
    for start in (ptq, unrecorded):
        q = graphopt.optimize(start, "qat{epochs=3 lr=0.05}", data=data)
        assert q.meta["history"][-1]["stats"]["weight_widths"] == {"int8s": 2}
        for t in (t for t in q.params().values() if t.dtype == torch.int8):
            pairs = weight_pairs(t.int())
            assert int(t.abs().max()) > 63
            assert pairs.clamp(min=0).sum(-1).max() <= PAIR_BOUND and (-pairs).clamp(min=0).sum(-1).max() <= PAIR_BOUND
