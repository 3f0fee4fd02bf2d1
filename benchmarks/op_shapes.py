"""Layers and blocks of architectures outside the model zoo on the CPU: graphopt fp32 against ONNX Runtime fp32 and
PyTorch, in one run, as ratios. Each row is one layer (or a small block) with random weights at a shape from the
architecture named: ViT / Swin patch embeddings, DCGAN / UNet transposed convs, HiFi-GAN's 1-D upsampler, DeepLab's
atrous conv and head resize, ResNeXt's grouped conv, group norm (detection heads, diffusion UNets), SiLU / Mish /
tanh GELU activations, SE blocks, classifier heads written as 1x1 convs, constant pads, TCN 1-D convs, 3-D convs,
uneven strides, ViT's attention over 197 tokens and Swin's over 49, transformer rows that are not whole vectors,
instance norm and reflect pads (style transfer), Swin's roll, PointNet's max over points, log_softmax over a
vocabulary and softmax over a segmentation map's channels, SAGAN's self-attention, MLP-Mixer's token mixing, a
layout change, PSPNet's pyramid pool, bicubic resizing, a flip and a matmul by a parameter. Every one of these ran TVM's generic operator once and
took 1.6-100000x PyTorch's time (the README's "More shapes outside the zoo" has the before / after of each); this
benchmark keeps them honest.
Outputs are checked against PyTorch (max error relative to the output's range). Latency: the lowest of each
runtime's per-round medians over interleaved rounds (these calls take well under a millisecond, and a slow spell
of the shared machine doubled whichever runtime it fell on), the same thread count everywhere.

    python benchmarks/op_shapes.py [--threads 2] [--runs 20] [--only SUBSTRING] [--out benchmarks/results/op_shapes.json]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cases():
    """(name, architecture, model, input shape)"""
    import torch
    from torch import nn

    class Act(nn.Module):
        def __init__(self, fn):
            super().__init__()
            self.fn = fn

        def forward(self, x):
            return self.fn(x)

    class SE(nn.Module):  # MobileNetV3 / EfficientNet squeeze-and-excite
        def __init__(self, c: int):
            super().__init__()
            self.a, self.b = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            w = torch.nn.functional.adaptive_avg_pool2d(x, 1)
            return x * torch.nn.functional.hardsigmoid(self.b(torch.relu(self.a(w))))

    class Resize(nn.Module):
        def __init__(self, size):
            super().__init__()
            self.size = size

        def forward(self, x):
            return torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)

    class Pad(nn.Module):
        def forward(self, x):
            return torch.nn.functional.pad(x, (1, 1, 1, 1))

    class Attention(nn.Module):  # scores, softmax, context over heads of a [1, T, 3 * 64] activation
        def __init__(self, heads: int):
            super().__init__()
            self.heads = heads

        def forward(self, x):
            q = x.view(1, x.shape[1], self.heads, -1).transpose(1, 2)
            a = torch.softmax(q @ q.transpose(-1, -2) * q.shape[-1] ** -0.5, -1)
            return (a @ q).transpose(1, 2).reshape(x.shape)

    class WindowAttention(nn.Module):  # Swin: (q * scale) @ k^T + a relative position bias, softmax, @ v
        def __init__(self, heads: int, tokens: int):
            super().__init__()
            self.heads = heads
            self.bias = nn.Parameter(torch.randn(1, heads, tokens, tokens) * 0.02)

        def forward(self, x):
            b, t, c = x.shape
            q = x.view(b, t, self.heads, -1).transpose(1, 2)
            a = (q * q.shape[-1] ** -0.5) @ q.transpose(-2, -1) + self.bias
            return (torch.softmax(a, -1) @ q).transpose(1, 2).reshape(b, t, c)

    class EdgePad(nn.Module):
        def forward(self, x):
            return torch.nn.functional.pad(x, (3, 3, 3, 3), mode="reflect")

    class Roll(nn.Module):
        def forward(self, x):
            return torch.roll(x, (-3, -3), (1, 2))

    class MaxOver(nn.Module):
        def forward(self, x):
            return torch.max(x, -1)[0]

    class SelfAttention2d(nn.Module):  # SAGAN: q / k / v 1x1 convs, attention over the map's pixels
        def __init__(self, c: int):
            super().__init__()
            self.q, self.k, self.v = nn.Conv2d(c, c // 8, 1), nn.Conv2d(c, c // 8, 1), nn.Conv2d(c, c, 1)

        def forward(self, x):
            b, c, h, w = x.shape
            a = torch.softmax(torch.bmm(self.q(x).flatten(2).transpose(1, 2), self.k(x).flatten(2)), -1)
            return x + torch.bmm(self.v(x).flatten(2), a.transpose(1, 2)).view(b, c, h, w)

    class TokenMixing(nn.Module):  # MLP-Mixer: an MLP over the tokens of a [1, T, C] activation
        def __init__(self, tokens: int, c: int):
            super().__init__()
            self.norm, self.a, self.b = nn.LayerNorm(c), nn.Linear(tokens, 384), nn.Linear(384, tokens)

        def forward(self, x):
            return x + self.b(torch.nn.functional.gelu(self.a(self.norm(x).transpose(1, 2)))).transpose(1, 2)

    class Projection(nn.Module):  # x @ W.t() with a parameter W (hand-written projections)
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(1024, 512) * 0.04)

        def forward(self, x):
            return x @ self.w.t()

    f = torch.nn.functional
    return [
        ("patch embed 16x16/16 3->384", "ViT-S", nn.Conv2d(3, 384, 16, 16), (1, 3, 224, 224)),
        ("patch embed 4x4/4 3->96", "Swin-T / ConvNeXt-T", nn.Conv2d(3, 96, 4, 4), (1, 3, 224, 224)),
        ("convT 4x4/2 128->64 @14", "DCGAN / UNet decoder", nn.ConvTranspose2d(128, 64, 4, 2, 1), (1, 128, 14, 14)),
        ("convT1d 16/8 256->128 @64", "HiFi-GAN", nn.ConvTranspose1d(256, 128, 16, 8, 4), (1, 256, 64)),
        ("convT 4x4/2 256->128 @4 b8", "DCGAN generator (a GEMM + fold)",
         nn.Sequential(nn.ConvTranspose2d(256, 128, 4, 2, 1), nn.ReLU()), (8, 256, 4, 4)),
        ("convT dw 4x4/2 64 @32", "FCN / CenterNet depthwise upsampling",
         nn.ConvTranspose2d(64, 64, 4, 2, 1, groups=64, bias=False), (1, 64, 32, 32)),
        ("convT g4 4x4/2 64->64 @32", "grouped up-convolution", nn.ConvTranspose2d(64, 64, 4, 2, 1, groups=4),
         (1, 64, 32, 32)),
        ("conv1d k5 64 @1000", "TCN / audio", nn.Conv1d(64, 64, 5, padding=2), (1, 64, 1000)),
        ("atrous 3x3 d2 64 @28", "DeepLabV3", nn.Conv2d(64, 64, 3, padding=2, dilation=2), (1, 64, 28, 28)),
        ("atrous 3x3 d2/2 64 @56", "strided atrous", nn.Conv2d(64, 64, 3, 2, 2, dilation=2), (1, 64, 56, 56)),
        ("grouped 3x3 g4 64 @28", "grouped ResNet", nn.Conv2d(64, 64, 3, padding=1, groups=4), (1, 64, 28, 28)),
        ("grouped 3x3 g32 128 @56", "ResNeXt-50 32x4d", nn.Conv2d(128, 128, 3, padding=1, groups=32),
         (1, 128, 56, 56)),
        ("grouped 3x3/2 g28 448 @28", "RegNetY-1.6GF", nn.Conv2d(448, 448, 3, 2, 1, groups=28), (1, 448, 28, 28)),
        ("bilinear 21x65x65 -> 513", "DeepLab head", Resize((513, 513)), (1, 21, 65, 65)),
        ("bilinear 64x28 -> 56", "FPN / UNet", Resize((56, 56)), (1, 64, 28, 28)),
        ("group norm 32g 256 @28", "FCOS head / diffusion UNet", nn.GroupNorm(32, 256), (1, 256, 28, 28)),
        ("conv3d 3x3x3 16 @8x28x28", "C3D / 3-D UNet", nn.Conv3d(16, 16, 3, padding=1), (1, 16, 8, 28, 28)),
        ("conv 3x3 stride (2,1) 64 @28", "CRNN", nn.Conv2d(64, 64, 3, (2, 1), 1), (1, 64, 28, 28)),
        ("SiLU 96 @56", "YOLOv5 / EfficientNet", nn.SiLU(), (1, 96, 56, 56)),
        ("Mish 96 @56", "YOLOv4", nn.Mish(), (1, 96, 56, 56)),
        ("tanh GELU 77x3072", "GPT-2 MLP", Act(lambda x: f.gelu(x, approximate="tanh")), (1, 77, 3072)),
        ("SE block 960 @7", "MobileNetV3", SE(960), (1, 960, 7, 7)),
        ("1x1 conv head 960->1280 @1", "MobileNetV3", nn.Sequential(nn.Conv2d(960, 1280, 1), nn.Hardswish()),
         (1, 960, 1, 1)),
        ("zero pad 64 @64", "TF-ported models", Pad(), (1, 64, 64, 64)),
        ("attention 3x197x64", "ViT-Ti (197 tokens)", Attention(3), (1, 197, 192)),
        ("layer norm 77x300", "odd-width transformer", nn.LayerNorm(300), (1, 77, 300)),
        ("softmax 8x77x77", "CLIP text attention", nn.Softmax(-1), (1, 8, 77, 77)),
        ("linear 3 rows 1280->1000", "classifier head at batch 3", nn.Linear(1280, 1000), (3, 1280)),
        ("window attention 64x3x49x32", "Swin-T stage 1", WindowAttention(3, 49), (64, 49, 96)),
        ("instance norm 64 @128", "style transfer / CycleGAN", nn.InstanceNorm2d(64, affine=True),
         (1, 64, 128, 128)),
        ("reflect pad 3 64 @64", "style transfer / CycleGAN", EdgePad(), (1, 64, 64, 64)),
        ("roll -3,-3 56x56x96", "Swin-T shifted windows", Roll(), (1, 56, 56, 96)),
        ("max over 2048 points 1024", "PointNet", MaxOver(), (1, 1024, 2048)),
        ("log_softmax 32000", "language model head", nn.LogSoftmax(-1), (1, 32000)),
        ("softmax over 21 channels @128", "segmentation head", nn.Softmax(1), (1, 21, 128, 128)),
        ("self-attention 128 @32", "SAGAN / BigGAN", SelfAttention2d(128), (1, 128, 32, 32)),
        ("token mixing 196x512", "MLP-Mixer", TokenMixing(196, 512), (1, 196, 512)),
        ("NHWC -> NCHW 56x56x64", "TF ports / ConvNeXt", Act(lambda x: x.permute(0, 3, 1, 2) + 0.0),
         (1, 56, 56, 64)),
        ("adaptive avg 512 @60 -> 6", "PSPNet pyramid", nn.AdaptiveAvgPool2d(6), (1, 512, 60, 60)),
        ("bicubic 64x28 -> 56", "super-resolution", Act(lambda x: f.interpolate(x, scale_factor=2, mode="bicubic")),
         (1, 64, 28, 28)),
        ("flip W 64 @56", "test-time augmentation", Act(lambda x: torch.flip(x, (3,))), (1, 64, 56, 56)),
        ("x @ W.t() 64x512->1024", "hand-written projection", Projection(), (1, 64, 512)),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=20, help="timed runs per runtime and round (median)")
    ap.add_argument("--only", default="", help="run only the cases whose name contains this")
    ap.add_argument("--out", default="benchmarks/results/op_shapes.json")
    args = ap.parse_args(argv)

    import torch

    import graphopt
    from graphopt.bench import interleaved_medians, ort_session, reference_onnx, set_threads, write_results
    set_threads(args.threads)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="graphopt-op-shapes-"))
    results = []
    for name, arch, model, shape in cases():
        if args.only not in name:
            continue
        t0 = time.perf_counter()
        model = model.eval()
        x = torch.randn(*shape)
        slug = "".join(c if c.isalnum() else "_" for c in name)
        g = graphopt.trace(model, (x,))
        art = graphopt.load(graphopt.compile(g, "llvm", output=work / slug))
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x).numpy()
        err = float(np.abs(art(xn)[0] - ref).max() / (np.abs(ref).max() + 1e-12))

        def torch_call(m=model, t=x):
            with torch.no_grad():
                return m(t)
        calls = {"graphopt": art.prepared(xn), "pytorch": torch_call}
        try:
            sess = ort_session(reference_onnx(g, str(work / f"{slug}-onnx")), args.threads)
            feed = {sess.get_inputs()[0].name: xn}
            calls["onnxruntime"] = lambda s=sess, fd=feed: s.run(None, fd)
        except Exception as e:  # noqa: BLE001 (a row without ORT says why)
            print(f"[{name}] no ORT baseline: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        lat = interleaved_medians(calls, runs=args.runs, best_round=True)
        results.append({"case": name, "architecture": arch, "input": list(shape), "max_rel_error": err,
                        "latency_ms": {k: round(v * 1e3, 4) for k, v in lat.items()}})
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(f"{'case':28s} {'architecture':27s} {'graphopt':>9s} {'ORT':>9s} {'PyTorch':>9s}  {'/ORT':>5s} "
          f"{'/PyTorch':>8s}  rel err   ({args.threads} threads, ms)")
    for r in results:
        lat = r["latency_ms"]
        ort_ms = lat.get("onnxruntime")
        print(f"{r['case']:28s} {r['architecture']:27s} {lat['graphopt']:9.3f} "
              + (f"{ort_ms:9.3f}" if ort_ms else f"{'n/a':>9s}") + f" {lat['pytorch']:9.3f}  "
              + (f"{lat['graphopt'] / ort_ms:5.2f}" if ort_ms else f"{'':5s}")
              + f" {lat['graphopt'] / lat['pytorch']:8.2f}  {r['max_rel_error']:.1e}")
    write_results(args.out, args.threads, args.runs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
