"""graphopt's CPU schedule rules: they schedule conv / matmul / GEMV / elementwise kernels, keep the numerics of
TVM's default schedule, and leave depthwise windows to the default loop nest."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax
from tvm.s_tir import dlight as dl

import graphopt
from graphopt.targets.tvm.build import build_executable
from graphopt.targets.tvm.cpu.rules import default_cpu_rules, vector_lanes
from graphopt.targets.tvm.host import cpu_target
from graphopt.targets.tvm.lower import lower_to_relax
from graphopt.targets.tvm.tuning import fuse_for_tuning


def scheduled_functions(model, x):
    g = graphopt.trace(model.eval(), (x,))
    tgt = cpu_target()
    mod = fuse_for_tuning(lower_to_relax(g), tgt)
    with tgt:
        out = dl.ApplyDefaultSchedule(*default_cpu_rules())(mod)
    return {gv.name_hint: "tirx.is_scheduled" in f.attrs for gv, f in out.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc)}


def run(ex, x):
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](tvm.runtime.tensor(x.numpy()))
    return (out if hasattr(out, "numpy") else out[0]).numpy()


@pytest.mark.parametrize("model,shape", [
    (torch.nn.Sequential(torch.nn.Conv2d(16, 24, 1), torch.nn.ReLU6()), (1, 16, 14, 14)),
    (torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1, stride=2)), (1, 8, 15, 15)),
    (torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.GELU()), (3, 7, 64)),
    (torch.nn.Sequential(torch.nn.Linear(96, 80)), (1, 96)),
    (torch.nn.Sequential(torch.nn.Conv2d(12, 12, 3, padding=1, groups=12), torch.nn.ReLU()), (1, 12, 9, 9)),
])
def test_rules_match_default_schedule(model, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    g = graphopt.trace(model.eval(), (x,))
    fast, _, _, _ = build_executable(g, rules=True)
    plain, _, _, _ = build_executable(g, rules=False)
    np.testing.assert_allclose(run(fast, x), run(plain, x), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run(fast, x), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class _ComputedWeightLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(64, 128))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.w * 2.0)


class _ComputedWeightConv(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(32, 16, 3, 3))

    def forward(self, x):
        return torch.nn.functional.relu6(torch.nn.functional.conv2d(x, self.w * 2.0, None, 2, 1))


def test_which_kernels_get_a_rule():
    # a k x k conv with a computed weight: graphopt's conv kernels on the weight packed when the model runs
    # (test_runtime_weights has the ones that take im2col + the batched matmul)
    conv = scheduled_functions(_ComputedWeightConv(), torch.randn(1, 16, 28, 28))
    assert any(k.startswith("conv_") for k in conv) and not any(k.startswith("bmm_") for k in conv), conv
    assert not any("conv2d" in k for k in conv), conv
    head = scheduled_functions(torch.nn.Linear(128, 64), torch.randn(1, 128))  # constant weight: graphopt's GEMV
    assert any(v for k, v in head.items() if k.startswith("gemv_packed"))
    gemv = scheduled_functions(_ComputedWeightLinear(), torch.randn(1, 128))  # a computed weight: the GEMV rule
    assert any(v for k, v in gemv.items() if "matmul" in k)
    dw = scheduled_functions(torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.randn(1, 8, 16, 16))
    assert not any(v for k, v in dw.items() if "conv2d" in k)  # depthwise keeps TVM's default loop nest


def test_vector_lanes_from_cpu_features():
    assert vector_lanes(cpu_target()) in (4, 8, 16)


class _Attention(torch.nn.Module):
    def __init__(self, head: int = 16):
        super().__init__()
        self.head = head

    def forward(self, x):
        q = x.view(1, -1, 3, self.head).transpose(1, 2)  # [1, 3 heads, T, head]: picked as a view of the input
        a = torch.softmax(q @ q.transpose(-1, -2) * 0.25, -1)
        return (a @ q).transpose(1, 2).reshape(1, -1, 3 * self.head)[:, 0]  # the first token, a constant select


@pytest.mark.parametrize("tokens,head", [(13, 16), (197, 16),  # prime token counts (ViT's 197 with its class token)
                                         (1031, 256)])  # keys of 1.05 MB a head: staged one panel at a time
def test_attention_matmuls_on_odd_token_counts_get_the_rule(tokens, head):
    """Attention's batched matmuls whose rows / columns the rule cannot tile (a prime token count) run graphopt's
    batched kernel (bmm.py), where a head's keys are too large to stage in a core's L2 one panel at a time (they
    ran Relax's matmul on zero-padded operands with a cut after it: 62-78 against 91-100 GMAC/s), so every matmul
    function is scheduled (unscheduled, ViT-Ti's attention took 4 ms a layer); a constant select is a slice, not
    a take. Matches torch."""
    torch.manual_seed(0)
    x = torch.randn(1, tokens, 3 * head)
    sched = scheduled_functions(_Attention(head), x)
    assert any(k.startswith("bmm_") for k in sched), sched
    assert all(v for k, v in sched.items() if "matmul" in k), sched
    assert not any(k.startswith("take") for k in sched), sched
    assert not any(k.startswith("crop") for k in sched), sched  # no padded operands, nothing to cut
    g = graphopt.trace(_Attention(head).eval(), (x,))
    fast, _, _, _ = build_executable(g)
    np.testing.assert_allclose(run(fast, x), _Attention(head)(x).numpy(), rtol=1e-4, atol=1e-5)


class _SiluChunk(torch.nn.Module):
    """YOLO's C2f split: an activation Relax fuses with the chunk after it (one function, two outputs)."""
    def forward(self, x):
        a, b = torch.nn.functional.silu(x).chunk(2, 1)
        return a * 2.0, b


def test_elementwise_rule_schedules_functions_with_several_outputs():
    """A spatial function with two outputs (SiLU fused with a chunk) gets the elementwise rule, each output its own
    parallel vectorized loop: the rule had inlined all blocks but the last and given up on the first output, and
    TVM's default loop nest ran it serially (475 us for 96x80x80 against PyTorch's 134)."""
    x = torch.randn(1, 32, 20, 20)
    funcs = scheduled_functions(_SiluChunk(), x)
    split = [k for k in funcs if "split" in k]
    assert split and all(funcs[k] for k in split), funcs
    g = graphopt.trace(_SiluChunk().eval(), (x,))
    ex, _, _, _ = build_executable(g)
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    for got, want in zip(out, _SiluChunk()(x)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def _rule_scripts(g, part: str) -> list[str]:
    """The TVMScript of each function of graph g whose name holds `part`, as the CPU rules schedule it."""
    tgt = cpu_target()
    mod = fuse_for_tuning(lower_to_relax(g), tgt)
    with tgt:
        out = dl.ApplyDefaultSchedule(*default_cpu_rules())(mod)
    return [f.script() for gv, f in out.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and part in gv.name_hint]


class _ChannelScale(torch.nn.Module):
    """SKNet's / squeeze-excite's per-channel weights over a map: u1 * a0[c] + u2 * a1[c]."""
    def forward(self, u, a):
        return u * a[:, 0, :, None, None] + u.flip(3) * a[:, 1, :, None, None]


@pytest.mark.parametrize("c,h,w", [(128, 28, 28), (40, 7, 7), (24, 14, 14), (8, 3, 5), (16, 56, 56)])
def test_elementwise_vectors_stay_inside_a_broadcast_run(c, h, w):
    """An input broadcast over a map's pixels (a per-channel scale) is read once a vector when the vector lies
    inside one channel's run of h x w pixels: the vector width divides the run, or is the run itself where no
    width does (7x7, 14x14). Fused with the channels and cut into 32-wide vectors across 784-pixel runs the scale
    was gathered lane by lane (115 us for 128x28x28; 24 after). The build matches torch."""
    import re
    torch.manual_seed(0)
    u, a = torch.randn(1, c, h, w), torch.randn(1, 2, c)
    g = graphopt.trace(_ChannelScale().eval(), (u, a))
    texts = _rule_scripts(g, "multiply")
    assert texts
    for text in texts:
        widths = [int(v) for v in re.findall(r"T\.vectorized\(T\.int64\((\d+)\)\)", text)]
        assert widths and all((h * w) % v == 0 for v in widths), (widths, text)
    ex, _, _, _ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(u.numpy()), tvm.runtime.tensor(a.numpy()))
    got = got if hasattr(got, "numpy") else got[0]
    np.testing.assert_allclose(got.numpy(), _ChannelScale()(u, a).numpy(), rtol=1e-5, atol=1e-6)


class _FeatureConcat(torch.nn.Module):
    """Concats of computed features along the last axis: GNN aggregators (PNA: [x | mean, max, sqrt(var) |
    scaled copies]), a rotary embedding's rotated half-rows."""
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, x, y):
        if self.kind == "flat":
            return torch.cat([torch.relu(x[:, :16]), y * 2.0], -1)
        if self.kind == "flattened":  # a reshape Relax fuses after the concat: the rows' pieces found modulo 48
            return torch.cat([torch.relu(x[:, :16]), y * 2.0], -1).reshape(-1)
        if self.kind == "nested":
            agg = torch.cat([x, torch.sqrt(torch.relu(y) + 1e-5)], -1)
            return torch.cat([x, agg, agg * 0.5], -1)
        h = x.shape[-1] // 2
        return x * y + torch.cat([-x[..., h:], x[..., :h]], -1) * 0.5


@pytest.mark.parametrize("kind,shapes,pieces", [
    ("flat", ((300, 64), (300, 32)), [16, 32]),
    ("flattened", ((300, 64), (300, 32)), [16, 32]),
    ("nested", ((200, 24), (200, 24)), [24, 24, 24, 24, 24]),
    ("rope", ((1, 4, 64, 24), (64, 24)), [12, 12])])
def test_elementwise_concat_runs_one_vector_loop_per_piece(kind, shapes, pieces):
    """A concat fused with the arithmetic that computes its inputs is cut along its axis into the inputs' pieces,
    each a vectorized loop of its own: fused and cut into vectors across the pieces every lane tested which input
    it reads and loaded on its own ([16 | 32] features over 20000 rows: 2053 -> 238 us; PNA's 13 blocks of 64
    with their sqrt and scalers 4.4 -> 0.43 ms; a rotary embedding at head width 24 196 -> 43 us). The build
    matches torch."""
    import re
    torch.manual_seed(0)
    x, y = (torch.randn(*s) for s in shapes)
    model = _FeatureConcat(kind).eval()
    g = graphopt.trace(model, (x, y))
    texts = _rule_scripts(g, "concat")
    assert len(texts) == 1, texts
    loops = re.findall(r"T\.vectorized\(T\.int64\((\d+)\)(?:, T\.int64\((\d+)\))?\)", texts[0])
    widths = [int(b) - int(a) if b else int(a) for a, b in loops]  # (a piece's loop runs from its start)
    assert sorted(widths) == sorted(pieces), (widths, texts[0])
    ex, _, _, _ = build_executable(g)
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(y.numpy()))
    got = got if hasattr(got, "numpy") else got[0]
    np.testing.assert_allclose(got.numpy(), model(x, y).numpy(), rtol=1e-5, atol=1e-6)


def test_elementwise_rule_leaves_functions_of_too_many_blocks_to_tvm():
    """A long elementwise chain fused into one function (an SRU's 64-step recurrence imported from ONNX) is left to
    TVM's default loop nest: inlining its blocks had run for minutes. One block fewer still gets the rule."""
    from tvm import te

    from graphopt.targets.tvm.cpu.rules import ELEMENTWISE_MAX_BLOCKS, Elementwise

    def chain(blocks: int):
        a = te.placeholder((64,), name="a")
        t = a
        for i in range(blocks):
            t = (lambda prev: te.compute((64,), lambda j: prev[j] * 1.5 + 1.0, name=f"b{i}"))(t)
        return te.create_prim_func([a, t])
    assert Elementwise().apply(chain(ELEMENTWISE_MAX_BLOCKS + 1), cpu_target(), False) is None
    assert Elementwise().apply(chain(ELEMENTWISE_MAX_BLOCKS), cpu_target(), False) is not None
