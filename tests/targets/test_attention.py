"""The fused float32 attention kernel (targets/tvm/cpu/attention.py): the kernel alone against PyTorch's SDPA over
its geometries, and graphs whose SDPA nodes compile to it (reading a linear's heads in place, writing the heads back
in the output projection's layout) or, where one does not fit, all decompose as before."""
import re

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.lower import lower_to_relax
from graphopt.targets.tvm.cpu.parse import parse_kernel

F = torch.nn.functional


def _sdpa_ref(q, k, v, mask, causal, scale):
    return F.scaled_dot_product_attention(torch.tensor(q), torch.tensor(k), torch.tensor(v),
                                          attn_mask=None if mask is None else torch.tensor(mask),
                                          is_causal=causal, scale=scale).numpy()


@pytest.mark.parametrize("b,h,l,s,e,ev,mask,causal,heads_last,lanes", [
    (1, 12, 128, 128, 32, 32, "rows", False, True, 8),  # MiniLM: a mask per query row, a fully masked row
    (2, 3, 197, 197, 64, 64, None, False, False, 8),  # ViT: S past whole 32-column panels, row blocks overlap
    (1, 2, 13, 21, 5, 16, "keys", False, False, 8),  # a padding mask per batch; E = 5; S not whole vectors
    (2, 2, 7, 40, 8, 8, None, True, True, 8),  # causal; L under two tiles
    (1, 1, 1, 37, 16, 8, "keys", False, False, 8),  # one query row (a decoder step)
    (1, 2, 50, 77, 8, 8, "float", False, False, 4),  # an additive float mask; 4-float vectors
    (1, 2, 300, 300, 16, 32, None, False, True, 16),  # 16-float vectors, two row blocks a head
    (4, 4, 64, 86, 24, 24, None, False, True, 8),  # MobileViT's head width (3 vectors); a 3-vector last panel
])
def test_attention_kernel_matches_torch_sdpa(b, h, l, s, e, ev, mask, causal, heads_last, lanes):
    """softmax(q k^T * scale + mask) v per batch and head within 1e-6 of the output's range (torch.float32 SDPA's
    own rounding differs: it scales q and k by sqrt(scale) each), through [B, H, L, E] or [B, L, H, E] strides;
    a row masked everywhere gives zeros, as PyTorch's SDPA does."""

    from graphopt.targets.tvm.cpu.attention import attention_source
    from graphopt.targets.tvm.host import cpu_target
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, n, w)).astype(np.float32) for n, w in ((l, e), (s, e), (s, ev)))
    m = bias = None
    if mask == "rows":
        m = rng.random((1, 1, l, s)) > 0.4
        m[0, 0, 3] = False
    elif mask == "keys":
        m = rng.random((b, 1, 1, s)) > 0.3
        m[..., 0] = True
    elif mask == "float":
        m = rng.standard_normal((1, h, l, s)).astype(np.float32)
    scale = 1.0 / np.sqrt(e)
    ref = _sdpa_ref(q, k, v, m, causal, scale)
    if heads_last:
        strides = {"q": (h * l * e, e, h * e), "k": (h * s * e, e, h * e), "v": (h * s * ev, ev, h * ev),
                   "out": (h * l * ev, ev, h * ev)}
        args = [t.transpose(0, 2, 1, 3).copy() for t in (q, k, v)]
    else:
        strides = {"q": (h * l * e, l * e, e), "k": (h * s * e, s * e, e), "v": (h * s * ev, s * ev, ev),
                   "out": (h * l * ev, l * ev, ev)}
        args = [q, k, v]
    mstr = None
    if m is not None:
        bias = np.where(m, 0, -np.inf).astype(np.float32) if m.dtype == bool else m
        mstr = tuple(int(np.prod(bias.shape[i + 1:])) if bias.shape[i] > 1 else 0 for i in range(3))
        args.append(bias)
    src = attention_source(b, h, l, s, e, ev, strides, float(scale), mstr, causal, lanes)
    f = parse_kernel(src)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.full(b * h * l * ev, np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a.reshape(-1)) for a in args), out)
    got = out.numpy().reshape((b, l, h, ev) if heads_last else (b, h, l, ev))
    got = got.transpose(0, 2, 1, 3) if heads_last else got
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    if mask == "rows":
        assert not got[0, :, 3].any()


