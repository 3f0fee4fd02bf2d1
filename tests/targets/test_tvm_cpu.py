"""TVM CPU target: build, artifact layout and manifest, load and call, input checks, overwrite rules, tuning."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import graphopt
from graphopt.errors import ArtifactError, InputMismatchError, TargetError
from graphopt.targets.tvm.host import cpu_target, host_cpu


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from conftest import small_cnn
    model, x = small_cnn()
    g = graphopt.optimize(graphopt.trace(model, (x,)), "fold-bn,dce")
    out = graphopt.compile(g, "llvm", output=tmp_path_factory.mktemp("a") / "art")
    return g, model, x, out


def test_target_uses_detected_cpu():
    t = cpu_target()
    assert str(t.attrs["mcpu"]) == host_cpu() and int(t.attrs["num-cores"]) >= 1


def test_host_target_leaves_out_what_the_os_hides(monkeypatch):
    """A VM may hide ISA extensions of its CPU model (a Zen 4 without AVX-512 in /proc/cpuinfo, which LLVM still
    calls znver4): code built for this machine must not use them, and a named CPU keeps all of its own."""
    from graphopt.report import _target_line
    from graphopt.targets.tvm import host
    from graphopt.targets.tvm.cpu.int8 import int8_dot
    from graphopt.targets.tvm.cpu.rules import vector_lanes
    monkeypatch.setattr(host, "host_cpu", lambda: "znver4")
    monkeypatch.setattr(host, "host_isa", lambda: {"sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"})
    host.host_masked.cache_clear()
    try:
        here = host.cpu_target()
        assert {"avx512f", "avx512vnni", "gfni", "vaes"} <= set(host.host_masked())
        assert not host.missing_here(host.target_isa(here)) and "avx2" in host.target_isa(here)
        assert vector_lanes(here) == 8 and int8_dot(here) == "ubsw"
        named = host.cpu_target("znver4")
        assert {"avx512f", "avx512vnni"} <= set(host.target_isa(named)) and int8_dot(named) == "vnni"
        assert host.cpu_target(here) is here
        line = _target_line({"target_info": {"kind": "llvm", "mcpu": "znver4", "without": ["avx512f", "avx512bw",
                                                                                             "gfni"]}}, False)
        assert "mcpu=znver4 without avx512*, gfni (not reported by the CPU it was built on)" in line
    finally:
        host.host_masked.cache_clear()


def test_artifact_runs_and_matches_reference(built):
    g, model, x, out = built
    assert {p.name for p in out.iterdir()} == {"model.so", "manifest.json", "graph.ir"}
    m = graphopt.load(out)
    y = m(x.numpy())
    assert isinstance(y, tuple) and y[0].shape == (1, 10)
    np.testing.assert_allclose(y[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert m.latency(x.numpy(), warmup=1, runs=3) > 0


def test_manifest_records_what_a_deployer_needs(built):
    g, _, _, out = built
    man = json.loads((out / "manifest.json").read_text())
    assert man["inputs"] == [{"name": "x", "shape": [1, 3, 16, 16], "dtype": "float32"}]
    assert man["outputs"][0]["shape"] == [1, 10]
    assert man["pipeline"] == "fold-bn,dce"
    assert [p["name"] for p in man["passes"]] == ["fold-bn", "dce"]
    assert man["target_info"]["mcpu"] == host_cpu()
    from graphopt.targets.tvm.host import host_masked
    assert man["target_info"]["without"] == list(host_masked())
    from graphopt.targets.tvm.cpu.rules import vector_lanes
    from graphopt.targets.tvm.host import cpu_target
    assert man["target_info"]["vector_bits"] == 32 * vector_lanes(cpu_target()) in (128, 256, 512)
    assert man["versions"]["apache-tvm"].startswith("0.27")
    assert man["files"]["model.so"]["bytes"] > 1000 and len(man["files"]["model.so"]["sha256"]) == 64
    assert man["stats"]["params"] == g.stats().params


def test_wrong_inputs_are_clear_errors(built):
    _, _, x, out = built
    m = graphopt.load(out)
    with pytest.raises(InputMismatchError, match="input 'x' has shape \\[1, 3, 8, 8\\], expected \\[1, 3, 16, 16\\]"):
        m(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(InputMismatchError, match=r"dtype float64, expected float32 \(cast it: x.astype\(np.float32\)"):
        m(np.zeros((1, 3, 16, 16)))
    with pytest.raises(InputMismatchError, match="expected 1 input"):
        m()


class _Tokens(torch.nn.Module):
    """Token ids -> embedding (through a reshape) -> mean -> linear, plus an index_select by a second input."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)
        self.table = torch.nn.Parameter(torch.randn(6, 3))

    def forward(self, ids, pick):
        y = self.fc(self.emb(ids.reshape(2, 3)).mean(1))
        return y + torch.index_select(self.table, 0, pick)[:2]


