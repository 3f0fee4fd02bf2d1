"""Kernel knobs (targets/tvm/cpu/knobs.py): every candidate computes the same layer, tuning keeps the rule unless a
candidate is clearly faster, records are reused across runs, and a tuned compile builds with them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import graphopt
from graphopt.targets.tvm.cpu import knobs
from graphopt.targets.tvm.cpu.rules import vector_lanes
from graphopt.targets.tvm.host import cpu_target


def _run_prim(func, arrays: list[np.ndarray]) -> np.ndarray:
    """Compile a kernel PrimFunc alone, call it on the arrays, return its last argument (the output)."""
    import tvm
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=cpu_target())
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["main"](*args)
    return args[-1].numpy()


@pytest.mark.parametrize("cout,cin,p,res", [(12, 16, 83, True), (18, 8, 49, False)])
def test_pointwise_knob_candidates_compute_the_same(cout, cin, p, res):
    """83 pixels: 5 tiles + a 3-pixel column tail (order x stage x prefetch: 6 candidates); 49: 3 tiles and the 49th
    pixel fused into a panel's tile (no prefetch knob: 4). Each candidate equals the float reference."""
    from graphopt.targets.tvm.cpu.conv import conv1x1_knobs, conv1x1_packed, pack_rows
    rng = np.random.default_rng(0)
    rule, cands = conv1x1_knobs(cout, cin, p, 16)
    assert rule in cands and len(cands) == (6 if p // 16 > 3 else 4)
    assert len({knobs.knob_str(c) for c in cands}) == len(cands)
    from graphopt.targets.tvm.cpu.conv import conv1x1_source
    sources = {conv1x1_source(cout, cin, p, 16, (0.0, 6.0), res, kn).replace(knobs.knob_str(kn), "") for kn in cands}
    assert len(sources) == len(cands)  # every knob changes the loop nest, not only its label
    w = rng.standard_normal((cout, cin)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    x = rng.standard_normal((cin, p)).astype(np.float32)
    r = rng.standard_normal((cout, p)).astype(np.float32)
    ref = np.clip(w @ x + b[:, None] + (r if res else 0), 0.0, 6.0)
    for kn in cands:
        f = conv1x1_packed(cout, cin, p, 16, (0.0, 6.0), res, kn)
        assert str(f.attrs["graphopt.knobs"]) == knobs.knob_str(kn)
        out = _run_prim(f, [x, pack_rows(w), b, *([r] if res else []), np.zeros((cout, p), np.float32)])
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=knobs.knob_str(kn))


@pytest.mark.parametrize("lanes", [8, 16])
def test_gemm_register_tiles_compute_the_same(lanes):
    """Each register tile (8x1, 6x2, 3x4 vectors, and 6x4 with 16 lanes, the rule there where N is whole 64-column
    panels; 8 lanes: N = 40 pads to whole panels of 16 or 32 columns, sliced off; 16 lanes: N = 136 to 144, 160 or
    192) emitted under its record gives x @ W^T; the emitted kernel carries the tile it was built with."""
    import tvm
    from tvm import relax

    from graphopt.targets.tvm.cpu.gemm import emit_packed_linear, gemm_knobs
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    m, k, n = (24, 32, 40) if lanes == 8 else (24, 32, 136)
    rule, cands = gemm_knobs(m, n, lanes)
    if lanes == 8:
        assert rule == {"mr": 6, "nr": 16} and [c["nr"] for c in cands] == [8, 16, 32]
    else:
        assert rule == {"mr": 6, "nr": 32} and [(c["mr"], c["nr"]) for c in cands] == [(8, 16), (6, 32), (3, 64),
                                                                                       (6, 64)]
        assert gemm_knobs(m, 128, lanes)[0] == {"mr": 6, "nr": 64}
    rng = np.random.default_rng(1)
    w, x = rng.standard_normal((n, k)).astype(np.float32), rng.standard_normal((m, k)).astype(np.float32)
    for kn in cands:
        bb = relax.BlockBuilder()
        xv = relax.Var("x", relax.TensorType((m, k), "float32"))
        with knobs.applied({f"gemm|{m}x{k}x{n}|v{lanes}": kn}), bb.function("main", [xv]):
            with bb.dataflow():
                out = bb.emit_output(emit_packed_linear(bb, xv, w, None, (m, k), lanes))
            bb.emit_func_output(out)
        mod = bb.get()
        tiles = {str(f.attrs["graphopt.knobs"]) for f in mod.functions.values()
                 if f.attrs is not None and "graphopt.knobs" in f.attrs}
        assert tiles == {f"mr={kn['mr']},nr={kn['nr']}"}
        vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), x @ w.T, rtol=1e-4, atol=1e-4)


