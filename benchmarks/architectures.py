"""Architectures users bring, fp32 and int8, against ONNX Runtime fp32 and int8 and PyTorch in one run: a
ConvNeXt-style net (7x7 depthwise convs, channels-last LayerNorm, GELU MLPs, layer scale) at 224x224, ResNeXt
blocks (32 groups of 4 channels) at 112x112, a DeepLab-style ASPP head (dilated 3x3 convs at d 2 / 4 / 6, image
pooling, bilinear upsampling) at 256x256, an Inception block (1x7 / 7x1 and 5x5 convs, a 3x3 average pool) on
288x35x35, a Swin-style pair of window-attention blocks (shifted windows by torch.roll, relative position bias)
at 128x128, a DETR-style 2-layer transformer decoder (cross attention to 400 memory tokens), a Conformer conv
module (GLU, a 15-tap depthwise conv1d) over 256 frames, a wav2vec2-style feature encoder + grouped positional
conv on 1 s of 16 kHz audio, a MobileViT block (2x2 patches as tokens, 4 heads of width 24) on 64x32x32, and a
WaveNet-style TCN (8 dilated causal conv1d pairs, gated activations) over 2000 steps; since the sixtieth session a
3-D UNet on a 32x64x64 volume, an R(2+1)D video block on 8 frames of 112x112, a DCGAN generator (batch 8, 1x1
latent to 32x32), a two-layer GCN on a fixed 2000-node, 10000-edge graph, an FNet block (FFT token mixing, 128
tokens) and a GFNet block (a global filter by rfft2 / irfft2 on 14x14 tokens); since the sixty-first two
StyleGAN2 modulated convs (per-sample weights computed in the graph, batch 4 as groups, 256 channels at 16x16),
causal linear attention (running k v^T sums by cumsum over 256 tokens) and 10 Sinkhorn iterations between two
sets of 256 points (log-domain, logsumexp); since the sixty-second a selective-kernel unit (grouped 3x3 and
dilated 3x3 branches weighted per channel by a softmax, 128 channels at 28x28) and EfficientNet-B0 (SiLU,
squeeze-excite) at 224x224; since the sixty-third PNA (max / min / mean / std aggregators by scatter_reduce over a
2000-node, 20000-edge graph, degree scalers, concats of the aggregates), three TabNet steps (sparsemax masks: a
sort of 1024 rows of 64), a minGRU layer's log-space scan (logcumsumexp over 512 tokens) and a DDPM UNet stage
(GroupNorm + SiLU res block, einsum attention over 32x32 pixels); since the seventy-seventh an ALBERT-style
encoder (one layer's weights run 4 times), ESRGAN's dense blocks with a pixel-shuffle upsampler, RCAN's
channel-attention block, a pix2pix U-Net generator (instance norms, transposed convs) at 64x64 and an xLSTM
matrix-memory cell over 16 steps; since the seventy-ninth a C3D-style 3-D CNN (3x3x3 convs, strided and (1, 2,
2)-dilated) on 16 frames of 64x64.

Random weights with randomized batch-norm statistics (what compiling and quantizing cost, not accuracy).
graphopt fp32: the CLI's default pipeline (fold-bn, fold-pad, fold-constants, dce); graphopt int8: + quantize,
fold-qdq (its default width: int8s weights on AVX2 CPUs without VNNI, int8 elsewhere), calibrated on 6 random
inputs; ORT fp32 on graphopt's ONNX export of the same graph, ORT int8 its
`quantize_static` (QDQ, per channel, U8S8: its faster form on x86) on the same calibration inputs. Latency:
medians of interleaved rounds, the same thread count everywhere; ratios are time / ORT fp32's time, and int8
against ORT int8's. Errors: max |output - PyTorch fp32| / max |PyTorch fp32|.

    python benchmarks/architectures.py [--threads 2] [--runs 60] [--only deeplab,resnext] [--out PATH]
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _models() -> dict:  # noqa: C901 - one small nn.Module per architecture
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ConvNeXtBlock(nn.Module):
        def __init__(self, c: int):
            super().__init__()
            self.dw, self.ln = nn.Conv2d(c, c, 7, padding=3, groups=c), nn.LayerNorm(c, eps=1e-6)
            self.p1, self.p2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
            self.gamma = nn.Parameter(0.1 * torch.randn(c))

        def forward(self, x):
            y = self.dw(x).permute(0, 2, 3, 1)
            return x + (self.p2(F.gelu(self.p1(self.ln(y)))) * self.gamma).permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self, dims=(64, 128), depth: int = 2):
            super().__init__()
            self.stem, self.norm = nn.Conv2d(3, dims[0], 4, 4), nn.GroupNorm(1, dims[0])
            self.s1 = nn.Sequential(*[ConvNeXtBlock(dims[0]) for _ in range(depth)])
            self.down = nn.Conv2d(dims[0], dims[1], 2, 2)
            self.s2 = nn.Sequential(*[ConvNeXtBlock(dims[1]) for _ in range(depth)])
            self.head = nn.Linear(dims[1], 10)

        def forward(self, x):
            return self.head(self.s2(self.down(self.s1(self.norm(self.stem(x))))).mean((2, 3)))

    class ResNeXtBlock(nn.Module):
        def __init__(self, c: int, groups: int = 32, width: int = 4):
            super().__init__()
            m = groups * width
            self.body = nn.Sequential(
                nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                nn.Conv2d(m, m, 3, 1, 1, groups=groups, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                nn.Conv2d(m, c, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x):
            return F.relu(x + self.body(x))

    def resnext():
        return nn.Sequential(nn.Conv2d(3, 128, 3, 2, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(),
                             ResNeXtBlock(128), ResNeXtBlock(128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(128, 10))

    class DeepLab(nn.Module):
        def __init__(self, c: int = 64):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 2, 1), nn.ReLU())
            self.aspp = nn.ModuleList([nn.Conv2d(c, 16, 1)] + [nn.Conv2d(c, 16, 3, padding=d, dilation=d)
                                                               for d in (2, 4, 6)])
            self.pool, self.proj = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, 16, 1)), nn.Conv2d(80, 5, 1)

        def forward(self, x):
            y = self.stem(x)
            p = F.interpolate(self.pool(y), size=tuple(y.shape[2:]), mode="bilinear", align_corners=False)
            z = self.proj(torch.cat([F.relu(a(y)) for a in self.aspp] + [p], 1))
            return F.interpolate(z, scale_factor=2, mode="bilinear", align_corners=True)

    class Inception(nn.Module):
        def __init__(self, c: int = 288):
            super().__init__()
            self.b1 = nn.Conv2d(c, 32, 1)
            self.b2 = nn.Sequential(nn.Conv2d(c, 24, 1), nn.ReLU(), nn.Conv2d(24, 32, (1, 7), padding=(0, 3)),
                                    nn.ReLU(), nn.Conv2d(32, 32, (7, 1), padding=(3, 0)))
            self.b3 = nn.Sequential(nn.AvgPool2d(3, 1, 1), nn.Conv2d(c, 32, 1))
            self.b4 = nn.Sequential(nn.Conv2d(c, 16, 1), nn.ReLU(), nn.Conv2d(16, 32, 5, padding=2))

        def forward(self, x):
            return F.relu(torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1))

    class SwinBlock(nn.Module):
        def __init__(self, c: int, window: int = 4, heads: int = 2, shift: int = 2):
            super().__init__()
            self.ws, self.h, self.shift = window, heads, shift
            self.n1, self.qkv, self.proj = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.n2, self.mlp = nn.LayerNorm(c), nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
            self.bias = nn.Parameter(0.1 * torch.randn(heads, window * window, window * window))

        def forward(self, x):  # x [B, H, W, C]
            b, h, w, c = x.shape
            ws, t = self.ws, self.ws * self.ws
            y = torch.roll(self.n1(x), (-self.shift, -self.shift), (1, 2))
            y = y.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, t, c)
            q, k, v = self.qkv(y).reshape(y.shape[0], t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
            a = (q @ k.transpose(-2, -1)) * (c // self.h) ** -0.5 + self.bias
            y = (a.softmax(-1) @ v).transpose(1, 2).reshape(-1, t, c)
            y = self.proj(y).view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
            x = x + torch.roll(y, (self.shift, self.shift), (1, 2))
            return x + self.mlp(self.n2(x))

    class Swin(nn.Module):
        def __init__(self, c: int = 96):
            super().__init__()
            self.embed = nn.Conv2d(3, c, 4, 4)
            self.blocks = nn.Sequential(SwinBlock(c, shift=0), SwinBlock(c))
            self.head = nn.Linear(c, 10)

        def forward(self, x):
            return self.head(self.blocks(self.embed(x).permute(0, 2, 3, 1)).mean((1, 2)))

    class Detr(nn.Module):
        def __init__(self, d: int = 256):
            super().__init__()
            layer = nn.TransformerDecoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
            self.dec, self.queries, self.box = nn.TransformerDecoder(layer, 2), nn.Parameter(torch.randn(1, 6, d)), \
                nn.Linear(d, 4)

        def forward(self, memory):
            return self.box(self.dec(self.queries.expand(memory.shape[0], -1, -1), memory)).sigmoid()

    class Conformer(nn.Module):
        def __init__(self, d: int = 256):
            super().__init__()
            self.ln, self.pw1 = nn.LayerNorm(d), nn.Conv1d(d, 2 * d, 1)
            self.dw, self.bn = nn.Conv1d(d, d, 15, padding=7, groups=d), nn.BatchNorm1d(d)
            self.pw2 = nn.Conv1d(d, d, 1)

        def forward(self, x):  # x [B, T, D]
            y = F.glu(self.pw1(self.ln(x).transpose(1, 2)), dim=1)
            return x + self.pw2(F.silu(self.bn(self.dw(y)))).transpose(1, 2)

    class Wav2Vec(nn.Module):
        def __init__(self, d: int = 256):
            super().__init__()
            self.c0, self.gn = nn.Conv1d(1, d, 10, 5, bias=False), nn.GroupNorm(d, d)
            self.c1 = nn.Conv1d(d, d, 3, 2, bias=False)
            self.pos = nn.utils.parametrizations.weight_norm(nn.Conv1d(d, d, 16, padding=8, groups=4), dim=2)

        def forward(self, x):
            y = F.gelu(self.c1(F.gelu(self.gn(self.c0(x)))))
            return (y + F.gelu(self.pos(y)[:, :, :-1])).transpose(1, 2)

    class MobileViT(nn.Module):  # local conv, 2x2 patches unfolded into tokens, a transformer layer, folded back
        def __init__(self, c: int = 64, d: int = 96):
            super().__init__()
            self.local, self.proj, self.back = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(c, d, 1), nn.Conv2d(d, c, 1)
            self.layer = nn.TransformerEncoderLayer(d, 4, 2 * d, 0.0, batch_first=True, norm_first=True)
            self.fuse = nn.Conv2d(2 * c, c, 3, 1, 1)

        def forward(self, x):
            b, _, h, w = x.shape
            y = self.proj(F.silu(self.local(x)))
            d = y.shape[1]
            y = y.reshape(b, d, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(b * 4, h * w // 4, d)
            y = self.layer(y).reshape(b, 2, 2, h // 2, w // 2, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, h, w)
            return self.fuse(torch.cat([x, self.back(y)], 1))

    class TCN(nn.Module):  # WaveNet-style: dilated causal conv1d pairs, gated tanh x sigmoid, residual + skip
        def __init__(self, c: int = 64, layers: int = 8):
            super().__init__()
            self.inp, self.out = nn.Conv1d(8, c, 1), nn.Conv1d(c, 4, 1)
            self.f = nn.ModuleList([nn.Conv1d(c, c, 3, dilation=2 ** i) for i in range(layers)])
            self.g = nn.ModuleList([nn.Conv1d(c, c, 3, dilation=2 ** i) for i in range(layers)])
            self.r = nn.ModuleList([nn.Conv1d(c, c, 1) for _ in range(layers)])

        def forward(self, x):
            x, skip = self.inp(x), 0
            for i, (f, g, r) in enumerate(zip(self.f, self.g, self.r)):
                p = F.pad(x, (2 * 2 ** i, 0))
                h = torch.tanh(f(p)) * torch.sigmoid(g(p))
                x, skip = x + r(h), skip + h
            return self.out(F.relu(skip))

    class UNet3D(nn.Module):  # conv3d + BN + ReLU, 2x2x2 max pool, a 2x2x2 up-convolution, a 1x1x1 head
        def __init__(self, c: int = 16):
            super().__init__()
            block = lambda i, o: nn.Sequential(nn.Conv3d(i, o, 3, 1, 1), nn.BatchNorm3d(o), nn.ReLU())  # noqa: E731
            self.e1, self.e2, self.up = block(1, c), block(c, 2 * c), nn.ConvTranspose3d(2 * c, c, 2, 2)
            self.d, self.head = block(2 * c, c), nn.Conv3d(c, 3, 1)

        def forward(self, x):
            a = self.e1(x)
            return self.head(self.d(torch.cat([a, self.up(self.e2(F.max_pool3d(a, 2)))], 1)))

    class C3D(nn.Module):  # a 3-D CNN classifier: 3x3x3 convs, a (1, 2, 2) max pool, a strided and a dilated conv
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Conv3d(3, 16, 3, 1, 1), nn.BatchNorm3d(16), nn.ReLU(), nn.MaxPool3d((1, 2, 2)),
                                   nn.Conv3d(16, 32, 3, 1, 1), nn.BatchNorm3d(32), nn.ReLU(),
                                   nn.Conv3d(32, 64, 3, 2, 1), nn.BatchNorm3d(64), nn.ReLU(),
                                   nn.Conv3d(64, 64, 3, 1, (1, 2, 2), dilation=(1, 2, 2)), nn.ReLU())
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(self.f(x).mean((2, 3, 4)))

    class R2Plus1D(nn.Module):  # video: (1, 3, 3) spatial and (3, 1, 1) temporal convs, a (1, 2, 2) average pool
        def __init__(self, c: int = 32):
            super().__init__()
            self.s, self.t = nn.Conv3d(3, c, (1, 3, 3), (1, 2, 2), (0, 1, 1)), nn.Conv3d(c, c, (3, 1, 1), 1, (1, 0, 0))
            self.bn, self.b, self.fc = nn.BatchNorm3d(c), nn.Conv3d(c, 2 * c, 3, 2, 1), nn.Linear(2 * c, 10)

        def forward(self, x):
            x = F.avg_pool3d(F.relu(self.bn(self.t(self.s(x)))), (1, 2, 2))
            return self.fc(F.relu(self.b(x)).mean((2, 3, 4)))

    def dcgan(z: int = 64, c: int = 64):  # generator: transposed convs from a 1x1 latent to 32x32
        up = lambda i, o, *a: [nn.ConvTranspose2d(i, o, 4, *a, bias=False), nn.BatchNorm2d(o), nn.ReLU()]  # noqa
        return nn.Sequential(*up(z, 4 * c, 1, 0), *up(4 * c, 2 * c, 2, 1), *up(2 * c, c, 2, 1),
                             nn.ConvTranspose2d(c, 3, 4, 2, 1), nn.Tanh())

    class GCN(nn.Module):  # two graph conv layers over a fixed graph (index_select, index_add, degree norm)
        def __init__(self, nodes: int = 2000, edges: int = 10000, d: int = 64):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.register_buffer("src", torch.randint(0, nodes, (edges,), generator=g))
            self.register_buffer("dst", torch.randint(0, nodes, (edges,), generator=g))
            self.l1, self.l2 = nn.Linear(d, d), nn.Linear(d, 8)

        def conv(self, h):
            deg = torch.zeros(h.shape[0]).index_add(0, self.dst, torch.ones(self.dst.shape[0])) + 1
            return torch.zeros_like(h).index_add(0, self.dst, h[self.src]) / deg[:, None] + h / deg[:, None]

        def forward(self, x):
            return self.l2(self.conv(F.relu(self.l1(self.conv(x)))))

    class FNet(nn.Module):  # token mixing by a 2-D FFT's real part, then an MLP
        def __init__(self, d: int = 256):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            x = self.n1(x + torch.fft.fft(torch.fft.fft(x, dim=-1), dim=-2).real)
            return self.n2(x + self.ff(x))

    class GFNet(nn.Module):  # a global filter: rfft2 over the token grid, a complex weight, irfft2; then an MLP
        def __init__(self, d: int = 384, h: int = 14):
            super().__init__()
            self.w = nn.Parameter(0.02 * torch.randn(h, h // 2 + 1, d, 2))
            self.n = nn.LayerNorm(d)
            self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):  # x [B, H, W, C]
            y = torch.fft.rfft2(self.n(x), dim=(1, 2), norm="ortho") * torch.view_as_complex(self.w)
            x = x + torch.fft.irfft2(y, s=x.shape[1:3], dim=(1, 2), norm="ortho")
            return x + self.ff(x)

    class StyleGAN2(nn.Module):  # modulated, demodulated 3x3 convs: per-sample weights, the batch in the groups
        def __init__(self, c: int = 256, w: int = 512):
            super().__init__()
            self.map = nn.Sequential(nn.Linear(c, w), nn.LeakyReLU(0.2), nn.Linear(w, w))
            self.aff = nn.ModuleList([nn.Linear(w, c) for _ in range(2)])
            self.weight = nn.ParameterList([nn.Parameter(torch.randn(c, c, 3, 3)) for _ in range(2)])

        def forward(self, x):
            b, c = x.shape[:2]
            lat = self.map(x.mean((2, 3)))
            for aff, weight in zip(self.aff, self.weight):
                wt = weight[None] * (aff(lat) + 1)[:, None, :, None, None]
                wt = wt * torch.rsqrt((wt * wt).sum(dim=(2, 3, 4)) + 1e-8)[:, :, None, None, None]
                x = F.conv2d(x.reshape(1, b * c, *x.shape[2:]), wt.reshape(b * c, c, 3, 3), padding=1, groups=b)
                x = F.leaky_relu(x.reshape(b, c, *x.shape[2:]), 0.2)
            return x

    class LinearAttention(nn.Module):  # causal linear attention (elu + 1 features): running sums of k v^T
        def __init__(self, d: int = 64):
            super().__init__()
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            q, k = F.elu(q) + 1, F.elu(k) + 1
            kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)
            z = 1 / (torch.einsum("btd,btd->bt", q, torch.cumsum(k, 1)) + 1e-6)
            return self.out(torch.einsum("btd,btde->bte", q, kv) * z[..., None])

    class Sinkhorn(nn.Module):  # entropic optimal transport between two point sets: 10 log-domain iterations
        def forward(self, x):
            a, b = x[:, :256], x[:, 256:]
            lk = -torch.cdist(a, b) ** 2 / 10.0
            u, v = torch.zeros(lk.shape[:2]), torch.zeros(lk.shape[0], lk.shape[2])
            for _ in range(10):
                u = -torch.logsumexp(lk + v[:, None, :], dim=2)
                v = -torch.logsumexp(lk + u[:, :, None], dim=1)
            return torch.exp(lk + u[:, :, None] + v[:, None, :])

    class SKUnit(nn.Module):  # selective kernel: a 3x3 and a dilated 3x3 grouped branch, softmax-weighted by channel
        def __init__(self, c=128):
            super().__init__()
            self.b1 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=4), nn.BatchNorm2d(c), nn.ReLU())
            self.b2 = nn.Sequential(nn.Conv2d(c, c, 3, padding=2, dilation=2, groups=4), nn.BatchNorm2d(c), nn.ReLU())
            self.fc, self.fcs = nn.Sequential(nn.Linear(c, 32), nn.ReLU()), nn.Linear(32, 2 * c)

        def forward(self, x):
            u1, u2 = self.b1(x), self.b2(x)
            a = torch.softmax(self.fcs(self.fc((u1 + u2).mean((2, 3)))).view(-1, 2, x.shape[1]), 1)
            return u1 * a[:, 0, :, None, None] + u2 * a[:, 1, :, None, None]

    class MBConv(nn.Module):  # EfficientNet's inverted residual: SiLU, squeeze-excite
        def __init__(self, ci, co, e, k, st):
            super().__init__()
            cm, self.res = ci * e, st == 1 and ci == co
            self.exp = nn.Sequential(nn.Conv2d(ci, cm, 1, bias=False), nn.BatchNorm2d(cm), nn.SiLU()) if e != 1 \
                else nn.Identity()
            self.dw = nn.Sequential(nn.Conv2d(cm, cm, k, st, k // 2, groups=cm, bias=False), nn.BatchNorm2d(cm),
                                    nn.SiLU())
            self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cm, max(1, ci // 4), 1), nn.SiLU(),
                                    nn.Conv2d(max(1, ci // 4), cm, 1), nn.Sigmoid())
            self.pr = nn.Sequential(nn.Conv2d(cm, co, 1, bias=False), nn.BatchNorm2d(co))

        def forward(self, x):
            y = self.dw(self.exp(x))
            y = self.pr(y * self.se(y))
            return x + y if self.res else y

    def efficientnet_b0():
        layers, ci = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()], 32
        for e, co, n, k, st in [(1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2), (6, 80, 3, 3, 2),
                                (6, 112, 3, 5, 1), (6, 192, 4, 5, 2), (6, 320, 1, 3, 1)]:
            for i in range(n):
                layers.append(MBConv(ci, co, e, k, st if i == 0 else 1))
                ci = co
        return nn.Sequential(*layers, nn.Conv2d(ci, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, 1000))

    class PNA(nn.Module):  # principal neighbourhood aggregation: mean / max / min / std over edges, degree scalers
        def __init__(self, n=2000, e=20000, f=64):
            super().__init__()
            g = torch.Generator().manual_seed(1)
            src, dst = torch.randint(0, n, (e,), generator=g), torch.randint(0, n, (e,), generator=g)
            self.register_buffer("src", src)
            self.register_buffer("dst", dst)
            self.register_buffer("deg", torch.zeros(n).index_add_(0, dst, torch.ones(e)).clamp(min=1))
            self.pre, self.post, self.n = nn.Linear(2 * f, f), nn.Linear(13 * f, f), n

        def forward(self, x):
            m = self.pre(torch.cat([x[self.src], x[self.dst]], -1))
            idx, z = self.dst[:, None].expand_as(m), torch.zeros(self.n, m.shape[1])
            mean = z.index_add(0, self.dst, m) / self.deg[:, None]
            mx = z.scatter_reduce(0, idx, m, "amax", include_self=False)
            mn = z.scatter_reduce(0, idx, m, "amin", include_self=False)
            std = torch.sqrt(torch.relu(z.index_add(0, self.dst, m * m) / self.deg[:, None] - mean * mean) + 1e-5)
            agg, sc = torch.cat([mean, mx, mn, std], -1), (torch.log(self.deg + 1) / 2.3)[:, None]
            return self.post(torch.cat([x, agg, agg * sc, agg / sc], -1))

    def sparsemax(z):
        zs = torch.sort(z, -1, descending=True).values
        cs = zs.cumsum(-1) - 1
        k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype)
        kz = (k * zs > cs).to(z.dtype).sum(-1, keepdim=True)
        return torch.clamp(z - cs.gather(-1, kz.long() - 1) / kz, min=0)

    class TabNet(nn.Module):  # TabNet's attentive transformer steps: sparsemax feature masks (a sort a row)
        def __init__(self, f=64, d=32, steps=3):
            super().__init__()
            self.att = nn.ModuleList(nn.Sequential(nn.Linear(d, f), nn.BatchNorm1d(f)) for _ in range(steps))
            self.ft = nn.ModuleList(nn.Sequential(nn.Linear(f, 4 * d), nn.BatchNorm1d(4 * d))
                                    for _ in range(steps + 1))
            self.d, self.out = d, nn.Linear(d, 3)

        def forward(self, x):
            prior, h, out = torch.ones_like(x), F.glu(self.ft[0](x))[:, self.d:], 0
            for i, att in enumerate(self.att):
                m = sparsemax(att(h) * prior)
                prior = prior * (1.3 - m)
                z = F.glu(self.ft[i + 1](x * m))
                out, h = out + F.relu(z[:, :self.d]), z[:, self.d:]
            return self.out(out)

    class MinGRU(nn.Module):  # minGRU's parallel form: a log-space scan (logcumsumexp) over the tokens
        def __init__(self, d=256, h=512):
            super().__init__()
            self.zh, self.o = nn.Linear(d, 2 * h), nn.Linear(h, d)

        def forward(self, x):
            k, hh = self.zh(x).chunk(2, -1)
            log_z, log_1mz = -F.softplus(-k), -F.softplus(k)
            log_h = torch.where(hh >= 0, torch.log(F.relu(hh) + 0.5), -F.softplus(-hh))
            a_star = torch.cumsum(log_1mz, 1)
            return self.o(torch.exp(a_star + torch.logcumsumexp(log_z + log_h - a_star, 1)))

    class DiffusionBlock(nn.Module):  # a DDPM UNet stage: GroupNorm + SiLU res block, einsum attention over pixels
        def __init__(self, c=128):
            super().__init__()
            self.n1, self.c1 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
            self.n2, self.c2 = nn.GroupNorm(8, c), nn.Conv2d(c, c, 3, padding=1)
            self.na, self.qkv, self.po = nn.GroupNorm(8, c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)
            self.temb = nn.Parameter(torch.randn(1, c, 1, 1) * 0.1)  # (the timestep's embedding, fixed here)

        def forward(self, x):
            h = x + self.c2(F.silu(self.n2(self.c1(F.silu(self.n1(x))) + self.temb)))
            b, c, hh, ww = h.shape
            q, k, v = self.qkv(self.na(h)).reshape(b, 3, c, hh * ww).unbind(1)
            a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / c ** 0.5, -1)
            return h + self.po(torch.einsum("bij,bcj->bci", a, v).reshape(b, c, hh, ww))

    class LlamaBlock(nn.Module):  # RMSNorm, rotary embeddings, grouped-query attention (repeat_interleave), SwiGLU
        def __init__(self, d=512, heads=8, kv=2, ff=1408, t=128):
            super().__init__()
            self.h, self.kv, self.hd = heads, kv, d // heads
            self.n1, self.n2 = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.rand(d) + 0.5)
            self.q, self.o = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
            self.k, self.v = nn.Linear(d, kv * self.hd, bias=False), nn.Linear(d, kv * self.hd, bias=False)
            self.g, self.u, self.dn = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False), nn.Linear(ff, d,
                                                                                                          bias=False)
            inv = 1.0 / (10000 ** (torch.arange(0, self.hd, 2).float() / self.hd))
            f = torch.outer(torch.arange(t).float(), inv)
            self.register_buffer("cos", torch.cat([f, f], -1).cos())
            self.register_buffer("sin", torch.cat([f, f], -1).sin())

        @staticmethod
        def rms(x, w):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

        def rope(self, x):
            half = x.shape[-1] // 2
            return x * self.cos + torch.cat([-x[..., half:], x[..., :half]], -1) * self.sin

        def forward(self, x):
            b, t, d = x.shape
            y = self.rms(x, self.n1)
            q = self.rope(self.q(y).view(b, t, self.h, self.hd).transpose(1, 2))
            k = self.rope(self.k(y).view(b, t, self.kv, self.hd).transpose(1, 2))
            v = self.v(y).view(b, t, self.kv, self.hd).transpose(1, 2)
            k, v = (z.repeat_interleave(self.h // self.kv, dim=1) for z in (k, v))
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
            y = self.rms(x, self.n2)
            return x + self.dn(F.silu(self.g(y)) * self.u(y))

    class ShuffleStage(nn.Module):  # ShuffleNetV2 units: channel split, depthwise branch, channel shuffle
        def __init__(self, c=116, units=3):
            super().__init__()
            b = c // 2
            self.branches = nn.ModuleList(nn.Sequential(
                nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(),
                nn.Conv2d(b, b, 3, 1, 1, groups=b, bias=False), nn.BatchNorm2d(b),
                nn.Conv2d(b, b, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU()) for _ in range(units))
            self.shuffle = nn.ChannelShuffle(2)

        def forward(self, x):
            for br in self.branches:
                a, b = x.chunk(2, 1)
                x = self.shuffle(torch.cat([a, br(b)], 1))
            return x

    class MoE(nn.Module):  # a top-2 mixture of 8 expert MLPs over 128 tokens (dense dispatch by the gate's weights)
        def __init__(self, d=256, experts=8, ff=512):
            super().__init__()
            self.gate = nn.Linear(d, experts)
            self.w1 = nn.Parameter(torch.randn(experts, d, ff) / d ** 0.5)
            self.w2 = nn.Parameter(torch.randn(experts, ff, d) / ff ** 0.5)

        def forward(self, x):  # [T, d]
            logits = self.gate(x)
            val, idx = logits.topk(2, -1)
            weights = torch.zeros_like(logits).scatter(-1, idx, torch.softmax(val, -1))
            h = F.gelu(torch.einsum("td,edf->tef", x, self.w1))
            return (torch.einsum("tef,efd->ted", h, self.w2) * weights[..., None]).sum(1)

    class Perceiver(nn.Module):  # 64 learned latents cross-attending to 1024 inputs, then a latent MLP
        def __init__(self, d=256, latents=64):
            super().__init__()
            self.lat = nn.Parameter(torch.randn(1, latents, d))
            self.att = nn.MultiheadAttention(d, 8, batch_first=True)
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            q = self.lat.expand(x.shape[0], -1, -1)
            h = self.n1(q + self.att(q, x, x, need_weights=False)[0])
            return self.n2(h + self.mlp(h))

    class Involution(nn.Module):  # involution (RedNet): per-pixel kernels from the pixel, applied through F.unfold
        def __init__(self, c=64, k=7, groups=4):
            super().__init__()
            self.k, self.g = k, groups
            self.reduce, self.span = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, k * k * groups, 1)
            self.out = nn.Conv2d(c, c, 1)

        def forward(self, x):
            b, c, h, w = x.shape
            ker = self.span(F.relu(self.reduce(x))).view(b, self.g, 1, self.k * self.k, h, w)
            cols = F.unfold(x, self.k, padding=self.k // 2).view(b, self.g, c // self.g, self.k * self.k, h, w)
            return self.out((ker * cols).sum(3).view(b, c, h, w))

    class UNetDecoder(nn.Module):  # UNet's up path: 2x2 stride-2 transposed convs, skip concats, 3x3 conv pairs
        def __init__(self, c=(256, 128, 64)):
            super().__init__()
            self.ups = nn.ModuleList(nn.ConvTranspose2d(c[i], c[i + 1], 2, 2) for i in range(len(c) - 1))
            self.convs = nn.ModuleList(nn.Sequential(
                nn.Conv2d(2 * c[i + 1], c[i + 1], 3, padding=1), nn.BatchNorm2d(c[i + 1]), nn.ReLU(),
                nn.Conv2d(c[i + 1], c[i + 1], 3, padding=1), nn.BatchNorm2d(c[i + 1]), nn.ReLU())
                for i in range(len(c) - 1))
            self.skips = nn.ModuleList(nn.Conv2d(c[0], c[i + 1], 1) for i in range(len(c) - 1))

        def forward(self, x):
            y = x
            for i, (up, conv, skip) in enumerate(zip(self.ups, self.convs, self.skips)):
                y = up(y)
                s = skip(F.interpolate(x, scale_factor=2 ** (i + 1)))  # (the encoder's feature at that scale)
                y = conv(torch.cat([y, s], 1))
            return y

    class Albert(nn.Module):  # one encoder layer's weights run 4 times (ALBERT's cross-layer sharing)
        def __init__(self, d: int = 128, h: int = 4, ff: int = 512):
            super().__init__()
            self.h, self.emb = h, nn.Linear(64, d)
            self.qkv, self.o, self.ln1 = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)
            self.ff1, self.ff2, self.ln2 = nn.Linear(d, ff), nn.Linear(ff, d), nn.LayerNorm(d)

        def forward(self, x):
            x = self.emb(x)
            b, t, d = x.shape
            for _ in range(4):
                q, k, v = self.qkv(x).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
                a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
                x = self.ln1(x + self.o(a))
                x = self.ln2(x + self.ff2(F.gelu(self.ff1(x))))
            return x

    class DenseBlock(nn.Module):  # ESRGAN's residual dense block: 5 convs over the growing concat, scaled residual
        def __init__(self, c: int = 32, g: int = 16):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(c + i * g, g if i < 4 else c, 3, padding=1) for i in range(5))

        def forward(self, x):
            feats = [x]
            for i, conv in enumerate(self.convs):
                y = conv(torch.cat(feats, 1))
                if i < 4:
                    feats.append(F.leaky_relu(y, 0.2))
            return x + 0.2 * y

    class ESRGAN(nn.Module):  # two dense blocks, a pixel-shuffle and a nearest x2 upsampling to 4x the input
        def __init__(self, c: int = 32):
            super().__init__()
            self.head, self.blocks = nn.Conv2d(3, c, 3, padding=1), nn.Sequential(DenseBlock(c), DenseBlock(c))
            self.up, self.tail = nn.Conv2d(c, 4 * c, 3, padding=1), nn.Conv2d(c, 3, 3, padding=1)

        def forward(self, x):
            f = self.head(x)
            f = f + 0.2 * self.blocks(f)
            f = F.interpolate(F.leaky_relu(F.pixel_shuffle(self.up(f), 2), 0.2), scale_factor=2, mode="nearest")
            return self.tail(f)

    class RCAB(nn.Module):  # RCAN's residual channel-attention block
        def __init__(self, c: int = 64, r: int = 16):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
            self.ca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c // r, 1), nn.ReLU(),
                                    nn.Conv2d(c // r, c, 1), nn.Sigmoid())

        def forward(self, x):
            y = self.body(x)
            return x + y * self.ca(y)

    class Pix2Pix(nn.Module):  # a 4-level U-Net generator: 4x4 stride-2 convs, instance norms, transposed convs
        def __init__(self, c: int = 16):
            super().__init__()
            ch = [3, c, 2 * c, 4 * c, 8 * c]
            self.down = nn.ModuleList(nn.Sequential(
                nn.Conv2d(ch[i], ch[i + 1], 4, 2, 1), nn.InstanceNorm2d(ch[i + 1]) if i else nn.Identity(),
                nn.LeakyReLU(0.2)) for i in range(4))
            self.up = nn.ModuleList(nn.Sequential(
                nn.ConvTranspose2d(ch[i + 1] * (1 if i == 3 else 2), ch[i] if i else c, 4, 2, 1),
                nn.InstanceNorm2d(ch[i] if i else c), nn.ReLU()) for i in range(4))
            self.out = nn.Conv2d(2 * c, 3, 3, padding=1)

        def forward(self, x):
            skips = []
            for d in self.down:
                x = d(x)
                skips.append(x)
            for i in (3, 2, 1, 0):
                x = self.up[i](x if i == 3 else torch.cat([x, skips[i]], 1))
            return torch.tanh(self.out(torch.cat([x, F.interpolate(skips[0], scale_factor=2)], 1)))

    class MLSTM(nn.Module):  # xLSTM's matrix-memory cell (exponential gates, max stabilizer) over 16 steps
        def __init__(self, d: int = 32, steps: int = 16):
            super().__init__()
            self.qkv, self.gates, self.o = nn.Linear(d, 3 * d), nn.Linear(d, 2), nn.Linear(d, d)
            self.d, self.steps = d, steps

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, -1)
            k = k / math.sqrt(self.d)
            ig, fg = self.gates(x).unbind(-1)
            mem, n, m = x.new_zeros(1, self.d, self.d), x.new_zeros(1, self.d), x.new_zeros(1)
            hs = []
            for t in range(self.steps):
                logf = F.logsigmoid(fg[:, t])
                m_new = torch.maximum(logf + m, ig[:, t])
                i, f = torch.exp(ig[:, t] - m_new), torch.exp(logf + m - m_new)
                mem = f[:, None, None] * mem + i[:, None, None] * v[:, t, :, None] * k[:, t, None, :]
                n = f[:, None] * n + i[:, None] * k[:, t]
                den = torch.maximum((n * q[:, t]).sum(-1).abs(), torch.exp(-m_new))[:, None]
                hs.append((mem @ q[:, t, :, None])[..., 0] / den)
                m = m_new
            return self.o(torch.stack(hs, 1))

    return {"convnext": lambda: (ConvNeXt(), (1, 3, 224, 224)), "resnext": lambda: (resnext(), (1, 3, 112, 112)),
            "deeplab": lambda: (DeepLab(), (1, 3, 256, 256)), "inception": lambda: (Inception(), (1, 288, 35, 35)),
            "swin": lambda: (Swin(), (1, 3, 128, 128)), "detr": lambda: (Detr(), (1, 400, 256)),
            "conformer": lambda: (Conformer(), (1, 256, 256)), "wav2vec": lambda: (Wav2Vec(), (1, 1, 16000)),
            "mobilevit": lambda: (MobileViT(), (1, 64, 32, 32)), "tcn": lambda: (TCN(), (1, 8, 2000)),
            "unet3d": lambda: (UNet3D(), (1, 1, 32, 64, 64)), "r2plus1d": lambda: (R2Plus1D(), (1, 3, 8, 112, 112)),
            "c3d": lambda: (C3D(), (1, 3, 16, 64, 64)),
            "dcgan": lambda: (dcgan(), (8, 64, 1, 1)), "gcn": lambda: (GCN(), (2000, 64)),
            "fnet": lambda: (FNet(), (1, 128, 256)), "gfnet": lambda: (GFNet(), (1, 14, 14, 384)),
            "stylegan2": lambda: (StyleGAN2(), (4, 256, 16, 16)),
            "linattn": lambda: (LinearAttention(), (1, 256, 64)), "sinkhorn": lambda: (Sinkhorn(), (1, 512, 64)),
            "sknet": lambda: (SKUnit(), (1, 128, 28, 28)), "effnet_b0": lambda: (efficientnet_b0(), (1, 3, 224, 224)),
            "pna": lambda: (PNA(), (2000, 64)), "tabnet": lambda: (TabNet(), (1024, 64)),
            "mingru": lambda: (MinGRU(), (1, 512, 256)), "ddpm": lambda: (DiffusionBlock(), (1, 128, 32, 32)),
            "llama": lambda: (LlamaBlock(), (1, 128, 512)), "shufflenet": lambda: (ShuffleStage(), (1, 116, 28, 28)),
            "moe": lambda: (MoE(), (128, 256)), "perceiver": lambda: (Perceiver(), (1, 1024, 256)),
            "involution": lambda: (Involution(), (1, 64, 28, 28)),
            "unet_dec": lambda: (UNetDecoder(), (1, 256, 28, 28)), "albert": lambda: (Albert(), (1, 64, 64)),
            "esrgan": lambda: (ESRGAN(), (1, 3, 32, 32)), "rcab": lambda: (RCAB(), (1, 64, 32, 32)),
            "pix2pix": lambda: (Pix2Pix(), (1, 3, 64, 64)), "mlstm": lambda: (MLSTM(), (1, 16, 32))}


def _rel_err(got, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(got) - ref).max() / max(1e-6, float(np.abs(ref).max())))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=60, help="timed calls per runtime over interleaved rounds")
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--out", default="benchmarks/results/architectures.json")
    args = ap.parse_args(argv)

    import torch

    import graphopt
    from graphopt.bench import (interleaved_medians, ort_quantize_static, ort_session, randomize_batch_norms,
                                reference_onnx, selected, set_threads, write_results)
    set_threads(args.threads)
    models = _models()
    names = selected(ap, args.only, models)
    work = Path(tempfile.mkdtemp(prefix="graphopt-architectures-"))
    results = []
    for name in names:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model, shape = models[name]()
        model = model.eval()
        randomize_batch_norms(model, 0.5, (0.5, 2.0))
        x = torch.randn(*shape)
        calib = [(torch.randn(*shape),) for _ in range(6)]
        g = graphopt.optimize(graphopt.trace(model, (x,)), "fold-bn,fold-pad,fold-constants,dce",
                              warn_unchanged=False)
        q = graphopt.optimize(g, "quantize,fold-qdq", data=calib, warn_unchanged=False)
        fp32 = graphopt.load(graphopt.compile(g, "llvm", output=work / f"{name}-fp32"), threads=args.threads)
        int8 = graphopt.load(graphopt.compile(q, "llvm", output=work / f"{name}-int8"), threads=args.threads)
        onnx32 = reference_onnx(g, str(work / f"{name}-onnx"))
        sess32 = ort_session(onnx32, args.threads)
        feed_name = sess32.get_inputs()[0].name
        onnx8 = ort_quantize_static(onnx32, work / f"{name}-int8.onnx", [{feed_name: c[0].numpy()} for c in calib],
                                    activations="uint8")
        sess8 = ort_session(onnx8, args.threads)
        xn = x.numpy()
        with torch.no_grad():
            ref = model(x).numpy()
        errs = {"graphopt_fp32": _rel_err(fp32(xn)[0], ref), "graphopt_int8": _rel_err(int8(xn)[0], ref),
                "ort_fp32": _rel_err(sess32.run(None, {feed_name: xn})[0], ref),
                "ort_int8": _rel_err(sess8.run(None, {feed_name: xn})[0], ref)}

        def torch_call(m=model, t=x):
            with torch.inference_mode():
                return m(t)
        calls = {"graphopt_fp32": fp32.prepared(xn), "graphopt_int8": int8.prepared(xn),
                 "ort_fp32": lambda s=sess32, f={feed_name: xn}: s.run(None, f),
                 "ort_int8": lambda s=sess8, f={feed_name: xn}: s.run(None, f), "torch": torch_call}
        lat = {k: v * 1e3 for k, v in interleaved_medians(calls, runs=args.runs).items()}
        results.append({"model": name, "input": list(shape), "macs": int(g.stats().macs),
                        **{f"{k}_ms": v for k, v in lat.items()}, "rel_err_vs_pytorch": errs,
                        "fp32_vs_ort_fp32": lat["graphopt_fp32"] / lat["ort_fp32"],
                        "int8_vs_ort_fp32": lat["graphopt_int8"] / lat["ort_fp32"],
                        "int8_vs_ort_int8": lat["graphopt_int8"] / lat["ort_int8"],
                        "int8_speedup_vs_fp32": lat["graphopt_fp32"] / lat["graphopt_int8"]})
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    print(f"{'model':10s} {'MACs':>8s} {'go fp32':>8s} {'go int8':>8s} {'ORT fp32':>9s} {'ORT int8':>9s}"
          f" {'PyTorch':>8s} {'fp32/ORT':>9s} {'int8/ORT':>9s} {'int8/ORT8':>10s} {'err fp32':>9s} {'err int8':>9s}"
          f" {'ORT8 err':>9s}   (ms, {args.threads} threads)")
    for r in results:
        e = r["rel_err_vs_pytorch"]
        print(f"{r['model']:10s} {r['macs'] / 1e6:7.0f}M {r['graphopt_fp32_ms']:8.3f} {r['graphopt_int8_ms']:8.3f}"
              f" {r['ort_fp32_ms']:9.3f} {r['ort_int8_ms']:9.3f} {r['torch_ms']:8.3f} {r['fp32_vs_ort_fp32']:9.2f}"
              f" {r['int8_vs_ort_fp32']:9.2f} {r['int8_vs_ort_int8']:10.2f} {e['graphopt_fp32']:9.1e}"
              f" {e['graphopt_int8']:9.3f} {e['ort_int8']:9.3f}")
    geo = math.exp(np.mean([math.log(r["int8_vs_ort_int8"]) for r in results])) if results else float("nan")
    print(f"geometric mean, graphopt int8 / ORT int8: {geo:.2f}")
    write_results(args.out, args.threads, args.runs, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
