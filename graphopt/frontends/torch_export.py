"""PyTorch frontend: torch.export -> Graph, and safe loading of weight files."""
from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from graphopt.errors import GraphoptError, ModelFileError
from graphopt.ir.graph import Graph

log = logging.getLogger(__name__)


def trace(module: torch.nn.Module, example_inputs: Sequence[Any] | Any, *, input_names: Sequence[str] | None = None,
          output_names: Sequence[str] | None = None) -> Graph:
    """Export `module` with static shapes taken from `example_inputs` and return graphopt's Graph.

    The module is put in eval mode on a copy of its state only for the duration of the export and is not modified.
    """
    if not isinstance(module, torch.nn.Module):
        raise GraphoptError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(example_inputs, (torch.Tensor,)) or not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            ep = torch.export.export(module, tuple(example_inputs), strict=False)
    except Exception as e:
        raise GraphoptError(f"torch.export could not trace {type(module).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        module.train(was_training)
    return Graph.from_exported_program(ep, input_names, output_names, source=f"torch:{type(module).__name__}")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a .pth/.pt state dict with weights_only=True: tensors only, never arbitrary pickled objects."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"weights file '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(
            f"'{path}' contains pickled Python objects other than tensors; graphopt refuses to unpickle them "
            f"(weights_only=True). Re-save it with torch.save(model.state_dict()). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise ModelFileError(f"'{path}' is not a readable PyTorch weights file (corrupt or truncated?): "
                             f"{str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"'{path}' does not hold a state dict (name -> tensor)")
    return state
