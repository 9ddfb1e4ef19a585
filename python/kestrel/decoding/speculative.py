"""Tree speculative decoding with Medusa-style draft heads (docs/models_and_decoding.md).

Each step: the draft heads read the hidden state that produced the pending token and propose per-head top-k
tokens; the tree is drafted (a static tree from TreeSpec.choices, or a dynamic one from the best cumulative draft
log-probabilities); one target forward runs over the tree's nodes with tree attention; the tree is verified
(kestrel.ops.tree_verify: greedy, or lossless rejection sampling with deterministic drafts); the accepted nodes'
K/V are compacted in the cache. Everything between two host reads of the emitted tokens stays on the device: per
step the host reads one small tensor (the accepted lengths, the accepted tokens and the next token, packed), and
keeps the cache's host mirror of its lengths and the finished-sequence mask from it (the mask goes to the device as
a scalar fill when a sequence finishes, no host-to-device copy).
"""

import torch

from ..ops.tree_verify import compact_kv_cache, sampling_probs, verify_tree_greedy, verify_tree_sample
from .tree import build_tree, dynamic_tree, static_tree


class SpeculativeStep:
    """One speculative decoding step for a model and a TreeSpec, batch size fixed: draft, tree forward, verify,
    compact. The static tree's buffers are built once."""

    def __init__(self, model, spec, batch_size, device):

        self.model, self.spec = model, spec
        self.depth = spec.tree_depth(model.config.num_draft_heads)
        self.rows = torch.arange(batch_size, device=device)
        if spec.dynamic:
            self.max_depth, self.num_leaves = min(self.depth, spec.max_nodes - 1), spec.max_nodes - 1
        else:
            self.static = static_tree(spec.choices)
            self.static_buffers = self.static.buffers(batch_size, device)
            self.max_rank = self.static.max_rank + 1

    def draft(self, token, hidden_last):
        """(candidates (B, T), TreeBuffers) from the pending tokens (B,) and the hidden states that produced them."""

        draft_logits = self.model.draft_logits(hidden_last)[:, : self.depth]  # (B, depth, V)
        if self.spec.dynamic:
            head_logprobs, head_tokens = torch.log_softmax(draft_logits.float(), dim=-1).topk(self.spec.topk, dim=-1)
            parents, candidates = dynamic_tree(token, head_logprobs, head_tokens, self.spec.max_nodes)
            return candidates, build_tree(parents, max_depth=self.max_depth, num_leaves=self.num_leaves)
        return self.static.candidates(token, draft_logits.topk(self.max_rank, dim=-1).indices), self.static_buffers

    def __call__(self, cache, token, hidden_last, temperature=0.0, top_k=None, top_p=None, generator=None):
        """Returns (candidates, accept_index, accept_len, next_token, hidden_last): the cache is compacted (its
        seqlens advanced by 1 + accept_len), hidden_last is the hidden state of the last accepted node."""
        candidates, tree = self.draft(token, hidden_last)
        logits, hidden = self.model(
            candidates, cache, tree_depth=tree.depth, tree_mask_bits=tree.ancestor_bits, return_hidden=True
        )
        if temperature == 0.0:
            accept_index, accept_len, next_token = verify_tree_greedy(candidates, logits.argmax(-1), tree)
        else:
            B, T = candidates.shape
            probs = sampling_probs(logits, temperature, top_k, top_p)
            uniform = torch.rand((B, T), generator=generator, device=candidates.device)
            uniform_final = torch.rand((B,), generator=generator, device=candidates.device)
            accept_index, accept_len, next_token = verify_tree_sample(candidates, probs, tree, uniform, uniform_final)
        compact_kv_cache(cache.k, cache.v, cache.seqlens, accept_index)
        cache.host_seqlens = None  # advanced by 1 + accept_len on the device; the caller may set the mirror again
        rows = self.rows
        hidden_last = hidden[rows, accept_index[rows, accept_len.long()].long()]
        return candidates, accept_index, accept_len, next_token, hidden_last


def speculative_loop(model, cache, token, hidden_last, output, stats, spec, temperature, top_k, top_p, generator):
    """Run speculative steps until every sequence of `output` is done (see kestrel.decoding.generate)."""
    B = token.shape[0]
    step = SpeculativeStep(model, spec, B, token.device)
    done = torch.tensor(output.done, device=token.device)  # once; afterwards scalar fills as sequences finish
    host_seqlens = cache.host_seqlens
    while not output.finished:
        before = cache.seqlens.clone()
        if host_seqlens is not None:
            cache.host_seqlens = host_seqlens  # known before the step: the tree forward needs no device read
        candidates, accept_index, accept_len, token, hidden_last = step(
            cache, token, hidden_last, temperature, top_k, top_p, generator
        )
        cache.seqlens.copy_(torch.where(done, before, cache.seqlens))  # finished sequences stop growing
        stats.steps += 1
        path_tokens = candidates.gather(1, accept_index.long().clamp(min=0))[:, 1:]  # (B, max_depth)
        packed = torch.cat([accept_len.long()[:, None], path_tokens, token.long()[:, None]], 1).tolist()  # one read
        for b in range(B):
            if output.done[b]:
                continue
            accepted = packed[b][0]
            emitted = packed[b][1 : 1 + accepted] + [packed[b][-1]]
            kept = output.add(b, emitted)
            stats.accept_lengths.append(kept)  # the tokens kept (EOS or the limit may cut the accepted path)
            stats.new_tokens += kept
            if host_seqlens is not None:
                host_seqlens[b] += 1 + accepted
            if output.done[b]:
                done[b] = True
    cache.host_seqlens = host_seqlens  # after the last in-place write to cache.seqlens


__all__ = ["SpeculativeStep", "speculative_loop"]
