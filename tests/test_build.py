"""The native build outside pip: the standalone CMake project (what C/C++ services use) builds
and its ctest passes, and every CUDA source compiles for the architectures we ship (sm_80,
sm_90a) whenever nvcc is present, so a kernel that does not compile fails here, not on a GPU
machine later."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def tool(name: str) -> Optional[str]:
    """`name` from PATH, else from its pip package, else None."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
    except ImportError:
        return None
    path = Path(getattr(module, "CMAKE_BIN_DIR", None) or getattr(module, "BIN_DIR")) / name
    return str(path) if path.exists() else None


def find_nvcc() -> Optional[str]:
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def run(command: list[str], cwd: Optional[Path] = None) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
def test_standalone_cmake_build_and_ctest(tmp_path, cuda):
    cmake, ninja = tool("cmake"), tool("ninja")
    if cmake is None:
        pytest.skip("cmake is not installed (pip install cmake)")
    if ninja is None:
        pytest.skip("ninja is not installed (pip install ninja)")
    nvcc = find_nvcc()
    if cuda and nvcc is None:
        pytest.skip("nvcc not found")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                 f"-DCMAKE_MAKE_PROGRAM={ninja}", "-DMSD_ENGINE_BUILD_PYTHON=OFF",
                 f"-DMSD_ENGINE_WITH_CUDA={'ON' if cuda else 'OFF'}"]
    if cuda:
        configure.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    run(configure)
    run([cmake, "--build", str(build)])
    output = run([tool("ctest") or str(Path(cmake).with_name("ctest")), "--test-dir", str(build),
                  "--output-on-failure", "-V"])
    # Statically linked cudart: the example runs, and counts 0 devices, on a driverless machine.
    assert f"OK (cuda compiled: {int(cuda)}" in output
    assert "OK: one call == 9 separate calls, bit for bit" in output  # decoder_layer_example


@pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found")
def test_cuda_sources_compile_for_shipped_architectures(tmp_path):
    assert CUDA_SOURCES, "no csrc/cuda/*.cu found"
    # One nvcc call for every file and both architectures: nvcc is slow to start.
    run([find_nvcc(), "-c", *map(str, CUDA_SOURCES), "-odir", str(tmp_path),
         "-std=c++17", "-O3", "-DMSD_ENGINE_WITH_CUDA=1",
         f"-I{ROOT / 'csrc' / 'include'}", f"-I{ROOT / 'csrc'}",
         "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a",
         "--threads", "2", "-Werror", "all-warnings"])
    assert sorted(p.stem for p in tmp_path.glob("*.o")) == sorted(p.stem for p in CUDA_SOURCES)
