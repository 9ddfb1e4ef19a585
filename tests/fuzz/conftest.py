"""Property-based fuzzing of kestrel's public surface (hypothesis). Run by tests/test_fuzz.py in a subprocess, so
that a crash in native code fails that test (with the case being run) instead of killing the suite.

Budget: KESTREL_FUZZ=ci (the default, what CI runs: a fixed, derandomized set of examples, a few minutes on two
cores) or KESTREL_FUZZ=long (many more examples, fresh random ones each run); KESTREL_FUZZ_EXAMPLES=N overrides the
number of examples per property.
"""

import faulthandler
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers.py

import helpers
from hypothesis import HealthCheck, settings

faulthandler.enable()  # a crash prints the Python stack of the case that caused it

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile("ci", max_examples=300, derandomize=True, database=None, **_common)
settings.register_profile("long", max_examples=5000, **_common)
_profile = os.environ.get("KESTREL_FUZZ", "ci")
if _profile not in ("ci", "long"):
    raise SystemExit(f"KESTREL_FUZZ must be ci or long, got {_profile!r}")
if os.environ.get("KESTREL_FUZZ_EXAMPLES"):
    settings.register_profile(
        "custom", parent=settings.get_profile(_profile), max_examples=int(os.environ["KESTREL_FUZZ_EXAMPLES"])
    )
    _profile = "custom"
settings.load_profile(_profile)


def pytest_configure(config):
    helpers.configure_triton_interpreter()


def pytest_collection_modifyitems(config, items):
    helpers.skip_gpu_items(items)
