"""Canonicalization: fold-bn, fold-pad, fold-constants, dce."""
from graphopt.passes.canonicalize import dce, fold_bn, fold_constants, fold_pad  # noqa: F401
