"""generate(): plain and tree-speculative decoding of a KestrelLM with a preallocated KV cache
(docs/models_and_decoding.md).

The cache holds every token of a sequence but the last emitted one (the pending token, as in Medusa): a plain step
feeds the pending token and picks the next; a speculative step makes the pending token the root of a draft tree,
runs one tree forward, verifies, compacts the cache (the root and the accepted nodes' rows) and emits the accepted
tokens followed by the target's next token. The draft heads read the hidden state of the last cached position,
the one that produced the pending token.

Host reads per step: one. A plain step reads the chosen tokens (B,); a speculative step reads one packed tensor
(accepted lengths, accepted tokens, next token). Both are needed on the host anyway (EOS, the token limit, the
output), and from them generate keeps a host mirror of the cache lengths (KVCache.host_seqlens), so the forward
never reads the lengths back from the device. (Sampling, temperature > 0, draws with torch.multinomial / torch.rand
on the device; what the verify and compaction ops do inside is theirs.)

Greedy speculative output equals plain greedy output token for token in exact arithmetic, and the tests check it in
float64. In float32 / bfloat16 the two paths compute the same logits with different shapes (one token vs a tree of
T nodes: other matmul sizes and attention kernels or formulations), so where the top two logits are nearly tied
the argmax can flip and the texts diverge from there on; on a GPU that is more likely than on the CPU.
"""

import time
from dataclasses import dataclass, field

import torch

from .._checks import is_int
from ..ops.tree_verify import check_sampling_options, sampling_probs
from .cache import KVCache
from .speculative import speculative_loop
from .tree import static_tree


@dataclass
class TreeSpec:
    """How a speculative step drafts its tree.

    Static (Medusa-style, kestrel.decoding.static_tree): `choices`, a list of paths of per-head top-k ranks, e.g.
    [[0], [1], [0, 0], [0, 1]]: the node [r1, .., rd] holds rank rd of head d - 1 below the node [r1, .., r(d-1)];
    the root (the pending token) is implicit. Dynamic (EAGLE-2 style, kestrel.decoding.dynamic_tree): `max_nodes`
    tree nodes including the root; each depth expands its `topk` best nodes with the `topk` best tokens of the next
    head, and the tree keeps the nodes with the best cumulative draft log-probability, at most `depth` levels
    (default: every draft head).
    """

    choices: list | None = None
    max_nodes: int | None = None
    topk: int | None = None
    depth: int | None = None

    def __post_init__(self):
        static, dynamic = self.choices is not None, self.max_nodes is not None or self.topk is not None
        if static == dynamic:
            raise ValueError(
                "TreeSpec: give either choices=... (a static tree) or max_nodes=... and topk=... (a "
                f"dynamic tree), got choices={self.choices!r}, max_nodes={self.max_nodes!r}, "
                f"topk={self.topk!r}"
            )
        if static:
            if (
                not isinstance(self.choices, (list, tuple))
                or not self.choices
                or not all(isinstance(c, (list, tuple)) and len(c) > 0 for c in self.choices)
            ):
                raise ValueError(
                    f"TreeSpec: choices must be a non-empty list of non-empty rank paths, got {self.choices!r}"
                )

            static_tree(self.choices)  # ranks, duplicates, missing parents: refused here, not after a prefill
        else:
            sizes = [("max_nodes", self.max_nodes), ("topk", self.topk)] + (
                [] if self.depth is None else [("depth", self.depth)]
            )
            for label, value in sizes:
                if not is_int(value):
                    raise TypeError(f"TreeSpec: {label} must be an int, got {type(value).__name__} {value!r}")
            if not self.max_nodes > 1:
                raise ValueError(
                    f"TreeSpec: max_nodes (the tree's nodes, root included) must be an int > 1, got {self.max_nodes!r}"
                )
            if not self.topk > 0:
                raise ValueError(f"TreeSpec: topk must be a positive int, got {self.topk!r}")
            if self.depth is not None and not self.depth > 0:
                raise ValueError(f"TreeSpec: depth must be None or a positive int, got {self.depth!r}")

    @property
    def dynamic(self):
        return self.choices is None

    def tree_depth(self, num_heads):
        if self.dynamic:
            return min(self.depth or num_heads, num_heads)
        return max(len(c) for c in self.choices)

    def num_nodes(self):
        """T, the nodes of one tree including the root."""
        return self.max_nodes if self.dynamic else 1 + len(self.choices)


