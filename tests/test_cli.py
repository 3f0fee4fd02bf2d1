"""The command line as a user runs it: every subcommand, and one-line errors without tracebacks."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import cli_main, small_cnn


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "graphopt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    model, x = small_cnn()
    path = tmp_path_factory.mktemp("m") / "cnn.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], opset_version=13,
                          do_constant_folding=False, training=torch.onnx.TrainingMode.EVAL)
    return path, model, x


def cli_inproc(capsys, *args) -> subprocess.CompletedProcess:
    """The CLI run in this process, as a finished process (its exit status, stdout and stderr)."""
    rc = cli_main(*args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out, err)


def one_line_error(res, *needles):
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("graphopt: error:")]
    assert lines, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in res.stderr, res.stderr


def test_a_missing_model_file_is_named_before_torch_loads(tmp_path):
    """A mistyped model path took 3.4 s (torch's and TVM's imports) to be told it does not exist."""
    code = ("import sys; from graphopt.cli import main; rc = main(['compile', 'nope.onnx', '-o', 'a']); "
            "print(rc, 'torch' in sys.modules, 'tvm' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.stdout.split() == ["1", "False", "False"], res.stdout + res.stderr
    assert "graphopt: error: model 'nope.onnx' does not exist" in res.stderr


def test_help_explains_every_option():
    res = run_cli("compile", "--help")
    assert res.returncode == 0
    for opt in ("--pipeline", "--target", "--tune-trials", "--tune-db", "--verify-each", "--dump-dir", "--strict",
                "--print-ir-after-all", "--print-ir-after-change", "--threads", "--no-report"):
        assert opt in res.stdout


def test_passes_lists_options_from_registry():
    res = run_cli("passes")
    assert res.returncode == 0
    assert "fold-bn  [exact]" in res.stdout and "max-growth: float = 4.0" in res.stdout


def test_output_into_a_closed_pipe_stops_quietly():
    """`graphopt passes | head -2`: the reader leaves early; no BrokenPipeError traceback on the user's terminal."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "graphopt", "passes"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the child has printed anything (it is still importing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_opt_inspect_compile_run_bench(tmp_path, onnx_model, capsys):
    """compile through the real entry point (a subprocess); opt, inspect, run and bench in this process."""
    path, model, x = onnx_model
    res = cli_inproc(capsys, "opt", path, "--pipeline", "fold-bn,fold-constants,dce", "--verify-each",
                     "--print-ir-after-change", "--dump-dir", tmp_path / "dump", "--plot", tmp_path / "layers.png",
                     "-o", tmp_path / "m.gopt")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "IR after #1 fold-bn" in res.stderr
    assert (tmp_path / "dump" / "01-fold-bn.ir").exists()
    res = cli_inproc(capsys, "inspect", tmp_path / "m.gopt", "--ir", "--groups")
    assert res.returncode == 0 and "input    x: float32[1,3,16,16]" in res.stdout
    assert "channel groups:" in res.stdout and "conv1.out" in res.stdout
    assert "pipeline fold-bn,fold-constants,dce" in res.stdout
    assert "batch_norm" not in res.stdout
    res = run_cli("compile", tmp_path / "m.gopt", "--pipeline", "dce", "-o", tmp_path / "art")
    assert res.returncode == 0, res.stderr
    assert "graphopt compile report" in res.stdout and "latency" in res.stdout and "ONNX Runtime" in res.stdout
    assert (tmp_path / "art" / "report.json").exists()
    res = cli_inproc(capsys, "inspect", tmp_path / "art")  # an artifact: what it holds, readable
    assert res.returncode == 0 and "graphopt artifact" in res.stdout
    assert "input      x [1, 3, 16, 16] float32" in res.stdout
    assert "pipeline   dce" in res.stdout and "  1  dce " in res.stdout and "versions   python" in res.stdout
    assert re.search(r"artifact   [\d.]+[kM]?B in ", res.stdout) and "report     report.txt" in res.stdout
    assert "run        graphopt.load(DIR)" in res.stdout and "graphopt.targets.tvm.deploy" in res.stdout
    res = cli_inproc(capsys, "inspect", tmp_path / "art", "--json")
    assert json.loads(res.stdout)["format"] == "graphopt-artifact"
    res = cli_inproc(capsys, "inspect", tmp_path / "art", "--ir")  # the IR the artifact was built from
    assert res.returncode == 0 and (tmp_path / "art" / "graph.ir").read_text() in res.stdout
    np.save(tmp_path / "x.npy", x.numpy())
    res = cli_inproc(capsys, "run", tmp_path / "art", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert res.returncode == 0, res.stderr
    y = np.load(tmp_path / "y.npz")
    np.testing.assert_allclose(list(y.values())[0], model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
    np.savez(tmp_path / "x.npz", x=x.numpy())  # one .npz with every input under its name runs too
    res = cli_inproc(capsys, "run", tmp_path / "art", "--input", tmp_path / "x.npz", "-o", tmp_path / "y2.npz")
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(list(np.load(tmp_path / "y2.npz").values())[0], list(y.values())[0])
    one_line_error(cli_inproc(capsys, "run", tmp_path / "art"),
                   "no inputs given: the model takes x: float32[1, 3, 16, 16]", "--input x.npy")
    bad = x.numpy().copy()
    bad[0, 0, :2, :3] = np.nan  # run, and say the outputs mean nothing
    np.save(tmp_path / "nan.npy", bad)
    res = cli_inproc(capsys, "run", tmp_path / "art", "--input", tmp_path / "nan.npy")
    assert res.returncode == 0 and "input 'x' holds 6 NaN / infinite value(s) of 768" in res.stderr, res.stderr
    np.savez(tmp_path / "other.npz", image=x.numpy())
    one_line_error(cli_inproc(capsys, "run", tmp_path / "art", "--input", tmp_path / "other.npz"),
                   "other.npz' holds image; an .npz input holds every model input under its name (x)")
    res = cli_inproc(capsys, "bench", tmp_path / "art", "--model", path, "--runs", "3", "--json", tmp_path / "b.json")
    assert res.returncode == 0, res.stderr
    assert "ONNX Runtime" in res.stdout
    assert json.loads((tmp_path / "b.json").read_text())["ratio_vs_ort"] > 0


@pytest.mark.parametrize("target,runner", [("onnx", "model.onnx on ONNX Runtime"), ("pt2", "model.pt2 on PyTorch")])
def test_export_targets_are_measured_run_and_benched_as_their_users_run_them(tmp_path, onnx_model, capsys, target,
                                                                            runner):
    """An int8 ONNX / .pt2 export gets the compile report (fidelity and latency of the exported file, run by ONNX
    Runtime / PyTorch), and `run` and `bench` take its folder (they failed: 'artifact has no model.so'). `run` gives
    what ORT / torch give on the exported file itself."""
    import onnxruntime as ort
    path, model, x = onnx_model
    out = tmp_path / "exp"
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(0).standard_normal((8, 3, 16, 16), np.float32))
    res = cli_inproc(capsys, "compile", path, "--target", target, "--pipeline", "fold-bn,quantize,fold-qdq",
                     "--inputs", tmp_path / "calib.npz", "-o", out)
    assert res.returncode == 0, res.stderr
    lat = next(ln for ln in res.stdout.splitlines() if ln.startswith("  latency"))
    assert f"{runner} " in lat and "ONNX Runtime on the input model" in lat and "the export is" in lat, lat
    assert "tuning" not in res.stdout and "widths     " in res.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["fidelity"]["cosine"] > 0.99 and report["latency"]["graphopt_ms"] > 0
    np.save(tmp_path / "x.npy", x.numpy())
    res = cli_inproc(capsys, "run", out, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npz")
    assert res.returncode == 0, res.stderr
    y = list(np.load(tmp_path / "y.npz").values())[0]
    if target == "onnx":
        direct = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            None, {"x": x.numpy()})[0]
    else:
        direct = torch.export.load(str(out / "model.pt2")).module()(x)[0].detach().numpy()
    np.testing.assert_array_equal(y, direct)
    ref = model(x).detach().numpy()
    assert np.abs(y - ref).max() < 0.1 * np.abs(ref).max()  # int8: within a tenth of the output's range
    res = cli_inproc(capsys, "bench", out, "--model", path, "--runs", "3")
    assert res.returncode == 0, res.stderr
    label = {"onnx": "export (ORT)", "pt2": "export (torch)"}[target]
    assert re.search(rf"^{re.escape(label)} +[\d.]+ +1\.00$", res.stdout, re.M), res.stdout
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    one_line_error(cli_inproc(capsys, "run", out, "--input", tmp_path / "bad.npy"),
                   "input 'x' has shape [1, 3, 8, 8], expected [1, 3, 16, 16]")
    victim = out / f"model.{target}"
    victim.write_bytes(victim.read_bytes()[:300])
    one_line_error(cli_inproc(capsys, "run", out, "--input", tmp_path / "x.npy"), str(victim))


def test_a_bad_bench_pause_is_refused_before_the_build(tmp_path, onnx_model, capsys, monkeypatch):
    """GRAPHOPT_BENCH_PAUSE that is no number >= 0: compile and bench stop at once with a one-line error naming the
    variable (it was read at the latency line, after the whole build), and nothing is written; --no-report does not
    read it."""
    path, _, _ = onnx_model
    monkeypatch.setenv("GRAPHOPT_BENCH_PAUSE", "soon")
    one_line_error(cli_inproc(capsys, "compile", path, "-o", tmp_path / "a"), "GRAPHOPT_BENCH_PAUSE='soon'",
                   "number >= 0")
    assert not (tmp_path / "a").exists()
    one_line_error(cli_inproc(capsys, "bench", tmp_path / "a", "--model", path), "GRAPHOPT_BENCH_PAUSE='soon'")
    res = cli_inproc(capsys, "compile", path, "--no-report", "-o", tmp_path / "b")
    assert res.returncode == 0, res.stderr


def test_bad_inputs_are_one_line_errors(tmp_path, onnx_model, capsys):
    """Each bad input is one `graphopt: error:` line naming what to fix, exit status 1. The first case runs the real
    entry point in a subprocess; the rest run the CLI in this process (a subprocess each cost ~6 s of imports)."""
    path, _, _ = onnx_model
    (tmp_path / "bad.onnx").write_bytes(path.read_bytes()[:200])
    one_line_error(run_cli("inspect", tmp_path / "bad.onnx"), "bad.onnx", "corrupt or truncated")

    cli = lambda *args: cli_inproc(capsys, *args)  # noqa: E731
    torch.save({"w": torch.ones(1)}, tmp_path / "w.pth")
    one_line_error(cli("inspect", tmp_path / "w.pth"), "never unpickles")
    # a TorchScript archive holds a graph: the error says how it becomes one graphopt reads (jit.load is not run)
    torch.jit.save(torch.jit.trace(torch.nn.Linear(3, 2).eval(), torch.randn(1, 3)), tmp_path / "ts.pt")
    one_line_error(cli("inspect", tmp_path / "ts.pt"), "TorchScript archive", "torch.onnx.export(torch.jit.load(",
                   "dynamo=False")
    one_line_error(cli("opt", path, "--pipeline", "fold-bn{", "-o", tmp_path / "o.gopt"), "column 9")
    one_line_error(cli("opt", path, "--pipeline", "fold-bnn", "-o", tmp_path / "o.gopt"), "unknown pass 'fold-bnn'")
    one_line_error(cli("opt", path, "--pipeline", "fold-constants{speed=3}", "-o", tmp_path / "o.gopt"),
                   "has no option 'speed'")
    assert not (tmp_path / "o.gopt").exists()
    one_line_error(cli("compile", path, "--tune-trials", "2", "--tune-db", tmp_path / "nodb", "-o", tmp_path / "a"),
                   "does not exist")
    one_line_error(cli("compile", path, "--tune-trials", "0", "-o", tmp_path / "a"), "trials must be >= 1")
    one_line_error(cli("opt", path, "--pipeline", "fold-bn", "-o", tmp_path / "m.txt"), "must end in .gopt, .onnx or .pt2")
    # wrong input shape to a compiled artifact
    assert cli("compile", path, "--no-report", "-o", tmp_path / "art").returncode == 0
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    one_line_error(cli("run", tmp_path / "art", "--input", tmp_path / "small.npy"), "input 'x' has shape")
    np.save(tmp_path / "two.npy", np.zeros((2, 3, 16, 16), np.float32))  # (only the batch differs: how to get one)
    one_line_error(cli("run", tmp_path / "art", "--input", tmp_path / "two.npy"), "built for batch 1",
                   "--input-shape x=2x3x16x16")
    # a damaged artifact: model.so cut short (the loader's mapping of it killed the process with SIGBUS), or changed
    lib = tmp_path / "art" / "model.so"
    whole = lib.read_bytes()
    lib.write_bytes(whole[:1000])
    one_line_error(cli("run", tmp_path / "art", "--input", tmp_path / "small.npy"), "model.so' is damaged: it has 1000 bytes")
    lib.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))
    one_line_error(cli("run", tmp_path / "art", "--input", tmp_path / "small.npy"), "model.so' is damaged: it is not the file")


