"""The host CPU as a TVM target: detected micro-architecture and core count."""
from __future__ import annotations

import os
from functools import lru_cache

import psutil


@lru_cache(maxsize=None)
def host_cpu() -> str:
    """LLVM's name for this CPU (e.g. 'znver3'); what `-mcpu` must be so the code runs here and uses its vectors."""
    from tvm.target import codegen
    return str(codegen.llvm_get_system_cpu())


def host_cores() -> int:
    """Physical cores we may use (respecting the process's CPU affinity)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    phys = psutil.cpu_count(logical=False) or n
    return max(1, min(n, phys))


def cpu_target(mcpu: str | None = None, cores: int | None = None):
    """`Target({"kind": "llvm", "mcpu": <detected>, "num-cores": N})`."""
    import tvm
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": int(cores or host_cores())})


def set_threads(n: int) -> None:
    """Fix the TVM runtime's thread count (it reads TVM_NUM_THREADS when its pool first starts)."""
    os.environ["TVM_NUM_THREADS"] = str(int(n))
