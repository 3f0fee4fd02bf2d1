"""Kernels too small to pay for a fork run on one thread (targets/tvm/cpu/threads.py): which ones are picked, that
the rewrite leaves no parallel loop and changes no result, and that large kernels keep their threads."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import tvm
from tvm import relax, tirx

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu import threads
from graphopt.targets.tvm.cpu.gemm import gemm_packed
from graphopt.targets.tvm.cpu.pool import pad_source
from graphopt.targets.tvm.cpu.parse import parse_kernel


def _kinds(stmt, out):
    """Every loop kind in a TIR statement tree (the node types graphopt's kernels use)."""
    from tvm import s_tir
    if isinstance(stmt, tirx.For):
        out.append(stmt.kind)
        _kinds(stmt.body, out)
    elif isinstance(stmt, tirx.SeqStmt):
        for s in stmt.seq:
            _kinds(s, out)
    elif isinstance(stmt, tirx.IfThenElse):
        _kinds(stmt.then_case, out)
        if stmt.else_case is not None:
            _kinds(stmt.else_case, out)
    elif isinstance(stmt, (tirx.AttrStmt, s_tir.SBlock)):
        _kinds(stmt.body, out)
    elif isinstance(stmt, s_tir.SBlockRealize):
        _kinds(stmt.block, out)
    return out


def _pad(rows, h, w):
    return parse_kernel(pad_source(rows, h, w, 1, 1, 1, 1, "float32"))


def test_estimate_scales_with_the_work_and_counts_the_forks():
    small, forks = threads.estimate(_pad(24, 4, 4))
    big, _ = threads.estimate(_pad(2400, 40, 40))
    assert forks == 1 and 0 < small < threads.SERIAL_US < big
    assert big == pytest.approx(small * (2400 * 42 * 42) / (24 * 6 * 6), rel=0.2)  # per output element
    # a GEMM's multiply-accumulates at the FMA rate: 16x64x64 is about a microsecond, 256x512x512 far over the bar
    gemm_small, gemm_forks = threads.estimate(gemm_packed(16, 64, 64, 6, 16))
    gemm_big, _ = threads.estimate(gemm_packed(256, 512, 512, 6, 16))
    assert gemm_forks == 2 and gemm_small < threads.SERIAL_US * gemm_forks < gemm_big


def test_a_kernel_the_walk_cannot_bound_keeps_its_threads():
    scan = parse_kernel("""
@T.prim_func(private=True)
def scan(x: T.Buffer((64,), "float32"), y: T.Buffer((64,), "float32")):
    for t in T.parallel(4):
        i = T.decl_buffer((1,), "int32", scope="local")
        i[0] = 0
        while i[0] < 16:
            y[t * 16 + i[0]] = x[t * 16 + i[0]]
            i[0] = i[0] + 1
""")
    us, forks = threads.estimate(scan)
    assert forks == 1 and us == float("inf")
    mod, names = threads.serialize_small(tvm.IRModule({"scan": scan}))
    assert names == [] and tirx.ForKind.PARALLEL in _kinds(mod["scan"].body, [])


def test_a_walk_that_fails_unexpectedly_keeps_the_threads_and_the_build(monkeypatch):
    def broken(e):
        raise RuntimeError("a TIR node the walk mishandles")

    monkeypatch.setattr(threads, "_expr_ops", broken)
    us, forks = threads.estimate(_pad(24, 4, 4))
    assert us == float("inf") and forks == 1
    mod, names = threads.serialize_small(tvm.IRModule({"small": _pad(24, 4, 4)}))
    assert names == [] and tirx.ForKind.PARALLEL in _kinds(mod["small"].body, [])


def test_serialize_small_rewrites_only_the_small_kernels():
    mod = tvm.IRModule({"small": _pad(24, 4, 4), "big": _pad(2400, 40, 40)})
    before = mod["small"]
    out, names = threads.serialize_small(mod)
    assert names == ["small"]
    assert tirx.ForKind.PARALLEL not in _kinds(out["small"].body, [])
    assert tirx.ForKind.PARALLEL in _kinds(out["big"].body, [])
    assert tirx.ForKind.PARALLEL in _kinds(before.body, [])  # the original function object is not mutated


def _build(g, serial_us, monkeypatch):
    monkeypatch.setattr(threads, "SERIAL_US", serial_us)
    stats: dict = {}
    ex, *_ = build_executable(g, stats=stats)
    return relax.VirtualMachine(ex, tvm.cpu()), stats["one_thread"]


def test_a_tiny_model_runs_its_small_kernels_on_one_thread_with_the_same_result(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.LayerNorm(64),
                                torch.nn.Linear(64, 512)).eval()
    x = torch.randn(16, 64)
    g = graphopt.trace(model, (x,))
    threaded, none = _build(g, 0.0, monkeypatch)
    serial, names = _build(g, 3.0, monkeypatch)
    assert none == []
    # the 16x64x64 GEMM and the layer norm are picked; the 16x64x512 GEMM (half a million MACs) is not
    assert any(n.startswith("gemm_packed_16x64x64") for n in names), names
    assert any(n.startswith("layer_norm") for n in names), names
    assert not any(n.startswith("gemm_packed_16x64x512") for n in names), names
    args = [tvm.runtime.tensor(x.numpy())]
    a, b = (vm["main"](*args) for vm in (threaded, serial))
    a, b = ((o if hasattr(o, "numpy") else o[0]).numpy() for o in (a, b))
    np.testing.assert_array_equal(a, b)  # the same code on one thread: bit-identical
    with torch.no_grad():
        np.testing.assert_allclose(b, model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_compile_records_and_reports_the_one_thread_kernels(tmp_path):
    import json

    from graphopt.report import compile_report
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU()).eval()
    g = graphopt.trace(model, (torch.randn(4, 32),))
    out = graphopt.compile(g, "llvm", output=tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    one = manifest["target_info"]["one_thread_kernels"]
    assert one and all(isinstance(n, str) for n in one)
    assert f"{len(one)} kernel(s) too small to pay for a fork" in compile_report(g, g, out, manifest, None, None)


_THREAD_VARS = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_BIND_THREADS")


def _fresh_python(code: str, **env_vars: str) -> list[str]:
    """What `code` prints (split on whitespace), run in a new interpreter whose environment has none of TVM's thread
    variables but `env_vars`: TVM reads them once, when a thread's pool starts."""
    env = {k: v for k, v in os.environ.items() if k not in _THREAD_VARS}
    env.update(env_vars)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          check=True).stdout.split()


_AFFINITY_PROBE = """
import os, numpy as np
import graphopt.targets.tvm  # noqa: F401  (what every graphopt entry point imports first)
import tvm
from tvm.script import tirx as T

SRC = '''
@T.prim_func
def main(a: T.Buffer((4, 64), "float32")):
    for t in T.parallel(4):
        for i in range(64):
            a[t, i] = a[t, i] + T.float32(1)
'''
main = tvm.script.parse(SRC, extra_vars={"T": T})
f = tvm.compile(tvm.IRModule({"main": main}), target="llvm")["main"]
f(tvm.runtime.tensor(np.zeros((4, 64), np.float32)))  # starts this thread's pool
for tid in os.listdir("/proc/self/task"):
    for line in open(f"/proc/self/task/{tid}/status"):
        if line.startswith("Cpus_allowed_list"):
            print(line.split()[1])
"""


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs 2 cores this process may use")
def test_tvm_worker_threads_are_not_pinned_unless_the_user_asks():
    """host.unpin_workers: with two threads, TVM's worker may run on any core (pinned, it shared the caller's core
    whenever the caller started there); TVM_BIND_THREADS set by the user is left alone (and pins, which shows the
    probe can see a pinned thread)."""
    full = _fresh_python(_AFFINITY_PROBE, TVM_NUM_THREADS="2")
    assert len(full) >= 2 and len(set(full)) == 1, full  # the caller and its worker(s): all on every core
    pinned = _fresh_python(_AFFINITY_PROBE, TVM_NUM_THREADS="2", TVM_BIND_THREADS="1")
    assert len(set(pinned)) > 1, pinned  # TVM's own pinning: a worker on one core


def test_tvm_runs_on_the_physical_cores_unless_the_user_chose(monkeypatch):
    """host.default_threads: TVM's own default is half the logical CPUs (one thread on a 2-vCPU VM whose vCPUs are
    cores); importing graphopt's TVM layer sets TVM_NUM_THREADS to host_cores() unless TVM_NUM_THREADS or
    OMP_NUM_THREADS is set, so a Python user calling graphopt.load() gets the cores the CLI uses. A new interpreter
    shows TVM's pool taking it; the variables the user set are left as they are (checked here: a new interpreter
    for each cost ~6 s of imports, and what TVM does with them is TVM's)."""
    from graphopt.targets.tvm.host import default_threads, host_cores
    probe = ("import os, graphopt.targets.tvm, tvm; "
             "print(os.environ.get('TVM_NUM_THREADS'), tvm.get_global_func('runtime.NumThreads')())")
    assert _fresh_python(probe) == [str(host_cores()), str(host_cores())]
    for name in _THREAD_VARS:
        monkeypatch.delenv(name, raising=False)
    default_threads()
    assert os.environ.get("TVM_NUM_THREADS") == str(host_cores())
    for user, value in (("OMP_NUM_THREADS", "1"), ("TVM_NUM_THREADS", "3")):
        for name in _THREAD_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv(user, value)
        default_threads()
        assert {n: os.environ.get(n) for n in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")} == {
            "TVM_NUM_THREADS": value if user == "TVM_NUM_THREADS" else None,
            "OMP_NUM_THREADS": value if user == "OMP_NUM_THREADS" else None}


def test_reports_measure_every_runtime_on_the_users_thread_count(monkeypatch):
    """Without --threads, `graphopt compile`'s report and `graphopt bench` give ONNX Runtime and PyTorch the
    TVM_NUM_THREADS (or else OMP_NUM_THREADS) the user set, as the artifact runs; every core only where neither is
    set (or one is not a positive integer)."""
    from graphopt.targets.tvm.host import chosen_threads, host_cores
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert chosen_threads() == host_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert chosen_threads() == 3
    monkeypatch.setenv("TVM_NUM_THREADS", "1")
    assert chosen_threads() == 1
    monkeypatch.setenv("TVM_NUM_THREADS", "0")
    assert chosen_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "four")
    assert chosen_threads() == host_cores()
