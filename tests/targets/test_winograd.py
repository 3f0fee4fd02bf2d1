"""Winograd F(2x2, 3x3) for dense 3x3 stride-1 float convs (targets/tvm/cpu/winograd.py): the transforms'
arithmetic against a direct conv in numpy, the kernel chosen by the rule where it wins, and built models (odd maps,
a partial output panel, bias-free, residual + ReLU, batch 2, AVX2's smaller tile, panel groups) matching PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu import knobs
from graphopt.targets.tvm.cpu import winograd as wg
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax

AVX2 = "znver3"  # 16 vector registers: 4-6 tiles per register tile; its code runs on every x86 host here


def _names(g, cpu: str | None = None) -> set[str]:
    return {gv.name_hint for gv in lower_to_relax(g, target=cpu_target(cpu)).get_global_vars()}


def _run(g, x: torch.Tensor, cpu: str | None = None) -> np.ndarray:
    from tvm import relax
    ex, *_ = build_executable(g, cpu=cpu)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (got if hasattr(got, "numpy") else got[0]).numpy()


def test_transforms_compute_the_conv():
    """The kernel's arithmetic in numpy: pack_winograd's U, the input transform B^T d B as the kernel writes it
    (row then column differences) and A^T (U . V) A give each 2x2 block of a direct 3x3 conv, within float64
    rounding of U's one float32 rounding."""
    rng = np.random.default_rng(0)
    cout, cin = 20, 3
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    d = rng.standard_normal((cin, 4, 4))
    u = wg.pack_winograd(w).reshape(16, 2, cin, 16).transpose(0, 1, 3, 2).reshape(16, 32, cin)[:, :cout]
    rows = np.stack([d[:, :, 0] - d[:, :, 2], d[:, :, 1] + d[:, :, 2], d[:, :, 2] - d[:, :, 1],
                     d[:, :, 1] - d[:, :, 3]], -1)  # [cin, i, j]
    v = np.stack([rows[:, 0] - rows[:, 2], rows[:, 1] + rows[:, 2], rows[:, 2] - rows[:, 1],
                  rows[:, 1] - rows[:, 3]], 1)  # [cin, e_i, e_j]
    m = np.einsum("eoc,ce->eo", u, v.reshape(cin, 16)).reshape(4, 4, cout)
    s = np.stack([m[0] + m[1] + m[2], m[1] - m[2] - m[3]])  # A^T M
    y = np.stack([s[:, 0] + s[:, 1] + s[:, 2], s[:, 1] - s[:, 2] - s[:, 3]], 1)  # [a, b, cout]
    ref = np.array([[np.einsum("cij,ocij->o", d[:, a:a + 3, b:b + 3], w.astype(np.float64)) for b in (0, 1)]
                    for a in (0, 1)])
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


def test_geometry():
    """Tiles per register tile of least overlap (28-tile rows: 7; 10: 6 with 32 registers, 5 with 16), the zeros
    the 4x4 reads need past the conv's padding (an odd output: a row and a column; the last block's 18-column
    read), and no Winograd on maps under 11 columns."""
    g = wg.winograd_geometry(56, 56, (1, 1, 1, 1))
    assert (g["nt"], g["ncx"], g["blocks"], g["pad"]) == (7, 4, 112, (1, 1, 1, 3))
    assert wg.winograd_geometry(20, 20, (1, 1, 1, 1))["nt"] == 6
    assert wg.winograd_geometry(20, 20, (1, 1, 1, 1), registers=16)["nt"] == 5
    odd = wg.winograd_geometry(13, 13, (1, 1, 1, 1))
    assert (odd["oh"], odd["th"], odd["tw"], odd["pad"][1]) == (13, 7, 7, 2)
    assert wg.winograd_geometry(7, 7, (1, 1, 1, 1)) is None and wg.winograd_geometry(10, 10, (0, 0, 0, 0)) is None
    assert wg.panel_groups(7, 16, 2) == 2 and wg.panel_groups(112, 4, 2) == 1 and wg.panel_groups(7, 1, 2) == 1


class _Block(torch.nn.Module):
    """Two 3x3 convs, the second with the residual add and ReLU in its store."""

    def __init__(self, cin: int, cout: int, bias: bool = True):
        super().__init__()
        self.a = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias)
        self.b = torch.nn.Conv2d(cout, cout, 3, padding=1, bias=bias)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return torch.relu(self.b(y) + y)


