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


def given_shape(name: str, given: Sequence[int | None], declared: Sequence[int | None] | None,
                open_at: int = 1) -> list[int]:
    """A user-given shape for input `name`, checked against the model's declared dims (an int where fixed, None where
    dynamic; `declared` None: no shape declared): no dim <= 0, the model's rank and its fixed dims. An open batch
    (None first) is traced at the model's fixed batch, else at `open_at`."""
    opened = open_batch(name, given)  # (refuses None past the batch first)
    dims = [int(x) for x in given[1:]]
    if opened:
        first = declared[0] if declared else None
        dims.insert(0, first if first is not None else open_at)
    else:
        dims.insert(0, int(given[0]))
    if any(d <= 0 for d in dims):
        raise InputMismatchError(f"input '{name}': shape {dims} has a dim <= 0")
    if declared and len(declared) != len(dims):
        raise InputMismatchError(f"input '{name}' has rank {len(declared)} in the model, the given shape {dims} has "
                                 f"{len(dims)} dims")
    for k, d in enumerate(declared or ()):
        if d is not None and d != dims[k]:
            raise InputMismatchError(f"input '{name}': dim {k} is fixed at {d} in the model, the given shape {dims} "
                                     f"says {dims[k]}")
    return dims


def dynamic_dims_error(inputs: Sequence[tuple[str, Sequence[int | str]]]) -> InputMismatchError:
    """The error for inputs with dynamic dims besides the batch (`inputs`: each one's name and declared dims, an int
    where fixed, the dim's name where dynamic): every such input at once, its declared shape and the --input-shape
    to give, so that one try shows all that is missing."""
    lines, flags = [], []
    for name, dims in inputs:
        shown = ", ".join(str(d) for d in dims)
        lines.append(f"'{name}' [{shown}]")
        flags.append(f"--input-shape {name}=" + "x".join(
            str(d) if isinstance(d, int) else "N" if k == 0 else f"<{d}>" for k, d in enumerate(dims)))
    return InputMismatchError(
        f"input{'s' if len(lines) > 1 else ''} {', '.join(lines)} ha{'ve' if len(lines) > 1 else 's'} dynamic dims "
        f"besides the batch, and compiling needs them fixed: give {' '.join(flags)} with numbers for the <dims> "
        "(a first dim N keeps the batch dynamic; input_shapes={name: (dims)} in Python)")
