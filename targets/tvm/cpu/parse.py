"""TVMScript parsing of graphopt's generated kernels, once per distinct source, and kept on disk."""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import zlib
from pathlib import Path

log = logging.getLogger("graphopt")


def kernel_cache_dir() -> Path | None:
    """Where parsed kernels are kept: <user cache>/kernels (`files.user_cache_dir`); None when
    GRAPHOPT_KERNEL_CACHE=off."""
    if os.environ.get("GRAPHOPT_KERNEL_CACHE", "").lower() in ("0", "off", "false", "no"):
        return None
    from graphopt.ir.files import user_cache_dir
    return user_cache_dir() / "kernels"


@functools.lru_cache(maxsize=1)
def _script_namespace(T):
    """tirx's script namespace `T` for parsing a kernel's source, except that its decorator `T.prim_func(private=True)`
    evaluates to `T.prim_func` itself. The parser evaluates the decorator only for its dispatch token (and reads
    `private` from the source), but tirx's `prim_func(...)` first takes `inspect.stack()`, which reads the source
    lines of every calling frame: 0.2 s a kernel under pytest (12% of a kernel test file's time), 16 ms at the top of a
    script."""

    def prim_func(func=None, **kwargs):
        return T.prim_func

    prim_func.dispatch_token = T.prim_func.dispatch_token  # (a bare `@T.prim_func` is taken for its token alone)

    class Namespace:
        def __getattr__(self, name):
            return getattr(T, name)

    namespace = Namespace()
    namespace.prim_func = prim_func
    return namespace


@functools.lru_cache(maxsize=512)
def parse_kernel(source: str):
    """tvm.script.parse of a kernel's TVMScript source, cached by the source text in this process and on disk.

    Parsing is most of lowering's time (MobileNetV2: 54 kernel sources, 9 s of parsing; a BSR kernel ~0.4 s, 60% of
    select-sparse-layout's time per layer), and a model's layers of one shape share a source: MiniLM's 36 linears
    have 4, MobileNetV2's blocks repeat, and the float sparse kernels leave their stored-block count symbolic
    (`sparse.NNZ`) so that every layer of a shape shares one. On disk each parsed kernel is TVM's JSON of the
    PrimFunc, compressed, named by a digest of the TVM and tvm-ffi versions and the source (so another TVM, or a
    changed kernel generator, never reads an old one): loading MobileNetV2's 54 took 1.4 s against 9 s. A file
    that does not load is parsed again and rewritten. PrimFuncs are immutable, so the cached one is shared."""
    import tvm
    from tvm.script import tirx as T
    folder = kernel_cache_dir()
    path = None
    if folder is not None:
        try:
            import tvm_ffi
            ffi = getattr(tvm_ffi, "__version__", "")
        except ImportError:
            ffi = ""
        key = hashlib.sha256(f"{tvm.__version__}\0{ffi}\0{source}".encode()).hexdigest()[:40]
        path = folder / f"{key}.json.z"
        if path.exists():
            try:
                return tvm.ir.load_json(zlib.decompress(path.read_bytes()).decode())
            except Exception as e:  # corrupt or truncated: parse again below
                log.debug("parsed-kernel cache %s unreadable (%s); parsing again", path, e)
    func = tvm.script.parse(source, extra_vars={"T": _script_namespace(T)})
    if path is not None:
        from graphopt.ir.files import atomic_write_bytes
        try:
            atomic_write_bytes(path, zlib.compress(tvm.ir.save_json(func).encode(), 1))
        except OSError as e:
            log.debug("could not keep the parsed kernel in %s: %s", path, e)
    return func
