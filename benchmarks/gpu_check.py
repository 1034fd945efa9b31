"""The GPU proof of danet_ops in one call of at most 9 minutes (a 15-minute GPU lease: the
machine's start, the transfers and a margin take the rest). docs/benchmarks.md says how to run it.

    python -m benchmarks.gpu_check [OUT] [--dry-run] [--stages so,a,b,c,d,e] [--budget 540]

Stages, in order of value, each with its own time cap, all inside one budget of 540 s: a stage
gets min(its cap, what is left), so a build in stage so shortens the later ones.
  so (20 s; 240 s when it must build) the compiled ops: danet_ops/_C<suffix>.so from the carried
     build/gpu/danet_ops/ (scripts/build_cuda_ext.sh makes it); built here (sm_90a, all cores)
     only if that is missing or does not load with CUDA kernels
  a  (70 s)  versions, GPU, backend availability; PAM and CAM forward+backward of every fused
     backend at 3 shapes (bf16) against the float64 oracle with the tests' bounds
  b  (210 s) the GPU tests: `pytest tests -m gpu` (the GPU cases of the op tests, test_cuda.py,
     test_triton.py, ...), no -x; pytest-xdist workers and a 60 s per-test timeout where
     installed
  c  (180 s) benchmarks/test_bench_attention.py on CUDA (bf16, B=2, C=512, Cq=64 at the short
     GPU sizes; reference, cuda, triton, SDPA memory-efficient with scale=1.0, FlexAttention),
     with the bf16 matmul rate and copy bandwidth of the same run
  d  (45 s)  compute-sanitizer memcheck on one tiny forward+backward through each CUDA kernel;
     a runtime that refuses it (gVisor: "Device not supported") is recorded, not failed
  e  (15 s)  the report (python -m benchmarks.report), the key numbers against the targets, and
     everything else in one archive
Output (OUT, else $GPU_CHECK_OUT, else $OUT, else ./gpu_check_out), written as each stage ends so
that a timeout keeps what finished; at most 8 files, no sub-folders: summary.md (stage table,
smoke table, test counts and failures, key numbers), stage_a.log .. stage_d.log, bench-gpu.json
(the benchmark summary), the report gpu-<device>-<date>.md, and extra.tar.gz (junit XML, the
report's CSV and plots, pytest-benchmark's JSON, stage e's log). Exit status 1 when a stage failed.

--dry-run: the same stages on a machine without a GPU, with CPU tensors and tiny shapes, every
cap and the budget x6 (--cap-scale): so lists what would be carried; a runs the smoke test on
the cpu and triton (TRITON_INTERPRET=1) backends in fp32 and bf16; b a few of the GPU tests in
DANET_OPS_TEST_GPU_ON_CPU=1 mode (Triton interpreter, CUDA kernel emulator) and the interpreted
twins of a few GPU cases of the op tests; c the benchmarks' fp32 32x32 CPU cases, matmul rate and
copy bandwidth, one timed round each; d the sanitizer case on the CPU backend; e the report. CI
runs it.
"""
import argparse
import glob
import importlib.util
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPS = {"so": 20, "a": 70, "b": 210, "c": 180, "d": 45, "e": 15}
SO_BUILD_CAP = 240
LOGS = {"so": "stage_a.log", "a": "stage_a.log", "b": "stage_b.log", "c": "stage_c.log",
        "d": "stage_d.log", "e": None}  # None: stage e's log goes into the archive
# Dry run, stage b: a few GPU tests whose logic runs on CPU (CUDA emulator, Triton interpreter), and
# one PAM and one CAM shape of the op tests' oracle cases on every gpu/interpreter backend id (the
# interpreted twins run, the GPU ids skip). All of them run in CI's GPU-on-CPU suite anyway
# (scripts/build_cuda_ext.sh): here they prove the stage.
DRY_TESTS = ["tests/test_cuda.py", "tests/test_triton.py", "tests/test_pam.py", "tests/test_cam.py"]
DRY_SELECT = ("empty_and or test_cuda_layouts or (test_pam_layouts and float16)"
              " or ((test_matches_oracle or test_half_inputs_match_oracle) and (1x3x12x4x4 or 1x5x3x3))")
# Dry run, stage c: the fp32 32x32 cases (bf16 and 64x64 run in CI's benchmark stage), one timed round.
DRY_BENCH = "(32x32 and float32 and not std) or matmul or copy"
# Stage d: what compute-sanitizer prints when the runtime refuses it (not a kernel fault).
REFUSED = ("device not supported", "not supported on this", "error 999", "unable to initialize",
           "target application terminated before first instrumented")
