"""Pruning: prune-channels (structured, with dependency groups)."""
from graphopt.passes.prune import prune_channels  # noqa: F401