def test_depthwise_kernel_candidates_compute_the_same():
    """Three depthwise convs (28x28 3x3: rows or channels; 5x5 and 3x3 stride 2: rows, channels or phases), built once
    per candidate index with every layer on that candidate: each build runs the kernels it was told and equals
    the model."""
    import tvm
    from tvm import relax

    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.lower import lower_to_relax
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU6(),
                                torch.nn.Conv2d(16, 16, 5, stride=2, padding=2, groups=16),
                                torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)).eval()
    x = torch.randn(1, 16, 28, 28)
    g = graphopt.trace(model, (x,))
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    sites = sorted(col.sites.values(), key=lambda s: s.key)
    cb16 = int(vector_lanes(cpu_target()) >= 16)  # 512-bit vectors add 16-channel groups to each layer
    assert [len(s.candidates) for s in sites] == [3 + cb16, 2 + cb16, 3 + cb16]
    assert all(s.family == "depthwise" for s in sites)
    prefix = {"rows": "depthwise_", "channels": "depthwise_cb_", "channels16": "depthwise_cb16_",
              "phases": "depthwise_ph_"}
    for i in range(3 + cb16):
        chosen = {s.name: s.candidates[i] for s in sites if i < len(s.candidates)}
        with knobs.applied(chosen):
            mod = lower_to_relax(g, target=cpu_target())
        names = [gv.name_hint for gv in mod.functions if gv.name_hint.startswith("depthwise")]
        for s in sites:
            kn = chosen.get(s.name) or s.default
            kernel = kn["kernel"] + ("16" if kn.get("lanes") == 16 else "")
            shape = s.key.split("_")[0] + "_"
            assert any(n.startswith(prefix[kernel] + shape) for n in names), (kernel, shape, names)
        vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x.numpy()))
        out = out[0] if not hasattr(out, "numpy") else out
        np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=str(chosen))


def test_dense_conv_kernel_candidates_compute_the_same():
    """Three 3x3 convs (a 24x24 map, a strided one, one with a residual add on 12x12), built with every layer on
    each candidate (the pixel-row conv, the rule, and the staged and in-place flat GEMMs): each build runs the
    kernels it was told and equals the model."""
    import tvm
    from tvm import relax

    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.lower import lower_to_relax

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(12, 16, 3, padding=1)
            self.b, self.c = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x)))
            return torch.relu(self.c(y) + y)

    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(1, 12, 24, 24)
    g = graphopt.trace(model, (x,))
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    sites = {s.key.split("_")[0] + s.key.split("_")[1][-2:]: s for s in col.sites.values() if s.family == "conv_kxk"}
    assert sorted(sites) == ["16x12x24x24s1", "16x16x12x12s1", "16x16x24x24s2"], sorted(sites)
    assert all(s.default == {"kernel": "tok"} for s in sites.values())
    assert sites["16x16x12x12s1"].key.endswith("_res_clamp")
    assert [k for k, s in sorted(sites.items()) if {"kernel": "winograd"} in s.candidates] == [
        "16x12x24x24s1", "16x16x12x12s1"]  # stride 1 only
    for kernel in ("tok", "staged", "flat", "winograd"):
        chosen = {s.name: {"kernel": kernel} for s in sites.values() if {"kernel": kernel} in s.candidates}
        with knobs.applied(chosen):
            mod = lower_to_relax(g, target=cpu_target())
        names = [gv.name_hint for gv in mod.functions]
        for s in sites.values():
            shape = s.key.split("_")[0]
            if s.name in chosen:
                assert any(n.startswith(f"conv_{kernel}_{shape}") for n in names), (kernel, shape, names)
        vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x.numpy()))
        out = out[0] if not hasattr(out, "numpy") else out
        np.testing.assert_allclose(out.numpy(), model(x).detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=kernel)


