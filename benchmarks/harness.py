"""The one benchmark harness: median timings, a named baseline beside each of our numbers, the ratio, achieved
GB/s against a measured copy roof, CSV out. Each benchmarks/bench_<op>.py builds its cases from one shape table
and returns rows from `compare`.

The roof is DRAM bandwidth: a copy far larger than any cache. A case whose bytes fit in the caches can run above it,
which the table marks (ROOF_NOTE). A baseline whose library does not import is left out of the table, and
`missing_baselines` says which and how to get it.
"""

import csv
import importlib
import statistics
import time
from dataclasses import asdict, dataclass, fields

import torch


@dataclass
class Row:
    op: str
    case: str
    ours_ms: float
    baseline: str
    baseline_ms: float
    speedup: float  # baseline_ms / ours_ms: > 1 means kestrel is faster
    ours_gbps: float
    roof_pct: float  # ours_gbps as a percentage of the measured copy bandwidth
    device: str


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup=2, repeats=9, min_seconds=0.0):
    """Median wall time of fn() in milliseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    is_cuda = torch.device(device).type == "cuda"
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        if is_cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


_ROOF_CACHE = {}


def roof_bytes(device):
    """The size of the copy that measures the roof: 1 GiB on CUDA, 256 MiB on the CPU (larger than their caches)."""
    return (1 << 30) if torch.device(device).type == "cuda" else (256 << 20)


def copy_roof_gbps(device):
    """Measured device copy bandwidth (bytes read + written per second / 1e9): the DRAM roof."""
    key = str(device)
    if key not in _ROOF_CACHE:
        nbytes = roof_bytes(device)
        src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        ms = median_ms(lambda: dst.copy_(src), device, warmup=2, repeats=9)
        _ROOF_CACHE[key] = 2 * nbytes / (ms * 1e-3) / 1e9
    return _ROOF_CACHE[key]


def compare(op, case, device, ours, baselines, nbytes, repeats=9):
    """Time `ours` and each (name, fn) in `baselines` (None entries are skipped); one Row per baseline."""
    ours_ms = median_ms(ours, device, repeats=repeats)
    roof = copy_roof_gbps(device)
    gbps = nbytes / (ours_ms * 1e-3) / 1e9
    rows = []
    for name, fn in baselines:
        if fn is None:
            continue
        base_ms = median_ms(fn, device, repeats=repeats)
        rows.append(Row(op, case, ours_ms, name, base_ms, base_ms / ours_ms, gbps, 100.0 * gbps / roof, str(device)))
    return rows


ROOF_NOTE = (
    "* above 100% of the roof: the roof is DRAM copy bandwidth (a copy larger than the caches), and a case "
    "whose bytes fit in the caches is served faster than DRAM; its % is not a DRAM efficiency"
)


def roof_cell(pct):
    """'% of roof' as printed: above 100 marked with '*' (see ROOF_NOTE)."""
    return f"{pct:.1f}*" if pct > 100 else f"{pct:.1f}"


def print_table(rows, file=None):
    if not rows:
        print("(no rows)", file=file)
        return
    header = ["op", "case", "kestrel ms", "baseline", "baseline ms", "speedup", "kestrel GB/s", "% of roof"]
    table = [
        [
            r.op,
            r.case,
            f"{r.ours_ms:.3f}",
            r.baseline,
            f"{r.baseline_ms:.3f}",
            f"{r.speedup:.2f}x",
            f"{r.ours_gbps:.1f}",
            roof_cell(r.roof_pct),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)), file=file)
    if any(r.roof_pct > 100 for r in rows):
        print(ROOF_NOTE, file=file)


# Optional baseline libraries: import name -> (the benchmarks that time it when it imports, the devices it runs on,
# how to install it). Without it those benchmarks' rows lack that baseline, and `kestrel bench` says so.
OPTIONAL_BASELINES = {
    "bitsandbytes": (
        ("quantize", "optim"),
        ("cpu", "cuda"),
        "pip install -c constraints.txt bitsandbytes (the version kestrel matches), or the test extra: "
        "pip install -c constraints.txt --no-build-isolation -e '.[test]'",
    ),
    "faiss": (("vq_topk",), ("cpu",), "pip install faiss-cpu"),
    "torchao": (("optim",), ("cpu", "cuda"), "pip install torchao (the AdamW4bit baseline)"),
}


def import_error(module):
    """None if `module` imports, else why not ('ModuleNotFoundError: ...')."""
    try:
        importlib.import_module(module)
    except Exception as error:
        return f"{error.__class__.__name__}: {error}"
    return None


def missing_baselines(names, device):
    """One note per optional baseline library that the benchmarks `names` on `device` would time but cannot import:
    which baseline is missing, why and how to get it."""
    notes = []
    for module, (benchmarks, devices, how) in OPTIONAL_BASELINES.items():
        affected = [name for name in names if name in benchmarks]
        if not affected or torch.device(device).type not in devices:
            continue
        error = import_error(module)
        if error is not None:
            notes.append(
                f"note: the {module} baseline is missing from {', '.join(affected)} ({module} does not "
                f"import: {error}); to get it: {how}"
            )
    return notes


def write_csv(rows, path):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[f.name for f in fields(Row)])
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def attention_cases(device, quick):
    """(cases (B, H, L, D), dtype) of the attention benchmarks: the anchor shapes (docs/softplus_attention.md) in bf16
    on a GPU, a small fp32 case on the CPU."""
    if device.type == "cuda":
        return ([(4, 16, 4096, 128), (8, 16, 2048, 64)] if not quick else [(1, 4, 1024, 64)]), torch.bfloat16
    return ([(1, 4, 512, 64)] if not quick else [(1, 2, 128, 64)]), torch.float32
