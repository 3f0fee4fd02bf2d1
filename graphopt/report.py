"""The readable report printed after every compile: what each pass did, size, fidelity and speed vs baselines."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from graphopt.ir.files import atomic_write_bytes
from graphopt.ir.graph import Graph
from graphopt.ir.stats import human


def _fmt_ms(s: float | None) -> str:
    return "n/a" if s is None else f"{s * 1e3:.2f} ms"


def pass_table(history: Sequence[dict[str, Any]]) -> str:
    # as wide as the longest pass with its options (cut at 40): 22 columns showed "prune-channels{ratio=0"
    width = max([22] + [min(40, len(r["pipeline"])) for r in history])
    rows = [f"  {'#':>2}  {'pass':<{width}} {'changed':<7} {'time':>7}  {'Δparams':>9} {'ΔMACs':>9}  note"]
    for r in history:
        d_params = r["after"]["params"] - r["before"]["params"]
        d_macs = r["after"]["macs"] - r["before"]["macs"]
        # the counts a pass reports, less the zeros (quantize's read "matmuls_quantized=0, bias_corrected=0, ...");
        # floats to 4 digits (recover's "loss_first=5.222804069519043")
        note = r.get("reason") or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in r.get("stats", {}).items()
                                            if isinstance(v, (int, float)) and v)
        if r.get("verify"):
            note += "; verify: " + _verify_note(r["verify"])
        spec = r["pipeline"] if len(r["pipeline"]) <= width else r["pipeline"][:width - 3] + "..."
        rows.append(f"  {r['index']:>2}  {spec:<{width}} {'yes' if r['changed'] else 'no':<7} "
                    f"{r['seconds']:>6.2f}s  {human(d_params):>9} {human(d_macs):>9}  {note}")
    return "\n".join(rows)


def _verify_note(v: dict[str, Any]) -> str:
    """--verify-each's finding for one pass: an exact pass's max error; any other's SQNR (and, for [N, C] outputs
    such as logits, argmax agreement: a classifier's top-1) against the graph before it and against the pipeline's
    input, so the pass that lost the accuracy stands out (max errors alone, 13 after prune-channels and 0.057
    after quantize, said nothing of how much each kept)."""
    step, total = v["step"], v.get("vs_reference") or v["step"]
    if v.get("contract") == "exact":
        return f"max|err| {step['max_abs_err']:.2g}"

    def db(c: dict[str, Any]) -> str:
        if c.get("sqnr_db") is None:  # (infinite: no error at all, or NaN outputs / no signal)
            text = "exact" if c["max_abs_err"] == 0 else "-inf dB"
        else:
            text = f"{c['sqnr_db']:.1f} dB"
        return text if c.get("top1") is None else f"{text}, argmax {100 * c['top1']:.0f}%"
    acc = v.get("accuracy")
    labeled = f"; accuracy {100 * acc['after']:.1f}% (input {100 * acc['input']:.1f}%)" if acc else ""
    forced = v.get("step_teacher_forced")  # (each rounding fed the graph before's values: what the pass changed)
    local = f"; teacher-forced {db(forced)}" if forced else ""
    return f"SQNR {db(step)}{local} (vs input {db(total)}){labeled}"


DOT_NAMES = {"vnni": "vpdpbusd (VNNI)", "ubsw": "vpmaddubsw/vpmaddwd (AVX2)"}


def _isa_names(names: list[str]) -> str:
    """ISA extension names, the AVX-512 ones as one ("avx512*") where there are several."""
    wide = [n for n in names if n.startswith("avx512")]
    return ", ".join((["avx512*"] if len(wide) > 1 else wide) + [n for n in names if not n.startswith("avx512")])


def _target_line(manifest: dict[str, Any], int8: bool) -> str:
    tinfo = manifest.get("target_info", {})
    return (f"  target     {tinfo.get('kind', manifest.get('target'))} (mcpu={tinfo.get('mcpu', '-')}"
            + (f" without {_isa_names(tinfo['without'])} (not reported by the CPU it was built on)"
               if tinfo.get("without") else "")
            + f", cores={tinfo.get('num_cores', '-')}"
            + (f", kernels shaped for {tinfo['vector_bits']}-bit vectors" if tinfo.get("vector_bits") else "")
            + (f", int8 products on {DOT_NAMES.get(tinfo['int8_dot'], tinfo['int8_dot'])}"
               if int8 and tinfo.get("int8_dot") else "")
            + (", int8 GEMMs and k x k convs on AMX tiles" if int8 and tinfo.get("amx") else "")
            + ")")


EXPORT_RUNNERS = {"onnx": "model.onnx on ONNX Runtime", "pt2": "model.pt2 on PyTorch"}


def _export_target_line(manifest: dict[str, Any]) -> str:
    kind = manifest.get("target_info", {}).get("kind")
    return (f"  target     {kind} export ({', '.join(manifest.get('files') or {}) or 'no files listed'}; runs on "
            f"{EXPORT_RUNNERS[kind].split(' on ')[1]})")


def _artifact_lines(artifact: Path, manifest: dict[str, Any], weight_bits: dict | None = None) -> list[str]:
    """The report's lines read from a CPU artifact and its manifest: widths (the graph's `weight_bits`, else the
    manifest's), size, one-thread kernels, sparse layouts, tuning."""
    tinfo = manifest.get("target_info", {})
    size = sum(p.stat().st_size for p in artifact.iterdir() if p.is_file())
    lines = []
    widths = Counter(((manifest.get("weight_bits") if weight_bits is None else weight_bits) or {}).values())
    if widths:  # quantize / mixed-precision: how many layers at each width (int7, int8s keep some layers int8)
        lines.append("  widths     " + ", ".join(f"{n} layer(s) {w}" for w, n in widths.most_common())
                     + "; per layer in manifest.json")
    lines.append(f"  artifact   {human(size, 'B')} in {artifact} (build {manifest.get('build_seconds', 0):.1f} s)")
    one = tinfo.get("one_thread_kernels")
    if one:
        lines.append(f"  threads    {len(one)} kernel(s) too small to pay for a fork run on one thread (estimated "
                     f"under {tinfo.get('one_thread_under_us', 3):g} us a fork); names in manifest.json")
    sparse = manifest.get("sparse_layout") or {}
    if sparse and str(tinfo.get("kind", manifest.get("target"))) == "llvm":  # the GPU report has its own
        timed = [r for r in sparse.values() if not r.get("reason")]  # a reason: left dense before measuring
        counts = Counter(r.get("choice", "dense") for r in timed)
        best = max((r.get("best_speedup", 0) for r in timed if r.get("choice") != "dense"), default=0)
        skipped = len(sparse) - len(timed)
        lines.append(f"  sparse     {len(timed)} layer(s) measured"
                     + (": " + ", ".join(f"{n} {lay}" for lay, n in counts.most_common()) if timed else "")
                     + (f" (best {best:.2f}x dense)" if best else "")
                     + (f"; {skipped} masked layer(s) left dense unmeasured, reasons in manifest.json" if skipped
                        else "; timings per layer in manifest.json"))
    tuning = manifest.get("tuning")
    if tuning:
        lines.append(f"  tuning     {tuning.get('trials', 0)} trials over {tuning.get('tasks_tuned', 0)} task(s) "
                     f"(heaviest first), {tuning.get('tasks_reused', 0)} reused from the database, "
                     f"{tuning.get('tasks_skipped', 0)} left untuned"
                     + (f" ({tuning['tasks_own']} of graphopt's own kernels: their knobs, below)"
                        if tuning.get("tasks_own") else "")
                     + f", {tuning.get('seconds', 0):.0f} s; "
                     f"{tuning.get('kept_tuned', 0)} tuned kernel(s) used, {tuning.get('kept_rules', 0)} beaten by the "
                     "rule-scheduled ones"
                     + (f", stopped: {tuning['stopped']}" if tuning.get("stopped") else ""))
        kn = tuning.get("knobs") or {}
        if kn.get("sites"):
            lines.append(f"  knobs      {kn['sites']} kernel(s) of graphopt's own with knobs: {kn.get('measured', 0)} "
                         f"measured, {kn.get('reused', 0)} from the database, {kn.get('changed', 0)} changed from "
                         f"the rule"
                         + (f" ({kn['unconfirmed']} more kept the rule: a second measurement did not confirm them)"
                            if kn.get("unconfirmed") else "")
                         + f", {kn.get('seconds', 0):.0f} s"
                         + (f", stopped: {kn['stopped']}" if kn.get("stopped") else "")
                         + "; per kernel in manifest.json")
    else:
        lines.append("  tuning     none (graphopt's own kernels run their rules' knobs; --tune-trials N or "
                     "--tune-minutes M measures those and tunes the rest)")
    return lines


