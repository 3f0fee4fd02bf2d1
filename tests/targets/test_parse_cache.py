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
