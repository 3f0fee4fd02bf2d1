"""torch.topk over long rows on the selection kernel (`targets/tvm/cpu/select.py`): one pass a row keeping the k
best, instead of sorting the row (CenterNet's 10 of 49152: 2.2 ms -> ~0.1). Checked against PyTorch with NaN,
infinities and ties (equal values in index order), both directions, several rows; what it does not take keeps the
sorting converter."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets.tvm.lower import lower_to_relax

from tests.targets.test_missing_ops import _run_all


class TopK(torch.nn.Module):
    def __init__(self, k, dim=-1, largest=True):
        super().__init__()
        self.k, self.dim, self.largest = k, dim, largest

    def forward(self, x):
        return torch.topk(x, self.k, self.dim, self.largest)


def _names(model, x):
    return {gv.name_hint for gv in lower_to_relax(graphopt.trace(model, (x,))).get_global_vars()}


@pytest.mark.parametrize("shape,k,largest", [((1, 3 * 64 * 64), 10, True), ((4, 700), 7, False),
                                             ((2, 3, 600), 64, True), ((1, 2048), 1, False)])
def test_topk_of_long_rows_runs_the_selection_kernel(shape, k, largest):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x.view(-1, shape[-1])[0, 5] = float("nan")  # NaN: the largest (first when largest, last when smallest)
    x.view(-1, shape[-1])[0, 7:10] = 2.5  # ties: in index order
    x.view(-1, shape[-1])[-1, 11], x.view(-1, shape[-1])[-1, 12] = float("inf"), float("-inf")
    model = TopK(k, largest=largest).eval()
    assert any(n.startswith("topk_") for n in _names(model, x))
    got_v, got_i = _run_all(graphopt.trace(model, (x,)), x)
    want_v, want_i = model(x)
    np.testing.assert_array_equal(np.nan_to_num(got_v, nan=7.0), np.nan_to_num(want_v.numpy(), nan=7.0))
    np.testing.assert_array_equal(got_i, want_i.numpy())


@pytest.mark.parametrize("shape,k,dim", [((2, 300), 5, -1), ((1, 4096), 100, -1), ((600, 3), 2, 0)])
def test_topk_the_kernel_does_not_take_keeps_the_sort(shape, k, dim):
    """Short rows, k past 64, another axis: the sorting converter (same answers)."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = TopK(k, dim).eval()
    assert not any(n.startswith("topk_") for n in _names(model, x))
    got_v, got_i = _run_all(graphopt.trace(model, (x,)), x)
    want_v, want_i = model(x)
    np.testing.assert_array_equal(got_v, want_v.numpy())
    np.testing.assert_array_equal(got_i, want_i.numpy())
