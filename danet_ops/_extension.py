"""The compiled extension danet_ops._C (the C++/CUDA ops of csrc/): find it, load it, or
JIT-build it. Nothing else: registering the ops' fake kernels and autograd, and using them, is
danet_ops._compiled_ops's job.

The ahead-of-time build (setup.py) leaves danet_ops/_C*.so next to this file. When it is
missing (plain `pip install .` under build isolation cannot see torch) the same sources are
JIT-compiled with torch.utils.cpp_extension by `load()`, unless DANET_OPS_JIT=0. Only `load()`
(build=True) compiles; `status()` and `unavailable()` answer without loading or building.
"""
import glob
import json
import os
import threading
import warnings

import torch

_PKG = os.path.dirname(os.path.abspath(__file__))
_lock = threading.Lock()
_state = {"loaded": False, "error": None, "how": None}


class JitBuildWarning(UserWarning):
    """The C++ ops are being JIT-compiled (no prebuilt library): filter it with `warnings`."""


def prebuilt():
    """Path of the prebuilt library next to this file, or None."""
    libs = sorted(glob.glob(os.path.join(_PKG, "_C*.so")) + glob.glob(os.path.join(_PKG, "_C*.pyd")))
    return libs[0] if libs else None


def source_dir():
    """The csrc/ folder the JIT build compiles (source tree or sdist copy), or None."""
    for root in (os.path.join(_PKG, os.pardir, "csrc"), os.path.join(_PKG, "csrc")):
        if os.path.isfile(os.path.join(root, "register.cpp")):
            return os.path.normpath(root)
    return None


def _jit_forbidden():
    return os.environ.get("DANET_OPS_JIT", "1") == "0"


def jit_builds_cuda():
    """Whether a JIT build here would include the CUDA kernels (CUDA torch, nvcc found, and
    DANET_OPS_CUDA not 0). Imports torch.utils.cpp_extension only for a CUDA build of torch."""
    if torch.version.cuda is None or os.environ.get("DANET_OPS_CUDA", "1") == "0":
        return False
    from torch.utils import cpp_extension
    return cpp_extension.CUDA_HOME is not None


def jit_build():
    """Compile csrc/ with torch.utils.cpp_extension (cached by it) and load the result."""
    from torch.utils import cpp_extension

    root = source_dir()
    if root is None:
        raise RuntimeError("no prebuilt danet_ops._C and no C++ sources to JIT-compile")
    sources = sorted(glob.glob(os.path.join(root, "*.cpp")) + glob.glob(os.path.join(root, "cpu", "*.cpp")))
    warnings.warn("danet_ops: no prebuilt danet_ops._C: compiling the C++ ops from "
                  f"{root} (once, about a minute; cached by torch.utils.cpp_extension). "
                  "`pip install --no-build-isolation .` builds them ahead of time.",
                  JitBuildWarning, stacklevel=3)
    with open(os.path.join(root, "build_flags.json")) as f:
        flags = json.load(f)                                    # setup.py's recipe
    cflags = list(flags["cxx"])
    define = "-D" + flags["cuda_define"]
    if jit_builds_cuda():
        sources += sorted(glob.glob(os.path.join(root, "cuda", "*.cu")) + glob.glob(os.path.join(root, "cuda", "*.cpp")))
        cflags.append(define)
    cpp_extension.load(name="danet_ops_C", sources=sources, extra_cflags=cflags,
                       extra_cuda_cflags=flags["nvcc"] + [define],
                       extra_ldflags=flags["ldflags"], is_python_module=False, verbose=False)
    return f"JIT-compiled from {root}"


def load(build=True):
    """Load the library once; True when its ops are registered with torch.

    A prebuilt library is loaded (a dlopen). Without one, build=True JIT-compiles it (about a
    minute, once) unless DANET_OPS_JIT=0; build=False returns False and leaves it for later.
    A failure is kept (error()) and not retried.
    """
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        lib = prebuilt()
        if lib is None and not build:
            return False
        try:
            if lib is not None:
                torch.ops.load_library(lib)
                how = f"prebuilt {os.path.basename(lib)}"
            elif not _jit_forbidden():
                how = jit_build()
            else:
                raise RuntimeError("danet_ops._C was not built and DANET_OPS_JIT=0 forbids the JIT build")
            _state.update(loaded=True, how=how)
        except Exception as exc:  # kept and reported by the backends
            _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["loaded"]


def loaded():
    return _state["loaded"]


def error():
    """Why loading failed ("Type: message"), or None."""
    return _state["error"]


def how():
    """How the loaded library came ("prebuilt _C....so" / "JIT-compiled from ..."), or None."""
    return _state["how"]


def unavailable():
    """"" when the library is loaded or load() can load or build it; else why not. Loads and
    builds nothing."""
    if _state["loaded"]:
        return ""
    if _state["error"] is not None:
        return _state["error"]
    if prebuilt() is not None:
        return ""
    if _jit_forbidden():
        return "danet_ops._C was not built and DANET_OPS_JIT=0 forbids the JIT build"
    if source_dir() is None:
        return "no prebuilt danet_ops._C and no C++ sources to JIT-compile"
    return ""


def status():
    """One line on the library, without loading or building it."""
    if _state["loaded"]:
        return _state["how"]
    why = unavailable()
    if why:
        return f"not available: {why}"
    if prebuilt() is not None:
        return f"prebuilt {os.path.basename(prebuilt())}, not loaded yet"
    return "not built; JIT-compiles on first use (about a minute, once)"
