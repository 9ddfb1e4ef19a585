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

ATTENTION_CHOICES = ["softmax", "lssa", "lssar", "plga"]


def settings_for(quick, device_type):
    """The SETTINGS entry for a run: quick (CPU or CUDA) or the full run of the device."""
    if quick:
        return dict(SETTINGS["quick_cuda" if device_type == "cuda" else "quick"])
    return dict(SETTINGS["cuda" if device_type == "cuda" else "cpu"])


def _by_device(key):
    """'(default: 400 on the CPU, 1500 on CUDA, 30 with --quick)' for a SETTINGS key."""
    quick = sorted({SETTINGS["quick"][key], SETTINGS["quick_cuda"][key]})
    return (
        f"(default: {SETTINGS['cpu'][key]} on the CPU, {SETTINGS['cuda'][key]} on CUDA, "
        f"{' or '.join(map(str, quick))} with --quick)"
    )


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
        help=f"tokens (bytes) generated per prompt {_by_device('new_tokens')}",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: 1 on the CPU, torch's own choice on CUDA: this model's "
        "matmuls are small, and with 2 threads a step on a busy 2-core machine was 4-8x slower)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the initialisation, the corpus' file order, the batches and the sampled "
        "continuation (default: %(default)s)",
    )
