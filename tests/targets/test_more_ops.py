"""Ops TVM 0.27's torch importer converted wrongly (`any` over a dim of a float / int tensor returned the maximum;
`!=` and self-compares at NaN; compares of two bool tensors did not build)
or not at all (any over everything, hypot, copysign, fmax / fmin, heaviside, ldexp, erfinv, i0, bit shifts,
searchsorted, kthvalue, cummax / cummin, logcumsumexp, histc): graphopt's converters (`targets/tvm/more_ops.py`)
against PyTorch with their edge cases (NaN, +-inf, -0.0, ties, shifts past the width); ops whose output size
depends on the values, refused by name at trace time."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import UnsupportedOpError
from hf_tiny import tiny_decoder
from tests.targets.test_missing_ops import _run_all


class _Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _check(fn, *xs, rtol=1e-6, atol=1e-7, names=None):
    """Build fn's graph, run it, and compare every output with PyTorch's: dtype, shape, NaN positions, values."""
    with torch.no_grad():
        ref = fn(*xs)
    ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    got = _run_all(graphopt.trace(_Fn(fn).eval(), xs), *xs)
    assert len(got) == len(ref)
    for i, (o, r) in enumerate(zip(got, ref)):
        name = names[i] if names else f"output {i}"
        r = r.numpy()
        assert o.dtype == r.dtype and o.shape == r.shape, (name, o.dtype, r.dtype, o.shape, r.shape)
        if r.dtype.kind == "f":
            assert (np.isnan(o) == np.isnan(r)).all(), (name, o, r)
            np.testing.assert_allclose(o, r, rtol=rtol, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(o, r, err_msg=name)


def test_any_returns_bools_over_dims_and_everything():
    """`x.any(1)` of a float tensor came back as the row maxima (1.77 for True) and of an int tensor as ints; any
    over all dims did not import. uint8 stays uint8 (PyTorch's result for a uint8 input)."""
    x = torch.tensor([[0.0, -2.5, 0.0], [0.0, 0.0, 0.0], [1e-30, 0.0, float("nan")]])
    i = torch.tensor([[0, 3, 0], [0, 0, 0], [-1, 0, 0]], dtype=torch.int32)
    _check(lambda x, i: (x.any(1), x.any(), x.any(0, keepdim=True), x.any((0, 1)), i.any(-1), i.any(),
                         (i != 0).any(1), i.to(torch.uint8).any(1)), x, i)


def test_compares_keep_ieee_nan_semantics_and_bool_operands_build():
    """`x != x` (the usual NaN test) was false at NaN, and `x != y` wherever either was NaN (TVM lowers float `!=` to
    the ordered compare, and simplifies `!(a == b)` into it); `torch.where(x == x, x, -1)` kept the NaN (`x == x`
    folded to true); two bool tensors compared did not build. Int against float operands promote."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([nan, 1.0, 0.0, inf, -0.0, nan])
    y = torch.tensor([nan, 1.0, nan, 0.0, 0.0, 2.0])
    i = torch.tensor([2, 1, 0, 3, 0, 2])
    _check(lambda x, y, i: (x != x, x != 0, x != y, x.ne(y), i != y, i != 2.5, x != nan, torch.count_nonzero(x),
                            torch.where(x == x, x, -1.0), x == x, x <= x, x >= x, x == y, (x > 0) != (y > 0),
                            (x > 0) == (y > 0), (x > 0) < (y > 0), (x > 0) >= (y > 0), (x > 0) == 1.0, i < y),
           x, y, i)


def test_elementwise_special_functions_match_torch():
    """hypot (no overflow at 1e30, inf beside NaN), copysign (-0.0 is negative), fmax / fmin (NaN loses), heaviside
    (0 at NaN), ldexp, erfinv (+-inf at +-1, NaN beyond, tails to 1 - 1e-7), i0 (both branches, large x), erfc
    (had no converter; its tail relative to PyTorch's, down to the subnormals, where 1 - erf is 0)."""
    a = torch.tensor([3.0, -0.0, 3e30, float("inf"), float("nan"), -5.0, 0.0, 2.0])
    b = torch.tensor([4.0, -0.0, 4e30, float("nan"), 1.0, float("nan"), -0.0, -7.5])
    p = torch.cat([torch.tensor([0.0, 0.3, -0.5, 0.9, -0.99, 0.999999, -1.0, 1.0, 1.5, -0.9999999, 0.5, 1e-6]),
                   torch.linspace(-0.9995, 0.9995, 4001)])
    z = torch.tensor([0.0, 0.5, -1.0, 3.7, 3.8, -10.0, 20.0, 50.0, -80.0, 1e-3])
    _check(lambda a, b: (torch.hypot(a, b), torch.copysign(b.abs() + 1, a), torch.copysign(a, -1.0),
                         torch.fmax(a, b), torch.fmin(a, b), torch.heaviside(a, b.nan_to_num(0.25)),
                         torch.ldexp(a, torch.tensor([2, -1, 0, 1, 3, 4, 5, -6]))), a, b,
           names=["hypot", "copysign", "copysign scalar", "fmax", "fmin", "heaviside", "ldexp"])
    _check(torch.erfinv, p, rtol=5e-7, atol=1e-7)
    _check(torch.i0, z, rtol=2e-6)
    e = torch.cat([torch.linspace(-6.0, 10.2, 2001), torch.tensor([0.0, -0.0, float("inf"), -float("inf"),
                                                                   float("nan")])])
    _check(torch.special.erfc, e, rtol=5e-7, atol=3e-45)  # (a subnormal has few bits: one step is 1.4e-45)


def test_shifts_match_torch_past_the_width():
    """x << s and x >> s: past the bit width PyTorch gives 0 and the sign (LLVM's shift is undefined there); a
    negative shift gives 0."""
    x = torch.tensor([1, -8, 12345, -1, 7, 2 ** 30, -(2 ** 31), 5], dtype=torch.int32)
    s = torch.tensor([0, 3, 31, 32, 40, 1, 4, -1], dtype=torch.int32)
    _check(lambda x, s: (x << s, x >> s, x << 3, x >> 2, x.long() << 40), x, s)


def test_searchsorted_kthvalue_histc_match_torch():
    """searchsorted (left / right / side, NaN values last, 1-D and per-row boundaries, int32 out), kthvalue's value
    and index (distinct values: PyTorch's index among ties is unspecified), histc over a range and over the data's
    own (its max in the last bin, values outside ignored)."""
    bounds = torch.tensor([-1.0, 0.0, 0.0, 2.5])
    rows = torch.sort(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)), -1).values
    v = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.5, 9.0, float("nan")]] * 3)
    x = torch.randperm(24, generator=torch.Generator().manual_seed(1)).float().reshape(4, 6) - 7
    _check(lambda v: (torch.searchsorted(bounds, v), torch.searchsorted(bounds, v, right=True),
                      torch.searchsorted(bounds, v, side="right", out_int32=True), torch.searchsorted(rows, v),
                      torch.bucketize(v, bounds)), v)
    _check(lambda x: (*x.kthvalue(2, 1), *x.kthvalue(3, 0, keepdim=True), torch.histc(x, 5, -4.0, 10.0),
                      torch.histc(x, 7), torch.histc(x * 0 + 3, 4)), x)


