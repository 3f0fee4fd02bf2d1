"""The host CPU as a TVM target: detected micro-architecture and core count, and the TVM runtime's thread
settings graphopt defaults (`default_threads`, `unpin_workers`: run when `graphopt.targets.tvm` is imported)."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import psutil

if TYPE_CHECKING:
    from tvm.target import Target


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


def chosen_threads() -> int:
    """The thread count a report or benchmark should give every runtime when the user named none on the command
    line: the TVM_NUM_THREADS or OMP_NUM_THREADS the user set (a positive integer), else `host_cores()`. (The CLI
    had measured ONNX Runtime and PyTorch on every core while the artifact ran the user's TVM_NUM_THREADS, and the
    test suite's CLI subprocesses, one thread each by their environment, took both cores from the other worker:
    a 6 s test took 70 s beside one.)"""
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return host_cores()


def cpu_target(mcpu: "str | Target | None" = None, cores: int | None = None):
    """`Target({"kind": "llvm", "mcpu": <detected>, "num-cores": N})`. Another `mcpu` cross-compiles for that CPU
    (an LLVM CPU name, checked: a misspelt one would silently build for a generic x86-64) with all its extensions.

    This machine (`mcpu` None) also gets `mattr` turning off the extensions its CPU model has and the OS does not
    report (`host_masked`): LLVM names the CPU by its family and model, and a VM may hide some of its ISA (a Zen 4
    here showed no AVX-512 in /proc/cpuinfo, and LLVM still said znver4: every artifact graphopt built here used
    AVX-512 and could not run here). A named CPU, this one's name too, is that CPU with all of its extensions.
    A Target passes through as it is."""
    import tvm
    from tvm.target import codegen

    from graphopt.errors import TargetError
    if isinstance(mcpu, tvm.target.Target):
        return mcpu
    if mcpu is not None and mcpu != host_cpu():
        known = sorted(str(c) for c in codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm"})))
        if mcpu not in known:
            near = [c for c in known if c[:3] == mcpu[:3]] or known
            raise TargetError(f"--cpu '{mcpu}' is not a CPU LLVM knows (for example: {', '.join(near[:12])}); "
                              f"leave it out to build for this machine ({host_cpu()})")
    if mcpu is not None:
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": int(cores or host_cores())})
    spec = {"kind": "llvm", "mcpu": host_cpu(), "num-cores": int(cores or host_cores())}
    masked = host_masked()
    if masked:
        spec["mattr"] = [f"-{f}" for f in masked]
    return tvm.target.Target(spec)


@lru_cache(maxsize=None)
def host_masked() -> tuple[str, ...]:
    """The ISA_FLAGS extensions LLVM's model of this CPU (`host_cpu`) has and /proc/cpuinfo does not list: what
    the hypervisor or kernel hides, which code built for this machine must not use."""
    import tvm
    return tuple(missing_here(target_isa(tvm.target.Target({"kind": "llvm", "mcpu": host_cpu()}))))


def host_record() -> dict:
    """This CPU for a benchmark's JSON: LLVM's name and the extensions of that model the OS does not report (a
    "znver4" without AVX-512 is not the Zen 4 of another file)."""
    return {"cpu": host_cpu(), "cpu_without": list(host_masked())}


# ISA extensions graphopt's CPU code may use, LLVM's name -> the flag Linux lists in /proc/cpuinfo: graphopt's
# kernels' intrinsics and whatever LLVM picks for the CPU it builds for (for int4 nibbles it emits GFNI's
# `vgf2p8affineqb` and VBMI's `vpermt2b`, the int8 depthwise kernel VBMI's `vpermb`; an artifact built on an Ice
# Lake or newer then died on a Cascade Lake, which has AVX-512 and VNNI but neither, of an illegal instruction)
ISA_FLAGS = {"sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi2": "bmi2",
             "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
             "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avxvnni": "avx_vnni",
             "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
             "avx512vpopcntdq": "avx512_vpopcntdq", "avx512ifma": "avx512ifma", "avx512fp16": "avx512_fp16",
             "gfni": "gfni", "vaes": "vaes", "vpclmulqdq": "vpclmulqdq"}
# AMX (tile registers, int8 tile products): listed for an artifact only when an AMX kernel was built into it
# (`cpu.amx`), since an AMX CPU's VM may hide the tiles and every other kernel would still run there
AMX_FLAGS = {"amx-tile": "amx_tile", "amx-int8": "amx_int8"}


def target_isa(target) -> list[str]:
    """The extensions of ISA_FLAGS that `target`'s CPU has: what code built for it may execute."""
    from tvm.target import codegen
    return [f for f in ISA_FLAGS if codegen.llvm_cpu_has_features([f], target)]


def host_isa() -> set[str] | None:
    """ISA_FLAGS and AMX_FLAGS extensions this machine has, from /proc/cpuinfo (no LLVM: the runtime may be TVM's
    runtime alone); None where that file does not exist (not Linux)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f for f, linux in (ISA_FLAGS | AMX_FLAGS).items() if linux in flags}


def set_threads(n: int) -> None:
    """Fix the TVM runtime's thread count (it reads TVM_NUM_THREADS when its pool first starts)."""
    os.environ["TVM_NUM_THREADS"] = str(int(n))


def unpin_workers() -> None:
    """Let the OS place TVM's worker threads (unless the user set TVM_BIND_THREADS). By default TVM pins worker i
    to core i while the calling thread may run on any core; when the caller started out on a worker's core, the
    scheduler here never moved either (the kernels are short and their threads cache-hot), and every parallel
    kernel ran on one core at the speed of one thread. Measured on 2 cores, a 2-task kernel of 28 us a task: 5 of 6
    processes took 55-58 us a call with the default pinning, 14 of 14 took 29-32 us without it; whole models (5-20
    ms a call) were within noise either way (0.92-1.06x over 8 interleaved pairs). TVM reads the variable when a
    thread's pool starts (its first parallel kernel), so this runs when `graphopt.targets.tvm` is imported.
    Re-pinning a pool that had already started was tried (TVM's `runtime.config_threadpool` with every thread
    allowed on every core): threads already stuck together on one core stayed there in 3 of 5 processes."""
    os.environ.setdefault("TVM_BIND_THREADS", "0")


def default_threads() -> None:
    """Run TVM's kernels on this process's physical cores (`host_cores`), as `graphopt compile` and `bench` do,
    unless the user set TVM_NUM_THREADS or OMP_NUM_THREADS. TVM's own default is half the logical CPUs (it assumes
    two hyper-threads a core), which on a VM whose vCPUs are cores of their own is half of them: one thread on the
    2-vCPU development machine, for anyone calling `graphopt.load(...)` from Python. Runs with `unpin_workers`."""
    if "TVM_NUM_THREADS" not in os.environ and "OMP_NUM_THREADS" not in os.environ:
        os.environ["TVM_NUM_THREADS"] = str(host_cores())


def missing_here(isa: list[str]) -> list[str]:
    """The extensions in `isa` (ISA_FLAGS names) this machine lacks; empty where /proc/cpuinfo cannot tell."""
    have = host_isa()
    return [] if have is None else [f for f in isa if f not in have]