def test_default_pipeline_passes_with_nothing_to_do_are_not_warnings(tmp_path, onnx_model, capsys):
    """The default pipeline's passes that find nothing (no pad to fold here) are listed in the pass table, not
    warned about; a pass the user named that changes nothing is still a warning."""
    path, _, _ = onnx_model
    res = cli_inproc(capsys, "opt", path, "-o", tmp_path / "d.gopt")
    assert res.returncode == 0, res.stderr
    assert "changed nothing" not in res.stderr and "WARNING" not in res.stderr
    assert "fold-pad" in res.stdout and "no pad" in res.stdout  # the pass table says why
    res = cli_inproc(capsys, "opt", path, "--pipeline", "fold-pad", "-o", tmp_path / "e.gopt")
    assert res.returncode == 0 and "WARNING: pass 'fold-pad' changed nothing: no pad" in res.stderr, res.stderr


def test_default_pipeline_of_a_quantized_model_folds_its_qdq_first(tmp_path, onnx_model, capsys):
    """An ONNX Runtime QDQ file (quantize_static) compiled with the default pipeline keeps its int8 weights and runs
    its convs as int8 kernels: the default is then fold-qdq before fold-constants (with the float default,
    fold-constants made its weights float, 4x the bytes, and the convs ran in float: DeepLab's ASPP at 1.65x ORT's
    time on the same file, 0.78x now). A float model keeps the float default."""
    from graphopt.bench import ort_quantize_static
    from graphopt.cli import DEFAULT_PIPELINE, DEFAULT_QDQ_PIPELINE
    path, _, x = onnx_model
    q8 = ort_quantize_static(path, tmp_path / "cnn_int8.onnx", [{"x": torch.randn(*x.shape).numpy()} for _ in range(4)])
    res = cli_inproc(capsys, "compile", q8, "-o", tmp_path / "q", "--no-report")
    assert res.returncode == 0, res.stderr
    assert f"pipeline   {DEFAULT_QDQ_PIPELINE}" in res.stdout and "WARNING" not in res.stderr, res.stdout
    assert re.search(r"fold-qdq +yes", res.stdout), res.stdout
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert any(p["name"] == "fold-qdq" and p["changed"] for p in manifest["passes"]), manifest["passes"]
    res = cli_inproc(capsys, "compile", path, "-o", tmp_path / "f", "--no-report")
    assert res.returncode == 0 and f"pipeline   {DEFAULT_PIPELINE}" in res.stdout, res.stdout
    # a pipeline the user names runs as named, even the float default's text; opt's pass table lists every pass
    res = cli_inproc(capsys, "compile", q8, "-o", tmp_path / "named", "--no-report", "--pipeline", DEFAULT_PIPELINE)
    assert res.returncode == 0 and f"pipeline   {DEFAULT_PIPELINE}" in res.stdout, res.stdout
    res = cli_inproc(capsys, "opt", q8, "-o", tmp_path / "q.gopt")
    assert res.returncode == 0 and all(p in res.stdout for p in DEFAULT_QDQ_PIPELINE.split(",")), res.stdout


