"""Measure an artifact against ONNX Runtime and PyTorch in one process with one thread count; fidelity metrics."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from graphopt.errors import GraphoptError
from graphopt.ir.graph import Graph

log = logging.getLogger("graphopt")


def set_threads(n: int) -> None:
    """Same thread count for every runtime: torch, TVM (env read at pool start) and ORT (per session)."""
    from graphopt.targets.tvm.host import set_threads as tvm_threads
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    tvm_threads(n)


def randomize_batch_norms(model: torch.nn.Module, mean: float = 0.2, var: tuple[float, float] = (0.5, 1.5),
                          seed: int = 0) -> None:
    """Trained-looking batch-norm statistics for a benchmark's randomly initialized model, so that folding them
    changes the weights: running means uniform in [-mean, mean], running variances uniform in `var`."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.uniform_(-mean, mean, generator=g)
            m.running_var.uniform_(*var, generator=g)


def selected(parser, only: str, choices: dict) -> list[str]:
    """The names a benchmark's comma-separated --only picks from `choices` (all of them when empty); an unknown one
    is the parser's error, naming the choices."""
    names = [n for n in only.split(",") if n] or list(choices)
    unknown = [n for n in names if n not in choices]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


def _run_times(fn: Callable[[], Any], warmup: int = 3, runs: int = 20, max_seconds: float = 20.0) -> list[float]:
    """Wall times of fn() after warm-up; stops early (keeping >= 3 runs) if it would take too long."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > max_seconds:
            break
    return times


def round_pause() -> float:
    """Seconds of rest before each timing round: $GRAPHOPT_BENCH_PAUSE, else 0.3 (see `interleaved_medians`). The
    report's latency line takes 15 of them (4.5 s, however fast the model); on a quiet machine, or where a rough
    number will do (graphopt's tests use 0.02), a shorter one is enough. A value that is not a number >= 0 is an
    error naming the variable."""
    text = os.environ.get("GRAPHOPT_BENCH_PAUSE", "").strip()
    if not text:
        return 0.3
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise GraphoptError(f"GRAPHOPT_BENCH_PAUSE={text!r}: give the seconds to rest before each timing round, a "
                            "number >= 0 (default 0.3), or unset it")
    return value


def interleaved_medians(calls: dict[str, Callable[[], Any]], runs: int = 50, rounds: int | None = None,
                        pause: float | None = None, best_round: bool = False) -> dict[str, float]:
    """Median seconds per call for several runtimes, timed in interleaved rounds with a pause before each (`pause`
    seconds, default `round_pause()`): ORT's and PyTorch's thread pools spin for a while after a call and would
    otherwise steal the cores from whoever is timed next, and a shared machine drifts between rounds. Each runtime's
    `runs` are spread over `rounds` rounds (by default one per 4 runs, 3 to 9) and the median of all its runs is
    returned. On the development machine one loaded artifact timed in 14 rounds of 30 calls read 0.63-1.18 ms (both
    threads busy throughout, while single-core, cache-resident code ran steady): with 3 long rounds such a phase could
    cover two of a runtime's three samples; with more, shorter rounds every runtime sees about the same share of it.
    (Separately, one artifact instance can stay slow through all its rounds while a rebuild of the same layer is not,
    seen on a stride-2 conv whose per-thread working set is about the 1 MB L2: no timing scheme removes that.)

    `best_round`: the lowest of each runtime's per-round medians instead, for calls well under a millisecond: a
    0.6 ms layer read 0.60 ms in some runs of this function and 1.1-1.15 ms in others, for whichever runtime the
    slow spell fell on, while its other rounds stayed at 0.6."""
    rounds = rounds or min(9, max(3, runs // 4))
    pause = round_pause() if pause is None else pause
    got: dict[str, list[list[float]]] = {k: [] for k in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            time.sleep(pause)
            got[key].append(_run_times(fn, runs=max(3, -(-runs // rounds))))
    if best_round:
        return {k: float(min(np.median(r) for r in v)) for k, v in got.items()}
    return {k: float(np.median([t for r in v for t in r])) for k, v in got.items()}


def calibration_reader(feeds: Sequence[dict]):
    """ONNX Runtime's `CalibrationDataReader` over `feeds` (one {input name: array} per batch)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(list(feeds))

        def get_next(self):
            return next(self.it, None)
    return Reader()


def ort_quantize_static(fp32_path: str | Path, out_path: str | Path, feeds: Sequence[dict], *,
                        reduce_range: bool = False, calibrate_method=None, activations: str = "int8") -> Path:
    """ONNX Runtime's int8 baseline of an fp32 model: `quantize_static` (QDQ, per channel, int8 weights), calibrated
    on `feeds` (one {input name: array} per batch). Returns out_path. activations: "int8" (S8S8, the default its
    docs recommend for CPUs) or "uint8" (U8S8: on x86 its faster kernels, about 2x S8S8 on a Zen 4 with VNNI for
    MobileNetV2 and MiniLM, so a benchmark that claims to beat ORT int8 times both). reduce_range: 7-bit weights
    (ORT's advice for AVX2 without VNNI); calibrate_method: a `CalibrationMethod` (ORT's default, MinMax, when
    None)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if activations not in ("int8", "uint8"):
        raise ValueError(f"activations={activations!r}: int8 or uint8")
    extra = {} if calibrate_method is None else {"calibrate_method": calibrate_method}
    quantize_static(str(fp32_path), str(out_path), calibration_reader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QInt8 if activations == "int8" else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=reduce_range, **extra)
    return Path(out_path)


def ort_quantize_dynamic(fp32_path: str | Path, out_path: str | Path) -> Path:
    """ONNX Runtime's other int8 baseline: `quantize_dynamic` with its defaults (int8 weights per tensor,
    activations rounded onto a uint8 grid computed on every call; no calibration data). On transformers it is the
    form ORT's and Hugging Face's docs lead to, and on MiniLM it runs faster than either static form."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(fp32_path), str(out_path), weight_type=QuantType.QInt8)
    return Path(out_path)


