"""Import behaviour without the extension, the Triton interpreter switch, and the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import uses_gpu

ROOT = Path(__file__).resolve().parents[1]

BLOCK_EXTENSION = """
import sys, warnings
class BlockExtension:
    def find_spec(self, name, path=None, target=None):
        if name == "kestrel._C":
            raise ImportError("simulated: kestrel._C not built")
        return None
sys.meta_path.insert(0, BlockExtension())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import kestrel
    import kestrel.functional, kestrel.ops
    import importlib; importlib.import_module("kestrel.ops.quantize")
relevant = [w for w in caught if "kestrel._C" in str(w.message)]
print("WARNINGS", len(relevant))
print("MESSAGE", relevant[0].message)
import torch
try:
    kestrel.functional.quantize_blockwise(torch.randn(10))
except kestrel._ext.ExtensionMissing as error:
    print("ERROR", error)
"""


def test_import_without_extension_warns_once_and_ops_raise():
    result = subprocess.run([sys.executable, "-c", BLOCK_EXTENSION], capture_output=True, text=True, check=True)
    assert "WARNINGS 1" in result.stdout
    assert "simulated: kestrel._C not built" in result.stdout
    error = next(line for line in result.stdout.splitlines() if line.startswith("ERROR"))
    assert "kestrel.quantize_blockwise needs the native extension kestrel._C" in error
    assert "pip install --no-build-isolation -e ." in error


def test_cuda_input_without_cuda_build_raises_clearly(monkeypatch):
    import kestrel

    if not kestrel._ext.available():
        pytest.skip("kestrel._C is not built")
    monkeypatch.setattr(kestrel._ext, "build_info", lambda: {"cuda": False})
    monkeypatch.setenv("KESTREL_CUDA_BACKEND", "native")  # the JIT path (kestrel._jit) would otherwise take it
    with pytest.raises(kestrel._ext.ExtensionMissing, match="built without its CUDA kernels"):
        kestrel._ext.require("quantize_blockwise", torch.device("cuda", 0))
    monkeypatch.setenv("KESTREL_CUDA_BACKEND", "auto")
    kestrel._ext.require("quantize_blockwise", torch.device("cuda", 0))
    with pytest.raises(NotImplementedError, match="no kernel for device meta"):
        kestrel._ext.require("quantize_blockwise", torch.device("meta"))


@pytest.mark.skipif(uses_gpu(), reason="the interpreter switch applies to CPU-only runs")
def test_triton_kernels_run_under_the_interpreter_on_cpu():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import triton
    import triton.language as tl

    @triton.jit
    def scaled_add(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        x = tl.load(x_ptr + offsets, mask=mask)
        y = tl.load(y_ptr + offsets, mask=mask)
        tl.store(out_ptr + offsets, x * alpha + y, mask=mask)

    x, y = torch.randn(100), torch.randn(100)
    out = torch.empty(100)
    scaled_add[(triton.cdiv(100, 32),)](x, y, out, 100, 3.0, BLOCK=32)
    torch.testing.assert_close(out, 3.0 * x + y)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kestrel", *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_info():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for field in ("kestrel", "torch", "triton", "CUDA", "extension kestrel._C", "device"):
        assert field in result.stdout
    assert torch.__version__ in result.stdout


def test_cli_help_lists_only_real_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "info" in result.stdout and "bench" in result.stdout
    assert run_cli("no-such-command").returncode != 0


def test_softplus_attention_benchmark_runs_quick_on_cpu():
    from kestrel.benchmarks import bench_softplus_attention

    rows = bench_softplus_attention.run("cpu", quick=True)
    assert {r.op for r in rows} == {"LSSA forward", "LSSAR forward (p=15)", "LSSA forward+backward"}
    assert all(r.ours_ms > 0 and r.baseline_ms > 0 for r in rows)


def test_plga_attention_benchmark_runs_quick_on_cpu():
    from kestrel.benchmarks import bench_plga_attention

    rows = bench_plga_attention.run("cpu", quick=True)
    assert {r.op for r in rows} == {"PLGA forward", "PLGA forward+backward"}


def test_vq_topk_benchmark_runs_quick_on_cpu():
    from kestrel.benchmarks import bench_vq_topk

    rows = bench_vq_topk.run("cpu", quick=True)
    assert [r.op for r in rows] == ["vq_topk (ip)"]


def test_kv_bottleneck_benchmark_runs_quick_on_cpu():
    from kestrel.benchmarks import bench_kv_bottleneck

    rows = bench_kv_bottleneck.run("cpu", quick=True)
    assert [(r.op, r.baseline) for r in rows] == [("kv_bottleneck_lookup", "bmm + topk + gather")]
    # the baseline computes the same lookup
    g = torch.Generator().manual_seed(0)
    z, keys, values = (
        torch.randn(5, 3, 14, generator=g),
        torch.randn(3, 40, 14, generator=g),
        torch.randn(3, 40, 10, generator=g),
    )
    from kestrel.ops import kv_bottleneck_lookup

    out, ids = kv_bottleneck_lookup(z, keys, values, 1)
    base_out, base_ids = bench_kv_bottleneck.unfused(z, keys, values, 1)
    assert torch.equal(ids, base_ids)
    torch.testing.assert_close(out, base_out)


def test_bench_prints_one_table(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kestrel",
            "bench",
            "--only",
            "tree_verify",
            "kv_bottleneck",
            "--quick",
            "--csv",
            str(tmp_path / "rows.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("kestrel ms") == 1  # one header: one table
    assert "verify_tree_greedy" in result.stdout and "kv_bottleneck_lookup" in result.stdout
    assert (tmp_path / "rows.csv").read_text().count("\n") >= 3


LAZY_IMPORT = """
import sys
import kestrel
assert "torch" not in sys.modules and "kestrel.optim" not in sys.modules, sorted(sys.modules)
print("VERSION", kestrel.__version__)
from kestrel import optim
assert optim is kestrel.optim and "kestrel._C" in sys.modules  # the optimizers load the extension
for name in ("nn", "ops", "functional", "models", "decoding", "reference", "_ext"):
    assert getattr(kestrel, name) is sys.modules["kestrel." + name]
