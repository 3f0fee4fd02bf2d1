"""The int8 depthwise kernel (`targets/tvm/cpu/qdepthwise.py`): exact integer results on every geometry it takes,
`vpermb` + `vpdpbusd` in its assembly, and int8 graphs whose depthwise layers run on it. Where this CPU lacks
AVX512-VNNI or VBMI the kernels run with the reference quad product ("exact") and LLVM's generic shuffles: the same
layout, plane and epilogue."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu.conv import store_params
from graphopt.targets.tvm.cpu.int8 import MR, epilogue_constants
from graphopt.targets.tvm.cpu.qdepthwise import (flat_chunks, int8_depthwise_dot, pack_tap_quads, plane,
                                                 qdepthwise_applies, qdepthwise_source)
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax
from graphopt.targets.tvm.cpu.parse import parse_kernel

DOT = int8_depthwise_dot(cpu_target()) or "exact"


def _compile(src: str, cpu: str | None = None):
    f = parse_kernel(src)
    return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=cpu_target(cpu))


def _asm(src: str, cpu: str) -> str:
    lib = _compile(src, cpu)
    return lib.mod.inspect_source("asm") if hasattr(lib, "mod") else lib.inspect_source("asm")


def _reference(x, w, ws, bias, sx, zx, stride, pad, oh, ow):
    """The integer conv of (x - zx) with w, the bias rounded to int32 at the accumulator's scale, scaled."""
    pt, pb, pl, pr = pad
    xp = np.pad(x.astype(np.int64) - zx, ((0, 0), (pt, max(pb, 0)), (pl, max(pr, 0))))
    acc = np.zeros((x.shape[0], oh, ow), np.int64)
    k_h, k_w = w.shape[1:]
    for i in range(k_h):
        for j in range(k_w):
            acc += w[:, i, j, None, None].astype(np.int64) * xp[:, i:i + (oh - 1) * stride + 1:stride,
                                                                j:j + (ow - 1) * stride + 1:stride]
    return (acc + np.round(bias / (ws * sx))[:, None, None]) * (ws * sx)[:, None, None]