@pytest.mark.parametrize("cin,cout,hw,batch,cpu,bias,lanes", [
    (16, 32, 24, 1, None, True, None),  # 12-tile rows: two blocks of 6
    (24, 40, 13, 2, None, False, None),  # odd map (a tile's last outputs skipped), partial panel, batch 2, no bias
    (32, 64, (20, 29), 1, AVX2, True, None),  # non-square; AVX2: 16 registers, 5 tiles a register tile
    (64, 48, 14, 1, None, True, None),  # 7 blocks on 2 cores: 2 panel groups
    (24, 40, 13, 2, None, True, 4),  # no AVX (4 lanes): the map zero-padded first, then read in place
])
def test_block_runs_on_winograd_and_matches_torch(cin, cout, hw, batch, cpu, bias, lanes, monkeypatch):
    """Both convs of the block on Winograd, reading the map itself by masked loads (no zero-padded copy) where the
    CPU has AVX; the outputs equal PyTorch's within 1e-5 of their range."""
    if lanes is not None:
        from graphopt.targets.tvm.cpu import rules
        monkeypatch.setattr(rules, "vector_lanes", lambda target, dtype_bits=32: lanes * 32 // dtype_bits)
    torch.manual_seed(0)
    h, w = (hw, hw) if isinstance(hw, int) else hw
    model, x = _Block(cin, cout, bias).eval(), torch.randn(batch, cin, h, w)
    g = graphopt.trace(model, (x,))
    names = _names(g, cpu)
    tag = f"_n{batch}" if batch > 1 else ""
    for conv in (f"conv_winograd_{cout}x{cin}x{h}x{w}_k3x3s1_p1111_clamp{tag}",
                 f"conv_winograd_{cout}x{cout}x{h}x{w}_k3x3s1_p1111_res_clamp{tag}"):
        assert conv in names, (conv, names)
    pads = sorted(n for n in names if n.startswith("pad_phases"))
    # 13x13: 7 tiles a row, 7 rows: a row of zeros past the conv's padding for the odd output, three columns for
    # the block's 18-column read (nine with 16 registers: blocks of 4 tiles, the last one from tile 3)
    from graphopt.targets.tvm.cpu.rules import vector_registers
    right = 4 if vector_registers(cpu_target(cpu) if cpu else cpu_target()) >= 32 else 10
    assert pads == ([] if lanes is None else [f"pad_phases_{c}x13x13_k3x3s1_p121{right}_n2" for c in (24, 40)]), pads
    got, ref = _run(g, x, cpu), model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


@pytest.mark.parametrize("groups,cig,hw,cpu,bias", [(4, 32, 28, None, True), (2, 32, 13, AVX2, False),
                                                  (2, 40, 20, AVX2, True)])  # (40: a partial output panel)
def test_grouped_convs_run_winograd_with_the_groups_as_samples(groups, cig, hw, cpu, bias):
    """A grouped 3x3 conv at batch 1 (SKNet's 4 groups of 32 at 28x28) runs one Winograd call whose samples are
    the groups, each with its own transformed weight and bias (the threads splitting the groups); it had run the
    pixel-row conv so (SKNet fp32 0.85-0.94x its time with Winograd, 4 interleaved rounds). Within 1e-5 of
    PyTorch's range."""
    torch.manual_seed(0)
    c = groups * cig
    model = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1, groups=groups, bias=bias),
                                torch.nn.ReLU()).eval()
    x = torch.randn(1, c, hw, hw)
    g = graphopt.trace(model, (x,))
    assert f"conv_winograd_{cig}x{cig}x{hw}x{hw}_k3x3s1_p1111_clamp_n{groups}_own_weights" in _names(g, cpu)
    got, ref = _run(g, x, cpu), model(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


def test_rule_and_candidates():
    """The rule takes Winograd with 16+ input and 32+ output channels, the pixel-row conv below (16 -> 16: 0.81x);
    Winograd is a tuning candidate wherever it applies, and a record for the pixel-row conv turns it off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, padding=1)).eval()
    x = torch.randn(1, 16, 24, 24)
    g = graphopt.trace(model, (x,))
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    sites = sorted(col.sites.values(), key=lambda s: s.key)
    assert [s.default["kernel"] for s in sites] == ["tok", "winograd"], [s.key for s in sites]
    assert all({"kernel": "winograd"} in s.candidates for s in sites)
    with knobs.applied({s.name: {"kernel": k} for s, k in zip(sites, ("winograd", "tok"))}):
        names = _names(g)
        assert {"conv_winograd_16x16x24x24_k3x3s1_p1111_clamp", "conv_tok_32x16x24x24_k3x3s1_p1111"} <= names
        np.testing.assert_allclose(_run(g, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cin,batch,hw,kernel", [(96, 4, 64, "winograd"), (96, 1, 64, "tok"), (128, 1, 16, "winograd"),
                                                 (64, 1, 32, "tok")])
def test_one_panel_convs_take_winograd_where_the_reduction_or_the_input_is_large(cin, batch, hw, kernel):
    """16 output channels (one panel): the rule takes Winograd with 128+ input channels, or an input of 4 MB or
    more over all its samples (a 3-D UNet's 96 -> 16 conv over 32 depths at 64x64: the model 0.83-0.91x its
    time), and keeps the pixel-row conv below (a tie at 96 -> 16 at 64x64, batch 1)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, 16, 3, padding=1)).eval()
    g = graphopt.trace(model, (torch.randn(batch, cin, hw, hw),))
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    assert [s.default["kernel"] for s in col.sites.values()] == [kernel]


