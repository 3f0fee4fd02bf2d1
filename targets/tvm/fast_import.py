"""Import TVM's TVMScript-heavy modules quickly.

Each `@T.prim_func` in `tvm.s_tir.tensor_intrin` calls `inspect.stack()`, which, for every frame of an import
(`<frozen importlib...>` files do not exist on disk), scans all of `sys.modules`. With torch loaded that import
takes 35-50 s here. TVMScript reads only the first frames' source lines and the frame objects, so a stack that
fills code context for those frames alone gives it the same answers in well under a second.
"""
from __future__ import annotations

import inspect
import linecache
import sys
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_CONTEXT_FRAMES = 4


def _cheap_stack(context: int = 1) -> list[inspect.FrameInfo]:
    frame = sys._getframe(1)
    out = []
    depth = 0
    while frame is not None:
        code = frame.f_code
        lineno = frame.f_lineno
        lines = None
        if depth < _CONTEXT_FRAMES and context > 0:
            line = linecache.getline(code.co_filename, lineno)
            lines = [line] if line else None
        positions = inspect._get_code_position(code, frame.f_lasti) if hasattr(inspect, "_get_code_position") else None
        try:
            info = inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, lines, 0 if lines else None,
                                     positions=positions)
        except TypeError:  # Python < 3.11 has no positions
            info = inspect.FrameInfo(frame, code.co_filename, lineno, code.co_name, lines, 0 if lines else None)
        out.append(info)
        frame = frame.f_back
        depth += 1
    return out


@contextmanager
def cheap_inspect_stack():
    with _lock:
        original = inspect.stack
        inspect.stack = _cheap_stack
        try:
            yield
        finally:
            inspect.stack = original


def import_tensor_intrinsics() -> None:
    """`import tvm.s_tir.tensor_intrin` (needed by MetaSchedule and its builder) without the inspect cost."""
    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    with cheap_inspect_stack():
        import tvm.s_tir.tensor_intrin  # noqa: F401
