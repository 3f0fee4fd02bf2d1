"""Pictures that say more than tables: per-layer width and weight bits before/after a pipeline (PNG)."""
from __future__ import annotations

from pathlib import Path

from graphopt.ir.files import atomic_file
from graphopt.ir.graph import Graph

LAYER_OPS = ("conv2d", "conv1d", "linear", "qconv2d", "qlinear", "convolution")


def layer_table(graph: Graph) -> list[tuple[str, int, int, int]]:
    """(layer, output channels, weight values, bits per weight) for each conv/linear, in graph order."""
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
        if "int4" in str(graph.meta.get("pipeline", "")) and t.element_size() == 1:
            bits = 4
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
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
