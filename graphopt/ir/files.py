"""Atomic writes: an artifact is either complete at its path or not there at all."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from graphopt.errors import ArtifactError


def user_cache_dir() -> Path:
    """graphopt's cache folder: $GRAPHOPT_CACHE, else ~/.cache/graphopt (layout timings, parsed kernels)."""
    return Path(os.environ.get("GRAPHOPT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "graphopt"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a temporary file or folder the mode a plain open() / mkdir() would have (0644 / 0755 under the usual
    umask): mkstemp's 0600 and mkdtemp's 0700 made every artifact unreadable to the other users of a deploy
    machine (a service account serving what a build user compiled)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        plain_mode(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


MARKER = "manifest.json"


@contextmanager
def atomic_dir(path: str | os.PathLike, marker: str = MARKER) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`.

    An existing `path` is replaced only if it is an earlier artifact of ours (it holds `marker`) or empty,
    so a user's unrelated folder is never overwritten.
    """
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ArtifactError(f"output '{path}' exists and is a file; choose another output folder")
        if any(path.iterdir()) and not (path / marker).exists():
            raise ArtifactError(
                f"output folder '{path}' exists, is not empty and is not a graphopt artifact; "
                "refusing to overwrite it: choose another output folder or remove it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        plain_mode(tmp, directory=True)
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
