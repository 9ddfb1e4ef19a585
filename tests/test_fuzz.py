"""The fuzz suite (tests/fuzz/, hypothesis properties over every public op, module and optimizer), run in a
subprocess so that a crash in native code fails this test, naming the case that was running, instead of killing
the test session. KESTREL_FUZZ=long (or KESTREL_FUZZ_EXAMPLES=N) gives it a longer budget; see tests/fuzz/conftest.py.
"""

import os
import subprocess
import sys
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"


def run_fuzz(directory, log, timeout=1800):
    """(return code, output, the last case logged before the end) of the fuzz properties in `directory`."""
    env = dict(os.environ, KESTREL_FUZZ_LOG=str(log), PYTHONFAULTHANDLER="1")
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "python_files=fuzz_*.py",
        "--rootdir",
        str(directory),
        str(directory),
    ]
    result = subprocess.run(command, cwd=directory, env=env, capture_output=True, text=True, timeout=timeout)
    cases = log.read_text().splitlines() if log.exists() else []
    return result.returncode, result.stdout + result.stderr, cases[-1] if cases else None


def report(returncode, output, last_case):
    if returncode < 0:
        return f"the fuzz run crashed (signal {-returncode}) while running: {last_case}\n{output[-4000:]}"
    return f"the fuzz properties failed (exit {returncode}):\n{output[-8000:]}"


def test_fuzz_suite(tmp_path):
    returncode, output, last_case = run_fuzz(FUZZ_DIR, tmp_path / "cases.log")
    assert returncode == 0, report(returncode, output, last_case)


CRASHING_PROPERTY = """
import ctypes
from hypothesis import given, strategies as st
from cases import note


@given(st.integers(0, 3))
def test_reaches_native_code(n):
    note(f"native case n={n}")
    if n == 2:
        ctypes.string_at(0)  # a segfault, as a bug in a kernel would give
"""


def test_the_harness_reports_a_crash_and_the_case_that_caused_it(tmp_path):
    """The subprocess is what turns a crash into a failure: checked with a property that segfaults."""
    crash_dir = tmp_path / "fuzz"
    crash_dir.mkdir()
    for name in ("conftest.py", "cases.py"):
        (crash_dir / name).write_text((FUZZ_DIR / name).read_text())
    (crash_dir / "fuzz_crash.py").write_text(CRASHING_PROPERTY)
    # the copied conftest finds tests/helpers.py two levels up: give it this checkout's tests directory
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = str(FUZZ_DIR.parent) + (os.pathsep + env_path if env_path else "")
    try:
        returncode, output, last_case = run_fuzz(crash_dir, tmp_path / "cases.log", timeout=300)
    finally:
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            del os.environ["PYTHONPATH"]
    assert returncode < 0, output[-2000:]
    assert last_case == "[fuzz] native case n=2"
    assert "Fatal Python error" in output  # faulthandler's stack of the crashing case
    assert "native case n=2" in report(returncode, output, last_case)
