"""mixed-precision: per-layer bits from measured sensitivity meet the size budget, beat a uniform choice of the same
size on real data, land in the manifest, and bad options are clear errors; under a latency budget the layers' measured
times decide which layers become int8."""
from __future__ import annotations

import json

import pytest
import torch

import graphopt
from digits import accuracy, batches


def _weight_bytes(g):
    return sum(t.numel() * t.element_size() for t in g.params().values())


def test_meets_the_budget_and_keeps_sensitive_layers_wider(digits, tmp_path):
    model, (xtr, xte, ytr, yte) = digits[0]
    g = graphopt.optimize(graphopt.trace(model, (xtr[:64],)), "fold-bn")
    mp = graphopt.optimize(g, "mixed-precision{target=0.15}", data=batches(xtr)[:4])
    st = mp.meta["history"][-1]["stats"]
    assert st["size_fraction"] <= 0.15  # nominal bits (int4 = half a byte)
    assert _weight_bytes(mp) <= 0.27 * _weight_bytes(g)  # stored: int4 values still sit in int8 containers
    bits = st["bits"]
    assert set(bits.values()) >= {"int4"} and len(set(bits.values())) >= 2  # really mixed
    for name, b in bits.items():  # a layer kept wider is one whose int4 error is above the ones narrowed
        if b != "int4":
            assert st["sensitivity"][name]["int4"] >= min(st["sensitivity"][n]["int4"]
                                                           for n, v in bits.items() if v == "int4")
    int4_all = graphopt.optimize(g, "quantize{weights=int4 activations=none}")
    a_mp, a_int4, base = (accuracy(x.gm, xte, yte) for x in (mp, int4_all, g))
    print(f"digits: fp32 {base:.4f}, mixed ({bits}) {a_mp:.4f}, all-int4 {a_int4:.4f}")
    assert base - a_mp <= 0.01 and a_mp >= a_int4
    art = graphopt.compile(mp, "onnx", output=tmp_path / "a")
    assert json.loads((art / "manifest.json").read_text())["weight_bits"] == bits


def test_errors(cnn):
    model, x = cnn
    g = graphopt.trace(model, (x,))
    with pytest.raises(graphopt.PassOptionError, match="unsupported bit width"):
        graphopt.optimize(g, "mixed-precision{candidates=fp32,int3}")
    with pytest.raises(graphopt.PassFailedError, match="measures layers on a target"):
        graphopt.optimize(g, "mixed-precision{budget=latency}", data=[(x,)], target=None)
    with pytest.raises(graphopt.PassFailedError, match="use budget=size for --target onnx"):
        graphopt.optimize(g, "mixed-precision{budget=latency}", data=[(x,)], target="onnx")
    with pytest.raises(graphopt.PassFailedError, match="narrowest candidate"):
        graphopt.optimize(g, "mixed-precision{target=0.05 candidates=fp32,int8}")


class _FixedCosts:
    """A cost oracle with known times (the selection logic under test, not the machine): int8 halves the time of
    the two convs and doubles that of the first linear layer."""

    def __init__(self):
        self.keys = []

    def measure_variants(self, key, variants):
        self.keys.append(key)
        fp32 = 1e-3
        faster = "conv2d" in key
        return {c: fp32 if c == "fp32" else (fp32 / 2 if faster else fp32 * 2) for c in variants}


def test_latency_budget_picks_layers_by_measured_time(digits, tmp_path):
    model, (xtr, xte, ytr, yte) = digits[0]
    g = graphopt.optimize(graphopt.trace(model, (xtr[:64],)), "fold-bn")
    oracle = _FixedCosts()
    mp = graphopt.optimize(g, "mixed-precision{budget=latency target=0.9 candidates=fp32,int8}",
                           data=batches(xtr)[:4], target=oracle)
    st = mp.meta["history"][-1]["stats"]
    assert len(oracle.keys) == 4  # each layer measured once
    # 4 layers of 1 ms; 0.9 needs one conv at int8 (3.5 ms) and the pass takes the conv whose int8 error is smaller
    convs = [n for n in st["bits"] if n.startswith("conv")]
    easier = min(convs, key=lambda n: st["sensitivity"][n]["int8"])
    assert st["bits"][easier] == "int8" and list(st["bits"].values()).count("int8") == 1
    assert st["latency_fraction"] == 0.875
    folded = graphopt.optimize(mp, "fold-qdq")
    assert [str(n.target) for n in folded.graph.nodes].count("graphopt.qconv2d.default") == 1
    assert abs(accuracy(folded.gm, xte, yte) - accuracy(g.gm, xte, yte)) <= 0.01
    art = graphopt.compile(mp, "onnx", output=tmp_path / "a")
    assert json.loads((art / "manifest.json").read_text())["weight_bits"] == st["bits"]
    with pytest.raises(graphopt.PassFailedError, match="fastest measured width"):  # linears never get faster
        graphopt.optimize(g, "mixed-precision{budget=latency target=0.4 candidates=fp32,int8}",
                          data=batches(xtr)[:4], target=_FixedCosts())


