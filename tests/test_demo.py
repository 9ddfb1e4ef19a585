"""`python -m kestrel demo --quick`: the end-to-end smoke run CI executes (training with AdamW8bit and AdamW, draft
heads, greedy vs tree speculative generation, summary.json and the plot)."""

import io
import json
import subprocess
import sys

import pytest
import torch

SUMMARY_KEYS = [
    "final_loss_adamw8bit",
    "final_loss_adamw",
    "optimizer_state_bytes_adamw8bit",
    "optimizer_state_bytes_adamw",
    "greedy_equals_speculative",
    "mean_accepted_length",
    "tokens_per_s_greedy",
    "tokens_per_s_speculative",
]


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "kestrel", "demo", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["greedy_equals_speculative"] is True
    assert summary["mean_accepted_length"] >= 1.0
    assert summary["tokens_per_s_greedy"] > 0 and summary["tokens_per_s_speculative"] > 0
    # 8-bit state: about a quarter of AdamW's two float32 states (small tensors keep 32-bit state)
    assert summary["optimizer_state_bytes_adamw8bit"] < 0.5 * summary["optimizer_state_bytes_adamw"]
    for key in ("final_loss_adamw8bit", "final_loss_adamw"):
        assert summary[key] < 5.0  # below the 5.55 nats of a uniform byte
    assert len(summary["loss_curve_adamw8bit"]) == len(summary["loss_curve_adamw"]) == summary["settings"]["steps"]
    assert summary["final_loss_window"] == 10 and "last 10 steps" in summary["final_loss_definition"]
    assert summary["final_loss_adamw"] == pytest.approx(sum(summary["loss_curve_adamw"][-10:]) / 10)
    assert "final train loss (mean of the last 10 steps)" in result.stdout
    assert "greedy == speculative" in result.stdout
    greedy = [line for line in result.stdout.splitlines() if line.startswith("--- greedy: ")]
    assert len(greedy) == summary["settings"]["prompts"]
    for line in greedy:  # each continuation on its line, as a string literal: whitespace-only text stays visible
        literal = line.split(" bytes", 1)[1].split(": ", 1)[1]
        assert literal[0] in "'\"" and literal[-1] == literal[0], line
    assert "\r" not in result.stderr  # progress off a terminal: plain lines, no redraws
    assert result.stderr.count("train (adamw8bit): ") <= 11 and "train (adamw8bit): 30/30" in result.stderr
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "skipped the plot" in result.stdout
    else:
        assert (out / "loss_curves.png").stat().st_size > 1000


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    from kestrel import demo

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert demo.save_plot(tmp_path / "plot.png", {"a": [3.0, 2.0]}, [1.0, 0.5]) is False
    assert not (tmp_path / "plot.png").exists()


