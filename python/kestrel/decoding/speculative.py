"""Tree speculative decoding with Medusa-style draft heads (spec decoding.md §3).

Each step: the draft heads read the hidden state that produced the pending token and propose per-head top-k
tokens; the tree is drafted (a static tree from TreeSpec.choices, or a dynamic one from the best cumulative draft
log-probabilities); one target forward runs over the tree's nodes with tree attention; the tree is verified
(kestrel.ops.tree_verify: greedy, or lossless rejection sampling with deterministic drafts); the accepted nodes'
K/V are compacted in the cache. Everything between two host reads of the emitted tokens stays on the device.
"""

import torch

from ..ops.tree_verify import compact_kv_cache, sampling_probs, verify_tree_greedy, verify_tree_sample


def speculative_loop(model, cache, token, hidden_last, output, stats, spec, temperature, top_k, top_p, generator):
    """Run speculative steps until every sequence of `output` is done (see kestrel.decoding.generate)."""
    from .tree import build_tree, dynamic_tree, static_tree

    device = token.device
    B = token.shape[0]
    rows = torch.arange(B, device=device)
    depth = spec.tree_depth(model.config.num_draft_heads)
    if spec.dynamic:
        max_depth, num_leaves = min(depth, spec.max_nodes - 1), spec.max_nodes - 1
    else:
        static = static_tree(spec.choices)
        static_buffers = static.buffers(B, device)
        max_rank = int(static.rank.max()) + 1
    while not output.finished:
        draft_logits = model.draft_logits(hidden_last)[:, :depth]  # (B, depth, V)
        if spec.dynamic:
            head_logprobs, head_tokens = torch.log_softmax(draft_logits.float(), dim=-1).topk(spec.topk, dim=-1)
            parents, candidates = dynamic_tree(token, head_logprobs, head_tokens, spec.max_nodes)
            tree = build_tree(parents, max_depth=max_depth, num_leaves=num_leaves)
        else:
            candidates = static.candidates(token, draft_logits.topk(max_rank, dim=-1).indices)
            tree = static_buffers
        logits, hidden = model(candidates, cache, tree_depth=tree.depth, tree_mask_bits=tree.ancestor_bits,
                               return_hidden=True)
        if temperature == 0.0:
            accept_index, accept_len, next_token = verify_tree_greedy(candidates, logits.argmax(-1), tree)
        else:
            T = candidates.shape[1]
            probs = sampling_probs(logits, temperature, top_k, top_p)
            uniform = torch.rand((B, T), generator=generator, device=device)
            uniform_final = torch.rand((B,), generator=generator, device=device)
            accept_index, accept_len, next_token = verify_tree_sample(candidates, probs, tree, uniform,
                                                                      uniform_final)
        done = torch.tensor(output.done, device=device)
        before = cache.seqlens.clone()
        compact_kv_cache(cache.k, cache.v, cache.seqlens, accept_index)
        cache.seqlens.copy_(torch.where(done, before, cache.seqlens))  # finished sequences stop growing
        hidden_last = hidden[rows, accept_index[rows, accept_len.long()].long()]
        token = next_token
        stats.steps += 1
        index, lengths, nexts = accept_index.tolist(), accept_len.tolist(), next_token.tolist()
        tokens = candidates.tolist()
        for b in range(B):
            if output.done[b]:
                continue
            emitted = [tokens[b][index[b][j]] for j in range(1, lengths[b] + 1)] + [nexts[b]]
            stats.accept_lengths.append(len(emitted))
            stats.new_tokens += output.add(b, emitted)


__all__ = ["speculative_loop"]