def test_opt_to_onnx_quantizes_for_onnxruntime_kernels(tmp_path, onnx_model, capsys):
    """opt -o *.onnx (or --target onnx) asks ONNX Runtime's kernels, not this CPU's: int8s takes the one-row
    classifier too (ORT's u8 x s8 GEMM pairs its weights; graphopt's own kernel streams them, so llvm keeps it
    int8), and the file holds the same weights as the graph optimized for target onnx."""
    import onnx
    from onnx import numpy_helper

    from graphopt.api import load_model
    path, _, _ = onnx_model
    pipe = "fold-bn,quantize{weights=int8s activations=none}"
    widths = {}
    for target in ("onnx", "llvm"):
        res = cli_inproc(capsys, "opt", path, "--pipeline", pipe, "--target", target, "-o", tmp_path / f"{target}.gopt")
        assert res.returncode == 0, res.stderr
        g = load_model(str(tmp_path / f"{target}.gopt"))
        widths[target] = g.meta["weight_bits"]
        fc = next(n.args[1].args[0].target for n in g.nodes("call_function", torch.ops.aten.linear.default))
        if target == "onnx":
            want = g.get_param(fc).numpy()
    assert widths["onnx"]["linear"] == "int8s" and widths["llvm"]["linear"] == "int8"
    res = cli_inproc(capsys, "opt", path, "--pipeline", pipe, "-o", tmp_path / "m.onnx")
    assert res.returncode == 0, res.stderr
    stored = [numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer]
    assert any(a.shape in (want.shape, want.T.shape) and (np.array_equal(a, want) or np.array_equal(a, want.T))
               for a in stored if a.dtype == np.int8)


