"""Batch N for kernels written for one sample: the same loop nest run once per sample over views of the batch.

graphopt's conv kernels are generated for batch 1 (a [C, H*W] activation is the GEMM operand, no batch dim in any
index). `batch_source` turns such a kernel's TVMScript into one over N samples: each per-sample parameter becomes
a [N, ...] buffer, and the body runs inside `for n_ in T.serial(N)` on a view of sample n_ declared with the
parameter's original name and shape at offset n_ * size, so the body itself is unchanged. Weights stay shared and
stay in cache across samples; each sample's parallel loop still spreads over the cores.
"""
from __future__ import annotations

import contextlib
import math
import re

# The cores the kernels being generated run on (`samples_across`); None outside a lowering.
_CORES: int | None = None


@contextlib.contextmanager
def samples_across(cores: int):
    """Within: kernels over a batch that the cores divide split the samples between the threads (`batch_source`'s
    `across`). Each thread runs whole samples: one fork per kernel call instead of one per sample, no task
    imbalance on small maps. MobileNetV2 at batch 4, 2 threads, interleaved: 0.95-0.97x the time in a quiet
    phase of the machine, 0.84x in a busy one (ResNet-18 at batch 4: 0.99x)."""
    global _CORES
    before, _CORES = _CORES, int(cores)
    try:
        yield
    finally:
        _CORES = before


def _param(head: str, name: str) -> re.Match:
    m = re.search(rf"\b{name}: T\.Buffer\(\(([^)]*)\), \"(\w+)\"\)", head)
    if m is None:
        raise ValueError(f"kernel has no buffer parameter '{name}'")
    return m


def batch_source(src: str, n: int, per_sample: list[str], across: bool = False) -> str:
    """The kernel `src` (one @T.prim_func whose body follows its T.func_attr line) over n samples of the buffers
    named in per_sample; n == 1 returns src unchanged. `across`: the threads split the samples and each runs its
    samples' tasks in turn (the body's parallel loops made serial), for many samples of little work each (the
    groups of a grouped conv), and, inside `samples_across`, wherever the cores divide n."""
    if n == 1:
        return src
    across = across or (_CORES is not None and _CORES > 1 and n % _CORES == 0)
    head, sep, rest = src.partition("T.func_attr(")
    if not sep:
        raise ValueError("kernel source has no T.func_attr line")
    views, offsets = "", {}
    for name in per_sample:
        m = _param(head, name)
        dims = [d.strip() for d in m.group(1).split(",") if d.strip()]
        size = math.prod(int(d) for d in dims)
        head = head[:m.start()] + f'{name}_all: T.Buffer(({n}, {", ".join(dims)}), "{m.group(2)}")' + head[m.end():]
        views += (f'\n        {name} = T.decl_buffer(({", ".join(dims)},), "{m.group(2)}", data={name}_all.data, '
                  f"elem_offset=n_ * {size})")
        offsets[name] = size
    attr, nl, body = rest.partition("\n")
    for name, size in offsets.items():
        # a flat view the body declares over a per-sample buffer (`data=wp.data`: the packed pointwise kernel's
        # tail reads its weights so) starts at the sample's offset too: `.data` is the whole batch's pointer, and
        # the groups of a grouped conv (own weights per sample) all read group 0's weights there
        body = body.replace(f"data={name}.data)", f"data={name}_all.data, elem_offset=n_ * {size})")
    body = "\n".join(("    " + line) if line.strip() else line for line in body.splitlines())
    if across:
        body = body.replace("T.parallel(", "T.serial(")
    return f"{head}{sep}{attr}{nl}    for n_ in T.{'parallel' if across else 'serial'}({n}):{views}\n{body}\n"
