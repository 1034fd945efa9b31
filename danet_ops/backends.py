"""The backends, one object each, in one registry: what each runs on, whether it can run a
call, and its op entry points. The backend choice of `position_attention` /
`channel_attention` (`resolve`) and `danet_ops.available_backends()` iterate REGISTRY, and so
does whatever else needs "which backends are there" (the tests' backend matrix and opcheck, the
benchmarks, the GPU proof, the ONNX lowering table of `danet_ops.onnx.decompositions`).

    "reference"  the released code's naive bmm computation (danet_ops.reference); any device
    "cpu"        fused C++ ops of csrc/cpu (danet_ops._compiled_ops); CPU tensors
    "cuda"       the same ops' CUDA kernels, csrc/cuda (danet_ops._compiled_ops); CUDA tensors
    "triton"     fused Triton kernels (danet_ops._triton); CUDA tensors, and CPU tensors under
                 TRITON_INTERPRET=1 (tests)

"auto" picks, for the tensor's device, the first backend of AUTO_ORDER that can run the call:
  CPU tensors  -> "cpu" (fused C++), else "reference"
      (measured: benchmarks/results/, README "Results": the fused C++ ops beat the reference)
  CUDA tensors -> "triton", else "cuda", else "reference"
      (PROVISIONAL, not measured: no GPU has run these kernels yet. Triton comes first because
      it autotunes per GPU; the order is to be set from the GPU proof's numbers,
      docs/benchmarks.md. DANET_OPS_BACKEND or an explicit backend= overrides it.)

Asking whether a backend can run (`Backend.available`, `available_backends`) never compiles
anything: without a prebuilt danet_ops._C the C++ backends answer "can run" when the JIT build
will give them on first use, and only `resolve` (a real call) builds. It imports triton only
when asked about the Triton backend for tensors it could take.
"""
import dataclasses
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import _compiled_ops


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why and what to do."""


def _nothing(*args):
    return ""


def _ready_already():
    return False


@dataclasses.dataclass(eq=False)
class Backend:
    """One backend.

    name:      the `backend=` value: "reference", "cpu", "cuda", "triton".
    devices:   the device types whose tensors it takes (() for any device); the first is its
               own.
    interpreted: those of `devices` it takes only through an interpreter, slowly, for tests
               (Triton: "cpu", under TRITON_INTERPRET=1 set before triton's import).
    dtypes:    the tensor dtypes it computes in.
    fix:       what to do when it cannot run (the "To fix" of BackendUnavailableError).
    ops:       {entry point: torch.library op name} of its registered ops, e.g.
               {"pam_forward": "danet_ops::pam_forward", "pam_backward": ..., "cam_forward": ...,
               "cam_backward": ...}, plus "pam_forward_inference" / "cam_forward_inference"
               for "cpu"; {} for "reference", which is plain torch code. `op(entry)` gives the
               OpOverload (None while not registered), for opcheck, export and benchmarks.
    register() -> None:
               registers the backend's ops where that costs nothing (Triton: importing
               danet_ops._triton, which imports no triton); `op` calls it. The compiled ops are
               registered by loading danet_ops._C, which `prepare` does, never `op`.
    pam_forward(q, k, v, x, gamma, scale) -> (o, lse, y), and
    cam_forward(x, gamma, mode) -> (o, attn, y):
               the entry points `danet_ops.functional` calls, on [B, C, N] tensors, with the
               ops' schemas (docs/ARCHITECTURE.md); lse / attn may be None when no gradient
               will be taken (CPU inference forms). None for "reference": functional calls
               danet_ops.reference itself.
    check(device, dtype, op) -> str:
               the backend's own availability test after the device and dtype ones ("" when
               it can run); use `available`, which runs all three.
    describe(device, dtype, op) -> str:
               what runs when it can (how the C++ library came, the CPU kernel path and ISA,
               Triton compiled or interpreted), "" when nothing to add. Builds nothing.
    prepare() -> bool:
               make it ready for a call; for "cpu" / "cuda" this loads danet_ops._C and, when
               there is no prebuilt library, JIT-compiles it (about a minute, once). True when
               it loaded or built something just now (`available` may answer otherwise after).
    """

    name: str
    devices: tuple
    dtypes: tuple
    fix: str
    interpreted: tuple = ()
    check: Callable = _nothing
    describe: Callable = _nothing
    prepare: Callable = _ready_already
    register: Callable = _nothing
    ops: dict = dataclasses.field(default_factory=dict)
    pam_forward: Optional[Callable] = None
    cam_forward: Optional[Callable] = None

    def available(self, device, dtype=torch.float32, op="pam"):
        """"" when this backend can run `op` ("pam" | "cam") on `device` / `dtype` tensors, else
        why not. Never compiles anything (see the module's docstring)."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        if self.devices and device.type not in self.devices:
            return (f"backend {self.name!r} runs on {self.devices[0].upper()} tensors; these are "
                    f"on {device}")
        if dtype not in self.dtypes:
            names = [str(d).replace("torch.", "") for d in self.dtypes]
            return (f"backend {self.name!r} supports {', '.join(names[:-1])} and {names[-1]}, "
                    f"not {str(dtype).replace('torch.', '')}")
        return self.check(device, dtype, op)

    def op(self, entry):
        """The OpOverload of entry point `entry` (e.g. "pam_backward"), or None when this
        backend has no such op or it is not registered in this process."""
        qualname = self.ops.get(entry)
        if qualname is None:
            return None
        self.register()
        ns, name = qualname.split("::")
        packet = getattr(getattr(torch.ops, ns), name, None)
        return None if packet is None else packet.default


# ----------------------------------------------------------------------------- the four backends
_ALL = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_GPU = (torch.float32, torch.float16, torch.bfloat16)


def _compiled_check(device, dtype, op):
    return _compiled_ops.unavailable(op, device.type)


def _compiled_describe(device, dtype, op):
    return _compiled_ops.describe(op, device.type, dtype)


def _prepare_compiled():
    if _compiled_ops.ready():
        return False
    _compiled_ops.load(build=True)
    return True


def _triton():
    from . import _triton  # registers the *_triton ops; imports no triton
    return _triton


def _triton_check(device, dtype, op):
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
    try:
        triton_backend = _triton()
    except Exception as exc:  # triton missing or broken
        return f"Triton could not be imported ({type(exc).__name__}: {exc})"
    ok, why = triton_backend.available()
    return "" if ok else why


def _triton_describe(device, dtype, op):
    return "interpreted (TRITON_INTERPRET=1)" if _triton().interpreting() else "compiled kernels"


def _triton_pam_forward(q, k, v, x, gamma, scale=1.0):
    return _triton().pam_forward(q, k, v, x, gamma, scale)


def _triton_cam_forward(x, gamma, mode):
    return _triton().cam_forward(x, gamma, mode)


REGISTRY = {b.name: b for b in (
    Backend("reference", devices=(), dtypes=_ALL, fix="check the device and dtype"),
    Backend("cpu", devices=("cpu",), dtypes=_ALL,
            fix="build the C++ extension: `pip install --no-build-isolation .` in the source "
                "tree (needs a C++ compiler), or leave DANET_OPS_JIT unset so it is JIT-compiled "
                "on first use",
            check=_compiled_check, describe=_compiled_describe, prepare=_prepare_compiled,
            ops={**_compiled_ops.OPS, **_compiled_ops.INFERENCE_OPS},
            pam_forward=_compiled_ops.cpu_pam_forward, cam_forward=_compiled_ops.cpu_cam_forward),
    Backend("cuda", devices=("cuda",), dtypes=_GPU,
            fix="install with a CUDA build of torch and nvcc present "
                "(`DANET_OPS_CUDA=1 pip install --no-build-isolation .`)",
            check=_compiled_check, describe=_compiled_describe, prepare=_prepare_compiled,
            ops=dict(_compiled_ops.OPS),
            pam_forward=_compiled_ops.cuda_pam_forward, cam_forward=_compiled_ops.cuda_cam_forward),
    Backend("triton", devices=("cuda", "cpu"), interpreted=("cpu",), dtypes=_GPU,
            fix="install triton (`pip install triton`) and use CUDA tensors, or CPU tensors "
                "with TRITON_INTERPRET=1 (slow; for tests)",
            check=_triton_check, describe=_triton_describe, register=_triton,
            ops={"pam_forward": "danet_ops::pam_forward_triton",
                 "pam_backward": "danet_ops::pam_backward_triton",
                 "cam_forward": "danet_ops::cam_forward_triton",
                 "cam_backward": "danet_ops::cam_backward_triton"},
            pam_forward=_triton_pam_forward, cam_forward=_triton_cam_forward),
)}
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("triton", "cuda", "reference")}