def test_an_output_that_would_replace_the_input_or_its_weights_is_refused(tmp_path, onnx_model, capsys):
    """compile replaces its output folder: an artifact's own model.onnx compiled into that folder had been replaced
    (and the report timed the new file as "the input model"). And opt -o FILE.onnx may write FILE.onnx.data (past
    2 GB): never the input's own weights file."""
    import onnx
    path, _, _ = onnx_model
    art = tmp_path / "art"
    assert cli_inproc(capsys, "compile", path, "--target", "onnx", "--no-report", "-o", art).returncode == 0
    before = (art / "model.onnx").read_bytes()
    one_line_error(cli_inproc(capsys, "compile", art / "model.onnx", "--target", "onnx", "--no-report", "-o", art),
                   "lies inside the output folder")
    assert (art / "model.onnx").read_bytes() == before
    onnx.save_model(onnx.load(str(path)), str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="g.onnx.data", size_threshold=0)
    weights = (tmp_path / "g.onnx.data").read_bytes()
    one_line_error(cli_inproc(capsys, "opt", tmp_path / "ext.onnx", "--pipeline", "fold-bn", "-o",
                              tmp_path / "g.onnx"), "holds the input model's weights")
    assert (tmp_path / "g.onnx.data").read_bytes() == weights and not (tmp_path / "g.onnx").exists()
    assert cli_inproc(capsys, "opt", tmp_path / "ext.onnx", "--pipeline", "fold-bn", "-o",
                      tmp_path / "h.onnx").returncode == 0


def test_opt_never_overwrites_input_on_failure(tmp_path, onnx_model, capsys):
    path, _, _ = onnx_model
    original = path.read_bytes()
    one_line_error(cli_inproc(capsys, "opt", path, "--pipeline", "fold-bn", "-o", path), "is the input model")
    assert path.read_bytes() == original
    out = tmp_path / "o.gopt"
    out.write_bytes(b"old")
    # a pass that crashes or is refused leaves an existing output untouched
    one_line_error(cli_inproc(capsys, "opt", path, "--pipeline", "fold-bn,fold-bn", "--strict", "-o", out),
                   "changed nothing")
    assert out.read_bytes() == b"old"


