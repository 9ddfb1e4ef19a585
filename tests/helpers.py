"""Devices and dtypes for the tests. Never touches CUDA at import time (collection must work on any machine).

KESTREL_TEST_DEVICE=cpu | cuda | cpu,cuda overrides the devices tried; otherwise both are listed and the cuda
cases carry the `gpu` marker, which conftest.py skips where no GPU is present.
"""

import os

import pytest
import torch

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def requested_devices():
    env = os.environ.get("KESTREL_TEST_DEVICE", "").strip()
    return [d.strip() for d in env.split(",") if d.strip()] if env else None


def gpu_available():
    return torch.cuda.is_available()


def devices():
    """Parameters for a `device` argument: cuda cases are marked `gpu`."""
    return [pytest.param(d, marks=pytest.mark.gpu) if d.startswith("cuda") else d
            for d in (requested_devices() or ["cpu", "cuda"])]


def uses_gpu():
    requested = requested_devices()
    return any(d.startswith("cuda") for d in requested) if requested else gpu_available()


def configure_triton_interpreter():
    """Run Triton kernels under the interpreter on CPU tensors when no GPU is used (before triton is imported)."""
    if not uses_gpu():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def skip_gpu_items(items):
    if gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def same_state_value(a, b):
    """Two optimizer-state entries are equal: tensors bit for bit; a step count may be an int (bnb, checkpoints)
    on one side and a 0-d tensor (kestrel's live state) on the other."""
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.equal(a, b) if a.device == b.device else torch.equal(a.cpu(), b.cpu())
    if torch.is_tensor(a) or torch.is_tensor(b):
        return int(a) == int(b)
    return a == b
