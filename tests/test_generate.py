"""kestrel.decoding.generate: plain decoding against full re-forwards; greedy tree speculative decoding equal to plain
greedy token for token (every attention kind, static and dynamic trees, batch > 1 with mixed prompt lengths,
nothing accepted, acceptance to a leaf, EOS inside an accepted path); sampled speculative decoding following the
target distribution (chi-square)."""

import copy

import pytest
import torch
from helpers import assert_pairs_follow, chi_square, chi_square_critical, devices

from kestrel.decoding.generate import TreeSpec, generate
from kestrel.models import ATTENTION_KINDS, KestrelConfig, KestrelLM

V = 16
CHAIN = TreeSpec(choices=[[0], [0, 0], [0, 0, 0]])
STAR = TreeSpec(choices=[[i] for i in range(6)])
KARY = TreeSpec(choices=[[0], [1], [0, 0], [0, 1], [1, 0], [1, 1], [0, 0, 0], [0, 0, 1], [1, 0, 0]])
DYNAMIC = TreeSpec(max_nodes=12, topk=3)
TREES = {"chain": CHAIN, "star": STAR, "kary": KARY, "dynamic": DYNAMIC}


def counting_model(
    attention, noise=24.0, head_shift=0, seed=0, dtype=torch.float64, device="cpu", d_model=32, n_heads=4
):
    """A model that mostly continues x, x+1, x+2, ... (mod V): one-hot embeddings read one place further by the LM
    head, and draft head k mapping feature x to x + k + 1 (+ head_shift: wrong drafts). The layers' outputs are
    random with scale `noise`, so that the context sometimes changes the greedy token (drafts partly rejected)."""
    torch.manual_seed(seed)
    config = KestrelConfig(
        vocab_size=V,
        d_model=d_model,
        n_layers=2,
        n_heads=n_heads,
        n_kv_heads=n_heads // 2,
        attention=attention,
        max_seq_len=128,
        num_draft_heads=3,
        tie_embeddings=False,
    )
    model = KestrelLM(config)
    with torch.no_grad():
        eye = torch.eye(V, d_model)
        model.embed.weight.copy_(3 * eye + 0.1 * torch.randn(V, d_model))
        model.lm_head.weight.copy_(5 * eye.roll(1, 0))  # token y reads feature y - 1
        for block in model.layers:
            block.attn.o_proj.weight.normal_(0, noise / 8)
            block.mlp.down_proj.weight.normal_(0, noise / 8)
        features = torch.arange(V)
        for k, head in enumerate(model.draft_heads):
            weight = torch.zeros(d_model, d_model)
            weight[(features + k + 1 + head_shift) % V, features] = 10.0
            head.proj.weight.copy_(weight)
    return model.to(device=device, dtype=dtype).eval()


def prompts(lengths=(3, 7, 5), seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g) for n in lengths]


def greedy_by_reforward(model, prompt, new_tokens, eos=None):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    sequence = prompt.tolist()
    for _ in range(new_tokens):
        token = int(model(torch.tensor([sequence]))[0, -1].argmax())
        sequence.append(token)
        if token == eos:
            break
    return sequence


@pytest.mark.parametrize("attention", ["softmax", "lssa", "lssar"])
def test_plain_greedy_equals_reforward(attention):
    model = counting_model(attention)
    batch = prompts()
    out = generate(model, batch, 12, pad_token_id=-1)
    assert out.shape == (3, 7 + 12)
    for b, prompt in enumerate(batch):
        expected = greedy_by_reforward(model, prompt, 12)
        assert out[b, : len(expected)].tolist() == expected
        assert (out[b, len(expected) :] == -1).all()


def test_padded_tensor_with_prompt_lengths_equals_list():
    model = counting_model("softmax")
    batch = prompts()
    padded = torch.zeros(3, 7, dtype=torch.long)
    for b, prompt in enumerate(batch):
        padded[b, : len(prompt)] = prompt
    assert torch.equal(generate(model, padded, 9, prompt_lengths=[3, 7, 5]), generate(model, batch, 9))


