"""The CMake build (libtorch + CTest) of the same C++ sources, as a C++ user would build it."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_cmake_build_and_ctest(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    if torch.version.cuda is not None and not torch.cuda.is_available():
        # A CUDA torch's CMake config (TorchConfig -> Caffe2/public/cuda.cmake) needs the CUDA
        # runtime libraries and kineto of a GPU machine; the CPU torch covers this build here.
        pytest.skip(f"torch {torch.__version__}'s CMake config needs a CUDA machine's libraries")
    build = tmp_path / "build"
    run = lambda *cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # noqa: E731
    steps = [
        ("cmake", "-S", ROOT, "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"),
        ("cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)),
        ("ctest", "--test-dir", str(build), "--output-on-failure"),
    ]
    for cmd in steps:
        res = run(*cmd)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    assert "100% tests passed" in res.stdout