def test_latency_budget_measures_on_the_cpu(tmp_path, monkeypatch):
    """The real oracle builds each layer alone in fp32 and int8 with graphopt's llvm path and times both (no time
    is asserted); a second run reads the cache."""
    from graphopt.targets.tvm.cpu.cost import CpuCostOracle
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 1), torch.nn.ReLU(), torch.nn.Conv2d(32, 8, 1)).eval()
    x = torch.rand(1, 8, 14, 14)
    g = graphopt.trace(model, (x,))
    oracle = CpuCostOracle(cache=tmp_path / "costs.json")
    mp = graphopt.optimize(g, "mixed-precision{budget=latency target=1.0 candidates=fp32,int8}",
                           data=[(torch.rand(1, 8, 14, 14),)], target=oracle)
    st = mp.meta["history"][-1]["stats"]
    assert oracle.measured == 2 and all(set(t) == {"fp32", "int8"} and min(t.values()) > 0
                                         for t in st["seconds"].values())
    again = CpuCostOracle(cache=tmp_path / "costs.json")
    graphopt.optimize(g, "mixed-precision{budget=latency target=1.0 candidates=fp32,int8}",
                      data=[(torch.rand(1, 8, 14, 14),)], target=again)
    assert again.measured == 0 and again.hits == 2


class _PairWidthCosts:
    """Known times: a pointwise conv takes 0.5 ms at int8 and 0.3 at int7 / int8s; the depthwise conv 0.9 at
    int8."""

    def __init__(self):
        self.offered = {}

    def measure_variants(self, key, variants):
        dw = "(16, 1, 3, 3)" in key
        self.offered["dw" if dw else key] = sorted(variants)
        return {c: {"fp32": 1e-3, "int8": 0.9e-3 if dw else 0.5e-3}.get(c, 0.3e-3) for c in variants}


