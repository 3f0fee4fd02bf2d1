"""Pictures that say more than tables (PNG, written atomically): per-layer width and weight bits before/after a
pipeline; speed against fidelity and size for compressed variants of a model; speed-up against sparsity per
sparse layout, with the 0.5 / density goal."""
from __future__ import annotations

from pathlib import Path

from graphopt.ir.files import atomic_file
from graphopt.ir.graph import Graph

LAYER_OPS = ("conv2d", "conv1d", "linear", "qconv2d", "qlinear", "convolution")


def _save(fig, path: str | Path) -> Path:
    """Lay out, write the figure as a PNG atomically (an existing file is replaced only by a whole new one), close."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def layer_table(graph: Graph) -> list[tuple[str, int, int, int]]:
    """(layer, output channels, weight values, bits per weight) for each conv/linear, in graph order; a quantized
    layer's bits are the width its stored values span (int4, int7 or int8, which mixed-precision and
    quantize{weights=int7} mix within one graph)."""
    rows = []
    for n in graph.gm.graph.nodes:
        if n.op != "call_function" or not any(str(n.target).split(".")[-2] == op for op in LAYER_OPS):
            continue
        w = n.args[3] if "graphopt.q" in str(n.target) else n.args[1]
        while w is not None and getattr(w, "op", "") == "call_function":  # through a dequantize
            w = w.args[0]
        if w is None or getattr(w, "op", "") != "get_attr":
            continue
        t = graph.get_param(w.target)
        label = str(w.meta.get("source_fqn", w.target)).removesuffix(".weight")
        bits = 8 * t.element_size()
        if not t.is_floating_point() and t.numel():  # symmetric quantization puts each channel's largest weight at
            amax = int(t.abs().max())                # the top of its range: int4 (<= 7), int7 (<= 63) or int8
            bits = 4 if amax <= 7 else 7 if amax <= 63 else bits
        rows.append((label, int(t.shape[0]), int(t.numel()), bits))
    return rows


def plot_layers(before: Graph, after: Graph, path: str | Path, title: str = "") -> Path:
    """Bar chart of output channels per layer (before vs after) and weight bits after; written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, a = layer_table(before), layer_table(after)
    names = [r[0] for r in b]
    after_by = {r[0]: r for r in a}
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.22 * len(names)), 7), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    xs = range(len(names))
    ax1.bar(xs, [r[1] for r in b], color="#c8c8c8", label="before")
    ax1.bar(xs, [after_by[n][1] if n in after_by else 0 for n in names], color="#2a6fbb", label="after")
    ax1.set_ylabel("output channels")
    ax1.legend()
    ax1.set_title(title or f"{after.meta.get('pipeline', '')}")
    ax2.bar(xs, [after_by[n][3] if n in after_by else 0 for n in names], color="#d9822b")
    ax2.set_ylabel("weight bits")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(names, rotation=90, fontsize=6)
    return _save(fig, path)


def plot_tradeoff(panels: list[dict], path: str | Path, title: str = "") -> Path:
    """One panel per model: each variant at (speed-up over the baseline, fidelity), its marker's area proportional
    to its artifact size (variants without one, such as another runtime's, as small crosses), labeled; a dashed
    line at the baseline's speed. `panels`: [{"model", "baseline", "metric" (the fidelity's name), "points":
    [{"label", "speedup", "fidelity", "mb" (or None)}]}]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("plot_tradeoff: no models to draw")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    biggest = max((pt["mb"] for pn in panels for pt in pn["points"] if pt.get("mb")), default=1.0)
    for ax, pn in zip(axes[0], panels):
        for pt in pn["points"]:
            if pt.get("fidelity") is None:
                continue
            sized = pt.get("mb") is not None
            ax.scatter([pt["speedup"]], [pt["fidelity"]], s=40 + 900 * (pt["mb"] / biggest) if sized else 50,
                       marker="o" if sized else "x", alpha=0.6 if sized else 1.0,
                       color="#2a6fbb" if sized else "#d9822b")
            ax.annotate(pt["label"] + (f"\n{pt['mb']:.1f} MB" if sized else ""), (pt["speedup"], pt["fidelity"]),
                        textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.axvline(1.0, color="#888888", linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"speed-up over {pn['baseline']} (x)")
        ax.set_ylabel(pn["metric"])
        ax.set_title(pn["model"])
        ax.set_ylim(-0.05, 1.08)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_sparsity(panels: list[dict], path: str | Path, title: str = "") -> Path:
    """A grid of panels (one per layer shape): speed-up over the dense kernel against sparsity, one line per weight
    pattern (log scale), with the 0.5 / density goal dashed and 1x (dense kept) dotted. `panels`: [{"name",
    "series": {pattern: [(sparsity, speed-up), ...]}}]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("plot_sparsity: no layer shapes to draw")
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, 3.2 * rows), squeeze=False)
    grid = sorted({x for pn in panels for pts in pn["series"].values() for x, _ in pts})
    patterns = sorted({p for pn in panels for p in pn["series"]})
    colors = {p: f"C{i}" for i, p in enumerate(patterns)}  # one color per pattern in every panel
    for ax, pn in zip(axes.flat, panels):
        for pattern, pts in sorted(pn["series"].items()):
            pts = sorted(pts)
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color=colors[pattern], label=pattern)
        ax.plot(grid, [0.5 / (1 - x) for x in grid], "k--", linewidth=0.8)
        ax.axhline(1.0, color="#888888", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(pn["name"], fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("x dense kernel")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = [matplotlib.lines.Line2D([], [], color=colors[p], marker="o", label=p) for p in patterns]
    handles.append(matplotlib.lines.Line2D([], [], color="k", linestyle="--", label="goal 0.5/density"))
    axes.flat[0].legend(handles=handles, fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def replot(results: str | Path, png: str | Path, draw) -> str:
    """Redraw a benchmark's picture from its saved results JSON: `draw(results_dict, png)` -> the path written.
    A file that cannot be read, or is not results `draw` understands, is a ValueError naming the file (nothing
    drawn)."""
    import json
    try:
        saved = json.loads(Path(results).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the results in {results} ({e})") from e
    try:
        return draw(saved, png)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{results} does not hold this benchmark's results ({type(e).__name__}: {e}); nothing "
                         "was drawn") from e


def add_plot_options(ap, what: str) -> None:
    """A benchmark's `--plot PNG` (draw `what` after the run) and `--replot` (redraw from --out, no run)."""
    ap.add_argument("--plot", metavar="PNG", help=f"also draw {what}")
    ap.add_argument("--replot", action="store_true", help="only redraw --plot from the results in --out (no run)")


def replot_asked(ap, args, draw) -> bool:
    """When --replot was given: redraw --plot from --out with `draw` and say so (a bad results file or a missing
    --plot is a usage error naming it, via `ap.error`); True when the benchmark should stop there."""
    if not args.replot:
        return False
    if not args.plot:
        ap.error("--replot needs --plot PNG")
    try:
        print(f"wrote {replot(args.out, args.plot, draw)}")
    except ValueError as e:
        ap.error(f"--replot: {e}")
    return True
