"""Parsed kernels are kept on disk by a digest of the TVM version and the source: a later process loads them instead
of parsing (TVMScript parsing was most of lowering's time), a damaged file is parsed again and rewritten, and
GRAPHOPT_KERNEL_CACHE=off keeps nothing."""
from __future__ import annotations

import tvm

from graphopt.targets.tvm.cpu import parse
from graphopt.targets.tvm.cpu.sparse import csr_gemv_source


def _src() -> str:
    return csr_gemv_source(1, 40, 24, 100)


def test_a_parsed_kernel_is_loaded_from_disk_afterwards(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("GRAPHOPT_KERNEL_CACHE", raising=False)
    parse.parse_kernel.cache_clear()
    first = parse.parse_kernel(_src())
    files = list((tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].name.endswith(".json.z")
    parse.parse_kernel.cache_clear()  # a new process: only the disk has it

    def no_parse(*a, **k):
        raise AssertionError("parsed again")
    monkeypatch.setattr(tvm.script, "parse", no_parse)
    tvm.ir.assert_structural_equal(parse.parse_kernel(_src()), first)
    parse.parse_kernel.cache_clear()


def test_a_damaged_file_is_parsed_again_and_off_keeps_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path))
    monkeypatch.delenv("GRAPHOPT_KERNEL_CACHE", raising=False)
    parse.parse_kernel.cache_clear()
    good = parse.parse_kernel(_src())
    (path,) = (tmp_path / "kernels").iterdir()
    path.write_bytes(b"not zlib")
    parse.parse_kernel.cache_clear()
    tvm.ir.assert_structural_equal(parse.parse_kernel(_src()), good)
    assert path.read_bytes() != b"not zlib"  # rewritten
    monkeypatch.setenv("GRAPHOPT_KERNEL_CACHE", "off")
    monkeypatch.setenv("GRAPHOPT_CACHE", str(tmp_path / "other"))
    parse.parse_kernel.cache_clear()
    parse.parse_kernel(_src())
    assert not (tmp_path / "other").exists()
    parse.parse_kernel.cache_clear()


def test_kernels_parse_as_tvmscript_parses_them_without_reading_the_call_stack(monkeypatch):
    """parse_kernel's `T` answers the decorator without tirx's `inspect.stack()` (0.2 s a kernel under pytest): the
    PrimFunc is the one tvm.script.parse makes, a private kernel stays private (no global symbol), and a bare
    `@T.prim_func` parses too."""
    import inspect

    from tvm.script import tirx as T
    monkeypatch.setenv("GRAPHOPT_KERNEL_CACHE", "off")
    parse.parse_kernel.cache_clear()
    bare = _src().replace("@T.prim_func(private=True)", "@T.prim_func")
    assert bare != _src()
    want = {src: tvm.script.parse(src, extra_vars={"T": T}) for src in (_src(), bare)}
    calls = []
    real_stack = inspect.stack
    monkeypatch.setattr(inspect, "stack", lambda *a, **k: calls.append(1) or real_stack(*a, **k))
    for src, ref in want.items():
        got = parse.parse_kernel(src)
        tvm.ir.assert_structural_equal(got, ref)
        assert (got.attrs.get("global_symbol") is None) == (src == _src())
    assert not calls
    parse.parse_kernel.cache_clear()