def test_token_ids_out_of_range_never_read_out_of_bounds(tmp_path):
    """A bad token id is refused by the runtime with the table's range, and the .so itself never reads past a
    table: the embedding gives NaN rows, every other take wraps its index (TVM's own lowering segfaulted on such
    ids)."""
    import tvm

    from graphopt.targets.tvm.lower import lower_to_relax
    torch.manual_seed(0)
    model = _Tokens().eval()
    ids, pick = torch.tensor([[1, 2, 3, 4, 5, 9]]), torch.tensor([0, 5, 1])
    g = graphopt.trace(model, (ids, pick))
    assert g.input_ranges() == {"ids": {"range": [0, 10], "node": "embedding"}}
    ex_ids = torch.stack([g.example_inputs(seed=s)[0] for s in range(4)])
    assert ex_ids.min() >= 0 and ex_ids.max() < 10 and ex_ids.max() >= 2  # the whole table, not just 0/1
    assert 'mode="fast"' not in lower_to_relax(g).script()
    out = graphopt.compile(g, "llvm", output=tmp_path / "art")
    spec = json.loads((out / "manifest.json").read_text())["inputs"][0]
    assert spec["range"] == [0, 10] and spec["range_node"] == "embedding"
    m = graphopt.load(out)
    np.testing.assert_allclose(m(ids.numpy(), pick.numpy())[0], model(ids, pick).detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    bad = np.array([[1, 2, 3, 4, 5, 1 << 33]])
    with pytest.raises(InputMismatchError, match=r"holds 8589934592 at \[0, 5\].*takes 0..9"):
        m(bad, pick.numpy())
    with pytest.raises(InputMismatchError, match="holds -1"):
        m(np.array([[-1, 2, 3, 4, 5, 6]]), pick.numpy())
    raw = m._fn(tvm.runtime.tensor(bad), tvm.runtime.tensor(pick.numpy()))  # past the runtime's check
    y = (raw.numpy() if hasattr(raw, "numpy") else raw[0].numpy())
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all()  # 2**33 did not wrap to a valid int32 id
    raw = m._fn(tvm.runtime.tensor(ids.numpy()), tvm.runtime.tensor(np.array([0, 1 << 20, 1])))
    assert np.isfinite(raw.numpy() if hasattr(raw, "numpy") else raw[0].numpy()).all()  # clipped, not a crash


def test_output_overwrite_rules(tmp_path, built):
    g, _, _, out = built
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="refusing to overwrite"):
        graphopt.compile(g, "llvm", output=foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    # an earlier artifact is replaced as a whole
    again = graphopt.compile(g, "llvm", output=tmp_path / "art")
    again = graphopt.compile(g, "llvm", output=again)
    assert (again / "model.so").exists() and not list(tmp_path.glob(".art*"))


def test_a_process_without_torch_loads_and_runs_an_artifact(tmp_path, built):
    """Deploying means `import graphopt; graphopt.load(dir)` with numpy and the TVM runtime only: `import graphopt`
    had imported torch, the passes and the frontends. In a process where torch cannot be imported the artifact
    loads and gives the graph's outputs; the compiler's names still import on first use."""
    import subprocess
    import sys
    g, model, x, out = built
    np.save(tmp_path / "x.npy", x.numpy())
    script = ("import sys; sys.modules['torch'] = None; import numpy as np, graphopt; "
              "m = graphopt.load(sys.argv[1]); np.save(sys.argv[3], m(np.load(sys.argv[2]))[0]); "
              "assert sys.modules['torch'] is None; print(sorted(k for k in sys.modules if k.startswith('graphopt')))")
    res = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "graphopt.passes" not in res.stdout and "graphopt.api" not in res.stdout, res.stdout
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    res = subprocess.run([sys.executable, "-c", "import graphopt; print(graphopt.optimize.__module__, "
                          "graphopt.Graph.__name__, graphopt.Tuning.__name__, 'optimize' in dir(graphopt))"],
                         capture_output=True, text=True)
    assert res.stdout.split() == ["graphopt.api", "Graph", "Tuning", "True"], res.stdout + res.stderr


def test_an_artifact_called_from_several_threads_at_once_gives_each_its_outputs(tmp_path, built):
    """A server calls one loaded model from its request threads. Relax's VM keeps its registers in the VM object:
    four threads calling one VM segfaulted within a few calls. Each thread now runs its own VM over the one library;
    every concurrent call returns the outputs of its own input. (In a subprocess: a crash fails this test, not the
    test run.)"""
    import subprocess
    import sys
    _, _, x, out = built
    script = """
import sys, threading, numpy as np, graphopt
m = graphopt.load(sys.argv[1])
xs = [np.random.RandomState(i).randn(1, 3, 16, 16).astype(np.float32) for i in range(6)]
refs = [m(x)[0] for x in xs]
assert len({r.tobytes() for r in refs}) == 6
bad, errors = [], []
def work(k):
    try:
        for it in range(150):
            i = (k + it) % 6
            if not np.array_equal(m(xs[i])[0], refs[i]):
                bad.append(i)
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
[t.start() for t in ts]
[t.join() for t in ts]
print(len(bad), errors)
"""
    res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert res.stdout.split()[0] == "0" and res.stdout.strip().endswith("[]"), res.stdout


def test_a_process_forked_after_calls_runs_the_artifact(tmp_path, built):
    """multiprocessing's default on Linux (and gunicorn --preload) forks a process that has loaded and called the
    model: the child inherited TVM's worker pool without its workers and waited forever at its first parallel
    kernel. Children forked after calls now run it and get the parent's outputs (2 threads, so kernels fork)."""
    import os
    import subprocess
    import sys
    _, _, _, out = built
    script = """
import sys, multiprocessing as mp, numpy as np, graphopt
m = graphopt.load(sys.argv[1])
x = np.random.RandomState(0).randn(1, 3, 16, 16).astype(np.float32)
ref = m(x)[0]
def child(q):
    q.put(bool(np.array_equal(m(x)[0], ref)))
ctx = mp.get_context("fork")
q = ctx.Queue()
ps = [ctx.Process(target=child, args=(q,)) for _ in range(2)]
[p.start() for p in ps]
try:
    print([q.get(timeout=60) for _ in ps])
finally:
    [p.kill() for p in ps]
"""
    env = dict(os.environ, TVM_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 0 and res.stdout.strip() == "[True, True]", (res.stdout, res.stderr[-2000:])


def test_a_loaded_model_pickles_as_its_folder(tmp_path):
    """multiprocessing's spawn and process pools pickle what they are handed: a loaded model failed ("does not
    support SaveToBytes", after a screen of TVM warnings). It pickles as its folder and loads again there; an
    artifact compiled again in between is refused rather than silently run."""
    import pickle
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    out = graphopt.compile(graphopt.trace(model, (x,)), "llvm", output=tmp_path / "art")
    m = graphopt.load(out)
    blob = pickle.dumps(m)
    again = pickle.loads(blob)
    np.testing.assert_array_equal(again(x.numpy())[0], m(x.numpy())[0])
    torch.nn.init.zeros_(model[0].weight)
    graphopt.compile(graphopt.trace(model, (x,)), "llvm", output=tmp_path / "art")
    with pytest.raises(ArtifactError, match="changed since this model was pickled"):
        pickle.loads(blob)


def test_artifacts_are_readable_by_other_users_under_the_usual_umask(tmp_path, built):
    """Atomic writes went through mkstemp / mkdtemp, so the artifact folder was 0700 and manifest.json 0600: a
    service account could not read what a build user compiled. Files and folders now get the modes a plain write
    would (0644 / 0755 under umask 022), and a stricter umask still rules."""
    import os
    g = built[0]
    old = os.umask(0o022)
    try:
        out = graphopt.compile(g, "llvm", output=tmp_path / "art")
        assert out.stat().st_mode & 0o777 == 0o755
        for name in ("manifest.json", "model.so", "graph.ir"):
            assert (out / name).stat().st_mode & 0o044 == 0o044, (name, oct((out / name).stat().st_mode))
        os.umask(0o077)
        private = graphopt.compile(g, "llvm", output=tmp_path / "private")
        assert private.stat().st_mode & 0o777 == 0o700
        assert (private / "manifest.json").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_reloading_a_recompiled_artifact_runs_the_new_model(tmp_path):
    """Compiling into the same folder again and loading it returned the library loaded first (the dynamic loader
    keys libraries by path), so the old model ran without a word; each load now maps its own link to model.so."""
    class Scale(torch.nn.Module):
        def __init__(self, s):
            super().__init__()
            self.s = s

        def forward(self, x):
            return x * self.s
    x = torch.ones(1, 4)
    graphopt.compile(graphopt.trace(Scale(2.0), (x,)), "llvm", output=tmp_path / "art")
    first = graphopt.load(tmp_path / "art")
    graphopt.compile(graphopt.trace(Scale(3.0), (x,)), "llvm", output=tmp_path / "art")
    second = graphopt.load(tmp_path / "art")
    np.testing.assert_array_equal(first(x.numpy())[0], 2.0 * np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(second(x.numpy())[0], 3.0 * np.ones((1, 4), np.float32))


def test_load_rejects_non_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        graphopt.load(tmp_path)


def test_missing_tuning_db_is_an_error(tmp_path, built):
    g, _, _, _ = built
    with pytest.raises(TargetError, match="does not exist; create it"):
        graphopt.compile(g, "llvm", tuning=graphopt.Tuning(trials=2, db=str(tmp_path / "nope")), output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


class _ComputedWeightMLP(torch.nn.Module):
    """Two linears whose weights are computed (w * 2), so they stay Relax matmuls for MetaSchedule to tune:
    linears with constant weights run graphopt's own kernels from one row up, which MetaSchedule does not see."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(d_hidden, d_in) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(d_out, d_hidden) * 0.1)

    def forward(self, x):
        h = torch.relu(torch.nn.functional.linear(x, self.w1 * 2.0))
        return torch.nn.functional.linear(h, self.w2 * 2.0)


@pytest.mark.tuning
def test_tuning_with_database_reuse(tmp_path):
    """A handful of trials: tuned artifact is correct; a second run reuses every tuned workload."""
    torch.manual_seed(0)
    model = _ComputedWeightMLP(32, 32, 8).eval()
    x = torch.randn(4, 32)
    g = graphopt.trace(model, (x,))
    db = tmp_path / "db"
    db.mkdir()
    tuning = graphopt.Tuning(trials=4, trials_per_iter=2, db=str(db), progress=False)
    out = graphopt.compile(g, "llvm", tuning=tuning, output=tmp_path / "t1")
    np.testing.assert_allclose(graphopt.load(out)(x.numpy())[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    first = json.loads((out / "manifest.json").read_text())["tuning"]
    assert first["trials"] >= 1 and first["tasks_tuned"] >= 1
    assert (db / "database_tuning_record.json").stat().st_size > 0
    out2 = graphopt.compile(g, "llvm", tuning=tuning, output=tmp_path / "t2")
    second = json.loads((out2 / "manifest.json").read_text())["tuning"]
    assert second["tasks_reused"] >= 1 and second["trials"] <= first["trials"]


@pytest.mark.tuning
def test_tuning_time_budget_stops_early_and_keeps_results(tmp_path, monkeypatch):
    """The budget is checked after every measured batch: here the clock runs out after the first one."""
    import graphopt.targets.tvm.tuning as tuning_mod
    calls = [0]

    def clock():
        calls[0] += 1
        return 0.0 if calls[0] <= 3 else 1e9  # tune start, pre-task check, first batch: in budget; then spent
    monkeypatch.setattr(tuning_mod, "_now", clock)
    # a handler without a name on MetaSchedule's logger (the full test run once left one) must not crash tuning
    import logging
    stray = logging.NullHandler()
    logging.getLogger("tvm.s_tir.meta_schedule").addHandler(stray)
    torch.manual_seed(0)
    model = _ComputedWeightMLP(64, 64, 16).eval()
    x = torch.randn(2, 64)
    g = graphopt.trace(model, (x,))
    tuning = graphopt.Tuning(trials=64, trials_per_iter=2, minutes=1.0, plateau=0, progress=False)
    out = graphopt.compile(g, "llvm", tuning=tuning, output=tmp_path / "t")
    summary = json.loads((out / "manifest.json").read_text())["tuning"]
    assert summary["stopped"] == "time budget spent"
    assert summary["trials"] == 4  # two batches of two, then the callback stopped the search
    np.testing.assert_allclose(graphopt.load(out)(x.numpy())[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(TargetError, match="minutes must be > 0"):
        graphopt.Tuning(minutes=0).validate()


def test_a_budget_under_one_batch_still_tunes_the_heaviest_task(tmp_path):
    """--tune-trials 8 with 16 trials per batch had tuned nothing ("0 trials over 0 task(s), 68 left untuned")."""
    from types import SimpleNamespace

    from graphopt.targets.tvm.tuning import TuningSummary, _tune_by_flops
    runs = []
    used = [None]  # trials each fake task measures (None: its whole share)

    def tune_tasks(**kw):
        runs.append((kw["tasks"][0], kw["max_trials_global"], kw["num_trials_per_iter"]))
        n = kw["max_trials_global"] if used[0] is None else used[0]
        kw["measure_callbacks"][-1]._inst.apply(None, 0, [None] * n, [], [])  # (the progress callback counts them)
    fake_ms = SimpleNamespace(
        search_strategy=SimpleNamespace(EvolutionarySearch=lambda **kw: None),
        cost_model=SimpleNamespace(CostModel=SimpleNamespace(create=lambda *a, **kw: None)),
        relax_integration=SimpleNamespace(extracted_tasks_to_tune_contexts=lambda tasks, *a, **kw: (tasks, [1])),
        measure_callback=SimpleNamespace(MeasureCallback=SimpleNamespace(create=lambda kind: [])),
        tune=SimpleNamespace(tune_tasks=tune_tasks))
    tasks = [SimpleNamespace(task_name=f"t{i}", dispatched=[None], weight=1) for i in range(6)]
    summary = TuningSummary()
    _tune_by_flops(fake_ms, tasks[:3], str(tmp_path), None, graphopt.Tuning(trials=8, progress=False), summary, 0.0)
    assert runs == [(tasks[0], 8, 8)] and summary.tasks_tuned == 1 and summary.tasks_skipped == 2
    # a task that measures fewer trials than its share (a reshape: one candidate) leaves them to the next ones:
    # MobileNetV2's 64 trials had gone to four reshapes at 16 each, 4 measured, 30 tasks left untuned
    runs.clear()
    used[0] = 1
    summary = TuningSummary()
    _tune_by_flops(fake_ms, tasks, str(tmp_path), None, graphopt.Tuning(trials=32, progress=False), summary, 0.0)
    assert [r[0] for r in runs] == tasks and summary.tasks_tuned == 6 and summary.tasks_skipped == 0
    assert runs[0][1:] == (16, 16) and summary.trials == 6


def test_tasks_are_tuned_heaviest_first():
    """Trials go to the tasks with the most FLOPs x calls; the rest stay untuned when the budget is small."""
    from graphopt.targets.tvm.lower import lower_to_relax
    from graphopt.targets.tvm.tuning import fuse_for_tuning, task_cost
    from tvm.s_tir import meta_schedule as ms
    model = _ComputedWeightMLP(256, 256, 4).eval()
    g = graphopt.trace(model, (torch.randn(8, 256),))
    tgt = cpu_target()
    tasks = ms.relax_integration.extract_tasks(fuse_for_tuning(lower_to_relax(g), tgt), tgt)
    costs = {t.task_name: task_cost(t) for t in tasks}
    big = max(costs, key=costs.get)
    assert costs[big] >= 2 * 8 * 256 * 256 and "matmul" in big


class _ConvThenComputedLinear(torch.nn.Module):
    """A conv (graphopt's own kernel, scheduled already) and a linear with a computed weight (left to TVM)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 32, 3, padding=1)
        self.w = torch.nn.Parameter(torch.randn(4, 32) * 0.1)

    def forward(self, x):
        return torch.nn.functional.linear(torch.relu(self.conv(x)).mean((2, 3)), self.w * 2.0)


def test_tuning_leaves_graphopts_own_kernels_to_their_knobs(tmp_path):
    """graphopt's own kernels come scheduled: MetaSchedule's only candidate is the kernel itself, and its records
    are not applied to them. They had taken the FLOP-weighted trial budget (a --tune-minutes run on a small CNN
    spent all 2000 trials on five of them, one trial each, and tuned nothing else); they are now counted apart and
    the trials go to the tasks TVM schedules."""
    from graphopt.targets.tvm.lower import lower_to_relax
    from graphopt.targets.tvm.tuning import _is_scheduled, fuse_for_tuning
    from tvm.s_tir import meta_schedule as ms
    torch.manual_seed(0)
    model = _ConvThenComputedLinear().eval()
    x = torch.randn(1, 8, 16, 16)
    g = graphopt.trace(model, (x,))
    tgt = cpu_target()
    tasks = ms.relax_integration.extract_tasks(fuse_for_tuning(lower_to_relax(g), tgt), tgt)
    own = [t.task_name for t in tasks if _is_scheduled(t)]
    assert own and any("conv" in n for n in own), [t.task_name for t in tasks]
    assert any("matmul" in t.task_name for t in tasks if not _is_scheduled(t))
    tuning = graphopt.Tuning(trials=4, trials_per_iter=2, progress=False)
    out = graphopt.compile(g, "llvm", tuning=tuning, output=tmp_path / "t")
    summary = json.loads((out / "manifest.json").read_text())["tuning"]
    # the knob tuning may pick another kernel for the conv (Winograd, which reads the map without the pad copy: one
    # own kernel fewer), so the build's own kernels are those of the lowering with its choices
    from graphopt.targets.tvm.cpu import knobs
    chosen = {r["site"]: dict(kv.split("=") for kv in r["chosen"].split(",")) for r in summary["knobs"]["per_site"]}
    with knobs.applied(chosen):
        built = ms.relax_integration.extract_tasks(fuse_for_tuning(lower_to_relax(g), tgt), tgt)
    assert summary["tasks_own"] == sum(_is_scheduled(t) for t in built) >= 2
    assert summary["tasks"] == len(tasks) - len(own)
    tuned = [r["task"] for r in summary["per_task"]]
    assert not set(tuned) & set(own) and any("matmul" in n and r["best_us"] for n, r in
                                             zip(tuned, summary["per_task"])), summary["per_task"]
    np.testing.assert_allclose(graphopt.load(out)(x.numpy())[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_compile_names_batch_norms_it_was_not_asked_to_fold(tmp_path, caplog):
    """compile() builds what it is given; a traced MobileNetV2 with its batch norms unfolded ran 1.56x the time of
    the folded build. It says which batch norms fold-bn would fold (and only those: a batch norm after an add is
    not one), and is silent once they are folded."""
    from conftest import small_cnn
    model, x = small_cnn()
    g = graphopt.trace(model, (x,))
    with caplog.at_level("WARNING", logger="graphopt"):
        graphopt.compile(g, "llvm", output=tmp_path / "raw")
    hints = [r.getMessage() for r in caplog.records if "not folded" in r.getMessage()]
    assert len(hints) == 1 and "fold-bn" in hints[0], hints
    caplog.clear()

    class _AddBN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x + 1)

    with caplog.at_level("WARNING", logger="graphopt"):
        graphopt.compile(graphopt.optimize(g, "fold-bn"), "llvm", output=tmp_path / "folded")
        graphopt.compile(graphopt.trace(_AddBN().eval(), (x,)), "llvm", output=tmp_path / "add")
        graphopt.compile(g, "onnx", output=tmp_path / "export")  # an export keeps the graph's ops as they are
    assert not [r for r in caplog.records if "not folded" in r.getMessage()]


def test_compile_names_quantized_layers_fold_qdq_would_make_int8(tmp_path, caplog):
    """`quantize` alone leaves dequantize -> conv -> quantize, which compiles to float ops with the rounding around
    them (a quantized MobileNetV2 28x slower than with fold-qdq); compile() names those layers and points to
    fold-qdq, and is silent once they are integer ops."""
    from conftest import small_cnn
    model, x = small_cnn()
    g = graphopt.optimize(graphopt.trace(model, (x,)), "fold-bn", warn_unchanged=False)
    data = [(torch.randn_like(x),) for _ in range(4)]
    qdq = graphopt.optimize(g, "quantize", data=data)
    with caplog.at_level("WARNING", logger="graphopt"):
        graphopt.compile(qdq, "llvm", output=tmp_path / "qdq")
    hints = [r.getMessage() for r in caplog.records if "still dequantize" in r.getMessage()]
    assert len(hints) == 1 and "fold-qdq" in hints[0] and "conv" in hints[0], hints
    caplog.clear()
    with caplog.at_level("WARNING", logger="graphopt"):
        graphopt.compile(graphopt.optimize(qdq, "fold-qdq"), "llvm", output=tmp_path / "int8")
        graphopt.compile(g, "llvm", output=tmp_path / "fp32")
    assert not [r for r in caplog.records if "still dequantize" in r.getMessage()]


def test_calls_pass_inputs_without_a_copy_and_return_fresh_outputs(tmp_path):
    """A call passes a CPU input to the VM through DLPack (tvm.runtime.tensor's allocate-and-copy and .numpy() cost
    ~25 + 10 us of Python a call, more than a small model's kernels) and copies each output out: a caller's array
    is never aliased, whether the model returns a view of its input or one of its constants, and an input off a
    64-byte boundary (which TVM's kernels may assume) is copied onto one."""
    class Views(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.arange(4.0))

        def forward(self, x):
            return x.reshape(2, 4), self.c, torch.relu(x) * 2
    x = torch.randn(1, 8)
    m = graphopt.load(graphopt.compile(graphopt.trace(Views(), (x,)), "llvm", output=tmp_path / "art"))
    raw = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    for a in (raw[1:9].reshape(1, 8), x.numpy().copy(), x):  # off the boundary, numpy, torch
        arr = np.array(a, copy=True)
        assert m._tensor(arr).data_ptr() % 64 == 0
        view, const, act = m(a)
        np.testing.assert_array_equal(view, arr.reshape(2, 4))
        np.testing.assert_array_equal(const, np.arange(4.0, dtype=np.float32))
        np.testing.assert_allclose(act, np.maximum(arr, 0) * 2, rtol=1e-6)
        view[...] = 7.0
        const[...] = 7.0
        np.testing.assert_array_equal(np.asarray(a), arr)  # the input is unchanged
        assert (m(a)[1] == np.arange(4.0, dtype=np.float32)).all()  # and so is the model's constant
    frozen = x.numpy().copy()
    frozen.flags.writeable = False
    np.testing.assert_array_equal(m(frozen)[0], frozen.reshape(2, 4))
    call = m.prepared(x.numpy())
    assert call()[0].shape == (2, 4)  # the whole call, outputs included


def test_outputs_the_call_allocated_are_handed_over_without_a_copy(tmp_path):
    """An output the VM allocated for itself in this call is the caller's as it is (copying two 16 MB outputs out
    had cost 7.5 ms of a 10 ms call); an input, a constant and a second view of another output's memory are still
    copied. The build records which is which (`pipeline.fresh_outputs`): a held output keeps its values through
    later calls, and a caller writing one output changes no other."""
    class Outs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("c", torch.arange(6.0).reshape(2, 3))

        def forward(self, x):
            y = torch.softmax(x, -1)
            return y.reshape(4, 4), x * 2, self.c, y.flatten(), x, torch.tanh(x)
    x = torch.randn(2, 8)
    art = graphopt.compile(graphopt.trace(Outs(), (x,)), "llvm", output=tmp_path / "art")
    m = graphopt.load(art)
    assert m.manifest["target_info"]["fresh_outputs"] == [True, True, False, False, False, True]
    first = m(x.numpy())
    kept = [o.copy() for o in first]
    want = [o.numpy() for o in Outs()(x)]
    for got, w in zip(first, want):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    assert first[0].base is not None and first[3].base is None  # handed over / copied
    assert not np.shares_memory(first[0], first[3]) and not np.shares_memory(first[4], x.numpy())
    x2 = torch.randn(2, 8)
    second = m(x2.numpy())
    for o in first:
        o[...] = -1.0  # the caller owns every output
    third = m(x2.numpy())
    for a, b, w in zip(second, third, [o.numpy() for o in Outs()(x2)]):
        np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a, b)
    del first
    np.testing.assert_array_equal(m(x.numpy())[2], kept[2])
    manifest = json.loads((art / "manifest.json").read_text())  # an artifact built before the record:
    del manifest["target_info"]["fresh_outputs"]  # every output copied
    (art / "manifest.json").write_text(json.dumps(manifest))
    assert all(o.base is None for o in graphopt.load(art)(x.numpy()))
