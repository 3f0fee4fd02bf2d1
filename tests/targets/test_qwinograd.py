"""The int8 Winograd F(2x2, 3x3) conv in 16-bit integers (targets/tvm/cpu/qwinograd.py): its integer transforms,
the kernel against the exact integer conv (odd maps, a partial output panel, uneven padding, every store,
full-range codes at their extremes), and built int8 models on AVX2 taking it where the rule says, equal to the
direct int8 kernels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu import qwinograd as qw
from graphopt.targets.tvm.cpu import winograd as wg
from graphopt.targets.tvm.cpu.conv import store_params
from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants
from graphopt.targets.tvm.cpu.parse import parse_kernel
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax

AVX2 = "znver3"  # vpmaddwd: AVX2, on every x86 host here


def test_integer_weight_transform_is_four_times_the_float_one():
    """U' = G' g G'^T in integers is exactly 4 x the float Winograd kernel's U (`winograd.pack_winograd`), within
    int16 for full-range int8 weights, packed as channel pairs of each 16-channel panel."""
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (20, 6, 3, 3)).astype(np.int8)
    w[0] = -128  # the largest |U'|: 9 x 128
    u = qw.pack_qwinograd(w).view(np.int16).reshape(16, 2, 3, 16, 2).transpose(0, 1, 3, 2, 4).reshape(16, 32, 6)
    uf = wg.pack_winograd(w.astype(np.float32)).reshape(16, 2, 6, 16).transpose(0, 1, 3, 2).reshape(16, 32, 6)
    np.testing.assert_array_equal(u.astype(np.float64), 4 * uf.astype(np.float64))
    assert np.abs(u).max() == 1152 and not u[:, 20:].any()


def _reference(x, wq, zx, sx, ws, bias, padding):
    """The exact integer conv of int8 codes x [Cin, H, W] (zero point zx outside: the real 0) times the scales,
    plus the bias, in float64."""
    t, b, left, r = padding
    xp = np.pad(x.astype(np.int64) - zx, ((0, 0), (t, b), (left, r)))
    oh, ow = xp.shape[1] - 2, xp.shape[2] - 2
    acc = np.zeros((wq.shape[0], oh, ow), np.int64)
    for i in range(3):
        for j in range(3):
            acc += np.einsum("oc,chw->ohw", wq[:, :, i, j].astype(np.int64), xp[:, i:i + oh, j:j + ow])
    return acc * (sx * ws.astype(np.float64))[:, None, None] + bias[:, None, None], acc


def _kernel(x, wq, zx, sx, ws, bias, padding, clamp, out_q, dequantized, whole=False):
    """Build and run the kernel alone on x padded with its zero point as `emit_qwinograd` pads it."""
    cout, cin = wq.shape[:2]
    h, wd = x.shape[1:]
    g = qw.whole_geometry(h, wd, padding) if whole else wg.winograd_geometry(h, wd, padding, qw.REGISTERS)
    t, b, left, r = g["pad"]
    xp = np.full((cin, h + t + b, wd + left + r), zx, np.int8)
    xp[:, t:t + h, left:left + wd] = x
    width = -(-cout // wg.PANEL) * wg.PANEL
    consts = [c[:width] for c in epilogue_constants(wq, ws, bias, sx, zx, -(-width // MR), out_q) if c is not None]
    odd = cin % 2  # (as emit_qwinograd: a zero weight channel pairs the last one; the map keeps its Cin)
    src = qw.qwinograd_source(cout, cin + odd, h, wd, padding, clamp, out_q, dequantized, len(consts) == 3, cores=2,
                              whole=whole, odd=bool(odd))
    wq = np.pad(wq, ((0, 0), (0, odd), (0, 0), (0, 0)))
    f = parse_kernel(src)
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(AVX2))
    int8_out = out_q is not None and not dequantized
    out = tvm.runtime.tensor(np.full((cout, g["oh"], g["ow"]), 99 if int8_out else np.nan,
                                     np.int8 if int8_out else np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (xp.ravel(), qw.pack_qwinograd(wq), *consts,
                                                  store_params(clamp, out_q))), out)
    return out.numpy(), len(consts) == 3


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("cout,cin,h,wd,padding,store", [
    (40, 32, 13, 15, (1, 1, 1, 1), "float"),  # odd map: the edge blocks' per-output store; a partial panel
    (64, 34, 12, 12, (1, 1, 1, 1), "int8"),  # the next quantize in the store, with a ReLU
    (32, 48, 14, 20, (0, 2, 2, 1), "dequantized"),  # uneven padding; the int8 grid's floats (a float consumer)
    (16, 16, 24, 24, (1, 1, 1, 1), "float bias"),  # a bias that does not fit the accumulator's steps: float
    (48, 64, 7, 7, (1, 1, 1, 1), "int8"),  # (whole) 16 tiles in 6-tile register tiles, the last overlapping
    (32, 32, 3, 5, (1, 1, 1, 1), "float"),  # (whole) fewer tiles than a register tile holds, an odd output row
    (40, 33, 13, 15, (1, 1, 1, 1), "float"),  # odd input channels: the last pair reads channel 32 twice
    (78, 121, 14, 14, (1, 1, 1, 1), "int8"),  # HarDNet's 121 -> 78
])
def test_kernel_equals_the_exact_integer_conv(cout, cin, h, wd, padding, store, whole):
    """Against the exact int64 conv of the codes: float outputs within float32 rounding of the few adds of the
    output transform and the epilogue, int8 ones within one grid step (a value at a rounding boundary); in tasks
    of blocks of tiles and (`whole`) with every tile in each task."""
    if not whole and wg.winograd_geometry(h, wd, padding, qw.REGISTERS) is None:
        pytest.skip("a map too narrow for the blocks: whole only")
    rng = np.random.default_rng(cout + cin)
    x = rng.integers(-128, 128, (cin, h, wd)).astype(np.int8)
    wq = rng.integers(-128, 128, (cout, cin, 3, 3)).astype(np.int8)
    zx, sx = int(rng.integers(-30, 30)), 0.04
    ws = rng.uniform(1e-3, 4e-3, cout).astype(np.float32)
    bias = rng.normal(0, 1, cout).astype(np.float32)
    if store == "float bias":
        ws[3] = 1e-12  # bias / (sx * w_scale) past int32: the bias is added in float after the multiply
    clamp = (0.0, 1e30) if store == "int8" else None
    out_q = (0.05, 4, -128, 127) if store in ("int8", "dequantized") else None
    ref, _ = _reference(x, wq, zx, sx, ws, bias, padding)
    got, float_bias = _kernel(x, wq, zx, sx, ws, bias, padding, clamp, out_q, store == "dequantized", whole)
    assert float_bias == (store == "float bias")
    if out_q is None:
        np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
        return
    s, z = out_q[:2]
    codes = np.clip(np.round(np.clip(ref, *(clamp or (-np.inf, np.inf))) / s) + z, -128, 127)
    if store == "dequantized":
        got = np.round(got / s) + z
    assert np.abs(got.astype(np.int64) - codes).max() <= 1 and (got != codes).mean() < 1e-3
    assert len(np.unique(got)) > min(100, got.size // 8)


@pytest.mark.parametrize("whole", [False, True])
def test_extreme_codes_do_not_wrap(whole):
    """Every code and weight at -128 over 512 input channels: an inner tile's V[1, 1] is 4 x -128 (the sum of its
    middle 2x2), U'[1, 1] 9 x -128 (the sum of the 3x3), so their int32 sum over the channels is 512 x 512 x
    1152 = 3.0 x 10^8 (4 x the direct conv's largest sum, as U' is 4 U): exact (a wrap in 16 or 32 bits would be
    off by 2^16 or 2^32)."""
    cin, cout = 512, 16
    x = np.full((cin, 12, 12), -128, np.int8)
    wq = np.full((cout, cin, 3, 3), -128, np.int8)
    ones = np.ones(cout, np.float32)
    ref, acc = _reference(x, wq, 0, 1.0, ones, np.zeros(cout, np.float32), (1, 1, 1, 1))
    u = np.einsum("ai,ocij,bj->aboc", qw._G2, wq.astype(np.int64), qw._G2)
    assert u[1, 1, 0].sum() * 4 * -128 == 512 * 512 * 1152 == 4 * np.abs(acc).max() > 2 ** 28
    got, _ = _kernel(x, wq, 0, 1.0, ones, np.zeros(cout, np.float32), (1, 1, 1, 1), None, None, False, whole)
    np.testing.assert_allclose(got, ref, rtol=1e-7)


def _block(weights: str, shape=(1, 32, 48, 48), mid: int = 32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(shape[1], mid, 3, 1, 1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(mid, 48, 3, 1, 1), torch.nn.ReLU(), torch.nn.Conv2d(48, 16, 3, 1, 1),
                                torch.nn.Conv2d(16, 8, 3, 1, 1)).eval()
    x = torch.rand(*shape)
    q = graphopt.optimize(graphopt.trace(model, (x,)), f"quantize{{weights={weights}}},fold-qdq",
                          data=[(torch.rand(*shape),) for _ in range(4)])
    return q, x


def _run(q, x, cpu: str) -> np.ndarray:
    from tvm import relax
    ex, *_ = build_executable(q, cpu=cpu)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    return (got if hasattr(got, "numpy") else got[0]).numpy()


@pytest.mark.parametrize("weights,batch,mid", [("int8s", 1, 32), ("int8", 2, 32), ("int8s", 1, 33)])
def test_avx2_int8_models_take_it_where_the_rule_says(monkeypatch, weights, batch, mid):
    """On AVX2 the 3x3 stride-1 int8 convs of 32+ input and output channels run the int8 Winograd conv (at 48x48
    in blocks of tiles, V for all 576 tiles being 590 KB; at 24x24 every tile in each task), storing float for
    the max pool and int8 for the next conv; 16 channels keep the direct int8 kernels, and VNNI CPUs keep theirs.
    int8s weights (7-bit: the direct kernels' vpmaddubsw is exact): the same outputs as those kernels; full-range
    int8 ones (which had run the float Winograd conv on the dequantized codes, no exact AVX2 int8 kernel taking
    them): within the grid steps where the two round an activation to neighbouring codes.
    Batch 2: each sample on its own. 33 channels between the first two convs: an odd input count (its last
    channel paired with a zero weight channel)."""
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    q, x = _block(weights, (batch, 32, 48, 48), mid)
    names = {gv.name_hint for gv in lower_to_relax(q, target=cpu_target(AVX2)).get_global_vars()}
    wino = sorted(n for n in names if n.startswith("qwinograd_"))
    assert len(wino) == 2 and wino[0].startswith(f"qwinograd_{mid}x32x48x48_p1111_clamp"), names
    assert wino[1].startswith(f"qwinograd_48x{mid}x24x24_p1111_whole_clamp_q"), names
    assert not any(n.startswith("qwinograd") for n in lower_to_relax(q, target=cpu_target("znver4")).get_global_vars()
                   for n in [n.name_hint])
    got = _run(q, x, AVX2)
    ref = q.run(x)[0].numpy()
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    monkeypatch.setattr(qw, "qwinograd_plan", lambda *a: None)
    direct = _run(q, x, AVX2)
    if weights == "int8s":
        np.testing.assert_array_equal(got, direct)
    else:
        np.testing.assert_allclose(got, direct, rtol=0, atol=0.02 * np.abs(direct).max())


@pytest.mark.parametrize("cout,cin,bits", [(40, 18, 8), (64, 64, 4), (16, 34, 4)])
def test_load_time_transform_makes_the_packed_weight(cout, cin, bits):
    """The artifact's load-time kernel makes `pack_qwinograd`'s U' from the int8 weight, or from its nibbles
    (int4: two values a byte, an odd count's last byte half used), zeros past Cout."""
    from graphopt.targets.tvm.cpu.int8 import nibbles
    rng = np.random.default_rng(cout)
    w = rng.integers(-2 ** (bits - 1), 2 ** (bits - 1), (cout, cin, 3, 3)).astype(np.int8)
    flat = w.reshape(-1) if bits == 8 else nibbles(w.reshape(-1)[0::2], w.reshape(-1)[1::2])
    f = parse_kernel(qw.qwinograd_weights_source(cout, cin, bits == 4))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target())
    want = qw.pack_qwinograd(w)
    out = tvm.runtime.tensor(np.full(want.shape, 7, np.int32))
    lib["main"](tvm.runtime.tensor(flat), tvm.runtime.tensor(np.zeros(1, np.int8)), out)
    np.testing.assert_array_equal(out.numpy(), want)


@pytest.mark.parametrize("weights", ["int8s", "int4"])
def test_artifact_stores_the_weight_not_its_transform(tmp_path, monkeypatch, weights):
    """Built for an artifact (`prepare=True`), an int8 Winograd conv's weight stays the int8 (int4: nibble) weight
    in the library and `prepare` transforms it once at load: the library is smaller than the plain build's (which
    holds U', 32 bytes a channel pair against the weight's 9) by half the difference at least (the rest: the
    transform kernels' code), and the outputs are the same."""
    from tvm import relax
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    q, x = _block(weights)

    def built(prepare: bool):
        stats = {}
        ex, *_ = build_executable(q, cpu=AVX2, stats=stats, prepare=prepare)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        made = list(vm["prepare"](tvm.runtime.tensor(np.zeros(1, np.int8)))) if prepare else []
        assert len(made) == stats.get("prepared_weights", 0)
        out = vm["main"](tvm.runtime.tensor(x.numpy()), *made)
        path = tmp_path / f"{prepare}.so"
        ex.export_library(str(path), options=["-s"])
        return ex.as_text(), (out if hasattr(out, "numpy") else out[0]).numpy(), path.stat().st_size, len(made)

    text, got, size, made = built(True)
    text0, want, size0, _ = built(False)
    assert "qwinograd_weights_32x32" in text and "qwinograd_weights_48x32" in text and "qwinograd_weights" not in text0
    assert made >= 2
    pairs = 32 * 32 + 48 * 32  # (output, input) channel pairs of the two Winograd convs
    assert size0 - size >= 0.5 * (32 - 9) * pairs  # (less the two transform kernels' code)
    np.testing.assert_array_equal(got, want)


def test_plan_by_shape():
    """ResNet-18's stride-1 3x3 convs: 56x56 and 28x28 in blocks (V for every tile 1.6 / 0.8 MB), 14x14 and 7x7
    whole (U' read once a call); the direct int8 convs for 16 channels, odd input channels, strided convs, and
    small maps of few channels or tiles (512x512 at 4x4: U' read for 4 tiles). One output panel (16 channels)
    takes it with 96+ input channels (a 3-D UNet's 96 -> 16 over its depth taps), not with 64. Odd input channel
    counts take it (HarDNet's 121 -> 78 at 56x56)."""
    plan = qw.qwinograd_plan
    same = (1, 1, 1, 1)
    assert plan((16, 96, 3, 3), 1, (32, 96, 64, 64), same) == "block"
    assert plan((16, 64, 3, 3), 1, (1, 64, 32, 32), same) is None
    assert [plan((c, c, 3, 3), 1, (1, c, hw, hw), same) for c, hw in ((64, 56), (128, 28), (256, 14), (512, 7))] == [
        "block", "block", "whole", "whole"]
    for w, stride, x in [((32, 16, 3, 3), 1, (1, 16, 56, 56)), ((16, 32, 3, 3), 1, (1, 32, 56, 56)),
                         ((64, 64, 3, 3), 2, (1, 64, 56, 56)),
                         ((512, 512, 3, 3), 1, (1, 512, 4, 4)), ((64, 64, 3, 3), 1, (1, 64, 7, 7))]:
        assert plan(w, stride, x, same) is None, (w, stride, x)
    assert plan((64, 64, 1, 1), 1, (1, 64, 56, 56), (0, 0, 0, 0)) is None
    assert plan((64, 33, 3, 3), 1, (1, 33, 56, 56), same) == plan((78, 121, 3, 3), 1, (1, 121, 56, 56), same) == "block"


@pytest.mark.parametrize("batch", [1, 2])
def test_grouped_convs_run_it_per_group(tmp_path, monkeypatch, batch):
    """A grouped 3x3 conv (SKNet's 4 groups; here 2 of 32 channels) runs on the int8 Winograd conv on AVX2, int8s
    weights as for one group (`quantize` narrows grouped convs too: the dense int8 kernels read them): at batch 1
    as one call whose samples are the groups (each its own weights and epilogue; no split, no concat), at batch 2
    per group; equal to the direct int8 kernels per group and within a step of the reference, and built for an
    artifact (the groups' weights transformed at load by one call) equal to the plain build."""
    from tvm import relax
    monkeypatch.setenv("GRAPHOPT_AMX", "0")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(64, 64, 3, padding=1, groups=2), torch.nn.ReLU()).eval()
    x = torch.rand(batch, 32, 20, 20)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int8s},fold-qdq",
                          data=[(torch.rand(batch, 32, 20, 20),) for _ in range(4)])
    assert q.meta["weight_bits"] == {"conv2d": "int8s", "conv2d_1": "int8s"}
    names = {gv.name_hint for gv in lower_to_relax(q, target=cpu_target(AVX2)).get_global_vars()}
    tag = "_g2" if batch == 1 else "_n2"
    assert any(n.startswith("qwinograd_32x32x20x20_p1111_whole_clamp") and n.endswith(tag) for n in names), names
    assert (batch == 1) == (not any(n.startswith(("split", "concat")) for n in names)), names
    got, ref = _run(q, x, AVX2), q.run(x)[0].numpy()
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    if batch == 1:
        ex, *_ = build_executable(q, cpu=AVX2, prepare=True)
        vm = relax.VirtualMachine(ex, tvm.cpu())
        assert "qwinograd_weights_32x32_g2" in ex.as_text()
        made = list(vm["prepare"](tvm.runtime.tensor(np.zeros(1, np.int8))))
        out = vm["main"](tvm.runtime.tensor(x.numpy()), *made)
        np.testing.assert_array_equal((out if hasattr(out, "numpy") else out[0]).numpy(), got)
    monkeypatch.setattr(qw, "qwinograd_plan", lambda *a: None)
    np.testing.assert_array_equal(got, _run(q, x, AVX2))


def test_groups_whose_bias_forms_differ_run_one_by_one():
    """One call for all groups needs one epilogue form: where a group's bias does not fit the accumulator's steps
    (a near-zero weight scale: the bias added in float) and another's does, `emit_qwinograd` declines (before
    emitting anything), and the caller runs the groups one by one; with one form it makes the one call."""
    from tvm import relax
    rng = np.random.default_rng(0)
    wq = rng.integers(-63, 64, (64, 32, 3, 3)).astype(np.int8)
    ws = np.full(64, 1e-3, np.float32)
    ws[40] = 1e-12  # group 1 only
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 16, 16), "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = qw.emit_qwinograd(bb, x, wq, ws, np.ones(64, np.float32), 0.05, 3, (1, 64, 16, 16), (1, 1, 1, 1),
                                  None, None, groups=2)
            assert y is None
            ws[40] = 1e-3
            y = qw.emit_qwinograd(bb, x, wq, ws, np.ones(64, np.float32), 0.05, 3, (1, 64, 16, 16), (1, 1, 1, 1),
                                  None, None, groups=2)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    assert any(gv.name_hint.endswith("_g2") for gv in bb.get().get_global_vars())
