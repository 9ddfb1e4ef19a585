"""Hugging Face checkpoints through kestrel (kestrel.models.hf): tiny random-initialised transformers models of every
supported family, built locally (no download), converted and held against transformers itself: logits in float64
(relative error <= 1e-10) and float32 (within transformers' own float32 error), cached decode = the full forward,
greedy generate token for token = transformers' generate, to_hf round trip bit for bit, a local safetensors
directory, and the refusals."""

import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kestrel.decoding import KVCache, generate  # noqa: E402
from kestrel.models import KestrelLM  # noqa: E402
from kestrel.models.hf import SUPPORTED  # noqa: E402

BASE = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


def rope_kwargs(config_class, theta, scaling=None):
    """rope settings in the spelling of the installed transformers (5: rope_parameters; 4: rope_theta/rope_scaling)."""
    if "rope_parameters" in config_class().to_dict():
        return dict(rope_parameters=dict(scaling or {"rope_type": "default"}, rope_theta=theta))
    return dict(rope_theta=theta, rope_scaling=scaling)


FAMILIES = {
    "llama": ("LlamaForCausalLM", dict(tie_word_embeddings=False), 10000.0, None),
    "llama3-rope-tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True), 500000.0, LLAMA3_ROPE),
    "mistral": ("MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False), 1e6, None),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), 1e6, None),
    "qwen3": ("Qwen3ForCausalLM", dict(head_dim=24, tie_word_embeddings=False), 1e6, None),
}


def hf_model(family, dtype=torch.float64, seed=0):
    architecture, extra, theta, scaling = FAMILIES[family]
    config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
    config = config_class(**BASE, **extra, **rope_kwargs(config_class, theta, scaling))
    config._attn_implementation = "sdpa"  # the default; eager computes its softmax in float32 even for float64
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).to(dtype).eval()
    with torch.no_grad():  # random norms and biases too, so that the mapping of every tensor shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def ids(B=2, L=11, vocab=97, seed=1):
    return torch.randint(0, vocab, (B, L), generator=torch.Generator().manual_seed(seed))


def relative_error(ours, reference):
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_transformers_in_float64(family):
    hf = hf_model(family)
    model = KestrelLM.from_hf(hf)
    x = ids()
    with torch.no_grad():
        reference = hf(x).logits
        ours = model(x)
    assert ours.dtype == torch.float64
    assert relative_error(ours, reference) <= 1e-10


@pytest.mark.parametrize("family", list(FAMILIES))
def test_float32_within_transformers_own_float32_error(family):
    exact = hf_model(family)
    hf32 = hf_model(family, torch.float32)
    model = KestrelLM.from_hf(hf32)
    x = ids()
    with torch.no_grad():
        reference = exact(x).logits
        theirs = relative_error(hf32(x).logits, reference)
        ours = relative_error(model(x), reference)
    assert ours <= 4 * theirs + 1e-6, (ours, theirs)


