"""Build: pure-Python package plus, when nvcc is available, the CUDA extension sparsekern._C.

The extension is built by CMake (CMakeLists.txt) rather than torch.utils.cpp_extension so that it
needs no torch headers and builds against any torch (including CPU-only wheels).

  SPARSEKERN_NO_CUDA=1       skip the CUDA extension even if nvcc is present
  CMAKE_CUDA_ARCHITECTURES   / CUDAARCHS: override the default "80;90"
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _find_nvcc():
    if os.environ.get("SPARSEKERN_NO_CUDA", "").strip().lower() not in ("", "0", "false", "no"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        nvcc = cand if os.access(cand, os.X_OK) else None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])  # sources are listed in CMakeLists.txt


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        # setuptools builds into build_lib and copies to the source tree for --inplace and for
        # `pip install -e .` (editable mode sets inplace), so sparsekern/_C*.so lands there too.
        out_file = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(out_file)
        cmake = shutil.which("cmake")
        if cmake is None:
            # nvcc is present, so a missing CUDA extension would be a silent regression: fail.
            raise RuntimeError("sparsekern: nvcc found but cmake is not on PATH; install cmake>=3.18 "
                               "or set SPARSEKERN_NO_CUDA=1 for a pure-Python install")
        pybind11_dir = subprocess.check_output(
            [sys.executable, "-m", "pybind11", "--cmakedir"], text=True).strip()
        build_temp = os.path.abspath(os.path.join(self.build_temp, "cmake"))
        os.makedirs(build_temp, exist_ok=True)
        src = os.path.dirname(os.path.abspath(__file__))
        cfg = [
            f"-DCMAKE_CUDA_COMPILER={_NVCC}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DSPARSEKERN_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            cfg.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        jobs = str(self.parallel or os.cpu_count() or 1)
        # check_call raises on a non-zero exit, which fails the build/install.
        subprocess.check_call([cmake, "-S", src, "-B", build_temp, *cfg])
        subprocess.check_call([cmake, "--build", build_temp, "--parallel", jobs])
        if not os.path.isfile(out_file):
            raise RuntimeError(f"sparsekern: CMake build finished but {out_file} was not produced "
                               "(module suffix mismatch between CMake's Python and this interpreter?)")


_NVCC = _find_nvcc()
if _NVCC is None:
    print("sparsekern: nvcc not found (or SPARSEKERN_NO_CUDA set); installing without the CUDA "
          "extension (pure-Python kernels only)", file=sys.stderr)

setup(
    packages=find_packages(include=["sparsekern*"]),
    ext_modules=[CMakeExtension("sparsekern._C")] if _NVCC else [],
    cmdclass={"build_ext": CMakeBuild},
)