@pytest.mark.parametrize("tree", list(TREES))
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_greedy_speculative_equals_greedy(attention, tree):
    """Batch 3 with prompt lengths 3, 7, 5; drafts partly right (mean accepted length strictly between 1 and the
    tree depth + 1)."""
    model = counting_model(attention)
    batch = prompts()
    plain = generate(model, batch, 20)
    out, stats = generate(model, batch, 20, speculative=TREES[tree], return_stats=True)
    assert torch.equal(out, plain)
    assert 1.0 < stats.mean_accepted_length < 4.0
    assert stats.new_tokens == 3 * 20


def test_nothing_accepted():
    """Draft heads one token off: no draft is ever accepted, every step emits exactly the target's token."""
    model = counting_model("softmax", noise=0.0, head_shift=1)
    batch = prompts()
    plain = generate(model, batch, 10)
    out, stats = generate(model, batch, 10, speculative=KARY, return_stats=True)
    assert torch.equal(out, plain)
    assert set(stats.accept_lengths) == {1}


def test_acceptance_ends_at_a_leaf():
    """Exact drafts: every step accepts the whole chain (3 nodes after the root) and adds the target's token."""
    model = counting_model("lssa", noise=0.0)
    batch = prompts()
    plain = generate(model, batch, 17)
    out, stats = generate(model, batch, 17, speculative=CHAIN, return_stats=True)
    assert torch.equal(out, plain)
    assert stats.accept_lengths == [4] * (3 * 4)  # 1 token from the prefill, then 4 steps of 4
    assert stats.steps == 4


@pytest.mark.parametrize("tree", ["chain", "kary"])
def test_eos_inside_an_accepted_path(tree):
    """EOS in the middle of an accepted path: the row stops after EOS and is padded, exactly as plain greedy."""
    model = counting_model("softmax", noise=0.0)
    batch = [torch.tensor([4, 5]), torch.tensor([0, 1, 2]), torch.tensor([9])]
    eos = 8  # sequence 0 reaches it as its 3rd new token (inside the first step's accepted path), sequence 2 never
    plain = generate(model, batch, 14, eos_token_id=eos, pad_token_id=-1)
    out, stats = generate(
        model, batch, 14, speculative=TREES[tree], eos_token_id=eos, pad_token_id=-1, return_stats=True
    )
    assert torch.equal(out, plain)
    width = 3 + 14
    assert out[0].tolist() == [4, 5, 6, 7, 8] + [-1] * (width - 5)
    assert out[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8] + [-1] * (width - 9)
    assert out[2].tolist() == [9] + [(9 + i) % V for i in range(1, 15)] + [-1] * 2  # no EOS: 14 new tokens
    assert max(stats.accept_lengths) == 4


@pytest.mark.parametrize(
    "options", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)], ids=["t1", "t0.7-topk5-topp0.9"]
)
def test_sampled_speculative_follows_the_target_distribution(options):
    """Many copies of one prompt, three new tokens sampled with a k-ary tree: the frequencies of (x1, x2) and of
    (x2, x3) (x2, x3 come out of tree verification) pass a chi-square test against the target model's exact
    distribution computed by enumeration."""
    model = counting_model("softmax", noise=24.0, dtype=torch.float32)
    prompt = torch.tensor([3, 9, 4])
    n = 12000
    generator = torch.Generator().manual_seed(11)
    out, stats = generate(
        model, prompt.expand(n, 3), 3, speculative=KARY, generator=generator, return_stats=True, **options
    )
    # the drafts are accepted often enough to matter: the 2 tokens after the prefill's come in one step (a draft
    # accepted: 2 kept) or in two (1 kept each)
    assert stats.accept_lengths.count(2) > 0.05 * n
    assert sum(stats.accept_lengths) == 2 * n  # kept tokens only: nothing past max_new_tokens is counted
    assert_pairs_follow(model, prompt, out[:, 3:], options)


