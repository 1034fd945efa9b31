"""The op x backend x dtype table of the oracle tests, generated from pytest's collection.

    python scripts/test_matrix.py            # print the table
    python scripts/test_matrix.py --write    # put it into docs/ARCHITECTURE.md
    python scripts/test_matrix.py --check    # exit 1 if docs/ARCHITECTURE.md's copy is stale (CI)

A test counts in the cell of its op (its file: test_pam.py -> PAM, test_cam.py -> CAM,
test_opcheck.py -> opcheck: both ops' schemas, fakes, autograd), its `backend` parameter (the target ids of
tests/conftest.py) and its `dtype` parameter ("-" when it has none). Collection only: nothing runs,
and the interpreter and GPU cases are counted whether or not this machine can run them.
"""
import argparse
import collections
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)     # this checkout's danet_ops and models, as `python -m pytest` from the root
DOC = os.path.join(ROOT, "docs", "ARCHITECTURE.md")
BEGIN, END = "<!-- test-matrix:begin (scripts/test_matrix.py) -->", "<!-- test-matrix:end -->"
FILES = {"test_pam.py": "PAM", "test_cam.py": "CAM", "test_opcheck.py": "opcheck"}
DTYPES = ("float64", "float32", "float16", "bfloat16", "-")


class _Collector:
    def __init__(self):
        self.cells = collections.Counter()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        for item in items:
            base = os.path.basename(str(item.fspath))
            params = getattr(getattr(item, "callspec", None), "params", {})
            if base not in FILES or "backend" not in params:
                continue
            op = FILES[base]
            dtype = params.get("dtype")
            dt = str(dtype).replace("torch.", "") if dtype is not None else "-"
            self.cells[(op, params["backend"], dt if dt in DTYPES else "-")] += 1


def table():
    collector = _Collector()
    args = ["--collect-only", "-q", "-p", "no:cacheprovider", "-m", "interpreter or not interpreter",
            os.path.join(ROOT, "tests")]
    os.chdir(ROOT)
    with open(os.devnull, "w") as devnull:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            rc = pytest.main(args, plugins=[collector])
        finally:
            sys.stdout = stdout
    if rc not in (0, 5):
        sys.exit(f"pytest collection failed (exit {rc})")
    ops = sorted({k[0] for k in collector.cells}, key=lambda o: ("PAM", "CAM", "opcheck").index(o))
    backends = []
    for k in collector.cells:
        if k[1] not in backends:
            backends.append(k[1])
    lines = ["| op | backend | " + " | ".join(DTYPES[:-1]) + " | no dtype | all |",
             "|---|---|" + "---:|" * (len(DTYPES) + 1)]
    for op in ops:
        for b in backends:
            row = [collector.cells.get((op, b, dt), 0) for dt in DTYPES]
            if sum(row):
                lines.append(f"| {op} | {b} | " + " | ".join(str(n) if n else "" for n in row)
                             + f" | {sum(row)} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="update docs/ARCHITECTURE.md")
    g.add_argument("--check", action="store_true", help="fail if docs/ARCHITECTURE.md is stale")
    args = p.parse_args(argv)
    new = table()
    if not (args.write or args.check):
        print(new, end="")
        return 0
    doc = open(DOC).read()
    m = re.search(re.escape(BEGIN) + r"\n(.*?)" + re.escape(END), doc, re.S)
    if m is None:
        sys.exit(f"{DOC} has no {BEGIN} ... {END} block")
    if args.check:
        if m.group(1) != new:
            print("docs/ARCHITECTURE.md's test matrix is stale: run python scripts/test_matrix.py --write")
            return 1
        print("docs/ARCHITECTURE.md's test matrix is current")
        return 0
    open(DOC, "w").write(doc[:m.start(1)] + new + doc[m.end(1):])
    print(f"wrote the test matrix into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