def test_scans_match_torch_with_ties_and_nan():
    """cummax / cummin (values and the latest index of the extreme; a NaN propagates with its latest index) over
    floats and ints on any dim, and logcumsumexp (finite where a global shift would underflow to -inf; -inf
    prefixes stay -inf)."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, float("nan"), 5.0, float("nan"), 0.0],
                      [-1.0, -1.0, -4.0, -4.0, 6.0, 6.0, -9.0, 7.0]])
    i = torch.tensor([[4, 1, 4, 9, 9, 0, 2, 9], [0, 0, -3, -3, 5, 5, 5, -8]], dtype=torch.int64)
    lse = torch.tensor([[-float("inf"), -float("inf"), 0.0, -200.0, 100.0, 100.0, -1e4, 3.0],
                        [-120.0, 0.0, -120.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    _check(lambda x, i, s: (*x.cummax(1), *x.cummin(1), *x.cummax(0), *i.cummax(1), *i.cummin(-1),
                            torch.logcumsumexp(s, 1), torch.logcumsumexp(s, 0)), x, i, lse, rtol=2e-6)


def test_long_scan_is_refused_by_name():
    """A scan over so many positions that comparing every pair would not fit is refused, naming the node."""
    class Long(torch.nn.Module):
        def forward(self, x):
            return x.cummax(1)[0]
    from graphopt.targets.tvm.lower import lower_to_relax
    with pytest.raises(UnsupportedOpError, match="cummax.*shorten the axis"):
        lower_to_relax(graphopt.trace(Long(), (torch.randn(2, 6000),)))


@pytest.mark.parametrize("fn", [lambda x: x.nonzero(), lambda x: x[x > 0], lambda x: x.round().unique(),
                                lambda x: torch.bincount((x.abs() * 2).long().flatten())],
                         ids=["nonzero", "boolean-index", "unique", "bincount"])
def test_value_dependent_output_sizes_are_refused_at_trace(fn):
    """An op whose output size depends on the values failed later, inside shape propagation, with torch's
    DynamicOutputShapeException; now trace names the node and the fixed-size rewrite."""
    with pytest.raises(UnsupportedOpError, match="at node .*size depends on the input's values"):
        graphopt.trace(_Fn(fn), (torch.randn(3, 4),))


class _Decoderish(torch.nn.Module):
    """What transformers' decoders trace to: an empty KV cache (a [0] tensor) concatenated with the keys, Falcon's
    `qkv[..., [-2]]` key heads (a negative index), a conv with padding="valid" (decomposes with padding [0])."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.tensor([]))
        self.conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding="valid")

    def forward(self, x, i):
        k = torch.cat([self.cache, x], -2)
        heads = x[:, :, [-2]] + x[..., [-1, 0, -3]].sum(-1, keepdim=True)
        return k * 2, heads, x[:, i], self.conv(x)


