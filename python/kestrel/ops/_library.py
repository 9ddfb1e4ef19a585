"""How kestrel registers a Triton-backed op: one function, used by every op whose GPU implementation is Triton.

`triton_kernel_op(name, cuda, cpu, fake)` makes `cuda` a `torch.library.triton_op` (its Triton launches go through
`torch.library.wrap_triton`, so that torch.compile sees the kernels and Inductor schedules them with the ops around
them), registers `cpu` as the op's CPU kernel (`register_kernel("cpu")`): the dispatcher picks the implementation
by device, and neither implementation branches on it. Two adjustments to triton_op's defaults, both for the CPU:
- `fake` is the op's fake (meta) implementation. triton_op would trace `cuda` itself, which under TRITON_INTERPRET=1
  (how CI runs Triton kernels on CPU tensors) would launch the interpreter on fake tensors;
- under torch.compile a call on CPU tensors stays an opaque op that runs the CPU kernel (triton_op decomposes every
  call into its Triton launches, which for CPU tensors cannot compile); on CUDA tensors the call decomposes as
  triton_op does (kept whole under torch.export, as triton_op does).

The C++ ops are declared in csrc/ops.cpp (TORCH_LIBRARY(kestrel, m), every schema there); the Triton-backed ops'
schemas are inferred from the type annotations of their `cuda` function, beside their Python wrapper in
kestrel/ops/<op>.py.
"""

import contextlib

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode


def _on_cuda(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type == "cuda"
    return False


def triton_kernel_op(name, cuda, cpu, fake, *, mutates_args=(), decompose=None):
    """Register the op `name` ("kestrel::<op>"); see the module docstring. Returns the op (a CustomOpDef).
    decompose(*args, **kwargs) -> bool, optional: whether a CUDA call may be decomposed under torch.compile (False
    for calls whose CUDA implementation is not Triton, e.g. a dtype the kernel does not take: they stay opaque)."""
    op = torch.library.triton_op(name, cuda, mutates_args=mutates_args)
    op.register_kernel("cpu")(cpu)
    op.register_fake(fake)

    def functional(mode, overload, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        opaque = not _on_cuda(args, kwargs) or (decompose is not None and not decompose(*args, **kwargs))
        if opaque or custom_triton_ops_decomposition_disabled():
            return mode.__torch_dispatch__(overload, types, args, kwargs)
        with mode:
            return cuda(*args, **kwargs)

    op.register_torch_dispatch(FunctionalTensorMode, functional)
    return op


@contextlib.contextmanager
def autograd_in_kernel():
    """Autograd inside an op's kernel (a CPU backward that differentiates the PyTorch formulation it recomputes).
    Below an op the dispatcher excludes the autograd keys (and includes ADInplaceOrView), so a graph built there
    would record nothing: this undoes exactly that for the kernel's own graph, then restores the dispatcher's state.
    The kernel's inputs and outputs stay outside any graph (detached leaves in, plain gradients out)."""
    keys = torch._C.DispatchKey
    include = torch._C._dispatch_tls_local_include_set().remove(keys.ADInplaceOrView)
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(include, exclude), torch.enable_grad():
        yield


__all__ = ["autograd_in_kernel", "triton_kernel_op"]