def ort_session(onnx_path: str | Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


@dataclass
class Fidelity:
    """How close a compressed/compiled model's outputs are to the fp32 reference, over real inputs."""

    samples: int
    sqnr_db: float
    max_abs_err: float
    cosine: float
    top1: float | None = None
    top5: float | None = None
    kl: float | None = None

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in self.__dict__.items()}


def fidelity(refs: Sequence[np.ndarray], outs: Sequence[np.ndarray], classification: bool | None = None) -> Fidelity:
    """Compare first outputs batch by batch; top-1/top-5/KL too for classifiers (by default: outputs [N, C>=10])."""
    refs = [np.asarray(r, dtype=np.float64) for r in refs]
    outs = [np.asarray(o, dtype=np.float64) for o in outs]
    sig = sum(float((r ** 2).sum()) for r in refs)
    noise = sum(float(((r - o) ** 2).sum()) for r, o in zip(refs, outs))
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(sig, 1e-30) / noise)
    cos = [float((r * o).sum() / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-30)) for r, o in zip(refs, outs)]
    f = Fidelity(len(refs), sqnr, max(float(np.abs(r - o).max()) for r, o in zip(refs, outs)), float(np.mean(cos)))
    if classification is None:
        classification = refs[0].ndim == 2 and refs[0].shape[1] >= 10
    if classification:
        r, o = np.concatenate(refs), np.concatenate(outs)
        f.top1 = float((r.argmax(1) == o.argmax(1)).mean())
        top5 = np.argsort(-o, 1)[:, :5]
        f.top5 = float(np.mean([a in b for a, b in zip(r.argmax(1), top5)]))
        pr = np.exp(r - r.max(1, keepdims=True))
        pr /= pr.sum(1, keepdims=True)
        lo = o - o.max(1, keepdims=True)
        lo = lo - np.log(np.exp(lo).sum(1, keepdims=True))
        lr = np.log(np.clip(pr, 1e-30, None))
        f.kl = float(np.mean((pr * (lr - lo)).sum(1)))
    return f