def test_stdlib_corpus_and_batches():
    from kestrel import demo

    corpus = demo.stdlib_corpus(50_000)
    assert corpus.dtype == torch.int64 and len(corpus) == 50_000 and int(corpus.max()) < 256
    assert torch.equal(demo.stdlib_corpus(50_000), corpus)  # the same files in the same order every time
    first = list(demo.batches(corpus, 4, 32, 3, seed=5))
    again = list(demo.batches(corpus, 4, 32, 3, seed=5))
    assert all(a.shape == (4, 33) and torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("steps", [10])
def test_cosine_schedule(steps):
    from kestrel.demo import cosine_lr

    values = [cosine_lr(step, steps, 1.0, 2) for step in range(steps)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[-1] < values[2] and min(values) >= 0.1


def test_quick_settings_on_cuda_have_the_softplus_kernel_head_dim():
    from kestrel.demo import check_head_dim, settings_for

    for attention in ("softmax", "lssa", "lssar", "plga"):
        for quick in (True, False):
            for device_type in ("cpu", "cuda"):
                settings = settings_for(quick, device_type)
                check_head_dim(attention, settings["d_model"] // settings["n_heads"], device_type)
    assert settings_for(True, "cuda")["d_model"] // settings_for(True, "cuda")["n_heads"] == 64
    assert settings_for(True, "cpu") == demo_settings("quick")
    with pytest.raises(
        ValueError,
        match=r"--attention lssa on CUDA needs a head dim in \(64, 128\).*got d_model / "
        r"n_heads = 16",
    ):
        check_head_dim("lssa", 16, "cuda")
    check_head_dim("lssa", 16, "cpu")  # the CPU path takes any head dim


def demo_settings(name):
    from kestrel.demo import SETTINGS

    return SETTINGS[name]


def test_first_mismatch_and_near_ties():
    """The first differing position, the logit gap between the two tokens there, and the near-tie verdict (an exact
    tie: two LM-head rows made equal); the exit rule: strict on the CPU, near-ties tolerated on CUDA."""
    from kestrel.demo import first_mismatch, greedy_failed
    from kestrel.models import KestrelConfig, KestrelLM

    torch.manual_seed(0)
    model = KestrelLM(KestrelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, tie_embeddings=False)).double()
    model.eval()
    prompt, greedy = [3, 4, 5], [6, 7, 8, 9]
    assert first_mismatch(model, prompt, greedy, list(greedy)) is None
    with torch.no_grad():
        logits = model(torch.tensor([prompt + greedy[:2]]))[0, -1]
    found = first_mismatch(model, prompt, greedy, [6, 7, 1, 2])
    assert found["position"] == 2 and (found["greedy_token"], found["speculative_token"]) == (8, 1)
    assert found["gap"] == pytest.approx(abs(float(logits[8] - logits[1])), rel=1e-9)
    model.lm_head.weight.data.mul_(100)  # clearly separated logits: not a near-tie
    assert first_mismatch(model, prompt, greedy, [6, 7, 1, 2])["near_tie"] is False
    model.lm_head.weight.data[1] = model.lm_head.weight.data[8]  # tokens 8 and 1 tie exactly
    tie = first_mismatch(model, prompt, greedy, [6, 7, 1, 2])
    assert tie["near_tie"] is True and tie["gap"] == 0.0
    assert first_mismatch(model, prompt, greedy, greedy[:3])["near_tie"] is False  # stopped early
    assert greedy_failed([tie], "cpu") and not greedy_failed([tie], "cuda")
    assert greedy_failed([tie, dict(near_tie=False)], "cuda") and not greedy_failed([], "cpu")


def test_show_text_makes_whitespace_and_unprintable_bytes_visible():
    from kestrel.demo import show_text

    assert show_text(list(b"    ")) == "4 bytes, whitespace only: '    '"
    assert show_text(list(b"\n\n  ")) == "4 bytes, whitespace only: '\\n\\n  '"
    assert show_text(list(b"a\tb\x07")) == "4 bytes: 'a\\tb\\x07'"
    assert show_text(list(b"ok\xff")) == "3 bytes: 'ok\ufffd'"  # not UTF-8: the replacement character
    assert show_text([]) == "0 bytes: ''"


def test_moving_average_is_centered_and_smooths():
    from kestrel.demo import moving_average, smoothing_window

    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 3) == pytest.approx([1.5, 2.0, 3.0, 4.0, 4.5])
    falling = [10.0 - i for i in range(20)]
    assert moving_average(falling, 5)[2:-2] == pytest.approx(falling[2:-2])  # no lag on a straight line
    noisy = [1.0 + (-1) ** i for i in range(50)]
    smooth = moving_average(noisy, 9)
    assert len(smooth) == 50 and max(smooth) - min(smooth) < 0.25 * (max(noisy) - min(noisy))
    assert [smoothing_window(n) for n in (30, 200, 400, 1500)] == [3, 9, 17, 61]


def test_save_plot_draws_both_runs_raw_and_smoothed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from kestrel import demo

    drawn = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: drawn.append(k) or original(self, *a, **k))
    curves = {"AdamW8bit": [3.0, 2.5, 2.0, 1.9], "torch AdamW": [3.0, 2.5, 2.0, 1.9]}  # coinciding curves
    assert demo.save_plot(tmp_path / "plot.png", curves, [1.0, 0.5]) is True
    assert (tmp_path / "plot.png").stat().st_size > 1000
    bold = [k for k in drawn if k.get("linewidth", 1) >= 2 and "draft" not in k.get("label", "")]
    assert [k["label"] for k in bold] == ["AdamW8bit (mean of 3 steps)", "torch AdamW (mean of 3 steps)"]
    assert len({(k["color"], k["linestyle"]) for k in bold}) == 2  # distinct color and line style
    assert sum(k.get("alpha", 1) < 1 for k in drawn) == 3  # each raw curve faint beneath


class FakeStream(io.StringIO):
    def __init__(self, terminal):
        super().__init__()
        self.terminal = terminal

    def isatty(self):
        return self.terminal


def test_progress_off_a_terminal_prints_a_plain_line_every_tenth():
    from kestrel.demo import Progress

    stream = FakeStream(terminal=False)
    progress = Progress("train (x)", 400, stream=stream)
    for step in range(400):
        progress.update(note=f"loss {step}")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 10
    assert lines[0].startswith("train (x): 40/400, ") and lines[0].endswith("loss 39")
    assert lines[-1].startswith("train (x): 400/400, ")
    short = FakeStream(terminal=False)
    progress = Progress("greedy", 3, stream=short)
    for _ in range(3):
        progress.update()
    assert [line.split(",")[0] for line in short.getvalue().splitlines()] == [
        "greedy: 1/3",
        "greedy: 2/3",
        "greedy: 3/3",
    ]


