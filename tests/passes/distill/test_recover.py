"""recover (KD fine-tune) and the goal of prune-channels on real data: sklearn digits, >= 50% MACs removed,
<= 0.5 points accuracy lost after distillation (mean over 3 seeds)."""
from __future__ import annotations

import pytest
import torch

import graphopt
from digits import accuracy, batches

PIPE = "fold-bn,prune-channels{macs-reduction=0.5},recover{epochs=20 lr=1e-3}"


def test_digits_prune_half_the_macs_and_recover_with_distillation(digits):
    drops, before_recovery = [], []
    for seed, (model, (xtr, xte, ytr, yte)) in enumerate(digits):
        base = accuracy(model, xte, yte)
        assert base > 0.97
        g = graphopt.trace(model, (xtr[:64],))
        out = graphopt.optimize(g, PIPE, data=batches(xtr), seed=seed)
        assert out.stats().macs <= 0.5 * g.stats().macs
        pruned_only = graphopt.optimize(g, "fold-bn,prune-channels{macs-reduction=0.5}")
        before_recovery.append(base - accuracy(pruned_only.gm, xte, yte))
        drops.append(base - accuracy(out.gm, xte, yte))
        assert out.meta["history"][2]["stats"]["loss_last"] < out.meta["history"][2]["stats"]["loss_first"]
    mean_drop = sum(drops) / 3
    print(f"digits: accuracy drop after prune (50% MACs) {[round(d * 100, 2) for d in before_recovery]} points, "
          f"after KD recovery {[round(d * 100, 2) for d in drops]} (mean {mean_drop * 100:.2f})")
    assert mean_drop <= 0.005
    assert sum(before_recovery) / 3 > mean_drop  # recovery really recovered something


def test_recover_errors_are_clear(cnn):
    model, x = cnn
    g = graphopt.trace(model, (x,))
    with pytest.raises(graphopt.PassFailedError, match="recover needs training data"):
        graphopt.optimize(g, "recover")
    with pytest.raises(graphopt.PassOptionError, match="'epochs' must be >= 1"):
        graphopt.optimize(g, "recover{epochs=0}")


def test_divergence_names_the_step_and_leaves_input_untouched(cnn):
    model, x = cnn
    g = graphopt.trace(model, (x,))
    before = {k: v.clone() for k, v in g.params().items()}
    with pytest.raises(graphopt.PassFailedError, match="diverged: loss is (nan|inf) at step \\d+"):
        graphopt.optimize(g, "recover{epochs=2 lr=1e30}", data=[(x * 1e20,), (x,)])
    assert all(torch.equal(before[k], v) for k, v in g.params().items())