def get(name):
    """The Backend called `name`, or ValueError listing the names."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend must be one of {('auto',) + tuple(REGISTRY)}; got {name!r}") from None


def op_names(entry):
    """The op names of entry point `entry` ("pam_forward", ...) over all backends, each once,
    e.g. op_names("pam_forward") == ("danet_ops::pam_forward", "danet_ops::pam_forward_triton")."""
    return tuple(dict.fromkeys(b.ops[entry] for b in REGISTRY.values() if entry in b.ops))


def _ready(backend, op, device, dtype):
    """"" when `backend` runs this call, after preparing it (which may JIT-build the C++ ops)."""
    why = backend.available(device, dtype, op)
    if not why and backend.prepare():
        why = backend.available(device, dtype, op)
    return why


def resolve(backend, op, device, dtype):
    """The name of the backend that runs this call, or BackendUnavailableError.

    "auto" (or DANET_OPS_BACKEND when set) picks by AUTO_ORDER. The chosen backend is prepared:
    without a prebuilt library, the first call on "cpu" / "cuda" JIT-compiles the C++ ops.
    Under torch.compile this runs once at trace time and its answer is baked into the graph
    (it inspects the dispatcher and the environment, which Dynamo cannot trace).
    """
    if backend == "auto":
        backend = os.environ.get("DANET_OPS_BACKEND", "auto") or "auto"
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if not _ready(REGISTRY[name], op, device, dtype):
                return name
        return "reference"
    chosen = get(backend)
    why = _ready(chosen, op, device, dtype)
    if why:
        raise BackendUnavailableError(
            f"danet_ops backend {backend!r} cannot run {op} here: {why}. "
            f"To fix: {chosen.fix}; or pass backend='auto'.")
    return backend


# torch.compiler.assume_constant_result(resolve), without importing torch._dynamo (seconds, and
# triton with it) at `import danet_ops`: the decorator only sets this attribute
# (tests/test_registry.py checks that it still does).
resolve._dynamo_marked_constant = True


class Availability(NamedTuple):
    """ok: whether the backend can run the call. detail: why not when ok is False; when True,
    what runs (for "cpu": how danet_ops._C came and, where the library reports them, the
    kernel path for this op and dtype and the CPU's ISA), or ""."""
    ok: bool
    detail: str


def available_backends(device="cpu", dtype=torch.float32, op="pam"):
    """{backend name: Availability(ok, detail)} for running `op` ("pam" | "cam") on tensors of
    `device` / `dtype`: which backends can run it, why not for the others. Compiles nothing:
    without a prebuilt danet_ops._C, "cpu" is ok with the detail "not built; JIT-compiles on
    first use"."""
    device = torch.device(device)
    result = {}
    for name, backend in REGISTRY.items():
        why = backend.available(device, dtype, op)
        result[name] = Availability(not why, why or backend.describe(device, dtype, op))
    return result
