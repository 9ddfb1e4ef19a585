"""How the Triton-backed ops are registered (kestrel.ops._library.triton_kernel_op): under torch.compile's
functional tracing (AOTAutograd) a call on CUDA tensors decomposes into its Triton launches
(`triton_kernel_wrapper_functional`, which Inductor compiles with the ops around it), a call on CPU tensors stays one
opaque op (its CPU kernel runs). The CUDA half traces fake CUDA tensors, so it needs a CUDA build of torch but no GPU:
CI runs it in the CUDA build check (.ci/cuda_build_check.sh); a CPU build of torch skips it."""

import importlib

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


@pytest.mark.skipif(torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_calls_decompose_into_triton_launches(name, monkeypatch):
    if not torch.cuda.is_available():  # no device to ask for its SM count: the split heuristic gets an H100's
        monkeypatch.setattr(importlib.import_module("kestrel.kernels.tree_attention"), "_sm_count", lambda d: 132)
    fn, make = CASES[name]
    with FakeTensorMode() as mode:
        inputs = [mode.from_tensor(t).to("cuda") for t in make()]
        inputs = [
            t.half() if t.is_floating_point() and name != "vq_topk" and name != "kv_bottleneck_lookup" else t
            for t in inputs
        ]
        targets = call_targets(fn, *inputs)
    assert any("triton_kernel_wrapper_functional" in t for t in targets), targets
    assert not any(t.startswith("kestrel.") for t in targets), targets


def test_cuda_float64_calls_stay_opaque():
    """A dtype the kernel does not take (vq_topk in float64 runs the chunked path on the device) is not
    decomposed: the registration's `decompose` predicate."""
    if torch.version.cuda is None:
        pytest.skip("fake CUDA tensors need a CUDA build of torch")
    with FakeTensorMode() as mode:
        x, cb = (mode.from_tensor(torch.randn(1, 10, 8, dtype=torch.float64)).to("cuda") for _ in range(2))
        targets = call_targets(lambda a, b: vq_topk(a, b, 2), x, cb)
    assert "kestrel.vq_topk.default" in targets and not any("triton_kernel_wrapper" in t for t in targets)
