"""`python -m kestrel demo`: kestrel end to end with no download (docs/models_and_decoding.md).

1. A byte-level KestrelLM learns the Python standard library's own source files, twice from the same
   initialisation and on the same batches: with kestrel.optim.AdamW8bit and with torch.optim.AdamW (loss curves and
   optimizer-state bytes side by side; the "final train loss" is the mean of the last 10 steps' losses).
2. Medusa draft heads are trained on the AdamW8bit model with its base frozen.
3. A few prompts are continued with plain greedy decoding and with tree speculative decoding: the texts must be
   identical; the mean accepted length, tokens/s and the speedup are reported. The two paths compute the logits
   with different shapes, so in float32 an argmax near-tie can flip a token (on a GPU more likely than on the
   CPU): a mismatch is reported with its first differing position and the logit gap there; on the CPU any
   mismatch fails the run (exit status 1), on CUDA only one that is not a near-tie does (near-tie flips are counted
   in summary.json as greedy_mismatch_near_ties).
Continuations are printed as Python string literals (whitespace and unprintable bytes escaped). Progress goes to
stderr: a tqdm bar on a terminal when tqdm is installed, else a plain line every tenth of a phase.
Writes summary.json and loss_curves.png (if matplotlib is installed) to --out.

With --model PATH (a local Hugging Face Llama / Mistral / Qwen2 / Qwen3 checkpoint and its tokenizer; the hf extra)
the demo runs kestrel.demo_hf instead: the checkpoint converted with KestrelLM.from_hf, draft heads trained on the
standard library tokenised by its tokenizer (the base frozen), then transformers' greedy generate, kestrel's greedy
and kestrel's tree speculative decoding on the same prompts (--prompt), token for token and in tokens/s.
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

try:  # optional (the `demo` extra): progress bars on a terminal
    from tqdm import tqdm
except ImportError:
    tqdm = None

from ._demo_cli import (  # noqa: F401  (SETTINGS: re-exported)
    SETTINGS,
    DemoArgumentError,
    add_arguments,
    check_arguments,
    settings_for,
)
from .decoding.generate import TreeSpec, generate
from .models import KestrelConfig, KestrelLM
from .models.training import draft_loss, freeze_base, lm_loss, optimizer_state_bytes, train_steps
from .ops.softplus_attention import KERNEL_HEAD_DIMS
from .optim import AdamW8bit

PROMPTS = [
    "import os\nimport sys\n",
    "def __init__(self, ",
    "class Error(Exception):\n",
    "    for i in range(",
    "        if not isinstance(",
    "    def __repr__(self):\n        return ",
]

# A static Medusa-style tree over 3 heads, 21 nodes with the root (20 drafted): wide at depth 1, narrow below.
DEFAULT_CHOICES = [
    [0],
    [1],
    [2],
    [3],
    [0, 0],
    [0, 1],
    [0, 2],
    [1, 0],
    [1, 1],
    [2, 0],
    [3, 0],
    [0, 0, 0],
    [0, 0, 1],
    [0, 1, 0],
    [1, 0, 0],
    [0, 2, 0],
    [2, 0, 0],
    [0, 0, 2],
    [1, 1, 0],
    [0, 1, 1],
]

# |logit(greedy token) - logit(speculative token)| at a mismatch, relative to max(1, |top logit|), below which the
# flip is a near-tie: float32 sums in another order (other matmul shapes, another attention kernel) can flip it
NEAR_TIE = 1e-3


def check_head_dim(attention, head_dim, device_type):
    """On CUDA, lssa / lssar decode with the softplus attention kernel, which takes head dims 64 and 128 only."""
    if device_type == "cuda" and attention in ("lssa", "lssar") and head_dim not in KERNEL_HEAD_DIMS:
        raise DemoArgumentError(
            f"kestrel demo: --attention {attention} on CUDA needs a head dim in {KERNEL_HEAD_DIMS} (the "
            f"softplus attention kernel's), got d_model / n_heads = {head_dim}"
        )


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
    """The progress of one phase on stderr: a tqdm bar when tqdm is installed and the stream is a terminal; else a
    plain line about every tenth of the phase and at its end (no carriage-return redraws flooding a log)."""

    def __init__(self, label, total, stream=None, lines=10):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.count = 0
        self.started = time.perf_counter()
        self.every = max(1, -(-total // lines))
        self.next_line = self.every
        isatty = getattr(self.stream, "isatty", None)
        on_terminal = callable(isatty) and isatty()
        self.bar = tqdm(total=total, desc=label, file=self.stream) if tqdm is not None and on_terminal else None

    def update(self, count=1, note=""):
        self.count += count
        if self.bar is not None:
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(count)
            if self.count >= self.total:
                self.bar.close()
            return
        if self.count < self.next_line and self.count < self.total:
            return
        self.next_line = (self.count // self.every + 1) * self.every
        elapsed = time.perf_counter() - self.started
        print(
            f"{self.label}: {self.count}/{self.total}, {elapsed:.1f} s{', ' + note if note else ''}",
            file=self.stream,
            flush=True,
        )


def stdlib_sources(max_bytes, seed=0):
    """The Python standard library's .py files (no tests, no site-packages) as bytes, one item per file, files in a
    fixed shuffled order, max_bytes in all (the last one cut)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        path
        for path in root.rglob("*.py")
        if not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(path.parts)
    )
    if not files:
        raise RuntimeError(f"kestrel demo: no .py files found under the standard library at {root}")
    random.Random(seed).shuffle(files)
    chunks, total = [], 0
    for path in files:
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        if total >= max_bytes:
            break
    return chunks


