"""KestrelLM: shapes, every attention kind, cached decoding (and the PLGA G-cache) against a full re-forward, the
tree forward against causal attention over prefix + path, save/load, training steps, GPU parity."""

import pytest
import torch
from helpers import devices

from kestrel.decoding import build_tree
from kestrel.decoding.cache import KVCache
from kestrel.models import ATTENTION_KINDS, KestrelConfig, KestrelLM
from kestrel.reference.tree import ancestor_bits, ancestor_lists


def tiny(attention="softmax", **overrides):
    values = dict(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, attention=attention, max_seq_len=64)
    values.update(overrides)
    return KestrelConfig(**values)


def make_model(attention, dtype=torch.float64, seed=0, device="cpu", **overrides):
    torch.manual_seed(seed)
    model = KestrelLM(tiny(attention, **overrides)).to(device=device, dtype=dtype).eval()
    # random norms and draft heads, so that nothing is trivially symmetric
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "draft_heads" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def copy_g_cache(source, batch_rows, model, max_len):
    """A fresh cache that reuses `source`'s G-cache (rows batch_rows): the re-forward a G-cache decode must equal."""
    cache = KVCache.for_model(model, len(batch_rows), max_len)
    if source.G is not None:
        cache.G.copy_(source.G[:, batch_rows])
        cache.g_built = True
    return cache


def test_config_checks():
    with pytest.raises(ValueError, match="attention must be one of"):
        tiny("flash")
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="d_model"):
        tiny(d_model=30)
    config = tiny("lssar", num_draft_heads=2)
    assert KestrelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown keys"):
        KestrelConfig.from_dict({**config.to_dict(), "bogus": 1})


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(vocab_size=True), TypeError, "vocab_size must be an int, got bool True"),
        (dict(n_kv_heads=0), ValueError, "n_kv_heads must be a positive int, got 0"),
        (dict(n_kv_heads=2.0), TypeError, "n_kv_heads must be an int, got float 2.0"),
        (dict(num_draft_heads=1.5), TypeError, "num_draft_heads must be an int, got float 1.5"),
        (dict(num_draft_heads=-1), ValueError, "num_draft_heads must be an int >= 0, got -1"),
        (dict(d_ff=0), ValueError, "d_ff must be a positive int, got 0"),
        (dict(d_ff=-3), ValueError, "d_ff must be a positive int, got -3"),
        (dict(rope_base=0.0), ValueError, "rope_base must be a finite number > 0, got 0.0"),
        (dict(rope_base=float("nan")), ValueError, "rope_base must be a finite number > 0, got nan"),
        (dict(norm_eps=-1.0), ValueError, "norm_eps must be a finite number > 0, got -1.0"),
        (dict(attention="lssar", lssar_p=float("inf")), ValueError, "lssar_p must be a finite number > 0, got inf"),
        (dict(lssar_p=1e300), ValueError, "lssar_p must be at most 3.403e\\+38, got 1e\\+300"),
        (dict(softplus_eps=0.0), ValueError, "softplus_eps must be a finite number > 0, got 0.0"),
        (dict(plga_a_dff=0), ValueError, "plga_a_dff must be a positive int, got 0"),
        (dict(plga_num_reslayer=-1), ValueError, "plga_num_reslayer must be an int >= 0, got -1"),
        (dict(num_codes=0), ValueError, "num_codes must be a positive int, got 0"),
        (dict(codebook_k=300), ValueError, r"codebook_k must be in \[1, num_codes=256\], got 300"),
        (dict(codebook_attn="yes"), TypeError, "codebook_attn must be a bool, got str 'yes'"),
        (dict(max_seq_len=True), TypeError, "max_seq_len must be an int, got bool True"),
    ],
)
def test_config_value_checks(overrides, error, message):
    """Each of these built a config whose model failed later with a torch message (negative or bool sizes) or
    computed NaN (norm_eps <= 0, an infinite lssar_p), or silently meant something else (n_kv_heads=True)."""
    with pytest.raises(error, match="KestrelConfig: " + message):
        tiny(**overrides)


