"""`python -m kestrel demo --model PATH`: kestrel's decoding stack on a local Hugging Face checkpoint, beside
transformers' own generate (docs/models_and_decoding.md, "The demo on a checkpoint").

1. PATH (a Llama / Mistral / Qwen2 / Qwen3 checkpoint directory with its tokenizer; nothing is downloaded) is
   loaded with transformers in --dtype (default float32) and converted with KestrelLM.from_hf, with three
   zero-initialised Medusa draft heads.
2. The draft heads are trained briefly (kestrel.optim.AdamW8bit, the base frozen) on the Python standard library's
   source tokenised by the checkpoint's tokenizer; their held-out loss per head is printed.
3. Each prompt (--prompt, repeatable; default a few Python snippets, tokenised with the tokenizer's special tokens)
   is continued at batch 1 by transformers' greedy `generate`, kestrel's plain greedy `generate` and kestrel's tree
   speculative `generate` (EOS ignored by all three, so that each makes --new-tokens tokens): the continuations
   are compared token for token and the tokens/s and the mean accepted length are printed side by side.

Two implementations (and greedy with one token per forward vs a tree verified in one forward) sum their float32
logits in other orders, so an argmax near-tie (see kestrel.demo.NEAR_TIE) can flip a token: a mismatch is reported
with its position and the logit gap there; one that is not a near-tie (any mismatch in float64) fails the run
(exit status 1). Writes summary.json to --out.
"""

import copy
import json
import time
from pathlib import Path

import torch

from ._demo_cli import DemoArgumentError, settings_for
from .decoding.generate import TreeSpec
from .demo import (
    DEFAULT_CHOICES,
    PROMPTS,
    Progress,
    batches,
    compare,
    print_mismatches,
    stdlib_sources,
    time_generation,
    train,
)
from .models import KestrelLM
from .models.hf import SUPPORTED, _transformers, load_hf_model
from .models.training import draft_loss, freeze_base, optimizer_state_bytes
from .optim import AdamW8bit


def load_tokenizer(path):
    """The checkpoint's tokenizer (transformers.AutoTokenizer, local files only)."""
    transformers = _transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        raise DemoArgumentError(
            f"kestrel demo: --model {path}: no tokenizer that transformers.AutoTokenizer can load there "
            f"(tokenizer.json or the tokenizer's own files, with tokenizer_config.json): {error}"
        ) from error


def tokenised_corpus(tokenizer, max_bytes, seed, vocab_size):
    """stdlib_sources' files, each decoded as UTF-8 and tokenised without special tokens, joined with the EOS
    token (if the tokenizer has one): int64 tokens, each checked against the model's vocab_size."""
    eos = tokenizer.eos_token_id
    tokens = []
    for data in stdlib_sources(max_bytes, seed):
        tokens += tokenizer(data.decode("utf-8", errors="replace"), add_special_tokens=False, verbose=False)[
            "input_ids"
        ]
        if eos is not None:
            tokens.append(eos)
    corpus = torch.tensor(tokens, dtype=torch.int64)
    if len(corpus) and int(corpus.max()) >= vocab_size:
        raise DemoArgumentError(
            f"kestrel demo: the tokenizer gives token id {int(corpus.max())}, the model's vocab_size is {vocab_size}"
        )
    return corpus


def hf_generation(hf, encoded, new_tokens, label):
    """transformers' greedy generate on each prompt of `encoded` at batch 1 (EOS ignored, one warm-up call first):
    (outputs as lists of the new tokens, tokens/s)."""
    config = copy.deepcopy(hf.generation_config)
    config.do_sample, config.temperature, config.top_k, config.top_p = False, None, None, None
    config.eos_token_id, config.max_new_tokens, config.min_new_tokens = None, new_tokens, None
    config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id

    def run(ids, count):
        config.max_new_tokens = count
        return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)

    with torch.no_grad():
        run(encoded[0], 4)  # warm-up
        outputs, tokens, seconds = [], 0, 0.0
        progress = Progress(label, len(encoded))
        for ids in encoded:
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            began = time.perf_counter()
            out = run(ids, new_tokens)
            if ids.device.type == "cuda":
                torch.cuda.synchronize(ids.device)
            seconds += time.perf_counter() - began
            outputs.append(out[0, ids.shape[1] :].tolist())
            tokens += len(outputs[-1])
            progress.update()
    return outputs, tokens / seconds