FAULTS = ("Invalid __global__", "Invalid __shared__", "Out-of-range", "Misaligned")


class StageTimeout(Exception):
    pass


def _has(module):
    return importlib.util.find_spec(module) is not None


class Check:
    def __init__(self, out, dry, budget, scale):
        self.out, self.dry, self.scale = out, dry, scale
        self.budget = budget * scale
        self.t0 = time.monotonic()
        self.work = tempfile.mkdtemp(prefix="gpu_check.")
        self.rows, self.notes, self.failed = [], [], False
        self.py = sys.executable
        self.suffix = sysconfig.get_config_var("EXT_SUFFIX")
        self.so_cap = CAPS["so"]
        self.prebuilt, self.prebuilt_log = None, ""   # place_library's check: loads with CUDA kernels?
        mode = "dry run (CPU tensors, interpreter, tiny shapes)" if dry else "GPU"
        commit = self._git("rev-parse", "--short", "HEAD") or "?"
        if self._git("status", "--short", "--untracked-files=no"):
            commit += " (+ local changes)"
        self.head = [f"# danet_ops gpu_check: {mode}", "",
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}, "
                     f"budget {self.budget:.0f} s", "",
                     "| stage | result | seconds (cap) | log |", "|---|---|---|---|"]
        self.publish()

    # ------------------------------------------------------------------------- plumbing
    @staticmethod
    def _git(*args):
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                                  timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def publish(self):
        """summary.md = the stage table + the stages' sections, rewritten after each stage."""
        path = os.path.join(self.out, "summary.md")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(self.head + self.rows) + "\n" + "".join(self.notes))
        os.replace(path + ".tmp", path)

    def env(self, **extra):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TRITON_INTERPRET", None)
        env.update({k: v for k, v in extra.items() if v is not None})
        return env

    def run(self, cmd, log, deadline, env=None, echo=lambda line: True):
        """Run cmd (its own process group) with output to `log` and, where echo(line), stdout;
        past `deadline` the group is terminated (killed 10 s later) and StageTimeout raised."""
        print("$", " ".join(cmd), flush=True)
        log.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace",
                                start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo(line):
                    sys.stdout.write(line)
                    sys.stdout.flush()
        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            reader.join(5)
            raise StageTimeout
        reader.join(5)
        return rc

    def stage(self, name, fn):
        """Run stage `name` under min(its cap, what is left of the budget); record the result."""
        cap = (self.so_cap if name == "so" else CAPS[name]) * self.scale
        cap = min(cap, self.budget - (time.monotonic() - self.t0))
        log_name = LOGS[name] or f"stage_{name}.log"
        log_path = os.path.join(self.out if LOGS[name] else self.work, log_name)
        if cap < 5:
            print(f"=== [{name}] skipped: the budget is spent")
            self.rows.append(f"| {name} | **skipped** (budget spent) | 0 (0) | |")
            self.failed = True
            self.publish()
            return
        print(f"=== [{name}] (cap {cap:.0f} s)", flush=True)
        start = time.monotonic()
        with open(log_path, "a") as log:
            try:
                rc = fn(log, start + cap)
                result = {0: "pass", 3: "not checked (refused or missing: see log)"}.get(rc, f"**FAIL** (exit {rc})")
            except StageTimeout:
                rc, result = 124, f"**FAIL** (timed out after {cap:.0f} s)"
            except Exception as exc:  # noqa: BLE001 - a fault of this script: the stage fails, the rest run
                rc, result = 1, f"**FAIL** ({type(exc).__name__}: {exc})"
                log.write(f"{result}\n")
        if rc not in (0, 3):
            self.failed = True
        self.rows.append(f"| {name} | {result} | {time.monotonic() - start:.0f} ({cap:.0f}) | {log_name} |")
        self.publish()
        print(f"=== [{name}] {result}", flush=True)

    # ------------------------------------------------------------------------- so
    def place_library(self):
        """Put the carried build/gpu/danet_ops/_C<suffix>.so in place before the first check (danet_ops
        loads the first danet_ops/_C*.so by name: only this Python's may be there)."""
        target = os.path.join(ROOT, "danet_ops", "_C" + self.suffix)
        for f in glob.glob(os.path.join(ROOT, "danet_ops", "_C*.so")):
            if f != target:
                shutil.move(f, self.work)
        carried = os.path.join(ROOT, "build", "gpu", "danet_ops", "_C" + self.suffix)
        if not os.path.exists(target) and os.path.exists(carried):
            shutil.copyfile(carried, target)
        buf = io.StringIO()
        try:
            self.prebuilt = self.library_ok(buf, time.monotonic() + 60) == 0
        except StageTimeout:
            self.prebuilt = False
        self.prebuilt_log = buf.getvalue()
        if not self.prebuilt:
            self.so_cap = SO_BUILD_CAP  # it must be built here

    def library_ok(self, log, deadline):
        return self.run([self.py, "-m", "benchmarks.gpu_cases", "library"], log, deadline,
                        env=self.env(DANET_OPS_JIT="0"))

    def stage_so(self, log, deadline):
        folder = os.path.join(ROOT, "build", "gpu", "danet_ops")
        libs = sorted(glob.glob(os.path.join(folder, "_C*.so")))
        print(f"[so] build/gpu/danet_ops/: {', '.join(map(os.path.basename, libs)) or 'no library'}"
              " (scripts/build_cuda_ext.sh makes it; carry build/gpu: docs/benchmarks.md)")
        if self.dry:
            print(f"[so] dry run: {'ready to carry' if libs else 'nothing to carry (not an error here)'}")
            return 0
        if self.prebuilt:   # checked by place_library before the stages: its output, not a second run
            log.write(self.prebuilt_log)
            return 0
        if self.prebuilt is None and self.library_ok(log, deadline) == 0:
            return 0
        print(f"[so] no usable prebuilt library: building here (sm_90a, {os.cpu_count()} jobs)")
        target = os.path.join(ROOT, "danet_ops", "_C" + self.suffix)
        if os.path.exists(target):
            os.remove(target)
        with open(os.path.join(self.work, "build.log"), "w") as blog:
            rc = self.run([self.py, "setup.py", "build_ext", "--inplace", "--build-temp",
                           os.path.join(self.work, "build-temp")], blog, deadline,
                          env=self.env(DANET_OPS_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0a",
                                       MAX_JOBS=str(os.cpu_count())), echo=lambda line: False)
        if rc != 0:
            with open(os.path.join(self.work, "build.log")) as blog:
                tail = blog.readlines()[-40:]
            sys.stdout.writelines(tail)
            log.writelines(tail)
            return rc
        return self.library_ok(log, deadline)

    # ------------------------------------------------------------------------- a
    def stage_a(self, log, deadline):
        notes = os.path.join(self.work, "notes_a.md")
        cmd = [self.py, "-m", "benchmarks.gpu_cases", "smoke", "--notes", notes,
               "--device", "cpu" if self.dry else "cuda",
               "--dtypes", "float32,bfloat16" if self.dry else "bfloat16"]
        try:
            return self.run(cmd, log, deadline, env=self.env(TRITON_INTERPRET="1" if self.dry else None))
        finally:
            self._take_notes(notes)

    def _take_notes(self, path):
        if os.path.exists(path):
            with open(path) as f:
                self.notes.append(f.read())

    # ------------------------------------------------------------------------- b
    def stage_b(self, log, deadline):
        junit = os.path.join(self.work, "tests-junit.xml")
        cmd = [self.py, "-m", "pytest", "-p", "no:cacheprovider", "-v", "-rfEs", "--durations=15",
               "--continue-on-collection-errors", f"--junitxml={junit}"]
        if self.dry:
            cmd += DRY_TESTS + ["-m", "gpu or interpreter", "-k", DRY_SELECT]
            env = self.env(DANET_OPS_TEST_GPU_ON_CPU="1", TRITON_INTERPRET="1")
        else:
            cmd += ["tests", "-m", "gpu"]
            if _has("xdist"):  # Triton compiles on the CPU: 4 workers compile 4 kernels at once
                cmd += ["-n", "4"]
            env = self.env(DANET_OPS_REQUIRE_CUDA="1")
        if _has("pytest_timeout"):
            cmd += ["--timeout=60"]
        counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0}

        def echo(line):  # the log has every test; the console its failures and the summary
            word = next((w for w in counts if f" {w}" in line and "::" in line), None)
            if word:
                counts[word] += 1
            return word not in ("PASSED", "SKIPPED")
        try:
            rc = self.run(cmd, log, deadline, env=env, echo=echo)
        finally:
            self.notes.append(self._test_notes(junit, counts))
        return rc

    @staticmethod
    def _test_notes(junit, counts):
        """Counts and failures from the junit XML, or (a timeout: no XML) from the live log."""
        failed = []
        if os.path.exists(junit):
            counts = {"passed": 0, "failed": 0, "skipped": 0}
            for case in ET.parse(junit).getroot().iter("testcase"):
                kind = "passed"
                for part in case:
                    if part.tag in ("failure", "error"):
                        kind = "failed"
                        msg = (part.get("message") or "").splitlines()
                        failed.append(f"- `{case.get('classname')}.{case.get('name')}`: {msg[0][:200] if msg else ''}")
                    elif part.tag == "skipped":
                        kind = "skipped"
                counts[kind] += 1
            head = f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
        else:
            head = (f"{counts['PASSED']} passed, {counts['FAILED'] + counts['ERROR']} failed, "
                    f"{counts['SKIPPED']} skipped before the run ended (no junit XML: see stage_b.log)")
        return f"\n### b. GPU tests: {head}\n" + "".join(f + "\n" for f in failed[:40])

    # ------------------------------------------------------------------------- c
    def stage_c(self, log, deadline):
        bench = os.path.join(self.work, "bench")
        os.makedirs(bench, exist_ok=True)
        cmd = [self.py, "-m", "pytest", "benchmarks/test_bench_attention.py", "--benchmark-only", "-q",
               "-p", "no:cacheprovider", "--durations=10"]
        if self.dry:
            cmd += ["-k", DRY_BENCH]
        if _has("pytest_timeout"):
            cmd += ["--timeout=150"]
        env = self.env(DANET_OPS_BENCH_DEVICES="cpu" if self.dry else "cuda", DANET_OPS_BENCH_OUT=bench,
                       DANET_OPS_BENCH_ROUNDS="1" if self.dry else None)
        try:
            return self.run(cmd, log, deadline, env=env)
        finally:
            for f in glob.glob(os.path.join(bench, "bench-*.json")):
                shutil.copy(f, self.out)

    # ------------------------------------------------------------------------- d
    def stage_d(self, log, deadline):
        case = [self.py, "-m", "benchmarks.gpu_cases", "sanitize"]
        if self.dry:
            print("[d] dry run: the sanitizer case on the CPU backend, without compute-sanitizer")
            return self.run(case + ["--backend", "cpu", "--device", "cpu"], log, deadline)
        cs = shutil.which("compute-sanitizer") or next(iter(sorted(
            glob.glob("/usr/local/cuda*/bin/compute-sanitizer") + glob.glob("/opt/nvidia/*/compute-sanitizer"))), None)
        if cs is None:
            print("[d] compute-sanitizer not found: not checked")
            self.notes.append("\n### d. compute-sanitizer memcheck: not found on this machine\n")
            return 3
        memcheck = os.path.join(self.work, "memcheck.txt")
        with open(memcheck, "w") as mlog:
            rc = self.run([cs, "--tool", "memcheck", "--error-exitcode", "7", "--print-limit", "20"]
                          + case + ["--backend", "cuda", "--device", "cuda"], mlog, deadline,
                          env=self.env(PYTORCH_NO_CUDA_MEMORY_CACHING="1"))
        text = open(memcheck, errors="replace").read()
        log.write(text)
        if rc != 0 and any(r in text.lower() for r in REFUSED) and not any(f in text for f in FAULTS):
            print("[d] compute-sanitizer was refused by this runtime (recorded, not a failure)")
            self.notes.append("\n### d. compute-sanitizer memcheck: refused by the runtime (see stage_d.log)\n")
            return 3
        summary = next((line.strip() for line in text.splitlines() if "ERROR SUMMARY" in line), f"exit {rc}")
        self.notes.append(f"\n### d. compute-sanitizer memcheck: {summary}\n")
        return rc

    # ------------------------------------------------------------------------- e
    def stage_e(self, log, deadline):
        found = sorted(glob.glob(os.path.join(self.out, "bench-*.json")))
        if not found:
            print("[e] no benchmark summary (stage c did not finish)")
            return 1
        report = os.path.join(self.work, "report")
        rc = self.run([self.py, "-m", "benchmarks.report", "--json", *found, "--out", report], log, deadline)
        for md in glob.glob(os.path.join(report, "*.md")):
            shutil.copy(md, self.out)
        text = key_numbers(found)
        print(text)
        self.notes.append(text)
        return rc

    # ------------------------------------------------------------------------- all
    def finish(self):
        """Everything else in one archive (the output folder stays at 8 files), the summary."""
        with tarfile.open(os.path.join(self.out, "extra.tar.gz"), "w:gz") as tar:
            for name in sorted(os.listdir(self.work)):
                if name != "build-temp" and not name.startswith("_C"):
                    tar.add(os.path.join(self.work, name), arcname=name)
        self.publish()
        print()
        with open(os.path.join(self.out, "summary.md")) as f:
            print(f.read())
        print(f"Everything is in {self.out} ({len(os.listdir(self.out))} files); "
              f"{time.monotonic() - self.t0:.0f} s in all")
        shutil.rmtree(self.work, ignore_errors=True)


