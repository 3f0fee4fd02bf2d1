"""TVMScript parsing of graphopt's generated kernels, once per distinct source."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=512)
def parse_kernel(source: str):
    """tvm.script.parse of a kernel's TVMScript source, cached by the source text. Parsing is most of lowering's
    time (a BSR kernel took ~0.4 s, 60% of select-sparse-layout's time per layer), and a model's layers of one shape
    share a source: MiniLM's 36 linears have 4, MobileNetV2's blocks repeat, and the float sparse kernels leave
    their stored-block count symbolic (`sparse.NNZ`) so that every layer of a shape shares one. PrimFuncs are
    immutable, so sharing the parsed one is safe."""
    import tvm
    from tvm.script import tirx as T
    return tvm.script.parse(source, extra_vars={"T": T})
