import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers  # noqa: E402


def pytest_configure(config):
    helpers.configure_triton_interpreter()  # before any test module imports triton


def pytest_collection_modifyitems(config, items):
    helpers.skip_gpu_items(items)