def test_uneven_and_no_padding():
    """A TF "SAME" conv (the zero pad before it joins its padding: none top and left, one bottom and right) and an
    unpadded one: the masked reads take each edge as it is, and the outputs match PyTorch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.ZeroPad2d((0, 1, 0, 1)), torch.nn.Conv2d(32, 32, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 48, 3)).eval()
    x = torch.randn(1, 32, 26, 23)
    g = graphopt.trace(model, (x,))
    names = _names(g)
    assert {"conv_winograd_32x32x26x23_k3x3s1_p0101_clamp", "conv_winograd_48x32x25x22_k3x3s1_p0000"} <= names, names
    got, ref = _run(g, x), model(x).detach().numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max() + 1e-6


def test_full_range_int8_convs_on_avx2_run_as_winograd_on_the_dequantized_codes():
    """A 3x3 int8 conv with full-range weights has no exact direct int8 kernel on AVX2 (`vpmaddubsw` pairs could
    saturate): it had run the float direct kernel on the dequantized codes, at 1.5-2.3x the time of the float
    Winograd kernel the fp32 model gets (interleaved on a Zen 3: 128 -> 128 at 56x56 13.2 -> 7.2 ms, 256 -> 128
    27.0 -> 11.7). Now it is that Winograd kernel where the int8 Winograd conv does not take it (`qwinograd`: 32+
    channels in and out; here 24 -> 64), its ReLU in the store and the next quantize after it, within 1% of the
    folded graph's range (a tie at that quantize moves a value one step); the 64 -> 32 conv after it runs the int8
    Winograd conv; int8s weights (exact pairs) take the direct int8 kernels where the int8 Winograd conv does
    not, and with VNNI full-range ones do too."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(24, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 32, 3, padding=1)).eval()
    xs = torch.randn(5, 1, 24, 20, 20)
    g = graphopt.trace(model, (xs[0],))
    full = graphopt.optimize(g, "quantize{weights=int8},fold-qdq", data=[(x,) for x in xs[:4]])
    names = _names(full, AVX2)
    assert "conv_winograd_64x24x20x20_k3x3s1_p1111_clamp" in names, names
    assert any(n.startswith("qwinograd_32x64x20x20_p1111") for n in names), names
    assert not any(n.startswith(("conv_direct", "qconv")) for n in names), names
    assert not any(n.startswith(("conv_winograd", "qwinograd")) for n in _names(full, "znver4")), "VNNI keeps int8"
    pairs = graphopt.optimize(g, "quantize{weights=int8s},fold-qdq", data=[(x,) for x in xs[:4]])
    assert any(n.startswith("qconv_tok_ubsw") for n in _names(pairs, AVX2))  # (16-channel panels, int8 out)
    got, ref = _run(full, xs[4], AVX2), full.run(xs[4])[0].detach().numpy()
    # (a value on a rounding tie at the quantize between the convs can land one step away: 1% of the range)
    assert got.shape == ref.shape and np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()