def test_decoder_patterns_build_and_match_torch():
    """Every decoder LLM from transformers (GPT-2, Llama, Mistral, Qwen2, Gemma, Phi, Falcon, ...: 15 of the
    sweep's 54 architectures) failed to import (TVM's concat refused the empty cache's ndim); Falcon then computed
    a wrong model (its negative index clipped to 0); HF EfficientNet's padding="valid" convs crashed the lowering."""
    x = torch.randn(1, 4, 6, 5)
    i = torch.tensor([-1, 1, 0])
    torch.manual_seed(0)
    dec = _Decoderish().eval()
    _check(lambda x, i: dec(x, i), x, i, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "falcon"])
def test_hugging_face_decoders_compile_and_match_torch(tmp_path, arch):
    """Whole tiny decoders (random init) through trace and the CPU build, against eager PyTorch."""
    model = tiny_decoder(arch, hidden=32, layers=1)
    ids = torch.randint(0, 100, (1, 12))
    art = graphopt.load(graphopt.compile(graphopt.trace(model, (ids,)), "llvm", output=tmp_path / "a"))
    with torch.no_grad():
        ref = model(ids).numpy()
    np.testing.assert_allclose(art(ids.numpy())[0], ref, rtol=1e-4, atol=1e-5)


def test_topk_unsorted_builds():
    """topk(sorted=False) leaves the order of the k values open; TVM's importer refused it ("Currently supports only
    sorted output for topk operator"). The build takes the sorted order, one of the allowed ones: compared as sets
    per row (values, and the indices they came from)."""
    x = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    fn = lambda x: torch.topk(x, 4, dim=1, sorted=False)  # noqa: E731
    got = _run_all(graphopt.trace(_Fn(fn).eval(), (x,)), x)
    ref = fn(x)
    for o, r in zip(got, ref):
        np.testing.assert_array_equal(np.sort(o, axis=1), np.sort(r.numpy(), axis=1))


@pytest.mark.parametrize("batch", [None, 1, 3])
def test_fold_builds_at_any_batch(batch):
    """F.fold (col2im): core ATen's decomposition, an index_put with broadcast index tensors, did not build in TVM
    past batch 1 ("Cannot broadcast index shapes"); it runs on graphopt's fold kernel (a grouped transposed conv on
    TVM's generic op before). Overlapping, padded, dilated and strided blocks, and an output with rows and columns
    no block covers."""
    g = torch.Generator().manual_seed(0)
    shape = (2 * 3 * 3, 16) if batch is None else (batch, 2 * 3 * 3, 16)
    _check(lambda c: (torch.nn.functional.fold(c[..., :9], (6, 6), 3, padding=1, stride=2),
                      torch.nn.functional.fold(c, (10, 10), 3, stride=2),  # (row and column 9: no block)
                      torch.nn.functional.fold(c, (6, 6), 3, padding=1, stride=1, dilation=2)),
           torch.randn(shape, generator=g), rtol=1e-5, atol=1e-5)


def test_transposed_3d_convs_build():
    """ConvTranspose3d did not build: TVM 0.27's torch importer refuses transposed convs of 5-D inputs ("Unsupported
    transposed convolution dimensionality: 5") though Relax has conv3d_transpose; graphopt's converter maps them
    (strides, padding, output padding, dilation, groups, bias)."""
    torch.manual_seed(0)
    a = torch.nn.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1).eval()
    b = torch.nn.ConvTranspose3d(4, 6, 2, stride=(1, 2, 2), groups=2, dilation=2, bias=False).eval()
    x = torch.randn(2, 4, 3, 5, 4)
    _check(lambda x: (a(x), b(x)), x, rtol=1e-5, atol=1e-5)


