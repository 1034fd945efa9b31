"""Build danet_ops._C from csrc/ against the torch that is already installed.

Decisions (printed at build time):
  * torch visible (``pip install --no-build-isolation .`` or ``pip install -e .`` with torch
    installed): build the C++ extension ahead of time. CUDA sources (csrc/cuda) are added when
    torch has CUDA and nvcc is found; ``DANET_OPS_CUDA=0|1`` forces the choice and
    ``TORCH_CUDA_ARCH_LIST`` is honoured by torch's build helpers.
  * torch NOT visible (plain ``pip install .`` runs setup.py in an isolated environment without
    torch): install the pure-Python package plus the C++ sources; danet_ops JIT-compiles the
    same sources with torch.utils.cpp_extension on first use (needs ninja and a compiler).
    We never add torch to the build requirements: that would download a second torch.
"""
import glob
import json
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
FLAGS = json.load(open(os.path.join(ROOT, "csrc", "build_flags.json")))  # the one build recipe


def log(msg):
    print(f"[danet_ops build] {msg}", file=sys.stderr, flush=True)


def arch_list():
    """build_flags.json's cuda_archs ("80", "90a") as TORCH_CUDA_ARCH_LIST ("8.0;9.0a")."""
    return ";".join(f"{a[:-1]}.{a[-1]}" if a[-1].isdigit() else f"{a[:-2]}.{a[-2:]}"
                    for a in FLAGS["cuda_archs"])


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def want_cuda(torch, cpp_ext):
    forced = os.environ.get("DANET_OPS_CUDA")
    has_nvcc = cpp_ext.CUDA_HOME is not None
    if forced is not None:
        if forced not in ("0", "1"):
            raise SystemExit(f"DANET_OPS_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or not has_nvcc):
            raise SystemExit(
                "DANET_OPS_CUDA=1 but torch has no CUDA "
                f"(torch.version.cuda={torch.version.cuda}) or nvcc was not found "
                f"(CUDA_HOME={cpp_ext.CUDA_HOME})")
        return forced == "1", "forced by DANET_OPS_CUDA"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if not has_nvcc:
        return False, "torch has CUDA but nvcc was not found (set CUDA_HOME)"
    return True, f"torch {torch.__version__} has CUDA {torch.version.cuda} and nvcc is at {cpp_ext.CUDA_HOME}"


def extensions():
    try:
        import torch
        from torch.utils import cpp_extension as cpp_ext
    except ImportError:
        log("torch is not importable in this build environment (pip build isolation?). "
            "Installing the Python package and the C++ sources only; the extension is "
            "JIT-compiled on first use. For an ahead-of-time build run: "
            "pip install --no-build-isolation .")
        return [], {}

    sources = glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(
        os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
    cxx = FLAGS["cxx"]
    cuda_define = "-D" + FLAGS["cuda_define"]
    cuda, why = want_cuda(torch, cpp_ext)
    log(f"torch {torch.__version__} found; CUDA kernels: {'yes' if cuda else 'no'} ({why})")
    if cuda:
        sources += glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        sources += glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
        # Default targets from the recipe (sm_80 and sm_90a); TORCH_CUDA_ARCH_LIST overrides.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", arch_list())
        log(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = cpp_ext.CUDAExtension(
            "danet_ops._C", rel(sources),
            extra_compile_args={"cxx": cxx + [cuda_define],
                                "nvcc": FLAGS["nvcc"] + [cuda_define]},
            extra_link_args=FLAGS["ldflags"])
    else:
        ext = cpp_ext.CppExtension("danet_ops._C", rel(sources),
                                   extra_compile_args={"cxx": cxx},
                                   extra_link_args=FLAGS["ldflags"])
    log("sources: " + ", ".join(rel(sources)))
    build_ext = cpp_ext.BuildExtension.with_options(use_ninja=cpp_ext.is_ninja_available())
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = extensions()

setup(
    packages=["danet_ops", "danet_ops._triton", "danet_ops.csrc"],
    # The C++ sources ship inside the package so that the JIT fallback works from a wheel.
    package_dir={"danet_ops": "danet_ops", "danet_ops.csrc": "csrc"},
    package_data={"danet_ops.csrc": ["*.cpp", "*.h", "*.json", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu",
                                      "cuda/*.cuh", "cuda/*.cpp", "cuda/*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