assert {"optim", "nn", "ops", "functional", "models", "decoding"} <= set(dir(kestrel))
try:
    kestrel.no_such_thing
except AttributeError as error:
    print("ATTRIBUTE", error)
"""


def test_import_kestrel_is_lazy():
    """`import kestrel` imports no subpackage and not torch; each subpackage comes on first access (PEP 562)."""
    result = subprocess.run([sys.executable, "-c", LAZY_IMPORT], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "VERSION " in result.stdout and "has no attribute 'no_such_thing'" in result.stdout


@pytest.mark.parametrize(
    "module", ["kestrel.ops", "kestrel.functional", "kestrel.optim", "kestrel.nn", "kestrel.models", "kestrel.decoding"]
)
def test_each_public_subpackage_registers_the_native_ops(module):
    """Any public subpackage imported alone leaves torch.ops.kestrel.* registered (when kestrel._C is built)."""
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); import kestrel, torch; "
        "print(kestrel._ext.available() and hasattr(torch.ops.kestrel, 'quantize_blockwise'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import kestrel

    assert result.stdout.strip() == str(kestrel._ext.available())


HELP_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["kestrel", *sys.argv[1:]]
try:
    runpy.run_module("kestrel", run_name="__main__", alter_sys=True)
except SystemExit as stop:
    assert stop.code == 0, stop.code
heavy = sorted(name for name in sys.modules if name == "torch" or name.startswith(("kestrel.ops", "kestrel.demo")))
print("HEAVY", heavy)
"""


@pytest.mark.parametrize("command", [[], ["info"], ["bench"], ["demo"]])
def test_help_imports_no_torch(command):
    """`python -m kestrel [command] --help` builds its parsers without importing torch: it answers at once."""
    result = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_TORCH, *command, "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert "usage: python -m kestrel" in result.stdout


def test_every_cli_argument_has_help_and_a_default():
    from kestrel.__main__ import build_parser

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command")
    assert set(commands.choices) == {"info", "bench", "demo"}
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, (name, action.dest)
            assert "(default: " in action.help, (name, action.dest, action.help)


def test_print_table_marks_and_explains_rows_above_the_roof(capsys):
    from kestrel.benchmarks import harness

    def row(pct):
        return harness.Row("op", "case", 1.0, "base", 2.0, 2.0, 10.0, pct, "cpu")

    harness.print_table([row(40.0), row(250.0)])
    out = capsys.readouterr().out
    assert "250.0*" in out and "40.0 " in out and "40.0*" not in out
    assert out.rstrip().endswith(harness.ROOF_NOTE) and "DRAM" in harness.ROOF_NOTE
    harness.print_table([row(99.0)])
    out = capsys.readouterr().out
    assert "*" not in out and "DRAM" not in out


def test_bench_says_when_the_bitsandbytes_baseline_is_missing(monkeypatch, capsys):
    from kestrel.__main__ import main
    from kestrel.benchmarks import harness

    assert harness.missing_baselines(["tree_verify", "kv_bottleneck"], "cpu") == []
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes (and bitsandbytes.*) raises
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    notes = [n for n in harness.missing_baselines(["quantize", "tree_verify", "optim"], "cpu") if "bitsandbytes" in n]
    assert len(notes) == 1 and "bitsandbytes baseline is missing from quantize, optim" in notes[0]
    assert "pip install" in notes[0]
    assert main(["bench", "--only", "quantize", "--quick"]) == 0
    captured = capsys.readouterr()
    table, _, after = captured.out.partition("kestrel ms")
    assert "quantize_blockwise" in after and "bitsandbytes" not in after.split("note:")[0]  # no bnb rows
    note = harness.missing_baselines(["quantize"], "cpu")[0]
    assert note in after and note in captured.err  # under the table, and at the start with the progress
