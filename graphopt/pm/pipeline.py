"""Pipeline text (`fold-bn,prune-channels{ratio=0.5 importance=l2}`) and YAML recipes, both to PassSpec lists."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import PassOptionError, PipelineSyntaxError

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass
class PassSpec:
    """One pipeline element: a pass name, its raw option values, and where it started in the text."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    col: int = 0


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse MLIR-like pipeline text; errors point at the column."""
    specs: list[PassSpec] = []
    i, n = 0, len(text)

    def skip_ws(j: int) -> int:
        while j < n and text[j] in " \t\n":
            j += 1
        return j

    i = skip_ws(i)
    if i == n:
        raise PipelineSyntaxError(text, 0, "empty pipeline: name at least one pass (see `graphopt passes`)")
    while i < n:
        start = i
        while i < n and text[i].lower() in NAME_CHARS:
            i += 1
        name = text[start:i]
        if not name:
            raise PipelineSyntaxError(text, i, f"expected a pass name, found {text[i]!r}")
        spec = PassSpec(name, {}, start)
        i = skip_ws(i)
        if i < n and text[i] == "{":
            i += 1
            while True:
                i = skip_ws(i)
                if i >= n:
                    raise PipelineSyntaxError(text, i, f"missing '}}' to close the options of '{name}'")
                if text[i] == "}":
                    i += 1
                    break
                kstart = i
                while i < n and text[i].lower() in NAME_CHARS:
                    i += 1
                key = text[kstart:i]
                if not key:
                    raise PipelineSyntaxError(text, i, f"expected an option name in '{name}{{...}}', found {text[i]!r}")
                if i >= n or text[i] != "=":
                    raise PipelineSyntaxError(text, i, f"expected '=' after option '{key}' of '{name}'")
                i += 1
                if i < n and text[i] in "\"'":
                    quote, vstart = text[i], i + 1
                    end = text.find(quote, vstart)
                    if end < 0:
                        raise PipelineSyntaxError(text, i, f"unterminated quote in option '{key}'")
                    value, i = text[vstart:end], end + 1
                else:
                    vstart = i
                    while i < n and text[i] not in " \t\n}":
                        i += 1
                    value = text[vstart:i]
                    if not value:
                        raise PipelineSyntaxError(text, vstart, f"option '{key}' of '{name}' has no value")
                    joined = re.search(r",\s*([a-z][a-z0-9_-]*)=", value, re.I)
                    if joined:  # "{a=1,b=2}": a comma separates list items, a space separates options
                        raise PipelineSyntaxError(
                            text, vstart + joined.start(), f"options of '{name}' are separated by spaces, not commas: "
                            f"write '{key}={value[:joined.start()]} {value[joined.start() + 1:].lstrip()}' (a comma "
                            f"separates the items of a list value; quote a value that holds '=')")
                if key in spec.options:
                    raise PipelineSyntaxError(text, kstart, f"option '{key}' given twice for '{name}'")
                spec.options[key] = value
        specs.append(spec)
        i = skip_ws(i)
        if i < n:
            if text[i] != ",":
                raise PipelineSyntaxError(text, i, f"expected ',' between passes, found {text[i]!r}")
            i = skip_ws(i + 1)
            if i == n:
                raise PipelineSyntaxError(text, i - 1, "trailing ',': a pass name must follow")
    return specs


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_format_value(x) for x in v)
    s = str(v)
    return f'"{s}"' if any(c in s for c in " }\t") else s


def format_pass(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + "{" + " ".join(f"{k}={_format_value(v)}" for k, v in options.items()) + "}"


def format_pipeline(specs: list[PassSpec]) -> str:
    """The canonical text of a spec list: what logs, manifests and reproducers show."""
    return ",".join(format_pass(s.name, s.options) for s in specs)


def parse_recipe(data: Any, source: str = "recipe") -> list[PassSpec]:
    """A YAML recipe: `pipeline:` as a list of names or {name: {option: value}} maps, or as pipeline text."""
    if isinstance(data, dict):
        if "pipeline" not in data:
            raise PassOptionError(f"{source}: a recipe needs a top-level 'pipeline' key")
        data = data["pipeline"]
    if isinstance(data, str):
        return parse_pipeline(data)
    if not isinstance(data, list) or not data:
        raise PassOptionError(f"{source}: 'pipeline' must be a non-empty list of passes or a pipeline string")
    specs = []
    for k, item in enumerate(data):
        if isinstance(item, str):
            specs.append(PassSpec(item.strip(), {}, k))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            if opts is not None and not isinstance(opts, dict):
                raise PassOptionError(f"{source}: options of pass #{k + 1} '{name}' must be a mapping")
            specs.append(PassSpec(str(name), dict(opts or {}), k))
        else:
            raise PassOptionError(f"{source}: pipeline entry #{k + 1} must be a pass name or {{name: {{options}}}}")
    return specs


def load_pipeline(text_or_path: str) -> list[PassSpec]:
    """Pipeline text, or the path of a .yaml/.yml recipe file."""
    if text_or_path.endswith((".yaml", ".yml")):
        import yaml
        path = Path(text_or_path)
        if not path.exists():
            raise PassOptionError(f"recipe file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise PassOptionError(f"recipe file '{path}' is not valid YAML: {e}") from None
        return parse_recipe(data, str(path))
    return parse_pipeline(text_or_path)
