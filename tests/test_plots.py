"""PNG plots (graphopt/plots.py): the speed / fidelity / size trade-off of compressed variants."""
from __future__ import annotations

import pytest

from graphopt.plots import plot_tradeoff

PNG = b"\x89PNG\r\n\x1a\n"


def test_tradeoff_plot_is_a_png_with_a_panel_per_model(tmp_path):
    panels = [{"model": m, "baseline": "ORT fp32", "metric": "top-1", "points": [
        {"label": "fp32", "speedup": 1.1, "fidelity": 1.0, "mb": 14.4},
        {"label": "prune50+int7", "speedup": 3.4, "fidelity": 0.0, "mb": 1.8},
        {"label": "ORT int8", "speedup": 0.9, "fidelity": 0.75, "mb": None},
        {"label": "no fidelity measured", "speedup": 2.0, "fidelity": None, "mb": 3.0}]} for m in ("a", "b")]
    out = plot_tradeoff(panels, tmp_path / "t.png", "title")
    assert out.read_bytes()[:8] == PNG
    import matplotlib.image
    width = matplotlib.image.imread(out).shape[1]
    one = plot_tradeoff(panels[:1], tmp_path / "one.png")
    assert width > 1.6 * matplotlib.image.imread(one).shape[1]  # two panels side by side


def test_tradeoff_plot_without_models_is_an_error_and_writes_nothing(tmp_path):
    old = tmp_path / "t.png"
    old.write_bytes(b"keep")
    with pytest.raises(ValueError, match="no models"):
        plot_tradeoff([], old)
    assert old.read_bytes() == b"keep"


def test_sparsity_plot_draws_a_grid_of_layer_shapes(tmp_path):
    from graphopt.plots import plot_sparsity
    series = {"block4x4": [(0.8, 4.0), (0.5, 1.8), (0.9, 7.5)], "unstructured": [(0.5, 1.0), (0.9, 4.6)]}
    panels = [{"name": f"layer {i}", "series": series} for i in range(5)]  # 4 + 1: a second row, 3 panels blank
    out = plot_sparsity(panels, tmp_path / "s.png", "title")
    assert out.read_bytes()[:8] == PNG
    import matplotlib.image
    h, w = matplotlib.image.imread(out).shape[:2]
    h1, w1 = matplotlib.image.imread(plot_sparsity(panels[:1], tmp_path / "one.png")).shape[:2]
    assert w > 3 * w1 and h > 1.6 * h1
    with pytest.raises(ValueError, match="no layer shapes"):
        plot_sparsity([], tmp_path / "s.png")
    assert out.read_bytes()[:8] == PNG  # the failed call left the earlier picture


@pytest.mark.parametrize("script", ["sparse_kernels", "compressed"])
def test_benchmark_replot_draws_the_committed_results_and_refuses_foreign_json(tmp_path, script):
    """`--replot` redraws a benchmark's PNG from its committed JSON without running; a JSON that is not that
    benchmark's results is a one-line usage error and draws nothing."""
    import importlib.util
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(f"bench_{script}", root / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "p.png"
    assert mod.main(["--replot", "--plot", str(out), "--out", str(root / "results" / f"{script}.json")]) == 0
    assert out.read_bytes()[:8] == PNG
    foreign = tmp_path / "other.json"
    foreign.write_text('{"rows": [{"shape": "x"}], "models": [{"model": "x"}]}')
    with pytest.raises(SystemExit) as e:
        mod.main(["--replot", "--plot", str(tmp_path / "q.png"), "--out", str(foreign)])
    assert e.value.code == 2 and not (tmp_path / "q.png").exists()