@dataclass
class Comparison:
    """Latencies (median seconds, batch as given) of graphopt vs ONNX Runtime and PyTorch eager."""

    threads: int
    graphopt_s: float
    ort_s: float | None = None
    torch_s: float | None = None
    extra: dict[str, float] = field(default_factory=dict)

    def ratios(self) -> dict[str, float | None]:
        return {"vs_ort": None if self.ort_s is None else self.graphopt_s / self.ort_s,
                "vs_torch": None if self.torch_s is None else self.graphopt_s / self.torch_s}

    def to_json(self) -> dict:
        return {"threads": self.threads, "graphopt_ms": self.graphopt_s * 1e3,
                "ort_ms": None if self.ort_s is None else self.ort_s * 1e3,
                "torch_ms": None if self.torch_s is None else self.torch_s * 1e3,
                **{f"{k}_ms": v * 1e3 for k, v in self.extra.items()},
                **{f"ratio_{k}": v for k, v in self.ratios().items()}}


def write_results(path: str | Path, threads: int, runs: int, results: list) -> Path:
    """A benchmark's JSON (thread count, runs, this CPU, its rows), written atomically; prints where."""
    from graphopt.ir.files import atomic_write_bytes
    from graphopt.targets.tvm.host import host_record
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps({"threads": threads, "runs": runs, **host_record(), "results": results},
                                       indent=1).encode())
    print(f"wrote {out}")
    return out


def reference_onnx(graph: Graph, folder: str | None = None) -> Path:
    """An fp32 ONNX file of the reference graph for the ORT baseline (exported by graphopt's ONNX target), written
    to `folder`/reference.onnx.

    The export (torch.export again, then torch's ONNX exporter) took 10 of the 36 s of `graphopt compile
    zoo:mobilenet_v2`, and every compile of one model exports the same unoptimized graph, so the file is kept in
    `<cache>/reference/` under a digest of the graph and the exporter's versions and source
    (`GRAPHOPT_REFERENCE_CACHE=off` keeps nothing); a cached file that no longer loads is exported again."""
    import shutil
    from graphopt.ir.files import atomic_file
    from graphopt.targets.onnx.export import export_onnx
    folder = folder or tempfile.mkdtemp(prefix="graphopt-ref-")
    dest = Path(folder) / "reference.onnx"
    cached = _reference_cache_path(graph)
    if cached is not None and cached.is_file():
        try:
            import onnx
            onnx.checker.check_model(str(cached))
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(dest) as tmp:
                shutil.copyfile(cached, tmp)
            return dest
        except Exception:  # damaged or from an onnx that reads it differently: export again, overwrite it
            pass
    export_onnx(graph, dest, dynamic_batch=False)  # (the baseline runs at the traced batch)
    if cached is not None:
        try:
            with atomic_file(cached) as tmp:
                shutil.copyfile(dest, tmp)
        except OSError:  # a read-only or full cache folder costs the next run an export, nothing else
            pass
    return dest


