"""Complex tensors computed as (real, imag) pairs (`targets/tvm/complex.py`): Meta's Llama rotary embedding
(view_as_complex, a complex64 freqs_cis buffer, a complex product, view_as_real) did not import; now it and the
other complex ops it is written with match PyTorch, and what is outside them is refused by name."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.errors import UnsupportedOpError
from graphopt.targets.tvm.complex import complex_as_real
from tests.targets.test_missing_ops import _run_all
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


V = torch.view_as_real
FFTS = {
    "fft": lambda x: V(torch.fft.fft(x)),
    "fft-n-dim-ortho": lambda x: V(torch.fft.fft(x, n=10, dim=1, norm="ortho")),  # zero-padded, a middle axis
    "ifft-of-fft": lambda x: V(torch.fft.ifft(torch.fft.fft(x, dim=-2), dim=-2)),
    "rfft-cut-forward": lambda x: V(torch.fft.rfft(x, n=7, norm="forward")),  # cut to 7, an odd length
    "irfft-n": lambda x: (torch.fft.irfft(torch.fft.rfft(x)), torch.fft.irfft(torch.fft.rfft(x), n=9),
                          torch.fft.irfft(torch.fft.rfft(x)[..., :4], n=16)),  # fewer bins than n // 2 + 1
    "fnet": lambda x: torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real,  # FNet's token mixing
    "fft2": lambda x: torch.fft.fft2(x).imag,
    "gfnet": lambda x: torch.fft.irfft2(torch.fft.rfft2(x, norm="ortho") * torch.polar(torch.ones(8, 7),
                                                                                        torch.ones(8, 7)),
                                        s=x.shape[-2:], norm="ortho"),  # GFNet's global filter
    "rfftn-s": lambda x: V(torch.fft.rfftn(x, s=(6, 6), norm="ortho")),
    "ifftn": lambda x: V(torch.fft.ifftn(x, dim=(0, 2))),
    "abs-rfft": lambda x: torch.fft.rfft(x).abs(),
}


@pytest.mark.parametrize("name", list(FFTS))
def test_ffts_are_dft_matrix_gemms_and_match_torch(name):
    """torch.fft's transforms of every kind (norms, sizes cut or padded, 1-D / 2-D / n-D, chosen axes) as one
    DFT-matrix linear per axis over the interleaved (re, im) values: no FFT left in the lowered graph."""
    from graphopt.targets.tvm.lower import lower_to_relax
    x = torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(0))
    text = lower_to_relax(graphopt.trace(_Fn(FFTS[name]), (x,))).script()
    assert "fft" not in text.replace("_dft_matrix", ""), text
    _check(FFTS[name], x, rtol=1e-5, atol=2e-5)


LONG_FFTS = {  # lengths past FOUR_STEP_MIN with a divisor pair: two short DFTs and twiddles
    "fft-512": (lambda x: V(torch.fft.fft(x)), (3, 512), 512),
    "ifft-600-middle-ortho": (lambda x: V(torch.fft.ifft(x, dim=1, norm="ortho").resolve_conj()), (2, 600, 3), 600),
    "rfft-padded": (lambda x: V(torch.fft.rfft(x, n=512)), (3, 300), 512),  # a long conv's zero padding
    "rfft-cut-forward": (lambda x: V(torch.fft.rfft(x, n=300, norm="forward")), (2, 333), 300),
    "irfft-long-conv": (lambda x: torch.fft.irfft(torch.fft.rfft(x, n=512) * 1.5, n=512)[..., :256], (2, 256), 512),
    "irfft-odd": (lambda x: torch.fft.irfft(torch.fft.rfft(x), n=375), (2, 375), 375),
    "irfft-few-bins": (lambda x: torch.fft.irfft(torch.fft.rfft(x)[..., :100], n=512), (2, 512), 512),
    "fft2-256": (lambda x: torch.fft.fft2(x).real, (2, 256, 256), 256),
    "prime-257": (lambda x: V(torch.fft.fft(x)), (2, 257), 257),  # no divisor pair: the matrix
}


@pytest.mark.parametrize("name", list(LONG_FFTS))
def test_long_ffts_run_as_two_short_dfts_and_match_torch(name):
    """A transform of n = n1 n2 >= 256 points runs as n1- and n2-point DFT matrices with the twiddles between
    (Cooley-Tukey's four steps: 4 n (n1 + n2) multiply-adds a row, not 4 n^2; a Hyena-style long conv over 1024
    steps, rfft / irfft at 2048 points, 16.9 -> 7.9 ms): no matrix of n x n is built; cut, padded, odd, inverse,
    middle-axis and 2-D transforms match torch. A prime length keeps the matrix."""
    fn, shape, n = LONG_FFTS[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g = complex_as_real(graphopt.trace(_Fn(fn), (x,)))
    widest = max(max(b.shape) for k, b in g.gm.named_buffers() if k.startswith("_dft_matrix"))
    assert (widest >= n) == (name == "prime-257"), widest
    _check(fn, x, rtol=1e-5, atol=3e-6 * max(1.0, float(fn(x).abs().max())))


class SpectralConv(torch.nn.Module):
    """A Fourier neural operator layer: rfft2, a complex einsum on the low modes written into zeros, irfft2."""
    def __init__(self, c=4, modes=4):
        super().__init__()
        self.modes = modes
        self.w = torch.nn.Parameter(torch.randn(c, c, modes, modes, dtype=torch.cfloat) * 0.1)
        self.skip = torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        f = torch.fft.rfft2(x)
        out = torch.zeros_like(f)
        m = self.modes
        out[:, :, :m, :m] = torch.einsum("bixy,ioxy->boxy", f[:, :, :m, :m], self.w)
        return torch.nn.functional.gelu(torch.fft.irfft2(out, s=x.shape[-2:]) + self.skip(x))


def test_fourier_neural_operator_layer_matches_torch():
    """A complex einsum with a complex weight, a slice of complex zeros written in place, both transforms."""
    torch.manual_seed(0)
    _check(SpectralConv().eval(), torch.randn(2, 4, 16, 16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn,match", [
    (lambda x: torch.view_as_complex(x), "output .* is complex"),
    (lambda x: torch.fft.hfft(torch.view_as_complex(x)), "torch.fft.hfft"),
    (lambda x: torch.view_as_real(torch.view_as_complex(x).sqrt()), "outside those graphopt rewrites"),
], ids=["complex-output", "hfft", "sqrt"])
def test_complex_outside_the_rewrites_is_refused_by_name(fn, match):
    from graphopt.targets.tvm.lower import lower_to_relax
    with pytest.raises(UnsupportedOpError, match=match):
        lower_to_relax(graphopt.trace(_Fn(fn), (torch.randn(4, 3, 2),)))


@pytest.mark.parametrize("opset,shape,attrs,length,axis", [
    (20, (2, 12, 1), {}, None, None),  # a real signal, the default axis (-2)
    (20, (2, 12, 2), {"inverse": 1}, None, None),
    (20, (3, 10, 6, 1), {"onesided": 1}, 8, 1),  # RFFT, cut to 8, a middle axis
    (20, (2, 7, 2), {"onesided": 1, "inverse": 1}, None, None),  # IRFFT: 12 real samples
    (17, (2, 12, 5, 2), {}, 16, 1),  # opset 17: the axis an attribute; zero-padded to 16
])
def test_onnx_dft_imports_as_torch_fft_and_matches_numpy(tmp_path, opset, shape, attrs, length, axis):
    """ONNX DFT (real or (re, im) inputs, inverse, onesided both ways, dft_length, opset 17's attribute axis and
    20's input) imports as torch.fft's transforms, which build as DFT-matrix GEMMs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    inits, ins = [], ["x", "", ""]  # (x, dft_length, axis), empty names for absent inputs
    if length is not None:
        ins[1] = "len"
        inits.append(helper.make_tensor("len", TensorProto.INT64, [], [length]))
    if opset >= 20 and axis is not None:
        ins[2] = "axis"
        inits.append(helper.make_tensor("axis", TensorProto.INT64, [], [axis]))
    elif axis is not None:
        attrs = dict(attrs, axis=axis)
    while not ins[-1]:
        ins.pop()
    node = helper.make_node("DFT", ins, ["y"], **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ax = (axis if axis is not None else -2) % len(shape)
    z = x[..., 0] if shape[-1] == 1 else x[..., 0] + 1j * x[..., 1]
    if attrs.get("onesided") and attrs.get("inverse"):
        want = np.fft.irfft(z, n=length, axis=ax)[..., None]
    elif attrs.get("onesided"):
        want = np.fft.rfft(z, n=length, axis=ax)
    else:
        want = (np.fft.ifft if attrs.get("inverse") else np.fft.fft)(z, n=length, axis=ax)
    if np.iscomplexobj(want):
        want = np.stack([want.real, want.imag], -1)
    got = _run_all(graphopt.load_onnx(str(path)), torch.from_numpy(x))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_equal_dft_matrices_are_one_buffer():
    """Two transforms of one size and kind (FNet's layers) share their DFT matrix; another size gets its own."""
    from graphopt.targets.tvm.complex import complex_as_real
    fn = lambda x: (torch.fft.fft(x).real + torch.fft.fft(x * 2).real,  # noqa: E731
                    torch.fft.fft(x[..., :6]).imag)
    x = torch.randn(2, 8, 12)
    g = complex_as_real(graphopt.trace(_Fn(fn), (x,)))
    assert sorted(n for n, _ in g.gm.named_buffers() if n.startswith("_dft_matrix")) == ["_dft_matrix_0",
                                                                                        "_dft_matrix_1"]
    _check(fn, x, rtol=1e-5, atol=2e-5)


class _Stft(torch.nn.Module):
    def __init__(self, window: bool, **kw):
        super().__init__()
        self.window, self.kw = window, kw

    def forward(self, x, w):
        return torch.view_as_real(torch.stft(x, window=w if self.window else None, return_complex=True, **self.kw))


@pytest.mark.parametrize("shape,kw,win", [
    ((2, 400), dict(n_fft=64, hop_length=16), 64),  # centred, reflect-padded, a Hann window
    ((1000,), dict(n_fft=128), 128),  # one signal, the default hop (n_fft / 4)
    ((3, 300), dict(n_fft=64, hop_length=20, win_length=40, center=False), 40),  # a short window, centred in n_fft
    ((2, 256), dict(n_fft=32, hop_length=8, normalized=True, onesided=False, pad_mode="constant"), 32),
    ((2, 256), dict(n_fft=32, hop_length=8), None),  # no window: rectangular
])
def test_stft_is_frames_times_a_dft_matrix_and_matches_torch(shape, kw, win):
    """torch.stft (audio front ends: spectrograms, mel features) was refused by name: it is the frames gathered by
    one constant index, times the window, times a DFT matrix (one GEMM), as PyTorch's [..., freq, frames]."""
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.hann_window(win or 8)
    _check(_Stft(win is not None, **kw), x, w, rtol=1e-5, atol=2e-5 * 8)


def test_onnx_stft_imports_and_matches_numpy(tmp_path):
    """ONNX STFT (opset 17; what torch.onnx.export writes for torch.stft): frame step and window as inputs, the
    frame length the window's; [batch, frames, bins, (re, im)] against numpy's FFT of the windowed frames."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    n_fft, hop, length = 32, 10, 200
    win = np.hanning(n_fft + 1)[:-1].astype(np.float32)
    inits = [helper.make_tensor("step", TensorProto.INT64, [], [hop]),
             helper.make_tensor("win", TensorProto.FLOAT, [n_fft], win.tolist())]
    node = helper.make_node("STFT", ["x", "step", "win"], ["y"], onesided=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, length, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    path = tmp_path / "stft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(0).standard_normal((2, length, 1)).astype(np.float32)
    frames = 1 + (length - n_fft) // hop
    idx = np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]
    want = np.fft.rfft(x[:, idx, 0] * win, axis=-1)
    want = np.stack([want.real, want.imag], -1)
    got = _run_all(graphopt.load_onnx(str(path)), torch.from_numpy(x))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_a_squared_magnitude_is_re2_plus_im2():
    """abs(z) ** 2 (a spectrogram's power) reads the (re, im) pair as re^2 + im^2, no hypot then square; an abs
    with another user keeps its hypot for that one."""
    from graphopt.targets.tvm.complex import complex_as_real
    x = torch.randn(2, 256)
    power = lambda x: torch.stft(x, 32, 8, window=torch.hann_window(32), return_complex=True).abs().pow(2)  # noqa: E731
    g = complex_as_real(graphopt.trace(_Fn(power), (x,)))
    assert not any("hypot" in str(n.target) for n in g.gm.graph.nodes)
    _check(power, x, rtol=1e-5, atol=1e-4)
    both = lambda x: (lambda a: (a.pow(2), a + 1))(torch.fft.rfft(x).abs())  # noqa: E731
    g = complex_as_real(graphopt.trace(_Fn(both), (x,)))
    assert any("hypot" in str(n.target) for n in g.gm.graph.nodes)
    _check(both, x, rtol=1e-5, atol=1e-4)


def test_stfts_of_one_geometry_share_their_frame_index_and_dft_matrix():
    """Two STFTs of one size (a stereo pair's channels) gather their frames by one index buffer and share one DFT
    matrix; the DFT matrices keep their own numbering."""
    from graphopt.targets.tvm.complex import complex_as_real
    spec = lambda x: torch.stft(x, 32, 8, window=torch.hann_window(32), return_complex=True).abs()  # noqa: E731
    fn = lambda x: spec(x[:, 0]) + spec(x[:, 1])  # noqa: E731
    x = torch.randn(2, 2, 256)
    g = complex_as_real(graphopt.trace(_Fn(fn), (x,)))
    buffers = sorted(n for n, _ in g.gm.named_buffers() if n.startswith(("_stft_frames", "_dft_matrix")))
    assert buffers == ["_dft_matrix_0", "_stft_frames_33x32s8"], buffers
    _check(fn, x, rtol=1e-5, atol=1e-4)