def test_sampled_chi_square_detects_a_wrong_distribution():
    """The test above can fail: plain sampling at temperature 1 does not pass against the temperature-0.7 target."""
    from kestrel.ops.tree_verify import sampling_probs

    model = counting_model("softmax", noise=24.0, dtype=torch.float32)
    prompt = torch.tensor([3, 9, 4])
    n = 12000
    out = generate(model, prompt.expand(n, 3), 1, temperature=1.0, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        wrong = sampling_probs(model(prompt[None])[0, -1].double(), temperature=0.7).double()
        right = sampling_probs(model(prompt[None])[0, -1].double(), temperature=1.0).double()
    counts = torch.bincount(out[:, 3], minlength=V).double()
    stat, df = chi_square(counts, wrong, n)
    assert stat > chi_square_critical(df)
    stat, df = chi_square(counts, right, n)
    assert stat < chi_square_critical(df)


def test_generate_checks():
    model = counting_model("softmax")
    no_heads = KestrelLM(KestrelConfig(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=32))
    with pytest.raises(ValueError, match="speculative decoding needs draft heads"):
        generate(no_heads, prompts(), 4, speculative=CHAIN)
    with pytest.raises(ValueError, match="reach depth 4, the model has 3 draft heads"):
        generate(model, prompts(), 4, speculative=TreeSpec(choices=[[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="either choices"):
        TreeSpec()
    with pytest.raises(ValueError, match="max_nodes"):
        TreeSpec(max_nodes=1, topk=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        generate(model, prompts(), -1)
    with pytest.raises(ValueError, match="every prompt needs 1..7 tokens"):
        generate(model, torch.zeros(2, 7, dtype=torch.long), 3, prompt_lengths=[0, 7])
    assert torch.equal(generate(model, prompts(), 0)[:, :3], torch.stack([p[:3] for p in prompts()]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_greedy_speculative_equals_greedy_on_device(device, attention):
    """float32 on `device` (head dim 64: the softplus kernel's): speculative == plain greedy, up to near-ties. The
    one-token decode and the tree forward round differently in float32, so a row may flip where the two tokens'
    logits nearly tie; the row must then agree up to that position, and the float64 model (on the CPU) must see a
    gap of at most 1e-3 x max(1, |top logit|) between the two tokens there."""
    d_model = 256 if device.startswith("cuda") else 32  # the CPU case is a cheap smoke run of the same code
    model = counting_model(attention, dtype=torch.float32, device=device, d_model=d_model)
    reference = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    batch = [p.to(device) for p in prompts()]
    plain = generate(model, batch, 24).cpu()
    for spec in (KARY, DYNAMIC):
        out = generate(model, batch, 24, speculative=spec).cpu()
        for b in range(len(batch)):
            ours, theirs = out[b].tolist(), plain[b].tolist()
            if ours == theirs:
                continue
            position = next(i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y)
            assert position >= len(batch[b])
            with torch.no_grad():
                logits = reference(torch.tensor([theirs[:position]]))[0, -1]
            gap = abs(float(logits[ours[position]] - logits[theirs[position]]))
            assert gap <= 1e-3 * max(1.0, abs(float(logits.max()))), (spec, b, position, gap)


class _CountDeviceReads:
    """Counts tensor -> Python scalar reads (aten._local_scalar_dense: int(t), t.item(); on CUDA each one is a
    synchronisation) while active."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.reads += 1
                return func(*args, **(kwargs or {}))

        self.reads, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.mark.parametrize("tree", [None, "kary", "dynamic"])
def test_no_scalar_reads_and_host_mirror_of_the_cache_lengths(tree, monkeypatch):
    """Greedy decoding reads no scalar from a tensor (the cache's host mirror sizes every forward); afterwards the
    mirror equals the device lengths (EOS stops one sequence early: finished rows stop growing)."""
    from kestrel.decoding.cache import KVCache

    caches = []
    for_model = KVCache.for_model.__func__
    monkeypatch.setattr(
        KVCache, "for_model", classmethod(lambda cls, *a, **k: caches.append(for_model(cls, *a, **k)) or caches[-1])
    )
    model = counting_model("softmax")
    with _CountDeviceReads() as counter:
        out = generate(model, prompts(), 12, speculative=TREES.get(tree), eos_token_id=8)
    assert counter.reads == 0
    assert (out == 8).any()  # some row finished at EOS
    (cache,) = caches
    assert cache.host_seqlens == cache.seqlens.tolist()


def test_forward_with_an_unknown_host_mirror_reads_the_device_lengths():
    from kestrel.decoding.cache import KVCache

    model = counting_model("softmax")
    ids = torch.randint(0, V, (2, 5))
    known, unknown = KVCache.for_model(model, 2, 16), KVCache.for_model(model, 2, 16)
    model(ids, known, lengths=[5, 3])
    model(ids, unknown, lengths=torch.tensor([5, 3]))  # device lengths: the mirror becomes unknown
    assert known.host_seqlens == [5, 3] and unknown.host_seqlens is None
    with _CountDeviceReads() as counter:
        step_known = model(ids[:, :1], known)
    assert counter.reads == 0 and known.host_seqlens == [6, 4]
    with _CountDeviceReads() as counter:
        step_unknown = model(ids[:, :1], unknown)
    assert counter.reads == 1 and unknown.host_seqlens is None
    assert torch.equal(step_known, step_unknown)
    unknown.reset()
    assert unknown.host_seqlens == [0, 0]
    known.seqlens.copy_(torch.tensor([5, 3]))  # written behind the mirror's back: the mirror is not trusted
    assert known.host_seqlens is None
    with _CountDeviceReads() as counter:
        assert torch.equal(model(ids[:, :1], known), step_known)
    assert counter.reads == 1
    known.host_seqlens = [6, 4]
    assert known.host_seqlens == [6, 4] and known.longest() == 6
    with pytest.raises(ValueError, match="host_seqlens must have 2 entries, got 3"):
        known.host_seqlens = [1, 2, 3]
    with torch.inference_mode():  # no version counter: the mirror is never trusted
        inference_cache = KVCache.for_model(model, 2, 16)
        assert inference_cache.host_seqlens is None and inference_cache.longest() == 0


def test_generate_runs_in_eval_mode_and_restores_the_mode():
    """A model in training mode: generate records no codebook usage (rejected tree nodes, padding rows) and leaves
    the model in training mode; an eval model stays in eval mode."""
    torch.manual_seed(0)
    config = KestrelConfig(
        vocab_size=V,
        d_model=32,
        n_layers=1,
        n_heads=4,
        num_draft_heads=2,
        codebook_mlp=True,
        num_codes=16,
        codebook_k=2,
        max_seq_len=64,
    )
    model = KestrelLM(config).double().train()
    codebook = model.layers[0].mlp.codebook
    generate(model, prompts(), 6, speculative=TreeSpec(choices=[[0], [1], [0, 0]]))
    assert model.training and all(m.training for m in model.modules())
    assert int(codebook.code_counts.sum()) == 0
    model(torch.randint(0, V, (1, 4)))  # the counts do record in training mode
    assert int(codebook.code_counts.sum()) > 0
    model.eval()
    generate(model, prompts(), 3)
    assert not model.training


def test_padding_ids_are_never_embedded():
    """Padding may hold an invalid id (-1): the prompt_lengths mask keeps it out of the embedding."""
    model = counting_model("softmax")
    padded = torch.tensor([[1, 2, 3], [4, -1, -1]])
    out = generate(model, padded, 3, prompt_lengths=[3, 1], pad_token_id=-1)
    assert torch.equal(out, generate(model, [torch.tensor([1, 2, 3]), torch.tensor([4])], 3, pad_token_id=-1))
    for tree in (KARY, DYNAMIC):
        assert torch.equal(generate(model, padded, 3, prompt_lengths=[3, 1], pad_token_id=-1, speculative=tree), out)


def test_accept_lengths_count_the_kept_tokens():
    """Exact drafts and a chain of 3: the last step accepts 4 tokens but max_new_tokens keeps 2."""
    model = counting_model("lssa", noise=0.0)
    out, stats = generate(model, prompts(), 15, speculative=CHAIN, return_stats=True)
    assert stats.accept_lengths == [4] * 3 * 3 + [2] * 3
    assert sum(stats.accept_lengths) + 3 == stats.new_tokens == 3 * 15  # + the prefill's token per sequence


def test_generate_checks_limits_up_front():
    model = counting_model("softmax")  # 3 draft heads, V = 16, max_seq_len 128
    # dynamic tree: at most 1 + topk + (K - 1) topk^2 nodes
    with pytest.raises(
        ValueError,
        match=r"speculative.max_nodes must be at most 1 \+ topk \+ \(K - 1\) \* topk\^2 "
        r"= 11 \(topk=2, K=3 draft heads in the tree\), got 12",
    ):
        generate(model, prompts(), 4, speculative=TreeSpec(max_nodes=12, topk=2))
    with pytest.raises(ValueError, match=r"= 3 \(topk=2, K=1 draft heads in the tree\), got 4"):
        generate(model, prompts(), 4, speculative=TreeSpec(max_nodes=4, topk=2, depth=1))
    generate(model, prompts(), 2, speculative=TreeSpec(max_nodes=11, topk=2))  # the bound itself is fine
    with pytest.raises(ValueError, match="speculative.topk must be at most the vocabulary size 16, got 17"):
        generate(model, prompts(), 4, speculative=TreeSpec(max_nodes=5, topk=17))
    # config.max_seq_len: the longest prompt (7) + max_new_tokens
    with pytest.raises(
        ValueError,
        match=r"the longest prompt \(7 tokens\) \+ max_new_tokens \(122\) must be at most "
        r"config.max_seq_len=128, got 129",
    ):
        generate(model, prompts(), 122)
    assert generate(model, prompts(), 121).shape == (3, 128)


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            dict(speculative=TreeSpec(choices=[[0], [16]])),
            ValueError,
            r"speculative.choices use rank 16 of a draft head, whose top-k ranks are 0..vocab_size - 1 = 15",
        ),
        (
            dict(speculative=TreeSpec(choices=[[0], [0, 30]])),
            ValueError,
            "speculative.choices use rank 30 of a draft head",
        ),
        (
            dict(speculative=TreeSpec(max_nodes=4, topk=2, depth=5)),
            ValueError,
            r"speculative.depth=5 is deeper than the model's 3 draft heads",
        ),
        (
            dict(input_ids=[torch.tensor([1, 2, 99])]),
            ValueError,
            r"input_ids must hold token ids in \[0, vocab_size=16\), got 99",
        ),
        (
            dict(input_ids=torch.tensor([[1, -2, 3]])),
            ValueError,
            r"input_ids must hold token ids in \[0, vocab_size=16\), got -2",
        ),
        (dict(top_k=True, temperature=1.0), TypeError, "top_k must be None or an int >= 1, got bool True"),
        (dict(top_k=2.0, temperature=1.0), TypeError, "top_k must be None or an int >= 1, got float 2.0"),
        (dict(top_k=0, temperature=1.0), ValueError, "top_k must be None or an int >= 1, got 0"),
        (
            dict(input_ids=torch.zeros(2, 7, dtype=torch.long), prompt_lengths=[2.7, 7]),
            TypeError,
            "prompt_lengths must hold integers, got torch.float32",
        ),
        (dict(input_ids=[[1.5, 2.0]]), TypeError, r"input_ids\[0\] must hold integers, got torch.float32"),
        (
            dict(input_ids=torch.zeros(2, 0, dtype=torch.long)),
            ValueError,
            r"input_ids has no positions \(shape \(2, 0\)\): every prompt needs at least one token",
        ),
        (dict(max_new_tokens=True), TypeError, "max_new_tokens must be an int >= 0, got bool True"),
        (dict(max_new_tokens=2.0), TypeError, "max_new_tokens must be an int >= 0, got float"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens must be an int >= 0, got -1"),
        (dict(temperature=-1.0), ValueError, "temperature must be >= 0, got -1.0"),
        (dict(temperature=float("nan")), ValueError, "temperature must be >= 0, got nan"),
        (dict(temperature="1"), TypeError, "temperature must be a number, got str"),
        (dict(temperature=1.0, top_p=0.0), ValueError, r"top_p must be None or in \(0, 1\], got 0.0"),
        (dict(temperature=1.0, top_p=1.5), ValueError, r"top_p must be None or in \(0, 1\], got 1.5"),
        (dict(temperature=1.0, top_p=True), TypeError, "top_p must be None or a number"),
        (dict(eos_token_id=16), ValueError, r"eos_token_id must be a token id in \[0, vocab_size=16\) .* got 16"),
        (dict(eos_token_id=-1), ValueError, "eos_token_id must be a token id"),
        (dict(eos_token_id=True), TypeError, "eos_token_id must be None or an int, got bool True"),
        (dict(pad_token_id=0.5), TypeError, "pad_token_id must be None or an int, got float"),
        (dict(temperature=1.0, generator=5), TypeError, "generator must be None or a torch.Generator, got int"),
    ],
)
def test_bad_arguments_are_refused_before_the_prefill(call, error, message):
    """Each of these used to fail after the prefill with a torch message (index out of range in self, selected
    index k out of range, topk() of a bool), or was accepted (a fractional prompt length truncated, a dynamic tree
    deeper than the heads, an EOS id that is never generated): now a clear error naming the argument, and the
    model never runs."""
    model = counting_model("softmax")
    calls = count_forwards(model)
    args = dict(input_ids=prompts(), max_new_tokens=4)
    args.update(call)
    with pytest.raises(error, match="generate: " + message):
        generate(model, args.pop("input_ids"), args.pop("max_new_tokens"), **args)
    assert not calls


@pytest.mark.parametrize(
    "spec, error, message",
    [
        (dict(max_nodes=4, topk=True), TypeError, "TreeSpec: topk must be an int, got bool True"),
        (dict(max_nodes=True, topk=2), TypeError, "TreeSpec: max_nodes must be an int, got bool True"),
        (dict(max_nodes=4, topk=2, depth=2.0), TypeError, "TreeSpec: depth must be an int, got float 2.0"),
        (dict(max_nodes=4, topk=2, depth=0), ValueError, "TreeSpec: depth must be None or a positive int, got 0"),
        (dict(choices=[[0], [0, 0, 0]]), ValueError, r"static_tree: choice \(0, 0, 0\) has no parent \(0, 0\)"),
        (dict(choices=[[0], [-1]]), ValueError, "static_tree: each choice must be a non-empty tuple of ranks >= 0"),
        (dict(choices=[[0], [True]]), ValueError, "static_tree: each choice must be a non-empty tuple of ranks >= 0"),
        (dict(choices="01"), ValueError, "TreeSpec: choices must be a non-empty list of non-empty rank paths"),
    ],
)
def test_tree_spec_checks_when_built(spec, error, message):
    """A bad static tree was refused only when the first speculative step built it, after the prefill; bools were
    accepted as sizes."""
    with pytest.raises(error, match=message):
        TreeSpec(**spec)


def test_empty_batch_gives_an_empty_result():
    model = counting_model("softmax")
    calls = count_forwards(model)
    out, stats = generate(model, torch.zeros(0, 5, dtype=torch.long), 3, return_stats=True)
    assert out.shape == (0, 8) and out.dtype == torch.int64 and stats.new_tokens == 0
    assert generate(model, torch.zeros(0, 5, dtype=torch.long), 3, speculative=CHAIN).shape == (0, 8)
    assert not calls


def test_padding_may_hold_any_id_and_zero_new_tokens_returns_the_prompts():
    model = counting_model("softmax")
    padded = torch.full((2, 5), -1, dtype=torch.long)
    padded[0, :3], padded[1] = torch.tensor([1, 2, 3]), torch.arange(5)
    out = generate(model, padded, 2, prompt_lengths=[3, 5], pad_token_id=-1)
    assert out.shape == (2, 7) and out[0, :3].tolist() == [1, 2, 3]
    assert torch.equal(generate(model, padded, 0, prompt_lengths=[3, 5], pad_token_id=-1), padded)


@pytest.mark.parametrize("speculative", [None, KARY])
@pytest.mark.parametrize("temperature", [1e-45, 5e-324])
def test_tiny_temperature_samples_the_greedy_tokens(speculative, temperature):
    """logits / temperature overflowed to inf and softmax gave NaN (torch.multinomial refused it): the shifted
    logits make a tiny temperature the greedy distribution."""
    model = counting_model("softmax")
    greedy = generate(model, prompts(), 10, speculative=speculative)
    sampled = generate(
        model,
        prompts(),
        10,
        temperature=temperature,
        speculative=speculative,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(sampled, greedy)
