"""Build omni_core: the Python package, the Triton kernels (top-level ``kernels/``
installed as ``omni_core.kernels``) and the native extension ``omni_core._C``
(CPU sources always; CUDA sources when nvcc and a CUDA build of torch are present)."""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def native_extension():
    cpu_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    use_cuda = bool(cuda_sources) and cpp_extension.CUDA_HOME is not None and _torch_has_cuda()
    # -fopenmp: at::parallel_for is header code that only runs in parallel when compiled with
    # OpenMP; it links the libgomp torch already loaded (same soname), not a second runtime.
    cxx = ["-O3", "-fopenmp"]
    common = dict(name="omni_core._C", extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                  extra_link_args=["-fopenmp"])
    if use_cuda:
        return cpp_extension.CUDAExtension(sources=cpu_sources + cuda_sources,
                                           define_macros=[("OMNI_WITH_CUDA", None)], **common)
    common["extra_compile_args"] = {"cxx": cxx}
    return cpp_extension.CppExtension(sources=cpu_sources, **common)


def _torch_has_cuda() -> bool:
    import torch

    return torch.version.cuda is not None and os.environ.get("OMNI_NO_CUDA_BUILD") != "1"


setup(
    name="omni_core",
    version="0.1.0",
    description="Compiled-kernel engine for omni-modal (image + audio + text) representation models",
    packages=find_packages(include=["omni_core", "omni_core.*"])
    + ["omni_core.kernels", "omni_core.kernels.routed_ffn", "omni_core.kernels.varlen_attention"],
    package_dir={"omni_core.kernels": "kernels"},
    ext_modules=[native_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["omni=omni_core.cli:main"]},
    # `pip install -e .[hf]`: the transformers attention backend (omni_core.integrations.transformers)
    extras_require={"hf": ["transformers==5.23.0"]},
    python_requires=">=3.10",
)