def test_measuring_passes_ask_the_target_the_run_is_for(tmp_path, capsys, monkeypatch):
    """opt/compile hand their target to the pipeline: `--target cuda-sparse` lets select-sparse-layout weigh sp24 on
    the GPU's cost (the table here, marked estimated; it used to be asked of this CPU and refused), and `--cpu`
    makes quantize{weights=auto} follow that CPU's int8 product (vpdpbusd on VNNI CPUs, vpmaddubsw on AVX2),
    whatever this machine has. Timing kernels for a CPU this machine cannot run is a one-line error."""
    import graphopt
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    graphopt.trace(model, (torch.randn(16, 64),)).save(tmp_path / "m.gopt")
    res = cli_inproc(capsys, "opt", tmp_path / "m.gopt", "--target", "cuda-sparse", "--pipeline",
                     "sparsify-nm{n=2 m=4},select-sparse-layout{candidates=dense,sp24}", "-o", tmp_path / "s.gopt")
    assert res.returncode == 0, res.stderr
    recs = graphopt.Graph.load(tmp_path / "s.gopt").meta["sparse_layout"]
    assert len(recs) == 2 and all(r["timing_source"].startswith("estimated") for r in recs.values()), recs
    for cpu, width in (("sapphirerapids", "int8"), ("znver3", "int8s")):
        res = cli_inproc(capsys, "opt", tmp_path / "m.gopt", "--cpu", cpu, "--pipeline",
                         "quantize{weights=auto activations=none}", "-o", tmp_path / f"{cpu}.gopt")
        assert res.returncode == 0, res.stderr
        stats = graphopt.Graph.load(tmp_path / f"{cpu}.gopt").meta["history"][-1]["stats"]
        assert stats["weights_auto"].startswith(width + ":"), (cpu, stats)
    from graphopt.targets.tvm import host
    monkeypatch.setattr(host, "host_isa", lambda: {"sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"})
    one_line_error(cli_inproc(capsys, "opt", tmp_path / "m.gopt", "--cpu", "sapphirerapids", "--pipeline",
                              "sparsify{sparsity=0.9},select-sparse-layout", "-o", tmp_path / "x.gopt"),
                   "sapphirerapids", "lacks avx512f", "leave out --cpu")
    one_line_error(cli_inproc(capsys, "opt", tmp_path / "m.gopt", "--target", "cuda", "--cpu", "znver3",
                              "--pipeline", "dce", "-o", tmp_path / "x.gopt"), "--cpu applies to --target llvm")
    one_line_error(cli_inproc(capsys, "compile", tmp_path / "m.gopt", "--cuda-graph", "-o", tmp_path / "x"),
                   "--cuda-graph applies to --target cuda")
    assert not (tmp_path / "x.gopt").exists() and not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="the cuda targets cross-compile with nvcc")
def test_compile_for_cuda_sparse_prints_the_gpu_report(tmp_path, onnx_model, capsys):
    path, _, _ = onnx_model
    res = run_cli("compile", path, "--target", "cuda-sparse", "--cuda-arch", "sm_90", "--pipeline",
                  "fold-bn,sparsify-nm{n=2 m=4}", "--sparse-min-speedup", "1.0", "-o", tmp_path / "g")
    assert res.returncode == 0, res.stderr
    assert "cuda-sparse for sm_90" in res.stdout and "on sparse tensor cores (mma.sp)" in res.stdout
    assert "not 2:4" not in res.stdout  # sparsify-nm made every linear 2:4; the 8x10 head misfits the tile instead
    assert "rows % 16" in res.stdout
    one_line_error(cli_inproc(capsys, "compile", path, "--target", "cuda", "--cuda-arch", "sm_75", "-o",
                              tmp_path / "h"), "unknown CUDA architecture sm_75")


def test_compile_report_names_the_int8_product_only_for_int8_graphs(tmp_path):
    """The report's target line says which int8 instruction the build uses (vpdpbusd with VNNI), and says nothing
    about it for a float graph, where it would only confuse; a quantized graph's layers are counted per weight
    width; after select-sparse-layout a line counts the layers per chosen layout."""
    import graphopt
    from graphopt.report import compile_report
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    g = graphopt.trace(model, (torch.randn(8, 16),))
    q = graphopt.optimize(g, "quantize,fold-qdq", data=[(torch.randn(8, 16),) for _ in range(2)],
                          cpu="sapphirerapids")
    (tmp_path / "model.so").write_bytes(b"x")
    manifest = {"target_info": {"kind": "llvm", "mcpu": "sapphirerapids", "num_cores": 2, "int8_dot": "vnni"}}
    assert "int8 products on vpdpbusd (VNNI)" in compile_report(g, q, tmp_path, manifest, None, None)
    assert "int8 products" not in compile_report(g, g, tmp_path, manifest, None, None)
    assert "bit vectors" not in compile_report(g, g, tmp_path, manifest, None, None)
    manifest["target_info"]["vector_bits"] = 512  # the kernels' shape: 512 on full-width AVX-512 cores
    assert "kernels shaped for 512-bit vectors" in compile_report(g, g, tmp_path, manifest, None, None)
    assert "sparse " not in compile_report(g, q, tmp_path, manifest, None, None)
    assert "widths     2 layer(s) int8;" in compile_report(g, q, tmp_path, manifest, None, None)
    assert "widths" not in compile_report(g, g, tmp_path, manifest, None, None)
    manifest["sparse_layout"] = {"w1": {"choice": "csr", "best_speedup": 3.1, "timing_source": "measured"},
                                 "w2": {"choice": "dense", "best_speedup": 1.02, "timing_source": "measured"},
                                 "w3": {"choice": "csr", "best_speedup": 2.5, "timing_source": "measured"}}
    assert "sparse     3 layer(s) measured: 2 csr, 1 dense (best 3.10x dense)" in compile_report(
        g, q, tmp_path, manifest, None, None)
    manifest["sparse_layout"]["w4"] = {"choice": "dense", "reason": "no sparse kernel for aten.conv1d.default"}
    assert ("sparse     3 layer(s) measured: 2 csr, 1 dense (best 3.10x dense); 1 masked layer(s) left dense "
            "unmeasured, reasons in manifest.json") in compile_report(g, q, tmp_path, manifest, None, None)


