"""Canonicalization: fold-bn, fold-constants, dce."""
from graphopt.passes.canonicalize import dce, fold_bn, fold_constants  # noqa: F401
