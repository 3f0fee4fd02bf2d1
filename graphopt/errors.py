"""Exceptions raised at graphopt's boundaries; each names the node, op, option or file and what to do."""
from __future__ import annotations


class GraphoptError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class UnsupportedOpError(GraphoptError):
    """An op that no importer, pass or target understands."""

    def __init__(self, node: str, op: str, hint: str = ""):
        self.node, self.op, self.hint = node, op, hint
        msg = f"unsupported op '{op}' at node '{node}'"
        super().__init__(msg + (f": {hint}" if hint else ""))


class ModelFileError(GraphoptError):
    """A model or weights file that cannot be read safely (corrupt, truncated, wrong kind, pickled code)."""


class PipelineSyntaxError(GraphoptError):
    """A pipeline string that does not parse; points at the column."""

    def __init__(self, text: str, col: int, msg: str):
        self.text, self.col, self.msg = text, col, msg
        super().__init__(f"pipeline error at column {col + 1}: {msg}\n  {text}\n  {' ' * col}^")


class PassOptionError(GraphoptError):
    """An unknown pass, an unknown option, or an option value of the wrong type or range."""


class InputMismatchError(GraphoptError):
    """Inputs whose count, shape or dtype differ from what the graph or artifact expects."""


class PassFailedError(GraphoptError):
    """A pass raised, broke its numerical contract, or (under --strict) changed nothing."""

    def __init__(self, msg: str, reproducer: str | None = None):
        self.reproducer = reproducer
        super().__init__(msg + (f" (reproducer: {reproducer})" if reproducer else ""))


class TargetError(GraphoptError):
    """Lowering, building or tuning for a target failed."""


class ArtifactError(GraphoptError):
    """An artifact directory that is missing, incomplete or would overwrite something not ours."""


def cast_hint(got: str, want: str) -> str:
    """How to fix a float input of the wrong width (numpy makes float64 unless told): the cast to write."""
    if got.startswith("float") and want.startswith(("float", "bfloat")):
        np_name = "ml_dtypes.bfloat16" if want == "bfloat16" else f"np.{want}"
        return f" (cast it: x.astype({np_name}) in numpy, x.to(torch.{want}) in PyTorch)"
    return ""