def compile_report(reference: Graph, optimized: Graph, artifact: Path, manifest: dict[str, Any],
                   fidelity: dict | None, latency: dict | None, fidelity_source: str = "") -> str:
    """The text report; also written as report.json beside the artifact."""
    before, after = reference.stats(), optimized.stats()
    int8 = any(op in after.ops for op in ("qlinear.default", "qconv2d.default"))  # the product matters only then
    kind = manifest.get("target_info", {}).get("kind")
    export = kind in EXPORT_RUNNERS
    lines = [
        f"graphopt compile report: {reference.meta.get('source') or 'model'} -> {artifact}",
        _export_target_line(manifest) if export else _target_line(manifest, int8),
        f"  pipeline   {optimized.meta.get('pipeline') or '(none)'}",
    ]
    if optimized.meta.get("history"):
        lines += ["  passes", pass_table(optimized.meta["history"])]
    lines += [
        f"  params     {human(before.params)} -> {human(after.params)}",
        f"  MACs       {human(before.macs)} -> {human(after.macs)}",
        f"  weights    {human(before.bytes, 'B')} -> {human(after.bytes, 'B')}",
    ]
    dynamic = after.ops.get("dynamic_quantize.default", 0)
    if dynamic and not export:  # (their linears' int8 kernels: targets/tvm/lower.py `_dynamic_qlinear`)
        lines.append(f"  dynamic    {dynamic} layer input(s) rounded onto each call's own uint8 grid (dynamic "
                     "quantization: no calibrated scales; the compile log names any layer left in float)")
    lines += _artifact_lines(Path(artifact), manifest, optimized.meta.get("weight_bits") or {})
    if export:  # (no kernels of graphopt's: nothing tuned)
        lines = [ln for ln in lines if not ln.startswith("  tuning")]
        info = manifest.get("target_info", {})
        if info.get("dynamic_batch"):
            names = ", ".join(f"{k} '{v}'" for k, v in info["dynamic_batch"].items())
            lines.append(f"  batch      any (dim 0 dynamic: {names}); checked in ONNX Runtime, a batch of rows "
                         "against each row alone")
        elif info.get("batch_fixed"):
            lines.append(f"  batch      fixed at the traced batch, though a dynamic one was asked for: "
                         f"{info['batch_fixed']}")
        saturating = info.get("ort_pair_saturation") or {}
        if saturating:
            lines.append(f"  ORT int8   {len(saturating)} int8 weight(s) with pairs past 128: ONNX Runtime saturates "
                         "them on x86 CPUs without VNNI (AVX2, AVX-512F); quantize{weights=int8s} or auto for "
                         "target onnx makes them exact; names in manifest.json")
    if fidelity:
        parts = []
        if fidelity.get("top1") is not None:
            parts += [f"top-1 {fidelity['top1'] * 100:.1f}%", f"top-5 {fidelity['top5'] * 100:.1f}%",
                      f"KL {fidelity['kl']:.2g}"]
        sq = fidelity.get("sqnr_db")
        parts += [f"cosine {fidelity['cosine']:.5f}", f"SQNR {'inf' if sq is None else f'{sq:.1f}'} dB"]
        quantized_input = any(op.startswith(("quantize_per_tensor", "qconv2d", "qlinear")) for op in before.ops)
        dynamic_input = any(op.startswith("dynamic_quantize") for op in before.ops)
        half = [s.dtype for s in reference.outputs if s.dtype in ("float16", "bfloat16")]
        against = ("the input Q/DQ model" if quantized_input
                   else "the input dynamically quantized model" if dynamic_input
                   else f"the {half[0]} model (PyTorch's {half[0]} ops)" if half else "fp32")
        lines.append(f"  fidelity   vs {against} on {fidelity['samples']} {fidelity_source or 'inputs'}: "
                     + ", ".join(parts))
        acc = fidelity.get("accuracy")
        if acc:
            lines.append(f"  accuracy   {acc['artifact'] * 100:.1f}% on {acc['samples']} labeled samples from --inputs "
                         f"(the input model: {acc['reference'] * 100:.1f}%)")
    if latency:
        g = latency["graphopt_ms"] / 1e3
        who = "the export" if export else "graphopt"
        on = " on the input model" if export else ""
        parts = [f"{EXPORT_RUNNERS[kind] if export else 'graphopt'} {_fmt_ms(g)}"]
        for key, label in (("ort_ms", "ONNX Runtime"), ("torch_ms", "PyTorch")):
            if latency.get(key):
                parts.append(f"{label}{on} {_fmt_ms(latency[key] / 1e3)} ({who} is {g / (latency[key] / 1e3):.2f}x "
                             "its time)")
        lines.append(f"  latency    median, {latency['threads']} thread(s): " + " | ".join(parts))
    return "\n".join(lines) + "\n"


