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
    for level in range(depth):
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
        return KestrelConfig(vocab_size=32000, d_model=2048, n_layers=20 if not quick else 4, n_heads=16,
                             n_kv_heads=8, num_draft_heads=4, max_seq_len=4096), torch.bfloat16, 512
    return KestrelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, num_draft_heads=4,
                         max_seq_len=1024), torch.float32, 128


def run(device, quick=False):
    from kestrel.decoding import KVCache, TreeSpec
    from kestrel.decoding.speculative import SpeculativeStep
    from kestrel.models import KestrelLM

    device = torch.device(device)
    config, dtype, prefix = model_config(device, quick)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (a 1B model's CPU init takes long)
        model = KestrelLM(config).to(dtype=dtype).eval()
    with torch.no_grad():  # random draft heads (zero-initialised heads would all repeat the LM head)
        for head in model.draft_heads:
            head.proj.weight.normal_(0, 0.02)
    params = model.num_parameters()
    weight_bytes = params * torch.finfo(dtype).bits // 8
    batches = [1, 8] if not quick else [1]
    tree_sizes = [16, 32, 64] if not quick else [16]
    rows = []
    for B in batches:
        cache = KVCache.for_model(model, B, max_len=prefix + 128)
        prompt = torch.randint(0, config.vocab_size, (B, prefix), device=device)
        with torch.no_grad():
            logits, hidden = model(prompt, cache, return_hidden=True)
        token, hidden_last = logits[:, -1].argmax(-1), hidden[:, -1]
        saved = cache.seqlens.clone()
        kv_row_bytes = 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.finfo(dtype).bits // 8

        def plain_step():
            model(token[:, None], cache).argmax(-1)
            cache.seqlens.copy_(saved)

        for T in tree_sizes:
            step = SpeculativeStep(model, TreeSpec(choices=tree_choices(T)), B, device)

            def speculative_step():
                step(cache, token, hidden_last)
                cache.seqlens.copy_(saved)

            nbytes = weight_bytes + B * (prefix + T) * kv_row_bytes
            case = (f"{params / 1e9:.2f}B {str(dtype).replace('torch.', '')} bs{B} ctx{prefix} tree{T}"
                    if device.type == "cuda" else f"{params / 1e6:.1f}M fp32 bs{B} ctx{prefix} tree{T}")
            with torch.no_grad():
                rows += compare("speculative step", case, device, speculative_step,
                                [("plain decode step", plain_step)], nbytes,
                                repeats=11 if device.type == "cuda" else 7)
    return rows