def _reference_cache_path(graph: Graph) -> Path | None:
    if os.environ.get("GRAPHOPT_REFERENCE_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    import hashlib
    import onnx
    import onnxscript
    from graphopt.ir.files import user_cache_dir
    h = hashlib.sha256(f"{torch.__version__}\0{onnx.__version__}\0{onnxscript.__version__}\0".encode())
    import graphopt.ir.quant_ops
    import graphopt.ir.sparse_ops
    import graphopt.targets.onnx
    sources = sorted(Path(graphopt.targets.onnx.__file__).parent.glob("*.py"))
    sources += [Path(graphopt.ir.quant_ops.__file__), Path(graphopt.ir.sparse_ops.__file__)]
    for src in sources:  # the exporter's own code: translation tables, densifying, QDQ unfolding
        h.update(src.read_bytes())
    h.update(graph.digest().encode())
    return user_cache_dir() / "reference" / f"{h.hexdigest()[:40]}.onnx"


def compare_latency(artifact, inputs: Sequence[Any], *, threads: int, onnx_path: str | Path | None = None,
                    torch_fn: Callable[..., Any] | None = None, runs: int = 20, rounds: int = 5) -> Comparison:
    """Time the compiled artifact, ORT on `onnx_path` and `torch_fn`, on the same inputs, same thread count, in
    `rounds` interleaved rounds (`interleaved_medians`): timed one after the other, a shared machine's slow minute
    landed on one runtime only and moved a ratio by 30%."""
    return compare_variants({"graphopt": (artifact, onnx_path, torch_fn)}, inputs, threads=threads, runs=runs,
                            rounds=rounds)["graphopt"]


def compare_variants(variants: dict[str, tuple[Any, "str | Path | None", "Callable[..., Any] | None"]],
                     inputs: Sequence[Any], *, threads: int, runs: int = 20, rounds: int = 5) -> dict[str, Comparison]:
    """`compare_latency` for several artifacts of one model at once (label -> (artifact, ONNX path of the graph it
    was compiled from, PyTorch callable)), every artifact and every distinct baseline timed in the same
    interleaved rounds. Built and timed one variant after another, an untuned and a tuned MobileNetV2 were timed
    minutes apart, and the tuned one read 1.21x ORT's time where the untuned read 0.92x: which of the two a slow
    phase of the machine fell on decided the comparison. Baselines shared by variants (the same ONNX file, the
    same callable) run once a round."""
    set_threads(threads)
    np_inputs = [_np(x) for x in inputs]
    calls: dict[str, Callable[[], Any]] = {}
    for label, (artifact, _, _) in variants.items():
        calls[f"graphopt:{label}"] = artifact.prepared(*np_inputs)
    baselines: dict[str, dict[Any, str]] = {"ort": {}, "torch": {}}
    for _, onnx_path, torch_fn in variants.values():
        if onnx_path is not None and str(onnx_path) not in baselines["ort"]:
            key = baselines["ort"][str(onnx_path)] = f"ort:{len(baselines['ort'])}"
            try:
                sess = ort_session(onnx_path, threads)
            except Exception as e:  # noqa: BLE001 - ORT's own kinds: a file it cannot run (graphopt could)
                log.warning("ONNX Runtime cannot run '%s', so there is no ORT time to compare with: %s", onnx_path,
                            str(e).splitlines()[0][:300])
            else:
                feed = {i.name: a for i, a in zip(sess.get_inputs(), np_inputs)}
                calls[key] = lambda sess=sess, feed=feed: sess.run(None, feed)
        if torch_fn is not None and id(torch_fn) not in baselines["torch"]:
            key = baselines["torch"][id(torch_fn)] = f"torch:{len(baselines['torch'])}"
            t_inputs = [torch.from_numpy(a) for a in np_inputs]

            def torch_call(fn=torch_fn, t_inputs=t_inputs):
                with torch.inference_mode():
                    return fn(*t_inputs)
            calls[key] = torch_call
    got = interleaved_medians(calls, runs=max(runs, 3 * rounds), rounds=rounds)
    out = {}
    for label, (_, onnx_path, torch_fn) in variants.items():
        res = out[label] = Comparison(threads, got[f"graphopt:{label}"])
        if onnx_path is not None and baselines["ort"][str(onnx_path)] in got:
            res.ort_s = got[baselines["ort"][str(onnx_path)]]
        if torch_fn is not None:
            res.torch_s = got[baselines["torch"][id(torch_fn)]]
    return out
