"""Frontends: ONNX files, torch.export programs and torch modules into graphopt's Graph."""
from __future__ import annotations

from typing import Sequence

from graphopt.errors import InputMismatchError


def open_batch(name: str, given: Sequence[int | None]) -> bool:
    """Whether a user-given input shape leaves its batch open (None first, `--input-shape x=Nx128`: traced at one
    batch, any batch in an ONNX export); refuses None anywhere else."""
    if any(d is None for d in list(given)[1:]):
        raise InputMismatchError(f"input '{name}': shape {list(given)} leaves a dim other than the batch (dim 0) "
                                 "open; only the batch can stay dynamic")
    return len(given) > 0 and given[0] is None
