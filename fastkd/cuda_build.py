"""Building fastkd's CUDA extension ``fastkd._C_cuda`` (csrc/kd_cuda.cu + csrc/cuda_module.cpp) with nvcc and ninja
(or nvcc alone, one step after another, where ninja is missing).

Ahead of time, setup.py calls :func:`build` (see ``FASTKD_BUILD_CUDA`` there). Just in time,
:mod:`fastkd.cuda_backend` calls :func:`cached_build` on first use when the installed package has no prebuilt
module: the result is cached per user in ``$FASTKD_CACHE_DIR`` (default ``~/.cache/fastkd``), keyed by the
sources, the nvcc version, the Python ABI and the target architectures, and built under a file lock (several
processes of one job build it once). The module includes no torch headers and links the CUDA runtime statically,
so one nvcc compile of two files is all it takes.

Standard library only: setup.py loads this file by path, before torch may be installed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Optional, Sequence

SOURCES = ("kd_cuda.cu", "cuda_module.cpp")
HEADERS = ("kd_cuda.h", "kd_cuda_row.h", "kd_args.h", "binding_args.h")
MODULE = "_C_cuda"
_HERE = Path(__file__).resolve().parent


def source_dir() -> Path:
    """csrc/: beside the package in a source checkout (editable installs), inside it in a wheel."""
    for candidate in (_HERE.parent / "csrc", _HERE / "csrc"):
        if (candidate / SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"fastkd's CUDA sources ({SOURCES[0]}) are neither in {_HERE.parent / 'csrc'} nor in {_HERE / 'csrc'}"
    )


def find_nvcc() -> Optional[str]:
    """nvcc from $CUDA_HOME, $CUDA_PATH, PATH or /usr/local/cuda; None if there is none."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None


def find_ninja() -> Optional[str]:
    """The ninja of the ``ninja`` Python package, or one on PATH; None if there is none."""
    try:
        import ninja

        candidate = os.path.join(ninja.BIN_DIR, "ninja")
        if os.access(candidate, os.X_OK):
            return candidate
    except ImportError:
        pass
    return shutil.which("ninja")


def module_filename() -> str:
    return MODULE + sysconfig.get_config_var("EXT_SUFFIX")


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:
        raise RuntimeError("building fastkd's CUDA extension needs pybind11 (pip install pybind11)") from exc
    return pybind11.get_include()


def parse_arches(text: str) -> list:
    """Compute capabilities from "80;90", "8.0,9.0" or "80 90" as ["80", "90"]; ValueError for anything else."""
    arches = [a.replace(".", "") for a in re.split(r"[;,\s]+", text.strip()) if a]
    if not arches or not all(re.fullmatch(r"\d{2,3}a?", a) for a in arches):
        raise ValueError(f"compute capabilities must look like '80;90' (or '8.0;9.0'), got {text!r}")
    return arches