@pytest.mark.parametrize("family", ["llama3-rope-tied", "qwen3"])
def test_cached_decode_equals_the_full_forward(family):
    model = KestrelLM.from_hf(hf_model(family))
    x = ids(L=9)
    with torch.no_grad():
        full = model(x)
        cache = KVCache.for_model(model, 2, 16)
        steps = [model(x[:, :5], cache)]
        steps += [model(x[:, t : t + 1], cache) for t in range(5, 9)]
    assert relative_error(torch.cat(steps, 1), full) <= 1e-10


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_generate_equals_transformers_generate(family):
    hf = hf_model(family)
    model = KestrelLM.from_hf(hf)
    prompt = ids(B=1, L=6, seed=3)
    with torch.no_grad():
        expected = hf.generate(prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(generate(model, prompt, max_new_tokens=8), expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_round_trip_is_bit_exact(family):
    hf = hf_model(family, torch.float32)
    back = KestrelLM.from_hf(hf).to_hf()
    assert type(back) is type(hf)
    ours, theirs = back.state_dict(), hf.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tree_speculative_decoding_on_a_converted_model(family):
    """Draft heads trained (AdamW8bit, float32) on the converted model with its base frozen
    (kestrel.models.training): greedy tree speculative decoding then emits exactly plain greedy's tokens (float64),
    and the trained heads get tokens accepted."""
    from kestrel.decoding import TreeSpec
    from kestrel.models.training import draft_loss, freeze_base, train_steps
    from kestrel.optim import AdamW8bit

    model = KestrelLM.from_hf(hf_model(family, torch.float32), num_draft_heads=2)  # AdamW8bit: no float64
    tokens = torch.randint(0, 97, (4, 25), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # the base model's own greedy continuations: something the heads can learn
        text = generate(model, tokens[:, :5], max_new_tokens=20)
    frozen = [p.clone() for name, p in model.named_parameters() if not name.startswith("draft_heads")]
    optimizer = AdamW8bit(freeze_base(model), lr=3e-3)
    train_steps(model, optimizer, [text] * 30, loss_fn=lambda m, t: draft_loss(m, t)[0])
    after = [p for name, p in model.named_parameters() if not name.startswith("draft_heads")]
    assert all(torch.equal(a, b) for a, b in zip(after, frozen))
    model = model.double()  # exact arithmetic for the comparison: no near-tie can flip a token
    prompt = text[:2, :7]
    plain = generate(model, prompt, max_new_tokens=12)
    spec, stats = generate(
        model, prompt, max_new_tokens=12, speculative=TreeSpec(choices=[[0], [1], [0, 0], [1, 0]]), return_stats=True
    )
    assert torch.equal(spec, plain)
    assert stats.mean_accepted_length > 1.0  # the heads learned something: tokens accepted beyond the root


@pytest.mark.parametrize(
    "options", [dict(temperature=1.0), dict(temperature=0.8, top_k=6, top_p=0.9)], ids=["t1", "t0.8-topk6-topp0.9"]
)
def test_sampled_speculative_decoding_on_a_converted_model_follows_its_distribution(options):
    """A converted Qwen3 (a 16-token vocabulary, weights large enough for peaked next-token distributions) with draft
    heads trained on its own samples, base frozen: three tokens sampled after one prompt with tree speculative
    decoding, 12000 times; the frequencies of (x1, x2) and (x2, x3) (the latter out of tree verification) pass a
    chi-square test against the converted model's exact distribution (enumerated), as for KestrelLM in
    test_generate."""
    from helpers import assert_pairs_follow

    from kestrel.decoding import TreeSpec
    from kestrel.models.training import draft_loss, freeze_base, train_steps
    from kestrel.optim import AdamW8bit

    _, extra, theta, _ = FAMILIES["qwen3"]
    config_class = transformers.Qwen3Config
    config = config_class(
        **dict(BASE, vocab_size=16), **extra, initializer_range=0.4, **rope_kwargs(config_class, theta)
    )
    torch.manual_seed(3)
    hf = transformers.Qwen3ForCausalLM(config).eval()
    model = KestrelLM.from_hf(hf, num_draft_heads=2)
    prompt, n = torch.tensor([5, 1, 12]), 12000
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # the heads learn the model's own sampled continuations of the prompt
        samples = generate(model, prompt.expand(64, 3), 8, temperature=1.0, generator=generator)
    optimizer = AdamW8bit(freeze_base(model), lr=1e-2)
    train_steps(model, optimizer, [samples] * 40, loss_fn=lambda m, t: draft_loss(m, t)[0])
    tree = TreeSpec(choices=[[0], [1], [0, 0], [0, 1], [1, 0], [1, 1]])
    out, stats = generate(
        model, prompt.expand(n, 3), 3, speculative=tree, generator=generator, return_stats=True, **options
    )
    assert stats.accept_lengths.count(2) > 0.05 * n  # drafts accepted often enough to matter
    assert_pairs_follow(model, prompt, out[:, 3:], options)


def test_a_local_checkpoint_directory(tmp_path):
    hf = hf_model("qwen2", torch.float32)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    model = KestrelLM.from_hf(tmp_path)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    assert KestrelLM.from_hf(str(tmp_path), dtype=torch.float64).dtype == torch.float64


def test_refusals_name_what_is_supported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local checkpoint directory"):
        KestrelLM.from_hf(tmp_path / "missing")
    with pytest.raises(TypeError, match="dtype must be None .* or a torch floating dtype, got 'half'"):
        KestrelLM.from_hf(hf_model("llama"), dtype="half")
    with pytest.raises(TypeError, match="expected a transformers model or a local directory, got Linear"):
        KestrelLM.from_hf(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported; supported: " + ", ".join(SUPPORTED)):
        KestrelLM.from_hf(gpt2)
    windowed = transformers.MistralConfig(**BASE, sliding_window=8)
    with pytest.raises(ValueError, match=r"sliding-window attention \(window 8 < max_position_embeddings 128\)"):
        KestrelLM.from_hf(transformers.MistralForCausalLM(windowed))
    with pytest.raises(ValueError, match="to_hf: this KestrelLM was not converted"):
        KestrelLM(
            KestrelLM.from_hf(hf_model("llama")).config.__class__(vocab_size=8, d_model=8, n_layers=1, n_heads=2)
        ).to_hf()


def test_import_kestrel_never_imports_transformers():
    probe = "import sys, kestrel, kestrel.models, kestrel.decoding, kestrel.optim; print('transformers' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
