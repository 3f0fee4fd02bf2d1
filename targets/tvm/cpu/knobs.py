"""Kernel knobs: the choices graphopt's own CPU kernels make by rule (loop order, staging, prefetch, register and
pixel tiles, which kernel runs a depthwise or kxk conv), exposed per layer shape so that tuning measures them on this
machine instead of trusting the rule. Families: `conv1x1` and `depthwise` and `conv_kxk` (conv.py), `gemm`
(gemm.py), `qconv1x1` (int8.py).

graphopt's kernels are generated as fully scheduled TIR, which MetaSchedule cannot rewrite (it tunes the functions
no kernel takes); their knobs are tuned here instead, inside the same `Tuning` budget and database folder. An
emitter describes its layer as a `Site` (the rule's choice and the candidates) and calls
`pick(site)`, which returns the rule's choice, or the record in force under `applied(records)`, then `bind(site,
function name)`. While `collecting()`, both register in a `Collection`. `measure_in_model` times every candidate
inside the model (one build per candidate index, interleaved rounds, each site's calls timed by the VM's
instrument hook), and `tune_sites` keeps a candidate only when it beats the rule's choice by `MIN_GAIN` and, measured
again against the rule in two builds (every changed site on its rule, every one on its choice), by `CONFIRM_GAIN`,
so this machine's noise (10-30% between runs) does not pick at random. Records go to `kernel_knobs.json` in the tuning
database folder, keyed by target, kernel-source digest, family and shape: they are reused across models and runs,
and dropped when the kernels change.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

MIN_GAIN = 1.05      # a candidate replaces the rule's choice only when the rule's time / its time reaches this
CONFIRM_GAIN = 1.02  # ... and, in a second measurement of the rule against the changes alone, still reaches this
ROUNDS = 7           # interleaved rounds over the candidate builds
RUNS = 3             # model runs per build and round
DB_FILE = "kernel_knobs.json"
_now = time.perf_counter


@dataclass
class Site:
    """One tunable kernel: `family` and `key` (the shape and epilogue it was emitted for) name it; `default` is the
    rule's choice and one of `candidates`; `macs` (work per call) orders the sites."""

    family: str
    key: str
    default: dict
    candidates: list[dict]
    macs: int = 0

    @property
    def name(self) -> str:
        return f"{self.family}|{self.key}"


def knob_str(knobs: dict) -> str:
    return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(knobs.items()))


@dataclass
class Collection:
    """What one lowering registered: its sites (name -> Site) and its kernels' function names (-> site name)."""

    sites: dict[str, Site] = field(default_factory=dict)
    symbols: dict[str, str] = field(default_factory=dict)


_state: dict = {"records": {}, "collection": None}


def pick(site: Site) -> dict:
    """The knobs to emit `site` with: the applied record when there is one (and it is still a candidate), else the
    rule's choice. Registers the site while collecting."""
    col = _state["collection"]
    if col is not None and len(site.candidates) > 1:
        col.sites.setdefault(site.name, site)
    rec = _state["records"].get(site.name)
    return dict(rec) if rec is not None and rec in site.candidates else dict(site.default)


def bind(site: Site, symbol: str) -> None:
    """Tell the collection which function (the name the VM calls) runs `site`'s kernel."""
    col = _state["collection"]
    if col is not None and len(site.candidates) > 1:
        col.symbols[symbol] = site.name


@contextlib.contextmanager
def collecting():
    """Within: every kernel that picks knobs registers its site and function in the yielded Collection."""
    prev, _state["collection"] = _state["collection"], Collection()
    try:
        yield _state["collection"]
    finally:
        _state["collection"] = prev


@contextlib.contextmanager
def applied(records: dict[str, dict]):
    """Within: kernels emit with the recorded knobs (site name -> knobs) instead of the rule's."""
    prev, _state["records"] = _state["records"], dict(records)
    try:
        yield
    finally:
        _state["records"] = prev


@dataclass
class KnobSummary:
    """What knob tuning did: sites found, measured here, reused from the database, changed from the rule, and
    changes the second measurement did not confirm (those keep the rule)."""

    sites: int = 0
    measured: int = 0
    reused: int = 0
    changed: int = 0
    unconfirmed: int = 0
    stopped: str = ""
    seconds: float = 0.0
    per_site: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return dict(self.__dict__)


def _db_key(target, site: Site) -> str:
    from graphopt.targets.tvm.cpu.cost import kernels_tag
    return f"{target}|{kernels_tag()}|{site.name}"


def _load_db(folder: str | None) -> dict:
    if folder is None:
        return {}
    path = Path(folder) / DB_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        log.warning("kernel knob records %s are unreadable; measuring anew (the file is rewritten with the new "
                    "records)", path)
        return {}


