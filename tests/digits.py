"""sklearn digits (1,797 real 8x8 images, bundled): a small CNN that trains to ~98-99% in seconds on CPU."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BATCH = 64


class DigitsCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class DigitsMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


ARCHS = {"cnn": DigitsCNN, "mlp": DigitsMLP}


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return xtr, xte, ytr, yte


def train_digits(seed: int = 0, epochs: int = 12, arch: str = "cnn") -> tuple[nn.Module, tuple]:
    torch.manual_seed(seed)
    data = digits_split(seed)
    xtr, _, ytr, _ = data
    model = ARCHS[arch]()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval(), data


def batches(x: torch.Tensor) -> list[tuple[torch.Tensor]]:
    """Full batches of BATCH (graphs are traced with a static batch); the remainder is padded by repetition."""
    out = []
    for i in range(0, len(x), BATCH):
        b = x[i:i + BATCH]
        if len(b) < BATCH:
            b = torch.cat([b, x[: BATCH - len(b)]])
        out.append((b,))
    return out


def label_batches(y: torch.Tensor) -> list[torch.Tensor]:
    """Labels matching batches(x) one for one (the same padding by repetition)."""
    return [b[0] for b in batches(y)]


@torch.no_grad()
def accuracy(run, x: torch.Tensor, y: torch.Tensor) -> float:
    preds = []
    for (b,) in batches(x):
        out = run(b)
        preds.append((out[0] if isinstance(out, (tuple, list)) else out).argmax(1))
    return float((torch.cat(preds)[: len(y)] == y).float().mean())


def np_seed(seed: int) -> None:
    np.random.seed(seed)
