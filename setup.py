"""Builds fvkernels' compiled module by driving CMake (the pybind11 cmake_example pattern).

Environment switches:
  FVK_CUDA=0|1|auto   build the CUDA kernel never / always (fail without nvcc) / when nvcc is found
  FVK_CUDA_ARCHS      e.g. "80;90" (default) — the GPU architectures to compile for
  CMAKE_ARGS          extra arguments passed to CMake verbatim
  FVK_DEBUG=1         debug build
"""
import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])  # CMake owns the sources
        self.sourcedir = os.fspath(sourcedir)


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        extdir = (Path.cwd() / self.get_ext_fullpath(ext.name)).parent.resolve()
        cuda = {"0": "OFF", "off": "OFF", "1": "ON", "on": "ON"}.get(os.environ.get("FVK_CUDA", "auto").lower(), "AUTO")
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",  # the interpreter that will import the module
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if os.environ.get('FVK_DEBUG') else 'Release'}",
            f"-DFVK_CUDA={cuda}",
        ]
        if "FVK_CUDA_ARCHS" in os.environ:
            cmake_args.append(f"-DFVK_CUDA_ARCHITECTURES={os.environ['FVK_CUDA_ARCHS']}")
        cmake_args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        if not os.environ.get("CMAKE_GENERATOR"):
            try:  # Ninja rebuilds faster; fall back to make when it is not installed
                import ninja

                cmake_args += ["-GNinja", f"-DCMAKE_MAKE_PROGRAM={Path(ninja.BIN_DIR) / 'ninja'}"]
            except ImportError:
                pass
        # setuptools' own build tree: build/temp.<platform>-<python> for `setup.py build_ext`, a temporary
        # folder for pip installs (editable ones too), never a folder shared inside the source tree.
        build_dir = Path(self.build_temp) / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", f"-j{os.cpu_count() or 1}"], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("fvkernels._C")], cmdclass={"build_ext": CMakeBuild})
