"""Running CPU artifacts outside Python: `run_artifact.cc`, a C++ program over the TVM runtime alone, and the
compiler command that builds it against the apache-tvm / apache-tvm-ffi wheels' headers and libraries.

    python -m graphopt.targets.tvm.deploy [-o run_artifact]   # prints the g++ command (and runs it with --build)
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_name("run_artifact.cc")


def _roots() -> tuple[Path, Path]:
    """The installed tvm and tvm_ffi package folders (found without importing TVM's compiler)."""
    import importlib.util
    found = []
    for name in ("tvm", "tvm_ffi"):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"the {name} package is not installed (pip install apache-tvm)")
        found.append(Path(list(spec.submodule_search_locations)[0]))
    return found[0], found[1]


def cxx_command(output: str | Path = "run_artifact", source: str | Path = SOURCE, cxx: str | None = None) -> list[str]:
    """The command line compiling `source` (default: run_artifact.cc) into `output`, linked to TVM's runtime and
    tvm-ffi (by rpath: the executable runs where the wheels are installed, or with LD_LIBRARY_PATH set to their
    folders where you copy the two libraries). libtvm_runtime is linked even though the program calls none of its
    symbols directly (--no-as-needed): the model library's kernels and the Relax VM it loads live there."""
    tvm_root, ffi_root = _roots()
    cxx = cxx or shutil.which("g++") or shutil.which("clang++") or "c++"
    return [cxx, "-std=c++17", "-O2", str(source), "-o", str(output),
            f"-I{tvm_root / 'include'}", f"-I{ffi_root / 'include'}",
            f"-L{tvm_root / 'lib'}", f"-L{ffi_root / 'lib'}",
            "-Wl,--no-as-needed", "-ltvm_runtime", "-ltvm_ffi", "-ldl", "-lpthread",
            f"-Wl,-rpath,{tvm_root / 'lib'}", f"-Wl,-rpath,{ffi_root / 'lib'}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m graphopt.targets.tvm.deploy",
                                 description="Print (or run, with --build) the C++ compiler command that builds "
                                             "run_artifact, which runs a graphopt CPU artifact with the TVM runtime "
                                             "and no Python: run_artifact DIR in0.npy ... [-o OUT_PREFIX] "
                                             "[--repeat N].")
    ap.add_argument("-o", "--output", default="run_artifact", help="the executable to write (default: run_artifact)")
    ap.add_argument("--build", action="store_true", help="run the command instead of printing it")
    ap.add_argument("--source", action="store_true", help="print the path of run_artifact.cc and exit")
    args = ap.parse_args(argv)
    if args.source:
        print(SOURCE)
        return 0
    cmd = cxx_command(args.output)
    if not args.build:
        print(shlex.join(cmd))
        return 0
    res = subprocess.run(cmd)
    if res.returncode == 0:
        print(f"wrote {args.output}")
    return res.returncode

