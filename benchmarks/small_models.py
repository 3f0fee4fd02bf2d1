"""Small models users compile for the edge, against ONNX Runtime and PyTorch in one run: a CIFAR ResNet-20, a
keyword-spotting DS-CNN (49 x 10 MFCC frames), a 784-512-256-10 MLP at batch 1 and 64, an 8x8-digit CNN, a
ViT-Tiny-style 6-layer encoder on 32x32 patches, TinyYOLO at 160x160, a 2-layer GRU over 50 steps and a 3-level
UNet at 64x64. Random weights and batch-norm statistics (what compiling costs, not accuracy); graphopt through
the CLI's default pipeline (fold-bn, fold-pad, fold-constants, dce); ORT on graphopt's ONNX export of the same
traced graph (torch's exporter where that fails); every runtime timed as a user calls it (numpy in, numpy out),
the same thread count, in interleaved rounds. These models take 0.03-3 ms a call, so per-call and per-kernel
costs decide; ratios are time / ORT's time.

    python benchmarks/small_models.py [--threads 2] [--runs 140] [--only resnet20,mlp] [--out PATH]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _models() -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    def bn_relu(c: int) -> list:
        return [nn.BatchNorm2d(c), nn.ReLU()]

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.sc = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.sc(x))

    def resnet20():
        layers, c = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), *bn_relu(16)], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(3):
                layers.append(Basic(c, cout, stride if b == 0 else 1))
                c = cout
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)), (1, 3, 32, 32)

    def dscnn():
        layers = [nn.Conv2d(1, 64, (10, 4), 2, (5, 1)), *bn_relu(64)]
        for _ in range(4):
            layers += [nn.Conv2d(64, 64, 3, 1, 1, groups=64), *bn_relu(64), nn.Conv2d(64, 64, 1), *bn_relu(64)]
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 12)), (1, 1, 49, 10)

    def mlp(batch: int):
        return (nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(),
                              nn.Linear(256, 10)), (batch, 1, 28, 28))

    def digits_cnn():
        return (nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), *bn_relu(32), nn.Conv2d(32, 64, 3, 1, 1), *bn_relu(64),
                              nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
                              nn.Linear(128, 10)), (1, 1, 8, 8))

    class ViT(nn.Module):
        def __init__(self, d: int = 192, depth: int = 6, heads: int = 3):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, 4)
            self.cls, self.pos = nn.Parameter(torch.randn(1, 1, d)), nn.Parameter(torch.randn(1, 65, d))
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, 0.0, batch_first=True, norm_first=True,
                                               activation="gelu")
            self.enc, self.head = nn.TransformerEncoder(layer, depth), nn.Linear(d, 10)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            return self.head(self.enc(x)[:, 0])

    def tinyyolo():
        layers, c = [], 3
        for cout in (16, 32, 64, 128, 256):
            layers += [nn.Conv2d(c, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
                       nn.MaxPool2d(2)]
            c = cout
        layers += [nn.Conv2d(256, 512, 3, 1, 1, bias=False), nn.BatchNorm2d(512), nn.LeakyReLU(0.1),
                   nn.Conv2d(512, 255, 1)]
        return nn.Sequential(*layers), (1, 3, 160, 160)

    class GRU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru, self.out = nn.GRU(40, 128, 2, batch_first=True), nn.Linear(128, 12)

        def forward(self, x):
            return self.out(self.gru(x)[0][:, -1])

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()

            def block(cin: int, cout: int):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, 1, 1), *bn_relu(cout), nn.Conv2d(cout, cout, 3, 1, 1),
                                     *bn_relu(cout))
            self.d1, self.d2, self.d3 = block(3, 16), block(16, 32), block(32, 64)
            self.u2, self.c2 = nn.ConvTranspose2d(64, 32, 2, 2), block(64, 32)
            self.u1, self.c1 = nn.ConvTranspose2d(32, 16, 2, 2), block(32, 16)
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, x):
            a = self.d1(x)
            b = self.d2(F.max_pool2d(a, 2))
            c = self.d3(F.max_pool2d(b, 2))
            b = self.c2(torch.cat([self.u2(c), b], 1))
            return self.out(self.c1(torch.cat([self.u1(b), a], 1)))

    return {"resnet20": resnet20, "dscnn": dscnn, "mlp": lambda: mlp(1), "mlp_b64": lambda: mlp(64),
            "digits_cnn": digits_cnn, "vit_tiny": lambda: (ViT(), (1, 3, 32, 32)), "tinyyolo": tinyyolo,
            "gru": lambda: (GRU(), (1, 50, 40)), "unet": lambda: (UNet(), (1, 3, 64, 64))}


def _randomize_batch_norms(model) -> None:
    """Trained-looking statistics, so folding them changes the weights."""
    import torch
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)


def _onnx(graph, model, x, folder: Path) -> Path:
    """graphopt's ONNX export of the traced graph, or torch's exporter where graphopt's has no form for an op."""
    import torch

    from graphopt.bench import reference_onnx
    try:
        return reference_onnx(graph, str(folder))
    except Exception as e:  # (a GRU: graphopt's exporter writes what it traced, which ORT may not take)
        print(f"  graphopt's ONNX export failed ({type(e).__name__}); using torch.onnx.export", file=sys.stderr)
        path = folder / "torch.onnx"
        with torch.no_grad():
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
        return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=140, help="timed calls per runtime over 7 interleaved rounds")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--out", default="benchmarks/results/small_models.json")
    args = ap.parse_args(argv)

    import torch

    import graphopt
    from graphopt.bench import compare_latency, set_threads, write_results
    set_threads(args.threads)
    models = _models()
    names = [n for n in args.only.split(",") if n] or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(models)}")
    work = Path(tempfile.mkdtemp(prefix="graphopt-small-models-"))
    results = []
    for name in names:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model, shape = models[name]()
        model = model.eval()
        _randomize_batch_norms(model)
        x = torch.randn(*shape)
        g = graphopt.optimize(graphopt.trace(model, (x,)), "fold-bn,fold-pad,fold-constants,dce")
        art = graphopt.load(graphopt.compile(g, "llvm", output=work / name))
        onnx_path = _onnx(g, model, x, work / f"{name}-onnx")
        with torch.no_grad():
            ref = model(x).numpy()
        err = float(np.abs(art(x.numpy())[0] - ref).max() / max(1e-6, float(np.abs(ref).max())))
        cmp = compare_latency(art, [x], threads=args.threads, onnx_path=onnx_path, torch_fn=model, runs=args.runs,
                              rounds=7)
        results.append({"model": name, "input": list(shape), "macs": int(g.stats().macs),
                        "max_rel_error_vs_pytorch": err, **cmp.to_json()})
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(f"{'model':12s} {'input':>16s} {'MACs':>8s} {'graphopt ms':>12s} {'ORT ms':>9s} {'PyTorch ms':>11s}"
          f" {'/ORT':>6s} {'/PyTorch':>9s} {'rel err':>8s}   ({args.threads} threads)")
    for r in results:
        print(f"{r['model']:12s} {'x'.join(map(str, r['input'])):>16s} {r['macs'] / 1e6:7.1f}M {r['graphopt_ms']:12.3f}"
              f" {r['ort_ms']:9.3f} {r['torch_ms']:11.3f} {r['ratio_vs_ort']:6.2f} {r['ratio_vs_torch']:9.2f}"
              f" {r['max_rel_error_vs_pytorch']:8.1e}")
    write_results(args.out, args.threads, args.runs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
