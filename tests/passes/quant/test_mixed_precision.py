"""mixed-precision: per-layer bits from measured sensitivity meet the size budget, beat a uniform choice of the same
size on real data, land in the manifest, and bad options are clear errors."""
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
    with pytest.raises(graphopt.PassFailedError, match="budget=latency"):
        graphopt.optimize(g, "mixed-precision{budget=latency}")
    with pytest.raises(graphopt.PassFailedError, match="narrowest candidate"):
        graphopt.optimize(g, "mixed-precision{target=0.05 candidates=fp32,int8}")