def test_compile_without_measuring_still_reports_the_passes(tmp_path, onnx_model, capsys):
    """`compile --no-report --verify-each` printed only "wrote DIR": the pass table with --verify-each's findings,
    sizes and the build are no measurement and are printed (and saved) all the same."""
    path, _, _ = onnx_model
    res = cli_inproc(capsys, "compile", path, "--no-report", "--verify-each", "--pipeline",
                     "fold-bn,sparsify{sparsity=0.5}", "-o", tmp_path / "art")
    assert res.returncode == 0, res.stderr
    assert "graphopt compile report" in res.stdout and "measured   no (--no-report)" in res.stdout, res.stdout
    row = next(ln for ln in res.stdout.splitlines() if "sparsify{sparsity=0.5}" in ln and "yes" in ln)
    assert "verify: SQNR" in row and "vs input" in row, row
    assert "latency" not in res.stdout and "fidelity" not in res.stdout
    assert (tmp_path / "art" / "report.txt").read_text() == res.stdout
    # built for a CPU this one is not: the same report, and why nothing was measured
    res = cli_inproc(capsys, "compile", path, "--cpu", "sapphirerapids", "-o", tmp_path / "spr")
    assert res.returncode == 0, res.stderr
    from graphopt.runtime import missing_isa
    missing = missing_isa(json.loads((tmp_path / "spr" / "manifest.json").read_text()))
    assert "graphopt compile report" in res.stdout
    if missing:  # (a host with every extension sapphirerapids code uses measures it)
        assert "latency" not in res.stdout, res.stdout
        assert f"measured   no: built for --cpu sapphirerapids, and this CPU lacks {missing[0]}" in res.stdout


def test_inspect_summarizes_export_and_gpu_artifacts(tmp_path, onnx_model, capsys):
    """`inspect DIR` on an ONNX export names the exported file and no CPU tuning; on a CUDA artifact (its manifest
    as a cuda-sparse build writes it) the architectures and each 2:4 layer's decision; a folder without a manifest
    is a one-line error."""
    path, _, _ = onnx_model
    res = cli_inproc(capsys, "compile", path, "--target", "onnx", "--no-report", "-o", tmp_path / "exp")
    assert res.returncode == 0, res.stderr
    res = cli_inproc(capsys, "inspect", tmp_path / "exp")
    assert "target     onnx export (model.onnx; runs on ONNX Runtime)" in res.stdout and "tuning" not in res.stdout
    m = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    m["target_info"] = {"kind": "cuda-sparse", "device": "cuda", "archs": ["sm_80", "sm_90"], "precision": "fp16",
                        "kernels": [{"source_bytes": 2000, "fatbin_bytes": 1000}],
                        "sparse_kernels": {"fc_weight": {"shape": [1, 64, 32], "choice": "sp24",
                                                         "decision": "sp24 (measured 1.40x)"}}}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "manifest.json").write_text(json.dumps(m))
    res = cli_inproc(capsys, "inspect", tmp_path / "gpu")
    assert "target     cuda-sparse for sm_80, sm_90" in res.stdout and "1 of 1 layer(s) on sparse" in res.stdout
    assert "fc_weight" in res.stdout and "graphopt compile report" not in res.stdout
    assert "no timing here" not in res.stdout and "manifest   manifest.json" in res.stdout
    (tmp_path / "empty").mkdir()
    one_line_error(cli_inproc(capsys, "inspect", tmp_path / "empty"), "empty", "not a graphopt artifact")
    one_line_error(cli_inproc(capsys, "inspect", tmp_path / "exp", "--ir"), "holds no graph.ir")
    one_line_error(cli_inproc(capsys, "inspect", tmp_path / "exp", "--groups"), "--groups reads a model")
    one_line_error(cli_inproc(capsys, "inspect", path, "--json"), "--json prints an artifact folder's manifest")