@dataclass
class GenerationStats:
    """What a generate() call did: forwards after the prefill, and per speculative step the accepted lengths."""

    steps: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    # per step and live sequence: the tokens emitted and kept (accepted nodes + 1, cut at EOS or max_new_tokens)
    accept_lengths: list = field(default_factory=list)

    @property
    def mean_accepted_length(self):
        """Tokens emitted per live sequence and step (1 for plain decoding)."""
        return sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 1.0

    @property
    def tokens_per_s(self):
        return self.new_tokens / self.seconds if self.seconds > 0 else float("nan")


def _prompts(input_ids, prompt_lengths, device):
    """(padded (B, Lmax) int64 on device, lengths (B,) int64 on device, host lengths list)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                "generate: input_ids must be an int64 tensor (B, L) or a list of 1-D token sequences, "
                f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}"
            )
        B, L = input_ids.shape
        if prompt_lengths is None:
            host = [L] * B
        else:
            given = _integers("prompt_lengths", prompt_lengths)
            if given.dim() != 1 or given.shape[0] != B:
                raise ValueError(f"generate: prompt_lengths must have B={B} entries, got shape {tuple(given.shape)}")
            host = given.tolist()
        padded = input_ids.to(device=device, dtype=torch.int64)
    else:
        if prompt_lengths is not None:
            raise ValueError("generate: prompt_lengths goes with a padded tensor, not with a list of sequences")
        rows = [_integers(f"input_ids[{b}]", row).reshape(-1) for b, row in enumerate(input_ids)]
        if not rows:
            raise ValueError("generate: input_ids is an empty list")
        host = [len(row) for row in rows]
        padded = torch.zeros((len(rows), max(host)), dtype=torch.int64)
        for b, row in enumerate(rows):
            padded[b, : len(row)] = row
        padded = padded.to(device)
    if padded.shape[1] == 0 and host:
        raise ValueError(
            f"generate: input_ids has no positions (shape {tuple(padded.shape)}): every prompt needs at least one token"
        )
    if host and (min(host) < 1 or max(host) > padded.shape[1]):
        raise ValueError(f"generate: every prompt needs 1..{padded.shape[1]} tokens, got lengths {host}")
    return padded, torch.tensor(host, dtype=torch.int64, device=device), host


def _integers(label, values):
    """values (a sequence of ints or an integer tensor) as an int64 CPU tensor; floats and bools are refused rather
    than truncated."""
    t = torch.as_tensor(values)
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise TypeError(f"generate: {label} must hold integers, got {t.dtype} values")
    return t.to(device="cpu", dtype=torch.int64)


def _check_token_ids(prompt, lengths, vocab_size):
    """Every real prompt token (padding excluded) in [0, vocab_size): one host read, once per generate call."""
    real = torch.arange(prompt.shape[1], device=prompt.device)[None, :] < lengths[:, None]
    ids = torch.where(real, prompt, torch.zeros((), dtype=prompt.dtype, device=prompt.device))  # 0: a valid id
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"generate: input_ids must hold token ids in [0, vocab_size={vocab_size}), got {lo if lo < 0 else hi}"
        )


def target_probs(logits, temperature, top_k=None, top_p=None):
    """The sampling distribution (float32) of logits (..., V) under temperature, top-k and top-p: the one that
    plain sampling draws from and that speculative verification preserves."""

    return sampling_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _choose(logits, temperature, top_k, top_p, generator):
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = target_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _Output:
    """The emitted tokens per sequence on the host, with EOS and the max_new_tokens limit applied."""

    def __init__(self, B, max_new_tokens, eos_token_id):
        self.tokens = [[] for _ in range(B)]
        self.done = [max_new_tokens == 0] * B
        self.max_new_tokens, self.eos_token_id = max_new_tokens, eos_token_id

    def add(self, b, new_tokens):
        """Append `new_tokens` (a list) to sequence b up to EOS or the limit; the count kept."""
        if self.done[b]:
            return 0
        kept = 0
        for token in new_tokens:
            self.tokens[b].append(token)
            kept += 1
            if token == self.eos_token_id or len(self.tokens[b]) == self.max_new_tokens:
                self.done[b] = True
                break
        return kept

    @property
    def finished(self):
        return all(self.done)


@torch.no_grad()
def generate(
    model,
    input_ids,
    max_new_tokens,
    *,
    temperature=0.0,
    top_k=None,
    top_p=None,
    speculative=None,
    eos_token_id=None,
    prompt_lengths=None,
    pad_token_id=None,
    generator=None,
    return_stats=False,
):
    """Decode `max_new_tokens` tokens after each prompt.

    input_ids: (B, L) int64, or a list of 1-D token sequences of mixed lengths (or a padded tensor with
    `prompt_lengths`). temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature)
    restricted by top_k / top_p. speculative: None (one token per forward) or a TreeSpec (needs a model with draft
    heads): greedy output is token-for-token the plain greedy output, sampled output follows the target
    distribution (greedy identity is exact in float64; in float32 / bfloat16 a near-tie can flip a token, see the
    module docstring). Returns (B, max_prompt_len + max_new_tokens) int64: each row its prompt then its new tokens;
    after EOS (kept) and after a shorter prompt the row holds pad_token_id (default eos_token_id, else 0). The
    padding of a padded input_ids may hold any value (e.g. -1): it is never embedded. With return_stats=True,
    returns (tokens, GenerationStats).

    max_prompt_len + max_new_tokens must not exceed model.config.max_seq_len (checked up front). The cache is sized
    to that plus, for speculative decoding, scratch rows for the draft tree of the last step (rejected nodes only;
    no kept token lies beyond max_seq_len).

    Checked before the prefill (one host read of the prompt, once): prompt ids in [0, vocab_size) (padding
    excluded), eos_token_id in [0, vocab_size) (pad_token_id is a fill value and may be any int, e.g. -1), ints
    that are not bools, temperature >= 0 (tiny values approach greedy, inf is uniform), top_p in (0, 1], a
    TreeSpec within the model (static ranks < vocab_size and depth <= the draft heads; dynamic depth <= the draft
    heads), a generator on the model's device when sampling. A (0, L) input_ids gives an empty
    (0, L + max_new_tokens) result.

    The model runs in eval mode (no codebook usage counts or other training-time updates from decoding: rejected
    tree nodes and padding rows would pollute them) and is put back in its previous mode afterwards.
    """

    if not is_int(max_new_tokens):
        raise TypeError(
            f"generate: max_new_tokens must be an int >= 0, got {type(max_new_tokens).__name__} {max_new_tokens!r}"
        )
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling_options("generate", temperature, top_k, top_p)
    config = model.config
    device = model.device
    for label, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and not is_int(value):
            raise TypeError(f"generate: {label} must be None or an int, got {type(value).__name__} {value!r}")
    if eos_token_id is not None and not 0 <= eos_token_id < config.vocab_size:
        raise ValueError(
            f"generate: eos_token_id must be a token id in [0, vocab_size={config.vocab_size}) (one "
            f"outside is never generated), got {eos_token_id}"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generate: generator must be None or a torch.Generator, got {type(generator).__name__}")
        if temperature > 0 and generator.device.type != device.type:
            raise ValueError(
                f"generate: generator is on {generator.device}, the model on {device} (sampling draws "
                "on the model's device)"
            )
    if speculative is not None:
        if not isinstance(speculative, TreeSpec):
            raise ValueError(f"generate: speculative must be None or a TreeSpec, got {type(speculative).__name__}")
        if config.num_draft_heads == 0:
            raise ValueError("generate: speculative decoding needs draft heads (config.num_draft_heads > 0)")
        if not speculative.dynamic:
            _check_static(speculative, config)
        else:
            _check_dynamic(speculative, config)
    prompt, lengths, host_lengths = _prompts(input_ids, prompt_lengths, device)
    B, L = prompt.shape
    if B == 0:  # no sequences: the documented (B, L + max_new_tokens) shape, empty
        empty = torch.empty((0, L + max_new_tokens), dtype=torch.int64, device=device)
        return (empty, GenerationStats()) if return_stats else empty
    _check_token_ids(prompt, lengths, config.vocab_size)
    if max(host_lengths) + max_new_tokens > model.config.max_seq_len:
        raise ValueError(
            f"generate: the longest prompt ({max(host_lengths)} tokens) + max_new_tokens "
            f"({max_new_tokens}) must be at most config.max_seq_len={model.config.max_seq_len}, got "
            f"{max(host_lengths) + max_new_tokens}"
        )
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model,
            prompt,
            lengths,
            host_lengths,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            speculative,
            eos_token_id,
            pad_token_id,
            generator,
            return_stats,
        )
    finally:
        model.train(was_training)


def _check_static(spec, config):
    """A static TreeSpec against the model: its depth within the draft heads, its ranks within the vocabulary (a
    head's top-k has at most vocab_size tokens), before anything runs."""

    if spec.tree_depth(config.num_draft_heads) > config.num_draft_heads:
        raise ValueError(
            f"generate: the tree choices reach depth {spec.tree_depth(config.num_draft_heads)}, the "
            f"model has {config.num_draft_heads} draft heads"
        )
    max_rank = static_tree(spec.choices).max_rank
    if max_rank >= config.vocab_size:
        raise ValueError(
            f"generate: speculative.choices use rank {max_rank} of a draft head, whose top-k ranks are "
            f"0..vocab_size - 1 = {config.vocab_size - 1}"
        )


def _check_dynamic(spec, config):
    """A dynamic TreeSpec's limits (those of kestrel.decoding.dynamic_tree), before anything runs."""
    if spec.depth is not None and spec.depth > config.num_draft_heads:
        raise ValueError(
            f"generate: speculative.depth={spec.depth} is deeper than the model's "
            f"{config.num_draft_heads} draft heads (one tree level per head)"
        )
    K = spec.tree_depth(config.num_draft_heads)
    if spec.topk > config.vocab_size:
        raise ValueError(
            f"generate: speculative.topk must be at most the vocabulary size {config.vocab_size}, got {spec.topk}"
        )
    limit = 1 + spec.topk + (K - 1) * spec.topk**2
    if spec.max_nodes > limit:
        raise ValueError(
            f"generate: speculative.max_nodes must be at most 1 + topk + (K - 1) * topk^2 = {limit} "
            f"(topk={spec.topk}, K={K} draft heads in the tree), got {spec.max_nodes}"
        )


def _generate(
    model,
    prompt,
    lengths,
    host_lengths,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    speculative,
    eos_token_id,
    pad_token_id,
    generator,
    return_stats,
):
    device = prompt.device
    B, L = prompt.shape
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    spare = (
        0 if speculative is None else speculative.num_nodes() + speculative.tree_depth(model.config.num_draft_heads) + 1
    )
    cache = KVCache.for_model(model, B, max_len=L + max_new_tokens + spare)
    stats = GenerationStats()
    output = _Output(B, max_new_tokens, eos_token_id)
    if max_new_tokens > 0:
        started = time.perf_counter()
        logits, hidden = model(prompt, cache, lengths=host_lengths, return_hidden=True)  # a list: mirror known
        rows = torch.arange(B, device=device)
        last = lengths - 1
        token = _choose(logits[rows, last], temperature, top_k, top_p, generator)
        for b, value in enumerate(token.tolist()):
            stats.new_tokens += output.add(b, [value])
        if speculative is None:
            _plain_loop(model, cache, token, output, stats, temperature, top_k, top_p, generator)
        else:
            speculative_loop(
                model,
                cache,
                token,
                hidden[rows, last],
                output,
                stats,
                speculative,
                temperature,
                top_k,
                top_p,
                generator,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.seconds = time.perf_counter() - started
    result = torch.full((B, L + max_new_tokens), pad, dtype=torch.int64)
    for b in range(B):
        result[b, : host_lengths[b]] = prompt[b, : host_lengths[b]].cpu()
        new = output.tokens[b]
        result[b, host_lengths[b] : host_lengths[b] + len(new)] = torch.tensor(new, dtype=torch.int64)
    result = result.to(device)
    return (result, stats) if return_stats else result


def _plain_loop(model, cache, token, output, stats, temperature, top_k, top_p, generator):
    while not output.finished:
        logits = model(token[:, None], cache)[:, -1]
        token = _choose(logits, temperature, top_k, top_p, generator)
        stats.steps += 1
        for b, value in enumerate(token.tolist()):
            if not output.done[b]:
                stats.accept_lengths.append(1)
            stats.new_tokens += output.add(b, [value])


__all__ = ["GenerationStats", "TreeSpec", "generate", "target_probs"]
