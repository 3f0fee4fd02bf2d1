"""Channel dependency analysis: which channels of which tensors must be removed together.

Every tensor in the graph (activations and parameters) contributes one element per index of each of its dims:
(node, dim, index). Per-op rules couple elements that must go together (conv out channel <-> its bias <-> the next
batch norm <-> the consumer conv's input channel; both branches of an add; concat/split with offsets; flatten
into a linear in channel blocks; attention heads through reshape/permute/matmul; a grouped conv's channel
position in every group at once; a group norm's whole groups). Union-find over elements gives *units* (one
removable channel, or the channels that can only go together); units touching the same tensors form a *group*
(one layer's channels).
Elements of graph inputs and outputs, and of ops no rule understands, are *pinned*: a unit with a pinned element
is never removed, and the report says why. The dim-level coupling graph is kept as a networkx graph for printing.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.fx as fx

from graphopt.ir.graph import Graph

aten = torch.ops.aten
Elem = tuple[str, int, int]  # (node name, dim, index)

ELEMENTWISE_UNARY = {
    aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.clamp.default, aten.sigmoid.default,
    aten.gelu.default, aten.silu.default, aten.hardswish.default, aten.hardsigmoid.default, aten.tanh.default,
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.leaky_relu.default, aten.elu.default,
    aten.erf.default, aten.exp.default, aten.sqrt.default, aten.rsqrt.default, aten.neg.default, aten.abs.default,
    aten.pow.Tensor_Scalar, aten.relu_.default, aten.hardtanh_.default, aten.silu_.default, aten.log.default,
    aten.reciprocal.default, aten.type_as.default, aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar,
    aten.div.Scalar, aten.softplus.default, aten.mish.default, aten.to.device, aten.cos.default, aten.sin.default,
    aten.dropout_.default, aten.hardswish_.default,
    aten.gt.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.le.Scalar, aten.eq.Scalar, aten.ne.Scalar,
    aten.logical_not.default, aten.bitwise_not.default, aten.sign.default, aten.floor.default, aten.round.default,
}
NO_OPS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}
BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
          aten.minimum.default, aten.where.self, aten.pow.Tensor_Tensor, aten.rsub.Tensor, aten.add_.Tensor,
          aten.mul_.Tensor, aten.gt.Tensor, aten.lt.Tensor, aten.ge.Tensor, aten.le.Tensor, aten.eq.Tensor,
          aten.ne.Tensor, aten.logical_and.default, aten.logical_or.default}
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding}  # .padding: padding="same"/"valid"
CONV_TRANSPOSES = {aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
POOLS = {aten.adaptive_avg_pool2d.default, aten.avg_pool2d.default, aten.max_pool2d.default,
         aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default}
PADS = {aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
        aten.reflection_pad3d.default, aten.replication_pad1d.default, aten.replication_pad2d.default,
        aten.replication_pad3d.default}
RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.flatten.using_ints,
            aten.unflatten.int, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.squeeze.default}


def shape_of(n: Any) -> tuple[int, ...] | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    return None


@dataclass
class Unit:
    """One removable channel: every (tensor, dim, index) that goes with it."""

    elems: list[Elem]
    pinned: str = ""


@dataclass
class ChannelGroup:
    """Units over the same set of tensor dims: one layer's channels, pruned as one."""

    dims: tuple[tuple[str, int], ...]
    units: list[Unit]
    pinned: str = ""
    params: list[tuple[str, int]] = field(default_factory=list)  # (get_attr node, dim) to slice
    chain: str = ""

    @property
    def size(self) -> int:
        return len(self.units)


