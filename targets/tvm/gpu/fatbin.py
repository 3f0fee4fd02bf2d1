"""Cross-compile a built CUDA module's kernels with the local nvcc and put the fatbin in the exported library.

TVM 0.27 keeps CUDA kernels as source when no GPU is present and compiles them when the library is loaded, which
needs NVRTC or nvcc on the GPU machine. graphopt compiles them here instead, for every requested architecture
(machine code for each, plus PTX of the newest so later GPUs can JIT it), and rewrites the library's import blob so
the CUDA module is stored as `[fmt="fatbin"][function table][fatbin]`: the format TVM's CUDA runtime module saves
and loads (`cuModuleLoadData` accepts a fatbin), so loading needs no compiler.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

from graphopt.errors import TargetError

_U64 = struct.Struct("<Q")


def nvcc_path() -> str:
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.exists(cand):
            return cand
    raise TargetError("the cuda targets cross-compile their kernels with nvcc, which was not found: install the CUDA "
                      "toolkit (nvcc on PATH or CUDA_HOME set), or compile with --target llvm")


def _gencode(archs: list[str]) -> list[str]:
    out = []
    for a in archs:
        n = a.split("_", 1)[1]
        out += ["-gencode", f"arch=compute_{n},code=sm_{n}"]
    newest = max(archs, key=lambda a: int(a.split("_", 1)[1].rstrip("a")))
    n = newest.split("_", 1)[1]
    out += ["-gencode", f"arch=compute_{n},code=compute_{n}"]  # PTX for GPUs newer than the list
    return out


def compile_fatbin(source: str, archs: list[str], workdir: Path, name: str = "kernels") -> bytes:
    """nvcc --fatbin for each architecture in `archs` (e.g. ["sm_80", "sm_90"]); a compile error names the file."""
    src = workdir / f"{name}.cu"
    out = workdir / f"{name}.fatbin"
    src.write_text(source)
    cmd = [nvcc_path(), "--fatbin", "-O3", "-std=c++17", *_gencode(archs), "-o", str(out), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        import tempfile
        kept = Path(tempfile.mkdtemp(prefix="graphopt-nvcc-")) / src.name  # the build's workspace is deleted
        shutil.copy(src, kept)
        raise TargetError(f"nvcc could not compile the CUDA kernels for {','.join(archs)} (source kept at {kept}):\n"
                          + (res.stderr or res.stdout)[-3000:])
    return out.read_bytes()


def compile_ptx(source: str, arch: str, workdir: Path, name: str = "kernels") -> str:
    """nvcc --ptx for one architecture (tests read the instructions a kernel uses)."""
    src = workdir / f"{name}.cu"
    out = workdir / f"{name}.ptx"
    src.write_text(source)
    n = arch.split("_", 1)[1]
    res = subprocess.run([nvcc_path(), "--ptx", "-O3", "-std=c++17", f"-arch=compute_{n}", "-o", str(out), str(src)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"nvcc --ptx failed for {arch}:\n" + (res.stderr or res.stdout)[-3000:])
    return out.read_text()


# -- the import blob: [u64 size] [u64 n, row_ptr...] [u64 m, child...] then per module: [str kind] ([str payload]) --

def _read_u64(b: bytes, i: int) -> tuple[int, int]:
    return _U64.unpack_from(b, i)[0], i + 8


def _read_bytes(b: bytes, i: int) -> tuple[bytes, int]:
    n, i = _read_u64(b, i)
    return b[i:i + n], i + n


def _bytes(x: bytes) -> bytes:
    return _U64.pack(len(x)) + x


def parse_import_blob(blob: bytes) -> tuple[list[int], list[int], list[tuple[str, bytes | None]]]:
    """(import tree row pointers, children, [(module kind, payload or None for the host library)])."""
    size, i = _read_u64(blob, 0)
    if size != len(blob) - 8:
        raise TargetError(f"unexpected TVM import blob: header says {size} bytes, holds {len(blob) - 8}")
    n, i = _read_u64(blob, i)
    rows = list(struct.unpack_from(f"<{n}Q", blob, i)); i += 8 * n
    m, i = _read_u64(blob, i)
    children = list(struct.unpack_from(f"<{m}Q", blob, i)); i += 8 * m
    modules = []
    for _ in range(len(rows) - 1):
        kind, i = _read_bytes(blob, i)
        if kind == b"_lib":
            modules.append(("_lib", None))
            continue
        payload, i = _read_bytes(blob, i)
        modules.append((kind.decode(), payload))
    if i != len(blob):
        raise TargetError(f"unexpected TVM import blob: {len(blob) - i} bytes left after {len(modules)} modules")
    return rows, children, modules


def write_import_blob(rows: list[int], children: list[int], modules: list[tuple[str, bytes | None]]) -> bytes:
    body = _U64.pack(len(rows)) + struct.pack(f"<{len(rows)}Q", *rows)
    body += _U64.pack(len(children)) + struct.pack(f"<{len(children)}Q", *children)
    for kind, payload in modules:
        body += _bytes(kind.encode())
        if payload is not None:
            body += _bytes(payload)
    return _U64.pack(len(body)) + body


def split_cuda_payload(payload: bytes, source: str) -> tuple[str, bytes, bytes]:
    """(fmt, serialized function table, code) of a CUDA module payload whose code is `source`."""
    fmt, i = _read_bytes(payload, 0)
    code = source.encode()
    tail = _bytes(code)
    if not payload.endswith(tail):
        raise TargetError("the CUDA module in TVM's import blob does not end with its source; "
                          "this TVM version serializes CUDA modules differently")
    return fmt.decode(), payload[i:len(payload) - len(tail)], code


def cuda_payload(fmt: str, fmap: bytes, code: bytes) -> bytes:
    return _bytes(fmt.encode()) + fmap + _bytes(code)


def cuda_sources(mod) -> list[str]:
    """Every CUDA module's source in `mod`'s import tree (depth first, the blob's order)."""
    out, seen = [], set()

    def walk(m):
        for sub in m.imports:
            if sub.kind == "cuda" and id(sub) not in seen:
                seen.add(id(sub))
                out.append(sub.inspect_source())
            walk(sub)

    walk(mod)
    return out


def _object_from_blob(blob: bytes, workdir: Path) -> str:
    """An object file defining `__tvm_ffi__library_bin` as `blob` (assembled with .incbin: no giant C array)."""
    bin_path = workdir / "imports.bin"
    bin_path.write_bytes(blob)
    asm = workdir / "imports.S"
    asm.write_text(
        '\t.section .rodata.tvm_ffi_library_bin,"a"\n'
        "\t.globl __tvm_ffi__library_bin\n"
        "\t.type __tvm_ffi__library_bin, @object\n"
        "\t.p2align 4\n"
        "__tvm_ffi__library_bin:\n"
        f'\t.incbin "{bin_path}"\n'
        f"\t.size __tvm_ffi__library_bin, {len(blob)}\n"
        '\t.section .note.GNU-stack,"",@progbits\n')
    obj = workdir / "imports.o"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "g++"
    res = subprocess.run([cc, "-c", str(asm), "-o", str(obj)], capture_output=True, text=True)
    if res.returncode != 0:
        raise TargetError(f"could not assemble the import blob with {cc}: {res.stderr[-2000:]}")
    return str(obj)


def fatbin_packer(archs: list[str], record: dict):
    """An `fpack_imports` for `export_library`: every CUDA module's source becomes a fatbin for `archs`.
    `record` receives what was compiled (for the manifest)."""
    import tvm

    def pack(mod, is_system_lib, prefix, workspace_dir):
        if is_system_lib or prefix:
            raise TargetError("system-library export is not supported for the cuda targets")
        work = Path(workspace_dir)
        blob = bytes(tvm.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy())
        rows, children, modules = parse_import_blob(blob)
        sources = cuda_sources(mod)
        kernels = []
        for k, (kind, payload) in enumerate(modules):
            if kind != "cuda":
                continue
            source = next((s for s in sources if payload.endswith(_bytes(s.encode()))), None)
            if source is None:
                raise TargetError("a CUDA module in the import blob matches no CUDA source in the build")
            fmt, fmap, _ = split_cuda_payload(payload, source)
            if fmt != "cuda":
                continue  # already binary
            fatbin = compile_fatbin(source, archs, work, f"kernels{k}")
            modules[k] = ("cuda", cuda_payload("fatbin", fmap, fatbin))
            kernels.append({"source_bytes": len(source), "fatbin_bytes": len(fatbin)})
        record.update({"archs": list(archs), "cuda_modules": kernels, "nvcc": nvcc_path()})
        return _object_from_blob(write_import_blob(rows, children, modules), work)

    return pack


# -- reading an artifact back (the manifest, tests and `graphopt inspect`) ------------------------------------------

def library_blob(so_path: str | Path) -> bytes:
    """The import blob (`__tvm_ffi__library_bin`) of an exported library, read from its ELF symbol table."""
    data = Path(so_path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise TargetError(f"'{so_path}' is not a 64-bit ELF library")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    for sh in sections:
        if sh[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            name_off, _info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, off)
            start = strtab[4] + name_off
            if data[start:data.index(b"\0", start)] != b"__tvm_ffi__library_bin":
                continue
            host = sections[shndx]  # file offset = value - section address + section offset
            pos = value - host[3] + host[4]
            size, = struct.unpack_from("<Q", data, pos)
            return data[pos:pos + 8 + size]
    raise TargetError(f"'{so_path}' has no TVM import blob (not a TVM library with device code)")


def fatbin_entries(fatbin: bytes) -> list[dict]:
    """[{kind: 'elf'|'ptx', arch: 'sm_80', bytes}] of an nvcc fatbin (container magic 0xBA55ED50)."""
    magic, _version, header, size = struct.unpack_from("<IHHQ", fatbin, 0)
    if magic != 0xBA55ED50:
        raise TargetError("not an nvcc fatbin")
    out, i = [], header
    while i < header + size:
        kind, _v, ehs, padded = struct.unpack_from("<HHII", fatbin, i)
        sm, = struct.unpack_from("<I", fatbin, i + 28)
        out.append({"kind": {1: "ptx", 2: "elf"}.get(kind, str(kind)), "arch": f"sm_{sm}", "bytes": padded})
        i += ehs + padded
    return out


def _trailing_fatbin(payload: bytes) -> bytes:
    """The fatbin a CUDA module payload ends with: the magic whose header + size reach exactly the end."""
    magic = struct.pack("<I", 0xBA55ED50)
    at = payload.find(magic)
    while at >= 0:
        _m, _v, header, size = struct.unpack_from("<IHHQ", payload, at)
        if at + header + size == len(payload):
            return payload[at:]
        at = payload.find(magic, at + 1)
    raise TargetError("the CUDA module's payload does not end with a fatbin")


def artifact_cuda_modules(so_path: str | Path) -> list[dict]:
    """Each CUDA module of an exported library: its stored format and, for a fatbin, what it holds."""
    _rows, _children, modules = parse_import_blob(library_blob(so_path))
    out = []
    for kind, payload in modules:
        if kind != "cuda":
            continue
        fmt, _ = _read_bytes(payload, 0)
        rec = {"format": fmt.decode()}
        if rec["format"] == "fatbin":
            rec["entries"] = fatbin_entries(_trailing_fatbin(payload))
        out.append(rec)
    return out