@pytest.mark.parametrize("narrow", ["int7", "int8s"])
def test_latency_budget_mixes_int8_and_a_pair_width(narrow):
    """candidates=int8,int7 (or int8s): the narrow width is offered only to the layers a u8 x s8 kernel reads (the
    depthwise conv is timed at int8 alone), and a budget that needs one layer at it takes the pointwise conv whose
    narrower step costs the least error; that layer's pairs fit the u8 x s8 bound (int7: [-63, 63]), the others are
    full int8. Under budget=size the narrow widths are refused (they save no bytes)."""
    from graphopt.ir.quant_ops import PAIR_BOUND, weight_pairs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 1)).eval()
    x = torch.randn(1, 8, 10, 10)
    data = [(torch.randn(1, 8, 10, 10),) for _ in range(4)]
    g = graphopt.trace(model, (x,))
    oracle = _PairWidthCosts()
    # all int8: 3 x 0.5 + 0.9 = 2.4 ms; one pointwise conv narrowed makes 2.2 (0.917), under 0.94 x 2.4
    mp = graphopt.optimize(g, f"mixed-precision{{budget=latency target=0.94 candidates=int8,{narrow}}}", data=data,
                           target=oracle)
    st = mp.meta["history"][-1]["stats"]
    assert oracle.offered.pop("dw") == ["int8"] and all(v == sorted([narrow, "int8"])
                                                         for v in oracle.offered.values())
    assert list(st["bits"].values()).count(narrow) == 1 and st["bits"]["conv2d_1"] == "int8"
    pointwise = [n for n in st["bits"] if n != "conv2d_1"]
    cost = {n: st["sensitivity"][n][narrow] - st["sensitivity"][n]["int8"] for n in pointwise}
    chosen = min(cost, key=cost.get)
    assert st["bits"][chosen] == narrow, cost
    assert st["latency_fraction"] == pytest.approx(2.2 / 2.4, abs=1e-4)
    stored = {n.name: mp.get_param(n.args[1].args[0].target) for n in mp.gm.graph.nodes
              if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default}
    assert sorted(stored) == sorted(st["bits"])
    for n, q in stored.items():
        pairs = weight_pairs(q.int())
        bounded = pairs.clamp(min=0).sum(-1).max() <= PAIR_BOUND and (-pairs).clamp(min=0).sum(-1).max() <= PAIR_BOUND
        if n != chosen:
            assert int(q.abs().max()) == 127, n
        else:
            assert bounded and (int(q.abs().max()) == 63 if narrow == "int7" else int(q.abs().max()) > 63), n
    folded = graphopt.optimize(mp, "fold-qdq")
    got, ref = folded.run(x)[0], model(x).detach()
    assert float((got - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(graphopt.PassOptionError, match="saves no bytes"):
        graphopt.optimize(g, f"mixed-precision{{candidates=int8,{narrow}}}", data=data)


def test_quantize_after_it_keeps_the_layers_it_left_float(digits):
    """`mixed-precision,...,quantize`: quantize adds the activations to the layers mixed-precision narrowed and
    leaves the ones it measured and kept fp32 in float (before, quantize gave them its default int8, silently
    undoing the choice); the outputs stay within int8 tolerance of the float model."""
    model, (xtr, xte, ytr, yte) = digits[0]
    g = graphopt.optimize(graphopt.trace(model, (xtr[:64],)), "fold-bn")
    data = batches(xtr)[:4]
    mp = graphopt.optimize(g, "mixed-precision{target=0.6 candidates=fp32,int8}", data=data)
    bits = mp.meta["weight_bits"]
    assert set(bits.values()) == {"fp32", "int8"}
    q = graphopt.optimize(mp, "quantize", data=data)
    st = q.meta["history"][-1]["stats"]
    assert st["kept_fp32"] == sum(v == "fp32" for v in bits.values()) and st["weights_quantized"] == 0
    assert st["weight_bits_kept"] == sum(v == "int8" for v in bits.values())
    assert q.meta["weight_bits"] == bits
    aten = torch.ops.aten
    layers = [n for n in q.gm.graph.nodes if n.target in (aten.linear.default, aten.conv2d.default)]
    deq = {n.name for n in layers if n.args[1].target is torch.ops.graphopt.dequantize_per_channel.default}
    assert deq == {n for n, v in bits.items() if v == "int8"}
    assert abs(accuracy(q.gm, xte, yte) - accuracy(g.gm, xte, yte)) <= 0.02


def test_latency_sensitivity_replays_only_what_follows_each_layer():
    """budget=latency's sensitivity runs the float graph once per batch with its values recorded, then recomputes
    only each layer and the nodes after it (a skip connection's earlier value comes from the record): the output
    equals a whole run with that layer's input quantized and its weight replaced, bit for bit."""
    import torch.fx as fx

    from graphopt.passes.quant.mixed_precision import _dequantized, _downstream, _Recorded

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)
            self.c3, self.fc = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Linear(8, 4)

        def forward(self, x):
            a = torch.relu(self.c1(x))
            b = torch.relu(self.c2(a)) + a  # a reaches the add around c2
            return self.fc(torch.relu(self.c3(b)).mean((2, 3)))

    class Whole(fx.Interpreter):  # the definition: the whole graph run with the one layer changed
        def __init__(self, gm, node, qp, w):
            super().__init__(gm)
            self.node, self.qp, self.w = node, qp, w

        def run_node(self, n):
            if n is not self.node:
                return super().run_node(n)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            x = (torch.clamp(torch.round(args[0] / self.qp[0]) + self.qp[1], -128, 127) - self.qp[1]) * self.qp[0]
            return n.target(x, self.w, *args[2:], **kwargs)

    torch.manual_seed(0)
    g = graphopt.trace(Net().eval(), (torch.randn(2, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)
    layers = [n for n in g.gm.graph.nodes if n.op == "call_function" and n.target in
              (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    assert len(layers) == 4
    with torch.no_grad():
        rec = _Recorded(g.gm)
        rec.run(x)
        for op in layers:
            w = _dequantized(g.get_param(op.args[1].target), "int8")
            got = _Recorded(g.gm, rec.values, op, (0.05, 3), w, _downstream(op)).run(x)
            want = Whole(g.gm, op, (0.05, 3), w).run(x)
            got, want = (v[0] if isinstance(v, (tuple, list)) else v for v in (got, want))
            assert torch.equal(got, want), op.name
            ref = g.gm(x)
            assert not torch.equal(got, ref[0] if isinstance(ref, (tuple, list)) else ref), op.name  # it reached


def test_batch_norms_fold_first_so_the_int8_layers_stay_whole(digits):
    """mixed-precision rounds weights in place; a batch norm left after one of them could not fold any more (its
    layer's weight is computed) and would run in float after the int8 conv. It folds them first, as quantize does:
    the same graph as fold-bn,mixed-precision."""
    model, (xtr, xte, _, _) = digits[0]
    g = graphopt.trace(model, (xtr[:64],))
    bns = sum(1 for n in g.nodes("call_function") if "batch_norm" in str(n.target))
    pipe = "mixed-precision{target=0.2},quantize,fold-qdq"
    mp = graphopt.optimize(g, pipe, data=batches(xtr)[:4])
    assert mp.meta["history"][0]["stats"]["batch_norms_folded"] == bns >= 2
    assert not any("batch_norm" in str(n.target) for n in mp.nodes("call_function"))
    ref = graphopt.optimize(g, "fold-bn," + pipe, data=batches(xtr)[:4])
    assert mp.meta["weight_bits"] == ref.meta["weight_bits"]
    torch.testing.assert_close(mp.run(xte[:64])[0], ref.run(xte[:64])[0], rtol=0, atol=0)
