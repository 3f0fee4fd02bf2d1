"""Ops TVM 0.27's torch importer converted wrongly (selu / scaled elu, int and bool operands with floats,
avg_pool's divisor_override, bfloat16 casts, max pooling's indices) or not at all (sinh, cosh, exp2, var_mean,
prod, count_nonzero, scatters, cdist, rrelu, a bool mask compared with a number, integer division, trilinear
resizing, max_unpool2d): graphopt's converters (`targets/tvm/missing_ops.py`, `lower.py`) against PyTorch, each
output named in the failure; and the name of an op no converter takes."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import tvm

import graphopt
from graphopt.targets.tvm.build import build_executable


def _run_all(g, *xs) -> list[np.ndarray]:
    from tvm import relax
    ex, *_ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(x.numpy()) for x in xs))
    return [got.numpy()] if hasattr(got, "numpy") else [o.numpy() for o in got]


class _Elementwise(torch.nn.Module):
    def forward(self, x):
        return (F.selu(x), F.elu(x, 0.5), F.celu(x, 2.0), F.rrelu(x, 0.1, 0.3, training=False),
                torch.sinh(x), torch.cosh(x), torch.exp2(x), torch.sinh(x * 20), torch.cosh(x * 20))


def test_selu_elu_sinh_cosh_exp2_match_torch():
    """F.selu computed 1/1.0507 of PyTorch's outputs everywhere (TVM's elu converter drops elu's scale, and selu
    decomposes into elu with one); sinh / cosh failed TVM's build, exp2 and eval-mode rrelu did not import. Values
    around 0 (sinh's series) and out to +-88 (the exp form, finite as in PyTorch); a NaN stays NaN."""
    x = torch.cat([torch.linspace(-4.4, 4.4, 255), torch.tensor([float("nan")])]).reshape(2, 128)
    g = graphopt.trace(_Elementwise().eval(), (x,))
    got = _run_all(g, x)
    names = ["selu", "elu(0.5)", "celu(2)", "rrelu", "sinh", "cosh", "exp2", "sinh(20x)", "cosh(20x)"]
    for name, o, r in zip(names, got, _Elementwise()(x)):
        r = r.numpy()
        assert np.isnan(o[1, -1]) and np.isnan(r[1, -1]), name
        np.testing.assert_allclose(o[np.isfinite(r)], r[np.isfinite(r)], rtol=3e-6, atol=1e-7, err_msg=name)
        assert (np.isfinite(o) == np.isfinite(r)).all(), name


class _Reductions(torch.nn.Module):
    def forward(self, x, idx):
        var, mean = torch.var_mean(x, dim=(1, 2), keepdim=True)
        std, mean2 = torch.std_mean(x, dim=-1, correction=0)
        mask = x > 0
        return (var, mean, std, mean2, (x / 4 + 1).prod(-1), (x / 4 + 1).prod(), torch.count_nonzero(mask, -1),
                x.masked_fill(mask == 0, -9.0), torch.zeros(2, 5, 6).scatter_add(1, idx, x[:, :3, :]),
                torch.cdist(x, x.flip(1)), torch.cdist(x[:, :4], x[:, 1:], p=1.0))


def test_var_mean_prod_count_nonzero_bool_compare_scatter_add_cdist_match_torch():
    """torch.var_mean / std_mean, prod, count_nonzero and a bool mask compared with 0 (`mask == 0`: TVM compared the
    bool with a float, and LLVM's verifier failed the build), scatter_add (GNN message passing) and cdist (p=2 in
    PyTorch's matrix-product form over 30 rows, p=1 directly) did not compile. Exact for the integer and copy
    outputs, 2e-6 relative for the float ones; cdist's product form within 2e-5 in its squares (both it and
    PyTorch's round |a|^2 + |b|^2 - 2 a.b, so a zero distance comes out as the root of a few ulps)."""
    torch.manual_seed(0)
    x = torch.randn(2, 30, 6)
    idx = torch.randint(0, 5, (2, 3, 6))
    m = _Reductions().eval()
    g = graphopt.trace(m, (x, idx))
    got = _run_all(g, x, idx)
    names = ["var", "mean", "std", "mean2", "prod(-1)", "prod()", "count_nonzero", "mask==0", "scatter_add",
             "cdist p2", "cdist p1"]
    assert len(got) == len(names)
    for name, o, r in zip(names, got, m(x, idx)):
        r = r.numpy()
        assert o.shape == r.shape, name
        if r.dtype.kind in "iub" or name in ("mask==0",):
            np.testing.assert_array_equal(o, r, err_msg=name)
        elif name == "cdist p2":  # the product form's squares carry ulps of |a|^2 + |b|^2 (~12): sqrt of those at 0
            np.testing.assert_allclose(o ** 2, r ** 2, rtol=0, atol=2e-5, err_msg=name)
        else:
            np.testing.assert_allclose(o, r, rtol=2e-6, atol=1e-7, err_msg=name)


def test_scatter_add_index_out_of_range_stays_in_bounds():
    """A bad index (PyTorch raises) is wrapped when negative and clipped into the axis, never written past it."""
    x = torch.ones(1, 4)
    idx = torch.tensor([[0, 7, -1, 2]])

    class M(torch.nn.Module):
        def forward(self, x, idx):
            return torch.zeros(1, 3).scatter_add(1, idx, x)
    g = graphopt.trace(M(), (x, torch.tensor([[0, 1, 2, 2]])))
    (got,) = _run_all(g, x, idx)
    np.testing.assert_array_equal(got, [[1.0, 0.0, 3.0]])


def test_rrelu_in_training_mode_is_refused_by_name():
    from graphopt.errors import UnsupportedOpError
    from graphopt.targets.tvm.lower import lower_to_relax

    class M(torch.nn.Module):
        def forward(self, x):
            return F.rrelu(x, training=True)
    g = graphopt.trace(M(), (torch.randn(2, 4),))
    if not any("rrelu" in str(n.target) for n in g.gm.graph.nodes):
        pytest.skip("this torch traced rrelu(training=True) into random ops")
    with pytest.raises(UnsupportedOpError, match="eval"):
        lower_to_relax(g)


def test_an_unsupported_op_on_parameters_alone_names_fold_constants():
    """An orthogonal parametrization computes its weight by matrix_exp on every call, which TVM's importer has no
    converter for: the error named the op and said "run a pass that rewrites it". Its inputs are parameters alone,
    so it says fold-constants computes it once; after that pass the model builds and matches PyTorch. An op on an
    input keeps the plain hint."""
    from graphopt.errors import UnsupportedOpError
    from graphopt.targets.tvm.lower import lower_to_relax
    torch.manual_seed(0)
    model = torch.nn.utils.parametrizations.orthogonal(torch.nn.Linear(6, 6)).eval()
    x = torch.randn(3, 6)
    g = graphopt.trace(model, (x,))
    with pytest.raises(UnsupportedOpError, match=r"matrix_exp.*parameters alone.*fold-constants"):
        lower_to_relax(g)
    got = _run_all(graphopt.optimize(g, "fold-constants"), x)[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)

    class OnInput(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.matrix_exp(x)
    with pytest.raises(UnsupportedOpError, match="matrix_exp") as e:
        lower_to_relax(graphopt.trace(OnInput(), (torch.randn(2, 3, 3),)))
    assert "fold-constants" not in str(e.value)


@pytest.mark.parametrize("shape,kw,kernel", [((2, 3, 5, 7, 9), dict(size=(8, 11, 19)), True),
                                             ((1, 2, 4, 6, 8), dict(size=(7, 9, 30), align_corners=True), True),
                                             ((1, 2, 4, 6, 12), dict(scale_factor=(1.0, 1.5, 1.5)), True),
                                             ((1, 2, 3, 4, 5), dict(scale_factor=(2, 2, 3)), False)])
def test_trilinear_resize_compiles_and_matches_torch(shape, kw, kernel):
    """F.interpolate(mode="trilinear") (3-D UNets, video models) failed TVM's build. Output planes >= 16 wide run
    the bilinear kernel over the planes plus a depth lerp, narrower ones Relax's resize3d; within 1e-6 of torch."""
    from graphopt.targets.tvm.lower import lower_to_relax

    class M(torch.nn.Module):
        def forward(self, x):
            return F.interpolate(x, mode="trilinear", **kw)
    torch.manual_seed(0)
    x = torch.randn(*shape)
    g = graphopt.trace(M(), (x,))
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    assert any(n.startswith("bilinear_") for n in names) == kernel, names
    (got,) = _run_all(g, x)
    ref = M()(x).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


class _Promoted(torch.nn.Module):
    def forward(self, x, i):
        return (i * 0.5, i + 0.5, 0.25 - i, i / 4, i / 2.5, i.abs() ** 0.5, (i > 0) * 0.5, i.int() * 0.5,
                i.abs().to(torch.uint8) * 0.5, torch.sigmoid(i), torch.exp(i * -0.1), torch.reciprocal(i.abs() + 1),
                i.abs().sum(-1) * 0.5, torch.arange(12) * 0.5 + x, i / i.clamp(min=1), i // 3, x // 3,
                torch.div(i, 3, rounding_mode="trunc"), torch.div(-i, -4, rounding_mode="trunc"),
                torch.div(x, 0.3, rounding_mode="trunc"), i.clamp(max=2), 2.0 ** (i.abs() % 5), 1.5 ** i.clamp(-3, 3))


def test_integer_and_bool_operands_are_promoted_as_in_pytorch():
    """An int64 tensor times 0.5 is float32 in PyTorch; TVM's converters computed it in the tensor's dtype
    (torch.arange(12) * 0.5 came out all zeros, i / 4 truncated, (i > 0) * 0.5 a bool), sigmoid / exp of ints did
    not import, `i // 3` and `x // 3` (an int32 constant) neither, `i.clamp(min=1)` failed TVM's build (an
    infinite bound in an int clip), a number to an int tensor's power (NeRF's `2.0 ** torch.arange(10)`) failed
    TVM's build ("power only applies to float"). Every output's dtype and value as torch's (exact but for the
    float maths)."""
    torch.manual_seed(0)
    x = torch.randn(2, 12) * 3
    i = (torch.randn(2, 12) * 5).long()
    m = _Promoted().eval()
    g = graphopt.trace(m, (x, i))
    got = _run_all(g, x, i)
    refs = m(x, i)
    assert len(got) == len(refs)
    for k, (o, r) in enumerate(zip(got, refs)):
        r = r.numpy()
        assert o.dtype == r.dtype and o.shape == r.shape, (k, o.dtype, r.dtype)
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=0, err_msg=f"output {k}")


@pytest.mark.parametrize("fn,shape,kw", [(F.avg_pool2d, (1, 2, 6, 6), dict(kernel_size=2, divisor_override=3)),
                                         (F.avg_pool2d, (1, 2, 7, 7), dict(kernel_size=3, stride=2, padding=1,
                                                                           divisor_override=5)),
                                         (F.avg_pool2d, (2, 6, 6), dict(kernel_size=2, divisor_override=3)),
                                         (F.avg_pool3d, (1, 2, 4, 6, 6), dict(kernel_size=2, divisor_override=3))])
def test_avg_pool_divisor_override_is_kept(fn, shape, kw):
    """TVM's converter dropped avg_pool's divisor_override (2x2 windows over 3 came out as over 4); the window sums
    are divided by it, padding counted, an unbatched input too. Within 3e-7 of torch."""
    class M(torch.nn.Module):
        def forward(self, x):
            return fn(x, **kw)
    torch.manual_seed(0)
    x = torch.randn(*shape)
    (got,) = _run_all(graphopt.trace(M(), (x,)), x)
    np.testing.assert_allclose(got, M()(x).numpy(), rtol=0, atol=3e-7)


def test_avg_pool_divisor_override_with_ceil_mode_is_refused_by_name():
    from graphopt.errors import UnsupportedOpError
    from graphopt.targets.tvm.lower import lower_to_relax

    class M(torch.nn.Module):
        def forward(self, x):
            return F.avg_pool2d(x, 2, ceil_mode=True, divisor_override=3)
    with pytest.raises(UnsupportedOpError, match="divisor_override"):
        lower_to_relax(graphopt.trace(M(), (torch.randn(1, 2, 5, 5),)))


class _SegNetBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y, idx = F.max_pool2d(x, 2, return_indices=True)
        return F.max_unpool2d(self.conv(y), idx, 2, output_size=x.shape[-2:])


@pytest.mark.parametrize("shape", [(1, 4, 8, 10), (2, 4, 9, 7)])  # odd sizes: the last row / column dropped
def test_max_unpool_reads_real_pooling_indices(shape):
    """max_pool2d's indices were zeros (TVM's converter, and graphopt's pool kernel): SegNet's max_unpool2d failed
    to import. Where they are read they are PyTorch's flat H x W indices of each window's first maximum (ties
    included), for windows that tile the map. Matches torch within float rounding of the conv."""
    torch.manual_seed(0)
    x = torch.randn(*shape)
    x[0, 0, :2, :2] = 1.0  # a window of ties: the first wins
    m = _SegNetBlock().eval()
    (got,) = _run_all(graphopt.trace(m, (x,)), x)
    np.testing.assert_allclose(got, m(x).detach().numpy(), rtol=0, atol=1e-6)


def test_pooling_indices_of_overlapping_windows_are_refused_by_name():
    from graphopt.errors import UnsupportedOpError
    from graphopt.targets.tvm.lower import lower_to_relax

    class M(torch.nn.Module):
        def forward(self, x):
            y, i = F.max_pool2d(x, 3, 2, return_indices=True)
            return y + i.float()
    with pytest.raises(UnsupportedOpError, match="indices are read"):
        lower_to_relax(graphopt.trace(M(), (torch.randn(1, 2, 9, 9),)))


def test_bfloat16_cast_rounds_to_nearest_even():
    """x.bfloat16() in a fused kernel came back unrounded (TVM computes fused bfloat16 values in float32): 1.0039
    stayed 1.0039 where PyTorch gives 1.0. Rounded to nearest even in float32 bits first: ties, NaN, inf and the
    overflow to inf as torch's, exactly."""
    class M(torch.nn.Module):
        def forward(self, x):
            return (x * 1.0).bfloat16().float() + 0.0
    x = torch.tensor([[1.00390625, 1.01171875, 1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9, 3.14159, -2.7182817, float("nan"),
                       float("inf"), 3.4e38, -1e-40, 0.0, 65504.3]])
    (got,) = _run_all(graphopt.trace(M(), (x,)), x)
    np.testing.assert_array_equal(got, M()(x).numpy())


def test_an_op_without_converter_is_named_not_a_neighbour():
    """TVM lists the ops it cannot convert ("Unsupported function types ['digamma.default']"); the node was found by
    substring, and "default" holds "lt", so a `<` node of the graph took the blame. Matched by op name now."""
    from graphopt.errors import UnsupportedOpError
    from graphopt.targets.tvm.lower import lower_to_relax

    class M(torch.nn.Module):
        def forward(self, x):
            return (x < 0).float() + torch.special.bessel_j0(x)  # (digamma, the example before, now converts)
    with pytest.raises(UnsupportedOpError, match="aten.special_bessel_j0"):
        lower_to_relax(graphopt.trace(M(), (torch.randn(2, 3),)))


def test_an_op_a_decomposition_makes_is_blamed_on_the_node_it_came_from():
    """An op with no converter that torch's decompositions make (svdvals -> _linalg_svd) was reported at node
    "(from a decomposition)"; the node it came from is named now (torch's provenance, meta["from_node"])."""
    from graphopt.errors import UnsupportedOpError
    from graphopt.targets.tvm.lower import lower_to_relax

    class M(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svdvals(x) * 2
    with pytest.raises(UnsupportedOpError, match=r"aten._linalg_svd \(what aten.linalg_svdvals decomposes into\)' "
                                                 r"at node 'linalg_svdvals'"):
        lower_to_relax(graphopt.trace(M(), (torch.randn(2, 4, 4),)))


class _Determinants(torch.nn.Module):
    def forward(self, a3, a2, a4, a1):
        return torch.linalg.det(a3), torch.det(a2), torch.linalg.det(a4), torch.logdet(a4), torch.linalg.det(a1)


def test_determinants_match_torch():
    """torch.linalg.det / det / slogdet / logdet had no converter (geometry: orientation and volume tests; flows'
    log-determinants): closed forms to 3 x 3, LU with partial pivoting past it. Within 1e-5 relative of PyTorch;
    a singular matrix (a zero column) gives 0 and -inf, a row swap -1, a negative determinant a NaN logdet, as
    PyTorch's. (Rows dependent only up to rounding leave a pivot of rounding error, whose sign is that rounding's.)"""
    torch.manual_seed(0)
    a4 = torch.randn(6, 4, 4)
    a4[2, :, 3] = 0
    a4[3] = torch.eye(4)[[1, 0, 2, 3]]
    xs = (torch.randn(4, 3, 3), torch.randn(2, 2), a4, torch.randn(3, 1, 1))
    got = _run_all(graphopt.trace(_Determinants().eval(), xs), *xs)
    names = ["det 3x3", "det 2x2", "det 4x4", "logdet 4x4", "det 1x1"]
    for name, o, r in zip(names, got, _Determinants()(*xs)):
        r = r.numpy()
        assert o.shape == r.shape, name
        assert (np.isnan(o) == np.isnan(r)).all() and (np.isinf(o) == np.isinf(r)).all(), (name, o, r)
        fin = np.isfinite(r)
        np.testing.assert_allclose(o[fin], r[fin], rtol=1e-5, atol=1e-5, err_msg=name)
    assert got[2][2] == 0 and got[2][3] == -1 and np.isneginf(got[3][2]) and np.isnan(got[3]).any()


class _Powers(torch.nn.Module):
    def forward(self, x, i):
        return (x ** 2, torch.pow(x, 3), F.gelu(x, approximate="tanh"), (i ** 2).float(), x ** 2.5)


def test_squares_and_cubes_are_products():
    """x ** 2 and x ** 3 of floats lower to products, as PyTorch computes them (TVM's power was a scalar libm call
    per element: GPT-2's tanh GELU took most of a tiny GPT-2's time); NaN, +-inf and -0.0 come out as PyTorch's;
    an int tensor's square and a fractional power still go through TVM's power."""
    from graphopt.targets.tvm.lower import lower_to_relax
    x = torch.cat([torch.linspace(-3, 3, 60), torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])])
    i = torch.arange(-32, 32)
    g = graphopt.trace(_Powers(), (x, i))
    assert lower_to_relax(g).script().count("R.power") == 1  # x ** 2.5 only
    for name, o, r in zip(["x^2", "x^3", "gelu tanh", "int square", "x^2.5"], _run_all(g, x, i), _Powers()(x, i)):
        r = r.numpy()
        np.testing.assert_array_equal(np.isnan(o), np.isnan(r), err_msg=name)
        np.testing.assert_array_equal(np.signbit(o[~np.isnan(r)]), np.signbit(r[~np.isnan(r)]), err_msg=name)
        np.testing.assert_allclose(o, r, rtol=1e-6, atol=1e-6, err_msg=name)


class _InfiniteFills(torch.nn.Module):
    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)  # a decoder's causal mask
        scores = torch.softmax(x @ x.transpose(1, 2) + mask, -1)
        return scores, torch.full_like(x, float("nan")), x.new_full((3,), float("inf"))


def test_full_with_an_infinite_or_nan_fill_builds():
    """torch.full / full_like / new_full of -inf, NaN or inf (nn.TransformerDecoderLayer under a causal mask built
    with torch.full(-inf)): TVM's legalization of R.full failed ("argument of type 'PrimType' is not iterable");
    a broadcast scalar constant now, matching torch."""
    x = torch.randn(2, 6, 4)
    got = _run_all(graphopt.trace(_InfiniteFills().eval(), (x,)), x)
    for o, r in zip(got, _InfiniteFills()(x)):
        np.testing.assert_allclose(o, r.numpy(), rtol=1e-6, atol=1e-6)