def key_numbers(paths):
    """The fused rows of the benchmark summaries with the numbers the GPU targets are about."""
    rows, lines = [], ["\n### e. key numbers (the report has every row)\n"]
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += data["rows"]
        mm, bw = data.get("matmul_flops_per_s", {}), data.get("copy_bytes_per_s", {})
        lines += [f"- matmul rate {v / 1e9:.0f} GFLOP/s ({k}), copy bandwidth {bw.get(k, 0) / 1e9:.0f} GB/s, "
                  "same run" for k, v in mm.items()]
    ok = [r for r in rows if r.get("status") == "ok" and r.get("median_s")]

    def find(op, pas, n, backend):
        return next((r for r in ok if (r["op"], r["pass"], r["N"], r["backend"]) == (op, pas, n, backend)), None)

    def f(v, fmt):
        return fmt % v if v is not None else "-"
    lines += ["", "| op | pass | dtype | size | backend | ms | % matmul | vs reference | vs sdpa | % bandwidth bound |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["op"], r["pass"], r["dtype"], r["N"], r["backend"])):
        if r["op"] not in ("pam", "cam") or r["backend"] in ("reference", "sdpa", "flex") or r.get("variant"):
            continue
        sd = find("pam", r["pass"], r["N"], "sdpa") if r["op"] == "pam" else None
        lines.append(
            f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['H']}x{r['W']} | {r['backend']} | "
            f"{r['median_s'] * 1e3:.2f} | {f(r.get('frac_of_matmul') and 100 * r['frac_of_matmul'], '%.0f%%')} | "
            f"{f(r.get('speedup_vs_reference'), '%.2fx')} | {f(sd and sd['median_s'] / r['median_s'], '%.2fx')} | "
            f"{f(r.get('frac_of_bandwidth') and 100 * r['frac_of_bandwidth'], '%.0f%%')} |")
    lines.append("\nGPU targets: PAM fwd >= 50% of the bf16 matmul rate; PAM fwd+bwd >= 5x reference and "
                 ">= 1.5x sdpa; CAM fwd+bwd within 2x of the bandwidth bound.")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check",
                                 description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("out", nargs="?", help="output folder (default $GPU_CHECK_OUT, $OUT, ./gpu_check_out)")
    ap.add_argument("--dry-run", action="store_true", help="every stage on CPU tensors, tiny shapes, caps x6")
    env = os.environ.get   # the defaults also come from the old script's variables GPU_CHECK_*
    ap.add_argument("--stages", default=env("GPU_CHECK_STAGES", "so,a,b,c,d,e"),
                    help="comma (or space) list, e.g. c,e to rerun the benchmark ($GPU_CHECK_STAGES)")
    ap.add_argument("--budget", type=float, default=float(env("GPU_CHECK_BUDGET", 540)),
                    help="seconds for all stages (GPU; scaled in a dry run; $GPU_CHECK_BUDGET)")
    ap.add_argument("--cap-scale", type=float, default=env("GPU_CHECK_CAP_SCALE"),
                    help="multiply every cap and the budget (default 6 in a dry run, 1 on the GPU; "
                    "$GPU_CHECK_CAP_SCALE)")
    args = ap.parse_args(argv)
    out = args.out or os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT") or os.path.join(ROOT, "gpu_check_out")
    os.makedirs(out, exist_ok=True)
    scale = args.cap_scale or (6 if args.dry_run else 1)
    check = Check(os.path.abspath(out), args.dry_run, args.budget, scale)
    if not args.dry_run:
        check.place_library()
    stages = args.stages.replace(",", " ").split()
    for name in ("so", "a", "b", "c", "d", "e"):
        if name in stages:
            check.stage(name, getattr(check, f"stage_{name}"))
    check.finish()
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
