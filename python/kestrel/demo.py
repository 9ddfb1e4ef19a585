"""`python -m kestrel demo`: kestrel end to end with no download (docs/models_and_decoding.md).

1. A byte-level KestrelLM learns the Python standard library's own source files, twice from the same
   initialisation and on the same batches: with kestrel.optim.AdamW8bit and with torch.optim.AdamW (loss curves and
   optimizer-state bytes side by side).
2. Medusa draft heads are trained on the AdamW8bit model with its base frozen.
3. A few prompts are continued with plain greedy decoding and with tree speculative decoding: the texts must be
   identical; the mean accepted length, tokens/s and the speedup are reported. The two paths compute the logits
   with different shapes, so in float32 an argmax near-tie can flip a token (on a GPU more likely than on the
   CPU): a mismatch is reported with its first differing position and the logit gap there; on the CPU any
   mismatch fails the run (exit status 1), on CUDA only one that is not a near-tie does (near-tie flips are counted
   in summary.json as greedy_mismatch_near_ties).
Writes summary.json and loss_curves.png (if matplotlib is installed) to --out.
"""

import argparse
import copy
import json
import math
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

from ._demo_cli import SETTINGS, add_arguments, settings_for  # noqa: F401  (SETTINGS: re-exported)
from .decoding.generate import TreeSpec, generate
from .models import KestrelConfig, KestrelLM
from .models.training import draft_loss, freeze_base, lm_loss, optimizer_state_bytes, train_steps
from .ops.softplus_attention import KERNEL_HEAD_DIMS
from .optim import AdamW8bit

PROMPTS = ["import os\nimport sys\n", "def __init__(self, ", "class Error(Exception):\n", "    for i in range(",
           "        if not isinstance(", "    def __repr__(self):\n        return "]

