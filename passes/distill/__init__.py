"""Knowledge distillation: the trainer every training-based pass uses, and the `recover` pass."""
from graphopt.passes.distill import recover  # noqa: F401
