"""prune-channels: structured pruning that physically removes channels (and heads) along dependency groups.

plan_pruning() scores the units of every prunable group and picks which to remove; apply_plan() slices the
parameters, rewrites size-carrying op arguments (reshape sizes, split sizes, slice bounds, depthwise groups) and
checks every tensor came out with exactly the shape the plan predicts. The model's output shape never changes.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
import torch.fx as fx

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph
from graphopt.ir.names import matches, node_labels, unmatched_patterns
from graphopt.ir.observe import observe_outputs
from graphopt.passes.analysis.channel_groups import ChannelAnalysis, ChannelGroup, Unit, shape_of
from graphopt.passes.analysis.weights import learnable_params
from graphopt.passes.canonicalize.dce import eliminate_dead_code
from graphopt.pm.registry import Contract, Pass, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten


class PruneError(GraphoptError):
    """Pruning would produce an inconsistent graph; names the node."""


@dataclass
class PrunePlan:
    """Which units go, per group, and the analysis they came from."""

    analysis: ChannelAnalysis
    groups: list[ChannelGroup]
    remove: dict[int, list[Unit]] = field(default_factory=dict)   # group index -> units to remove

    def removed_indices(self) -> dict[tuple[str, int], set[int]]:
        out: dict[tuple[str, int], set[int]] = defaultdict(set)
        for units in self.remove.values():
            for u in units:
                for name, d, i in u.elems:
                    out[(name, d)].add(i)
        return out


# ---- importance criteria ---------------------------------------------------------------------------------------
def _slices(graph: Graph, group: ChannelGroup, unit: Unit, nodes: dict[str, fx.Node]) -> list[torch.Tensor]:
    idx = {(n, d): i for n, d, i in unit.elems}
    out = []
    for name, d in group.params:
        t = graph.get_param(nodes[name].target)
        if t.is_floating_point():
            out.append(t.select(d, idx[(name, d)]).float())
    return out


def score_units(graph: Graph, group: ChannelGroup, importance: str, grads: dict[str, torch.Tensor] | None) -> list[float]:
    """One score per unit of the group: higher means more important."""
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    if importance in ("l1", "l2", "lamp"):
        p = 1 if importance == "l1" else 2
        scores = [sum(float(s.abs().pow(p).sum()) for s in _slices(graph, group, u, nodes)) for u in group.units]
        if importance == "lamp":  # LAMP: squared magnitude over the sum of all larger ones in the group
            order = sorted(range(len(scores)), key=lambda i: scores[i])
            suffix, lamp = 0.0, [0.0] * len(scores)
            for i in reversed(order):
                suffix += scores[i]
                lamp[i] = scores[i] / suffix if suffix else 0.0
            return lamp
        return scores if p == 1 else [math.sqrt(s) for s in scores]
    if importance == "bn-scale":
        bn_weights = [name for name, d in group.params
                      if any(u.target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
                             and len(u.args) > 1 and getattr(u.args[1], "name", None) == name
                             for u in nodes[name].users)]
        if not bn_weights:
            return score_units(graph, group, "l2", grads)
        out = []
        for u in group.units:
            idx = {(n, d): i for n, d, i in u.elems}
            out.append(sum(abs(float(graph.get_param(nodes[n].target)[idx[(n, 0)]])) for n in bn_weights))
        return out
    if importance == "fpgm":  # distance to the other filters: near the geometric median means redundant
        flat = torch.stack([torch.cat([s.reshape(-1) for s in _slices(graph, group, u, nodes)]) for u in group.units])
        return torch.cdist(flat, flat).sum(1).tolist()
    if importance == "taylor":
        if not grads:
            raise PruneError("importance=taylor needs calibration data in the context (optimize(..., data=...))")
        out = []
        for u in group.units:
            idx = {(n, d): i for n, d, i in u.elems}
            total = 0.0
            for name, d in group.params:
                attr = nodes[name].target
                if attr in grads:
                    w = graph.get_param(attr)
                    total += float((w * grads[attr]).select(d, idx[(name, d)]).abs().sum())
            out.append(total)
        return out
    raise PruneError(f"unknown importance '{importance}'")


def taylor_grads(graph: Graph, batches) -> dict[str, torch.Tensor]:
    """Gradients of a label-free loss (the model's own argmax for logits, else the output's energy)."""
    gm = graph.gm
    learnable = learnable_params(graph)
    params = {n.target: learnable[n.target] for n in gm.graph.nodes if n.op == "get_attr" and n.target in learnable}
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    try:
        for b in batches:
            out = gm(*b)
            y = out[0] if isinstance(out, (tuple, list)) else out
            if y.dim() == 2 and y.shape[1] > 1:
                loss = torch.nn.functional.cross_entropy(y, y.detach().argmax(1))
            else:
                loss = y.pow(2).mean()
            loss.backward()
        return {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}
    finally:
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None


# ---- planning ---------------------------------------------------------------------------------------------------
def _protected(graph: Graph, group: ChannelGroup, patterns: list[str]) -> str:
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    for name, _ in group.dims:
        pat = matches(node_labels(nodes[name]), patterns)
        if pat:
            return f"protected by '{pat}'"
    return ""


def _n_remove(size: int, ratio: float, round_to: int) -> int:
    keep = max(round_to, size - int(math.floor(size * ratio)))
    keep = int(math.ceil(keep / round_to) * round_to) if round_to > 1 else keep
    return max(0, size - min(keep, size))


def plan_pruning(graph: Graph, ratio: float, importance: str = "l2", scope: str = "local", round_to: int = 1,
                 protect: list[str] | None = None, batches=None, heads_only: bool = False) -> PrunePlan:
    analysis = ChannelAnalysis(graph)
    groups = analysis.groups()
    plan = PrunePlan(analysis, groups)
    protect = protect or []
    grads = taylor_grads(graph, batches) if importance == "taylor" and batches else None
    candidates = []
    for gi, g in enumerate(groups):
        if not g.pinned:
            g.pinned = _protected(graph, g, protect)
        if heads_only and not g.pinned and not _is_head_group(graph, g):
            g.pinned = "heads-only"
        if g.pinned or g.size < 2:
            continue
        candidates.append((gi, g, score_units(graph, g, importance, grads)))
    if scope == "local":
        for gi, g, scores in candidates:
            k = _n_remove(g.size, ratio, round_to)
            order = sorted(range(g.size), key=lambda i: scores[i])
            plan.remove[gi] = [g.units[i] for i in order[:k]]
    else:
        pool = []
        for gi, g, scores in candidates:
            mean = sum(scores) / len(scores) or 1.0
            pool += [(s / mean, gi, i) for i, s in enumerate(scores)]
        pool.sort()
        budget = int(math.floor(ratio * len(pool)))
        taken: dict[int, list[int]] = defaultdict(list)
        sizes = {gi: g.size for gi, g, _ in candidates}
        for _, gi, i in pool:
            if budget <= 0:
                break
            if sizes[gi] - len(taken[gi]) - 1 < max(1, round_to):
                continue
            taken[gi].append(i)
            budget -= 1
        for gi, idxs in taken.items():
            g = groups[gi]
            if round_to > 1:  # keep a multiple of round_to: give back the highest-scored of the excess
                keep = g.size - len(idxs)
                excess = keep % round_to
                if excess:
                    idxs = idxs[:len(idxs) - (round_to - excess)] if len(idxs) >= round_to - excess else []
            plan.remove[gi] = [g.units[i] for i in idxs]
    return plan


def _is_head_group(graph: Graph, g: ChannelGroup) -> bool:
    """A group whose units each span several features of a projection weight (an attention head)."""
    counts = defaultdict(int)
    for name, d, _ in g.units[0].elems:
        counts[(name, d)] += 1
    return any(c > 1 for c in counts.values())


# ---- applying ---------------------------------------------------------------------------------------------------
def _keep_index(size: int, removed: set[int]) -> torch.Tensor:
    return torch.tensor([i for i in range(size) if i not in removed], dtype=torch.long)


def apply_plan(graph: Graph, plan: PrunePlan) -> dict[str, int]:
    """Slice parameters and rewrite size arguments in place; verify every shape against the plan."""
    removed = plan.removed_indices()
    if not removed:
        return {}
    expected = {}
    for n in graph.gm.graph.nodes:
        s = shape_of(n)
        if s is not None:
            expected[n.name] = tuple(size - len(removed.get((n.name, d), ())) for d, size in enumerate(s))
    old_shapes = {n.name: shape_of(n) for n in graph.gm.graph.nodes}
    sliced = 0
    for n in list(graph.gm.graph.nodes):
        if n.op == "get_attr":
            t = graph.get_param(n.target)
            new = t
            for d in range(t.dim()):
                r = removed.get((n.name, d))
                if r:
                    new = new.index_select(d, _keep_index(t.shape[d], r))
            if new is not t:
                readers = [m for m in graph.gm.graph.nodes if m.op == "get_attr" and m.target == n.target]
                if len(readers) > 1:
                    raise PruneError(f"parameter '{n.target}' is read by several nodes; cannot slice it for "
                                     f"'{n.name}' alone")
                graph.set_param(n.target, new.contiguous())
                sliced += 1
        elif n.op == "call_function":
            _rewrite_args(n, removed, old_shapes, expected)
    graph.refresh()
    for n in graph.gm.graph.nodes:
        if n.name in expected and shape_of(n) != expected[n.name]:
            raise PruneError(f"after pruning, node '{n.name}' ({n.target}) has shape {list(shape_of(n))}, "
                             f"expected {list(expected[n.name])}: the channel analysis missed a coupling here")
    return {"params_sliced": sliced}


def _rewrite_args(n: fx.Node, removed, old_shapes, expected) -> None:
    t = n.target
    args = list(n.args)
    if t in (aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default):
        if n.name in expected and expected[n.name] != old_shapes[n.name]:
            new = list(expected[n.name])
            old = list(args[1])
            # keep -1 where the original had it if that dim is unchanged
            args[1] = [o if o == -1 and i < len(new) and old_shapes[n.name][i] == new[i] else new[i]
                       for i, o in enumerate(old)] if len(old) == len(new) else new
    elif t is aten._assert_tensor_metadata.default:
        n.kwargs = {k: (None if k in ("size", "stride") else v) for k, v in n.kwargs.items()}
    elif t is aten.unflatten.int:
        d = args[1]
        out_rank = len(old_shapes[n.name])
        in_rank = len(old_shapes[args[0].name])
        k = out_rank - in_rank + 1
        d = d % in_rank
        args[2] = list(expected[n.name][d:d + k])
    elif t in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
               aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
               aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
        gi = 8 if t is aten.convolution.default else 6  # conv_transpose*(x, w, b, stride, pad, out_pad, groups, ...)
        if len(args) > gi and args[gi] != 1:
            x = args[0]
            old_c = old_shapes[x.name][1]
            if args[gi] == old_c:  # depthwise: one group per channel
                args[gi] = expected[x.name][1]
    elif t is aten.group_norm.default and n.name in expected:  # whole groups went: fewer groups, same size
        per_group = old_shapes[n.name][1] // args[1]
        args[1] = expected[n.name][1] // per_group
    elif t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
        x = args[0]
        sx = old_shapes[x.name]
        dim = (args[2] if len(args) > 2 else n.kwargs.get("dim", 0)) % len(sx)
        r = removed.get((x.name, dim), set())
        if r:
            sizes = [int(v.shape[dim]) for v in n.meta["val"]]
            new_sizes, off = [], 0
            for s in sizes:
                new_sizes.append(s - sum(1 for i in r if off <= i < off + s))
                off += s
            n.target = aten.split_with_sizes.default
            args = [x, new_sizes, dim]
            n.kwargs = {}
    elif t is aten.slice.Tensor:
        x = args[0]
        sx = old_shapes[x.name]
        dim = (args[1] if len(args) > 1 else 0) % len(sx)
        r = removed.get((x.name, dim), set())
        if r:
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            start = start + sx[dim] if start < 0 else min(start, sx[dim])
            new_start = start - sum(1 for i in r if i < start)
            while len(args) < 4:
                args.append(None)
            args[2], args[3] = new_start, new_start + expected[n.name][dim]
    n.args = tuple(args)


def _activation_means(graph: Graph, wanted: set[tuple[str, int]], batches) -> dict[tuple[str, int], torch.Tensor]:
    """Per-channel means of named nodes' outputs over every dim but a channel axis, for each wanted (node, axis):
    axis 1 where a conv reads the node, -1 where a linear does (a 4-D [N, H, W, C] input of a linear, as ConvNeXt's
    blocks feed theirs, has its channels last; reading dim 1 there had indexed H and crashed)."""
    sums: dict[tuple[str, int], torch.Tensor] = {}

    def record(name: str, out: torch.Tensor) -> None:
        for node, axis in wanted:
            if node != name:
                continue
            dims = [d for d in range(out.dim()) if d != axis % out.dim()]
            m = out.float().mean(dims) if dims else out.float()
            sums[name, axis] = sums.get((name, axis), 0) + m / len(batches)

    observe_outputs(graph, {name for name, _ in wanted}, batches, record)
    return sums


def shrunk_consumers(graph: Graph, plan: PrunePlan) -> dict[str, list[tuple[fx.Node, int]]]:
    """conv/linear ops (ungrouped) that lose input channels -> [(their input node, removed channel)], in the
    unpruned graph."""
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    wanted: dict[str, list[tuple[fx.Node, int]]] = defaultdict(list)
    for units in plan.remove.values():
        for u in units:
            for name, d, i in u.elems:
                if (name, d) not in plan.analysis.consumers or d != 1:
                    continue
                for op in nodes[name].users:
                    if op.target in (aten.linear.default, aten.conv2d.default, aten.conv1d.default) \
                            and op.args[1] is nodes[name] and (len(op.args) < 7 or op.args[6] == 1):
                        wanted[op.name].append((op.args[0], i))
    return wanted


def bias_corrections(graph: Graph, plan: PrunePlan, batches) -> dict[str, torch.Tensor]:
    """For each conv/linear that loses input channels, the bias change that keeps those channels' mean
    contribution (their average activation times their weights), measured on the unpruned graph."""
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    wanted = shrunk_consumers(graph, plan)
    if not wanted:
        return {}
    def axis(op_name: str) -> int:  # the channel axis of the consumer's input
        return -1 if nodes[op_name].target is aten.linear.default else 1
    means = _activation_means(graph, {(x.name, axis(op)) for op, v in wanted.items() for x, _ in v}, batches)
    removed = plan.removed_indices()
    out = {}
    for op_name, items in wanted.items():
        op = nodes[op_name]
        w = graph.get_param(op.args[1].target).float()
        delta = torch.zeros(w.shape[0])
        for x, c in items:
            if (x.name, axis(op_name)) in means:
                delta += w[:, c].reshape(w.shape[0], -1).sum(1) * means[x.name, axis(op_name)][c]
        gone = removed.get((op.args[1].name, 0), set())  # the consumer's own outputs may be pruned as well
        out[op_name] = delta[_keep_index(len(delta), gone)] if gone else delta
    return out


def _set_bias(graph: Graph, op: fx.Node, value, suffix: str) -> None:
    """Give conv/linear `op` the bias value(old bias or None); a new parameter when it had none (no refresh)."""
    bias = op.args[2] if len(op.args) > 2 else None
    if isinstance(bias, fx.Node):
        t = graph.get_param(bias.target)
        graph.set_param(bias.target, value(t.float()).to(t.dtype))
    else:
        node = graph.add_param(f"{op.args[1].target}_{suffix}", value(None), before=op)
        args = list(op.args) + [None] * max(0, 3 - len(op.args))
        args[2] = node
        op.args = tuple(args)


def apply_bias_corrections(graph: Graph, corrections: dict[str, torch.Tensor]) -> int:
    nodes = {n.name: n for n in graph.gm.graph.nodes}
    for op_name, delta in corrections.items():
        _set_bias(graph, nodes[op_name], lambda old, d=delta: d if old is None else old + d, "bias_correction")
    graph.refresh()
    return len(corrections)


def _patches(op: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """The op's input as rows of its reduction (samples x features): im2col for conv2d, flattened for linear."""
    if op.target is aten.linear.default:
        return x.reshape(-1, x.shape[-1])
    w = op.args[1].meta["val"]
    stride, padding, dilation = (list(op.args[i]) if len(op.args) > i else d
                                 for i, d in ((3, [1, 1]), (4, [0, 0]), (5, [1, 1])))
    cols = torch.nn.functional.unfold(x, tuple(w.shape[2:]), dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def reconstruct_consumers(work: Graph, reference: Graph, plan: PrunePlan, batches) -> dict[str, float]:
    """Least-squares refit of every conv2d/linear that lost input channels (ThiNet / He et al. 2017 style): its
    weight and bias are solved so that, on the given data, its output from the pruned network's actual input matches
    the unpruned network's output at the same node (kept output channels). Consumers are refit in graph order, each
    from inputs that already pass through the refit layers before it, so errors do not compound. Returns node ->
    relative output error after the refit."""
    wanted = shrunk_consumers(reference, plan)
    removed = plan.removed_indices()
    nodes = {n.name: n for n in work.gm.graph.nodes}
    ref_nodes = {n.name: n for n in reference.gm.graph.nodes}
    order = [n.name for n in work.gm.graph.nodes if n.name in wanted]
    errors = {}
    for name in order:
        op, ref_op = nodes[name], ref_nodes[name]
        if op.target not in (aten.linear.default, aten.conv2d.default) or any(
                isinstance(a, str) for a in op.args[3:6]):
            continue
        keep_out = removed.get((ref_op.args[1].name, 0), set())
        ata = aty = None
        y_energy, rows = 0.0, 0
        for b in batches:
            got: dict[str, torch.Tensor] = {}
            observe_outputs(work, {op.args[0].name}, [b], lambda n, t: got.__setitem__("x", t))
            observe_outputs(reference, {name}, [b], lambda n, t: got.__setitem__("y", t))
            x = _patches(op, got["x"].double())
            y = got["y"].double()
            y = y.movedim(1, -1) if op.target is aten.conv2d.default else y
            y = y.reshape(-1, y.shape[-1])
            if keep_out:
                y = y[:, _keep_index(y.shape[1], keep_out)]
            x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)  # the bias column
            ata = x.t() @ x if ata is None else ata + x.t() @ x
            aty = x.t() @ y if aty is None else aty + x.t() @ y
            y_energy += float((y ** 2).sum())
            rows += x.shape[0]
        w_old = work.get_param(op.args[1].target)
        b_node = op.args[2] if len(op.args) > 2 else None
        b_old = work.get_param(b_node.target) if isinstance(b_node, fx.Node) else torch.zeros(w_old.shape[0])
        # ridge towards the pruned layer as it is: with far more rows than features this is plain least squares;
        # with few rows (a classifier fed one row per image) it stays near the original instead of interpolating
        prior = torch.cat([w_old.reshape(w_old.shape[0], -1).t(), b_old.reshape(1, -1)]).double()
        ridge = float(ata.diagonal().mean()) * (1e-6 if rows >= 2 * ata.shape[0] else ata.shape[0] / rows) + 1e-12
        sol = torch.linalg.solve(ata + ridge * torch.eye(ata.shape[0], dtype=ata.dtype), aty + ridge * prior)
        w_new = sol[:-1].t().reshape(w_old.shape).to(w_old.dtype)
        bias = sol[-1].to(w_old.dtype)
        # residual of the fit, from the normal equations: |y|^2 - 2 sol.aty + sol.ata.sol
        resid = y_energy - 2 * float((sol * aty).sum()) + float((sol * (ata @ sol)).sum())
        errors[name] = round(max(resid, 0.0) / max(y_energy, 1e-30), 6)
        work.set_param(op.args[1].target, w_new.contiguous())
        _set_bias(work, op, lambda old, b=bias: b, "bias_refit")
    work.refresh()
    return errors