def write_report(artifact: Path, data: dict[str, Any], text: str) -> None:
    atomic_write_bytes(Path(artifact) / "report.json", json.dumps(data, indent=1, default=str).encode())
    atomic_write_bytes(Path(artifact) / "report.txt", text.encode())


def gpu_build_report(artifact: Path) -> str:
    """What a cuda / cuda-sparse build produced: architectures, kernel binaries, and each sparse layer's choice."""
    from graphopt.targets.artifact import read_manifest
    m = read_manifest(artifact)
    t = m.get("target_info", {})
    size = sum(p.stat().st_size for p in Path(artifact).iterdir() if p.is_file())
    stats = m.get("stats", {})
    lines = [f"graphopt compile report: {m.get('source') or 'model'} -> {artifact}",
             f"  target     {t.get('kind')} for {', '.join(t.get('archs', []))} "
             f"{'(H100/H200 only)' if 'sm_90a' in t.get('archs', []) else '(+ PTX of the newest)'}, "
             f"{t.get('precision')} compute, "
             + ("kernels replayed as one CUDA graph (captured on the first call)" if t.get("cuda_graph")
                else "one launch a kernel (no CUDA graph)"),
             f"  pipeline   {m.get('pipeline') or '(none)'}"]
    if m.get("passes"):
        lines += ["  passes", pass_table(m["passes"])]
    kern = t.get("kernels", [])
    lines += [f"  params     {human(stats.get('params', 0))}, MACs {human(stats.get('macs', 0))}",
              f"  artifact   {human(size, 'B')} in {artifact} (build {m.get('build_seconds', 0):.1f} s); kernels: "
              + ", ".join(f"{human(k['fatbin_bytes'], 'B')} fatbin from {human(k['source_bytes'], 'B')} of CUDA"
                          for k in kern)]
    sparse = t.get("sparse_kernels") or {}
    if sparse:
        on = [r.get("sp24_kernel", "mma.sp").split()[0] for r in sparse.values() if r.get("choice") == "sp24"]
        how = ", ".join(f"{kern} for {on.count(kern)}" for kern in sorted(set(on))) if len(set(on)) > 1 else \
            (on or ["mma.sp"])[0]
        lines.append(f"  2:4        {len(on)} of {len(sparse)} layer(s) on sparse tensor cores ({how}), the rest dense "
                     "[cols x k x n]:")
        for name, r in sparse.items():
            lines.append(f"    {name:<32} {'x'.join(str(d) for d in r.get('shape', [])):<16} "
                         f"{r.get('decision') or 'dense: ' + r.get('reason', '')}")
    tc = t.get("tensor_core_linears") or {}
    if tc:
        fmts = sorted({r.get("format", "?") for r in tc.values()})
        wg = sum("wgmma" in r.get("kernel", "") for r in tc.values())
        how = f"wgmma for {wg}, mma.sync for {len(tc) - wg}" if 0 < wg < len(tc) else "wgmma" if wg else "mma.sync"
        lines.append(f"  dense      {len(tc)} linear(s) on graphopt's dense tensor-core kernel ({how}, "
                     f"{'/'.join(fmts)}); other convs and matmuls on dlight's schedules")
    lines.append("  measure    no timing here: run `graphopt run` or benchmarks/gpu_check.sh on the GPU machine "
                 "(the artifact needs the TVM runtime and a driver there, no compiler)")
    return "\n".join(lines) + "\n"