def _store_db(folder: str | None, db: dict) -> None:
    if folder is None:
        return
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.targets.tvm.cpu.cost import kernels_tag
    tag = f"|{kernels_tag()}|"
    keep = {k: v for k, v in db.items() if tag in k}  # other kernels' records never apply again
    try:
        atomic_write_bytes(Path(folder) / DB_FILE, json.dumps(keep, indent=1).encode())
    except OSError as e:
        log.warning("could not write the kernel knob records %s: %s", Path(folder) / DB_FILE, e)


def measure_in_model(todo: list[Site], lower: Callable[[], object], target, inputs: list[np.ndarray],
                     base: dict[str, dict] | None = None, deadline: float | None = None, progress: bool = True,
                     rounds: int = ROUNDS, runs: int = RUNS) -> dict[str, dict[str, float]]:
    """Seconds per model run of each site's kernel calls with each of its candidates, timed inside the model: the
    model is built once per candidate index (build i: every site on its i-th candidate, sites with fewer on their
    rule's; `base` records for the others), the builds run in interleaved rounds under the VM's instrument hook,
    and a site's time is the sum of its kernel's calls (layers of one shape share the kernel). Timed alone, with
    or without the weight flushed from cache, kernels ranked differently than in the model (MobileNetV2: 8 of 16
    pointwise layers switched, and the model ran 2-5% slower), because a layer's speed depends on what the layer
    before it left in cache. Each build's turn starts with an untimed run (the first after another build's finds
    that build's data in cache), odd rounds run the builds in reverse order, and candidates are compared with the
    rule round by round (`paired_seconds`). Stops building at `deadline`; candidates not built (or whose build
    failed) get no time."""
    import tvm
    from tvm import relax

    from graphopt.targets.tvm.cpu.pipeline import build_cpu
    from graphopt.targets.tvm.profile import CallTimes
    from tqdm.auto import tqdm
    builds = []
    n_variants = max(len(s.candidates) for s in todo)
    bar = tqdm(total=n_variants, desc="kernel knobs", unit="build", disable=None if progress else True, leave=True)
    try:
        for i in range(n_variants):
            if deadline is not None and _now() > deadline:
                break
            chosen = {s.name: s.candidates[i] for s in todo if i < len(s.candidates)}
            try:
                with applied({**(base or {}), **chosen}), collecting() as col:
                    mod = lower()
                builds.append((chosen, col.symbols, build_cpu(mod, target)))
            except Exception as e:  # a candidate that does not build is not measured: its sites keep other choices
                log.warning("kernel knobs: the build with candidate %d of each layer failed (%s: %s); those "
                            "candidates are skipped", i, type(e).__name__, e)
            bar.update(1)
    finally:
        bar.close()
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in inputs]
    timers = []
    for chosen, symbols, ex in builds:
        vm = relax.VirtualMachine(ex, dev)
        vm["main"](*args)  # warm-up
        timers.append((vm, CallTimes(vm)))
    samples: dict[str, dict[str, list[float | None]]] = {}  # site -> candidate -> seconds per round
    for r in range(rounds):
        # odd rounds run the builds in reverse order, so a slow phase of the machine starting or ending inside a
        # round does not always fall on the same build (this machine's speed moves 40% between phases of seconds)
        for b in (range(len(timers)) if r % 2 == 0 else reversed(range(len(timers)))):
            vm, ct = timers[b]
            vm["main"](*args)  # untimed: the first run after another build's finds that build's data in cache
            ct.reset()
            for _ in range(runs):
                vm["main"](*args)
            chosen, symbols, _ = builds[b]
            per_site: dict[str, float] = {}
            for sym, site in symbols.items():
                if site in chosen:
                    per_site[site] = per_site.get(site, 0.0) + ct.totals.get(sym, 0.0) / runs
            for site, t in per_site.items():
                samples.setdefault(site, {}).setdefault(knob_str(chosen[site]), [None] * rounds)[r] = t
    by_name = {s.name: s for s in todo}
    return {site: paired_seconds(per_cand, knob_str(by_name[site].default)) for site, per_cand in samples.items()}


def paired_seconds(rounds: dict[str, list[float | None]], rule: str) -> dict[str, float]:
    """Each candidate's seconds from per-round samples (None where not measured): the rule's median, and for every
    other candidate the rule's median times the median over rounds of its time / the rule's time in the same round.
    The builds of one round run within a fraction of a second, so a slow phase of the machine (seconds long, up
    to 40% here) scales both sides of a round's ratio alike; the ratio of the two medians instead depended on which
    rounds the phases hit (the same int8 tile measured at 0.78x, 0.90x and 1.0x the rule in three runs). Without
    the rule's samples, plain medians."""
    def med(v):
        v = [x for x in v if x is not None]
        return float(np.median(v)) if v else None
    base = rounds.get(rule)
    out = {}
    for cand, v in rounds.items():
        pairs = [c / b for c, b in zip(v, base or []) if c is not None and b is not None and b > 0]
        out[cand] = med(base) * float(np.median(pairs)) if cand != rule and pairs else med(v)
    return {k: t for k, t in out.items() if t is not None}