def run_hf(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise DemoArgumentError(
            f"kestrel demo: --model {args.model} is not a local checkpoint directory (no config.json); give a "
            f"directory written by save_pretrained of one of {', '.join(SUPPORTED)}, with its tokenizer"
        )
    settings = settings_for(args.quick, device.type, hf=True)
    for key in ("draft_steps", "new_tokens"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    dtype = getattr(torch, args.dtype or "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    began = time.perf_counter()

    tokenizer = load_tokenizer(str(path))
    _transformers().utils.logging.disable_progress_bar()  # no "Loading weights" bar between the demo's lines
    hf = load_hf_model(str(path), dtype).to(device).eval()
    num_heads = len(max(DEFAULT_CHOICES, key=len))
    model = KestrelLM.from_hf(hf, num_draft_heads=num_heads)
    config = model.config
    prompts = args.prompt or PROMPTS[: settings["prompts"]]
    encoded = [tokenizer(p, return_tensors="pt")["input_ids"].to(device) for p in prompts]
    for prompt, ids in zip(prompts, encoded):
        if ids.shape[1] == 0:
            raise DemoArgumentError(f"kestrel demo: --prompt {prompt!r} tokenises to no tokens")
        if ids.shape[1] + settings["new_tokens"] > config.max_seq_len:
            raise DemoArgumentError(
                f"kestrel demo: --prompt {prompt!r} ({ids.shape[1]} tokens) + --new-tokens {settings['new_tokens']} "
                f"exceeds the model's max_position_embeddings {config.max_seq_len}"
            )
    settings["seq_len"] = min(settings["seq_len"], config.max_seq_len - 1)
    print(
        f"kestrel demo on {device}: {path} ({config.hf_architecture}, {model.num_parameters(False) / 1e6:.2f}M "
        f"parameters, {config.n_layers} layers, d_model {config.d_model}, {config.n_heads} heads / "
        f"{config.n_kv_heads} kv heads, {str(dtype).replace('torch.', '')}) converted with KestrelLM.from_hf"
    )

    corpus = tokenised_corpus(tokenizer, settings["corpus_bytes"], args.seed, config.vocab_size)
    split = int(len(corpus) * 0.95)
    train_tokens, val_tokens = corpus[:split], corpus[split:]
    if min(len(train_tokens), len(val_tokens)) <= settings["seq_len"] + 1:
        raise DemoArgumentError(f"kestrel demo: the tokenised corpus ({len(corpus)} tokens) is too short")
    # the 8-bit optimizers take float32 / float16 / bfloat16 parameters: a float64 model's heads train on a float32
    # copy and are copied back
    trained = copy.deepcopy(model).float() if dtype == torch.float64 else model
    print(
        f"draft heads: {num_heads}, trained on {len(train_tokens)} tokens of the standard library (base frozen"
        f"{', in float32' if trained is not model else ''})"
    )
    head_optimizer = AdamW8bit(freeze_base(trained), lr=settings["lr"], weight_decay=0.0)
    trained.train()
    draft_curve = train(
        trained,
        head_optimizer,
        train_tokens,
        dict(settings, steps=settings["draft_steps"]),
        args.seed + 3,
        "train (draft heads)",
        lambda m, tokens: draft_loss(m, tokens)[0],
    )
    if trained is not model:
        with torch.no_grad():
            for ours, theirs in zip(model.draft_heads.parameters(), trained.draft_heads.parameters()):
                ours.copy_(theirs)
        del trained
    model.eval()
    with torch.no_grad():
        windows = next(batches(val_tokens, 8, settings["seq_len"], 1, args.seed + 2)).to(device)
        head_losses = draft_loss(model, windows)[1]
    print("draft heads' held-out loss per head: " + ", ".join(f"{loss:.3f}" for loss in head_losses))

    spec = TreeSpec(choices=DEFAULT_CHOICES)
    new_tokens = settings["new_tokens"]
    reference, hf_tps = hf_generation(hf, encoded, new_tokens, "transformers greedy")
    greedy, greedy_tps, _ = time_generation(model, encoded, new_tokens, None, "kestrel greedy")
    speculative, spec_tps, mean_accepted = time_generation(model, encoded, new_tokens, spec, "kestrel speculative")
    mismatches = {
        "speculative": compare(model, prompts, encoded, greedy, speculative),
        "transformers": compare(model, prompts, encoded, greedy, reference),
    }
    exact = dtype == torch.float64
    failed = any(exact or not m["near_tie"] for found in mismatches.values() for m in found)
    for prompt, tokens in zip(prompts, greedy):
        text = tokenizer.decode(tokens)
        print(f"--- greedy: {prompt!r} -> {len(tokens)} tokens: {text!r}")
    print(
        f"kestrel greedy == kestrel tree speculative (token for token, {len(prompts)} prompts): {greedy == speculative}"
    )
    print_mismatches(mismatches["speculative"], failed, device.type)
    print(f"kestrel greedy == transformers greedy generate: {greedy == reference}")
    print_mismatches(mismatches["transformers"], failed, device.type, other="transformers")
    name = "kestrel tree speculative"
    width = len(name)
    print(f"{'':{width}} {'tokens/s':>10} {'vs transformers':>16} {'accepted/step':>14}")
    for label, tps, accepted in (
        ("transformers generate", hf_tps, 1.0),
        ("kestrel greedy", greedy_tps, 1.0),
        (name, spec_tps, mean_accepted),
    ):
        print(f"{label:{width}} {tps:10.1f} {tps / hf_tps:15.2f}x {accepted:14.2f}")
    print(f"(batch 1, {new_tokens} new tokens per prompt, tree of {spec.num_nodes()} nodes)")

    summary = dict(
        device=str(device),
        model=str(path),
        architecture=config.hf_architecture,
        dtype=str(dtype).replace("torch.", ""),
        settings=settings,
        config=config.to_dict(),
        parameters=model.num_parameters(False),
        draft_optimizer_state_bytes=optimizer_state_bytes(head_optimizer),
        draft_loss_curve=draft_curve,
        draft_head_val_losses=head_losses,
        prompts=prompts,
        tree_nodes=spec.num_nodes(),
        greedy_equals_speculative=greedy == speculative,
        greedy_equals_transformers=greedy == reference,
        speculative_mismatches=mismatches["speculative"],
        transformers_mismatches=mismatches["transformers"],
        mean_accepted_length=mean_accepted,
        tokens_per_s_transformers=hf_tps,
        tokens_per_s_greedy=greedy_tps,
        tokens_per_s_speculative=spec_tps,
        speedup_vs_transformers=spec_tps / hf_tps,
        samples={p: tokenizer.decode(t) for p, t in zip(prompts, greedy)},
        seconds=time.perf_counter() - began,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f} s in all)")
    return 1 if failed else 0
