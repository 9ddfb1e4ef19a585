"""The demo's settings and command-line arguments, apart from kestrel.demo so that `python -m kestrel --help` and
`python -m kestrel demo --help` build their parsers without importing torch (kestrel.demo re-exports both)."""

SETTINGS = {
    # name: model, data and schedule
    "quick": dict(
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        seq_len=64,
        batch_size=8,
        steps=30,
        draft_steps=30,
        corpus_bytes=300_000,
        new_tokens=32,
        prompts=2,
        lr=3e-3,
    ),
    # the quick run on CUDA: head dim 64, which the softplus attention kernel needs (it takes 64 and 128)
    "quick_cuda": dict(
        d_model=128,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        seq_len=64,
        batch_size=8,
        steps=30,
        draft_steps=30,
        corpus_bytes=300_000,
        new_tokens=32,
        prompts=2,
        lr=3e-3,
    ),
    "cpu": dict(
        d_model=128,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        seq_len=128,
        batch_size=8,
        steps=400,
        draft_steps=200,
        corpus_bytes=4_000_000,
        new_tokens=96,
        prompts=4,
        lr=3e-3,
    ),
    "cuda": dict(
        d_model=512,
        n_layers=8,
        n_heads=8,
        n_kv_heads=4,
        seq_len=256,
        batch_size=32,
        steps=1500,
        draft_steps=600,
        corpus_bytes=20_000_000,
        new_tokens=256,
        prompts=6,
        lr=1e-3,
    ),
}

# `--model PATH`: a converted Hugging Face checkpoint; only its draft heads are trained (on the standard library
# tokenised by the checkpoint's tokenizer), then transformers' greedy generate, kestrel's and kestrel's tree
# speculative decoding are run on the same prompts
HF_SETTINGS = {
    "quick": dict(seq_len=32, batch_size=4, draft_steps=10, corpus_bytes=200_000, new_tokens=16, prompts=2, lr=3e-3),
    "cpu": dict(seq_len=128, batch_size=4, draft_steps=100, corpus_bytes=1_000_000, new_tokens=48, prompts=3, lr=3e-3),
    "cuda": dict(
        seq_len=256, batch_size=8, draft_steps=400, corpus_bytes=4_000_000, new_tokens=128, prompts=4, lr=1e-3
    ),
}

ATTENTION_CHOICES = ["softmax", "lssa", "lssar", "plga"]


class DemoArgumentError(ValueError):
    """Arguments the demo cannot run with: `python -m kestrel demo` prints the message and exits with status 2."""


def check_arguments(args):
    """Refuse combinations that would be silently ignored: --dtype without --model; with --model, the byte-level
    model's own settings (--attention, --steps)."""
    if args.model is None:
        if args.dtype is not None:
            raise DemoArgumentError("kestrel demo: --dtype applies to --model only (the byte-level model is float32)")
        return
    if args.attention != "softmax":
        raise DemoArgumentError(
            f"kestrel demo: --attention {args.attention} applies to the byte-level model only; a converted --model "
            "checkpoint uses softmax attention"
        )
    if args.steps is not None:
        raise DemoArgumentError(
            "kestrel demo: --steps trains the byte-level model; with --model the checkpoint is not trained, only "
            "its draft heads (--draft-steps)"
        )


DTYPE_CHOICES = ["float32", "bfloat16", "float16", "float64"]


def settings_for(quick, device_type, hf=False):
    """The SETTINGS entry for a run: quick (CPU or CUDA) or the full run of the device; HF_SETTINGS' with hf."""
    if hf:
        return dict(HF_SETTINGS["quick" if quick else ("cuda" if device_type == "cuda" else "cpu")])
    if quick:
        return dict(SETTINGS["quick_cuda" if device_type == "cuda" else "quick"])
    return dict(SETTINGS["cuda" if device_type == "cuda" else "cpu"])


def _by_device(key):
    """'(default: 400 on the CPU, 1500 on CUDA, 30 with --quick)' for a SETTINGS key (and HF_SETTINGS' where it has
    the key)."""
    quick = sorted({SETTINGS["quick"][key], SETTINGS["quick_cuda"][key]})
    text = (
        f"(default: {SETTINGS['cpu'][key]} on the CPU, {SETTINGS['cuda'][key]} on CUDA, "
        f"{' or '.join(map(str, quick))} with --quick"
    )
    if key in HF_SETTINGS["cpu"]:
        hf = HF_SETTINGS
        text += f"; with --model {hf['cpu'][key]}, {hf['cuda'][key]}, {hf['quick'][key]}"
    return text + ")"


def add_arguments(parser):
    """The demo's arguments, each with its help and its default."""
    parser.add_argument(
        "--out",
        default="kestrel-demo",
        metavar="DIR",
        help="output folder for summary.json and loss_curves.png (default: ./%(default)s)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N; auto takes cuda if present, else cpu (default: %(default)s)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run of a few seconds: d_model {SETTINGS['quick']['d_model']}, "
        f"{SETTINGS['quick']['steps']} steps (default: off, the full run of the device)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a local Hugging Face checkpoint directory (Llama, Mistral, Qwen2, Qwen3: config.json, safetensors "
        "weights and its tokenizer; nothing is downloaded; needs the hf extra): converted with KestrelLM.from_hf, "
        "its draft heads trained on the standard library tokenised by its tokenizer (the base frozen), then "
        "transformers' greedy generate, kestrel's greedy and kestrel's tree speculative decoding on the same "
        "prompts (EOS ignored: every run makes --new-tokens tokens) (default: none, the byte-level demo)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a prompt for --model, repeat for more (default: the first few of the demo's Python snippets)",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        help="the dtype --model runs in (default: float32; greedy identity is exact only in float64)",
    )
    parser.add_argument(
        "--attention", default="softmax", choices=ATTENTION_CHOICES, help="the model's attention (default: %(default)s)"
    )
    parser.add_argument("--steps", type=int, metavar="N", help=f"LM training steps per optimizer {_by_device('steps')}")
    parser.add_argument(
        "--draft-steps",
        dest="draft_steps",
        type=int,
        metavar="N",
        help=f"draft-head training steps {_by_device('draft_steps')}",
    )
    parser.add_argument(
        "--new-tokens",
        dest="new_tokens",
        type=int,
        metavar="N",
        help=f"tokens (bytes; with --model the tokenizer's tokens) generated per prompt {_by_device('new_tokens')}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: 1 on the CPU for the byte-level model, whose matmuls are small (with 2 "
        "threads a step on a busy 2-core machine was 4-8x slower); torch's own choice on CUDA and with --model)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initialisation, the corpus' file order, the batches and the sampled "
        "continuation (default: %(default)s)",
    )