@pytest.mark.parametrize("c,h,wd,kh,kw,stride,pad,out_int8", [
    (8, 20, 20, 3, 3, 1, (1, 1, 1, 1), True),     # the row kernel: 2 column blocks, the second overlapping
    (9, 33, 35, 3, 3, 2, (1, 1, 1, 1), True),     # odd sizes at stride 2; 9 channels: tasks of one
    (24, 56, 56, 3, 3, 1, (1, 1, 1, 1), False),   # float output; row blocks of 4 (the last overlapping)
    (8, 40, 40, 5, 5, 2, (2, 2, 2, 2), True),     # 5x5: two weight quads a tap row
    (16, 64, 64, 3, 3, 2, (0, 1, 0, 1), True),    # TF "SAME": the pad after only
    (8, 7, 7, 3, 3, 1, (1, 1, 1, 1), True),       # narrow maps: chunks wrapping across rows
    (8, 14, 14, 3, 3, 2, (0, 1, 0, 1), False),    # 7x7 at stride 2: chunks from two windows
    (16, 14, 14, 5, 5, 1, (2, 2, 2, 2), True),
    (8, 28, 28, 3, 3, 2, (1, 1, 1, 1), True),     # 14x14 outputs from 28-byte input rows
    (8, 9, 12, 3, 1, 1, (1, 1, 0, 0), True),      # 3x1 taps, 12 outputs a row
])
def test_int8_depthwise_kernel_is_exact(c, h, wd, kh, kw, stride, pad, out_int8):
    """Every output equals the integer conv (zero point padding, int32 bias at the accumulator's scale) scaled,
    clamped and rounded to the output grid (a float32 tie may land one step away), or to float32 rounding."""
    pt, pb, pl, pr = pad
    oh, ow = (h + pt + pb - kh) // stride + 1, (wd + pl + pr - kw) // stride + 1
    assert qdepthwise_applies(c, oh, ow, kh, kw, stride)
    rng = np.random.default_rng(c + h)
    x = rng.integers(-128, 128, (c, h, wd)).astype(np.int8)
    w = rng.integers(-127, 128, (c, kh, kw)).astype(np.int8)
    ws, bias, sx, zx = rng.uniform(1e-3, 2e-3, c), rng.uniform(-1, 1, c).astype(np.float32), 0.02, -7
    out_q = (0.05, 3, -128, 127) if out_int8 else None
    clamp = (0.0, 6.0) if out_int8 else None
    off, mult, fb = epilogue_constants(w, ws, bias, sx, zx + 128, -(-c // MR), out_q)
    assert fb is None
    lib = _compile(qdepthwise_source(c, h, wd, oh, ow, kh, kw, stride, pt, pl, clamp, out_q, dot=DOT))
    out = tvm.runtime.tensor(np.full(c * oh * ow, 99 if out_int8 else np.nan, np.int8 if out_int8 else np.float32))
    args = [x.reshape(-1), pack_tap_quads(w), off[:c], mult[:c], np.array([zx + 128], np.int32),
            store_params(clamp, out_q)]
    lib["main"](*(tvm.runtime.tensor(a) for a in args), out)
    got = out.numpy().reshape(c, oh, ow).astype(np.float64)
    ref = _reference(x, w, ws, bias, sx, zx, stride, pad, oh, ow)
    if out_int8:
        ref = np.clip(np.round(np.clip(ref, 0.0, 6.0) / 0.05) + 3, -128, 127)
        assert np.abs(got - ref).max() <= 1 and (got == ref).mean() > 0.99
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_int8_depthwise_kernel_keeps_a_float_bias_it_cannot_round():
    """A channel whose weight scale is ~0 cannot hold its bias as int32 at the accumulator's scale: the kernel
    adds it in float after the multiply (`epilogue_constants`' third value)."""
    c, hw = 8, 16
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (c, hw, hw)).astype(np.int8)
    w = rng.integers(-127, 128, (c, 3, 3)).astype(np.int8)
    ws, bias = rng.uniform(1e-3, 2e-3, c), rng.uniform(-1, 1, c).astype(np.float32)
    ws[2] = 1e-12
    off, mult, fb = epilogue_constants(w, ws, bias, 0.02, 121, 2)
    assert fb is not None
    lib = _compile(qdepthwise_source(c, hw, hw, hw, hw, 3, 3, 1, 1, 1, None, None, float_bias=True, dot=DOT))
    out = tvm.runtime.tensor(np.full(c * hw * hw, np.nan, np.float32))
    lib["main"](*(tvm.runtime.tensor(a) for a in (x.reshape(-1), pack_tap_quads(w), off[:c], mult[:c], fb[:c],
                                                  np.array([121], np.int32), store_params(None, None))), out)
    got = out.numpy().reshape(c, hw, hw)
    xp = np.pad(x.astype(np.int64) + 7, ((0, 0), (1, 1), (1, 1)))
    acc = sum(w[:, i, j, None, None].astype(np.int64) * xp[:, i:i + hw, j:j + hw] for i in range(3) for j in range(3))
    ref = acc * (ws * 0.02)[:, None, None] + bias[:, None, None]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_int8_depthwise_plans():
    """What the kernel takes: 16 outputs a row or more, or a narrow map whose 16-output chunks each come from one
    or two 64-byte windows; every chunk's permute reads quads inside its windows."""
    assert qdepthwise_applies(32, 112, 112, 3, 3, 1) and qdepthwise_applies(960, 7, 7, 3, 3, 1)
    assert not qdepthwise_applies(8, 3, 3, 3, 3, 1)  # 9 outputs: under one vector
    assert not qdepthwise_applies(8, 112, 112, 3, 3, 3)  # stride 3
    assert not qdepthwise_applies(8, 200, 200, 9, 9, 2)  # a 160 KB plane
    for oh, ow, k, s in [(7, 7, 3, 1), (7, 7, 3, 2), (14, 14, 5, 2), (15, 9, 3, 2), (4, 4, 3, 1)]:
        _, wb, _ = plane(oh, ow, k, k, s)
        chunks = flat_chunks(oh, ow, s, wb)
        assert chunks is not None and chunks[-1][0] == oh * ow - 16  # the last chunk ends at the last output
        for p0, base, wins, idx in chunks:
            assert len(wins) <= 2 and max(idx) < 64 * len(wins)
            for lane in range(16):  # lane l's quad starts at its own output's tap (0, 0)
                p = p0 + lane
                at = (p // ow) * s * wb + (p % ow) * s - base
                win = idx[4 * lane] // 64
                assert wins[win] + idx[4 * lane] % 64 == at


def test_int8_depthwise_kernel_assembly():
    """Built for Zen 4 (AVX512-VNNI, VBMI): the row kernel's taps are `vpermb` of a loaded row and `vpdpbusd`,
    each permuted row shared by the output rows that read it (fewer permutes than dot products), with no byte
    inserts or extracts per tap; the narrow-map kernel wraps two windows with `vpermt2b` where a chunk needs them."""
    text = _asm(qdepthwise_source(144, 56, 56, 56, 56, 3, 3, 1, 1, 1, (0.0, 6.0), (0.05, 3, -128, 127)), "znver4")
    dots, perms = len(re.findall(r"\bvpdpbusd\b", text)), len(re.findall(r"\bvpermb\b", text))
    assert dots >= 12 and 0 < perms <= dots // 2, (dots, perms)  # 4 rows a block: 6 permutes, 12 products
    # byte inserts: only the pad byte's broadcast, once a task (per tap they would be dozens)
    assert len(re.findall(r"\bvpinsrb\b", text)) <= 8 and not re.search(r"\bvpextrb\b", text)
    text = _asm(qdepthwise_source(64, 14, 14, 7, 7, 3, 3, 2, 0, 0, None, (0.05, 3, -128, 127)), "znver4")
    assert re.search(r"\bvperm[ti]2b\b", text) and re.search(r"\bvpdpbusd\b", text)


def _int8_graph(model, shape, monkeypatch, dot: str | None):
    from graphopt.targets.tvm.cpu import qdepthwise
    monkeypatch.setattr(qdepthwise, "int8_depthwise_dot", lambda target: dot)
    torch.manual_seed(0)
    x = torch.rand(*shape)
    q = graphopt.optimize(graphopt.trace(model.eval(), (x,)), "quantize,fold-qdq",
                          data=[(torch.rand(*shape),) for _ in range(4)])
    from tvm import relax
    ex, *_ = build_executable(q)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    got = (got if hasattr(got, "numpy") else got[0]).numpy()
    names = {gv.name_hint for gv in lower_to_relax(q).get_global_vars()}
    return names, got, q.run(x)[0].numpy()


@pytest.mark.parametrize("hw,k,stride,pad,batch", [(56, 3, 1, 1, 1), (14, 3, 1, 1, 2), (7, 3, 1, 1, 1),
                                                   (28, 5, 2, 2, 1), (40, 3, 2, 1, 2)])
def test_int8_graph_runs_its_depthwise_layers_on_the_int8_kernel(hw, k, stride, pad, batch, monkeypatch):
    """pw -> ReLU6 -> depthwise -> ReLU6 -> pw quantized: the depthwise conv runs on the int8 kernel, so the
    expansion stores int8 (not the floats of its grid) on every map size, and the output matches the reference
    integer ops (a rounding boundary may move one int8 step). Against the float depthwise kernels on the same
    graph: within the same tolerance."""
    c = 24
    model = torch.nn.Sequential(torch.nn.Conv2d(8, c, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(c, c, k, stride=stride, padding=pad, groups=c), torch.nn.ReLU6(),
                                torch.nn.Conv2d(c, 16, 1))
    names, got, ref = _int8_graph(model, (batch, 8, hw, hw), monkeypatch, DOT)
    nt = f"_n{batch}" if batch > 1 else ""
    assert any(n.startswith(f"qdepthwise_{DOT}_{c}x{hw}x{hw}_k{k}s{stride}_clamp_q_w8") for n in names), names
    assert not any(n.startswith("depthwise") for n in names), names
    assert any(n.startswith("qconv1x1_") and f"_{c}x8x" in n and n.endswith("_clamp_q" + nt) for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()
    f_names, f_got, _ = _int8_graph(model, (batch, 8, hw, hw), monkeypatch, None)
    assert not any(n.startswith("qdepthwise") for n in f_names), f_names
    assert np.abs(got - f_got).max() <= 0.02 * np.abs(ref).max()


def test_int8_depthwise_takes_a_tf_same_pad(monkeypatch):
    """EfficientNet's asymmetric zero pad before a stride-2 depthwise conv joins the int8 kernel's padding: no pad
    function; exact against the reference integer ops on the padded input."""
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU6(), torch.nn.ZeroPad2d((0, 1, 0, 1)),
                                torch.nn.Conv2d(16, 16, 3, stride=2, groups=16), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 8, 1))
    names, got, ref = _int8_graph(model, (1, 8, 32, 32), monkeypatch, DOT)
    assert not [n for n in names if "pad" in n], names
    assert any(n.startswith(f"qdepthwise_{DOT}_16x32x32_k3s2") for n in names), names
    assert np.abs(got - ref).max() <= 0.02 * np.abs(ref).max()


def test_int8_depthwise_is_one_tuning_candidate_among_the_float_kernels(monkeypatch):
    """The int8 kernel is the rule for the layers it takes and one candidate of the depthwise knob: a build with
    every layer on each candidate runs the kernel it was told (a float one on the dequantized int8 input) and
    matches the reference integer ops within a rounding step."""
    from tvm import relax

    from graphopt.targets.tvm.cpu import knobs, qdepthwise
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    monkeypatch.setattr(qdepthwise, "int8_depthwise_dot", lambda target: DOT)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 8, 1)).eval()
    x = torch.rand(1, 8, 28, 28)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize,fold-qdq", data=[(torch.rand(1, 8, 28, 28),)])
    ref = q.run(x)[0].numpy()
    with knobs.collecting() as col:
        lower_to_relax(q, target=cpu_target())
    sites = [s for s in col.sites.values() if s.family == "depthwise"]
    assert len(sites) == 2 and all(s.default == {"kernel": "vnni"} and len(s.candidates) >= 3 for s in sites)
    for i in range(max(len(s.candidates) for s in sites)):
        chosen = {s.name: s.candidates[min(i, len(s.candidates) - 1)] for s in sites}
        with knobs.applied(chosen):
            mod = lower_to_relax(q, target=cpu_target())
        names = [gv.name_hint for gv in mod.functions]
        n_int8 = sum(kn["kernel"] == "vnni" for kn in chosen.values())
        assert len([n for n in names if n.startswith("qdepthwise")]) == n_int8, (chosen, names)
        assert len([n for n in names if n.startswith("depthwise")]) == 2 - n_int8, (chosen, names)
        out = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
        out = (out[0] if not hasattr(out, "numpy") else out).numpy()
        assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max(), chosen
