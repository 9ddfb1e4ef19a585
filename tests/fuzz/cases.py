"""Shared pieces of the fuzz properties: a log of the case about to run (the last line names the culprit when
native code crashes), value strategies with extreme floats, and the check that a call either raised a clear
error or returned."""

import os
import sys

import torch
from hypothesis import strategies as st

_LOG = os.environ.get("KESTREL_FUZZ_LOG")


def examples(n):
    """A property's number of examples: 5 n under the ci profile, 80 n under long, KESTREL_FUZZ_EXAMPLES if set."""
    if os.environ.get("KESTREL_FUZZ_EXAMPLES"):
        return int(os.environ["KESTREL_FUZZ_EXAMPLES"])
    return n * (80 if os.environ.get("KESTREL_FUZZ", "ci") == "long" else 5)


def note(case):
    """Record the case about to run (before any native call)."""
    line = f"[fuzz] {case}\n"
    if _LOG:
        with open(_LOG, "a") as handle:
            handle.write(line)
    else:
        sys.stderr.write(line)


# float values that matter: ordinary ones, zeros of both signs, extremes, subnormals, non-finite
SPECIAL = [
    0.0,
    -0.0,
    1.0,
    -1.0,
    1e-45,
    -1e-45,
    1e-38,
    3.0e38,
    -3.0e38,
    1e19,
    2e19,
    -1e20,
    1e-30,
    float("inf"),
    float("-inf"),
    float("nan"),
]


def tensors(shape, draw, special_fraction=0.1, scale_range=(-6, 2), generator_seed=None):
    """A float32 tensor of `shape`: normal values times 10^U(scale_range), a fraction replaced by SPECIAL values."""
    seed = draw(st.integers(0, 2**31 - 1)) if generator_seed is None else generator_seed
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())
    lo, hi = scale_range
    x = torch.randn(n, generator=g) * 10 ** (torch.rand(n, generator=g) * (hi - lo) + lo)
    if n and special_fraction > 0:
        count = int(draw(st.integers(0, max(1, int(n * special_fraction)))))
        idx = torch.randint(0, n, (count,), generator=g)
        vals = torch.tensor([SPECIAL[i] for i in torch.randint(0, len(SPECIAL), (count,), generator=g).tolist()])
        x[idx] = vals
    return x.reshape(shape)


CLEAR_ERRORS = (TypeError, ValueError, NotImplementedError, RuntimeError, IndexError)


def raises_clearly(fn, *names):
    """Run fn; return None if it returned, else the exception, which must be one of CLEAR_ERRORS and (if `names`
    are given) mention one of them."""
    try:
        fn()
    except CLEAR_ERRORS as error:
        message = str(error)
        assert message.strip(), f"an error without a message: {type(error).__name__}"
        if names:
            assert any(name in message for name in names), f"the error names none of {names}: {message}"
        return error
    return None
