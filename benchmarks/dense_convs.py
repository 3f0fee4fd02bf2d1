"""Dense 3x3 convs (ResNet bodies) on the CPU: graphopt fp32 and int7 (whichever kernels its rules pick: Winograd,
the flat and pixel-row convs, int16 Winograd for int8 on AVX2, int8 im2col + the pointwise kernel) against ONNX
Runtime fp32 and int8 (`quantize_static`, S8S8 and U8S8: its faster kernels on x86) and PyTorch, in one run.

Rows: each ResNet-18 3x3 conv shape (+ ReLU) alone, then a whole ResNet-18 (torchvision's layout, written here:
no torchvision; random weights with randomized batch-norm statistics, batch 1, 224x224), fp32 and int7
(`fold-bn,quantize{weights=int7},fold-qdq`, calibrated on 4 random inputs). ResNet-18 has no shipped weights here,
so fidelity is the fp32 graph's top-1 and cosine to PyTorch on 4 other random inputs: what compiling and
quantizing cost, not accuracy. Latency: median of interleaved rounds, the same thread count everywhere.

    python benchmarks/dense_convs.py [--threads 2] [--runs 20] [--out benchmarks/results/dense_convs.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = [(64, 64, 56, 1), (128, 128, 28, 1), (256, 256, 14, 1), (512, 512, 7, 1), (64, 128, 56, 2),
          (128, 256, 28, 2), (256, 512, 14, 2)]  # (Cin, Cout, input H = W, stride)


def resnet18():
    import torch
    from torch import nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
            return torch.relu(y + (x if self.down is None else self.down(x)))

    layers, c = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Basic(c, cout, stride), Basic(cout, cout, 1)]
        c = cout
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)).eval()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # trained-looking statistics, so folding them changes the weights
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.0, generator=g)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per runtime and round (median)")
    ap.add_argument("--out", default="benchmarks/results/dense_convs.json")
    args = ap.parse_args(argv)

    import torch

    import graphopt
    from graphopt.bench import (interleaved_medians, ort_quantize_static, ort_session, reference_onnx, set_threads,
                                write_results)
    set_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="graphopt-dense-convs-"))
    cases = [(f"conv {ci}->{co} @{hw} s{s}", torch.nn.Sequential(torch.nn.Conv2d(ci, co, 3, s, 1), torch.nn.ReLU()).eval(),
              (1, ci, hw, hw), ci * co * 9 * (hw // s) ** 2) for ci, co, hw, s in SHAPES]
    cases.append(("resnet18", resnet18(), (1, 3, 224, 224), None))
    results = []
    for name, model, shape, macs in cases:
        t0 = time.perf_counter()
        x = torch.randn(*shape)
        calib = [(torch.randn(*shape),) for _ in range(4)]
        g = graphopt.optimize(graphopt.trace(model, (x,)), "fold-bn")
        q = graphopt.optimize(g, "quantize{weights=int7},fold-qdq", data=calib)
        macs = macs or g.stats().macs
        arts = {k: graphopt.load(graphopt.compile(gr, "llvm", output=work / f"{name}-{k}".replace(" ", "_")))
                for k, gr in (("fp32", g), ("int7", q))}
        onnx32 = reference_onnx(g, str(work / name.replace(" ", "_")))
        sess32 = ort_session(onnx32, args.threads)
        feed = lambda a, nm=sess32.get_inputs()[0].name: {nm: a}  # noqa: E731
        feeds = [feed(c[0].numpy()) for c in calib]
        sess8 = ort_session(ort_quantize_static(onnx32, work / f"{name.replace(' ', '_')}-int8.onnx", feeds),
                            args.threads)
        sess8u = ort_session(ort_quantize_static(onnx32, work / f"{name.replace(' ', '_')}-u8s8.onnx", feeds,
                                                 activations="uint8"), args.threads)
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x).numpy()
        agree = {k: float(np.corrcoef(a(xn)[0].ravel(), ref.ravel())[0, 1]) for k, a in arts.items()}
        agree["ort int8"] = float(np.corrcoef(sess8.run(None, feed(xn))[0].ravel(), ref.ravel())[0, 1])
        agree["ort u8s8"] = float(np.corrcoef(sess8u.run(None, feed(xn))[0].ravel(), ref.ravel())[0, 1])

        def torch_call(m=model, t=x):
            with torch.no_grad():
                return m(t)
        calls = {"graphopt fp32": arts["fp32"].prepared(xn), "graphopt int7": arts["int7"].prepared(xn),
                 "onnxruntime fp32": lambda: sess32.run(None, feed(xn)),
                 "onnxruntime int8": lambda: sess8.run(None, feed(xn)),
                 "onnxruntime u8s8": lambda: sess8u.run(None, feed(xn)), "pytorch fp32": torch_call}
        lat = interleaved_medians(calls, runs=args.runs)
        results.append({"case": name, "macs": int(macs), "latency_ms": {k: round(v * 1e3, 3) for k, v in lat.items()},
                        "correlation_to_pytorch": {k: round(v, 5) for k, v in agree.items()}})
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    cols = ["graphopt fp32", "graphopt int7", "onnxruntime fp32", "onnxruntime int8", "onnxruntime u8s8",
            "pytorch fp32"]
    print(f"{'case':26s}" + "".join(f"{c:>18s}" for c in cols) + "   fp32/ORT  int7/ORT fp32  int7/ORT int8"
          + f"   ({args.threads} threads, ms; int7/ORT int8: against ORT's faster int8, S8S8 or U8S8; GMAC/s of graphopt fp32)")
    for r in results:
        lat = r["latency_ms"]
        gmac = r["macs"] / lat["graphopt fp32"] / 1e6
        print(f"{r['case']:26s}" + "".join(f"{lat[c]:18.3f}" for c in cols)
              + f"   {lat['graphopt fp32'] / lat['onnxruntime fp32']:8.2f}  {lat['graphopt int7'] / lat['onnxruntime fp32']:13.2f}"
              + f"  {lat['graphopt int7'] / min(lat['onnxruntime int8'], lat['onnxruntime u8s8']):13.2f}   {gmac:.0f}")
    write_results(args.out, args.threads, args.runs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