def _int8_pointwise_pair():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(24, 40, 1), torch.nn.ReLU6(), torch.nn.Conv2d(40, 16, 1)).eval()
    x = torch.randn(1, 24, 7, 7)
    g = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int7},fold-qdq",
                          data=[(torch.randn(1, 24, 7, 7),) for _ in range(4)])
    return model, x, g


def test_int8_pointwise_pixel_tile_candidates_compute_the_same(monkeypatch):
    """A quantized pointwise conv on a 7x7 map (49 pixels, the last tile overlapping) built with 16- and 8-pixel
    tiles (8-lane vectors, as on AVX2): each build runs the tile it was told (its accumulator holds 6 x 16 or 6 x 8
    int32) and both give the same int8 outputs, equal to the model's within a quantization step. For Zen 4 (VNNI on
    half-width AVX-512) the rule is one 16-pixel zmm vector, the 8-lane tiles candidates."""
    import tvm
    from tvm import relax

    from graphopt.targets.tvm.cpu import rules
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.lower import lower_to_relax
    monkeypatch.setattr(rules, "AVX512_VECTOR_BITS", 256)  # (an AVX-512 host: its 16-lane rule is tested below)
    half_width_vnni = rules.half_width_vnni
    monkeypatch.setattr(rules, "half_width_vnni", lambda target: False)  # (a Zen 4 host: its rule, below)
    model, x, g = _int8_pointwise_pair()
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    sites = [s for s in col.sites.values() if s.family == "qconv1x1"]
    assert len(sites) == 2 and all(s.default == {"nv": 2} and {"nv": 1} in s.candidates for s in sites)
    outs = []
    for nv in (2, 1):
        with knobs.applied({s.name: {"nv": nv} for s in sites}):
            mod = lower_to_relax(g, target=cpu_target())
        kernels = [mod[gv].script() for gv in mod.functions if gv.name_hint.startswith("qconv1x1")]
        assert len(kernels) == 2 and all(f"acc = T.alloc_buffer(({6 * 8 * nv},), \"int32\")" in k for k in kernels), nv
        vm = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())
        out = vm["main"](tvm.runtime.tensor(x.numpy()))
        outs.append((out[0] if not hasattr(out, "numpy") else out).numpy())
    np.testing.assert_array_equal(outs[1], outs[0])
    ref = model(x).detach().numpy()
    assert np.abs(outs[0] - ref).max() <= 0.05 * np.abs(ref).max()
    # with VNNI tuning may also take 8 pixels x two channel blocks (12 x 8 int32 in registers); the same outputs
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    vnni = cpu_target("znver4")
    monkeypatch.setattr(rules, "half_width_vnni", half_width_vnni)
    with knobs.collecting() as col:
        lower_to_relax(g, target=vnni)
    sites = [s for s in col.sites.values() if s.family == "qconv1x1"]
    assert len(sites) == 2 and all({"nv": 1, "tiles": 2} in s.candidates and {"nv": 2} in s.candidates
                                   and s.default == {"nv": 2, "lanes": 16} for s in sites)
    with knobs.applied({s.name: {"nv": 1, "tiles": 2} for s in sites}):
        mod = lower_to_relax(g, target=vnni)
    kernels = [mod[gv].script() for gv in mod.functions if gv.name_hint.startswith("qconv1x1")]
    assert len(kernels) == 2 and all('acc = T.alloc_buffer((96,), "int32")' in k for k in kernels)
    if int8_dot(cpu_target()) == "vnni":  # this machine runs it
        out = relax.VirtualMachine(build_cpu(mod, vnni), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
        np.testing.assert_array_equal((out[0] if not hasattr(out, "numpy") else out).numpy(), outs[0])


def test_int8_pointwise_16_lane_candidates_compute_the_same():
    """For a full-width AVX-512 CPU with VNNI the int8 pointwise rule is 512-bit `vpdpbusd` on 32-pixel tiles,
    each 16-pixel vector's 6 rows in an accumulator buffer of its own; 16-pixel tiles and two channel blocks are
    candidates, and so is the 8-lane rule. Every candidate declares the buffers its tile needs and, on a host that
    runs them, gives the same int8 outputs as the 8-lane rule (integer sums: exactly)."""
    import tvm
    from tvm import relax

    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.cpu.rules import vector_lanes
    from graphopt.targets.tvm.lower import lower_to_relax
    model, x, g = _int8_pointwise_pair()
    wide = cpu_target("sapphirerapids")
    with knobs.collecting() as col:
        lower_to_relax(g, target=wide)
    sites = [s for s in col.sites.values() if s.family == "qconv1x1"]
    assert len(sites) == 2 and all(s.default == {"nv": 4, "lanes": 16} for s in sites)
    cands = sites[0].candidates
    assert {"nv": 2} in cands and {"nv": 4, "lanes": 16, "tiles": 2} in cands and len(cands) == 5
    runs_here = int8_dot(cpu_target()) == "vnni" and vector_lanes(cpu_target()) == 16
    outs = []
    for cand in cands:
        with knobs.applied({s.name: cand for s in sites}):
            mod = lower_to_relax(g, target=wide)
        kernels = [mod[gv].script() for gv in mod.functions if gv.name_hint.startswith("qconv1x1")]
        rows = 6 * cand.get("tiles", 1)
        if cand.get("lanes") == 16:
            want = [f'acc{v} = T.alloc_buffer(({rows * 16},), "int32")' for v in range(cand["nv"] // 2)]
        else:
            want = [f'acc = T.alloc_buffer(({6 * 8 * cand["nv"]},), "int32")']
        assert len(kernels) == 2 and all(w in k for w in want for k in kernels), cand
        if runs_here:
            out = relax.VirtualMachine(build_cpu(mod, cpu_target()), tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
            outs.append((out[0] if not hasattr(out, "numpy") else out).numpy())
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[-1])
    if outs:
        ref = model(x).detach().numpy()
        assert np.abs(outs[0] - ref).max() <= 0.05 * np.abs(ref).max()


def _pointwise_sites():
    """Two pointwise layers on a 7x7 map (3 pixel tiles + 1: order x stage, 4 candidates each)."""
    from graphopt.targets.tvm.lower import lower_to_relax
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 24, 1), torch.nn.ReLU(), torch.nn.Conv2d(24, 32, 1)).eval()
    x = torch.randn(1, 16, 7, 7)
    g = graphopt.trace(model, (x,))
    with knobs.collecting() as col:
        lower_to_relax(g, target=cpu_target())
    return g, model, x, col


def test_measure_in_model_times_every_candidate_inside_the_model():
    from graphopt.targets.tvm.lower import lower_to_relax
    g, _, x, col = _pointwise_sites()
    assert sorted(s.family for s in col.sites.values()) == ["conv1x1", "conv1x1"]
    assert sorted(col.symbols.values()) == sorted(col.sites)  # each site's kernel is a function the VM calls
    todo = list(col.sites.values())
    seconds = knobs.measure_in_model(todo, lambda: lower_to_relax(g, target=cpu_target()), cpu_target(),
                                     [x.numpy()], progress=False, rounds=2, runs=1)
    for site in todo:
        assert set(seconds[site.name]) == {knobs.knob_str(c) for c in site.candidates}
        assert all(v > 0 for v in seconds[site.name].values())


def test_a_candidate_build_that_fails_is_skipped_not_fatal(caplog):
    """Build 0 (every layer's first candidate, here the rule's) fails: measuring goes on with the others and says
    so, and with no time for the rule each site keeps the rule rather than trust a comparison it lacks."""
    from graphopt.targets.tvm.lower import lower_to_relax
    g, _, x, col = _pointwise_sites()
    calls = [0]

    def lower():
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("no such kernel")
        return lower_to_relax(g, target=cpu_target())
    todo = list(col.sites.values())
    seconds = knobs.measure_in_model(todo, lower, cpu_target(), [x.numpy()], progress=False, rounds=1, runs=1)
    assert "candidate 0 of each layer failed (RuntimeError: no such kernel)" in caplog.text
    for site in todo:
        assert site.candidates[0] == site.default
        assert set(seconds[site.name]) == {knobs.knob_str(c) for c in site.candidates[1:]}
        assert knobs.choose(site, seconds[site.name]) == site.default


def _fake_measure(gain: dict[str, float]):
    """A measure: the rule's choice 100 us, the first other candidate 100 / gain[site key] us, the rest 200 us."""
    def measure(todo, base, deadline):
        out = {}
        for site in todo:
            rule = knobs.knob_str(site.default)
            other = next(knobs.knob_str(c) for c in site.candidates if c != site.default)
            out[site.name] = {knobs.knob_str(c): 1e-4 if knobs.knob_str(c) == rule else
                              (1e-4 / gain[site.key] if knobs.knob_str(c) == other else 2e-4)
                              for c in site.candidates}
        return out
    return measure


def test_paired_seconds_cancel_machine_phases():
    """Two rounds where a slow phase of the machine hit only the rule's build (40% slower) make the plain medians
    say the candidate is 1.4x faster; per-round ratios say they are even, and the rule is kept. A round without a
    sample is skipped; without the rule's samples the plain medians are returned."""
    rule, cand = "kernel=a", "kernel=b"
    rounds = {rule: [1.0, 1.0, 1.4, 1.4, 1.4, 1.4, 1.0], cand: [1.0, 1.0, 1.0, 1.0, 1.4, 1.4, 1.0]}
    assert np.median(rounds[rule]) / np.median(rounds[cand]) == pytest.approx(1.4)
    sec = knobs.paired_seconds(rounds, rule)
    assert sec[rule] == pytest.approx(1.4) and sec[cand] == pytest.approx(1.4)
    site = knobs.Site("f", "k", {"kernel": "a"}, [{"kernel": "a"}, {"kernel": "b"}])
    assert knobs.choose(site, sec) == {"kernel": "a"}
    faster = {rule: [1.0, 1.4, None, 1.0, 1.4], cand: [0.8, 1.12, 0.5, 0.8, None]}  # truly 1.25x faster
    sec = knobs.paired_seconds(faster, rule)
    assert sec[cand] / sec[rule] == pytest.approx(0.8) and knobs.choose(site, sec) == {"kernel": "b"}
    assert knobs.paired_seconds({cand: [2.0, None, 4.0]}, rule) == {cand: 3.0}


def test_knob_tuning_keeps_the_rule_unless_clearly_faster_and_reuses_records(tmp_path):
    _, _, _, col = _pointwise_sites()
    sites, tgt = col.sites, cpu_target()
    first, second = sorted(sites)
    gain = {sites[first].key: 1.10, sites[second].key: 1.03}  # 10% faster: taken; 3%: within noise, kept
    records, summary = knobs.tune_sites(sites, tgt, _fake_measure(gain), str(tmp_path))
    assert records[first] != sites[first].default and records[second] == sites[second].default
    assert (summary.measured, summary.reused, summary.changed) == (2, 0, 1)
    db = json.loads((tmp_path / knobs.DB_FILE).read_text())
    from graphopt.targets.tvm.cpu.cost import kernels_tag
    assert len(db) == 2 and all(f"|{kernels_tag()}|" in key for key in db)

    def no_measure(todo, base, deadline):
        raise AssertionError("a recorded site was measured again")
    again, summary2 = knobs.tune_sites(sites, tgt, no_measure, str(tmp_path))
    assert again == records and (summary2.measured, summary2.reused, summary2.changed) == (0, 2, 1)
    # retune measures again; a spent budget measures nothing and says so
    _, summary3 = knobs.tune_sites(sites, tgt, _fake_measure({k: 1.0 for k in gain}), str(tmp_path), retune=True)
    assert summary3.measured == 2 and summary3.changed == 0
    _, summary4 = knobs.tune_sites(sites, tgt, no_measure, None, deadline=knobs._now() - 1)
    assert summary4.measured == 0 and summary4.stopped == "time budget spent"


def test_a_change_the_second_measurement_does_not_confirm_keeps_the_rule(tmp_path):
    """Both sites measure 10% faster on another candidate; measured again (rule against the changes only, in two
    builds), one keeps 10% and is taken, the other reads even and keeps the rule, which the database records. A
    budget spent before the second measurement keeps every rule and records nothing."""
    _, _, _, col = _pointwise_sites()
    sites, tgt = col.sites, cpu_target()
    first, second = sorted(sites)
    calls = []
    first_pass = _fake_measure({sites[first].key: 1.10, sites[second].key: 1.10})
    again = _fake_measure({sites[first].key: 1.10, sites[second].key: 1.0})

    def measure(todo, base, deadline):
        calls.append(([len(s.candidates) for s in todo], dict(base)))
        return (first_pass if len(calls) == 1 else again)(todo, base, deadline)
    records, summary = knobs.tune_sites(sites, tgt, measure, str(tmp_path))
    assert len(calls) == 2 and calls[1] == ([2, 2], {})  # both changes in the second measurement, nothing else
    assert records[first] != sites[first].default and records[second] == sites[second].default
    assert (summary.measured, summary.changed, summary.unconfirmed) == (2, 1, 1)
    entry = next(e for e in summary.per_site if e["site"] == second)
    assert entry["chosen"] == entry["rule"] and set(entry["confirm_us"].values()) == {100.0}
    db = json.loads((tmp_path / knobs.DB_FILE).read_text())
    kept_rule = {n: v["knobs"] == sites[n].default for n in sites for k, v in db.items() if k.endswith(n)}
    assert kept_rule == {first: False, second: True}

    def budget_spent(todo, base, deadline):
        knobs._now = lambda: float("inf")  # the first measurement used the whole budget
        return first_pass(todo, base, deadline)
    now = knobs._now
    try:
        records, summary = knobs.tune_sites(sites, tgt, budget_spent, str(tmp_path / "b"), deadline=now() + 60)
    finally:
        knobs._now = now
    assert all(records[n] == sites[n].default for n in sites)
    assert (summary.changed, summary.unconfirmed, summary.stopped) == (0, 2, "time budget spent")
    assert json.loads((tmp_path / "b" / knobs.DB_FILE).read_text()) == {}


def test_tuned_compile_builds_with_the_knob_records(tmp_path, monkeypatch):
    """compile with a Tuning measures the knobs (here a fake measure makes another candidate 20% faster for both
    layers), lowers again with the records, and reports them; the artifact still computes the model."""
    import graphopt.targets.tvm.build as build
    import graphopt.targets.tvm.cpu.conv as conv
    from graphopt.targets.tvm.tuning import TuningSummary
    g, model, x, col = _pointwise_sites()
    fake = _fake_measure({s.key: 1.2 for s in col.sites.values()})
    monkeypatch.setattr(knobs, "measure_in_model", lambda todo, lower, tgt, inputs, base, until, progress:
                        fake(todo, base, until))
    monkeypatch.setattr(build, "tune", lambda mod, tgt, tuning: (None, TuningSummary()))  # MetaSchedule: not here
    used = []
    source = conv.conv1x1_source
    monkeypatch.setattr(conv, "conv1x1_source", lambda *a, **kw: used.append(a[6]) or source(*a, **kw))
    out = graphopt.compile(g, "llvm", tuning=graphopt.Tuning(trials=1, db=str(tmp_path), progress=False),
                           output=tmp_path / "art")
    man = json.loads((out / "manifest.json").read_text())
    kn = man["tuning"]["knobs"]
    assert (kn["sites"], kn["measured"], kn["changed"]) == (2, 2, 2)
    chosen = {e["chosen"] for e in kn["per_site"]}
    assert {knobs.knob_str(k) for k in used[-2:]} == chosen and not chosen & {e["rule"] for e in kn["per_site"]}
    from graphopt.report import compile_report
    text = compile_report(g, g, out, man, None, None)
    assert "knobs      2 kernel(s) of graphopt's own with knobs: 2 measured, 0 from the database, 2 changed" in text
    assert "second measurement" not in text
    kn["unconfirmed"] = 1
    assert ("2 changed from the rule (1 more kept the rule: a second measurement did not confirm them)"
            in compile_report(g, g, out, man, None, None))
    np.testing.assert_allclose(graphopt.load(out)(x.numpy())[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