def stdlib_corpus(max_bytes, seed=0):
    """stdlib_sources' bytes concatenated, as int64 tokens (one per byte)."""
    data = b"".join(stdlib_sources(max_bytes, seed))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def batches(corpus, batch_size, seq_len, steps, seed):
    """`steps` batches of random windows (batch_size, seq_len + 1), the same for every caller with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(corpus) - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([corpus[s : s + seq_len + 1] for s in starts.tolist()])


def cosine_lr(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train(model, optimizer, corpus, settings, seed, label, loss_fn):
    progress = Progress(label, settings["steps"])
    warmup = max(1, settings["steps"] // 10)
    return train_steps(
        model,
        optimizer,
        batches(corpus, settings["batch_size"], settings["seq_len"], settings["steps"], seed),
        loss_fn,
        schedule=lambda step: cosine_lr(step, settings["steps"], settings["lr"], warmup),
        on_step=lambda step, loss: progress.update(note=f"loss {loss:.3f}"),
    )


# the "final train loss" of a run: the mean of its last FINAL_WINDOW steps' losses
FINAL_WINDOW = 10


def smoothed(values, window=FINAL_WINDOW):
    tail = values[-window:]
    return sum(tail) / len(tail)


def smoothing_window(steps):
    """The plot's moving-average window for a curve of `steps` points: odd, about steps / 25, at least 3."""
    return max(3, steps // 25) | 1


def moving_average(values, window):
    """The centered moving average of values over `window` (odd) points, shorter at both ends: no lag, unlike an
    exponential average, so a falling curve is not drawn above its points."""
    half = window // 2
    out = []
    for i in range(len(values)):
        part = values[max(0, i - half) : i + half + 1]
        out.append(sum(part) / len(part))
    return out


def decode_text(tokens):
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def show_text(tokens):
    """A continuation for the terminal: its byte count and the text as a Python string literal, so that whitespace
    (a tiny model's greedy text is often only spaces or newlines) and unprintable bytes are visible."""
    text = decode_text(tokens)
    return f"{len(tokens)} bytes{', whitespace only' if text.isspace() else ''}: {text!r}"


def time_generation(model, encoded, new_tokens, speculative, label):
    """Generate new_tokens after each prompt of `encoded` (token tensors (1, L) on the model's device) at batch 1,
    one warm-up call first; (outputs as lists of the new tokens, tokens/s, mean accepted length)."""
    generate(model, encoded[0], 4, speculative=speculative)  # warm-up
    outputs, tokens, seconds, accepted = [], 0, 0.0, []
    progress = Progress(label, len(encoded))
    for ids in encoded:
        out, stats = generate(model, ids, new_tokens, speculative=speculative, return_stats=True)
        outputs.append(out[0, ids.shape[1] :].tolist())
        tokens += stats.new_tokens
        seconds += stats.seconds
        accepted += stats.accept_lengths
        progress.update()
    mean_accepted = sum(accepted) / len(accepted) if accepted else 1.0
    return outputs, tokens / seconds, mean_accepted


def compare(model, prompts, encoded, greedy, other):
    """The first mismatch (first_mismatch) of each prompt (its text in prompts, its tokens (1, L) in encoded) where
    the continuations `other` differ from `greedy`: a list of dicts, each with its prompt."""
    mismatches = []
    for prompt, ids, ours, theirs in zip(prompts, encoded, greedy, other):
        found = first_mismatch(model, ids[0].tolist(), ours, theirs)
        if found is not None:
            mismatches.append(dict(prompt=prompt, **found))
    return mismatches


def print_mismatches(mismatches, failed, device_type, other="speculative"):
    """One line per mismatch (compare's), then, when they do not fail the run, that they are near-ties."""
    for m in mismatches:
        gap = "n/a (different lengths)" if m["gap"] is None else f"{m['gap']:.3g}"
        print(
            f"  {m['prompt']!r}: first difference at new token {m['position']} (greedy {m['greedy_token']}, "
            f"{other} {m['speculative_token']}), logit gap {gap}: {'a near-tie' if m['near_tie'] else 'NOT a near-tie'}"
        )
    if mismatches and not failed:
        print(
            f"  {sum(m['near_tie'] for m in mismatches)} near-tie flip(s) on {device_type}: float32 logits computed "
            "with other shapes; not a failure there"
        )


def save_plot(path, curves, draft_curve):
    """Loss curves to path: each run's per-step loss faint and its centered moving average bold, in its own color
    and line style, so that curves which nearly coincide both stay visible. False (and no file) without
    matplotlib."""
    try:  # optional (the `demo` extra), and heavy: imported only when a plot is drawn
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    styles = [("tab:blue", "-"), ("tab:orange", "--"), ("tab:purple", ":"), ("tab:red", "-.")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    window = smoothing_window(max(map(len, curves.values())))
    for (name, values), (color, linestyle) in zip(curves.items(), styles):
        axes[0].plot(values, color=color, linewidth=0.8, alpha=0.3)
        axes[0].plot(
            moving_average(values, window),
            color=color,
            linestyle=linestyle,
            linewidth=2,
            label=f"{name} (mean of {window} steps)",
        )
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("next-byte cross entropy")
    axes[0].set_title(
        f"LM training: AdamW8bit vs torch AdamW\nfaint: every step; bold: centered moving average over {window} steps",
        fontsize=10,
    )
    axes[0].legend()
    draft_window = smoothing_window(len(draft_curve))
    axes[1].plot(draft_curve, color="tab:green", linewidth=0.8, alpha=0.3)
    axes[1].plot(
        moving_average(draft_curve, draft_window),
        color="tab:green",
        linewidth=2,
        label=f"draft heads (mean of {draft_window} steps)",
    )
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("weighted draft-head loss")
    axes[1].set_title(
        f"draft heads (base frozen)\nfaint: every step; bold: centered moving average over {draft_window} steps",
        fontsize=10,
    )
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run(args):
    check_arguments(args)
    if args.model is not None:
        from .demo_hf import run_hf

        return run_hf(args)
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
    config = KestrelConfig(
        vocab_size=256,
        d_model=settings["d_model"],
        n_layers=settings["n_layers"],
        n_heads=settings["n_heads"],
        n_kv_heads=settings["n_kv_heads"],
        attention=args.attention,
        num_draft_heads=num_heads,
        max_seq_len=max(settings["seq_len"], 1024),
    )
    base = KestrelLM(config).to(device)
    print(
        f"kestrel demo on {device}: a byte-level KestrelLM ({base.num_parameters(False) / 1e6:.2f}M parameters, "
        f"{config.attention} attention, {config.n_layers} layers, d_model {config.d_model}) on "
        f"{len(corpus) / 1e6:.1f} MB of the Python standard library"
    )

    models, curves, state_bytes = {}, {}, {}
    makers = {
        "adamw8bit": lambda params: AdamW8bit(params, lr=settings["lr"], weight_decay=0.01),
        "adamw": lambda params: torch.optim.AdamW(params, lr=settings["lr"], weight_decay=0.01),
    }
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
    window = min(FINAL_WINDOW, settings["steps"])
    final = f"final train loss (mean of the last {window} steps)"
    width = len(final)
    print(f"{'':{width}} {'AdamW8bit':>12} {'torch AdamW':>12}")
    print(f"{final:{width}} {smoothed(curves['adamw8bit']):12.3f} {smoothed(curves['adamw']):12.3f}")
    print(f"{'held-out loss':{width}} {val['adamw8bit']:12.3f} {val['adamw']:12.3f}")
    kib = {name: f"{count / 1024:8.1f} KiB" for name, count in state_bytes.items()}
    print(
        f"{'optimizer state':{width}} {kib['adamw8bit']} {kib['adamw']}"
        f"  ({state_bytes['adamw'] / max(state_bytes['adamw8bit'], 1):.1f}x smaller)"
    )

    model = models["adamw8bit"].train()
    head_params = freeze_base(model)
    head_optimizer = AdamW8bit(head_params, lr=settings["lr"], weight_decay=0.0)
    draft_settings = dict(settings, steps=settings["draft_steps"])
    draft_curve = train(
        model,
        head_optimizer,
        train_bytes,
        draft_settings,
        args.seed + 3,
        "train (draft heads)",
        lambda m, tokens: draft_loss(m, tokens)[0],
    )
    model.eval()
    with torch.no_grad():
        head_losses = draft_loss(model, windows)[1]
    print("draft heads' held-out loss per head: " + ", ".join(f"{loss:.3f}" for loss in head_losses))

    prompts = args.prompt or PROMPTS[: settings["prompts"]]
    encoded = [torch.tensor([list(p.encode())], dtype=torch.int64, device=device) for p in prompts]
    spec = TreeSpec(choices=DEFAULT_CHOICES)
    greedy, greedy_tps, _ = time_generation(model, encoded, settings["new_tokens"], None, "greedy")
    speculative, spec_tps, mean_accepted = time_generation(
        model, encoded, settings["new_tokens"], spec, "tree speculative"
    )
    identical = greedy == speculative
    mismatches = compare(model, prompts, encoded, greedy, speculative)
    near_ties = sum(m["near_tie"] for m in mismatches)
    failed = greedy_failed(mismatches, device.type)
    for prompt, tokens in zip(prompts, greedy):
        print(f"--- greedy: {prompt!r} -> {show_text(tokens)}")
    sampled_ids, sampled_stats = generate(
        model,
        encoded[-1],
        settings["new_tokens"],
        temperature=0.8,
        top_p=0.95,
        speculative=spec,
        generator=torch.Generator(device).manual_seed(args.seed),
        return_stats=True,
    )
    sampled_tokens = sampled_ids[0, encoded[-1].shape[1] :].tolist()
    sampled = decode_text(sampled_tokens)
    print(
        f"--- sampled (temperature 0.8, top-p 0.95, speculative, mean accepted length "
        f"{sampled_stats.mean_accepted_length:.2f}): {prompts[-1]!r} -> {show_text(sampled_tokens)}"
    )
    print(f"greedy == speculative (token for token, {len(prompts)} prompts): {identical}")
    print_mismatches(mismatches, failed, device.type)
    print(
        f"mean accepted length {mean_accepted:.2f} tokens/step (tree of {spec.num_nodes()} nodes); "
        f"{greedy_tps:.1f} tokens/s greedy, {spec_tps:.1f} tokens/s speculative: {spec_tps / greedy_tps:.2f}x"
    )

    plot_path = out / "loss_curves.png"
    plotted = save_plot(plot_path, {"AdamW8bit": curves["adamw8bit"], "torch AdamW": curves["adamw"]}, draft_curve)
    print(
        f"wrote {plot_path}"
        if plotted
        else "skipped the plot: matplotlib is not installed (pip install 'kestrel[demo]')"
    )
    summary = dict(
        device=str(device),
        settings=settings,
        config=config.to_dict(),
        parameters=model.num_parameters(False),
        final_loss_adamw8bit=smoothed(curves["adamw8bit"]),
        final_loss_adamw=smoothed(curves["adamw"]),
        final_loss_window=window,
        final_loss_definition=f"final_loss_*: the mean training loss of the last {window} steps of each run "
        "(every step's loss: loss_curve_*)",
        val_loss_adamw8bit=val["adamw8bit"],
        val_loss_adamw=val["adamw"],
        optimizer_state_bytes_adamw8bit=state_bytes["adamw8bit"],
        optimizer_state_bytes_adamw=state_bytes["adamw"],
        loss_curve_adamw8bit=curves["adamw8bit"],
        loss_curve_adamw=curves["adamw"],
        draft_loss_curve=draft_curve,
        draft_head_val_losses=head_losses,
        tree_nodes=spec.num_nodes(),
        greedy_equals_speculative=identical,
        greedy_mismatches=mismatches,
        greedy_mismatch_near_ties=near_ties,
        mean_accepted_length=mean_accepted,
        tokens_per_s_greedy=greedy_tps,
        tokens_per_s_speculative=spec_tps,
        speedup=spec_tps / greedy_tps,
        samples={p: decode_text(t) for p, t in zip(prompts, greedy)},
        sample_speculative_t0_8=sampled,
        plot=str(plot_path) if plotted else None,
        seconds=time.perf_counter() - began,
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} ({summary['seconds']:.0f} s in all)")
    return 1 if failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m kestrel demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DemoArgumentError as error:
        parser.error(str(error))


if __name__ == "__main__":
    sys.exit(main())