def artifact_summary(artifact: Path) -> str:
    """What an artifact folder holds, from its manifest, for `graphopt inspect DIR`: where it came from, its
    interface, target, pipeline and passes, size, widths, sparse layouts, tuning, and the library versions."""
    from graphopt.targets.artifact import read_manifest, shape_text
    artifact = Path(artifact)
    m = read_manifest(artifact)
    t = m.get("target_info", {})
    head = [f"graphopt artifact {artifact}: from {m.get('source') or 'a model'}, built {m.get('created', '?')}"]
    head += [f"  {kind:<10} {io['name']} {shape_text(io)} {io['dtype']}"
             for kind, key in (("input", "inputs"), ("output", "outputs")) for io in m.get(key, [])]
    tail = ["  versions   " + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items())]
    if (artifact / "report.txt").exists():
        tail.append("  report     report.txt: the compile's fidelity and latency lines")
    tail.append("  manifest   manifest.json: every per-layer record (`graphopt inspect DIR --json` prints it)")
    if t.get("device") == "cuda":
        body = gpu_build_report(artifact).splitlines()[1:-1]  # (not its title, nor the line on measuring)
        return "\n".join(head + body + tail) + "\n"
    ir = artifact / "graph.ir"
    int8 = ir.exists() and any(op in ir.read_text() for op in ("graphopt.qconv2d", "graphopt.qlinear"))
    passes = m.get("passes") or []
    before, after = (passes[0]["before"] if passes else m.get("stats", {})), m.get("stats", {})
    export = t.get("kind") in EXPORT_RUNNERS
    target = _export_target_line(m) if export else _target_line(m, int8)
    lines = head + [target, f"  pipeline   {m.get('pipeline') or '(none)'}"]
    if passes:
        lines += ["  passes", pass_table(passes)]
    for label, key, unit in (("params", "params", ""), ("MACs", "macs", ""), ("weights", "bytes", "B")):
        if key in after:
            lines.append(f"  {label:<10} {human(before.get(key, after[key]), unit)} -> {human(after[key], unit)}")
    lines += [ln for ln in _artifact_lines(artifact, m) if not (export and ln.startswith("  tuning"))]
    if not export:
        tail.insert(0, "  run        graphopt.load(DIR) in Python (numpy + the TVM runtime); from C++ without Python: "
                       "run_artifact.cc, built by `python -m graphopt.targets.tvm.deploy --build`")
    return "\n".join(lines + tail) + "\n"
