"""qat: quantization-aware training of a Q/DQ graph (the output of `quantize`, before `fold-qdq`).

Training runs on a copy of the graph in which every activation quantize -> dequantize pair becomes fake-quant with a
straight-through estimator and every per-channel weight dequantize reads a float shadow weight through fake-quant.
With `lsq=true` the scales are learned too (LSQ: gradient of the rounding step with respect to the scale, scaled by
1/sqrt(numel * qmax)). Afterwards the shadow weights are re-quantized into the graph's int8 storage and the learned
scales written back, so the result is the same kind of Q/DQ graph, ready for `fold-qdq`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.quant_ops import (DTYPE_RANGES, fake_quant_per_channel, fake_quant_per_tensor, pair_bounded_scales,
                                   pairs_bounded)
from graphopt.passes.distill.recover import TrainOptions
from graphopt.passes.distill.trainer import Trainer, trainer_from_ctx
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

ops = torch.ops.graphopt


class QATError(GraphoptError):
    """qat cannot run on this graph; says what to run first."""


def _weight_width(graph: Graph, dq: torch.fx.Node) -> str:
    """int4, int7, int8s or int8 for the weight behind dequantize node `dq`: the width `quantize` or
    `mixed-precision` recorded for the layer reading it (`quantize{weights=int7}` keeps depthwise convs at int8, so
    one graph mixes them), else from its stored values (per-channel symmetric quantization maps each channel's
    largest weight to the top of its range; int8 values whose pairs stay within the u8 x s8 bound are kept so)."""
    recorded = graph.meta.get("weight_bits", {})
    for user in dq.users:
        if user.name in recorded:
            return recorded[user.name]
    q = graph.get_param(dq.args[0].target)
    amax = int(q.abs().max())
    if amax <= 63:
        return "int4" if amax <= 7 else "int7"
    return "int8s" if q.dim() >= 2 and pairs_bounded(q) else "int8"


@register_pass
class QAT(Pass):
    name = "qat"
    summary = ("Quantization-aware training of a Q/DQ graph (after `quantize`): fake-quant with a straight-through "
               "estimator, optional learned scales (LSQ), distillation from the fp32 pipeline input by default.")
    contract = Contract.TRAINING
    rewrites_weights = True

    @dataclass
    class Options(TrainOptions):
        # fine-tuning a trained model: at recover's 1e-3, one epoch of int4 QAT on MobileNetV2 raised the loss
        # (3.38 -> 4.79) and left it worse than no QAT (cosine to fp32 0.42 vs 0.56); 1e-4 took it to 0.65, 0.79
        # after 3 epochs
        lr: float = field(default=1e-4, metadata={"help": "learning rate (fine-tuning a trained model: lower "
                                                          "than recover's)"})
        lsq: bool = field(default=False, metadata={"help": "learn the quantization scales too (LSQ)"})

        def validate(self) -> str:
            return self.validate_training()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        width: dict[str, str] = {}   # float shadow -> its layer's weight width
        train = graph.clone()
        g = train.gm.graph
        shadows: dict[str, tuple[str, str]] = {}   # float shadow -> (int8 param, scale param)
        act_scales: dict[str, tuple[torch.fx.Node, float]] = {}
        n_act = 0
        for node in list(g.nodes):
            if node.op != "call_function":
                continue
            if node.target is ops.dequantize_per_channel.default and node.args[0].op == "get_attr" \
                    and int(node.args[3]) == 0:
                qw, sc = node.args[0], node.args[1]
                w = (train.get_param(qw.target).float() * train.get_param(sc.target).reshape(
                    -1, *([1] * (train.get_param(qw.target).dim() - 1))))
                shadow = train.add_param(f"{qw.target}_shadow", w, before=node)
                width[shadow.target] = _weight_width(train, node)
                top = DTYPE_RANGES[width[shadow.target]][1]
                g_lsq = 1.0 / math.sqrt(w.numel() * top) if o.lsq else 0.0
                with g.inserting_before(node):
                    fq = g.call_function(fake_quant_per_channel, (shadow, sc, top, g_lsq))
                node.replace_all_uses_with(fq)
                g.erase_node(node)
                shadows[shadow.target] = (qw.target, sc.target)
            elif node.target is ops.dequantize_per_tensor.default and \
                    getattr(node.args[0], "target", None) is ops.quantize_per_tensor.default:
                qn = node.args[0]
                x, scale, zp, qmin, qmax, _ = qn.args
                lsq_g = 1.0 / math.sqrt(math.prod(x.meta["val"].shape) * qmax) if o.lsq else 0.0
                s_arg = float(scale)
                if o.lsq:
                    s_node = train.add_param(f"{qn.name}_scale", torch.tensor(float(scale)), before=node)
                    act_scales[s_node.target] = (qn, float(scale))
                    s_arg = s_node
                with g.inserting_before(node):
                    fq = g.call_function(fake_quant_per_tensor, (x, s_arg, int(zp), int(qmin), int(qmax), lsq_g))
                node.replace_all_uses_with(fq)
                g.erase_node(node)
                if not qn.users:
                    g.erase_node(qn)
                n_act += 1
        if not shadows and not n_act:
            raise QATError("qat found no quantize/dequantize ops: run `quantize` first (qat trains a Q/DQ graph)")
        train.remove_unused_params()
        train.gm.recompile()
        if not o.lsq:  # scales stay fixed: keep them out of the optimizer
            for _, sc in shadows.values():
                getattr(train.gm, sc).requires_grad_(False)
        trainer: Trainer = trainer_from_ctx(train, ctx, o.train_config(ctx.seed, "qat"), kd=o.kd)
        if not o.lsq:
            for _, sc in shadows.values():
                trainer.params.pop(sc, None)
        stats = trainer.fit()
        # write back: shadow weights re-quantized with the (possibly learned) scales, other float params copied
        with torch.no_grad():
            for shadow, (qname, sname) in shadows.items():
                w, s = train.get_param(shadow), train.get_param(sname).clamp_min(1e-12)
                top = DTYPE_RANGES[width[shadow]][1]
                if width[shadow] == "int8s":  # trained weights may pair past the bound: coarsen those channels
                    s = pair_bounded_scales(w, s)
                q = torch.clamp(torch.round(w / s.reshape(-1, *([1] * (w.dim() - 1)))), -top, top)
                graph.set_param(qname, q.to(graph.get_param(qname).dtype))
                graph.set_param(sname, s)
            for name, p in train.gm.named_parameters():
                if name in shadows or name in act_scales or not hasattr(graph.gm, name):
                    continue
                if graph.get_param(name).is_floating_point() and p.shape == graph.get_param(name).shape:
                    graph.set_param(name, p.detach())
            for sname, (qn, _) in act_scales.items():
                new = float(train.get_param(sname).abs().clamp_min(1e-12))
                for node in graph.gm.graph.nodes:
                    if node.name == qn.name:
                        node.args = (node.args[0], new, *node.args[2:])
                        for user in list(node.users):
                            if user.target is ops.dequantize_per_tensor.default:
                                user.args = (user.args[0], new, *user.args[2:])
        graph.gm.recompile()
        tops = [DTYPE_RANGES[v][1] for v in width.values()]
        stats.update(weights=len(shadows), activations=n_act, lsq=o.lsq, weight_qmax=max(tops, default=127),
                     weight_widths={v: list(width.values()).count(v) for v in sorted(set(width.values()))})
        return PassResult(graph, stats["steps"] > 0, stats)