def test_pass_table_notes_leave_out_zero_counts():
    """A pass's note lists its nonzero counts and true flags: quantize's had read 'matmuls_as_linears=0,
    half_model_computed_in_float32=False, weight_bits_kept=0, ...' around the two counts that said anything."""
    from graphopt.report import pass_table
    row = {"index": 1, "pipeline": "quantize", "changed": True, "seconds": 0.5, "reason": "",
           "before": {"params": 10, "macs": 5}, "after": {"params": 10, "macs": 5},
           "stats": {"weights_quantized": 3, "matmuls_quantized": 0, "half": False, "shift": 0.0, "exact": True,
                     "sqnr": 21.5, "skipped": {"a": "b"}}}
    line = pass_table([row]).splitlines()[1]
    assert line.endswith("weights_quantized=3, exact=True, sqnr=21.5"), line
    assert pass_table([{**row, "reason": "no pad", "changed": False}]).splitlines()[1].endswith("no pad")
    # floats to 4 digits; a pass's options shown whole up to 40 columns (22 had cut "prune-channels{ratio=0")
    trained = {**row, "pipeline": "prune-channels{ratio=0.3}", "stats": {"loss_first": 5.222804069519043}}
    lines = pass_table([row, trained]).splitlines()
    assert " prune-channels{ratio=0.3} yes " in lines[2] and lines[2].endswith("loss_first=5.223"), lines
    assert lines[0].index("changed") == lines[1].index("yes") == lines[2].index("yes"), lines
    long = {**row, "pipeline": "select-sparse-layout{candidates=dense,csr,bsr4x4 min-speedup=1.5}"}
    assert " select-sparse-layout{candidates=dense... yes " in pass_table([long]).splitlines()[1]



def test_verify_each_notes_say_which_pass_lost_the_accuracy():
    """The pass table's verify note had been the step's max error alone (13 after prune-channels, 0.057 after
    quantize: no scale, no total). Exact passes keep their max error; the others give SQNR (and a classifier's
    top-1 agreement) against the graph before them and against the pipeline's input."""
    from graphopt.report import pass_table
    base = {"changed": True, "seconds": 0.1, "reason": "", "stats": {}, "before": {"params": 1, "macs": 1},
            "after": {"params": 1, "macs": 1}}
    rows = [{**base, "index": 1, "pipeline": "fold-bn", "verify": {
                "contract": "exact", "step": {"max_abs_err": 2.1e-5, "sqnr_db": 101.0},
                "vs_reference": {"max_abs_err": 2.1e-5, "sqnr_db": 101.0}}},
            {**base, "index": 2, "pipeline": "prune-channels{ratio=0.3}", "verify": {
                "contract": "training", "step": {"max_abs_err": 13.0, "sqnr_db": 0.43},
                "vs_reference": {"max_abs_err": 13.0, "sqnr_db": 0.42}}},
            {**base, "index": 3, "pipeline": "quantize", "verify": {
                "contract": "bounded", "step": {"max_abs_err": 0.057, "sqnr_db": 24.04, "top1": 0.85},
                "vs_reference": {"max_abs_err": 13.1, "sqnr_db": 0.4, "top1": 0.05}}},
            {**base, "index": 4, "pipeline": "fold-qdq", "verify": {
                "contract": "bounded", "step": {"max_abs_err": 0.0, "sqnr_db": None},
                "vs_reference": {"max_abs_err": float("inf"), "sqnr_db": None}}}]
    lines = pass_table(rows).splitlines()[1:]
    assert lines[0].endswith("verify: max|err| 2.1e-05"), lines[0]
    assert lines[1].endswith("verify: SQNR 0.4 dB (vs input 0.4 dB)"), lines[1]
    assert lines[2].endswith("verify: SQNR 24.0 dB, argmax 85% (vs input 0.4 dB, argmax 5%)"), lines[2]
    assert lines[3].endswith("verify: SQNR exact (vs input -inf dB)"), lines[3]

def test_a_graph_saved_from_a_zoo_model_calibrates_on_its_shipped_data(tmp_path, capsys):
    """`graphopt opt zoo:mobilenet_v2 ... -o m.gopt` then `graphopt compile m.gopt --pipeline quantize,...` failed
    for want of calibration data the zoo model itself gets by default: a saved graph whose recorded source is a
    shipped model, with input shapes that model takes, calibrates on the shipped photos too (at its shapes); other
    inputs do not."""
    import graphopt
    from graphopt.cli import _data, _zoo_name
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    g = graphopt.trace(net, (torch.randn(1, 3, 224, 224),))
    g.meta["source"] = "zoo:mobilenet_v2"
    g.save(tmp_path / "m.gopt")
    res = cli_inproc(capsys, "opt", tmp_path / "m.gopt", "--pipeline", "quantize", "-o", tmp_path / "q.gopt")
    assert res.returncode == 0, res.stderr
    assert "activations_quantized=" in res.stdout
    assert _zoo_name(str(tmp_path / "m.gopt"), g) == "mobilenet_v2" and _zoo_name("zoo:minilm", g) == "minilm"
    batches = _data(type("A", (), {"inputs": None, "model": str(tmp_path / "m.gopt")})(), g)
    assert len(batches) == 20 and tuple(batches[0][0].shape) == (1, 3, 224, 224)
    small = graphopt.trace(net, (torch.randn(2, 3, 64, 64),))  # another shape the shipped model takes: data follows
    small.meta["source"] = "zoo:mobilenet_v2"
    assert _zoo_name("m.gopt", small) == "mobilenet_v2"
    batches = _data(type("A", (), {"inputs": None, "model": "m.gopt"})(), small)
    assert len(batches) == 10 and tuple(batches[0][0].shape) == (2, 3, 64, 64)
    gray = graphopt.trace(torch.nn.Conv2d(1, 4, 3), (torch.randn(1, 1, 64, 64),))
    gray.meta["source"] = "zoo:mobilenet_v2"
    assert _zoo_name("m.gopt", gray) is None  # one channel: the photos cannot fit
    for source in ("zoo:nonexistent", "m.onnx"):  # unknown names, files
        small.meta["source"] = source
        assert _zoo_name("m.gopt", small) is None, source


