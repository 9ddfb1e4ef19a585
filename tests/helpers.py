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
    return [
        pytest.param(d, marks=pytest.mark.gpu) if d.startswith("cuda") else d
        for d in (requested_devices() or ["cpu", "cuda"])
    ]


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


def assert_cuda_equals_cpu(make, cpu_params, steps=10, seed=5, grad_fn=None):
    """Step an optimizer built by make(params) on CPU parameters and on CUDA copies with the same gradients; the
    parameters and every state entry must be bit-identical. grad_fn(shape, dtype, generator) draws a CPU gradient
    (default: N(0, 0.1^2))."""
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in cpu_params]
    opts = make(cpu_params), make(cuda_params)
    g = torch.Generator().manual_seed(seed)
    draw = grad_fn or (lambda shape, dtype, gen: (torch.randn(shape, generator=gen) * 0.1).to(dtype))
    for _ in range(steps):
        for a, b in zip(cpu_params, cuda_params):
            grad = draw(a.shape, a.dtype, g)
            a.grad, b.grad = grad, grad.cuda()
        opts[0].step()
        opts[1].step()
    for a, b in zip(cpu_params, cuda_params):
        assert torch.equal(a, b.cpu())
        for key, value in opts[0].state[a].items():
            assert same_state_value(value, opts[1].state[b][key]), key
