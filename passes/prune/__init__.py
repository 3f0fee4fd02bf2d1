"""Pruning: prune-channels (structured, with dependency groups), sparsify, sparsify-nm, lottery-ticket, rigl, set."""
from graphopt.passes.prune import dynamic, lottery, prune_channels, sparsify  # noqa: F401