def test_concat_with_empty_operands_builds_a_library_that_loads(tmp_path):
    """torch.block_diag pads with zero-width blocks and `torch.cat` may take an empty tensor: folded to zero-element
    constants they made a library TVM saved but could not load ("Invalid DLTensor file format"). The concat drops
    operands empty along its axis."""
    g = torch.Generator().manual_seed(0)
    _check(lambda x: (torch.block_diag(x[0, :, :2], x[1, :2, :3]),
                      torch.cat([x.new_zeros(2, 3, 0), x, x.new_zeros(2, 3, 0)], -1),
                      torch.cat([x.new_zeros(0, 3, 8), x], 0)),
           torch.randn(2, 3, 8, generator=g))


def test_bool_arithmetic_and_logaddexp_build():
    """torch.logaddexp decomposes into bool * bool, on which TVM's LLVM codegen failed ("MatchesCode(kDLFloat)");
    bool * bool and bool + bool build as logical and / or. Infinities and NaN included."""
    x = torch.tensor([[-2.0, 0.5, float("inf"), -float("inf"), float("nan"), 3.0, 0.0, -1e30]])
    y = torch.tensor([[1.0, 0.5, 2.0, -float("inf"), 1.0, float("inf"), -0.0, 1e30]])
    _check(lambda x, y: (torch.logaddexp(x, y), torch.logaddexp2(x, y), (x > 0) * (y > 0), (x > 0) + (y < 0)),
           x, y, rtol=1e-6, atol=1e-6)


def test_index_add_builds():
    """index_add's core-ATen decomposition is an index_put with a None index, which TVM's importer rejected
    ("IndexPut requires the number of index tensors (2) to match the data tensor dimensions (3)"); it runs as a
    one-hot matmul: repeated indices accumulate, alpha scales, a negative dim counts from the end."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, generator=g)
    _check(lambda x: (torch.zeros(2, 5, 8).index_add(1, torch.tensor([0, 2, 4]), x),
                      x.index_add(2, torch.tensor([0, 2, 2, 1, 0, 7, 7, 3]), x * 2, alpha=0.5),
                      x.index_add(-3, torch.tensor([1, 1]), x)), x, rtol=1e-6, atol=1e-6)


def test_signbit_builds_and_reads_negative_zero():
    """TVM's importer has no signbit; it builds as copysign's sign, so -0.0 and -inf read negative (x < 0 would
    miss -0.0). Integers compare with 0."""
    x = torch.tensor([[-0.0, 0.0, -1.0, 2.0, -float("inf"), float("inf"), 3.0, -5.0]])
    _check(lambda x: (torch.signbit(x), torch.signbit((x.clamp(-9, 9) * 4).int())), x)


@pytest.mark.parametrize("fn,node", [
    (lambda x: x + torch.randn_like(x), "randn_like"),  # a VAE's reparameterization
    (lambda x: torch.nn.functional.gumbel_softmax(x, tau=0.5, hard=True), "exponential_"),
    (lambda x: torch.bernoulli(torch.sigmoid(x)), "bernoulli"),
    (lambda x: x * torch.rand(5), "rand"),
], ids=["randn_like", "gumbel", "bernoulli", "rand"])
def test_random_ops_are_refused_by_name(fn, node, tmp_path):
    """Ops that draw random numbers had compiled without a word into something else: TVM's importer made randn_like
    one draw at compile time (the same "noise" on every call), exponential_ zeros (gumbel_softmax gave NaN
    everywhere) and bernoulli(p) its input p. They are an error naming the node, saying how to pass the noise in;
    the ONNX export keeps them (ONNX Runtime samples)."""
    g = graphopt.trace(_Fn(fn).eval(), (torch.randn(3, 5),))
    with pytest.raises(UnsupportedOpError, match=rf"at node '{node}': it draws random numbers.*as a model input"):
        graphopt.compile(g, "llvm", output=tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("fn", [lambda x: torch.linalg.inv(x), lambda x: torch.linalg.cholesky(x),
                                lambda x: torch.linalg.inv(torch.erfinv(x * 0.1))],
                         ids=["inv", "cholesky", "inv-after-erfinv"])
def test_ops_that_raise_at_run_time_are_refused_by_name(fn, tmp_path):
    """torch.linalg.inv / cholesky check their input and raise; exported, the check is a side effect threaded by a
    token, which TVM's importer rejected with "Unsupported input kind: InputKind.TOKEN". The error names the node
    and the op."""
    x = torch.eye(3) * 2
    g = graphopt.trace(_Fn(fn).eval(), (x,))
    with pytest.raises(UnsupportedOpError, match=r"at node 'linalg_(inv|cholesky)': it checks its input at run time"):
        graphopt.compile(g, "llvm", output=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_bilinear_builds():
    """F.bilinear / nn.Bilinear decompose into aten._trilinear, which TVM's importer has no converter for; it runs
    as one matmul and a product-sum, with and without bias, over leading dims."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(4, 8, 6, generator=g), torch.randn(4, generator=g)
    x = torch.randn(2, 3, 8, generator=g)
    _check(lambda x: (torch.nn.functional.bilinear(x, x[..., :6].flip(-1), w, b),
                      torch.nn.functional.bilinear(x[0], x[1, :, 2:], w)), x, rtol=1e-5, atol=1e-5)


