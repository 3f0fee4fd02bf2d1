"""Running a CPU artifact from C++ with the TVM runtime alone (targets/tvm/deploy/run_artifact.cc): built with the
command `python -m graphopt.targets.tvm.deploy` prints, it gives graphopt.load's outputs bit for bit."""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt.targets.tvm.deploy import cxx_command

pytestmark = pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="no C++ compiler")


class TwoHeads(nn.Module):
    """Token ids (int64) and a float input in, two outputs of different dtypes and ranks out."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, ids, scale):
        h = self.emb(ids) * scale
        return self.fc(h).mean(1), h.argmax(-1)


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    exe = tmp_path_factory.mktemp("cxx") / "run_artifact"
    res = subprocess.run(cxx_command(exe), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return exe


def test_the_printed_command_builds_the_runner():
    res = subprocess.run([sys.executable, "-m", "graphopt.targets.tvm.deploy"], capture_output=True, text=True)
    assert res.returncode == 0 and "run_artifact.cc" in res.stdout and "-ltvm_runtime" in res.stdout, res.stderr


def test_cpp_runner_matches_python_on_a_cnn(tmp_path, runner):
    from conftest import small_cnn
    model, x = small_cnn()
    out = graphopt.compile(graphopt.optimize(graphopt.trace(model, (x,)), "fold-bn,dce"), "llvm",
                           output=tmp_path / "art")
    np.save(tmp_path / "x.npy", x.numpy())
    res = subprocess.run([str(runner), str(out), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y"), "--repeat", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "median" in res.stdout
    want = graphopt.load(out)(x.numpy())[0]
    got = np.load(tmp_path / "y0.npy")
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    # a wrong shape is the VM's error, naming the parameter; the runner exits non-zero
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 8, 8), np.float32))
    res = subprocess.run([str(runner), str(out), str(tmp_path / "bad.npy")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 1 and "param=x" in res.stderr, res.stderr


def test_cpp_runner_takes_int64_inputs_and_returns_every_output(tmp_path, runner):
    model = TwoHeads().eval()
    ids, scale = torch.randint(0, 50, (2, 7)), torch.rand(1)
    out = graphopt.compile(graphopt.trace(model, (ids, scale)), "llvm", output=tmp_path / "art")
    np.save(tmp_path / "ids.npy", ids.numpy())
    np.save(tmp_path / "scale.npy", scale.numpy())
    res = subprocess.run([str(runner), str(out), str(tmp_path / "ids.npy"), str(tmp_path / "scale.npy"),
                          "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    want = graphopt.load(out)(ids.numpy(), scale.numpy())
    assert len(want) == 2
    for i, w in enumerate(want):
        got = np.load(tmp_path / f"o{i}.npy")
        assert got.dtype == w.dtype and got.shape == w.shape, (i, got.dtype, got.shape)
        np.testing.assert_array_equal(got, w)


def test_cpp_runner_passes_the_prepared_int4_weights(tmp_path, runner):
    """An int4 artifact whose GEMMs read widened weights (made once by its `prepare` function and passed to every
    call of main after the inputs): the runner calls prepare and gives graphopt.load's outputs bit for bit."""
    from graphopt.targets.tvm.cpu.int8 import int8_kernels_available
    from graphopt.targets.tvm.host import cpu_target
    if not int8_kernels_available(cpu_target()):
        pytest.skip("needs AVX2")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 64)).eval()
    x = torch.rand(1, 12, 64)
    q = graphopt.optimize(graphopt.trace(model, (x,)), "quantize{weights=int4},fold-qdq",
                          data=[(torch.rand(1, 12, 64),) for _ in range(2)])
    out = graphopt.compile(q, "llvm", output=tmp_path / "art")
    assert graphopt.load(out).manifest["target_info"]["prepared_weights"] == 2
    np.save(tmp_path / "x.npy", x.numpy())
    res = subprocess.run([str(runner), str(out), str(tmp_path / "x.npy"), "-o", str(tmp_path / "y")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y0.npy"), graphopt.load(out)(x.numpy())[0])
