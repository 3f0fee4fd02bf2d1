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
    _check_topk(TopK(k, largest=largest).eval(), x, "topk_")


def _check_topk(model, x, kernel: str):
    """`model` (a TopK) lowers to a kernel whose name starts `kernel`, and its build gives PyTorch's values (NaN
    where it has NaN) and indices."""
    assert any(n.startswith(kernel) for n in _names(model, x))
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


class ArgExtreme(torch.nn.Module):
    def __init__(self, largest, dim, keepdim=False):
        super().__init__()
        self.largest, self.dim, self.keepdim = largest, dim, keepdim

    def forward(self, x):
        fn = torch.argmax if self.largest else torch.argmin
        return fn(x) if self.dim is None else fn(x, self.dim, self.keepdim)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("shape,dim,keepdim,kernel", [
    ((64, 512), -1, False, "64x512x1"),  # a classifier's / greedy decoder's rows
    ((3, 4, 37), -1, True, "12x37x1"),  # a tail past whole vectors
    ((2, 21, 16, 16), 1, False, "2x21x256"),  # a segmentation head's classes over its pixels
    ((4, 8, 24), 1, False, "4x8x24"),
    ((5, 100), None, False, "1x500x1"),  # over everything: the flat index
    ((4, 12), 1, False, None),  # under two vectors a row: Relax's argmax
])
def test_argmax_argmin_run_the_selection_kernel(shape, dim, keepdim, kernel, largest):
    """argmax / argmin of float32 rows or over an axis with whole vectors behind it on one pass per run (Relax's
    argmax: 534 us for 1024 x 512, plus a NaN search after it); PyTorch's answers with ties (the first index), a
    NaN (the first NaN's index) and a row of -inf (Relax's argmax, kept under two vectors a row, answered -1 there:
    it is clamped to 0)."""
    torch.manual_seed(0)
    x = torch.randint(-3, 4, shape).float()  # many ties
    x.view(-1)[11] = float("nan")
    x.view(-1)[40] = float("nan")
    x.view(-1, shape[-1])[1] = float("-inf")  # a whole last-axis run
    model = ArgExtreme(largest, dim, keepdim)
    names = _names(model, x)
    name = ("argmax_" if largest else "argmin_") + (kernel or "")
    assert (name in names) if kernel else not any(n.startswith(("argmax_", "argmin_")) for n in names), names
    got = _run_all(graphopt.trace(model, (x,)), x)[0]
    np.testing.assert_array_equal(got, model(x).numpy())


class Sort(torch.nn.Module):
    def __init__(self, descending, stable, dim=-1):
        super().__init__()
        self.descending, self.stable, self.dim = descending, stable, dim

    def forward(self, x):
        if self.stable:
            return torch.sort(x, dim=self.dim, descending=self.descending, stable=True)
        return torch.sort(x, self.dim, self.descending)


@pytest.mark.parametrize("shape,descending,stable,kernel", [
    ((1024, 64), True, False, "sort_desc_1024x64"),  # TabNet's sparsemax: 2.9 ms on TVM's argsort, ~0.22 here
    ((37, 24), False, True, "sort_asc_37x24"),  # rows not a whole number of vector groups, padded to 32
    ((3, 5, 200), True, True, "sort_desc_15x200"), ((6, 2), False, False, "sort_asc_6x2"),
    ((700, 3), False, False, None)])  # (along the other axis below: the converter before)
def test_sort_runs_the_sorting_network(shape, descending, stable, kernel):
    """torch.sort along the last axis of rows up to 256: values and indices equal PyTorch's stable sort with NaN
    (the largest), infinities, ties (index order) and -0.0 among them, both directions."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    flat = x.view(-1)
    flat[3], flat[7], flat[9], flat[min(20, flat.numel() - 1)] = float("nan"), float("inf"), float("-inf"), -0.0
    flat[10:min(20, flat.numel())] = 0.5
    model = Sort(descending, stable, dim=0 if kernel is None else -1).eval()
    names = _names(model, x)
    if kernel is None:
        assert not any(n.startswith("sort_") for n in names), names
    else:
        assert kernel in names, names
    got_v, got_i = _run_all(graphopt.trace(model, (x,)), x)
    want_v, want_i = torch.sort(x, dim=model.dim, descending=descending, stable=True)
    np.testing.assert_array_equal(got_v, want_v.numpy())
    np.testing.assert_array_equal(got_i, want_i.numpy())


def test_topk_of_short_rows_runs_the_sorting_network():
    """topk over rows of up to 256 (an ONNX export's TopK of a whole row, torch.sort's form there) takes the
    sorting network and its first k: PyTorch's values and indices, NaN first when largest."""
    torch.manual_seed(0)
    x = torch.randn(300, 64)
    x[0, 5] = float("nan")  # (no ties: PyTorch's topk leaves their order open)
    for k, largest in ((64, True), (10, False)):
        _check_topk(TopK(k, largest=largest).eval(), x, "sort_")