class ChannelAnalysis:
    """Builds units and groups for a Graph; `pins` records why dims are pinned."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.parent: dict[Elem, Elem] = {}
        self.pins: dict[tuple[str, int], str] = {}
        self.dim_graph = nx.Graph()
        self.consumers: set[tuple[str, int]] = set()   # param dims on the consuming side (for the oracle)
        self.producers: set[tuple[str, int]] = set()   # output-channel param dims other than dim 0 (for labels)
        self.coupled: set[tuple[str, int]] = set()     # dims some rule related to another tensor
        self.nodes = {n.name: n for n in graph.gm.graph.nodes}
        # a reshape that splits one dim into several (or merges several into one) can couple only one of the
        # several dims to the flat one; `levels` names which (default the outermost). Where a split's outer dim is
        # taken apart by select / unbind anyway (MultiheadAttention's packed q/k/v: linear -> unflatten(-1,
        # (3, E)) -> select q, k, v), the analysis is rebuilt coupling the next dim, strided over the outer one,
        # so the heads inside E stay removable
        self.levels: dict[str, int] = {}
        self._reshapes: dict[str, tuple[str, int, int]] = {}  # reshape node -> (node, multi dim, count) it may move
        self._build()
        while self._deepen_levels():
            self.parent.clear()
            self.pins.clear()
            self.dim_graph.clear()
            for kept in (self.consumers, self.producers, self.coupled):
                kept.clear()
            self._reshapes.clear()
            self._build()

    # ---- union-find -------------------------------------------------------------------------------------------
    def _find(self, e: Elem) -> Elem:
        root = e
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(e, e) != root:
            self.parent[e], e = root, self.parent[e]
        return root

    def _union(self, a: Elem, b: Elem) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra != rb:
            self.parent[ra] = rb

    def couple(self, a: fx.Node, da: int, b: fx.Node, db: int, offset_a: int = 0, offset_b: int = 0,
               count: int | None = None, stride_b: int = 1) -> None:
        """Couple a[da][offset_a + j] with b[db][offset_b + j * stride_b] for j in range(count)."""
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None:
            return
        da, db = da % len(sa), db % len(sb)
        n = count if count is not None else sa[da]
        for j in range(n):
            self._union((a.name, da, offset_a + j), (b.name, db, offset_b + j * stride_b))
        self.dim_graph.add_edge((a.name, da), (b.name, db))
        self.coupled |= {(a.name, da), (b.name, db)}

    def couple_blocks(self, a: fx.Node, da: int, b: fx.Node, db: int, block: int) -> None:
        """Couple a[da][i] with b[db][i*block : (i+1)*block] (flatten / head split)."""
        sa = shape_of(a)
        if sa is None:
            return
        da = da % len(sa)
        for i in range(sa[da]):
            for k in range(block):
                self._union((a.name, da, i), (b.name, db % len(shape_of(b)), i * block + k))
        self.dim_graph.add_edge((a.name, da), (b.name, db % len(shape_of(b))))
        self.coupled |= {(a.name, da), (b.name, db % len(shape_of(b)))}

    def pin(self, n: Any, dim: int | None, why: str) -> None:
        s = shape_of(n)
        if s is None:
            return
        dims = range(len(s)) if dim is None else [dim % len(s)] if s else []
        for d in dims:
            self.pins.setdefault((n.name, d), why)

    def pin_all(self, node: fx.Node, why: str) -> None:
        for a in [*node.all_input_nodes, node]:
            self.pin(a, None, why)
        for u in node.users:
            if u.target is operator.getitem:
                self.pin(u, None, why)

    # ---- rules ------------------------------------------------------------------------------------------------
    def _identity(self, a: fx.Node, b: fx.Node, skip: set[int] = frozenset()) -> None:
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None:
            return
        for d in range(min(len(sa), len(sb))):
            if d not in skip and sa[d] == sb[d]:
                self.couple(a, d, b, d)

    def _broadcast(self, a: Any, out: fx.Node) -> None:
        if not isinstance(a, fx.Node):
            return
        sa, so = shape_of(a), shape_of(out)
        if sa is None or so is None:
            return
        for k in range(1, len(sa) + 1):
            if sa[-k] == so[-k] and sa[-k] != 1:
                self.couple(a, len(sa) - k, out, len(so) - k)

    def _build(self) -> None:
        g = self.graph
        for n in g.gm.graph.nodes:
            if n.op == "placeholder":
                self.pin(n, None, "graph input")
            elif n.op == "output":
                for a in n.all_input_nodes:
                    self.pin(a, None, "graph output (the model's output shape never changes)")
            elif n.op == "call_function":
                self._rule(n)

    def _rule(self, n: fx.Node) -> None:
        t = n.target
        args = n.args
        out_shape = shape_of(n)
        if t in NO_OPS:
            return
        if t is operator.getitem:
            src = args[0]
            if isinstance(src, fx.Node) and src.target in (aten.split.Tensor, aten.split_with_sizes.default,
                                                            aten.chunk.default):
                return  # handled by the split rule
            if isinstance(src, fx.Node) and src.target is aten.unbind.int:  # timm's q, k, v = qkv.unbind(0)
                self._select(src.args[0], src.args[1] if len(src.args) > 1 else 0, n)
                return
            if isinstance(src, fx.Node) and src.target in (aten._native_batch_norm_legit_no_training.default,) \
                    and args[1] == 0:
                self._identity(src.args[0], n)
                return
            self.pin_all(n, f"getitem of {src.target}")
            return
        if t is aten.unbind.int:  # the getitems of its results are selects
            if any(u.target is not operator.getitem for u in n.users):
                self.pin_all(n, f"unbind '{n.name}' result used whole")
            return
        if out_shape is None and t not in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            self.pin_all(n, f"'{n.name}' ({t}) returns no single tensor")
            return
        if t in ELEMENTWISE_UNARY:
            self._identity(args[0], n)
        elif t in BINARY:
            for a in args[:3] if t is aten.where.self else args[:2]:
                self._broadcast(a, n)
        elif t in (aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            for a in args[:3]:
                self._broadcast(a, n)
        elif t is aten.select.int:
            self._select(args[0], args[1], n)
        elif t in CONVS or t in CONV_TRANSPOSES:
            self._conv(n)
        elif t is aten.linear.default:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else None
            self.couple(x, -1, w, 1)
            self.consumers.add((w.name, 1))
            self.couple(w, 0, n, -1)
            if isinstance(b, fx.Node):
                self.couple(b, 0, n, -1)
            self._identity(x, n, skip={len(shape_of(x)) - 1})
        elif t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            x = args[0]
            if t is aten.batch_norm.default and len(args) > 5 and args[5] is True:
                # batch statistics (BiT's weight standardization runs batch_norm(training=True) on a weight): the
                # mean and variance run over every dim but 1, so those dims cannot lose entries exactly
                for d in range(len(out_shape)):
                    if d != 1:
                        self.pin(x, d, f"'{n.name}' computes statistics over this dim (batch_norm, training)")
                        self.pin(n, d, f"'{n.name}' computes statistics over this dim (batch_norm, training)")
            self._identity(x, n)
            for p in args[1:5]:
                if isinstance(p, fx.Node):
                    self.couple(p, 0, n, 1)
        elif t is aten.group_norm.default:
            # a whole group is the removable unit: the remaining groups' statistics do not change
            x, groups = args[0], int(args[1])
            self._identity(x, n)
            for p in args[2:4]:
                if isinstance(p, fx.Node):
                    self.couple(p, 0, n, 1)
            cg = out_shape[1] // groups
            for g in range(groups):
                if cg > 1:
                    self.couple(n, 1, n, 1, offset_a=g * cg, offset_b=g * cg + 1, count=cg - 1)
        elif t is aten.layer_norm.default:
            k = len(args[1])
            rank = len(out_shape)
            self._identity(args[0], n, skip=set(range(rank - k, rank)))
            for d in range(rank - k, rank):
                self.pin(args[0], d, f"'{n.name}' normalizes over this dim (layer_norm)")
                self.pin(n, d, f"'{n.name}' normalizes over this dim (layer_norm)")
            for p in args[2:4]:
                if isinstance(p, fx.Node):
                    self.pin(p, None, f"layer_norm '{n.name}' parameter")
        elif t in PADS:
            # padding mixes values only along the padded (trailing) dims; every other dim passes through unchanged
            x = args[0]
            sx = shape_of(x)
            for d in range(len(out_shape)):
                if sx[d] == out_shape[d] and d < len(sx) - len(args[1]) // 2:
                    self.couple(x, d, n, d)
                else:
                    self.pin(x, d, f"padded by '{n.name}'")
                    self.pin(n, d, f"padded by '{n.name}'")
        elif t in REDUCTIONS:
            self._reduction(n)
        elif t in POOLS:
            x = args[0]
            rank = len(out_shape)
            for d in range(rank - (1 if "1d" in str(t) else 2)):
                self.couple(x, d, n, d)
            for d in range(rank - (1 if "1d" in str(t) else 2), rank):
                self.pin(x, d, f"pooled by '{n.name}'")
                self.pin(n, d, f"pooled by '{n.name}'")
        elif t in (aten.permute.default, aten.transpose.int, aten.t.default, aten.numpy_T.default):
            x = args[0]
            rank = len(out_shape)
            if t is aten.permute.default:
                perm = [p % rank for p in args[1]]
            elif t in (aten.t.default, aten.numpy_T.default):
                perm = list(range(rank))[::-1]
            else:
                perm = list(range(rank))
                a, b = args[1] % rank, args[2] % rank
                perm[a], perm[b] = perm[b], perm[a]
            for d_out, d_in in enumerate(perm):
                self.couple(x, d_in, n, d_out)
        elif t in RESHAPES:
            self._reshape(n)
        elif t is aten.reshape_as.default:  # x takes other's shape: x -> out as a reshape, other's dims are out's
            self._reshape(n)
            self._identity(args[1], n)
        elif t is aten.cat.default:
            self._cat(n)
        elif t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            self._split(n)
        elif t is aten.slice.Tensor:
            self._slice(n)
        elif t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            self._matmul(n)
        elif t is aten.addmm.default:  # bias + a @ b (GPT-2's Conv1D: weight [in, out])
            self._matmul(n, args[1], args[2])
            self._broadcast(args[0], n)
        elif t is aten.embedding.default:
            w, idx = args[0], args[1]
            self.couple(w, 1, n, -1)
            self.pin(w, 0, f"vocabulary of embedding '{n.name}'")
            self._identity(idx, n)
        elif t in (aten.softmax.int, aten._softmax.default, aten._log_softmax.default, aten.log_softmax.int):
            d = args[1] % len(out_shape)
            self._identity(args[0], n, skip={d})
            self.pin(args[0], d, f"'{n.name}' normalizes over this dim (softmax)")
            self.pin(n, d, f"'{n.name}' normalizes over this dim (softmax)")
        elif t is aten.scaled_dot_product_attention.default:
            self._sdpa(n)
        elif t is aten.expand.default:
            self._broadcast(args[0], n)
        elif t is aten.index.Tensor:
            self._index(n)
        else:
            self.pin_all(n, f"op {getattr(t, '__name__', t)} at '{n.name}' is not understood by the channel analysis")

    def _select(self, x: fx.Node, dim: int, n: fx.Node) -> None:
        """x[..., i, ...] (select, or one result of unbind): the dim disappears, every other dim passes through."""
        rank = len(shape_of(x))
        dim = dim % rank
        self.pin(x, dim, f"one index selected by '{n.name}'")
        for d in range(rank):
            if d != dim:
                self.couple(x, d, n, d if d < dim else d - 1)

    def _conv(self, n: fx.Node) -> None:
        x, w = n.args[0], n.args[1]
        b = n.args[2] if len(n.args) > 2 else None
        for t in (x, n):  # positions of a map are not removable (a split reaching them by `levels` must stop)
            for d in range(2, len(shape_of(t) or ())):
                self.pin(t, d, f"spatial dim of '{n.name}'")
        if n.target is aten.convolution.default:
            transposed, groups = bool(n.args[6]), n.args[8]
        else:
            transposed, groups = n.target in CONV_TRANSPOSES, n.args[6] if len(n.args) > 6 else 1
        sx, sw = shape_of(x), shape_of(w)
        if transposed:  # weight [Cin, Cout / groups, k...]: input channels on dim 0, output channels on dim 1
            if groups != 1 and (sw[0] != sx[1] or sw[0] % groups):
                self.pin_all(n, f"grouped transposed convolution '{n.name}' (groups={groups}) is pinned")
                return
            for d in range(2, len(sw)):
                self.pin(w, d, f"kernel window of '{n.name}'")
            self.couple(x, 0, n, 0)
            self.couple(x, 1, w, 0)
            if isinstance(b, fx.Node):
                self.couple(b, 0, n, 1)
            if groups == 1:
                self.consumers.add((w.name, 0))
                self.producers.add((w.name, 1))
                self.couple(w, 1, n, 1)
            elif sw[1] == 1 and groups == sx[1]:  # depthwise: channel i in -> channel i out
                self.pin(w, 1, f"per-group output width of depthwise '{n.name}'")
                self.couple(x, 1, n, 1)
            else:  # grouped: a position leaves every group at once, so the groups stay equal and `groups` holds
                cin_g, cout_g = sw[0] // groups, sw[1]
                for g in range(1, groups):
                    self.couple(x, 1, x, 1, offset_b=g * cin_g, count=cin_g)
                for g in range(groups):
                    self.couple(w, 1, n, 1, offset_b=g * cout_g, count=cout_g)
                self.consumers.add((w.name, 0))
                self.producers.add((w.name, 1))
            return
        for d in range(2, len(sw)):
            self.pin(w, d, f"kernel window of '{n.name}'")
        self.couple(x, 0, n, 0)
        self.couple(w, 0, n, 1)
        if isinstance(b, fx.Node):
            self.couple(b, 0, n, 1)
        if groups == 1:
            self.couple(x, 1, w, 1)
            self.consumers.add((w.name, 1))
        elif groups == sx[1] and sw[1] == 1 and sw[0] == sx[1]:
            self.couple(x, 1, n, 1)  # depthwise: channel i in -> channel i out
        elif sw[1] > 1 and sx[1] == groups * sw[1] and sw[0] % groups == 0:
            # grouped (ResNeXt): a channel position goes from every group at once, so the groups stay equal and
            # the conv keeps `groups`: input position j of each group <-> weight input index j; output position j
            # of group 0 <-> the same position of every other group
            cin_g, cout_g = sw[1], sw[0] // groups
            for g in range(groups):
                self.couple(x, 1, w, 1, offset_a=g * cin_g, count=cin_g)
                if g:
                    self.couple(n, 1, n, 1, offset_b=g * cout_g, count=cout_g)
            self.consumers.add((w.name, 1))
        else:
            self.pin_all(n, f"grouped convolution '{n.name}' (groups={groups}, a channel multiplier) is pinned")

    def _reduction(self, n: fx.Node) -> None:
        x = n.args[0]
        rank = len(shape_of(x))
        dims = n.args[1] if len(n.args) > 1 and n.args[1] is not None else list(range(rank))
        dims = {d % rank for d in ([dims] if isinstance(dims, int) else dims)}
        keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
        o = 0
        for d in range(rank):
            if d in dims:
                self.pin(x, d, f"reduced by '{n.name}'")
                if keep:
                    o += 1
            else:
                self.couple(x, d, n, o)
                o += 1

    def _reshape(self, n: fx.Node) -> None:
        x = n.args[0]
        sin, sout = list(shape_of(x)), list(shape_of(n))
        i = j = 0
        while i < len(sin) or j < len(sout):
            if i < len(sin) and j < len(sout) and sin[i] == sout[j]:
                self.couple(x, i, n, j)
                i, j = i + 1, j + 1
                continue
            if i < len(sin) and sin[i] == 1:
                i += 1
                continue
            if j < len(sout) and sout[j] == 1:
                j += 1
                continue
            # a block of input dims [i0, i) with the same product as output dims [j0, j)
            i0, j0 = i, j
            pin_ = math.prod(sin[i0:i + 1]) if i < len(sin) else 1
            pout = math.prod(sout[j0:j + 1]) if j < len(sout) else 1
            i, j = i + 1, j + 1
            while pin_ != pout and (i < len(sin) or j < len(sout)):
                if pin_ < pout and i < len(sin):
                    pin_ *= sin[i]
                    i += 1
                elif j < len(sout):
                    pout *= sout[j]
                    j += 1
                else:
                    break
            ins, outs = list(range(i0, i)), list(range(j0, j))
            if len(ins) > 1 and len(outs) == 1:      # merge: outer input dim maps to blocks of the flat dim
                self._couple_level(n, x, ins, n, outs[0], "merged")
            elif len(ins) == 1 and len(outs) > 1:    # split: blocks of the input dim become the outer output dim
                self._couple_level(n, n, outs, x, ins[0], "split")
            else:
                for d in ins:
                    self.pin(x, d, f"reshaped by '{n.name}'")
                for d in outs:
                    self.pin(n, d, f"reshaped by '{n.name}'")

    def _couple_level(self, n: fx.Node, multi: fx.Node, dims: list[int], flat: fx.Node, flat_dim: int,
                      verb: str) -> None:
        """Couple one of `multi`'s dims `dims` (row-major factors of `flat`'s dim flat_dim) to the flat dim: index i
        of dims[level] <-> every flat index whose coordinate there is i (a block of the inner dims, repeated over
        the outer ones). The other dims are pinned: an outer one as taken whole, an inner one as before."""
        level = min(self.levels.get(n.name, 0), len(dims) - 1)
        self._reshapes[n.name] = (multi.name, dims[level], len(dims))
        sizes = [shape_of(multi)[d] for d in dims]
        flat_index = torch.arange(math.prod(sizes)).reshape(sizes)
        fd = flat_dim % len(shape_of(flat))
        for i in range(sizes[level]):
            for k in flat_index.select(level, i).reshape(-1).tolist():
                self._union((multi.name, dims[level], i), (flat.name, fd, k))
        self.dim_graph.add_edge((multi.name, dims[level]), (flat.name, fd))
        self.coupled |= {(multi.name, dims[level]), (flat.name, fd)}
        for d in dims[:level]:
            self.pin(multi, d, f"outer dim {verb} by '{n.name}', taken apart by select / unbind")
        for d in dims[level + 1:]:
            self.pin(multi, d, f"inner dim {verb} by '{n.name}'")

    def _deepen_levels(self) -> bool:
        """After a build: move each split whose coupled dim is taken apart index by index (every unit of it meets a
        select or an unbind: q, k, v) to its next dim. Only that pin counts: a dim pinned for another reason (a
        norm over channels) moved past would make the next dim removable, and when that dim is a spatial one
        (a linear unflattened to C x H x W, a pooled map flattened into a classifier) removing its positions
        would change the computation, not shrink it."""
        pinned_roots = {self._find((name, d, i)) for (name, d), why in self.pins.items()
                        if why.startswith("one index selected by ") for i in range(shape_of(self.nodes[name])[d])}
        moved = False
        for rname, (name, d, count) in self._reshapes.items():
            level = self.levels.get(rname, 0)
            if rname == name and level + 1 < count and all(self._find((name, d, i)) in pinned_roots
                                                           for i in range(shape_of(self.nodes[name])[d])):
                self.levels[rname] = level + 1
                moved = True
        return moved

    def _cat(self, n: fx.Node) -> None:
        rank = len(shape_of(n))
        # torch.cat skips legacy empty 1-D tensors (shape (0,)) whatever the rank of the others (HF KV caches)
        tensors = [a for a in n.args[0] if not (shape_of(a) == (0,) and rank != 1)]
        dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) % rank
        off = 0
        for a in tensors:
            sa = shape_of(a)
            if sa is None or len(sa) != rank:
                self.pin_all(n, f"cat '{n.name}' of tensors of different ranks")
                return
            for d in range(rank):
                if d == dim:
                    self.couple(a, d, n, d, offset_b=off)
                else:
                    self.couple(a, d, n, d)
            off += sa[dim]

    def _split(self, n: fx.Node) -> None:
        x = n.args[0]
        sx = shape_of(x)
        dim = (n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)) % len(sx)
        off = 0
        for u in sorted(n.users, key=lambda u: u.args[1]):
            if u.target is not operator.getitem:
                self.pin_all(n, f"split '{n.name}' result used whole")
                return
        outs = {u.args[1]: u for u in n.users}
        vals = n.meta.get("val")
        for k, v in enumerate(vals):
            size = int(v.shape[dim])
            if k in outs:
                for d in range(len(sx)):
                    if d == dim:
                        self.couple(x, d, outs[k], d, offset_a=off, count=size)
                    else:
                        self.couple(x, d, outs[k], d)
            off += size

    def _slice(self, n: fx.Node) -> None:
        x = n.args[0]
        sx = shape_of(x)
        dim = (n.args[1] if len(n.args) > 1 else 0) % len(sx)
        start = n.args[2] if len(n.args) > 2 and n.args[2] is not None else 0
        step = n.args[4] if len(n.args) > 4 else 1
        start = start + sx[dim] if start < 0 else min(start, sx[dim])
        for d in range(len(sx)):
            if d != dim:
                self.couple(x, d, n, d)
        if step != 1:
            self.pin(x, dim, f"strided slice '{n.name}'")
            self.pin(n, dim, f"strided slice '{n.name}'")
            return
        self.couple(n, dim, x, dim, offset_b=start)

    def _index(self, n: fx.Node) -> None:
        """x[..., idx, ...] (advanced indexing): dims before and after one contiguous run of index tensors pass
        through (LeViT's attention_biases[:, idx] keeps its heads); indexed dims and the index tensors are pinned."""
        x, indices = n.args[0], list(n.args[1])
        sx, so = shape_of(x), shape_of(n)
        used = [d for d, ix in enumerate(indices) if ix is not None]
        for ix in indices:
            if isinstance(ix, fx.Node):
                self.pin(ix, None, f"index tensor of '{n.name}'")
        if not used or used != list(range(used[0], used[-1] + 1)) or sx is None or so is None:
            self.pin_all(n, f"indexing '{n.name}' (non-contiguous advanced indices)")
            return
        first, last = used[0], used[-1] + 1
        mid = len(so) - (len(sx) - (last - first))  # dims the broadcast index shape contributes
        for d in range(len(sx)):
            if d < first:
                self.couple(x, d, n, d)
            elif d >= last:
                self.couple(x, d, n, d - last + first + mid)
            else:
                self.pin(x, d, f"indexed by '{n.name}'")
        for d in range(first, first + mid):
            self.pin(n, d, f"indexed by '{n.name}'")

    def _matmul(self, n: fx.Node, a: fx.Node | None = None, b: fx.Node | None = None) -> None:
        a, b = (n.args[0], n.args[1]) if a is None else (a, b)
        sa, sb, so = shape_of(a), shape_of(b), shape_of(n)
        if len(sa) < 2 or len(sb) < 2:
            self.pin_all(n, f"vector matmul '{n.name}'")
            return
        self.couple(a, -1, b, -2)
        for x in (a, b):
            if x.op == "get_attr":
                self.consumers.add((x.name, len(shape_of(x)) - (1 if x is a else 2)))
        self.couple(a, -2, n, -2)
        self.couple(b, -1, n, -1)
        for k in range(3, len(so) + 1):
            for x, sx in ((a, sa), (b, sb)):
                if len(sx) >= k and sx[-k] == so[-k] and sx[-k] != 1:
                    self.couple(x, len(sx) - k, n, len(so) - k)

    def _sdpa(self, n: fx.Node) -> None:
        q, k, v = n.args[:3]
        scale_given = len(n.args) > 6 and n.args[6] is not None or n.kwargs.get("scale") is not None
        for x in (q, k, v):
            for d in range(len(shape_of(x)) - 2):
                self.couple(x, d, n, d)
        self.couple(q, -2, n, -2)
        self.couple(k, -2, v, -2)
        self.couple(v, -1, n, -1)
        self.couple(q, -1, k, -1)
        if not scale_given:
            self.pin(q, -1, f"'{n.name}' scales by 1/sqrt(head dim)")
        self.pin(k, -2, f"'{n.name}' attends over keys")
        mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
        if isinstance(mask, fx.Node):
            self._broadcast(mask, n)

    # ---- results ----------------------------------------------------------------------------------------------
    def units(self) -> list[Unit]:
        members: dict[Elem, list[Elem]] = defaultdict(list)
        for n in self.graph.gm.graph.nodes:
            s = shape_of(n)
            if s is None:
                continue
            for d, size in enumerate(s):
                for i in range(size):
                    members[self._find((n.name, d, i))].append((n.name, d, i))
        out = []
        for elems in members.values():
            why = next((self.pins[(e[0], e[1])] for e in elems if (e[0], e[1]) in self.pins), "")
            out.append(Unit(sorted(elems), why))
        return out

    def groups(self) -> list[ChannelGroup]:
        """Groups of units that involve at least one parameter (only those can be removed)."""
        by_sig: dict[tuple, list[Unit]] = defaultdict(list)
        for u in self.units():
            sig = tuple(sorted({(e[0], e[1]) for e in u.elems}))
            if not any(self.nodes[name].op == "get_attr" for name, _ in sig):
                continue
            by_sig[sig].append(u)
        groups = []
        for sig, units in by_sig.items():
            params = [(name, d) for name, d in sig if self.nodes[name].op == "get_attr"]
            pinned = next((u.pinned for u in units if u.pinned), "")
            loose = [f"{name}.dim{d}" for name, d in params if (name, d) not in self.coupled]
            if loose and not pinned:
                pinned = f"no channel rule relates {', '.join(loose)} to the rest of the graph"
            groups.append(ChannelGroup(sig, units, pinned, params, self._chain(sig)))
        order = {n.name: i for i, n in enumerate(self.graph.gm.graph.nodes)}
        groups.sort(key=lambda g: min(order[name] for name, _ in g.dims))
        return groups

    def _chain(self, sig) -> str:
        """conv1.out => bn1 => add => conv2.in: modules (and adds) in graph order, for `inspect --groups`."""
        order = {n.name: i for i, n in enumerate(self.graph.gm.graph.nodes)}
        parts: list[str] = []
        for name, d in sorted(sig, key=lambda s: order[s[0]]):
            node = self.nodes[name]
            if node.op == "get_attr":
                fqn = str(node.meta.get("source_fqn", node.target))
                module, attr = fqn.rsplit(".", 1) if "." in fqn else (fqn, "")
                users = list(node.users)
                if users and users[0].target in (aten.batch_norm.default,
                                                 aten._native_batch_norm_legit_no_training.default):
                    label = module
                elif attr == "weight" or attr == "":
                    side = ("in" if (name, d) in self.consumers else
                            "out" if d == 0 or (name, d) in self.producers else f"dim{d}")
                    label = f"{module}.{side}"
                else:
                    continue  # bias and friends follow their weight
            elif node.op == "call_function" and node.target in (aten.add.Tensor, aten.cat.default,
                                                                 aten.mul.Tensor):
                label = name
            else:
                continue
            if label not in parts:
                parts.append(label)
        return " => ".join(parts)
