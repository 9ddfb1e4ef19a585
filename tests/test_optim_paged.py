"""Paged optimizers (bnb's Paged* classes, is_paged=True): on CPU they warn once and behave as unpaged; on a GPU
their state lives in CUDA managed memory, is prefetched each step, and the numbers equal the unpaged optimizer's."""

import warnings

import pytest
import torch
from helpers import same_state_value

import kestrel
from kestrel import optim as K

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

PAGED = [
    (K.PagedAdamW8bit, K.AdamW8bit, {}),
    (K.PagedAdam8bit, K.Adam8bit, {}),
    (K.PagedAdamW32bit, K.AdamW32bit, {}),
    (K.PagedAdamW, K.AdamW, dict(optim_bits=8)),
    (K.PagedLion8bit, K.Lion8bit, {}),
    (K.PagedLion, K.Lion, {}),
    (K.PagedAdEMAMix8bit, K.AdEMAMix8bit, {}),
    (K.PagedAdEMAMix32bit, K.AdEMAMix32bit, {}),
]
IDS = [entry[0].__name__ for entry in PAGED]


def run(cls, kwargs, device, steps=4, dtype=torch.float32):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(dtype).to(device)) for s in [(4097,), (64, 100), (300,)]]
    opt = cls(params, **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 0.1).to(dtype).to(device)
        opt.step()
    return opt, params


@pytest.mark.parametrize("paged,plain,kwargs", PAGED, ids=IDS)
def test_paged_on_cpu_warns_once_and_equals_unpaged(paged, plain, kwargs):
    with pytest.warns(UserWarning, match=f"{paged.__name__}: paged optimizer state needs CUDA") as record:
        opt, params = run(paged, kwargs, "cpu")
    assert len([w for w in record if "paged" in str(w.message)]) == 1
    assert opt.is_paged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref_opt, ref_params = run(plain, kwargs, "cpu")
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
        for key, value in ref_opt.state[b].items():
            got = opt.state[a][key]
            assert same_state_value(got, value)


def test_paged_signature_checks():
    params = [torch.nn.Parameter(torch.randn(10))]
    with pytest.raises(TypeError, match="PagedAdamW8bit: is_paged is fixed to True"):
        K.PagedAdamW8bit(params, is_paged=False)
    assert issubclass(K.PagedLion8bit, K.Lion8bit) and K.PagedLion8bit.__module__ == "kestrel.optim.one_state"


def test_managed_ops_need_cuda():
    with pytest.raises(NotImplementedError, match="managed_zeros"):
        torch.ops.kestrel.managed_zeros(torch.zeros(1), [4], torch.uint8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged,plain,kwargs", PAGED, ids=IDS)
def test_paged_on_gpu_is_managed_and_equals_unpaged(paged, plain, kwargs, dtype):
    opt, params = run(paged, kwargs, "cuda", dtype=dtype)
    ref_opt, ref_params = run(plain, kwargs, "cuda", dtype=dtype)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
        for key, value in ref_opt.state[b].items():
            got = opt.state[a][key]
            assert same_state_value(got, value)
    # the paged states are outside the caching allocator's segments (managed memory); the unpaged ones inside
    segments = [(s["address"], s["address"] + s["total_size"]) for s in torch.cuda.memory_snapshot()]

    def pooled(t):
        return any(lo <= t.data_ptr() < hi for lo, hi in segments)

    for a, b in zip(params, ref_params):
        for key in ("state1", "state2"):
            if key in opt.state[a]:
                assert opt.state[a][key].is_cuda and not pooled(opt.state[a][key])
                assert pooled(ref_opt.state[b][key])


@pytest.mark.gpu
def test_managed_zeros_refuses_more_than_free():
    like = torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    with pytest.raises(RuntimeError, match="exceeds the device's free memory"):
        torch.ops.kestrel.managed_zeros(like, [int(total) * 2], torch.uint8)
    t = torch.ops.kestrel.managed_zeros(like, [1000, 3], torch.float32)
    assert t.shape == (1000, 3) and t.dtype == torch.float32 and t.is_cuda and bool((t == 0).all())
    torch.ops.kestrel.prefetch([t, like])  # managed and ordinary memory
    torch.cuda.synchronize()
