"""kestrel's command line: `python -m kestrel info`, `python -m kestrel bench` and `python -m kestrel demo`."""

# torch, and kestrel's modules that import it, are imported inside each cmd_* (when a command runs), not here: the
# parsers are built first, so that `--help` and a mistyped command answer at once instead of after torch's import.
import argparse
import importlib
import platform
import sys

from . import __version__
from ._demo_cli import add_arguments as add_demo_arguments

# Benchmark modules by name; each has run(device, quick) -> list of harness rows.
BENCHMARKS = {
    "quantize": "kestrel.benchmarks.bench_quantize",
    "optim": "kestrel.benchmarks.bench_optim",
    "softplus_attention": "kestrel.benchmarks.bench_softplus_attention",
    "plga_attention": "kestrel.benchmarks.bench_plga_attention",
    "vq_topk": "kestrel.benchmarks.bench_vq_topk",
    "kv_bottleneck": "kestrel.benchmarks.bench_kv_bottleneck",
    "tree_attention": "kestrel.benchmarks.bench_tree_attention",
    "tree_verify": "kestrel.benchmarks.bench_tree_verify",
    "decoding": "kestrel.benchmarks.bench_decoding",
}


def _triton_version():
    try:  # optional: reported, not required
        import triton
    except Exception as error:
        return f"not available ({error.__class__.__name__})"
    return triton.__version__


def cmd_info(args):
    import torch

    from . import _ext

    print(f"kestrel {__version__} ({__file__.rsplit('/', 1)[0]})")
    print(f"python {platform.python_version()} on {platform.machine()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"triton {_triton_version()}")
    info = _ext.build_info()
    if info is None:
        print(f"extension kestrel._C: not built ({_ext._IMPORT_ERROR}); {_ext.BUILD_HINT}")
    else:
        cuda = (
            f"CUDA {info['cuda_version']} for {', '.join(info['cuda_archs'])}"
            if info["cuda"]
            else "CPU only (no CUDA part)"
        )
        print(
            f"extension kestrel._C: built, {cuda}; OpenMP {'on' if info['openmp'] else 'off'}; "
            f"against torch {info['torch_version']} with {info['compiler']}"
        )
        from . import _jit

        print(
            f"CPU optimizer kernels: the {_ext._C.cpu_isa()} path (the widest this CPU has; KESTREL_CPU_ISA="
            "avx512vbmi, avx512, avx2 or scalar caps it)"
        )
        print(f"CUDA kernels of the C++ ops: {_jit.describe()}")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            print(f"device cuda:{index}: {torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    else:
        print(f"device: cpu only ({torch.get_num_threads()} threads), no CUDA device visible")
    return 0


def cmd_bench(args):
    import torch

    from kestrel.benchmarks import harness

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.only or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        print(f"kestrel bench: unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}", file=sys.stderr)
        return 2
    from kestrel import _ext

    cpu_path = f", CPU vector path {_ext._C.cpu_isa()}" if _ext.available() else ""
    where = (
        torch.cuda.get_device_name(device)
        if device.startswith("cuda")
        else f"{torch.get_num_threads()} threads{cpu_path}"
    )
    print(
        f"device: {device} ({where}); copy roof {harness.copy_roof_gbps(device):.1f} GB/s (read + write; DRAM: "
        f"a {harness.roof_bytes(device) >> 20} MiB copy)"
    )
    missing = harness.missing_baselines(names, device)
    for note in missing:  # now on stderr with the progress, and again under the table
        print(note, file=sys.stderr, flush=True)
    rows = []
    for name in names:  # progress on stderr; the results in one table at the end
        print(f"running {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(BENCHMARKS[name])
        rows += module.run(device, quick=args.quick)
    harness.print_table(rows)
    for note in missing:
        print(note)
    if args.csv:
        harness.write_csv(rows, args.csv)
        print(f"wrote {args.csv}")
    return 0


def cmd_demo(args):
    from .demo import DemoArgumentError, run

    try:
        return run(args)
    except DemoArgumentError as error:
        print(f"python -m kestrel demo: error: {error}", file=sys.stderr)
        return 2


def build_parser():
    """The parser of `python -m kestrel` and its commands (torch-free: see the imports above)."""
    parser = argparse.ArgumentParser(prog="python -m kestrel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    about = "versions of kestrel, torch, Triton and CUDA; how the extension was built; the devices seen"
    info = commands.add_parser("info", help=about, description=about)
    info.set_defaults(func=cmd_info)
    about = "benchmark kestrel's kernels beside their baselines on one device"
    bench = commands.add_parser("bench", help=about, description=about + "; one table at the end (progress on stderr)")
    bench.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda or cuda:N; auto takes cuda if present, else cpu (default: %(default)s)",
    )
    bench.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    bench.add_argument("--quick", action="store_true", help="small shapes, a smoke run (default: off)")
    bench.add_argument("--csv", metavar="PATH", help="also write the rows as CSV to PATH (default: no CSV)")
    bench.set_defaults(func=cmd_bench)
    about = (
        "train a byte-level KestrelLM on the Python standard library (AdamW8bit beside AdamW), its draft heads, "
        "then greedy vs tree speculative decoding; with --model PATH, a local Hugging Face checkpoint's draft heads "
        "and kestrel's decoding beside transformers' generate"
    )
    demo = commands.add_parser("demo", help=about, description=about)
    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
