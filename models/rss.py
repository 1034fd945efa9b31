"""This process's resident memory (bytes), read from Linux's /proc/self: the peak-memory
measurements of the benchmarks, `models.export` and `models.bench_fullres`. Standard library only,
so that their child processes can import it without torch.

    exact = reset_peak()            # the high-water mark := the resident set now (Linux)
    base = status("VmRSS")
    ...                             # the work measured
    used = peak() - base
"""
import re
import resource
import sys


def status(field):
    """A /proc/self/status field ("VmRSS", "VmHWM") in bytes; None without /proc or the field."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def reset_peak():
    """Reset the resident high-water mark (VmHWM) to the current resident set by writing 5 to
    /proc/self/clear_refs. False where that is not possible (then `peak` is the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak():
    """The resident high-water mark: VmHWM, else ru_maxrss (since the process started; a child
    inherits its parent's maximum at exec; kB on Linux, bytes on macOS)."""
    hwm = status("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024
