"""Matching user-given name patterns (protect=, exclude=) against nodes and parameters; ONNX input names as graph
input names."""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch.fx as fx

from graphopt.ir.graph import Graph


def node_labels(n: fx.Node) -> set[str]:
    """What a user may call a node: its name, its op or attribute, and the source parameter name."""
    return {x for x in (n.name, str(n.target), n.meta.get("source_fqn", "")) if x}


def matches(labels: Iterable[str], patterns: Iterable[str]) -> str:
    """The first pattern (glob; `conv1` also matches `conv1.weight`) that matches a label, else ''."""
    for pat in patterns:
        if any(fnmatch.fnmatch(lbl, pat) or fnmatch.fnmatch(lbl, pat + ".*") for lbl in labels):
            return pat
    return ""


def unmatched_patterns(graph: Graph, patterns: Iterable[str]) -> list[str]:
    """Patterns that match no node or parameter of the graph (a typo the user should hear about)."""
    labels = set()
    for n in graph.gm.graph.nodes:
        labels |= node_labels(n)
    return [p for p in patterns if not matches(labels, [p])]


def input_name(name: str) -> str:
    """An ONNX input's name as a graph input's (a Python identifier): other characters become "_", and a leading
    digit gets an "input_" prefix ("input.1" -> "input_1")."""
    safe = "".join(c if c.isalnum() else "_" for c in name)
    return safe if safe and not safe[0].isdigit() else "input_" + safe