def test_training_passes_take_labels_from_the_inputs_npz(tmp_path, onnx_model, capsys):
    """Class ids under 'labels' in --inputs reach the training passes (kd=false trains on them alone; it had no
    way to get labels from the command line), split as the inputs are, and give compile's report and --verify-each
    accuracies; bad labels and stray keys are one-line errors naming what to fix (a stray key had been dropped
    without a word)."""
    path, model, x = onnx_model
    rng = np.random.default_rng(0)
    images = 5 * rng.standard_normal((6,) + tuple(x.shape[1:])).astype(np.float32)  # (5x: away from the biases)
    classes = int(model(x).shape[1])
    cli = lambda *args: cli_inproc(capsys, *args)  # noqa: E731
    pipeline = "sparsify{sparsity=0.5},recover{epochs=1 kd=false}"
    np.savez(tmp_path / "unlabeled.npz", x=images)
    one_line_error(cli("opt", path, "--pipeline", pipeline, "--inputs", tmp_path / "unlabeled.npz",
                       "-o", tmp_path / "o.gopt"), "needs labels", "'labels' in the --inputs")
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(1).numpy()
    truth = np.where(np.arange(6) < 4, predicted, (predicted + 1) % classes)  # (the model right on 4 of 6)
    np.savez(tmp_path / "labeled.npz", x=images, labels=truth)
    res = cli("opt", path, "--pipeline", pipeline, "--inputs", tmp_path / "labeled.npz", "-o", tmp_path / "o.gopt")
    assert res.returncode == 0, res.stderr
    assert "recover" in res.stdout and (tmp_path / "o.gopt").exists()
    # compile's report: accuracy against the labels, of the input model and the artifact
    want = 4 / 6
    res = cli("compile", path, "--target", "onnx", "--pipeline", "sparsify{sparsity=0.95}", "--inputs",
              tmp_path / "labeled.npz", "-o", tmp_path / "art")
    assert res.returncode == 0, res.stderr
    line = re.search(r"^  accuracy   ([\d.]+)% on 6 labeled samples from --inputs \(the input model: ([\d.]+)%\)$",
                     res.stdout, re.M)
    assert line and float(line.group(2)) == pytest.approx(want * 100, abs=0.05), res.stdout
    import graphopt
    art = graphopt.load(tmp_path / "art")
    got = np.mean([art(images[i:i + 1])[0].argmax(1)[0] == truth[i] for i in range(6)])
    assert got != want  # (95% of the weights gone changed the predictions: the two numbers are told apart)
    assert float(line.group(1)) == pytest.approx(got * 100, abs=0.05)
    # run: the same .npz, labels and all, for an artifact of its batch: the accuracy beside the outputs
    np.savez(tmp_path / "one.npz", x=images[:1], labels=truth[:1])
    res = cli("run", tmp_path / "art", "--input", tmp_path / "one.npz")
    assert res.returncode == 0, res.stderr
    hit = art(images[:1])[0].argmax(1)[0] == truth[0]
    assert f"accuracy {100.0 * hit:.1f}% on 1 labeled sample(s)" in res.stdout, res.stdout
    # --verify-each: each pass's accuracy beside the input's (which pass lost it)
    res = cli("opt", path, "--pipeline", "sparsify{sparsity=0.95}", "--verify-each", "--inputs",
              tmp_path / "labeled.npz", "-o", tmp_path / "v.gopt")
    assert res.returncode == 0, res.stderr
    assert f"accuracy {got * 100:.1f}% (input {want * 100:.1f}%)" in res.stdout, res.stdout
    for name, arrays, needle in [
            ("range", dict(x=images, labels=np.full(6, classes)), f"has {classes} classes"),
            ("count", dict(x=images, labels=np.zeros(5, np.int64)), "one label per sample, 6"),
            ("float", dict(x=images, labels=np.zeros(6, np.float32)), "integer class ids"),
            ("stray", dict(x=images, lables=np.zeros(6, np.int64)), "'lables' name no graph input")]:
        np.savez(tmp_path / f"{name}.npz", **arrays)
        one_line_error(cli("opt", path, "--pipeline", pipeline, "--inputs", tmp_path / f"{name}.npz",
                           "-o", tmp_path / f"{name}.gopt"), needle)
        assert not (tmp_path / f"{name}.gopt").exists()


@pytest.mark.parametrize("args", [("compile", "zoo:mobilenet_v2", "-o", "never", "--threads", "0"),
                                  ("bench", "never", "--threads", "-1"), ("bench", "never", "--runs", "zero")])
def test_thread_and_run_counts_must_be_positive(args, capsys, tmp_path, monkeypatch):
    """--threads and --runs below 1 (or not numbers) are refused by the option parser, naming the option, before
    anything runs or is written (torch had raised a traceback at --threads -1)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli_main(*args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {args[-2]}: '{args[-1]}' is not a positive integer" in err and "Traceback" not in err
    assert not (tmp_path / "never").exists()
