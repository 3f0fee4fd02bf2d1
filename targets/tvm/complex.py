"""Complex tensors as (real, imag) pairs, for TVM, which has no complex dtype: rotary embeddings written as Meta's
Llama reference writes them (`torch.view_as_complex`, `torch.polar`, a complex64 `freqs_cis` buffer, a complex
product, `torch.view_as_real`) did not import ("no converter for view_as_complex").

`complex_as_real` rewrites the graph before it is exported to TVM: every complex value becomes a float tensor with
a trailing axis of 2 (view_as_real's layout), complex buffers are stored that way, and the ops on them become real
arithmetic (a product: four multiplies). Shape ops move their dims off the trailing pair. FFTs (torch.fft's fft,
ifft, rfft, irfft and their 2-D / n-D forms: FNet, GFNet, Fourier neural operators) become one GEMM per axis with a
constant DFT matrix over the interleaved (real, imag) values, which graphopt's packed GEMM runs (from 256 points,
where the length has a divisor pair n1 n2, two short DFT matrices with twiddles between: `fast_dft`); complex
einsums and matmuls are four real ones. An op on a complex value outside the list is refused by name; so are complex inputs and
outputs (a model's inputs and outputs stay real)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import fx

from graphopt.errors import UnsupportedOpError
from graphopt.ir.graph import Graph
from graphopt.ir.printer import target_name

aten = torch.ops.aten


def _is_complex(v) -> bool:
    val = v.meta.get("val") if isinstance(v, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_complex()


def has_complex(graph: Graph) -> bool:
    """Whether any value or parameter of the graph is complex."""
    return any(_is_complex(n) for n in graph.gm.graph.nodes) or any(
        t.is_complex() for _, t in list(graph.gm.named_parameters()) + list(graph.gm.named_buffers()))


class _Rewriter:
    def __init__(self, graph: Graph):
        self.g = graph
        self.new = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.constants: dict[tuple, str] = {}
        self.frame_indices: dict[tuple[int, int, int], str] = {}  # (frames, n_fft, hop) -> an STFT's frame index

    # ---- building blocks on the new graph (z: a complex value as [..., 2]) ----------------------------------
    def call(self, op, *args, **kwargs) -> fx.Node:
        return self.new.call_function(op, args, kwargs)

    def re(self, z):
        return self.call(aten.select.int, z, -1, 0)

    def im(self, z):
        return self.call(aten.select.int, z, -1, 1)

    def pack(self, re, im):
        return self.call(aten.stack.default, [re, im], -1)

    def real_as_pair(self, x):
        return self.pack(x, self.call(aten.zeros_like.default, x))

    def product(self, a, b):
        ar, ai, br, bi = self.re(a), self.im(a), self.re(b), self.im(b)
        mul, sub, add = aten.mul.Tensor, aten.sub.Tensor, aten.add.Tensor
        return self.pack(self.call(sub, self.call(mul, ar, br), self.call(mul, ai, bi)),
                         self.call(add, self.call(mul, ar, bi), self.call(mul, ai, br)))

    def conj(self, z):
        return self.pack(self.re(z), self.call(aten.neg.default, self.im(z)))

    # ---- the rewrite -------------------------------------------------------------------------------------------
    def refuse(self, node: fx.Node, why: str):
        raise UnsupportedOpError(node.name, target_name(node.target) if node.op == "call_function" else node.op,
                                 f"{why}; graphopt computes complex tensors as (real, imag) pairs for rotary "
                                 "embeddings and FFTs (view_as_complex / view_as_real, polar, complex, products, "
                                 "sums, conj, abs, angle, exp, reciprocal, einsum / matmul, torch.fft's fft / "
                                 "ifft / rfft / irfft and their 2-D / n-D forms, torch.stft, shape ops): compute "
                                 "this part outside the model, or use --target pt2")

    # ---- FFTs as DFT matrices -----------------------------------------------------------------------------------
    def constant(self, value: np.ndarray) -> fx.Node:
        """A DFT matrix as a buffer, one per distinct matrix (FNet's and GFNet's layers share theirs)."""
        value = np.ascontiguousarray(value, np.float32)
        key = (value.shape, value.tobytes())
        if key not in self.constants:
            self.constants[key] = f"_dft_matrix_{len(self.constants)}"
            self.g.gm.register_buffer(self.constants[key], torch.from_numpy(value))
        return self.new.get_attr(self.constants[key])

    def axis_last(self, x, shape: list[int], dim: int):
        """x (a pair or real tensor of `shape`) with axis `dim` swapped with the last (complex) axis, and the shape
        of the axes before it then."""
        last = len(shape) - 1
        if dim != last:
            x = self.call(aten.transpose.int, x, dim, last)
        moved = list(shape)
        moved[dim], moved[last] = moved[last], moved[dim]
        return x, moved[:-1]

    def along(self, x, shape: list[int], dim: int, pair: bool, width_in: int, matrix: np.ndarray, out: int,
              pair_out: bool):
        """x (a pair tensor of complex `shape`, or a real one of `shape`) with its axis `dim` (of `width_in`
        entries, interleaved with the pair's) multiplied by `matrix` [out entries (x2 when pair_out), width_in
        (x2 when pair)]: the axis moved last (beside the pair), flattened with it, one linear, moved back.
        Returns (the value, its new complex / real shape)."""
        last = len(shape) - 1
        x, lead = self.axis_last(x, shape, dim)
        x = self.call(aten.reshape.default, x, [*lead, width_in * (2 if pair else 1)])
        y = self.call(aten.linear.default, x, self.constant(matrix))
        y = self.call(aten.reshape.default, y, [*lead, out, 2] if pair_out else [*lead, out])
        if dim != last:
            y = self.call(aten.transpose.int, y, dim, last)
        shape = list(shape)
        shape[dim] = out
        return y, shape

    @staticmethod
    def dft(rows: int, n: int, cols: int, sign: float, scale: float) -> np.ndarray:
        """M [rows, cols] = scale exp(sign 2 pi i j k / n) for input rows j < n (rows past n are cut: zero),
        output entries k < cols."""
        j = np.arange(rows)[:, None]
        k = np.arange(cols)[None, :]
        m = scale * np.exp(sign * 2j * np.pi * (j * k % n) / n)
        m[j[:, 0] >= n] = 0
        return m

    @staticmethod
    def interleaved(m: np.ndarray, real_in: bool) -> np.ndarray:
        """The linear weight [2 cols, 2 rows] (or [2 cols, rows] for a real input) computing y = x M on values
        interleaved as (re, im) pairs."""
        rows, cols = m.shape
        if real_in:
            w = np.empty((2 * cols, rows))
            w[0::2], w[1::2] = m.real.T, m.imag.T
            return w
        w = np.empty((2 * cols, 2 * rows))
        w[0::2, 0::2], w[0::2, 1::2] = m.real.T, -m.imag.T
        w[1::2, 0::2], w[1::2, 1::2] = m.imag.T, m.real.T
        return w

    @staticmethod
    def scale(norm, n: int, inverse: bool) -> float:
        norm = norm or "backward"
        if norm == "ortho":
            return 1 / math.sqrt(n)
        return 1 / n if (norm == "backward") == inverse else 1.0

    def fast_dft(self, z, shape: list[int], d: int, sign: float, scale: float):
        """z (a pair tensor of complex `shape`) with its axis d transformed by a DFT of its own length n = n1 n2
        as two short ones (Cooley-Tukey's four steps): entry j = j1 n2 + j2; a DFT of n1 points over j1 for each
        j2, the twiddles exp(sign 2 pi i k1 j2 / n) (times `scale`), a DFT of n2 points over j2 for each k1, and
        entry k = k1 + n1 k2 read back in order. 4 n (n1 + n2) real multiply-adds a row instead of the matrix's
        4 n^2: a 2048-point transform 21x fewer."""
        n = shape[d]
        n1, n2 = _four_step_split(n)
        last = len(shape) - 1
        z, lead = self.axis_last(z, shape, d)
        z = self.call(aten.reshape.default, z, [*lead, n1, n2, 2])
        z = self.call(aten.transpose.int, z, -3, -2)  # [..., j2, j1, 2]
        z = self.call(aten.reshape.default, z, [*lead, n2, 2 * n1])
        z = self.call(aten.linear.default, z, self.constant(self.interleaved(self.dft(n1, n1, n1, sign, 1.0),
                                                                             False)))
        z = self.call(aten.reshape.default, z, [*lead, n2, n1, 2])  # [..., j2, k1, 2]
        t = scale * np.exp(sign * 2j * np.pi * (np.arange(n2)[:, None] * np.arange(n1)[None, :] % n) / n)
        z = self.product(z, self.constant(np.stack([t.real, t.imag], -1)))
        z = self.call(aten.transpose.int, z, -3, -2)  # [..., k1, j2, 2]
        z = self.call(aten.reshape.default, z, [*lead, n1, 2 * n2])
        z = self.call(aten.linear.default, z, self.constant(self.interleaved(self.dft(n2, n2, n2, sign, 1.0),
                                                                             False)))
        z = self.call(aten.reshape.default, z, [*lead, n1, n2, 2])  # [..., k1, k2, 2]
        z = self.call(aten.transpose.int, z, -3, -2)  # [..., k2, k1, 2]: entry k1 + n1 k2
        z = self.call(aten.reshape.default, z, [*lead, n, 2])
        if d != last:
            z = self.call(aten.transpose.int, z, d, last)
        return z

    def resized(self, x, shape: list[int], d: int, size: int, pair: bool):
        """x (a pair tensor of complex `shape`, or a real one) with its axis d cut or zero-padded to `size`."""
        if shape[d] > size:
            x = self.call(aten.slice.Tensor, x, d, 0, size)
        elif shape[d] < size:
            rank = len(shape) + (1 if pair else 0)
            pad = [0, 0] * (rank - 1 - d) + [0, size - shape[d]]
            x = self.call(aten.constant_pad_nd.default, x, pad, 0.0)
        shape = list(shape)
        shape[d] = size
        return x, shape

    def fft(self, n: fx.Node, args) -> fx.Node:
        """torch.fft's fft / ifft / rfft / irfft (1-D, 2-D, n-D) as one DFT-matrix GEMM per transformed axis,
        inputs cut or zero-padded to the requested sizes as PyTorch does; lengths `_four_step_split` splits in four
        steps (`fast_dft`: rfft as the complex transform's first half, irfft as the complex inverse of the
        conjugate-mirrored spectrum)."""
        name = target_name(n.target).split(".")[1][4:]  # fft, ifft2, rfftn, irfft, ...
        if name not in _FFTS:
            self.refuse(n, f"torch.fft.{name}")
        kind = name.rstrip("2n")
        src = n.args[0]
        in_shape = [int(d) for d in src.meta["val"].shape]
        rank = len(in_shape)
        kw = dict(n.kwargs)
        names = ["n", "dim", "norm"] if name[-1] not in "2n" else ["s", "dim", "norm"]
        for key, v in zip(names, args[1:]):
            kw[key] = v
        norm = kw.get("norm")
        if name[-1] in "2n":
            dims = kw.get("dim")
            sizes = kw.get("s")
            if dims is None:
                dims = [-2, -1] if name.endswith("2") else list(range(-(len(sizes) if sizes else rank), 0))
            dims = [int(d) % rank for d in dims]
            sizes = [None] * len(dims) if sizes is None else [None if v in (None, -1) else int(v) for v in sizes]
        else:
            dim = kw.get("dim")
            dims, sizes = [int(-1 if dim is None else dim) % rank], [kw.get("n")]
        inverse = kind in ("ifft", "irfft")
        z, shape, pair = args[0], list(in_shape), _is_complex(src)
        if kind == "rfft":  # the last axis real -> half spectrum, then the others complex
            d = dims[-1]
            size = sizes[-1] or shape[d]
            if _four_step_split(size):  # the full complex transform in four steps, then its first half
                z, shape = self.resized(z, shape, d, size, False)
                z = self.fast_dft(self.real_as_pair(z), shape, d, -1.0, self.scale(norm, size, False))
                z = self.call(aten.slice.Tensor, z, d, 0, size // 2 + 1)
                shape[d] = size // 2 + 1
            else:
                m = self.dft(shape[d], size, size // 2 + 1, -1.0, self.scale(norm, size, False))
                z, shape = self.along(z, shape, d, False, shape[d], self.interleaved(m, True), size // 2 + 1, True)
            pair, dims, sizes = True, dims[:-1], sizes[:-1]
        last = None
        if kind == "irfft":
            last, dims, last_size = dims[-1], dims[:-1], sizes[-1]
            sizes = sizes[:-1]
        if not pair:
            z, pair = self.real_as_pair(z), True
        for d, size in zip(dims, sizes):
            size = size or shape[d]
            if _four_step_split(size):
                z, shape = self.resized(z, shape, d, size, True)
                z = self.fast_dft(z, shape, d, 1.0 if inverse else -1.0, self.scale(norm, size, inverse))
                continue
            m = self.dft(shape[d], size, size, 1.0 if inverse else -1.0, self.scale(norm, size, inverse))
            z, shape = self.along(z, shape, d, True, shape[d], self.interleaved(m, False), size, True)
        if last is None:
            return z
        size = last_size or 2 * (shape[last] - 1)
        half = min(shape[last], size // 2 + 1)  # (pocketfft's c2r reads the first n // 2 + 1 entries)
        if _four_step_split(size):
            # the whole spectrum from its first n // 2 + 1 bins (bins past the input's zero), bin k > n / 2 the
            # conjugate of bin n - k, then the complex inverse in four steps, its real part (the imaginary parts
            # of bins 0 and n / 2, which c2r ignores, only reach the imaginary part)
            h, hshape = self.resized(z, shape, last, size // 2 + 1, True)
            mirror = self.call(aten.flip.default, self.call(aten.slice.Tensor, h, last, 1, size - size // 2), [last])
            full = self.call(aten.cat.default, [h, self.conj(mirror)], last)
            hshape[last] = size
            return self.re(self.fast_dft(full, hshape, last, 1.0, self.scale(norm, size, True)))
        k = np.arange(shape[last])[:, None]
        t = np.arange(size)[None, :]
        weight = np.where(k == 0, 1.0, 2.0) * (k < half)
        if size % 2 == 0:
            weight = np.where(k == size // 2, 1.0, weight)
        angle = 2 * np.pi * (k * t % size) / size
        scale = self.scale(norm, size, True)
        w = np.empty((size, 2 * shape[last]))
        w[:, 0::2], w[:, 1::2] = (scale * weight * np.cos(angle)).T, (-scale * weight * np.sin(angle)).T
        y, _ = self.along(z, shape, last, True, shape[last], w, size, False)
        return y

    def frame_index(self, frames: int, n_fft: int, hop: int) -> fx.Node:
        """The int64 positions of `frames` frames of n_fft samples, hop apart, as one buffer per geometry (the
        STFTs of one size share it)."""
        key = (frames, n_fft, hop)
        if key not in self.frame_indices:
            self.frame_indices[key] = f"_stft_frames_{frames}x{n_fft}s{hop}"
            idx = (np.arange(frames)[:, None] * hop + np.arange(n_fft)[None, :]).reshape(-1)
            self.g.gm.register_buffer(self.frame_indices[key], torch.from_numpy(idx.astype(np.int64)))
        return self.new.get_attr(self.frame_indices[key])

    def stft(self, n: fx.Node, args) -> fx.Node:
        """torch.stft of a real signal [..., T] (center padding, when asked, is already in the graph: torch pads
        before calling aten.stft): the frames gathered by one constant index [frames x n_fft], times the window
        (zero-padded to n_fft, centred, when shorter), then one DFT-matrix GEMM to the (onesided) spectrum, moved to
        PyTorch's [..., freq, frames] order."""
        src = n.args[0]
        if _is_complex(src):
            self.refuse(n, "torch.stft of a complex signal")
        names = ["input", "n_fft", "hop_length", "win_length", "window", "normalized", "onesided", "return_complex"]
        kw = {**dict(zip(names, args)), **{k: v for k, v in n.kwargs.items() if k in names}}
        shape = [int(d) for d in src.meta["val"].shape]
        n_fft = int(kw["n_fft"])
        hop = int(kw.get("hop_length") or n_fft // 4)
        win_length = int(kw.get("win_length") or n_fft)
        frames = 1 + (shape[-1] - n_fft) // hop
        x = self.call(aten.index_select.default, kw["input"], len(shape) - 1, self.frame_index(frames, n_fft, hop))
        x = self.call(aten.reshape.default, x, [*shape[:-1], frames, n_fft])
        window = kw.get("window")
        if window is not None:
            if win_length < n_fft:
                left = (n_fft - win_length) // 2
                window = self.call(aten.constant_pad_nd.default, window, [left, n_fft - win_length - left])
            x = self.call(aten.mul.Tensor, x, window)
        onesided = kw.get("onesided")
        cols = n_fft // 2 + 1 if onesided is None or onesided else n_fft
        m = self.dft(n_fft, n_fft, cols, -1.0, 1 / math.sqrt(n_fft) if kw.get("normalized") else 1.0)
        y = self.call(aten.linear.default, x, self.constant(self.interleaved(m, True)))
        y = self.call(aten.reshape.default, y, [*shape[:-1], frames, cols, 2])
        return self.call(aten.transpose.int, y, -3, -2)

    def bilinear(self, n: fx.Node, args) -> fx.Node:
        """einsum / matmul / mm / bmm with complex operands: four real products (two with one real operand)."""
        if n.target is aten.einsum.default:
            eq, ops, srcs = args[0], list(args[1]), list(n.args[1])
            if len(ops) != 2:
                self.refuse(n, "a complex einsum of other than two operands")
            prod = lambda a, b: self.call(aten.einsum.default, eq, [a, b])  # noqa: E731
        else:
            ops, srcs = list(args[:2]), list(n.args[:2])
            prod = lambda a, b: self.call(n.target, a, b)  # noqa: E731
        (a, b), (ca, cb) = ops, [_is_complex(v) for v in srcs]
        if ca and cb:
            ar, ai, br, bi = self.re(a), self.im(a), self.re(b), self.im(b)
            return self.pack(self.call(aten.sub.Tensor, prod(ar, br), prod(ai, bi)),
                             self.call(aten.add.Tensor, prod(ar, bi), prod(ai, br)))
        if ca:
            return self.pack(prod(self.re(a), b), prod(self.im(a), b))
        return self.pack(prod(a, self.re(b)), prod(a, self.im(b)))

    def run(self) -> Graph:
        gm = self.g.gm
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                if _is_complex(n):
                    self.refuse(n, f"input '{n.name}' is complex")
                self.env[n] = self.new.node_copy(n, lambda a: self.env[a])
            elif n.op == "get_attr":
                t = getattr(gm, n.target)
                if isinstance(t, torch.Tensor) and t.is_complex():
                    name = f"{n.target}_as_real"
                    gm.register_buffer(name, torch.view_as_real(t.detach()).clone())
                    self.env[n] = self.new.get_attr(name)
                else:
                    self.env[n] = self.new.node_copy(n, lambda a: self.env[a])
            elif n.op == "output":
                for a in fx.node.map_aggregate(n.args, lambda a: a):
                    for v in (a if isinstance(a, (list, tuple)) else [a]):
                        if _is_complex(v):
                            self.refuse(n, f"output '{v.name}' is complex (return torch.view_as_real of it)")
                self.new.node_copy(n, lambda a: self.env[a])
            elif n.op == "call_function" and (_is_complex(n) or any(_is_complex(a) for a in n.all_input_nodes)):
                self.env[n] = self.convert(n)
            elif _squared_magnitude(n) and all(_squared_magnitude(u) for u in n.args[0].users):
                # |z|^2 (a power spectrum; abs kept z's pair for it): re^2 + im^2, no hypot then square
                z = self.env[n.args[0]]
                re, im = self.re(z), self.im(z)
                self.env[n] = self.call(aten.add.Tensor, self.call(aten.mul.Tensor, re, re),
                                        self.call(aten.mul.Tensor, im, im))
            else:
                self.env[n] = self.new.node_copy(n, lambda a: self.env[a])
        gm.graph = self.new
        for name, t in list(gm.named_buffers(recurse=False)):
            if t.is_complex():
                delattr(gm, name)
        self.g.refresh()
        return self.g

    def convert(self, n: fx.Node) -> fx.Node:
        op = n.target
        e = lambda a: self.env[a] if isinstance(a, fx.Node) else a  # noqa: E731
        args = [fx.node.map_aggregate(a, e) for a in n.args]
        src = n.args[0] if n.args else None
        rank = src.meta["val"].dim() if isinstance(src, fx.Node) and "val" in src.meta else 0
        norm = lambda d, r=rank: int(d) % max(r, 1)  # noqa: E731  (a dim of the complex value, off the pair)
        if op in (aten.view_as_complex.default, aten.view_as_real.default, aten.clone.default,
                  aten.contiguous.default, aten.alias.default, aten.detach.default, aten.resolve_conj.default,
                  aten.lift_fresh_copy.default):
            return args[0]
        if op is aten._assert_tensor_metadata.default:
            return None
        if target_name(op).startswith("aten.fft_"):
            return self.fft(n, args)
        if op is aten.stft.default:
            return self.stft(n, args)
        if op in (aten.einsum.default, aten.matmul.default, aten.mm.default, aten.bmm.default):
            return self.bilinear(n, args)
        if op is aten.zeros_like.default:
            return self.call(aten.zeros_like.default, args[0])
        if op is aten.copy_.default:  # (into a slice of a complex value: both sides pairs, the view kept)
            value = args[1] if _is_complex(n.args[1]) else self.real_as_pair(args[1])
            return self.call(aten.copy_.default, args[0], value)
        if op is aten.polar.default:
            mag, ang = args
            return self.pack(self.call(aten.mul.Tensor, mag, self.call(aten.cos.default, ang)),
                             self.call(aten.mul.Tensor, mag, self.call(aten.sin.default, ang)))
        if op is aten.complex.default:
            return self.pack(*args)
        if op is aten.real.default:
            return self.re(args[0])
        if op is aten.imag.default:
            return self.im(args[0])
        if op in (aten.conj.default, aten._conj.default, aten.conj_physical.default):
            return self.conj(args[0])
        if op is aten.abs.default:
            if all(_squared_magnitude(u) for u in n.users):
                return args[0]  # (every user squares it: they read the pair)
            return self.call(aten.hypot.default, self.re(args[0]), self.im(args[0]))
        if op is aten.angle.default:
            return self.call(aten.atan2.default, self.im(args[0]), self.re(args[0]))
        if op is aten.reciprocal.default:
            return self.arith_real_over_complex(n, 1.0, args[0])
        if op is aten.neg.default:
            return self.call(aten.neg.default, args[0])
        if op is aten.exp.default:
            mag = self.call(aten.exp.default, self.re(args[0]))
            ang = self.im(args[0])
            return self.pack(self.call(aten.mul.Tensor, mag, self.call(aten.cos.default, ang)),
                             self.call(aten.mul.Tensor, mag, self.call(aten.sin.default, ang)))
        if op in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor,
                  aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            return self.arith(n, args)
        if op in (aten.to.dtype, aten._to_copy.default, aten.type_as.default):
            dt = n.meta["val"].dtype
            if dt.is_complex:
                return args[0] if _is_complex(n.args[0]) else self.real_as_pair(args[0])
            return self.call(aten.to.dtype, self.re(args[0]), dt)  # complex -> real keeps the real part
        # shape ops: the complex value's dims, the pair last
        if op in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return self.call(aten.reshape.default, args[0], [*args[1], 2])
        if op is aten.expand.default:
            return self.call(aten.expand.default, args[0], [*args[1], 2])
        if op is aten.repeat.default:
            return self.call(aten.repeat.default, args[0], [*args[1], 1])
        if op is aten.slice.Tensor:
            rest = list(args[2:]) if len(args) > 2 else []
            return self.call(aten.slice.Tensor, args[0], norm(args[1] if len(args) > 1 else 0), *rest)
        if op is aten.select.int:
            return self.call(aten.select.int, args[0], norm(args[1]), args[2])
        if op is aten.index_select.default:
            return self.call(aten.index_select.default, args[0], norm(args[1]), args[2])
        if op is aten.unsqueeze.default:
            return self.call(aten.unsqueeze.default, args[0], norm(args[1], rank + 1))
        if op in (aten.squeeze.dim, aten.squeeze.dims):
            dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
            return self.call(aten.squeeze.dims, args[0], [norm(d) for d in dims])
        if op is aten.permute.default:
            return self.call(aten.permute.default, args[0], [norm(d) for d in args[1]] + [rank])
        if op is aten.transpose.int:
            return self.call(aten.transpose.int, args[0], norm(args[1]), norm(args[2]))
        if op is aten.flatten.using_ints:
            start = norm(args[1] if len(args) > 1 else 0)
            end = norm(args[2] if len(args) > 2 else -1)
            return self.call(aten.flatten.using_ints, args[0], start, end)
        if op in (aten.cat.default, aten.stack.default):
            parts = n.args[0]
            if not all(_is_complex(p) for p in parts):
                self.refuse(n, "joining complex and real tensors")
            r = parts[0].meta["val"].dim() + (1 if op is aten.stack.default else 0)
            return self.call(op, args[0], norm(args[1] if len(args) > 1 else 0, r))
        if op in (aten.sum.dim_IntList, aten.mean.dim):
            dims = args[1] if isinstance(args[1], (list, tuple)) and args[1] else list(range(rank))
            return self.call(op, args[0], [norm(d) for d in dims], *args[2:])
        self.refuse(n, "an op on a complex tensor outside those graphopt rewrites")

    def arith(self, n: fx.Node, args):
        """+, -, *, / with a complex operand: the other complex, a real tensor or a number."""
        op = n.target
        kind = target_name(op).split(".")[1]
        a, b = args[0], args[1]
        ca, cb = _is_complex(n.args[0]), _is_complex(n.args[1])
        if len(args) > 2 or n.kwargs.get("alpha", 1) != 1:
            self.refuse(n, "a complex sum with alpha")
        if isinstance(n.args[1], complex) or isinstance(n.args[0], complex):
            self.refuse(n, "a complex number constant")
        if not isinstance(n.args[1], fx.Node):  # a real number
            if kind in ("add", "sub"):
                return self.pack(self.call(getattr(aten, kind).Tensor, self.re(a), b), self.im(a))
            return self.call(getattr(aten, kind).Tensor, a, b)
        if ca and cb:
            if kind in ("add", "sub"):
                return self.call(getattr(aten, kind).Tensor, a, b)
            if kind == "mul":
                return self.product(a, b)
            den = self.call(aten.add.Tensor, self.call(aten.mul.Tensor, self.re(b), self.re(b)),
                            self.call(aten.mul.Tensor, self.im(b), self.im(b)))
            return self.call(aten.div.Tensor, self.product(a, self.conj(b)),
                             self.call(aten.unsqueeze.default, den, -1))
        if kind in ("add", "sub"):  # complex +- real, real +- complex
            if ca:
                return self.pack(self.call(getattr(aten, kind).Tensor, self.re(a), b), self.im(a))
            im = self.im(b) if kind == "add" else self.call(aten.neg.default, self.im(b))
            return self.pack(self.call(getattr(aten, kind).Tensor, a, self.re(b)), im)
        if kind == "mul":
            z, r = (a, b) if ca else (b, a)
            return self.call(aten.mul.Tensor, z, self.call(aten.unsqueeze.default, r, -1))
        if ca:  # complex / real
            return self.call(aten.div.Tensor, a, self.call(aten.unsqueeze.default, b, -1))
        return self.arith_real_over_complex(n, a, b)

    def arith_real_over_complex(self, n, a, b):
        den = self.call(aten.add.Tensor, self.call(aten.mul.Tensor, self.re(b), self.re(b)),
                        self.call(aten.mul.Tensor, self.im(b), self.im(b)))
        scale = self.call(aten.div.Tensor, a, den) if isinstance(a, fx.Node) else self.call(aten.reciprocal.default,
                                                                                               den)
        return self.call(aten.mul.Tensor, self.conj(b), self.call(aten.unsqueeze.default, scale, -1))


FOUR_STEP_MIN = 256  # transform lengths from which a DFT runs in four steps (`fast_dft`) rather than as one matrix


def _four_step_split(n: int) -> tuple[int, int] | None:
    """n = n1 n2 with n1 <= n2 as near sqrt(n) as a divisor allows and n1 >= 4, for n >= FOUR_STEP_MIN; None
    otherwise (shorter, or prime-like: the matrix)."""
    if n < FOUR_STEP_MIN:
        return None
    for n1 in range(math.isqrt(n), 3, -1):
        if n % n1 == 0:
            return n1, n // n1
    return None


def _squared_magnitude(n) -> bool:
    """Whether `n` is abs(z) ** 2 of a complex z (a spectrogram's power)."""
    a = n.args[0] if n.op == "call_function" and n.target is aten.pow.Tensor_Scalar and n.args[1] == 2 else None
    return (isinstance(a, fx.Node) and a.op == "call_function" and a.target is aten.abs.default
            and _is_complex(a.args[0]))


_FFTS = {f"{p}fft{suffix}" for p in ("", "i", "r", "ir") for suffix in ("", "2", "n")}  # (not hfft / ihfft)


def complex_as_real(graph: Graph) -> Graph:
    """`graph` with its complex values as (real, imag) pairs (a rewritten copy), or `graph` itself if it has
    none."""
    if not has_complex(graph):
        return graph
    return _Rewriter(graph.clone()).run()