def test_progress_on_a_terminal_uses_tqdm_when_installed(monkeypatch):
    from kestrel import demo

    made = []

    class FakeTqdm:
        def __init__(self, **kwargs):
            made.append(self)
            self.kwargs, self.n, self.postfix, self.closed = kwargs, 0, None, False

        def set_postfix_str(self, text, refresh=True):
            self.postfix = text

        def update(self, count):
            self.n += count

        def close(self):
            self.closed = True

    monkeypatch.setattr(demo, "tqdm", FakeTqdm)
    stream = FakeStream(terminal=True)
    progress = demo.Progress("train (x)", 5, stream=stream)
    for step in range(5):
        progress.update(note=f"loss {step}")
    assert len(made) == 1 and made[0].kwargs == dict(total=5, desc="train (x)", file=stream)
    assert made[0].n == 5 and made[0].postfix == "loss 4" and made[0].closed and stream.getvalue() == ""
    demo.Progress("off a terminal", 5, stream=FakeStream(terminal=False)).update()
    assert len(made) == 1  # no bar off a terminal
    monkeypatch.setattr(demo, "tqdm", None)  # tqdm not installed: plain lines on a terminal too
    plain = FakeStream(terminal=True)
    demo.Progress("x", 1, stream=plain).update()
    assert plain.getvalue().startswith("x: 1/1, ")


def test_progress_with_the_real_tqdm():
    pytest.importorskip("tqdm")
    from kestrel.demo import Progress

    stream = FakeStream(terminal=True)
    progress = Progress("train (x)", 20, stream=stream)
    for step in range(20):
        progress.update(note=f"loss {step}")
    assert "train (x)" in stream.getvalue() and "20/20" in stream.getvalue() and "loss 19" in stream.getvalue()


def write_checkpoint(path, train_steps=60):
    """A local Hugging Face checkpoint as `save_pretrained` writes one, built here without a download: a byte-level
    BPE tokenizer (320 tokens, trained on three standard-library files) and a tiny LlamaForCausalLM trained for
    train_steps steps on those files (kestrel's AdamW8bit), so that its draft heads have something to predict."""
    import sysconfig
    from pathlib import Path

    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from kestrel.optim import AdamW8bit

    texts = [
        Path(sysconfig.get_paths()["stdlib"], name).read_text() for name in ("os.py", "functools.py", "argparse.py")
    ]
    byte_level = tokenizers.pre_tokenizers.ByteLevel
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = byte_level(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    tokenizer.train_from_iterator(
        texts,
        tokenizers.trainers.BpeTrainer(
            vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=byte_level.alphabet()
        ),
    )
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tokens = torch.tensor(sum((fast(text, add_special_tokens=False)["input_ids"] for text in texts), []))
    optimizer = AdamW8bit(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)
    for _ in range(train_steps):
        starts = torch.randint(0, len(tokens) - 65, (16,), generator=generator)
        batch = torch.stack([tokens[s : s + 65] for s in starts.tolist()])
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(path)
    return path


def test_demo_on_a_local_checkpoint(tmp_path):
    """`python -m kestrel demo --model PATH --quick`: a checkpoint written by this test, converted; its draft heads
    trained; kestrel greedy == tree speculative == transformers' greedy generate on the --prompt prompts, with
    tokens/s and the accepted length reported for each. In float64 too (no near-tie can flip a token there)."""
    model_dir = write_checkpoint(tmp_path / "llama")
    prompts = ["def __init__(self, ", "import os\n"]
    for dtype in ("float32", "float64"):
        out = tmp_path / f"demo-{dtype}"
        command = [sys.executable, "-m", "kestrel", "demo", "--model", str(model_dir), "--quick", "--out", str(out)]
        command += ["--dtype", dtype, "--draft-steps", "20", "--new-tokens", "24"]
        for prompt in prompts:
            command += ["--prompt", prompt]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["architecture"] == "LlamaForCausalLM" and summary["dtype"] == dtype
        assert summary["prompts"] == prompts and len(summary["draft_loss_curve"]) == 20
        assert summary["draft_loss_curve"][-1] < summary["draft_loss_curve"][0]
        assert summary["greedy_equals_speculative"] is True and summary["greedy_equals_transformers"] is True
        assert summary["mean_accepted_length"] > 1.0  # the heads learned the trained model's continuations
        for key in ("tokens_per_s_transformers", "tokens_per_s_greedy", "tokens_per_s_speculative"):
            assert summary[key] > 0
        for line in ("kestrel greedy == transformers greedy generate: True", "transformers generate", "accepted/step"):
            assert line in result.stdout
        assert "Loading weights" not in result.stderr  # transformers' progress bars are off in the demo


def test_demo_argument_errors(tmp_path, capsys):
    """Refused before any work, exit status 2, naming the argument: a --model that is no checkpoint, a byte-level
    option with --model, --dtype without --model."""
    cases = [
        (["--model", str(tmp_path / "missing")], "is not a local checkpoint directory (no config.json)"),
        (["--model", str(tmp_path), "--attention", "lssa"], "--attention lssa applies to the byte-level model only"),
        (["--model", str(tmp_path), "--steps", "3"], "--steps trains the byte-level model"),
        (["--dtype", "float64"], "--dtype applies to --model only"),
    ]
    from kestrel.__main__ import main

    for extra, message in cases:
        assert main(["demo", "--out", str(tmp_path / "out"), *extra]) == 2
        assert message in capsys.readouterr().err, extra
        assert not (tmp_path / "out").exists()
