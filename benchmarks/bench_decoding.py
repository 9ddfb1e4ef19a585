"""End-to-end decoding steps of a KestrelLM: one tree speculative step (draft heads + tree forward with tree
attention + greedy verification + cache compaction) beside one plain decoding step (a one-token forward + argmax).

GPU: a ~1B-parameter random-weight model (vocab 32000, d_model 2048, 20 layers, 16 heads, 8 KV heads, head dim 128,
4 draft heads; bf16), a 512-token prefix, batch 1 and 8, static trees of 16, 32 and 64 nodes. CPU: a tiny model
(d_model 128, 4 layers), prefix 128. The speedup column is plain step / speculative step (below 1): its inverse is
the mean accepted length (tokens per step) at which speculation breaks even. GB/s counts what a step must read: the
weights once and the K/V of the prefix (and, for the tree step, the tree's K/V).
"""

import math

import torch

from .harness import compare


def tree_choices(num_nodes, depth=4, max_rank=8):
    """Medusa-style choices of num_nodes - 1 paths: the best by a rank prior (a path's score is the sum of
    -log(rank + 1.5) over its ranks, so a child never outscores its parent; ties go to shorter paths)."""
    frontier, paths = [()], []
    for _ in range(depth):
        frontier = [p + (r,) for p in frontier for r in range(max_rank)]
        paths += frontier
        frontier = sorted(frontier, key=lambda p: sum(-math.log(r + 1.5) for r in p), reverse=True)[:max_rank]
    ranked = sorted(paths, key=lambda p: (-sum(-math.log(r + 1.5) for r in p), len(p), p))
    chosen = set()
    for path in ranked:
        if len(chosen) == num_nodes - 1:
            break
        if path[:-1] == () or path[:-1] in chosen:
            chosen.add(path)
    return [list(p) for p in sorted(chosen, key=lambda p: (len(p), p))]


def model_config(device, quick):
    from kestrel.models import KestrelConfig

    if device.type == "cuda":
        return (
            KestrelConfig(
                vocab_size=32000,
                d_model=2048,
                n_layers=20 if not quick else 4,
                n_heads=16,
                n_kv_heads=8,
                num_draft_heads=4,
                max_seq_len=4096,
            ),
            torch.bfloat16,
            512,
        )
    return (
        KestrelConfig(
            vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, num_draft_heads=4, max_seq_len=1024
        ),
        torch.float32,
        128,
    )


def build_model(device, quick):
    """(model, dtype, prefix) of the benchmark: random weights, random draft heads."""
    from kestrel.models import KestrelLM

    config, dtype, prefix = model_config(device, quick)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (a 1B model's CPU init takes long)
        model = KestrelLM(config).to(dtype=dtype).eval()
    with torch.no_grad():  # zero-initialised heads would all repeat the LM head
        for head in model.draft_heads:
            head.proj.weight.normal_(0, 0.02)
    return model, dtype, prefix


def decoding_steps(model, B, prefix, device):
    """(plain_step, speculative_step(T)): closures over a cache prefilled with B random prompts of `prefix` tokens;
    each call restores the cache lengths, so every call times the same step."""
    from kestrel.decoding import KVCache, TreeSpec
    from kestrel.decoding.speculative import SpeculativeStep

    cache = KVCache.for_model(model, B, max_len=prefix + 128)
    prompt = torch.randint(0, model.config.vocab_size, (B, prefix), device=device)
    with torch.no_grad():
        logits, hidden = model(prompt, cache, return_hidden=True)
    token, hidden_last = logits[:, -1].argmax(-1), hidden[:, -1]
    saved = cache.seqlens.clone()

    @torch.no_grad()
    def plain_step():
        model(token[:, None], cache).argmax(-1)
        cache.seqlens.copy_(saved)

    def speculative_step(T):
        step = SpeculativeStep(model, TreeSpec(choices=tree_choices(T)), B, device)

        @torch.no_grad()
        def run_step():
            step(cache, token, hidden_last)
            cache.seqlens.copy_(saved)

        return run_step

    return plain_step, speculative_step


def run(device, quick=False):
    device = torch.device(device)
    model, dtype, prefix = build_model(device, quick)
    config = model.config
    params = model.num_parameters()
    weight_bytes = params * torch.finfo(dtype).bits // 8
    kv_row_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8
    rows = []
    for B in [1, 8] if not quick else [1]:
        plain_step, speculative_step = decoding_steps(model, B, prefix, device)
        for T in [16, 32, 64] if not quick else [16]:
            nbytes = weight_bytes + B * (prefix + T) * kv_row_bytes
            size = f"{params / 1e9:.2f}B" if device.type == "cuda" else f"{params / 1e6:.1f}M"
            case = f"{size} {str(dtype).replace('torch.', '')} bs{B} ctx{prefix} tree{T}"
            rows += compare(
                "speculative step",
                case,
                device,
                speculative_step(T),
                [("plain decode step", plain_step)],
                nbytes,
                repeats=11 if device.type == "cuda" else 7,
            )
    return rows


try:  # pytest-benchmark microbenchmark (CPU)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("impl", ["speculative step tree16", "plain decode step"])
    def test_decoding_step_cpu(benchmark, impl):
        device = torch.device("cpu")
        model, _, prefix = build_model(device, quick=True)
        plain_step, speculative_step = decoding_steps(model, 1, prefix, device)
        benchmark.group = "decoding step 0.8M fp32 bs1 ctx128"
        benchmark.pedantic(
            plain_step if impl == "plain decode step" else speculative_step(16), rounds=20, warmup_rounds=2
        )
