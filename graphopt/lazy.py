"""What `import graphopt` must keep light (no torch): module attributes imported on first use (PEP 562), and the
loaders the pass registry runs on its first lookup."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, names: dict[str, str], namespace: dict[str, Any]
                    ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`: each name in `names` (name -> module holding it) is imported
    from its module the first time it is read, then kept in the package's `namespace`."""
    def getattr_(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted(set(namespace) | set(names))
    return getattr_, dir_


# callables that register passes, run once by the pass registry on its first lookup: the top-level package adds
# the loader of the built-in passes, which `import graphopt` no longer imports (a process that only runs artifacts
# never needs them), so the registry (graphopt.pm) never imports the passes layer above it
PASS_LOADERS: list[Callable[[], Any]] = []
