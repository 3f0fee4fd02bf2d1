"""Pass base class, its result and context, and the registry every pass joins with @register_pass."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Sequence

import torch

from graphopt.errors import PassOptionError
from graphopt.ir.graph import Graph
from graphopt.lazy import PASS_LOADERS

log = logging.getLogger(__name__)


class Contract(str, Enum):
    """How far a pass may move the outputs: checked by --verify-each."""

    EXACT = "exact"        # equal up to float rounding (fold-bn, dce)
    BOUNDED = "bounded"    # a stated error bound, reported as SQNR (quantize)
    TRAINING = "training"  # changes outputs by design; only reported (prune + fine-tune)


@dataclass
class PassResult:
    """What a pass returns: the new graph, whether it changed, counts for the report, and why not if unchanged."""

    graph: Graph
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def reasons_by_op(reasons: dict[str, str], shown: int = 3) -> str:
    """One line of why a pass left ops alone ({op name: reason}), ops that share a reason listed together: "linear,
    linear_1, linear_2 and 33 more: input is not quantized". A reason per op had printed the same sentence 36
    times for MiniLM's linears after a dynamic quantize."""
    groups: dict[str, list[str]] = {}
    for name, why in reasons.items():
        groups.setdefault(str(why), []).append(name)
    parts = []
    for why, names in groups.items():
        head = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
        parts.append(f"{head}: {why}")
    return "; ".join(parts)


@dataclass
class PassContext:
    """What passes may use besides the graph: data, the reference, the target's cost oracle, seed, strictness."""

    data: Sequence[tuple] | None = None        # calibration / verification inputs, each a tuple of tensors
    reference: Graph | None = None             # the pipeline's input graph
    target: Any = None                         # answers cost questions: measure(op, shape, layout)
    seed: int = 0
    strict: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    def batches(self, graph: Graph, n: int = 2) -> list[tuple[torch.Tensor, ...]]:
        """The given data, or `n` seeded random batches shaped like the graph's inputs."""
        if self.data:
            return [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in self.data]
        return [graph.example_inputs(seed=self.seed + i) for i in range(n)]

    @property
    def onnx_export(self) -> bool:
        """Whether the run is for an ONNX export (optimize(target="onnx"), compile --target onnx, opt -o *.onnx):
        ONNX Runtime's kernels run the result, none of graphopt's."""
        return getattr(self.target, "name", "") == "onnx"


class Pass:
    """A named graph rewrite. Subclasses set `name`, `summary`, `contract`, `Options` and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.EXACT
    # reads and rewrites conv/linear weights as dense float tensors, so it must run before select-sparse-layout
    # turns layers into sparse ops it cannot see (the pass manager refuses the other order)
    rewrites_weights: ClassVar[bool] = False
    # verify-each tolerances: exact passes compare max error relative to the output's range; bounded ones use SQNR
    rtol: ClassVar[float] = 1e-4
    min_sqnr_db: ClassVar[float] = 30.0

    @dataclass
    class Options:
        pass

    def __init__(self, options: "Pass.Options | None" = None):
        self.options = options if options is not None else self.Options()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec_text(self) -> str:
        from graphopt.pm.pipeline import format_pass
        return format_pass(self.name, options_to_dict(self.options, only_changed=True))


_REGISTRY: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to pipelines, the CLI and `graphopt passes`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice ({_REGISTRY[cls.name].__name__}, {cls.__name__})")
    if not dataclasses.is_dataclass(cls.Options):
        raise ValueError(f"{cls.__name__}.Options must be a dataclass")
    _REGISTRY[cls.name] = cls
    return cls


def _builtin_passes() -> None:
    """Run the pass loaders the top-level package gave (`graphopt.lazy.PASS_LOADERS`): the built-in passes."""
    while PASS_LOADERS:
        PASS_LOADERS.pop(0)()


def registered_passes() -> dict[str, type[Pass]]:
    """Every registered pass: the built-in ones and any registered by the caller."""
    _builtin_passes()
    return dict(sorted(_REGISTRY.items()))


# names other tools give these rewrites (words all in the unknown name) -> what graphopt calls them; the first match
# wins, so the narrower words come first ('int4' holds a 4 but is not 2:4)
_OTHER_NAMES = (
    (("int4",), "int4 weights come from 'quantize{weights=int4}' or 'mixed-precision{candidates=int8,int4}'"),
    (("unstructured",), "unstructured magnitude pruning is 'sparsify{sparsity=0.8}'"),
    (("magnitude",), "unstructured magnitude pruning is 'sparsify{sparsity=0.8}'"),
    (("2", "4"), "2:4 (N:M) sparsity is 'sparsify-nm{n=2 m=4}'"),
    (("nm",), "2:4 (N:M) sparsity is 'sparsify-nm{n=2 m=4}'"),
    (("semi", "structured"), "2:4 (N:M) sparsity is 'sparsify-nm{n=2 m=4}'"),
    (("structured",), "structured (channel / head) pruning is 'prune-channels{ratio=0.3}'"),
    (("head",), "attention heads are pruned by 'prune-channels{heads-only=true ratio=0.3}'"),
    (("ptq",), "post-training quantization is 'quantize' (then 'fold-qdq' for int8 kernels)"),
    (("int8",), "int8 quantization is 'quantize' (then 'fold-qdq' for int8 kernels)"),
    (("distil",), "distillation is part of the training passes: 'recover' (after pruning) and 'qat'"),
    (("lottery",), "the lottery-ticket pass is 'lottery-ticket'"),
    (("layout",), "sparse layouts are chosen by 'select-sparse-layout'"),
)


def get_pass(name: str) -> type[Pass]:
    if name not in _REGISTRY:
        _builtin_passes()
    if name not in _REGISTRY:
        import difflib
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = next((f"; {meant}" for words, meant in _OTHER_NAMES if all(w in name.lower() for w in words)),
                    f"; did you mean '{close[0]}'?" if close else "")
        raise PassOptionError(f"unknown pass '{name}'{hint} (run `graphopt passes` for the list)")
    return _REGISTRY[name]


def options_to_dict(options: Any, only_changed: bool = False) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if only_changed and value == default:
            continue
        out[f.name.replace("_", "-")] = value
    return out


def describe_options(options_cls: type) -> list[tuple[str, str, str, str]]:
    """(name, type text, default text, help) of each option, for `graphopt passes` and --help."""
    import typing

    from graphopt.pm.options import type_text
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        out.append((f.name.replace("_", "-"), type_text(hints[f.name]), str(default), f.metadata.get("help", "")))
    return out