@pytest.mark.parametrize("e,ev,s,lanes", [(24, 24, 88, 8), (48, 48, 256, 16), (32, 96, 200, 8)])
def test_attention_kernel_vectors_are_one_register_wide(e, ev, s, lanes):
    """Every vectorized loop of the kernel is `lanes` wide, the tile's width in unrolled vectors: with one loop as
    wide as the tile, a 3-vector tile (MobileViT's 24-float heads) was a 24-float LLVM vector, split into pieces,
    and the kernel ran at 0.33x the speed (16 heads of 256 x 256, width 24: 2146 -> 700 us)."""
    import re

    from graphopt.targets.tvm.cpu.attention import attention_source
    strides = {"q": (s * e, s * e, e), "k": (s * e, s * e, e), "v": (s * ev, s * ev, ev), "out": (s * ev, s * ev, ev)}
    src = attention_source(1, 1, s, s, e, ev, strides, 0.125, None, False, lanes)
    widths = {int(w) for w in re.findall(r"T\.vectorized\((\d+)\)", src)}
    assert widths == {lanes}, widths


def test_attention_plan_blocks_and_chunks():
    """A block's scores stay within 32 KB (at least one 4-row tile, at most L rows); the last block overlaps the
    one before; heads split into chunks of blocks until there are 8 tasks."""
    from graphopt.targets.tvm.cpu.attention import attention_plan
    assert attention_plan(12, 128, 128, 8) == (64, 4, 2, 1)  # MiniLM: 12 heads are tasks enough
    assert attention_plan(2, 1024, 1024, 8) == (8, 4, 128, 4)
    assert attention_plan(3, 197, 197, 8) == (40, 4, 5, 3)
    assert attention_plan(1, 1, 37, 8) == (1, 1, 1, 1)
    assert attention_plan(1, 3, 9000, 8) == (3, 3, 1, 1)  # scores over 32 KB: one tile of all rows


class _Heads(torch.nn.Module):
    """A transformer's attention: q, k, v linears split into heads (view + transpose), SDPA, the heads joined
    back (transpose + reshape), the output linear; `ev` other than the head width gives v its own width."""

    def __init__(self, d=64, heads=4, ev=None, causal=False, dropout_free_gqa=False):
        super().__init__()
        self.h, self.causal = heads, causal
        self.ev = ev or d // heads
        self.q, self.k = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.v = torch.nn.Linear(d, self.ev * heads)
        self.o = torch.nn.Linear(self.ev * heads, d)

    def forward(self, x, mask=None):
        b, n, d = x.shape

        def split(t, w):
            return t.view(b, n, self.h, w).transpose(1, 2)
        q, k, v = split(self.q(x), d // self.h), split(self.k(x), d // self.h), split(self.v(x), self.ev)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(b, n, self.h * self.ev))


def _built(g, *xs):
    from tvm import relax
    ex, *_ = build_executable(g)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](*(tvm.runtime.tensor(x.numpy()) for x in xs))[0].numpy()


def _names(g):
    return {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}