def gencode_flags(arches: Sequence[str]) -> list:
    """Machine code for each compute capability ("80", "90", ...) and PTX of the newest, which later GPUs JIT."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in arches]
    return flags + [f"-gencode=arch=compute_{arches[-1]},code=compute_{arches[-1]}"]


def _commands(nvcc: str, src: Path, work: Path, output: Path, arches: Sequence[str]) -> list:
    """(command, output, inputs) of each step: compile each source (the .cu for ``arches``), then link."""
    includes = [f"-I{src}", f"-I{_pybind11_include()}", f"-I{sysconfig.get_paths()['include']}"]
    flags = [
        "-O3",
        "-std=c++17",
        "-Xcompiler",
        "-fPIC",
        "-Xcompiler",
        "-fvisibility=hidden",
        "-Xcompiler",
        "-Werror=switch",
        *includes,
    ]
    steps, objects = [], []
    for source in SOURCES:
        obj = work / f"{Path(source).stem}.o"
        # the .cu gets machine code for each architecture; the binding reports which (module.archs)
        arch_flags = gencode_flags(arches) if source.endswith(".cu") else [f'-DFASTKD_CUDA_ARCHS="{",".join(arches)}"']
        steps.append(([nvcc, *flags, *arch_flags, "-c", str(src / source), "-o", str(obj)], obj, [src / source]))
        objects.append(obj)
    steps.append(([nvcc, "-shared", *map(str, objects), "-o", str(output)], output, objects))
    return steps


def _ninja_path(path) -> str:
    return str(path).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_file(steps: list, headers: list) -> str:
    lines = ["ninja_required_version = 1.3", "rule run", "  command = $cmd", "  description = $desc"]
    for command, output, inputs in steps:
        implicit = f" | {' '.join(map(_ninja_path, headers))}" if output.suffix == ".o" else ""
        lines += [
            f"build {_ninja_path(output)}: run {' '.join(map(_ninja_path, inputs))}{implicit}",
            f"  cmd = {shlex.join(command).replace('$', '$$')}",
            f"  desc = {Path(command[0]).name} {output.name}",
        ]
    return "\n".join(lines) + "\n"


def build(
    output: Path, arches: Sequence[str] = ("80", "90"), build_dir: Optional[Path] = None, verbose: bool = False
) -> Path:
    """Compile and link the extension into ``output`` (a path ending in :func:`module_filename`) for the compute
    capabilities ``arches``: with ninja (parallel, incremental in ``build_dir``), or one step after another where
    there is no ninja. Raises RuntimeError (with the compiler's output) when nvcc is missing or a step fails."""
    nvcc, ninja = find_nvcc(), find_ninja()
    if nvcc is None:
        raise RuntimeError("building fastkd's CUDA extension needs nvcc (set CUDA_HOME or put nvcc on PATH)")
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    src = source_dir()
    with tempfile.TemporaryDirectory(prefix="fastkd-cuda-") as scratch:
        work = Path(build_dir).resolve() if build_dir is not None else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        partial = work / module_filename()
        steps = _commands(nvcc, src, work, partial, list(arches))
        if ninja is not None:
            (work / "build.ninja").write_text(_ninja_file(steps, [src / h for h in HEADERS]))
            runs = [[ninja, "-C", str(work)] + (["-v"] if verbose else [])]
        else:
            runs = [command for command, _, _ in steps]
        for run in runs:
            result = subprocess.run(run, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(
                    f"building fastkd's CUDA extension failed:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"
                )
            if verbose:
                sys.stderr.write(result.stdout + result.stderr)
        shutil.copy2(partial, output.with_suffix(".partial"))
        os.replace(output.with_suffix(".partial"), output)  # atomic: a reader never sees half a module
    return output


def cache_dir() -> Path:
    return Path(os.environ.get("FASTKD_CACHE_DIR", Path.home() / ".cache" / "fastkd"))


def build_key(arches: Sequence[str]) -> str:
    """What the cached module depends on: this builder (its flags), the sources, the nvcc version, the Python ABI
    and the architectures."""
    digest = hashlib.sha256(Path(__file__).read_bytes())  # the flags
    src = source_dir()
    for name in SOURCES + HEADERS:
        digest.update(name.encode() + b"\0" + (src / name).read_bytes())
    digest.update(nvcc_version().encode() + module_filename().encode() + ",".join(arches).encode())
    return digest.hexdigest()[:20]


def cached_build(arches: Sequence[str]) -> Path:
    """The extension for ``arches`` from the per-user cache, built there first if it is missing."""
    directory = cache_dir() / f"cuda-{build_key(arches)}"
    directory.mkdir(parents=True, exist_ok=True)
    output = directory / module_filename()
    with open(directory / ".lock", "w") as lock:
        try:
            import fcntl  # POSIX; elsewhere concurrent first builds each build (the replace stays atomic)

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:
            pass
        if not output.exists():
            build(output, arches)
    return output


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    """What ``nvcc --version`` prints for the nvcc :func:`find_nvcc` finds ("none" without one); asked once."""
    nvcc = find_nvcc()
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else "none"


def nvcc_major() -> Optional[int]:
    """The CUDA major version of that nvcc (13 for "release 13.0"), None without one."""
    found = re.search(r"release (\d+)\.", nvcc_version())
    return int(found.group(1)) if found else None