@register_pass
class PruneChannels(Pass):
    name = "prune-channels"
    summary = ("Remove whole channels/heads along dependency groups (conv/linear out -> norms -> consumers' in, "
               "residual adds, concat/split, depthwise, flatten, attention heads). Output shape never changes.")
    contract = Contract.TRAINING
    rewrites_weights = True

    @dataclass
    class Options:
        ratio: Optional[float] = field(default=None, metadata={"help": "fraction of channels to remove, in (0,1)"})
        macs_reduction: Optional[float] = field(default=None, metadata={
            "help": "instead of ratio: fraction of MACs to remove, in (0,1) (global scope is searched)"})
        importance: Literal["l1", "l2", "bn-scale", "taylor", "lamp", "fpgm"] = field(
            default="l2", metadata={"help": "how channels are scored; taylor needs data"})
        scope: Literal["local", "global"] = field(default="local", metadata={
            "help": "local: the same ratio in every group; global: lowest normalized scores across groups"})
        round_to: Optional[int] = field(default=None, metadata={
            "help": "keep channel counts a multiple of this; default 8 for target onnx (ONNX Runtime's int8 convs "
                    "slow down on other counts: MobileNetV2 pruned 30% ran 1.3x slower in it at 1), else 1"})
        protect: list[str] = field(default_factory=list, metadata={
            "help": "node names or parameter names (glob) whose channels are never pruned"})
        heads_only: bool = field(default=False, metadata={"help": "prune only attention-head groups"})
        bias_correction: bool = field(default=True, metadata={
            "help": "fold each removed channel's mean activation (on the context's data) into its consumers' bias"})
        reconstruct: bool = field(default=False, metadata={
            "help": "refit each conv/linear that lost input channels by least squares so that its output matches "
                    "the unpruned graph's on the context's data (needs data; replaces bias-correction there)"})
        reconstruct_batches: int = field(default=16, metadata={"help": "batches the refit reads at most"})

        def validate(self) -> str:
            if self.ratio is None and self.macs_reduction is None:
                return "needs ratio= or macs-reduction= (e.g. prune-channels{ratio=0.3})"
            if self.ratio is not None and self.macs_reduction is not None:
                return "takes ratio= or macs-reduction=, not both"
            for key, v in (("ratio", self.ratio), ("macs-reduction", self.macs_reduction)):
                if v is not None and not 0 < v < 1:
                    return f"option '{key}' must be in (0, 1), got {v}"
            if self.round_to is not None and self.round_to < 1:
                return f"option 'round-to' must be >= 1, got {self.round_to}"
            return ""

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        for pat in unmatched_patterns(graph, o.protect):
            raise PruneError(f"prune-channels option 'protect': '{pat}' matches no node or parameter")
        batches = ctx.batches(graph) if o.importance == "taylor" else None
        if o.importance == "taylor" and not ctx.data:
            raise PruneError("prune-channels importance=taylor needs data (optimize(..., data=...) or --inputs)")
        macs0 = graph.stats().macs
        # (channel counts ONNX Runtime's int8 convs run well: multiples of 8; graphopt's own kernels take any)
        round_to = o.round_to or (8 if ctx.onnx_export else 1)
        if o.ratio is not None:
            plan = plan_pruning(graph, o.ratio, o.importance, o.scope, round_to, o.protect, batches, o.heads_only)
            reference = graph.clone() if o.bias_correction or o.reconstruct else None
            work = graph
            applied = apply_plan(work, plan)
        else:
            reference = graph.clone() if o.bias_correction or o.reconstruct else None
            work, plan, applied = self._search_macs(graph, o, batches, macs0, round_to)
        if o.reconstruct and not ctx.data:
            raise PruneError("prune-channels reconstruct=true refits layers on data: give calibration data "
                             "(optimize(..., data=...) or --inputs)")
        if o.reconstruct and plan.remove:
            applied["reconstruction_error"] = reconstruct_consumers(work, reference, plan,
                                                                    list(ctx.data)[: o.reconstruct_batches])
        elif o.bias_correction and plan.remove:
            corr = bias_corrections(reference, plan, ctx.batches(reference, n=4))
            applied["bias_corrected_ops"] = apply_bias_corrections(work, corr)
        eliminate_dead_code(work)
        groups = plan.groups
        removed_units = sum(len(v) for v in plan.remove.values())
        per_group = {groups[gi].chain or f"group{gi}": f"{groups[gi].size} -> {groups[gi].size - len(units)}"
                     for gi, units in plan.remove.items() if units}
        pinned = defaultdict(int)
        for g in groups:
            if g.pinned:
                pinned[g.pinned] += 1
        stats = {"groups": len(groups), "prunable": sum(1 for g in groups if not g.pinned),
                 "channels_removed": removed_units, "round_to": round_to, "macs_before": macs0,
                 "macs_after": work.stats().macs,
                 "removed": per_group, "pinned": dict(pinned), **applied}
        if not removed_units:
            why = "nothing to prune: every group is pinned (" + "; ".join(f"{k} x{v}" for k, v in pinned.items()) + ")" \
                if not stats["prunable"] else "the ratio removes no whole channel from any group"
            return PassResult(work, False, stats, why)
        return PassResult(work, True, stats)

    def _search_macs(self, graph: Graph, o, batches, macs0: int, round_to: int):
        target = macs0 * (1 - o.macs_reduction)
        lo, hi, best = 0.0, 0.95, None
        for _ in range(10):
            mid = (lo + hi) / 2
            work = graph.clone()
            plan = plan_pruning(work, mid, o.importance, "global", round_to, o.protect, batches, o.heads_only)
            applied = apply_plan(work, plan)
            macs = work.stats().macs
            if macs <= target:
                best, hi = (work, plan, applied), mid
            else:
                lo = mid
            if best is not None and abs(macs - target) < 0.01 * macs0:
                break
        if best is None:
            raise PruneError(f"macs-reduction={o.macs_reduction} is not reachable: the prunable groups hold too few "
                             "MACs (see the pinned groups in `graphopt inspect --groups`)")
        return best


def zero_removed_in_reference(graph: Graph, plan: PrunePlan) -> Graph:
    """The oracle: a copy of the unpruned graph in which every parameter slice of a removed channel is zero.

    A removed channel then contributes nothing where it is consumed (conv/linear input weights are zero), and a
    contracted pair (q/k features) multiplies to zero, so the pruned graph must compute exactly this.
    """
    ref = graph.clone()
    nodes = {n.name: n for n in ref.gm.graph.nodes}
    for units in plan.remove.values():
        for u in units:
            for name, d, i in u.elems:
                node = nodes[name]
                if node.op == "get_attr" and ref.get_param(node.target).is_floating_point():
                    t = ref.get_param(node.target).clone()
                    t.select(d, i).zero_()
                    ref.set_param(node.target, t)
    return ref


__all__ = ["PruneChannels", "PrunePlan", "plan_pruning", "apply_plan", "zero_removed_in_reference", "PruneError"]
