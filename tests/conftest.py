import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers
import pytest


def pytest_configure(config):
    helpers.configure_triton_interpreter()  # before any test module imports triton
    helpers.reuse_freed_memory()


def pytest_collection_modifyitems(config, items):
    helpers.skip_gpu_items(items)


@pytest.fixture(autouse=True)
def fresh_optim_manager():
    """GlobalOptimManager is process-global (keyed by parameter id): give every test a clean one."""
    yield
    try:
        from kestrel.optim import GlobalOptimManager
    except ImportError:
        return
    GlobalOptimManager.get_instance().initialize()
