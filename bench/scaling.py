"""Scaling benchmark: the streaming reader's samples/s and peak memory at 1x, 4x and 16x a dataset size.

    python bench/scaling.py [--base 128] [--factors 1 4 16] [--workers 0 2] [--batch 32] [--seconds 2]
                            [--block 16] [--json PATH]

Data: the BUTD-style rows of ``bench/layouts.py`` (36 regions x 2048 float16 features + boxes, ReLU of
normal noise, so compression behaves realistically), written as one Zarr store per size with ``--block``
rows per chunk. The reader is ``stream_loader`` (shuffled blocks, then rows within a window of 4 blocks),
measured by ``bench/stream.py``'s own ``run_config`` in a **fresh subprocess per configuration**, so each
peak RSS (``VmHWM`` of the main process; the largest DataLoader worker's RSS, sampled with psutil) is
that configuration's alone. The base size is 8x the reader's block cache, so every size streams.

The claim under test: a process's own memory stays flat as the dataset grows (the reader holds O(window)
decoded blocks and O(batch) buffers, never the dataset). That is *private* memory (``RssAnon + RssShmem``,
sampled every 20 ms): the reader keeps its chunk files memory-mapped (``storage/mapped.py``), and their
page-cache pages count in RSS once touched -- shared, clean, reclaimable file pages that grow with the
data read, as LMDB's and a memory-mapped ``.npy``'s do. Reported: samples/s, peak RSS and peak private
memory per size and worker count, and the peak private memory at the largest size over the smallest
(target <= 1.10; RSS growth printed beside it), beside a process that only imports torch (the floor).
Extraction with 1 vs 2 decode worker processes is measured by ``bench/extract.py``; ``bench/run_all.py``
puts its ratio in the same section of the summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FLAT_TARGET = 1.10  # peak private memory at the largest size / at the smallest


def _layouts_module():
    """bench/layouts.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("vlcache_bench_layouts", HERE / "layouts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def measure(kind: str, path: str, workers: int, batch: int, seconds: float) -> dict:
    """One configuration in a fresh interpreter (bench/stream.py's child mode); its result dict."""
    cmd = [sys.executable, str(HERE / "stream.py"), "--run", kind, "--path", path, "--workers", str(workers),
           "--batch", str(batch), "--seconds", str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def du_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_avg_1m": round(os.getloadavg()[0], 2)}


def run(args, work: Path) -> dict:
    layouts = _layouts_module()
    sizes = [args.base * f for f in args.factors]
    t = time.perf_counter()
    stores = {}
    for n in sizes:
        url = work / f"rows{n}.zarr"
        layouts.write_npy(work / f"rows{n}-npy", n, seed=0)
        layouts.write_store(str(url), work / f"rows{n}-npy", n, block=args.block)
        shutil.rmtree(work / f"rows{n}-npy")
        stores[n] = url
    write_s = time.perf_counter() - t
    rows_mb = layouts.R * layouts.D * 2 / 2**20
    print(f"machine: {json.dumps(machine())}")
    print(f"data: {layouts.R} regions x {layouts.D} float16 per row ({rows_mb * 1024:.0f} KiB raw); sizes {sizes} rows "
          f"({', '.join(f'{du_mb(stores[n]):.0f}' for n in sizes)} MiB on disk); block {args.block} rows, reader "
          f"window 4 blocks; batch {args.batch}; {args.seconds:.1f}s per configuration; written in {write_s:.0f}s")
    idle = measure("idle", "", 0, args.batch, 0)
    print(f"floor: a process that only imports torch peaks at {idle['rss_main_mb']:.0f} MiB\n")
    rows = []
    for w in args.workers:
        for f, n in zip(args.factors, sizes):
            r = measure("store", str(stores[n]), w, args.batch, args.seconds)
            r.update(workers=w, factor=f, rows=n)
            rows.append(r)
    print(f"{'workers':>7} {'size':>5} {'rows':>6} {'samples/s':>10} {'main RSS / private':>20} "
          f"{'worker RSS / private':>22}")
    for r in rows:
        worker = f"{r['rss_worker_mb']:>8.0f} / {r['private_worker_mb']:.0f} MiB" if r["workers"] else f"{'-':>22}"
        print(f"{r['workers']:>7} {str(r['factor']) + 'x':>5} {r['rows']:>6} {r['samples_per_s']:>10.0f} "
              f"{r['rss_main_mb']:>10.0f} / {r['private_main_mb']:.0f} MiB {worker}")
    summary = {}
    lo, hi = min(args.factors), max(args.factors)
    for w in args.workers:
        by = {r["factor"]: r for r in rows if r["workers"] == w}
        who = "worker" if w else "main"  # with workers, the reading happens in the workers
        key, rss_key = f"private_{who}_mb", f"rss_{who}_mb"
        growth, rss_growth = by[hi][key] / by[lo][key], by[hi][rss_key] / by[lo][rss_key]
        summary[w] = {"private_growth": growth, "rss_growth": rss_growth, "field": key,
                      "private_mb": {f: by[f][key] for f in args.factors},
                      "rss_mb": {f: by[f][rss_key] for f in args.factors},
                      "samples_per_s": {f: by[f]["samples_per_s"] for f in args.factors},
                      "speed_ratio": by[hi]["samples_per_s"] / by[lo]["samples_per_s"],
                      "flat": growth <= FLAT_TARGET}
        print(f"workers={w}: peak private memory ({'largest worker' if w else 'main'}) {by[lo][key]:.0f} -> "
              f"{by[hi][key]:.0f} MiB for {lo}x -> {hi}x rows = {growth:.3f}x (target <= {FLAT_TARGET}: "
              f"{'met' if growth <= FLAT_TARGET else 'NOT met'}); peak RSS {by[lo][rss_key]:.0f} -> "
              f"{by[hi][rss_key]:.0f} MiB ({rss_growth:.3f}x, mapped chunk pages included); samples/s {hi}x/{lo}x = "
              f"{summary[w]['speed_ratio']:.2f}")
    return {"machine": machine(), "base_rows": args.base, "factors": args.factors, "block": args.block,
            "batch": args.batch, "seconds": args.seconds, "idle_rss_mb": idle["rss_main_mb"],
            "disk_mb": {str(n): round(du_mb(stores[n]), 1) for n in sizes}, "runs": rows,
            "summary": {str(w): s for w, s in summary.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=int, default=128, help="rows at 1x")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=2.0, help="measuring time per configuration")
    ap.add_argument("--block", type=int, default=16, help="rows per chunk (the reader caches 4 blocks per lane)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.base < 8 * args.block:
        ap.error(f"--base {args.base} must be >= 8 blocks ({8 * args.block} rows) so every size streams")
    work = args.dir or Path(tempfile.mkdtemp(prefix="vlcache-bench-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        result = run(args, work)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"total benchmark time: {result['total_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
