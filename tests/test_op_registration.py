"""How the Triton-backed ops are registered (kestrel.ops._library.triton_kernel_op): under torch.compile's
functional tracing (AOTAutograd) a call on CUDA tensors decomposes into its Triton launches
(`triton_kernel_wrapper_functional`, which Inductor compiles with the ops around it), a call on CPU tensors stays one
opaque op (its CPU kernel runs). The CUDA half traces fake CUDA tensors, so it needs a CUDA build of torch but no GPU:
CI runs it in the CUDA build check (.ci/cuda_build_check.sh); a CPU build of torch skips it."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import aot_function
from torch._subclasses.fake_tensor import FakeTensorMode

from kestrel.ops import kv_bottleneck_lookup, plga_attention, softplus_attention, tree_attention, vq_topk


def call_targets(fn, *inputs, compile=False):
    """The call_function targets of fn's forward graph as AOTAutograd traces it (compile=True: through
    torch.compile, whose tracing skips the wrappers' host-side value checks, as a user's compile does)."""
    seen = []

    def compiler(gm, _inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    if compile:
        torch._dynamo.reset()
        torch.compile(fn, backend=aot_autograd(fw_compiler=compiler), fullgraph=True)(*inputs)
    else:
        aot_function(fn, fw_compiler=compiler)(*inputs)
    return seen


def bits(B, T):
    return torch.zeros((B, T, (T + 31) // 32), dtype=torch.int32)


CASES = {
    "vq_topk": (lambda x, cb: vq_topk(x, cb, 8), lambda: (torch.randn(2, 40, 16), torch.randn(2, 100, 16))),
    "kv_bottleneck_lookup": (
        lambda z, keys, values: kv_bottleneck_lookup(z, keys, values, 2)[0],
        lambda: (torch.randn(6, 3, 14), torch.randn(3, 32, 14), torch.randn(3, 32, 10)),
    ),
    "softplus_attention": (
        lambda q, k, v: softplus_attention(q, k, v, reweight_p=15.0),
        lambda: tuple(torch.randn(1, 2, 16, 64) for _ in range(3)),
    ),
    "softplus_attention tree": (
        lambda q, k, v, lens, b: softplus_attention(q, k, v, cache_seqlens=lens, tree_mask_bits=b),
        lambda: (
            torch.randn(1, 2, 5, 64),
            torch.randn(1, 2, 20, 64),
            torch.randn(1, 2, 20, 64),
            torch.tensor([4], dtype=torch.int32),
            bits(1, 5),
        ),
    ),
    "tree_attention": (
        lambda q, k, v, lens, b: tree_attention(q, k, v, lens, b),
        lambda: (
            torch.randn(1, 4, 5, 64),
            torch.randn(1, 2, 20, 64),
            torch.randn(1, 2, 20, 64),
            torch.tensor([4], dtype=torch.int32),
            bits(1, 5),
        ),
    ),
    "plga_attention tree": (
        lambda q, k, v, G, lens, b: plga_attention(q, k, v, G, cache_seqlens=lens, tree_mask_bits=b),
        lambda: (
            torch.randn(1, 2, 5, 32),
            torch.randn(1, 2, 20, 32),
            torch.randn(1, 2, 20, 32),
            torch.randn(1, 2, 32, 32),
            torch.tensor([4], dtype=torch.int32),
            bits(1, 5),
        ),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_calls_stay_one_opaque_op(name):
    fn, make = CASES[name]
    targets = call_targets(fn, *make(), compile=True)
    assert any(t.startswith("kestrel.") for t in targets), targets
    assert not any("triton_kernel_wrapper" in t for t in targets), targets


def cuda_targets(name):
    """The graph targets of CASES[name] on fake CUDA tensors (run by cuda_report in a process where Triton is not
    interpreted: the interpreter would launch on the fake tensors)."""
    if not torch.cuda.is_available():  # no device to ask for its SM count: the split heuristic gets an H100's
        importlib.import_module("kestrel.kernels.tree_attention")._sm_count = lambda d: 132
    fn, make = CASES[name]
    with FakeTensorMode() as mode:
        inputs = [mode.from_tensor(t).to("cuda") for t in make()]
        lowp = name not in ("vq_topk", "kv_bottleneck_lookup")
        inputs = [t.half() if t.is_floating_point() and lowp else t for t in inputs]
        return call_targets(fn, *inputs)


def cuda_report(names):
    """{name: graph targets} for the CUDA calls, computed in a subprocess without TRITON_INTERPRET."""
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import test_op_registration as t; "
        "print(json.dumps({n: t.cuda_targets(n) for n in sys.argv[2:]}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", script, here, *names], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
def test_cuda_calls_decompose_into_triton_launches():
    for name, targets in cuda_report(list(CASES)).items():
        assert any("triton_kernel_wrapper_functional" in t for t in targets), (name, targets)
        assert not any(t.startswith("kestrel.") for t in targets), (name, targets)


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
def test_cuda_float64_calls_stay_opaque():
    """A dtype the kernel does not take (vq_topk in float64 runs the chunked path on the device) is not
    decomposed: the registration's `decompose` predicate."""
    with FakeTensorMode() as mode:
        x, cb = (mode.from_tensor(torch.randn(1, 10, 8, dtype=torch.float64)).to("cuda") for _ in range(2))
        targets = call_targets(lambda a, b: vq_topk(a, b, 2), x, cb)
    assert "kestrel.vq_topk.default" in targets and not any("triton_kernel_wrapper" in t for t in targets)