# A static Medusa-style tree over 3 heads, 21 nodes with the root (20 drafted): wide at depth 1, narrow below.
DEFAULT_CHOICES = [[0], [1], [2], [3], [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [3, 0], [0, 0, 0], [0, 0, 1],
                   [0, 1, 0], [1, 0, 0], [0, 2, 0], [2, 0, 0], [0, 0, 2], [1, 1, 0], [0, 1, 1]]

# |logit(greedy token) - logit(speculative token)| at a mismatch, relative to max(1, |top logit|), below which the
# flip is a near-tie: float32 sums in another order (other matmul shapes, another attention kernel) can flip it
NEAR_TIE = 1e-3


def check_head_dim(attention, head_dim, device_type):
    """On CUDA, lssa / lssar decode with the softplus attention kernel, which takes head dims 64 and 128 only."""
    if device_type == "cuda" and attention in ("lssa", "lssar") and head_dim not in KERNEL_HEAD_DIMS:
        raise ValueError(f"kestrel demo: --attention {attention} on CUDA needs a head dim in {KERNEL_HEAD_DIMS} (the "
                         f"softplus attention kernel's), got d_model / n_heads = {head_dim}")


def first_mismatch(model, prompt_ids, greedy, speculative):
    """Where two continuations of prompt_ids (lists of ints) first differ: None if they are equal, else a dict with
    the position (in the new tokens), both tokens and the logit gap between them there (the model's full forward,
    no cache, over the prompt and the common prefix) and whether that gap is a near-tie (see NEAR_TIE)."""
    position = next((i for i, (a, b) in enumerate(zip(greedy, speculative)) if a != b), None)
    if position is None:
        if len(greedy) == len(speculative):
            return None
        position = min(len(greedy), len(speculative))  # one stopped earlier (EOS): not a near-tie question
        return dict(position=position, greedy_token=None, speculative_token=None, gap=None, near_tie=False)
    a, b = greedy[position], speculative[position]
    with torch.no_grad():
        context = torch.tensor([list(prompt_ids) + list(greedy[:position])], dtype=torch.int64, device=model.device)
        logits = model(context)[0, -1].double()
    gap = abs(float(logits[a] - logits[b]))
    near_tie = gap <= NEAR_TIE * max(1.0, abs(float(logits.max())))
    return dict(position=position, greedy_token=a, speculative_token=b, gap=gap, near_tie=near_tie)


def greedy_failed(mismatches, device_type):
    """Whether the greedy-vs-speculative comparison fails the run: any mismatch on the CPU; on CUDA one that is not
    a near-tie."""
    return any(device_type != "cuda" or not m["near_tie"] for m in mismatches)


class Progress:
    """A one-line progress bar on stderr (redrawn at most 10 times a second, and at the end)."""

    def __init__(self, label, total, width=28, stream=None):
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.started = self.last_draw = time.perf_counter()
        self.count = 0

    def update(self, count=1, note=""):
        self.count += count
        now = time.perf_counter()
        if self.count < self.total and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        filled = int(self.width * self.count / max(self.total, 1))
        elapsed = now - self.started
        eta = elapsed / self.count * (self.total - self.count) if self.count else 0.0
        self.stream.write(f"\r{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] {self.count}/{self.total}"
                          f" {elapsed:5.1f}s eta {eta:5.1f}s {note}   ")
        if self.count >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def stdlib_corpus(max_bytes, seed=0):
    """Bytes of the Python standard library's .py files (no tests, no site-packages), files in a fixed shuffled
    order, up to max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(path.parts))
    if not files:
        raise RuntimeError(f"kestrel demo: no .py files found under the standard library at {root}")
    random.Random(seed).shuffle(files)
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).to(torch.int64)


def batches(corpus, batch_size, seq_len, steps, seed):
    """`steps` batches of random windows (batch_size, seq_len + 1), the same for every caller with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(corpus) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([corpus[s:s + seq_len + 1] for s in starts.tolist()])


def cosine_lr(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train(model, optimizer, corpus, settings, seed, label, loss_fn):
    progress = Progress(label, settings["steps"])
    warmup = max(1, settings["steps"] // 10)
    return train_steps(model, optimizer,
                       batches(corpus, settings["batch_size"], settings["seq_len"], settings["steps"], seed),
                       loss_fn, schedule=lambda step: cosine_lr(step, settings["steps"], settings["lr"], warmup),
                       on_step=lambda step, loss: progress.update(note=f"loss {loss:.3f}"))


def smoothed(values, window=10):
    tail = values[-window:]
    return sum(tail) / len(tail)


def decode_text(tokens):
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def time_generation(model, prompts, new_tokens, speculative, label):
    """Generate from each prompt at batch 1 (one warm-up call first); (outputs, tokens/s, mean accepted length)."""
    encoded = [torch.tensor(list(p.encode()), dtype=torch.int64)[None].to(model.device) for p in prompts]
    generate(model, encoded[0], 4, speculative=speculative)  # warm-up
    outputs, tokens, seconds, accepted = [], 0, 0.0, []
    progress = Progress(label, len(prompts))
    for ids in encoded:
        out, stats = generate(model, ids, new_tokens, speculative=speculative, return_stats=True)
        outputs.append(out[0, ids.shape[1]:].tolist())
        tokens += stats.new_tokens
        seconds += stats.seconds
        accepted += stats.accept_lengths
        progress.update()
    mean_accepted = sum(accepted) / len(accepted) if accepted else 1.0
    return outputs, tokens / seconds, mean_accepted


def save_plot(path, curves, draft_curve):
    try:  # optional (the `demo` extra), and heavy: imported only when a plot is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in curves.items():
        axes[0].plot(values, label=name, linewidth=1)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("next-byte cross entropy")
    axes[0].set_title("LM training: AdamW8bit vs torch AdamW")
    axes[0].legend()
    axes[1].plot(draft_curve, color="tab:green", linewidth=1)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("weighted draft-head loss")
    axes[1].set_title("draft heads (base frozen)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)  # this model's matmuls are small: one thread is steadier, and on a busy machine faster
    settings = settings_for(args.quick, device.type)
    check_head_dim(args.attention, settings["d_model"] // settings["n_heads"], device.type)
    for key in ("steps", "draft_steps", "new_tokens"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    began = time.perf_counter()

    corpus = stdlib_corpus(settings["corpus_bytes"], seed=args.seed)
    split = int(len(corpus) * 0.95)
    train_bytes, val_bytes = corpus[:split], corpus[split:]
    num_heads = len(max(DEFAULT_CHOICES, key=len))
    config = KestrelConfig(vocab_size=256, d_model=settings["d_model"], n_layers=settings["n_layers"],
                           n_heads=settings["n_heads"], n_kv_heads=settings["n_kv_heads"], attention=args.attention,
                           num_draft_heads=num_heads, max_seq_len=max(settings["seq_len"], 1024))
    base = KestrelLM(config).to(device)
    print(f"kestrel demo on {device}: a byte-level KestrelLM ({base.num_parameters(False) / 1e6:.2f}M parameters, "
          f"{config.attention} attention, {config.n_layers} layers, d_model {config.d_model}) on "
          f"{len(corpus) / 1e6:.1f} MB of the Python standard library")

    models, curves, state_bytes = {}, {}, {}
    makers = {"adamw8bit": lambda params: AdamW8bit(params, lr=settings["lr"], weight_decay=0.01),
              "adamw": lambda params: torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.01)}
    for name, make in makers.items():
        model = copy.deepcopy(base)
        lm_params = [p for n, p in model.named_parameters() if not n.startswith("draft_heads")]
        optimizer = make(lm_params)
        curves[name] = train(model, optimizer, train_bytes, settings, args.seed + 1, f"train ({name})", lm_loss)
        state_bytes[name] = optimizer_state_bytes(optimizer)
        models[name] = model
    val = {}
    with torch.no_grad():
        windows = next(batches(val_bytes, 16, settings["seq_len"], 1, args.seed + 2)).to(device)
        for name, model in models.items():
            val[name] = lm_loss(model.eval(), windows).item()
    print(f"{'':22} {'AdamW8bit':>12} {'torch AdamW':>12}")
    print(f"{'final train loss':22} {smoothed(curves['adamw8bit']):12.3f} {smoothed(curves['adamw']):12.3f}")
    print(f"{'held-out loss':22} {val['adamw8bit']:12.3f} {val['adamw']:12.3f}")
    print(f"{'optimizer state':22} {state_bytes['adamw8bit'] / 1024:10.1f} KiB {state_bytes['adamw'] / 1024:8.1f} KiB"
          f"  ({state_bytes['adamw'] / max(state_bytes['adamw8bit'], 1):.1f}x smaller)")

    model = models["adamw8bit"].train()
    head_params = freeze_base(model)
    head_optimizer = AdamW8bit(head_params, lr=settings["lr"], weight_decay=0.0)
    draft_settings = dict(settings, steps=settings["draft_steps"])
    draft_curve = train(model, head_optimizer, train_bytes, draft_settings, args.seed + 3, "train (draft heads)",
                        lambda m, tokens: draft_loss(m, tokens)[0])
    model.eval()
    with torch.no_grad():
        head_losses = draft_loss(model, windows)[1]
    print("draft heads' held-out loss per head: " + ", ".join(f"{loss:.3f}" for loss in head_losses))

    prompts = PROMPTS[:settings["prompts"]]
    spec = TreeSpec(choices=DEFAULT_CHOICES)
    greedy, greedy_tps, _ = time_generation(model, prompts, settings["new_tokens"], None, "greedy")
    speculative, spec_tps, mean_accepted = time_generation(model, prompts, settings["new_tokens"], spec,
                                                           "tree speculative")
    identical = greedy == speculative
    mismatches = []
    for prompt, ours, theirs in zip(prompts, greedy, speculative):
        found = first_mismatch(model, list(prompt.encode()), ours, theirs)
        if found is not None:
            mismatches.append(dict(prompt=prompt, **found))
    near_ties = sum(m["near_tie"] for m in mismatches)
    failed = greedy_failed(mismatches, device.type)
    for prompt, tokens in zip(prompts, greedy):
        print(f"--- greedy: {prompt!r} ->\n{decode_text(tokens)}")
    sampled_ids, sampled_stats = generate(
        model, torch.tensor([list(prompts[-1].encode())], device=device), settings["new_tokens"], temperature=0.8,
        top_p=0.95, speculative=spec, generator=torch.Generator(device).manual_seed(args.seed), return_stats=True)
    sampled = decode_text(sampled_ids[0, len(prompts[-1].encode()):].tolist())
    print(f"--- sampled (temperature 0.8, top-p 0.95, speculative, mean accepted length "
          f"{sampled_stats.mean_accepted_length:.2f}): {prompts[-1]!r} ->\n{sampled}")
    print(f"greedy == speculative (token for token, {len(prompts)} prompts): {identical}")
    for m in mismatches:
        gap = "n/a (different lengths)" if m["gap"] is None else f"{m['gap']:.3g}"
        print(f"  {m['prompt']!r}: first difference at new token {m['position']} (greedy {m['greedy_token']}, "
              f"speculative {m['speculative_token']}), logit gap {gap}: "
              f"{'a near-tie' if m['near_tie'] else 'NOT a near-tie'}")
    if mismatches and not failed:
        print(f"  {near_ties} near-tie flip(s) on {device.type}: float32 logits computed with other shapes; not a "
              "failure there")
    print(f"mean accepted length {mean_accepted:.2f} tokens/step (tree of {spec.num_nodes()} nodes); "
          f"{greedy_tps:.1f} tokens/s greedy, {spec_tps:.1f} tokens/s speculative: {spec_tps / greedy_tps:.2f}x")

    plot_path = out / "loss_curves.png"
    plotted = save_plot(plot_path, {"AdamW8bit": curves["adamw8bit"], "torch AdamW": curves["adamw"]}, draft_curve)
    print(f"wrote {plot_path}" if plotted else "skipped the plot: matplotlib is not installed "
          "(pip install 'kestrel[demo]')")
    summary = dict(
        device=str(device), settings=settings, config=config.to_dict(), parameters=model.num_parameters(False),
        final_loss_adamw8bit=smoothed(curves["adamw8bit"]), final_loss_adamw=smoothed(curves["adamw"]),
        val_loss_adamw8bit=val["adamw8bit"], val_loss_adamw=val["adamw"],
        optimizer_state_bytes_adamw8bit=state_bytes["adamw8bit"], optimizer_state_bytes_adamw=state_bytes["adamw"],
        loss_curve_adamw8bit=curves["adamw8bit"], loss_curve_adamw=curves["adamw"], draft_loss_curve=draft_curve,
        draft_head_val_losses=head_losses, tree_nodes=spec.num_nodes(),
        greedy_equals_speculative=identical, greedy_mismatches=mismatches, greedy_mismatch_near_ties=near_ties,
        mean_accepted_length=mean_accepted,
        tokens_per_s_greedy=greedy_tps, tokens_per_s_speculative=spec_tps, speedup=spec_tps / greedy_tps,
        samples={p: decode_text(t) for p, t in zip(prompts, greedy)}, sample_speculative_t0_8=sampled,
        plot=str(plot_path) if plotted else None,
        seconds=time.perf_counter() - began)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f} s in all)")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m kestrel demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
