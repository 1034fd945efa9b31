"""Cross-compile the C++ ops for AArch64 (Linux ARM; the same guards serve Apple Silicon).

    python scripts/cross_compile_arm.py [--cxx "aarch64-linux-gnu-g++"] [--jobs 2]

Compiles every csrc/*.cpp and csrc/cpu/*.cpp to an object file with an AArch64 compiler (default:
Debian's g++-aarch64-linux-gnu, `apt-get install g++-aarch64-linux-gnu`), against the installed
torch's headers, with the project's C++ flags from csrc/build_flags.json (the one build recipe)
plus the defines torch's extension build adds. Objects only, no link: no ARM libtorch is needed.
It proves that every x86-only attribute, intrinsic and header is guarded. Exit status 1 if any
file fails (its compiler output is printed), 2 if the compiler is missing.

--cxx takes a command line, e.g. "clang++ --target=aarch64-linux-gnu" (clang with the GNU
cross toolchain's headers) for the clang front end, which Apple Silicon builds use.
"""
import argparse
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def sources():
    return sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))


@functools.lru_cache(maxsize=None)
def _project_flags():
    """The project's C++ flags, torch's extension defines and include paths (the same for every file)."""
    import torch
    from torch.utils import cpp_extension

    flags = json.loads((CSRC / "build_flags.json").read_text())["cxx"]
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    defines = ["-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    return (*flags, "-fPIC", *defines, *includes)


def command(cxx, src, obj):
    return [*cxx, *_project_flags(), "-c", str(src), "-o", str(obj)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cxx", default="aarch64-linux-gnu-g++",
                    help="the AArch64 C++ compiler command (default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    cxx = shlex.split(args.cxx)
    if shutil.which(cxx[0]) is None:
        print(f"[cross_compile_arm] {cxx[0]} not found (Debian/Ubuntu: "
              "apt-get install g++-aarch64-linux-gnu)", file=sys.stderr)
        return 2
    version = subprocess.run([*cxx, "--version"], capture_output=True, text=True).stdout
    target = subprocess.run([*cxx, "-dumpmachine"], capture_output=True, text=True).stdout.strip()
    print(f"[cross_compile_arm] {version.splitlines()[0] if version else cxx[0]} (target {target})")
    if not target.startswith(("aarch64", "arm64")):
        print(f"[cross_compile_arm] {args.cxx} does not target AArch64", file=sys.stderr)
        return 2
    files = sources()
    with tempfile.TemporaryDirectory() as tmp:
        def build(src):
            t0 = time.time()
            obj = Path(tmp) / (src.parent.name + "_" + src.stem + ".o")
            res = subprocess.run(command(cxx, src, obj), capture_output=True, text=True)
            return src, res, time.time() - t0

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            results = list(pool.map(build, files))
    failed = 0
    for src, res, dt in results:
        name = src.relative_to(ROOT)
        if res.returncode == 0:
            print(f"[cross_compile_arm] ok    {name} ({dt:.0f} s)")
        else:
            failed += 1
            print(f"[cross_compile_arm] FAIL  {name}\n{res.stdout}{res.stderr}")
    print(f"[cross_compile_arm] {len(files) - failed}/{len(files)} files compiled for {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
