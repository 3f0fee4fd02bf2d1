"""fold-pad: symmetric zero pads move into conv padding (exact); others stay, with the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graphopt


class SamePad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.b = nn.Conv2d(8, 8, 3, stride=2)
        self.c = nn.Conv2d(8, 4, 5, padding=1)

    def forward(self, x):
        x = self.a(F.pad(x, (1, 1, 1, 1)))            # symmetric: folds
        x = self.b(F.pad(torch.relu(x), (0, 1, 0, 1)))  # TF "same" at stride 2: asymmetric, stays
        return self.c(F.pad(x, (2, 2, 2, 2)))          # adds to the conv's own padding


def pads(g):
    return [n for n in g.graph.nodes if n.op == "call_function" and "pad" in str(n.target)]


def test_symmetric_pads_fold_and_outputs_are_exact():
    torch.manual_seed(0)
    m = SamePad().eval()
    x = torch.randn(1, 3, 16, 16)
    g = graphopt.trace(m, (x,))
    assert len(pads(g)) == 3
    out = graphopt.optimize(g, "fold-pad", verify=True)
    assert len(pads(out)) == 1
    rec = out.meta["history"][0]
    assert rec["stats"]["folded"] == 2 and "asymmetric" in next(iter(rec["stats"]["kept"].values()))
    torch.testing.assert_close(out.run(x)[0], m(x), rtol=1e-5, atol=1e-6)
    convs = [n for n in out.graph.nodes if "conv2d" in str(n.target)]
    assert list(convs[0].args[4]) == [1, 1] and list(convs[2].args[4]) == [3, 3]


def test_nonzero_pad_is_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.c(F.pad(x, (1, 1, 1, 1), value=1.0))

    g = graphopt.trace(M().eval(), (torch.randn(1, 2, 6, 6),))
    with pytest.raises(graphopt.PassFailedError, match="pads with 1.0, not zero"):
        graphopt.optimize(g, "fold-pad", strict=True)
