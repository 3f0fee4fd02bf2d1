"""Typed pass options: coerce pipeline text values into an Options dataclass, with errors naming pass and option."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, get_args, get_origin

from graphopt.errors import PassOptionError


def type_text(tp: Any) -> str:
    """A short human name of an option's type: int, float, bool, str, one of a|b|c, list of str, ..."""
    if isinstance(tp, str):
        return tp
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        return f"list of {type_text(inner)}"
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(tp) if a is not type(None)]
        return " or ".join(type_text(a) for a in args) + " (optional)"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        errors = []
        for a in args:
            try:
                return _coerce(value, a, where)
            except PassOptionError as e:
                errors.append(str(e))
        raise PassOptionError(errors[0])
    if origin is Literal:
        choices = get_args(tp)
        if value in choices or str(value) in [str(c) for c in choices]:
            return next(c for c in choices if str(c) == str(value))
        raise PassOptionError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (str,)
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        return [_coerce(v.strip() if isinstance(v, str) else v, inner, where) for v in items]
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in ("true", "1", "yes", "on"):
            return True
        if s in ("false", "0", "no", "off"):
            return False
        raise PassOptionError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}") from None
        if f != int(f):
            raise PassOptionError(f"{where}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise PassOptionError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def build_options(pass_name: str, options_cls: type, values: dict[str, Any]) -> Any:
    """Make an Options instance from {'option-name': value}; unknown names and bad values raise PassOptionError."""
    hints = typing.get_type_hints(options_cls)
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    kwargs = {}
    for key, value in values.items():
        attr = key.replace("-", "_")
        if attr not in fields:
            import difflib
            names = [n.replace("_", "-") for n in fields]
            close = difflib.get_close_matches(key, names, n=1)
            known = ", ".join(names) if names else "none"
            raise PassOptionError(f"pass '{pass_name}' has no option '{key}'"
                                  + (f"; did you mean '{close[0]}'?" if close else "") + f" (options: {known})")
        kwargs[attr] = _coerce(value, hints[attr], f"pass '{pass_name}' option '{key}'")
    try:
        opts = options_cls(**kwargs)
    except TypeError as e:
        raise PassOptionError(f"pass '{pass_name}': {e}") from None
    object.__setattr__(opts, "_given", frozenset(kwargs))  # (which options the pipeline spelled out: `was_given`)
    check = getattr(opts, "validate", None)
    if check is not None:
        problem = check()
        if problem:
            raise PassOptionError(f"pass '{pass_name}' {problem}")
    return opts


def was_given(options, name: str) -> bool:
    """Whether the pipeline text set option `name` (its attribute name) rather than leaving the default; options
    built in code, not from a pipeline, count as given."""
    given = getattr(options, "_given", None)
    return True if given is None else name in given