def choose(site: Site, seconds: dict[str, float]) -> dict:
    """The fastest candidate when it beats the rule's choice by MIN_GAIN, else (or without the rule's time) the
    rule's choice."""
    rule = knob_str(site.default)
    if rule not in seconds:
        return dict(site.default)
    best = min(seconds, key=seconds.get)
    if seconds[rule] < MIN_GAIN * seconds[best]:
        return dict(site.default)
    return next(dict(c) for c in site.candidates if knob_str(c) == best)


Measure = Callable[[list[Site], dict[str, dict], "float | None"], dict[str, dict[str, float]]]


def tune_sites(sites: dict[str, Site], target, measure: Measure, folder: str | None = None,
               deadline: float | None = None, retune: bool = False) -> tuple[dict[str, dict], KnobSummary]:
    """Measure the sites not yet in the database with `measure(todo, records so far, deadline)` (-> site name ->
    {knob_str: seconds}; `measure_in_model` in a build) and choose; return (site name -> knobs for every site with
    a record, summary). Records are written to `folder` when given."""
    t0 = _now()
    summary = KnobSummary(sites=len(sites))
    db = _load_db(folder)
    records: dict[str, dict] = {}
    todo = []
    for name, site in sorted(sites.items(), key=lambda kv: -kv[1].macs):
        rec = db.get(_db_key(target, site))
        if rec is not None and not retune and rec.get("knobs") in site.candidates:
            records[name] = rec["knobs"]
            summary.reused += 1
            summary.per_site.append({"site": name, "rule": knob_str(site.default), "chosen": knob_str(rec["knobs"]),
                                     "us": rec.get("us", {}), "from": "database"})
        else:
            todo.append(site)
    if todo and deadline is not None and _now() > deadline:
        summary.stopped = "time budget spent"
    elif todo:
        seconds = measure(todo, dict(records), deadline)
        picked: dict[str, tuple[dict, dict[str, float]]] = {}
        for site in todo:
            times = seconds.get(site.name, {})
            if len(times) < len(site.candidates):
                summary.stopped = "time budget spent"
            if knob_str(site.default) in times:
                picked[site.name] = (choose(site, times), times)
        again = _confirm([s for s in todo if s.name in picked and picked[s.name][0] != s.default],
                         {**records, **{k: v[0] for k, v in picked.items()}}, measure, deadline)
        for site in todo:
            if site.name not in picked:
                continue
            chosen, times = picked[site.name]
            entry = {"site": site.name, "rule": knob_str(site.default), "chosen": knob_str(chosen),
                     "us": {k: round(v * 1e6, 2) for k, v in times.items()}, "from": "measured"}
            complete = len(times) == len(site.candidates)  # a site cut short by the budget is measured next time
            if chosen != site.default:
                second = again.get(site.name, {})
                rule_s, chosen_s = second.get(knob_str(site.default)), second.get(knob_str(chosen))
                entry["confirm_us"] = {k: round(v * 1e6, 2) for k, v in second.items()}
                if rule_s is None or chosen_s is None or rule_s < CONFIRM_GAIN * chosen_s:
                    summary.unconfirmed += 1
                    if rule_s is None or chosen_s is None:
                        summary.stopped = "time budget spent"
                        complete = False
                    chosen = dict(site.default)
                    entry["chosen"] = knob_str(chosen)
            records[site.name] = chosen
            if complete:
                db[_db_key(target, site)] = {"knobs": chosen, "rule": site.default, "us": entry["us"],
                                             **({"confirm_us": entry["confirm_us"]} if "confirm_us" in entry else {})}
            summary.measured += 1
            summary.per_site.append(entry)
        _store_db(folder, db)
    summary.changed = sum(1 for e in summary.per_site if e["chosen"] != e["rule"])
    summary.seconds = round(_now() - t0, 2)
    return records, summary


def _confirm(changed: list[Site], records: dict[str, dict], measure: Measure,
             deadline: float | None) -> dict[str, dict[str, float]]:
    """The second measurement of the sites whose first one chose a change: two builds, every changed site on its
    rule's choice in one and on its change in the other (`records` for the rest), so each change is timed again,
    later, and together with the others as the model will run them. On this machine a first measurement's 5% bar
    may let noise through (a tuned MobileNetV2 with 8 of 24 sites changed was timed slower than the rules' build,
    though minutes apart).
    -> site name -> {knob_str: seconds}; empty without changes or when the budget is spent (the changes then
    keep the rule)."""
    if not changed or (deadline is not None and _now() > deadline):
        return {}
    names = {s.name for s in changed}
    pairs = [Site(s.family, s.key, s.default, [s.default, records[s.name]], s.macs) for s in changed]
    return measure(pairs, {k: v for k, v in records.items() if k not in names}, deadline)