def test_token_ids_outside_the_vocabulary():
    """An id outside [0, vocab_size) gave "index out of range in self"; padding rows may still hold any id."""
    model = make_model("softmax")
    for bad in (40, -3):
        with pytest.raises(
            ValueError,
            match=rf"KestrelLM: input_ids must hold token ids in \[0, vocab_size=40\), "
            rf"got {bad}",
        ):
            model(torch.tensor([[1, bad, 2]]))
    cache = KVCache.for_model(model, 2, 8)
    model(torch.tensor([[1, 2, -1], [3, 4, 5]]), cache, lengths=[2, 3])
    assert cache.seqlens.tolist() == [2, 3]


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_forward_shapes_and_causality(attention):
    model = make_model(attention, dtype=torch.float32)
    ids = torch.randint(0, 40, (3, 12))
    logits = model(ids)
    assert logits.shape == (3, 12, 40) and torch.isfinite(logits).all()
    if attention == "plga":
        return  # PLGA's metric is built from the whole block's queries: by design not causal in training
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 40
    assert torch.allclose(model(changed)[:, :8], logits[:, :8], atol=1e-5)


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_cached_decode_equals_full_forward(attention):
    """Prefill with mixed prompt lengths, then token-by-token decode: every logit row equals the same row of one
    forward over the whole sequence (PLGA: the re-forward reuses the prompt's G, which the G-cache keeps)."""
    model = make_model(attention)
    B, total = 3, 14
    lengths = torch.tensor([5, 9, 2])
    ids = torch.randint(0, 40, (B, total))
    cache = KVCache.for_model(model, B, 32)
    prefill = model(ids[:, :9], cache, lengths=lengths)
    assert cache.seqlens.tolist() == [5, 9, 2]
    decoded = {b: [prefill[b, : lengths[b]]] for b in range(B)}
    # one token per sequence and step, each sequence continuing after its own prompt
    for step in range(total - 9):
        next_ids = torch.stack([ids[b, lengths[b] + step] for b in range(B)])[:, None]
        out = model(next_ids, cache)
        for b in range(B):
            decoded[b].append(out[b])
    assert cache.seqlens.tolist() == [5 + 5, 9 + 5, 2 + 5]
    for b in range(B):
        n = int(lengths[b]) + total - 9
        reference = model(ids[b : b + 1, :n], copy_g_cache(cache, [b], model, 32))[0]
        torch.testing.assert_close(torch.cat(decoded[b]), reference, rtol=0, atol=1e-12)
    if attention != "plga":  # the cache-free forward is the same function
        torch.testing.assert_close(model(ids[1:2, :14]), torch.cat(decoded[1])[None], rtol=0, atol=1e-12)