@pytest.mark.parametrize("mask,causal", [("padding", False), (None, True), ("float", False)])
def test_transformer_attention_compiles_to_the_fused_kernel(mask, causal):
    """Each SDPA of a graph becomes one fused kernel reading the q / k / v linears' outputs where they are (no
    transposed copies of the heads) and writing the heads straight into the output linear's layout (no transpose
    after it): no compiled function transposes, none is a softmax or a batched matmul. Matches PyTorch within
    1e-5 of the output's range, with a boolean padding mask (a padded sentence: its last keys masked), causal, or
    an additive float mask."""
    torch.manual_seed(0)
    model = _Heads(causal=causal).eval()
    x = torch.randn(2, 24, 64)
    args = (x,)
    if mask == "padding":
        keep = torch.ones(2, 1, 1, 24, dtype=torch.bool)
        keep[1, ..., 17:] = False
        args = (x, keep)
    elif mask == "float":
        args = (x, torch.randn(1, 4, 24, 24))
    g = graphopt.trace(model, args)
    names = _names(g)
    assert [n for n in names if n.startswith("attention_")], names
    assert not [n for n in names if re.search("transpose|softmax|bmm|matmul", n)], names
    ref = model(*args).detach().numpy()
    np.testing.assert_allclose(_built(g, *args), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_encoder_layer_runs_the_fused_kernel():
    """nn.TransformerEncoderLayer (batch first, eval: its multi-head attention traces to SDPA) compiles to the fused
    kernel and matches PyTorch within 1e-5 of the output's range."""
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0).eval()
    x = torch.randn(1, 33, 64)
    g = graphopt.trace(model, (x,))
    assert [n for n in _names(g) if n.startswith("attention_")]
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(_built(g, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


class _TwoAttentions(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _Heads(), _Heads(ev=6)  # b: 6-float heads for v, not whole vectors

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_a_graph_with_an_attention_the_kernel_does_not_take_decomposes_all():
    """Where one SDPA of the graph does not fit the kernel (a value width of 6 floats), every SDPA is decomposed
    into batched matmuls and a softmax, as before the kernel, and the build still matches PyTorch."""
    torch.manual_seed(0)
    model = _TwoAttentions().eval()
    x = torch.randn(1, 16, 64)
    g = graphopt.trace(model, (x,))
    names = _names(g)
    assert not [n for n in names if n.startswith("attention_")] and [n for n in names if "softmax" in n], names
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(_built(g, x), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("b,h,l,s,mshape", [(1, 12, 128, 128, (1, 1, 128, 128)),  # MiniLM's expanded mask
                                            (2, 3, 16, 24, (2, 1, 1, 24)),  # a padding mask per sequence
                                            (1, 2, 8, 64, (1, 2, 8, 64))])  # a mask per head and row
def test_int8_attention_probabilities_kernel_gives_torchs_codes(b, h, l, s, mshape):
    """int8 attention's scale, boolean mask, softmax and quantize in one row kernel give exactly the codes
    PyTorch's float softmax rounds to on the grid (scale 1/255, zero point -128); a row masked everywhere gives
    the zero point (probability 0, as PyTorch's SDPA)."""

    from graphopt.targets.tvm.cpu.norm import masked_softmax_q_source
    from graphopt.targets.tvm.host import cpu_target
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((b, h, l, s)) * 5).astype(np.float32)
    keep = rng.random(mshape) > 0.3
    keep.reshape(-1, s)[1] = False
    alpha, grid = 0.17, (1 / 255, -128, -128, 127)
    bias = np.where(keep, 0, -np.inf).astype(np.float32)
    p = torch.softmax(torch.tensor(x) * alpha + torch.tensor(bias), -1).numpy()
    want = np.clip(np.round(np.nan_to_num(p, nan=0.0) / grid[0]) + grid[1], -128, 127)
    mstr = tuple(int(np.prod(mshape[i + 1:])) if mshape[i] > 1 else 0 for i in range(3))
    f = parse_kernel(masked_softmax_q_source(b, h, l, s, alpha, mstr, grid))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    out = tvm.runtime.tensor(np.zeros(b * h * l * s, np.int8))
    lib["main"](tvm.runtime.tensor(x.reshape(-1)), tvm.runtime.tensor(bias.reshape(-1)), out)
    got = out.numpy().reshape(b, h, l, s).astype(int)
    np.testing.assert_array_equal(got, want)
    assert (got.reshape(-1, s)[np.all(~np.broadcast_to(keep, (b, h, l, s)).reshape(-1, s), -1)] == -128).all()


class _ManualAttention(torch.nn.Module):
    """ViT-style attention written as its parts: scores, a scale, an optional additive bias, softmax, context."""

    def __init__(self, heads: int, bias_tokens: int = 0, scale_q: bool = False):
        super().__init__()
        self.heads, self.scale_q = heads, scale_q
        self.bias = torch.nn.Parameter(torch.randn(1, heads, bias_tokens, bias_tokens) * 0.1) if bias_tokens else None

    def forward(self, x):
        b, t, c = x.shape
        q = x.view(b, t, self.heads, -1).transpose(1, 2)
        k, v = (q * 0.5).transpose(-2, -1), q + 1
        s = q.shape[-1] ** -0.5
        a = (q * s) @ k if self.scale_q else (q @ k) / (1 / s)
        if self.bias is not None:
            a = a + self.bias
        return (torch.softmax(a, -1) @ v).transpose(1, 2).reshape(b, t, c)


class _PixelAttention(torch.nn.Module):
    """SAGAN's attention over a feature map's pixels: bmm(q^T, k), softmax, bmm(v, p^T)."""

    def __init__(self, c: int):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Conv2d(c, n, 1) for n in (c // 8, c // 8, c))

    def forward(self, x):
        b, c, h, w = x.shape
        p = torch.softmax(torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2)), -1)
        return x + torch.bmm(self.v(x).flatten(2), p.transpose(1, 2)).view(b, c, h, w)


class _EinsumAttention(torch.nn.Module):
    """Attention as two einsums: lucidrains' heads ("bhid,bhjd->bhij") or a diffusion UNet's pixels over channels
    ("bci,bcj->bij", then "bij,bcj->bci")."""

    def __init__(self, pixels: bool):
        super().__init__()
        self.pixels = pixels

    def forward(self, x):
        if self.pixels:  # x [B, C, H, W]
            b, c, h, w = x.shape
            q = x.flatten(2)
            a = torch.softmax(torch.einsum("bci,bcj->bij", q, q * 0.5) / c ** 0.5, -1)
            return torch.einsum("bij,bcj->bci", a, q + 1).reshape(b, c, h, w)
        q = x.view(x.shape[0], x.shape[1], 2, -1).transpose(1, 2)
        a = (torch.einsum("bhid,bhjd->bhij", q, q * 0.5) * q.shape[-1] ** -0.5).softmax(-1)
        return torch.einsum("bhij,bhjd->bhid", a, q + 1).transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("model,shape,fused", [
    (_ManualAttention(3), (1, 197, 192), True),  # ViT-Ti: (q @ k^T) / (1 / scale)
    (_ManualAttention(2, bias_tokens=200, scale_q=True), (2, 200, 128), True),  # Swin's (q * scale) @ k^T + bias
    (_EinsumAttention(pixels=False), (1, 200, 128), True),  # einsum over heads
    (_ManualAttention(2), (1, 160, 64), False),  # 32 wide
    (_ManualAttention(3, bias_tokens=49, scale_q=True), (4, 49, 96), False),  # Swin-T's 49-token windows
    (_EinsumAttention(pixels=True), (1, 64, 16, 16), False),  # over pixels: q, v and the result transposed
    (_PixelAttention(256), (1, 256, 16, 16), False),  # SAGAN: k, v and the result transposed
])
def test_hand_written_attention_runs_the_fused_kernel_where_it_pays(model, shape, fused, tmp_path):
    """matmul (or einsum), scale, bias, softmax, matmul become one SDPA (passes/canonicalize/attention.py), which
    runs on the fused kernel where it pays (lower._manual_attention_pays: enough keys and width, no transposes
    added); elsewhere the graph is lowered as written. Either way within 1e-5 of PyTorch (relative to the output's
    range)."""
    from graphopt.passes.canonicalize.attention import manual_attention_as_sdpa
    torch.manual_seed(0)
    model = model.eval()
    x = torch.randn(*shape)
    g = graphopt.trace(model, (x,))
    rewritten = manual_attention_as_sdpa(g)
    sdpa = [n for n in rewritten.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1 and not any(n.target is torch.ops.aten.softmax.int for n in rewritten.gm.graph.nodes)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(rewritten.run(x)[0].numpy() - ref).max() <= 1e-5 * np.abs(ref).max()
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    assert any(n.startswith("attention_") for n in names) == fused, names
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "a"))
    assert np.abs(art(x.numpy())[0] - ref).max() <= 1e-5 * np.abs(ref).max()


class _BigAndSmallAttention(torch.nn.Module):
    """A ViT-size attention and a 49-token one in one graph."""

    def __init__(self):
        super().__init__()
        self.big, self.small = _ManualAttention(3), _ManualAttention(3)

    def forward(self, x):
        return self.big(x), self.small(x[:, :49])


def test_each_hand_written_attention_is_fused_or_kept_on_its_own(tmp_path):
    """The chain that pays runs on the fused kernel, the one that does not stays batched matmuls and a softmax."""
    torch.manual_seed(0)
    model = _BigAndSmallAttention().eval()
    x = torch.randn(1, 197, 192)
    g = graphopt.trace(model, (x,))
    names = {gv.name_hint for gv in lower_to_relax(g).get_global_vars()}
    assert sum(n.startswith("attention_") for n in names) == 1 and any(n.startswith("bmm_") for n in names), names
    art = graphopt.load(graphopt.compile(g, "llvm", output=tmp_path / "a"))
    with torch.no_grad():
        refs = [t.numpy() for t in model(x)]
    for got, ref in zip(art(x.numpy()), refs):
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max()


def test_the_debug_log_names_each_attention_fused_or_kept(caplog):
    """Lowering says, by softmax node, which hand-written attention became one SDPA and which stayed as written."""
    torch.manual_seed(0)
    g = graphopt.trace(_BigAndSmallAttention().eval(), (torch.randn(1, 197, 192),))
    softmaxes = [n.name for n in g.gm.graph.nodes if n.target is torch.ops.aten.softmax.int]
    with caplog.at_level("DEBUG", logger="graphopt"):
        lower_to_relax(g)
    assert f"hand-written attention: {softmaxes[0]} as one SDPA; {softmaxes[1]} kept as written" in caplog.text
