"""Builds zoneout_fused's compiled backends with torch.utils.cpp_extension.

Always the C++ CPU extension (zoneout_fused._C); the CUDA extension (zoneout_fused._C_cuda)
only where torch has CUDA and nvcc is found. Switches (environment variables):
  ZONEOUT_FUSED_SKIP_CPP=1    build no extension (pure-Python install: reference backend only)
  ZONEOUT_FUSED_SKIP_CUDA=1   never build the CUDA extension
  ZONEOUT_FUSED_NO_LIBMVEC=1  do not use glibc's libmvec (scalar expf/tanhf in the CPU kernels)
  ZONEOUT_FUSED_FORCE_CUDA=1  build the CUDA extension even if torch sees no GPU (needs nvcc
                              and a CUDA build of torch); fail if it cannot
  TORCH_CUDA_ARCH_LIST        GPU architectures, as torch understands it ("9.0a" gives sm_90a)
  MAX_JOBS                    parallel compile jobs (ninja)
Build with `pip install --no-build-isolation -e .` so the installed torch is used.
"""
import ctypes.util
import glob
import os
import platform
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _has_libmvec() -> bool:
    """glibc's vector math library (Linux x86-64), unless ZONEOUT_FUSED_NO_LIBMVEC=1."""
    if _flag("ZONEOUT_FUSED_NO_LIBMVEC") or not sys.platform.startswith("linux"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return ctypes.util.find_library("mvec") is not None


def _extensions():
    if _flag("ZONEOUT_FUSED_SKIP_CPP"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    include_dirs = [os.path.join(ROOT, "csrc")]
    # No errno/trap semantics for math (as torch itself builds), so the CPU kernels' element
    # loops can be vectorized.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if _has_libmvec():  # glibc's vector expf/tanhf: vectorized sigmoid/tanh in csrc/cpu
        cxx_flags.append("-DZF_USE_LIBMVEC")
        link_flags.append("-lmvec")
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    extensions = [
        CppExtension("zoneout_fused._C", sources, include_dirs=include_dirs,
                     extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    ]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    want_cuda = not _flag("ZONEOUT_FUSED_SKIP_CUDA") and cuda_sources and (
        _flag("ZONEOUT_FUSED_FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None))
    if want_cuda:
        if torch.version.cuda is None or CUDA_HOME is None:
            raise RuntimeError("ZONEOUT_FUSED_FORCE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
        nvcc_flags = ["-O3", "-std=c++17", "--threads", "4", "-lineinfo",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
                      "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_OPERATORS__"]
        # No --use_fast_math: it swaps expf/tanhf for approximations, and the CUDA backend
        # is tested element for element against the reference.
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
        extensions.append(CUDAExtension("zoneout_fused._C_cuda", cuda_sources, include_dirs=include_dirs,
                                        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags}))
    return extensions, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["zoneout_fused", "zoneout_fused.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
