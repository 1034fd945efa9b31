"""Backend "triton" (filled in by the Triton issue): kernels + custom_op registration.

Interface used by danet_ops._backends: `available() -> (bool, reason)`,
`pam_forward(q, k, v, x, gamma)` and `cam_forward(x, gamma, mode)` with the schemas of
docs/ARCHITECTURE.md (ops danet_ops::*_triton).
"""


def available():
    return False, "the Triton kernels are not implemented yet"