def test_embedding_bag_builds_every_mode_and_keeps_bad_ids_in_their_bag(tmp_path):
    """nn.EmbeddingBag (aten._embedding_bag) had no converter. Sum / mean / max over bags given by offsets, with an
    empty bag (zeros), padding_idx left out, per-sample weights, include_last_offset and the 2-D fixed-size form.
    An id outside the table (PyTorch raises) gives its own bag NaN and leaves the others as they were."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(50, 8, generator=g)
    ids, offs = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]), torch.tensor([0, 4, 4, 6])
    psw = torch.rand(8, generator=g)
    F = torch.nn.functional
    _check(lambda i, o: (F.embedding_bag(i, w, o, mode="sum"), F.embedding_bag(i, w, o, mode="mean"),
                         F.embedding_bag(i, w, o, mode="max"), F.embedding_bag(i, w, o, mode="max", padding_idx=4),
                         F.embedding_bag(i, w, o, mode="mean", padding_idx=2),
                         F.embedding_bag(i, w, o, mode="sum", include_last_offset=True),
                         F.embedding_bag(i, w, o, mode="sum", per_sample_weights=psw),
                         F.embedding_bag(i.reshape(4, 2), w, mode="mean")), ids, offs, rtol=1e-6, atol=1e-6)
    gr = graphopt.trace(_Fn(lambda i, o: F.embedding_bag(i, w, o, mode="sum")).eval(), (ids, offs))
    art = graphopt.load(graphopt.compile(gr, "llvm", output=tmp_path / "a"))
    got = art(np.array([1, 2, 4, 5, 4, 3, 77, 9]), offs.numpy())[0]
    assert np.isnan(got[3]).all() and not np.isnan(got[:3]).any(), got  # bags 0:4, 4:4, 4:6, 6:8
    np.testing.assert_allclose(got[0], w[[1, 2, 4, 5]].sum(0).numpy(), rtol=1e-6)


def test_scatter_reduce_builds_mean_and_without_self():
    """scatter_reduce refused "mean" and include_self=False by name. Every reduction, with and without the
    destination's own values, float and integer (mean floor-divides integers, as PyTorch); positions no index
    reaches keep self."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=g)
    i = torch.randint(0, 3, (5, 4), generator=g)
    i[:, 3], i[:, 2] = 0, 1  # columns where only one row is reached
    xi = torch.randint(-9, 9, (5, 4), generator=g)
    base_i = torch.arange(12).reshape(3, 4) * 3 - 7
    _check(lambda x, i, xi: tuple(
        out for r in ("sum", "prod", "amax", "amin", "mean") for inc in (True, False)
        for out in ((torch.zeros(3, 4) + 0.5).scatter_reduce(0, i, x, r, include_self=inc),
                    base_i.scatter_reduce(1, i[:3] % 4, xi[:3], r, include_self=inc))), x, i, xi, rtol=1e-6)


