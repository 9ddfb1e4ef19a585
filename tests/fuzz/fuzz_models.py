"""Fuzzing the model, the decoding stack and the modules: random generate() arguments (legal and not), config
fields and module constructors. Each case either raises a clear error (before the model runs) or gives a result
of the documented shape whose tokens lie in the vocabulary; greedy speculative output equals plain greedy."""

import pytest
import torch
from cases import examples, note, raises_clearly
from hypothesis import event, given, settings
from hypothesis import strategies as st

import kestrel
from kestrel.decoding import TreeSpec, generate
from kestrel.models import KestrelConfig, KestrelLM

pytestmark = pytest.mark.skipif(not kestrel._ext.available(), reason="kestrel._C is not built")

VOCAB = 17
_MODELS = {}


def model(attention):
    if attention not in _MODELS:
        torch.manual_seed(0)
        config = KestrelConfig(
            vocab_size=VOCAB,
            d_model=32,
            n_layers=2,
            n_heads=2,
            n_kv_heads=1,
            attention=attention,
            num_draft_heads=2,
            max_seq_len=64,
        )
        _MODELS[attention] = KestrelLM(config).double().eval()
    return _MODELS[attention]


TREES = [
    None,
    TreeSpec(choices=[[0], [1], [0, 0]]),
    TreeSpec(max_nodes=6, topk=2),
    TreeSpec(choices=[[0], [20]]),
    TreeSpec(max_nodes=6, topk=2, depth=5),
]


@st.composite
def generate_calls(draw):
    attention = draw(st.sampled_from(["softmax", "lssa", "plga"]))
    B = draw(st.integers(0, 3))
    L = draw(st.integers(0, 6))
    prompt_kind = draw(st.sampled_from(["tensor", "list", "padded"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 999)))
    ids = torch.randint(0, VOCAB, (B, L), generator=g)
    if draw(st.integers(0, 11)) == 11 and B and L:
        ids[0, 0] = draw(st.sampled_from([-1, VOCAB, 10**9]))  # outside the vocabulary
    lengths = [draw(st.integers(0 if prompt_kind != "list" else 1, L)) for _ in range(B)] if L else [0] * B
    if prompt_kind == "list":
        inputs, extra = [ids[b, : max(lengths[b], 1)] for b in range(B)] if L else [], {}
        if not inputs:
            inputs = ids
    elif prompt_kind == "padded":
        inputs, extra = (
            ids,
            dict(
                prompt_lengths=draw(
                    st.sampled_from([lengths, lengths, lengths, [x + 0.5 for x in lengths], lengths[:-1]])
                )
            ),
        )
    else:
        inputs, extra = ids, {}

    def option(valid, invalid):  # mostly legal values, so that most cases generate; sometimes an illegal one
        return draw(st.sampled_from(invalid if draw(st.integers(0, 11)) == 11 else valid))

    kwargs = dict(
        temperature=option([0.0, 0.0, 0.7, 1e-45, float("inf")], [-1.0, float("nan"), "hot"]),
        top_k=option([None, 1, 3], [True, 0, -2]),
        top_p=option([None, 0.9, 1.0], [0.0, 1.5]),
        speculative=option(TREES[:3], TREES[3:]),
        eos_token_id=option([None, 3], [VOCAB, -1, 2.0]),
        pad_token_id=option([None, 0, -1], [1.5]),
        **extra,
    )
    max_new = option([0, 1, 5, 9], [-1, True, 1000])
    return attention, inputs, max_new, kwargs


def valid_prompt_ids(inputs, kwargs):
    if isinstance(inputs, list):
        return all(bool(((t >= 0) & (t < VOCAB)).all()) for t in inputs)
    lengths = kwargs.get("prompt_lengths")
    if lengths is None:
        return bool(((inputs >= 0) & (inputs < VOCAB)).all())
    return all(
        bool(((inputs[b, : int(n)] >= 0) & (inputs[b, : int(n)] < VOCAB)).all())
        for b, n in enumerate(lengths)
        if b < inputs.shape[0]
    )


