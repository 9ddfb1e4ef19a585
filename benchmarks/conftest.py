import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import helpers


def pytest_configure(config):
    helpers.configure_triton_interpreter()


def pytest_collection_modifyitems(config, items):
    helpers.skip_gpu_items(items)
