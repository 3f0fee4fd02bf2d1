"""Complex tensors computed as (real, imag) pairs (`targets/tvm/complex.py`): Meta's Llama rotary embedding
(view_as_complex, a complex64 freqs_cis buffer, a complex product, view_as_real) did not import; now it and the
other complex ops it is written with match PyTorch, and what is outside them is refused by name."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import UnsupportedOpError
from tests.targets.test_more_ops import _Fn, _check


class LlamaRope(torch.nn.Module):
    """apply_rotary_emb as Meta's reference Llama writes it, with its precomputed complex freqs_cis buffer."""

    def __init__(self, dim: int = 8, end: int = 16):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("freqs_cis", torch.polar(torch.ones(end, dim // 2),
                                                      torch.outer(torch.arange(end).float(), freqs)))

    def forward(self, xq, xk):
        b, s, h, d = xq.shape
        xq_ = torch.view_as_complex(xq.float().reshape(b, s, h, -1, 2))
        xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
        f = self.freqs_cis[:s].view(1, s, 1, d // 2)
        return torch.view_as_real(xq_ * f).flatten(3).type_as(xq), torch.view_as_real(xk_ * f).flatten(3).type_as(xk)


def test_llama_rotary_embedding_matches_torch():
    g = torch.Generator().manual_seed(0)
    _check(LlamaRope().eval(), torch.randn(1, 6, 2, 8, generator=g), torch.randn(1, 6, 3, 8, generator=g),
           rtol=1e-5, atol=1e-6)


def test_complex_ops_match_torch():
    """polar built in the model, abs, angle, products and quotients of complex with complex / real / numbers,
    conj, exp, real parts, reciprocal, permute / unsqueeze on complex values."""
    g = torch.Generator().manual_seed(0)
    a, b, f = torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, 2, generator=g), torch.randn(4, 3, generator=g)
    c = torch.view_as_complex
    r = torch.view_as_real
    _check(lambda a, b, f: (r(c(a) * torch.polar(torch.ones_like(f), f)), c(a).abs(), c(a).angle(),
                            r(c(a) / c(b)), r(c(a) / f), r(f / c(b)), r(c(a).conj() + 1.0),
                            r(torch.complex(a[..., 0], b[..., 1]).exp()), c(a).real * 2,
                            r(c(a).permute(1, 0).unsqueeze(0) - f.t()), r(2.0 / c(b)), r(f - c(a) * 3.0)),
           a, b, f, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn,match", [
    (lambda x: torch.view_as_complex(x), "output .* is complex"),
    (lambda x: torch.view_as_real(torch.fft.fft(torch.view_as_complex(x))), "outside those graphopt rewrites"),
], ids=["complex-output", "fft"])
def test_complex_outside_the_rewrites_is_refused_by_name(fn, match):
    from graphopt.targets.tvm.lower import lower_to_relax
    with pytest.raises(UnsupportedOpError, match=match):
        lower_to_relax(graphopt.trace(_Fn(fn), (torch.randn(4, 3, 2),)))
