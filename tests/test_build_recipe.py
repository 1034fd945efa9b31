"""One build recipe: setup.py, the JIT build, CMake, the nvcc compile test and the AArch64
cross-compile check all take their compiler flags from csrc/build_flags.json, and nothing else
spells them out."""
import json
import re
import warnings
from pathlib import Path

import pytest

from danet_ops import _extension

ROOT = Path(__file__).resolve().parent.parent
FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())
READERS = ["setup.py", "danet_ops/_extension.py", "CMakeLists.txt", "tests/test_cuda_compile.py",
           "scripts/cross_compile_arm.py"]


@pytest.mark.parametrize("path", READERS)
def test_every_build_reads_the_recipe_and_spells_out_no_flag(path):
    text = (ROOT / path).read_text()
    assert "build_flags.json" in text
    code = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("#"))
    # (-std=c++17 alone may appear: the compile test's host syntax check of the headers is not a build.)
    for flag in set(FLAGS["cxx"] + FLAGS["nvcc"]) - {"-std=c++17"}:
        assert not re.search(rf"[\"']{re.escape(flag)}[\"']", code), f"{path} spells out {flag}"


def test_jit_build_uses_the_recipe_and_warns(monkeypatch):
    seen = {}
    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: seen.update(kw))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _extension.jit_build()
    assert any(issubclass(x.category, _extension.JitBuildWarning) for x in w)
    assert seen["extra_cflags"][:len(FLAGS["cxx"])] == FLAGS["cxx"]
    assert seen["extra_cuda_cflags"] == FLAGS["nvcc"] + ["-D" + FLAGS["cuda_define"]]
    assert seen["extra_ldflags"] == FLAGS["ldflags"]


def test_cross_compile_check_covers_every_cpu_source_with_the_recipe():
    import importlib.util
    spec = importlib.util.spec_from_file_location("cross_compile_arm", ROOT / "scripts" / "cross_compile_arm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    want = sorted((ROOT / "csrc").glob("*.cpp")) + sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
    assert mod.sources() == want and any(p.name == "register.cpp" for p in want)
    cmd = mod.command(["aarch64-linux-gnu-g++"], want[0], Path("x.o"))
    assert cmd[1:1 + len(FLAGS["cxx"])] == FLAGS["cxx"] and "-c" in cmd
