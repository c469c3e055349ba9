"""Build script. The Triton kernels live in kernels/ and install as the subpackage fastkd.kernels; the C++ CPU
backend in csrc/ builds as the extension fastkd._C, the CUDA backend as fastkd._C_cuda.

The CPU extension is optional: if it cannot be built (no C++17 compiler, say) the install goes on without it and
fastkd runs CPU tensors through its reference implementation. FASTKD_BUILD_CPU=0 skips it on purpose.
Each instruction-set translation unit gets its own flags; at run time the extension picks the best one the CPU
supports. OpenMP is used where the compiler has it.

The CUDA extension (fastkd/cuda_build.py: nvcc, with ninja where there is one; no torch headers) is built next
to it when FASTKD_BUILD_CUDA is "1" (a failure stops the install), or by default ("auto") when nvcc and an NVIDIA
driver are both present (a failure only warns: the module can still be built just in time on first use). "0"
skips it. FASTKD_CUDA_ARCHS lists the compute capabilities (default "80;90"). The CUDA sources also ship inside
the package (fastkd/csrc), for that just-in-time build.
"""

import ctypes.util
import glob
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_build():
    """fastkd/cuda_build.py, loaded by path (the package itself imports torch)."""
    spec = importlib.util.spec_from_file_location("fastkd_cuda_build", os.path.join(ROOT, "fastkd", "cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cuda_wanted(builder) -> bool:
    choice = os.environ.get("FASTKD_BUILD_CUDA", "auto")
    if choice not in ("0", "1", "auto"):
        raise ValueError(f"FASTKD_BUILD_CUDA must be 0, 1 or auto, got {choice!r}")
    if choice != "auto":
        return choice == "1"
    driver = ctypes.util.find_library("cuda") is not None or os.path.exists("/proc/driver/nvidia/version")
    return driver and builder.find_nvcc() is not None


ISA_FLAGS = {  # per source file; x86-64 with GCC or Clang only, other targets build the portable kernels alone
    "kd_cpu_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mfma"],
    "kd_cpu_avx2.cpp": ["-mavx2", "-mfma"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


class BuildExt(build_ext):
    """build_ext with per-file instruction-set flags and OpenMP when the compiler accepts -fopenmp."""

    def build_extension(self, ext):
        unix = self.compiler.compiler_type == "unix"
        if unix and self._accepts("-fopenmp"):
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        compile_one = self.compiler._compile

        def compile_with_isa_flags(obj, src, src_ext, cc_args, extra_postargs, pp_opts):
            flags = ISA_FLAGS.get(os.path.basename(src), []) if unix and X86 else []
            compile_one(obj, src, src_ext, cc_args, extra_postargs + flags, pp_opts)

        self.compiler._compile = compile_with_isa_flags
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = compile_one

    def run(self):
        super().run()
        builder = _cuda_build()
        if not _cuda_wanted(builder):
            return
        output = os.path.join(os.path.dirname(self.get_ext_fullpath("fastkd._C")), builder.module_filename())
        arches = builder.parse_arches(os.environ.get("FASTKD_CUDA_ARCHS", "80;90"))
        try:
            builder.build(output, arches)
        except RuntimeError as exc:
            if os.environ.get("FASTKD_BUILD_CUDA") == "1":
                raise
            warnings.warn(
                f"fastkd: the CUDA extension was not built ({exc}); it will be built on first use", stacklevel=2
            )

    def _accepts(self, flag):
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cpp")
            with open(src, "w") as f:
                f.write("int main() { return 0; }\n")
            cmd = self.compiler.compiler_so + [flag, src, "-o", os.path.join(tmp, "probe")]
            return subprocess.run(cmd, capture_output=True).returncode == 0


class BuildPy(build_py):
    """build_py that also ships the CUDA sources as fastkd/csrc, for the just-in-time build of an install."""

    def run(self):
        super().run()
        builder = _cuda_build()
        target = os.path.join(self.build_lib, "fastkd", "csrc")
        os.makedirs(target, exist_ok=True)
        for name in builder.SOURCES + builder.HEADERS:
            source = os.path.join(ROOT, "csrc", name)
            if not os.path.exists(source):
                warnings.warn(
                    f"fastkd: {source} is missing; the CUDA extension cannot be built just in time", stacklevel=2
                )
                continue
            shutil.copy2(source, target)


class WithExtensions(Distribution):
    """Always runs build_ext (which builds the CUDA module), also when the CPU extension is skipped."""

    def has_ext_modules(self):
        return True


ext_modules = []
if os.environ.get("FASTKD_BUILD_CPU", "1") != "0":
    ext_modules.append(
        Pybind11Extension(
            "fastkd._C",
            [
                os.path.join("csrc", f)
                for f in (
                    "module.cpp",
                    "buffer_pool.cpp",
                    "kd_cpu_avx512.cpp",
                    "kd_cpu_avx2.cpp",
                    "kd_cpu_portable.cpp",
                )
            ],
            cxx_std=17,
            # -fno-wrapv undoes Python's -fwrapv, which made the vector loops up to 2× slower (bench/RESULTS.md)
            # -Werror=switch: a switch over a mode enum that misses an enumerator does not build (static_switch.h)
            extra_compile_args=["-O3", "-ffp-contract=fast", "-fno-wrapv", "-Werror=switch"]
            if os.name != "nt"
            else ["/O2"],
            depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
            optional=True,
        )
    )
    ParallelCompile("FASTKD_BUILD_JOBS", default=0).install()

setup(
    packages=["fastkd", "fastkd.kernels"],
    package_dir={"fastkd": "fastkd", "fastkd.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
    distclass=WithExtensions,
)
