"""Ahead-of-time sm_90 (H100/H200) builds of kestrel's Triton kernels, without a GPU: Triton's own ptxas compiles
a kernel with a launch's specialisation (16-byte aligned pointers, strides divisible by 16) and its cuobjdump
reports the registers spilled to the stack. Compiled Triton is stricter than the interpreter the CPU tests use (no
Python globals in a kernel, loop-carried types fixed, `_` a variable like any other), and a GPU has a shared-memory
budget, so each kernel family's tests build their launch configurations here. The builds run in a subprocess
(`run_check`) because the test session interprets Triton kernels.
"""

import os
import subprocess
import sys
import tempfile

SHARED_MEMORY_LIMIT = 227 * 1024  # bytes per block on sm_90


def build(fn, types, constexprs, num_warps, num_stages):
    """(shared memory bytes, stack bytes per thread) of `fn` built for sm_90. types(name) gives each runtime
    argument's Triton type ("*bf16", "i32", "fp32", ...); constexprs maps names to values."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: "constexpr" if n in constexprs else types(n) for n in fn.arg_names}
    aligned = [n for n in fn.arg_names if signature[n].startswith("*") or n.startswith("stride")]
    source = ASTSource(
        fn,
        signature,
        constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned},
    )
    kernel = triton.compile(
        source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": num_stages}
    )
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(kernel.asm["cubin"])
        handle.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name], capture_output=True, text=True).stdout
    return kernel.metadata.shared, int(usage.split("STACK:")[1].split()[0])


def run_check(script):
    """Run `script` (which imports this module and exits non-zero on a failure) in a compiling subprocess."""
    import pytest

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    if "cuobjdump" in result.stderr and "No such file" in result.stderr:
        pytest.skip("this Triton build ships no cuobjdump")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