@settings(max_examples=examples(60))
@given(generate_calls())
def test_generate_refuses_clearly_or_returns_the_documented_result(call):
    attention, inputs, max_new, kwargs = call
    note(
        f"generate attention={attention} inputs={inputs if isinstance(inputs, list) else tuple(inputs.shape)} "
        f"max_new={max_new} {kwargs}"
    )
    lm = model(attention)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    result = []
    error = raises_clearly(
        lambda: result.append(generate(lm, inputs, max_new, **kwargs)),
        "generate",
        "TreeSpec",
        "sampling_probs",
        "KestrelLM",
        "vocab",
    )
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items()), "generate changed the model"
    event(f"refused: {str(error)[:60]}" if error is not None else "generated")
    if error is not None:
        assert isinstance(error, (TypeError, ValueError)), repr(error)
        return
    out = result[0]
    B = len(inputs) if isinstance(inputs, list) else inputs.shape[0]
    L = max((len(t) for t in inputs), default=0) if isinstance(inputs, list) else inputs.shape[1]
    assert out.shape == (B, L + max_new) and out.dtype == torch.int64
    new = out[:, L:]
    pad = kwargs.get("pad_token_id")
    ok = (new >= 0) & (new < VOCAB)
    if pad is not None:
        ok |= new == pad
    assert bool(ok.all()), "a generated token outside the vocabulary"
    assert valid_prompt_ids(inputs, kwargs), "a prompt id outside the vocabulary was accepted"
    if kwargs["temperature"] == 0.0 and kwargs["speculative"] is not None and B:
        plain = generate(lm, inputs, max_new, **dict(kwargs, speculative=None))
        assert torch.equal(out, plain), "greedy speculative differs from greedy (float64 model)"


CONFIG_FIELDS = {
    "vocab_size": [17, 0, -1, True, 2.5],
    "d_model": [32, 0, 31, "32"],
    "n_layers": [1, 0, -3],
    "n_heads": [2, 0, 3],
    "n_kv_heads": [None, 1, 0, 3],
    "attention": ["softmax", "lssa", "lssar", "plga", "flash"],
    "num_draft_heads": [0, 2, -1],
    "max_seq_len": [64, 0],
    "d_ff": [None, 64, 0],
    "rope_base": [10000.0, 0.0, float("inf")],
    "norm_eps": [1e-6, 0.0, -1.0],
    "lssar_p": [15.0, 0.0, float("nan")],
    "codebook_attn": [False, True, 1],
    "num_codes": [32, 0],
    "codebook_k": [4, 64],
    "tie_embeddings": [True, False, None],
}


@settings(max_examples=examples(80))
@given(st.fixed_dictionaries({}, optional={k: st.sampled_from(v[:1] * 4 + v[1:]) for k, v in CONFIG_FIELDS.items()}))
def test_config_and_model_refuse_clearly_or_run(fields):
    base = dict(vocab_size=17, d_model=32, n_layers=1, n_heads=2)
    base.update(fields)
    note(f"config {base}")
    built = []
    error = raises_clearly(
        lambda: built.append(KestrelLM(KestrelConfig(**base))),
        "KestrelConfig",
        "KestrelLM",
        "CodebookLayer",
        "SoftplusAttention",
        "PowerLawGraphAttention",
    )
    event("refused" if error is not None else "built")
    if error is not None:
        assert isinstance(error, (TypeError, ValueError)), repr(error)
        return
    lm = built[0].eval()
    ids = torch.randint(0, lm.config.vocab_size, (2, 5))
    logits = lm(ids)
    assert logits.shape == (2, 5, lm.config.vocab_size) and bool(torch.isfinite(logits).all())


MODULES = {
    "CodebookLayer": (
        lambda **kw: kestrel.nn.CodebookLayer(**kw),
        dict(
            dim=[8, 0, -1, 2.0],
            num_codes=[16, 0, True],
            k=[2, 0, 17, 16],
            metric=["l2", "dot"],
            heads=[1, 2, 0],
            reduce=["mean", "sum", "max"],
            recent_size=[None, 0, 64],
        ),
    ),
    "SoftplusAttention": (
        lambda **kw: kestrel.nn.SoftplusAttention(**kw),
        dict(
            embed_dim=[64, 0, 63],
            num_heads=[1, 0, -2],
            num_kv_heads=[None, 1, 0],
            reweight_p=[None, 15.0, float("inf"), 0.0],
        ),
    ),
    "DiscreteKeyValueBottleneck": (
        lambda **kw: kestrel.nn.DiscreteKeyValueBottleneck(**kw),
        dict(
            dim_in=[16, 0],
            num_codebooks=[4, 0],
            num_pairs=[32, 0],
            dim_key=[4, 0],
            dim_value=[3, 0],
            topk=[1, 0, 40],
            decoder=["vote", "linear", "none"],
            dim_out=[None, 5, 0],
        ),
    ),
}


@settings(max_examples=examples(90))
@given(st.sampled_from(sorted(MODULES)), st.data())
def test_module_constructors_refuse_clearly_or_build(name, data):
    make, fields = MODULES[name]
    kwargs = {}
    for key, values in fields.items():
        value = data.draw(st.sampled_from(values[:1] * 5 + values[1:]))  # mostly the first (legal) value
        if value is not None or key in ("num_kv_heads", "reweight_p", "dim_out", "recent_size"):
            kwargs[key] = value
    if kwargs.get("recent_size", 1) is None:
        kwargs.pop("recent_size")
    note(f"{name}({kwargs})")
    error = raises_clearly(lambda: make(**kwargs), name)
    event("refused" if error is not None else "built")
    if error is not None:
        assert isinstance(error, (TypeError, ValueError, NotImplementedError)), repr(error)
