"""Small models users compile for the edge, against ONNX Runtime and PyTorch in one run: a CIFAR ResNet-20, a
keyword-spotting DS-CNN (49 x 10 MFCC frames), a 784-512-256-10 MLP at batch 1 and 64, an 8x8-digit CNN, a
ViT-Tiny-style 6-layer encoder on 32x32 patches, TinyYOLO at 160x160, a 2-layer GRU over 50 steps and a 3-level
UNet at 64x64; and two larger ones users bring: a YOLOv8-style detector body at 320x320 (SiLU, C2f split /
concat blocks, SPPF's chained 5x5 max pools, nearest upsampling) and a 6-layer Llama-style decoder (d 512, RMS
norms, rotary embeddings, grouped-query causal attention, SwiGLU, 8000-token head) over 128 tokens. Random
weights and batch-norm statistics (what compiling costs, not accuracy); graphopt through the CLI's default
pipeline (fold-bn, fold-pad, fold-constants, dce); ORT on graphopt's ONNX export of the same traced graph
(torch's exporter where that fails); every runtime timed as a user calls it (numpy in, numpy out), the same
thread count, in interleaved rounds. The small models take 0.03-3 ms a call, so per-call and per-kernel costs
decide; ratios are time / ORT's time.

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

    def cbs(cin: int, cout: int, k: int = 1, s: int = 1):  # YOLOv5/v8's conv + batch norm + SiLU
        return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())

    class C2f(nn.Module):  # YOLOv8's split / bottlenecks / concat block
        def __init__(self, c: int):
            super().__init__()
            self.cv1, self.cv2 = cbs(c, c), cbs(3 * c // 2, c)
            self.m = nn.Sequential(cbs(c // 2, c // 2, 3), cbs(c // 2, c // 2, 3))

        def forward(self, x):
            a, b = self.cv1(x).chunk(2, 1)
            return self.cv2(torch.cat([a, b, self.m(b)], 1))

    class SPPF(nn.Module):  # three chained 5x5 stride-1 max pools, concatenated
        def __init__(self, c: int):
            super().__init__()
            self.cv1, self.cv2, self.pool = cbs(c, c // 2), cbs(2 * c, c), nn.MaxPool2d(5, 1, 2)

        def forward(self, x):
            x = self.cv1(x)
            y1 = self.pool(x)
            y2 = self.pool(y1)
            return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))

    class YoloC2f(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.d1, self.c1, self.d2 = cbs(3, 16, 3, 2), cbs(16, 32, 3, 2), C2f(32), cbs(32, 64, 3, 2)
            self.sppf, self.c2, self.head = SPPF(64), C2f(96), nn.Conv2d(96, 18, 1)

        def forward(self, x):
            a = self.c1(self.d1(self.stem(x)))
            b = F.interpolate(self.sppf(self.d2(a)), scale_factor=2.0, mode="nearest")
            return self.head(self.c2(torch.cat([b, a], 1)))

    class RMSNorm(nn.Module):
        def __init__(self, d: int):
            super().__init__()
            self.w = nn.Parameter(1.0 + 0.1 * torch.randn(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w

    class LlamaBlock(nn.Module):  # RMS norms, rotary embeddings, grouped-query causal attention, SwiGLU
        def __init__(self, d: int, heads: int, kv_heads: int, ff: int):
            super().__init__()
            self.h, self.kvh, self.hd = heads, kv_heads, d // heads
            self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
            self.q, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.k, self.v = nn.Linear(d, kv_heads * self.hd, bias=False), nn.Linear(d, kv_heads * self.hd, bias=False)
            self.g, self.u = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
            self.dn = nn.Linear(ff, d, bias=False)

        def forward(self, x, cos, sin):
            def rope(t):
                half = t.shape[-1] // 2
                return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin
            b, n, d = x.shape
            y = self.n1(x)
            q = rope(self.q(y).view(b, n, self.h, self.hd).transpose(1, 2))
            k = rope(self.k(y).view(b, n, self.kvh, self.hd).transpose(1, 2)).repeat_interleave(self.h // self.kvh, 1)
            v = self.v(y).view(b, n, self.kvh, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kvh, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
            x = x + self.o(a)
            y = self.n2(x)
            return x + self.dn(F.silu(self.g(y)) * self.u(y))

    class Llama(nn.Module):
        def __init__(self, vocab: int = 8000, d: int = 512, layers: int = 6, tokens: int = 128):
            super().__init__()
            self.emb, self.norm = nn.Embedding(vocab, d), RMSNorm(d)
            self.blocks = nn.ModuleList([LlamaBlock(d, 8, 2, 1408) for _ in range(layers)])
            self.head = nn.Linear(d, vocab, bias=False)
            hd = d // 8
            f = torch.outer(torch.arange(tokens).float(), 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
            self.register_buffer("cos", torch.cat([f, f], -1).cos())
            self.register_buffer("sin", torch.cat([f, f], -1).sin())

        def forward(self, ids):
            x = self.emb(ids)
            for blk in self.blocks:
                x = blk(x, self.cos, self.sin)
            return self.head(self.norm(x))

    return {"resnet20": resnet20, "dscnn": dscnn, "mlp": lambda: mlp(1), "mlp_b64": lambda: mlp(64),
            "digits_cnn": digits_cnn, "vit_tiny": lambda: (ViT(), (1, 3, 32, 32)), "tinyyolo": tinyyolo,
            "gru": lambda: (GRU(), (1, 50, 40)), "unet": lambda: (UNet(), (1, 3, 64, 64)),
            "yolo_c2f": lambda: (YoloC2f(), (1, 3, 320, 320)),
            "llama_6l": lambda: (Llama(), (1, 128), 8000)}


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
    from graphopt.bench import compare_latency, randomize_batch_norms, selected, set_threads, write_results
    set_threads(args.threads)
    models = _models()
    names = selected(ap, args.only, models)
    work = Path(tempfile.mkdtemp(prefix="graphopt-small-models-"))
    results = []
    for name in names:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model, shape, *vocab = models[name]()
        model = model.eval()
        randomize_batch_norms(model)
        x = torch.randint(0, vocab[0], shape) if vocab else torch.randn(*shape)  # (token ids for a language model)
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
