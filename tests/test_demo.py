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


def test_quick_settings_on_cuda_have_the_softplus_kernel_head_dim():
    from kestrel.demo import check_head_dim, settings_for

    for attention in ("softmax", "lssa", "lssar", "plga"):
        for quick in (True, False):
            for device_type in ("cpu", "cuda"):
                settings = settings_for(quick, device_type)
                check_head_dim(attention, settings["d_model"] // settings["n_heads"], device_type)
    assert settings_for(True, "cuda")["d_model"] // settings_for(True, "cuda")["n_heads"] == 64
    assert settings_for(True, "cpu") == demo_settings("quick")
    with pytest.raises(ValueError, match=r"--attention lssa on CUDA needs a head dim in \(64, 128\).*got d_model / "
                                         r"n_heads = 16"):
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
