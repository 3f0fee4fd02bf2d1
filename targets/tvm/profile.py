"""Per-kernel time of a built model: the Relax VM's instrument hook times every packed call (TVM 0.27 has no
VM profiler for the CPU). The hook itself costs a few microseconds per call; rankings and shares are what count."""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Sequence

import numpy as np


class CallTimes:
    """Installs the instrument hook on a Relax VM: `totals` (seconds per called function) and `calls` accumulate
    over every call of the VM until `reset()`."""

    def __init__(self, vm):
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        started: list[float] = []

        def instrument(func, symbol, before, ret, *rest):
            if before:
                started.append(time.perf_counter())
            else:
                self.totals[symbol] += time.perf_counter() - started.pop()
                self.calls[symbol] += 1
            return 0

        vm.set_instrument(instrument)

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def profile_calls(ex, inputs: Sequence[np.ndarray], runs: int = 10) -> list[dict]:
    """Run `runs` times and return [{kernel, ms_per_run, calls_per_run, share}] sorted by time, largest first."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x), dev) for x in inputs]
    vm["main"](*args)  # warm up outside the timing
    times = CallTimes(vm)
    for _ in range(runs):
        vm["main"](*args)
    whole = sum(times.totals.values()) or 1.0
    rows = [{"kernel": k, "ms_per_run": v * 1e3 / runs, "calls_per_run": times.calls[k] // runs, "share": v / whole}
            for k, v in times.totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])