def test_advanced_indexing_follows_pytorch_with_slices_between_and_negative_indices():
    """x[:, r, c] built as an outer product ([2, 10, 10, 3] for [2, 10, 3]: TVM's importer took one index after
    the other when a full slice was among them), x[:, i2, j] lost a dim, x[:, i2, :, j] did not import, and
    x[j, i] with a negative j read outside the tensor (values like 2e34). PyTorch's rules: the indices broadcast and
    pick jointly, their dims in place when the indexed axes are adjacent, first when a slice separates them."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 3, generator=g)
    r, c = torch.triu_indices(4, 5, 1)
    i2, j = torch.tensor([[0, 1], [3, 2]]), torch.tensor([1, -1])
    _check(lambda x: (x[:, r, c], x[r % 2, :, c], x[:, i2, j], x[:, :, j], x[i2 % 2], x[j, i2 % 4], x[:, i2, :, j % 3],
                      x[..., j], x[1:, r[:2], c[:2], 1:]), x)


def test_triu_and_tril_indices_build_as_constants():
    """triu_indices / tril_indices (pairwise features: the upper triangle of a similarity matrix) had no
    converter; their coordinates are a compile-time constant, with offsets and non-square shapes."""
    x = torch.randn(2, 4, 5)
    _check(lambda x: (x[:, torch.triu_indices(4, 5, 1)[0], torch.triu_indices(4, 5, 1)[1]],
                      torch.tril_indices(4, 5, -1), torch.triu_indices(3, 3), torch.tril_indices(3, 6, 2,
                                                                                                  dtype=torch.int32)),
           x)


def _put(idx, val, acc=False):
    """x -> x with x[idx] = val (or += val), written as a model writes it (an in-place update of a copy)."""
    def fn(x, v=None):
        x = x.clone()
        value = val if v is None else v
        if acc:
            x[idx] += value
        else:
            x[idx] = value
        return x
    return fn


def test_index_put_follows_pytorch_with_rows_broadcast_values_and_repeats():
    """x[rows] = v on a matrix did not import (TVM's converter wants an index per dim), x[:, cols] = row read past
    the values (1.7e38: they were read flat, not broadcast), x[i, :, j] = v put values in the wrong places, and
    repeated indices under += lost updates in parallel tasks (200000 ones into one element gave 110484). Now every
    form follows PyTorch: broadcast values, negative indices, adjacent and separated index pairs, repeats summed
    (+=) or the last kept (=, as PyTorch's CPU kernel), index_copy, and integer tensors."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g)
    rows, cols = torch.tensor([0, -1]), torch.tensor([[1, 4], [2, 2]])
    _check(_put((rows,), 2.5), x)
    _check(_put((slice(None), cols), torch.arange(6.0)), x)
    _check(_put((rows, slice(None), torch.tensor([0, 5])), torch.tensor([[1.0], [2.0]]).expand(2, 5)), x)
    _check(_put((slice(None), cols, torch.tensor([3, -2])), torch.ones(4, 2, 2)), x)
    _check(_put((torch.tensor([1, 3, 1, 1]),), torch.randn(4, 5, 6, generator=g), acc=True), x)
    _check(_put((torch.tensor([2, 0, 2]),), None), x, torch.randn(3, 5, 6, generator=g))
    _check(lambda x, s, t: (x.index_copy(0, torch.tensor([3, 1, 0]), s), x.index_copy(2, torch.tensor([5, 0]), t)),
           x, torch.randn(3, 5, 6, generator=g), torch.randn(4, 5, 2, generator=g))
    _check(_put((slice(None), torch.tensor([1, 1, 0])), torch.tensor([7, 8, 9]), acc=True),
           torch.arange(12).reshape(4, 3))
    _check(lambda v: torch.zeros(3).index_put((torch.zeros(200000, dtype=torch.long),), v, accumulate=True),
           torch.ones(200000))


def test_kv_cache_write_at_a_position_input():
    """A decoder's cache update, cache[:, :, pos] = new with pos an input tensor: the step's keys land at pos."""
    cache, new = torch.randn(1, 2, 8, 4), torch.randn(1, 2, 1, 4)
    _check(lambda c, n, p: _put((slice(None), slice(None), p), None)(c, n), cache, new, torch.tensor([5]))


def test_masked_assignment_is_a_where_and_per_element_values_are_refused():
    """x[mask] = value (clamping, masking scores) with a number or one value per trailing position is a where (and
    += adds where the mask holds); values with one entry per selected element have a size that depends on the mask:
    refused by name, as are a mask together with other indices."""
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    _check(lambda x: (_put(x < 0, 0.0)(x), x.index_put((x > 0.5,), torch.tensor(-1.0), accumulate=True),
                      _put(torch.tensor([True, False, True]), torch.arange(4.0))(x),
                      _put((slice(None), torch.tensor([False, True, True, False])), torch.tensor([[5.0], [6.0],
                                                                                                  [7.0]]))(x)), x)
    from graphopt.targets.tvm.lower import lower_to_relax
    with pytest.raises(UnsupportedOpError, match="index_put.*depends on the mask"):
        lower_to_relax(graphopt.trace(_Fn(lambda x, v: _put(torch.tensor([True, False, True]), None)(x, v)),
                                      (x, torch.randn(2, 4))))
    with pytest.raises(UnsupportedOpError, match="index_put.*mask together with other indices"):
        lower_to_relax(graphopt.trace(_Fn(_put((torch.tensor([True, False, True]), torch.tensor([1, 2])), 1.0)),
                                      (x,)))


def test_zero_constants_keep_ieee_results_and_build():
    """x / 0.0 (and floor / trunc division, x % 0.0) stopped the build inside TVM's simplifier ("Divide by zero");
    x * 0.0 and 0.0 / x were folded to 0 where PyTorch gives NaN (an inf or NaN x; 0 / 0); -x of a uint8 tensor did
    not build. Now each gives PyTorch's values (a zero's sign aside: +0.0 where x * 0.0 gives -0.0)."""
    x = torch.tensor([[1.0, -2.0, 0.0, float("nan"), float("inf"), -float("inf"), 3.5]])
    _check(lambda x: (x / 0.0, x / -0.0, x / torch.tensor(0.0), torch.floor_divide(x, 0.0),
                      torch.div(x, 0.0, rounding_mode="trunc"), torch.remainder(x, 0.0), 0.0 / x,
                      (x * 0.0).abs(), (0.0 * x).abs()), x)
    _check(lambda u: (-u, u * 3), torch.tensor([0, 1, 200, 255], dtype=torch.uint8))


def test_scans_over_bool_and_integers_sum_in_int64():
    """cumsum / cumprod of a bool or integer tensor run in int64 as in PyTorch: over bool they did not build, a
    uint8 cumsum wrapped past 255, an int32 one came back int32; a dtype asked for is kept."""
    i = torch.tensor([[3, -1, 4, 1], [-5, 9, 2, -6]], dtype=torch.int32)
    _check(lambda x, i, u: (torch.cumsum(x > 0, 1), torch.cumprod(x > -1, 1), torch.cumsum(i, 0),
                            torch.cumprod(i, 1), torch.cumsum(u, 1), torch.cumsum(i, 1, dtype=torch.float32)),
           torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), i,
           torch.tensor([[200, 100, 50, 255]], dtype=torch.uint8))


def test_tensor_unfold_windows_match_torch():
    """Tensor.unfold(dim, size, step) (framing a signal, cutting patches) had no converter: windows along any dim,
    overlapping or strided with a remainder left out, twice for 2-D patches, on floats and integers."""
    g = torch.Generator().manual_seed(0)
    _check(lambda s, img, i: (s.unfold(-1, 4, 2), s.unfold(1, 3, 3), img.unfold(2, 4, 4).unfold(3, 4, 4),
                              i.unfold(0, 2, 3)),
           torch.randn(2, 3, 11, generator=g), torch.randn(1, 3, 8, 8, generator=g), torch.arange(10))


def test_min_over_a_dim_and_stable_sort_match_torch():
    """x.min(dim) (aten.min.dim) and torch.sort(..., stable=True) (aten.sort.stable) had no converter. min: the
    first of tied minima, a NaN's row NaN at its first NaN, keepdim, integers; stable sort: ties in input order,
    ascending and descending, along either dim, on long rows of many ties."""
    t = torch.tensor([[1.0, 0.0, 3.0, 0.0, 3.0], [2.0, 2.0, -1.0, -1.0, 5.0],
                      [0.0, float("nan"), -1.0, float("nan"), 2.0]])
    ties = (torch.randn(3, 300, generator=torch.Generator().manual_seed(0)) * 3).round()
    _check(lambda t, i, r: (*t.min(dim=1), *t[:2].min(dim=0, keepdim=True), *i.min(dim=-1),
                            *torch.sort(r, stable=True), *torch.sort(r, dim=0, stable=True, descending=True)),
           t, torch.tensor([[1, 5, 1], [5, 2, 2]]), ties)


def test_integer_matmul_narrow_copy_and_dist_match_torch():
    """a @ b of int32 / int64 tensors came back float32 (the importer computed every matmul in float32: int64
    products past 2^24 lost digits); narrow_copy, torch.dist (p = 2, 1, inf, 0) and torch.pdist had no converter,
    and a vector norm of order 0 (a count of nonzeros) failed at import (TVM's converter divided by the order)."""
    g = torch.Generator().manual_seed(0)
    big = torch.randint(-(1 << 20), 1 << 20, (3, 4), generator=g)
    small = torch.randint(-50, 50, (4, 2), generator=g)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    _check(lambda a: (torch.pdist(a), torch.pdist(a, 1)), torch.randn(30, 6, generator=g), rtol=1e-5, atol=1e-5)
    _check(lambda big, small, a, b: (big @ small + 1, big.int() @ small.int(), torch.bmm(big[None], small[None]),
                                     a.narrow_copy(1, 2, 3), torch.dist(a, b), torch.dist(a, b, 1),
                                     torch.dist(a, b, float("inf")), torch.dist(a, b.round(), 0),
                                     torch.linalg.vector_norm(a.round(), 0, dim=1)),
           big, small, a, b, rtol=1e-6, atol=1e-6)


def test_view_as_another_dtype_of_one_width_keeps_the_bits():
    """x.view(torch.int32) of a float32 tensor (bit tricks: sign and mantissa masks) and back had no converter;
    the same bits read as the other dtype, NaN / inf / subnormal bits included; other widths refused by name."""
    v = torch.tensor([1.0, -2.5, 0.0, -0.0, float("nan"), float("inf"), 1e-40])
    _check(lambda a, i: (a.view(torch.int32) & 0x7FFFFF, (i + 1).view(torch.float32), a.half().view(torch.int16)),
           v, torch.tensor([1065353215, -2, 0], dtype=torch.int32))
    from graphopt.targets.tvm.lower import lower_to_relax
    with pytest.raises(UnsupportedOpError, match="view.dtype.*one width"):
        lower_to_relax(graphopt.trace(_Fn(lambda a: a.view(torch.uint8)), (v,)))


def test_lgamma_and_digamma_match_float64_at_float32_rounding():
    """lgamma (and mvlgamma, which decomposes into it) and digamma had no converter: computed in float64 (Lanczos
    and reflection; recurrence, asymptotic series and reflection), they are within 1e-7 of float64 (relative, or
    absolute below 1) from -7.5 to 30 and at large x, with PyTorch's inf / NaN at the poles, 0 and +-inf."""
    x = torch.cat([torch.linspace(-7.5, 30, 3001), torch.tensor([0.0, -0.0, -1.0, -2.0, 1.0, 2.0, 1e-6, 1e6, 1e30,
                                                                float("inf"), -float("inf"), float("nan"), 1e-30])])
    for fn in (torch.lgamma, torch.digamma):
        got = _run_all(graphopt.trace(_Fn(fn).eval(), (x,)), x)[0]
        ref, ref64 = fn(x).numpy(), fn(x.double()).numpy()
        assert ((np.isnan(got) == np.isnan(ref)) & (np.isinf(got) == np.isinf(ref)) & (
            np.isinf(got) <= (np.sign(got) == np.sign(ref)))).all(), fn
        fin = np.isfinite(ref64) & (np.abs(ref64) < 3e38)
        assert (np.abs(got[fin] - ref64[fin]) / np.maximum(np.abs(ref64[fin]), 1.0)).max() < 1e-7, fn
    _check(lambda a: torch.mvlgamma(a.abs() + 2, 3), torch.randn(4, 5, generator=torch.Generator().manual_seed(0)),
           rtol=1e-6, atol=1e-6)


def test_max_min_over_everything_and_argmax_argmin_see_nan_as_pytorch_does():
    """x.max() / x.min() over all values gave the largest number past a NaN, and argmax / argmin (per row and
    flat) pointed past it (Relax's reductions skip a NaN unless it comes last): PyTorch's answer is NaN and the
    first NaN's index, before or after an infinity. Rows without NaN, ints, keepdim and the flat index as before."""
    x = torch.randn(4, 37)
    x[1, 5], x[3, 0], x[0, 3], x[2, 30] = float("nan"), float("nan"), float("inf"), -float("inf")
    x[1, 2] = float("inf")  # (an inf before the row's NaN)
    xi = torch.randint(-5, 5, (4, 6), dtype=torch.int32)
    fns = {"max()": lambda t: t.max(), "min()": lambda t: t.min(), "argmax()": lambda t: t.argmax(),
           "argmin()": lambda t: t.argmin(), "argmax(1)": lambda t: t.argmax(1),
           "argmin(-1, keepdim)": lambda t: t.argmin(-1, keepdim=True),
           "argmax(keepdim)": lambda t: torch.argmax(t, keepdim=True),
           "argmax(0) of 3-d": lambda t: t.reshape(2, -1, t.shape[-1]).argmax(0)}
    for t in (x, x[[0, 2]], xi):  # (x[[0, 2]]: no NaN) one graph of every reduction per input: one build each
        _check(lambda a: tuple(fn(a) for fn in fns.values()), t, names=list(fns))


def test_sort_topk_kthvalue_median_order_nan_as_pytorch_does():
    """One NaN in a row scrambled TVM's sort of the whole row ([3, nan, 1, inf, 2, nan, -1] came back [1, 3, nan,
    -1, 2, inf, nan]: its comparisons answer false both ways at NaN), topk passed over NaN and median gave a
    number: NaN now sorts after every number ascending and before descending, counts as the largest for topk and
    kthvalue, and makes the median NaN at its first index, as PyTorch. Values distinct (tie order is PyTorch's
    own choice)."""
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[3.0, nan, 1.0, inf, 2.0, nan, -1.0, 0.5], [0.5, -inf, 4.0, 7.0, -2.0, 1.0, 0.25, 9.0]])
    r = torch.randn(3, 40)
    for t in (x, r):  # one graph of every op per input: one build each
        _check(lambda a: (*a.sort(1), *a.sort(1, descending=True), *torch.sort(a, dim=0, stable=True),
                          a.argsort(1), a.argsort(1, descending=True), torch.msort(a),
                          *a.topk(2, 1), *a.topk(3, 1, largest=False), *a.kthvalue(3, 1), *a.kthvalue(2, 0),
                          *a.median(1), *a.median(0, keepdim=True), a.median()), t)
    _check(lambda a: (*torch.sort(a, dim=1, stable=True), *a.median(1)), torch.randperm(30).reshape(3, 10))