def test_plga_g_cache_built_once_from_prompt():
    model = make_model("plga")
    ids = torch.randint(0, 40, (2, 8))
    cache = KVCache.for_model(model, 2, 16)
    model(ids[:, :6], cache, lengths=torch.tensor([6, 3]))
    G = cache.G.clone()
    assert cache.g_built and G.abs().sum() > 0
    # the second sequence's G comes from its own 3 prompt tokens, not from the padding after them
    single = KVCache.for_model(model, 1, 16)
    model(ids[1:2, :3], single)
    torch.testing.assert_close(single.G[:, 0], G[:, 1])
    model(ids[:, 6:7], cache)
    assert torch.equal(cache.G, G)  # decoding reuses it


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_tree_forward_equals_path_forward(attention):
    """Each tree node's logits equal a causal forward over its sequence's prefix + root-to-node path."""
    model = make_model(attention)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2, 3], [-1, 0, 1, 2, -2, -2, -2]])
    depth = torch.tensor([[0, 1, 1, 2, 2, 2, 3], [0, 1, 2, 3, 0, 0, 0]])
    lengths = torch.tensor([5, 3])
    ids = torch.randint(0, 40, (2, 5))
    cache = KVCache.for_model(model, 2, 32)
    model(ids, cache, lengths=lengths)
    tree_ids = torch.randint(0, 40, (2, 7))
    logits, hidden = model(tree_ids, cache, tree_depth=depth, tree_mask_bits=ancestor_bits(parents), return_hidden=True)
    assert cache.seqlens.tolist() == [5, 3]  # a tree forward does not advance the cache
    for b in range(2):
        for i, path in enumerate(ancestor_lists(parents[b].tolist())):
            if path is None:
                continue
            sequence = torch.cat([ids[b, : lengths[b]], tree_ids[b, path]])[None]
            ref_logits, ref_hidden = model(sequence, copy_g_cache(cache, [b], model, 32), return_hidden=True)
            torch.testing.assert_close(logits[b, i], ref_logits[0, -1], rtol=0, atol=1e-12)
            torch.testing.assert_close(hidden[b, i], ref_hidden[0, -1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_unused_cache_rows_may_hold_nan(attention):
    """Cache rows past a sequence's length (a shorter sequence's tail, stale rows of rejected tree nodes) may hold
    anything: NaN there reached the logits through the masked SDPA and softplus formulations (0 * NaN)."""
    model = make_model(attention)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(5))
    tree = build_tree(torch.tensor([[-1, 0, 0], [-1, 0, 1]]))
    logits = []
    for garbage in (0.0, float("nan")):
        cache = KVCache.for_model(model, 2, 24)
        with torch.no_grad():
            model(ids, cache, lengths=[6, 3])
            for b, length in enumerate((6, 3)):
                cache.k[:, b, :, length:], cache.v[:, b, :, length:] = garbage, garbage
            tree_logits = model(ids[:, :3], cache, tree_depth=tree.depth, tree_mask_bits=tree.ancestor_bits)
            logits.append((tree_logits, model(ids[:, :1], cache), model(ids[:, :2], cache)))
    for clean, dirty in zip(*logits):
        assert bool(torch.isfinite(dirty).all())
        torch.testing.assert_close(dirty, clean, atol=0, rtol=0)


def test_input_checks():
    model = make_model("softmax")
    with pytest.raises(ValueError, match=r"input_ids must be an int64 tensor \(B, L\)"):
        model(torch.zeros(2, 3, 4, dtype=torch.long))
    cache = KVCache.for_model(model, 2, 8)
    with pytest.raises(ValueError, match="the cache holds 2 sequences, input_ids has 3"):
        model(torch.zeros(3, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"the cache holds 8 positions per sequence, this forward needs 10"):
        model(torch.zeros(2, 10, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="has no draft heads"):
        model.draft_logits(torch.zeros(2, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_len must be a positive int"):
        KVCache(1, 1, 1, 0, 8)


def test_draft_heads_start_as_the_lm_head():
    torch.manual_seed(0)
    model = KestrelLM(tiny(num_draft_heads=3)).eval()
    hidden = torch.randn(2, 5, 32)
    drafts = model.draft_logits(hidden)
    assert drafts.shape == (2, 5, 3, 40)
    for k in range(3):  # zero-initialised residual blocks: every head repeats the LM head at first
        torch.testing.assert_close(drafts[:, :, k], model.lm_head(hidden))


def test_save_load_roundtrip(tmp_path):
    model = make_model("lssar", dtype=torch.float32, num_draft_heads=2, stable_embedding=True)
    path = tmp_path / "model.pt"
    model.save(path)
    loaded = KestrelLM.load(path).eval()
    ids = torch.randint(0, 40, (2, 7))
    torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    assert loaded.config == model.config
    fresh = KestrelLM(model.config)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(ids), model(ids), rtol=0, atol=0)


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_training_reduces_loss(attention):
    """A few AdamW8bit steps on a fixed batch lower the loss (gradients reach every attention kind's parameters)."""
    from kestrel.optim import AdamW8bit

    torch.manual_seed(0)
    model = KestrelLM(tiny(attention, d_model=64, n_heads=4, stable_embedding=True))
    ids = torch.randint(0, 40, (4, 16))
    optimizer = AdamW8bit(model.parameters(), lr=3e-3, min_8bit_size=1024)
    losses = []
    for _ in range(8):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert model.layers[0].attn.qkv_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_device_matches_cpu(device, attention):
    """The same weights give the same logits (and the same cached decode) on `device` as in float64 on the CPU."""
    head_dim = 64  # the softplus CUDA kernel takes head dims 64 and 128
    cpu = make_model(attention, dtype=torch.float64, d_model=4 * head_dim)
    model = make_model(attention, dtype=torch.float32, device=device, d_model=4 * head_dim)
    model.load_state_dict({k: v.to(torch.float32) for k, v in cpu.state_dict().items()})
    ids = torch.randint(0, 40, (2, 10))
    expected = cpu(ids)
    torch.testing.assert_close(model(ids.to(device)).double().cpu(), expected, rtol=1e-3, atol=1e-3)
    cache = KVCache.for_model(model, 2, 16)
    model(ids[:, :6].to(device), cache)
    steps = [model(ids[:, t : t + 1].to(device), cache) for t in range(6, 10)]
    ref_cache = KVCache.for_model(cpu, 2, 16)
    cpu(ids[:, :6], ref_cache)
    ref_steps = [cpu(ids[:, t : t + 1], ref_cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1).double().cpu(), torch.cat(ref_steps, 1), rtol=1e-3, atol=1e-3)


def test_softmax_one_token_decode_as_a_one_node_tree(monkeypatch):
    """The CUDA route of a softmax one-token decode (a one-node tree through kestrel.ops.tree_attention), forced on
    CPU tensors, gives the masked-SDPA route's logits; the tree forward after it is the same op either way."""
    from kestrel.decoding import static_tree
    from kestrel.nn.attention import SoftmaxCore

    model = make_model("softmax", dtype=torch.float32)
    tree = static_tree([[0], [1], [0, 0], [1, 0], [0, 0, 0]]).buffers(2)
    ids = torch.randint(0, 40, (2, 6))
    tree_ids = torch.randint(0, 40, (2, tree.num_nodes))
    results = []
    for as_tree in (False, True):
        monkeypatch.setattr(SoftmaxCore, "one_node_tree", staticmethod(lambda q, context: as_tree and context.L == 1))
        cache = KVCache.for_model(model, 2, 32)
        model(ids, cache, lengths=torch.tensor([6, 4]))
        decoded = model(ids[:, 5:6], cache)  # a one-token decode (a one-node tree on that route)
        results.append((decoded, model(tree_ids, cache, tree_depth=tree.depth, tree_mask_bits=tree.ancestor_bits)))
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)


def test_codebooks():
    """CodebookLayer before the attention output projection and after the MLP: cached decode equals the full
    forward, gradients reach the codebooks, greedy speculative decoding equals plain greedy."""
    from kestrel.decoding import TreeSpec, generate

    model = make_model("softmax", codebook_attn=True, codebook_mlp=True, num_codes=64, codebook_k=4, num_draft_heads=2)
    attn_codebook = model.layers[0].attn.codebook
    assert attn_codebook.heads == model.config.n_heads and attn_codebook.dim == model.config.head_dim
    assert tuple(attn_codebook.codebook.shape) == (model.config.n_heads, 64, model.config.head_dim)
    assert model.layers[1].mlp.codebook.num_codes == 64
    ids = torch.randint(0, 40, (2, 10))
    cache = KVCache.for_model(model, 2, 16)
    steps = [model(ids[:, :6], cache)] + [model(ids[:, t : t + 1], cache) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids), rtol=0, atol=1e-12)
    spec = TreeSpec(choices=[[0], [1], [0, 0], [1, 0]])
    assert torch.equal(generate(model, ids, 12, speculative=spec), generate(model, ids, 12))
    model.train()
    model(ids).logsumexp(-1).mean().backward()
    assert model.layers[0].attn.codebook.codebook.grad.abs().sum() > 0
    assert model.layers[1].mlp.codebook.codebook.grad.abs().sum() > 0


def test_codebook_interventions_during_generation():
    """Codes forced at an absolute position hold in a cached decode as in the full forward; banned codes are never
    chosen while generating; the chosen ids can be read back."""
    from kestrel.decoding import generate

    model = make_model("softmax", codebook_mlp=True, num_codes=32, codebook_k=2)
    codebook = model.layers[0].mlp.codebook
    ids = torch.randint(0, 40, (2, 8))
    codebook.force([3, 7], positions=[6])
    full = model(ids)
    assert codebook.last_ids[:, 6].tolist() == [[[3, 7]]] * 2
    cache = KVCache.for_model(model, 2, 16)
    steps = [model(ids[:, :5], cache)] + [model(ids[:, t : t + 1], cache) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-12)
    codebook.clear_interventions()
    chosen = set()
    hook = codebook.register_forward_hook(lambda module, args, out: chosen.update(module.last_ids.reshape(-1).tolist()))
    generate(model, ids[:, :4], 6)
    assert chosen & {0, 1, 2, 3}, "the codes to ban are not used anyway: the test would prove nothing"
    chosen.clear()
    codebook.ban([0, 1, 2, 3])
    out = generate(model, ids[:, :4], 6)
    hook.remove()
    assert chosen and not chosen & {0, 1, 2, 3} and out.shape == (2, 10)


def test_draft_heads_train_with_the_base_frozen():
    """train_steps with draft_loss after freeze_base: the heads learn (on a counting sequence, head k must predict
    the token k + 2 ahead), the base stays bit-identical; default_optimizer is AdamW8bit."""
    from kestrel.models.training import default_optimizer, draft_loss, freeze_base, train_steps
    from kestrel.optim import AdamW8bit

    torch.manual_seed(0)
    model = KestrelLM(tiny(num_draft_heads=2))
    base = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("draft_heads")}
    heads = freeze_base(model)
    optimizer = default_optimizer(heads, lr=3e-2)
    assert isinstance(optimizer, AdamW8bit)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 40, (8, 1), generator=g) + torch.arange(17)) % 40 for _ in range(25)]
    losses = train_steps(
        model, optimizer, batches, lambda m, tokens: draft_loss(m, tokens)[0], schedule=lambda step: 3e-2
    )
    assert len(losses) == 25 and losses[-1] < losses[0] - 0.3, losses
    for key, value in model.state_dict().items():
        if key in base:
            assert torch.equal(value, base[key]), key
    with pytest.raises(ValueError, match="no draft heads"):
        draft_loss(KestrelLM(tiny()), batches[0])
