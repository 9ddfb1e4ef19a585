"""`python -m kestrel demo --quick`: the end-to-end smoke run CI executes (training with AdamW8bit and AdamW, draft
heads, greedy vs tree speculative generation, summary.json and the plot)."""

import json
import subprocess
import sys

import pytest
import torch

SUMMARY_KEYS = ["final_loss_adamw8bit", "final_loss_adamw", "optimizer_state_bytes_adamw8bit",
                "optimizer_state_bytes_adamw", "greedy_equals_speculative", "mean_accepted_length",
                "tokens_per_s_greedy", "tokens_per_s_speculative"]


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "kestrel", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
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
    assert "greedy == speculative" in result.stdout
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
