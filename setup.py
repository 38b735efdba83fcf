"""Builds msd_engine._C by driving CMake + Ninja over csrc/ (see CMakeLists.txt).

CUDA kernels: MSD_ENGINE_CUDA=0 builds CPU-only, =1 requires nvcc, unset builds them when nvcc
is found ($CUDA_HOME/bin, PATH, /usr/local/cuda/bin). The CMake build directory is
build/cmake-<python>-<cpu|cuda>/ beside this file, so repeated `pip install -e .` runs rebuild
incrementally. Torch is not needed to build.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc() -> Optional[str]:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(str(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def cuda_compiler() -> Optional[str]:
    """nvcc to build with, or None for a CPU-only build, as MSD_ENGINE_CUDA asks."""
    mode = os.environ.get("MSD_ENGINE_CUDA", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"MSD_ENGINE_CUDA must be 0, 1 or unset, got {mode!r}")
    if mode == "0":
        return None
    nvcc = find_nvcc()
    if mode == "1" and nvcc is None:
        raise RuntimeError(
            "MSD_ENGINE_CUDA=1 but nvcc was not found in $CUDA_HOME/bin, on PATH or in "
            "/usr/local/cuda/bin"
        )
    return nvcc


def find_tool(name: str) -> str:
    """`name` from PATH, else from its pip package (cmake / ninja wheels ship the binaries)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
    except ImportError as exc:
        raise RuntimeError(f"{name} is needed to build msd_engine._C: pip install {name}") from exc
    bin_dir = getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR")
    return str(Path(bin_dir) / name)


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])  # CMake knows the sources


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11  # a build requirement; imported late so `setup.py --version` works

        nvcc = cuda_compiler()
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{'cuda' if nvcc else 'cpu'}"
        output_dir = build_dir / "python"
        cmake, ninja = find_tool("cmake"), find_tool("ninja")
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DMSD_ENGINE_BUILD_PYTHON=ON",
            "-DMSD_ENGINE_BUILD_EXAMPLES=OFF",
            f"-DMSD_ENGINE_PYTHON_OUTPUT_DIR={output_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DMSD_ENGINE_WITH_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        build = [cmake, "--build", str(build_dir), "--target", "_C"]
        if self.parallel:
            build += ["--parallel", str(self.parallel)]
        print(f"msd_engine: building _C with CUDA {'from ' + nvcc if nvcc else 'off'}", flush=True)
        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)

        built = sorted(output_dir.glob("_C.*"))
        if len(built) != 1:
            raise RuntimeError(f"expected one _C module in {output_dir}, found {built}")
        destination = Path(self.get_ext_fullpath(ext.name))
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], destination)


setup(
    packages=find_packages(include=["msd_engine", "msd_engine.*"]) + ["msd_engine.triton_kernels"],
    # Installed under msd_engine so it cannot clash with other packages named triton_kernels.
    package_dir={"msd_engine.triton_kernels": "triton_kernels"},
    # the demo's prompt sets and its two trained draft heads ship inside the package
    package_data={"msd_engine.demo": ["data/*.json", "data/*.md", "drafts/*/config.json", "drafts/*/head.safetensors"]},
    ext_modules=[CMakeExtension("msd_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
)
