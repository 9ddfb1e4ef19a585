"""Devices and dtypes for the tests. Never touches CUDA at import time (collection must work on any machine).

KESTREL_TEST_DEVICE=cpu | cuda | cpu,cuda overrides the devices tried; otherwise both are listed and the cuda
cases carry the `gpu` marker, which conftest.py skips where no GPU is present.
"""

import ctypes
import math
import os
import sys

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


def reuse_freed_memory():
    """glibc's malloc serves each allocation above 32 MiB by its own mmap and unmaps it when freed, so the float64
    references of the 50-step tests (a 34 MB temporary per operation at 1024x4097) paid a page fault per 4 KiB page,
    every operation: 47 s for one such test, 52 s of CPU time in the kernel. With mmap off and no trimming, freed
    blocks stay in the heap and are reused: 15 s, and the whole suite 20 minutes -> 14 (peak RSS 2.3 GB). The tests'
    process only; the benchmarks keep the default allocator, as users have it."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    mallopt(m_mmap_max, 0)
    mallopt(m_trim_threshold, 2**31 - 1)


def skip_gpu_items(items):
    if gpu_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def heterogeneous_grad(shape, dtype, device, generator):
    """Gradients whose scale varies over three decades inside every block: all regions of both 8-bit maps."""
    scale = 10 ** torch.empty(shape).uniform_(-3, 0, generator=generator)
    return (torch.randn(shape, generator=generator) * scale).to(dtype).to(device)


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


def chi_square_critical(df, z=3.2905):
    """The chi-square quantile at p = 5e-4 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(counts, expected_probs, n):
    """Chi-square statistic and degrees of freedom, merging the cells with expected count < 5 into one."""
    expected = expected_probs * n
    big = expected >= 5
    stat = (((counts[big] - expected[big]) ** 2) / expected[big]).sum().item()
    cells = int(big.sum())
    rest_expected, rest_count = expected[~big].sum().item(), counts[~big].sum().item()
    if rest_expected > 0:
        stat += (rest_count - rest_expected) ** 2 / max(rest_expected, 1e-12)
        cells += 1
    return stat, cells - 1


def assert_pairs_follow(model, prompt, new, options):
    """Three sampled tokens after one prompt (new: (n, 3)): the frequencies of (x1, x2) and of (x2, x3) pass a
    chi-square test against the model's exact distribution, computed by enumerating every 1- and 2-token
    continuation (sampling_probs: the temperature / top-k / top-p of `options`)."""
    from kestrel.ops.tree_verify import sampling_probs

    V, L, n = model.config.vocab_size, prompt.numel(), new.shape[0]

    def probs(context):
        return sampling_probs(model(context)[:, -1].double(), **options).double()

    with torch.no_grad():
        p1 = probs(prompt[None])[0]  # (V,)
        ctx2 = torch.cat([prompt.expand(V, L), torch.arange(V)[:, None]], 1)
        p2 = probs(ctx2)  # (V, V): p(x2 | x1)
        ctx3 = torch.cat([ctx2.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        p3 = probs(ctx3).view(V, V, V)  # p(x3 | x1, x2)
    joint12 = p1[:, None] * p2
    joint23 = (joint12[:, :, None] * p3).sum(0)
    for (a, b), expected in (((0, 1), joint12), ((1, 2), joint23)):
        counts = torch.zeros(V * V, dtype=torch.float64)
        counts.index_add_(0, new[:, a] * V + new[:, b], torch.ones(n, dtype=torch.float64))
        stat, df = chi_square(counts, expected.flatten(), n)
        assert stat < chi_square_critical(df), (a, b, stat, df)


def assert_compiled_step_equals_eager(make, start, grads, max_compiles=2):
    """Two optimizers built by make(params) on copies of the `start` tensors, one stepped eagerly and one inside
    torch.compile(fullgraph=True) (a backend that runs the traced graph and counts compilations), with the same
    gradients (`grads`: a list of per-step gradient lists): the parameters and every state entry must be
    bit-identical, and the step compiles at most `max_compiles` times (the first step builds the state)."""
    torch._dynamo.reset()
    eager = [torch.nn.Parameter(t.clone()) for t in start]
    compiled = [torch.nn.Parameter(t.clone()) for t in start]
    opt_eager, opt_compiled = make(eager), make(compiled)
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    @torch.compile(fullgraph=True, backend=backend)
    def step(gs):
        for p, g in zip(compiled, gs):
            p.grad = g
        opt_compiled.step()

    for gs in grads:
        for p, g in zip(eager, gs):
            p.grad = g.clone()
        opt_eager.step()
        step([g.clone() for g in gs])
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)
        for key, value in opt_eager.state[a].items():
            assert same_state_value(value, opt_compiled.state[b][key]), key
    assert len(compiles) <= max_compiles, f"{len(compiles)} compilations for {len(grads)} steps"
    torch._dynamo.reset()
