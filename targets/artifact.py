"""The artifact manifest: what a deployed model.so takes and returns, and how it was made."""
from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.ir.files import atomic_write_bytes

if TYPE_CHECKING:  # (a process that only loads artifacts imports this module without torch)
    from graphopt.ir.graph import Graph

MANIFEST_FORMAT = "graphopt-artifact"
MANIFEST_VERSION = 1


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("graphopt", "torch", "apache-tvm", "apache-tvm-ffi", "onnx", "onnxruntime", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _input_specs(graph: Graph) -> list[dict]:
    """Each input's name, shape and dtype; for token ids also the range the embedding table accepts ("range",
    [lo, hi), and "range_node"), which the runtime checks before a call."""
    ranges = graph.input_ranges()
    out = []
    for s in graph.inputs:
        d = s.to_json()
        if s.name in ranges:
            d["range"], d["range_node"] = ranges[s.name]["range"], ranges[s.name]["node"]
        out.append(d)
    return out


def _with_batch_dims(specs: list[dict], target_info: dict[str, Any]) -> list[dict]:
    """`specs` with "batch_dim" (its name) on each input or output whose dim 0 the artifact takes at any size: an
    ONNX export's, where the model came with a dynamic batch (target_info "dynamic_batch")."""
    dims = target_info.get("dynamic_batch") or {}
    return [dict(s, batch_dim=dims[s["name"]]) if s["name"] in dims else s for s in specs]


def shape_text(spec: dict) -> str:
    """An input's or output's shape as messages show it: [batch, 3, 224, 224] where dim 0 takes any size."""
    dims = [spec["batch_dim"]] + list(spec["shape"][1:]) if "batch_dim" in spec and spec["shape"] else spec["shape"]
    return "[" + ", ".join(map(str, dims)) + "]"


def build_manifest(graph: Graph, target: str, target_info: dict[str, Any], *, tuning: dict | None,
                   build_seconds: float, folder: Path) -> dict[str, Any]:
    stats = graph.stats()
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file()}
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": _with_batch_dims(_input_specs(graph), target_info),
        "outputs": _with_batch_dims([s.to_json() for s in graph.outputs], target_info),
        "pipeline": graph.meta.get("pipeline", ""),
        "passes": graph.meta.get("history", []),
        "source": graph.meta.get("source", ""),
        "stats": stats.to_json(),
        "sparsity": graph.sparsity_report(),
        "sparse_layout": graph.meta.get("sparse_layout", {}),
        "weight_bits": graph.meta.get("weight_bits", {}),
        "target": target,
        "target_info": target_info,
        "tuning": tuning,
        "build_seconds": build_seconds,
        "versions": versions(),
        "files": files,
        "entry": "main",
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(folder / "manifest.json", json.dumps(manifest, indent=1, default=str).encode())


def read_manifest(folder: str | Path) -> dict[str, Any]:
    from graphopt.errors import ArtifactError
    path = Path(folder) / "manifest.json"
    if not path.exists():
        raise ArtifactError(f"'{folder}' is not a graphopt artifact (no manifest.json); build one with graphopt compile")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"'{path}' is corrupt: {e}") from None
    if m.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"'{path}' is not a graphopt manifest")
    return m
