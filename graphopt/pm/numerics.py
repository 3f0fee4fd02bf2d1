"""Output comparison used by --verify-each and reports: max error, SQNR, and the per-contract verdict."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch


@dataclass
class Comparison:
    """How far `actual` is from `expected` over all outputs and batches."""

    max_abs_err: float
    max_ref: float
    sqnr_db: float
    top1: float | None = None  # [N, C] float outputs (logits): the share of rows whose argmax agrees

    def to_json(self) -> dict:
        out = {"max_abs_err": self.max_abs_err, "max_ref": self.max_ref,
               "sqnr_db": None if math.isinf(self.sqnr_db) else self.sqnr_db}
        if self.top1 is not None:
            out["top1"] = self.top1
        return out

    def __str__(self) -> str:
        sq = "inf" if math.isinf(self.sqnr_db) else f"{self.sqnr_db:.1f}"
        top1 = "" if self.top1 is None else f", argmax agreement {100 * self.top1:.0f}%"
        return f"max|err|={self.max_abs_err:.3g} (max|ref|={self.max_ref:.3g}), SQNR={sq} dB{top1}"


def _top1(expected: Sequence[Sequence[torch.Tensor]], actual: Sequence[Sequence[torch.Tensor]]) -> float | None:
    """Argmax agreement of the first output over all batches, when it is a float [N, C] (C >= 2) classifier
    output; None otherwise."""
    same = total = 0
    for exp_outs, act_outs in zip(expected, actual):
        if not exp_outs or not act_outs:
            return None
        e, a = torch.as_tensor(exp_outs[0]), torch.as_tensor(act_outs[0])
        if e.dim() != 2 or e.shape[1] < 2 or not e.is_floating_point() or e.shape != a.shape:
            return None
        same += int((e.argmax(1) == a.argmax(1)).sum())
        total += e.shape[0]
    return same / total if total else None


def accuracy(outputs: Sequence[Any], labels: Sequence[Any]) -> tuple[float, int] | None:
    """Top-1 accuracy of first outputs (one per batch: logits with classes along dim 1) against integer class ids
    (one tensor per batch; -100 positions left out), and the count it is over; None where the outputs do not take
    the labels so."""
    hits = count = 0
    for out, lab in zip(outputs, labels):
        out, lab = torch.as_tensor(out), torch.as_tensor(lab)
        if out.dim() != lab.dim() + 1 or out.shape[:1] != lab.shape[:1] or lab.is_floating_point():
            return None
        keep = lab != -100
        hits += int((out.argmax(1) == lab)[keep].sum())
        count += int(keep.sum())
    return (hits / count, count) if count else None


def compare(expected: Sequence[Sequence[torch.Tensor]], actual: Sequence[Sequence[torch.Tensor]]) -> Comparison:
    """Compare lists (batches) of output tuples; shapes must match."""
    max_err, max_ref, sig, noise = 0.0, 0.0, 0.0, 0.0
    for exp_outs, act_outs in zip(expected, actual):
        for e, a in zip(exp_outs, act_outs):
            e = torch.as_tensor(e).detach().double()
            a = torch.as_tensor(a).detach().double()
            if e.shape != a.shape:
                return Comparison(math.inf, float(e.abs().max()) if e.numel() else 0.0, -math.inf)
            if e.numel() == 0:
                continue
            d = (e - a)
            if not torch.isfinite(a).all():
                return Comparison(math.inf, float(e.abs().max()), -math.inf)
            max_err = max(max_err, float(d.abs().max()))
            max_ref = max(max_ref, float(e.abs().max()))
            sig += float((e * e).sum())
            noise += float((d * d).sum())
    if noise == 0.0:
        sqnr = math.inf
    elif sig == 0.0:
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(sig / noise)
    return Comparison(max_err, max_ref, sqnr, _top1(expected, actual))


ROUNDED_EXACT_SQNR_DB = 25.0


def within_exact(c: Comparison, rtol: float, atol: float = 1e-6, rounds: bool = False) -> bool:
    """Exact contract: error no larger than float rounding relative to the output's magnitude. `rounds` (the graph
    rounds activations onto grids): a float rounding difference can move a value a grid step there, and the steps
    add up layer by layer (fold-bn folding the bias Adds of ONNX Runtime's quantize_dynamic MobileNetV2, exact in
    float: max error 0.36 of 8.4, 28.6 dB, argmax 100%), so SQNR >= ROUNDED_EXACT_SQNR_DB passes too."""
    return c.max_abs_err <= atol + rtol * max(c.max_ref, 1.0) or (rounds and c.sqnr_db >= ROUNDED_EXACT_SQNR_DB)


def _rounding(n) -> bool:
    from graphopt.ir.quant_ops import ROUNDING_OPS
    return n.op == "call_function" and getattr(n.target, "__name__", "").split(".")[0] in ROUNDING_OPS


@torch.no_grad()
def teacher_forced(before, after, batches: Sequence[Sequence[Any]], before_outputs: Sequence[Sequence[torch.Tensor]]
                   ) -> tuple[list[tuple], list[tuple]] | None:
    """(expected, actual) per batch for a comparison of `after` with `before` (Graphs; `before_outputs` its outputs
    on `batches`) segment by segment: every activation rounding (quantize, requantize, ...) of `before` that `after`
    has too (same node name and op) takes `before`'s codes in `after`, and what is compared is the float each such
    rounding receives, plus the outputs. So each stretch of ops between two roundings is checked on the inputs the
    graph before the pass gave it, and a change anywhere still shows: in a deep quantized network a float rounding
    difference that moves a few codes a grid step early on spreads layer by layer (fold-qdq, exact but for
    rounding ties, against MobileNetV2's Q/DQ graph: 16.8 dB end to end, a handful of codes differing after the
    second layer and 90% at the last), which says nothing of the pass. None where no rounding of `before` is in
    `after`."""
    from graphopt.ir.observe import observe_outputs
    kept = {n.name: n for n in before.gm.graph.nodes if _rounding(n)}
    shared = [n.name for n in after.gm.graph.nodes
              if _rounding(n) and n.name in kept and n.target is kept[n.name].target]
    if not shared:
        return None
    feeds = {k: kept[k].args[0].name for k in shared if isinstance(kept[k].args[0], torch.fx.Node)}

    class Forced(torch.fx.Interpreter):
        """`after` with each shared rounding's input kept (`received`) and its output `before`'s codes."""

        def __init__(self, gm, codes: dict, received: dict):
            super().__init__(gm)
            self.codes, self.received = codes, received

        def run_node(self, n):
            if n.name not in self.codes:
                return super().run_node(n)
            self.received[n.name] = self.fetch_args_kwargs_from_env(n)[0][0]
            return self.codes[n.name]

    expected, actual = [], []
    for b, want in zip(batches, before_outputs):
        seen: dict = {}
        observe_outputs(before, [*shared, *feeds.values()], [tuple(before.check_inputs(b))], seen.__setitem__)
        got: dict = {}
        out = Forced(after.gm, {k: seen[k] for k in shared if k in seen}, got).run(*after.check_inputs(b))
        pairs = [(seen[feeds[k]], got[k]) for k in shared if k in feeds and feeds[k] in seen and k in got
                 and isinstance(got[k], torch.Tensor) and seen[feeds[k]].shape == got[k].shape
                 and seen[feeds[k]].is_floating_point() and got[k].is_floating_point()]
        out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        expected.append(tuple(e for e, _ in pairs) + tuple(want))
        actual.append(tuple(a for _, a in pairs) + out)
    return expected, actual
