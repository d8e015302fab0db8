"""Streaming-reader benchmark: the vlcache store against every layout researchers stream features from.

    python bench/stream.py [--images 4096 32768] [--workers 0 2] [--batch 64] [--seconds 4]
                           [--layouts store store-h5 npz h5raw lmdb lmdb-lz4 tsv npy-mmap ram] [--remote-rows 1024]

Data: N BUTD-style rows (36 regions x 2048 float16 features + boxes, ``bench/layouts.py``), written once as
``.npy`` and copied into each layout, so every layout holds the same rows. Per size, layouts are written
one at a time, measured, and removed (disk and page cache hold one layout at a time); with ``--keep`` they
stay in ``--dir`` and a later run measures them without writing again (``--write-only`` writes them ahead).

Each configuration runs in a fresh subprocess: shuffled batches of ``--batch`` through a torch DataLoader
(the store: ``stream_loader``, block-shuffled, lanes = workers; the others: a per-row Dataset, a shuffled
``RandomSampler`` and the default collate), samples/s over ``--seconds`` (best of 3 rounds for warm runs,
the machine may be shared), and its peak RSS (``VmHWM`` of the main process; the largest worker's RSS,
sampled with psutil):

* warm -- the layout's files are read once just before (page cache warm);
* cold -- the page cache is dropped (``sync; echo 1 > /proc/sys/vm/drop_caches``, needs root) after the
  loader is built and before the first batch; one round from the first batch to the end of the first
  epoch (or ``--seconds``, whichever comes first), so no row is read from a warm cache. Where dropping is
  not permitted the cold column says so and is not measured.

``--remote-rows`` also streams a store of that many rows from S3 (moto on loopback, run as its own
process): samples/s and HTTP requests per epoch, counted in the server's access log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import LAYOUTS, R, D, files_of, row_dataset, write_layout, write_npy, write_store  # noqa: E402

DROP_CACHES = "/proc/sys/vm/drop_caches"
STORE_FIELDS = ["regions/feats", "regions/boxes", "regions/count"]


# ------------------------------------------------------------------------------ one configuration
def drop_page_cache() -> bool:
    try:
        os.sync()
        with open(DROP_CACHES, "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def run_config(kind: str, path: str, workers: int, batch: int, seconds: float, cold: bool = False,
               storage_options: dict | None = None, epochs: int = 0) -> dict:
    """Read shuffled batches; samples/s and peak RSS. ``epochs``: read exactly that many epochs instead."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    torch.set_num_threads(1)
    if kind == "idle":
        return {"samples_per_s": 0.0, "rss_main_mb": rss_mb(resource.RUSAGE_SELF), "rss_worker_mb": 0.0}
    sampler = None
    if kind == "store":
        from vlcache.storage.streaming import stream_loader

        loader, sampler = stream_loader(path, STORE_FIELDS, batch, num_workers=workers, lanes=max(1, workers),
                                        seed=0, storage_options=storage_options)
        key = "regions/feats"
    else:
        ds = row_dataset(kind, path)
        loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
                            num_workers=workers, persistent_workers=workers > 0)
        key = "x"
    watcher = WorkerRSS()
    epoch = 0
    if cold and not drop_page_cache():
        return {"samples_per_s": None, "note": "page cache drop not permitted"}
    it = iter(loader)
    if not cold and not epochs:
        next(it)  # warm-up: worker start, first open
    rounds, budget = (1, seconds) if cold else (3, seconds / 3)
    rates, n_total = [], 0
    for _ in range(1 if epochs else rounds):
        n, t0 = 0, time.perf_counter()
        while True:  # as many epochs as fit in the round: small datasets are timed too
            for b in it:
                n += len(b[key])
                if not epochs and time.perf_counter() - t0 > budget:
                    break
            else:
                epoch += 1
                if sampler is not None:
                    sampler.set_epoch(epoch)
                it = iter(loader)
                if (epochs and epoch >= epochs) or cold:  # cold: the first epoch only, every read a cold one
                    break
                continue
            break
        rates.append(n / (time.perf_counter() - t0))
        n_total += n
    worker_mb = watcher.stop()
    del it, loader
    return {"samples_per_s": max(rates), "rounds": [round(r) for r in rates], "samples": n_total,
            "rss_main_mb": rss_mb(resource.RUSAGE_SELF), "rss_worker_mb": worker_mb,
            "private_main_mb": watcher.main_private, "private_worker_mb": watcher.private}


def rss_mb(who=resource.RUSAGE_SELF) -> float:
    """Peak RSS of this process image in MiB: ``VmHWM`` on Linux. Not ``ru_maxrss``: Linux carries it over
    ``exec`` from the forking parent, so a child spawned by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


def private_mb(pid: int | str = "self") -> float:
    """A process's own memory in MiB: ``RssAnon + RssShmem`` (heap, batch buffers, shared-memory batches),
    without ``RssFile`` -- the page-cache pages of files it has mapped (the store's chunks, LMDB, ``.npy``),
    which are shared with every reader and dropped by the kernel under memory pressure."""
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return sum(int(fields[k].split()[0]) for k in ("RssAnon", "RssShmem")) / 1024.0


class WorkerRSS:
    """Peaks sampled every 20 ms: the largest DataLoader worker's RSS and private memory (psutil, when
    installed), and the main process's private memory (:func:`private_mb`; its RSS peak is ``VmHWM``).

    RUSAGE_CHILDREN is no use here: any fork+exec (torch runs some at import) reports the parent's
    size as a child's peak.
    """

    def __init__(self):
        import threading

        self.peak = self.private = float("nan")
        self.main_private, self._stop = private_mb(), threading.Event()
        try:
            import psutil
        except ImportError:
            psutil = None
        if psutil is not None:
            self.peak = self.private = 0.0
            me = psutil.Process()

        def watch():
            while not self._stop.wait(0.02):
                self.main_private = max(self.main_private, private_mb())
                if psutil is None:
                    continue
                for child in me.children(recursive=True):
                    try:
                        self.peak = max(self.peak, child.memory_info().rss / 2**20)
                        self.private = max(self.private, private_mb(child.pid))
                    except (psutil.Error, OSError):
                        pass

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.main_private = max(self.main_private, private_mb())
        return self.peak


def measure(kind: str, path, workers: int, batch: int, seconds: float, cold: bool = False,
            storage_options: dict | None = None, epochs: int = 0) -> dict:
    """One configuration in a fresh interpreter (this script's child mode); its result dict."""
    cmd = [sys.executable, __file__, "--run", kind, "--path", str(path), "--workers", str(workers),
           "--batch", str(batch), "--seconds", str(seconds), "--epochs", str(epochs)]
    if cold:
        cmd.append("--cold")
    if storage_options:
        cmd += ["--storage-options", json.dumps(storage_options)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(files: list[Path]) -> None:
    """Read every file once, so the page cache holds them."""
    buf = bytearray(16 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- remote
def remote_run(work: Path, rows: int, batch: int, seconds: float) -> dict:
    """A store streamed from S3 (moto server on loopback, its own process): samples/s, requests per epoch."""
    import socket

    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = work / "moto.log"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    with open(log, "w") as fh:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=fh, stderr=subprocess.STDOUT, env=env)
    try:
        options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}
        for _ in range(100):
            try:
                s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("bench")
                break
            except Exception:  # noqa: BLE001 - server still starting
                time.sleep(0.2)
        local = work / "remote-src.zarr"
        src = work / "remote-npy"
        write_npy(src, rows, 1)
        write_store(str(local), src, rows)
        fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        fs.put(str(local), "bench/store.zarr", recursive=True)
        url = "s3://bench/store.zarr"
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})

        def requests() -> int:
            return sum(1 for line in log.read_text().splitlines() if '"GET ' in line or '"HEAD ' in line)

        out = {}
        for w in (0, 2):
            before = requests()
            r = measure("store", url, w, batch, seconds, storage_options=options, epochs=1)
            r["requests_per_epoch"] = requests() - before
            out[w] = r
        out["rows"], out["chunk_files"] = rows, sum(1 for p in local.rglob("*") if p.is_file() and "/c/" in str(p))
        shutil.rmtree(local), shutil.rmtree(src)
        return out
    finally:
        server.terminate()
        server.wait(timeout=30)


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, nargs="+", default=[4096, 32768], help="dataset sizes (rows)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--cold-workers", type=int, nargs="*", default=[0], help="worker counts measured cold")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=4.0, help="measuring time per configuration")
    ap.add_argument("--layouts", nargs="+", default=["store", "store-h5", *LAYOUTS[1:]])
    ap.add_argument("--remote-rows", type=int, default=1024, help="rows of the S3 store (0: no remote run)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    ap.add_argument("--keep", action="store_true",
                    help="keep the layouts written in --dir, and reuse those written before (measure only)")
    ap.add_argument("--write-only", action="store_true", help="with --keep: write the layouts, measure nothing")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--epochs", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--storage-options", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.keep = args.keep or args.write_only
    if args.run:  # child: one configuration
        so = json.loads(args.storage_options) if args.storage_options else None
        print(json.dumps(run_config(args.run, args.path, args.workers[0], args.batch, args.seconds, args.cold, so,
                                    args.epochs)))
        return 0

    import torch

    work = args.dir or Path(tempfile.mkdtemp(prefix="vlcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    can_drop = drop_page_cache()
    info = {"machine": f"{platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
                       f"python {platform.python_version()}, torch {torch.__version__}",
            "load_average_start": os.getloadavg(), "batch": args.batch, "seconds": args.seconds,
            "cold": "page cache dropped before each cold run" if can_drop else "page cache drop NOT permitted: no cold runs"}
    print(f"machine: {info['machine']}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {info['cold']}")
    idle = measure("idle", "", 0, args.batch, 0)
    print(f"baseline RSS of a process that only imports torch: {idle['rss_main_mb']:.0f} MiB", flush=True)
    results: list[dict] = []
    breakdown: dict[int, dict] = {}
    try:
        for n in args.images:
            src = work / f"npy-{n}"
            if not (src / "done").exists():  # rows are deterministic: a --dir's earlier rows are reused
                write_npy(src, n, 0)
                (src / "done").touch()
            print(f"\n== {n} rows x {R} regions x {D} float16 = {n * R * D * 2 / 2**20:.0f} MiB of features", flush=True)
            for layout in args.layouts:
                kind = "store" if layout.startswith("store") else layout
                path = {"store": work / f"store-{n}.zarr", "store-h5": work / f"store-{n}.h5"}.get(layout)
                path = path or (src if kind in ("npy-mmap", "ram") else work / f"{layout}-{n}")
                t, marker = time.perf_counter(), Path(f"{path}.written")
                if not (args.keep and marker.exists()):
                    write_layout(kind, path, src, n)
                    marker.touch()
                size = sum(du(p) for p in files_of(kind, path))
                written = time.perf_counter() - t
                if args.write_only:
                    continue
                if layout == "store":
                    breakdown[n] = region_bytes(path, n)
                for w in args.workers:
                    for cold in (False, True):
                        if cold and (w not in args.cold_workers or kind == "ram" or not can_drop):
                            continue
                        if not cold:
                            warm(files_of(kind, path))
                        r = measure(kind, path, w, args.batch, args.seconds, cold)
                        r.update(layout=layout, rows=n, workers=w, cold=cold, bytes=size, write_s=written,
                                 load=os.getloadavg()[0])
                        results.append(r)
                        print(f"{layout:<9}{n:>7} rows {w} workers {'cold' if cold else 'warm'}: "
                              f"{r['samples_per_s'] or 0:>8.0f} samples/s  rounds {r.get('rounds')}  peak RSS main "
                              f"{r.get('rss_main_mb', 0):.0f} MiB (private {r.get('private_main_mb', 0):.0f}), "
                              f"worker {r.get('rss_worker_mb', 0):.0f} MiB (private {r.get('private_worker_mb', 0):.0f})  "
                              f"[{size / 2**20:.0f} MiB on disk, load {r['load']:.1f}]", flush=True)
                if kind not in ("npy-mmap", "ram") and not args.keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                    marker.unlink()
            if not args.keep:
                shutil.rmtree(src)
        remote = (remote_run(work, args.remote_rows, args.batch, args.seconds)
                  if args.remote_rows and not args.write_only else None)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = report(results, args, remote)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": results, "remote": remote, "summary": summary,
                                         "regions_bytes": breakdown}, indent=1))
    return 0


BUTD_BYTES = R * D * 4 + R * 4 * 4  # BUTD's float32 features + boxes per image


def region_bytes(store: Path, n: int) -> dict:
    """Bytes per image of each ``regions/`` array of the Zarr store (chunk files and metadata) and of
    ``regions/`` over the BUTD float32 layout; printed, and returned for the JSON."""
    per = {a.name: du(a) / n for a in sorted((store / "regions").iterdir()) if a.is_dir()}
    total = du(store / "regions") / n
    print(f"regions/ bytes per image: {total:,.1f} = {total / BUTD_BYTES:.4f}x BUTD float32 ({BUTD_BYTES:,}): "
          + ", ".join(f"{k} {v:,.1f}" for k, v in per.items()), flush=True)
    return {"per_array": per, "total": total, "vs_butd": total / BUTD_BYTES}


def report(results: list[dict], args, remote) -> dict:
    """Print the table (samples/s per layout and condition) and the goal ratios; return the ratios."""
    get = {(r["layout"], r["rows"], r["workers"], r["cold"]): r["samples_per_s"] for r in results}
    conds = [(w, False) for w in args.workers] + [(w, True) for w in args.workers if w in args.cold_workers]
    head = "".join(f"{('cold' if c else 'warm') + f' {w}w':>12}" for w, c in conds)
    summary = {}
    for n in args.images:
        print(f"\nsamples/s, {n} rows, batch {args.batch}\n{'layout':<10}{head}\n" + "-" * (10 + 12 * len(conds)))
        for layout in args.layouts:
            print(f"{layout:<10}" + "".join(f"{(get.get((layout, n, w, c)) or float('nan')):>12.0f}" for w, c in conds))
        ratio = {}
        for w, c in conds:
            s = get.get(("store", n, w, c))
            for other in ("lmdb", "npy-mmap", "h5raw"):
                o = get.get((other, n, w, c))
                mine = get.get(("store-h5", n, w, c)) if other == "h5raw" else s
                if mine and o:
                    ratio[f"{'store-h5' if other == 'h5raw' else 'store'}/{other} {'cold' if c else 'warm'} {w}w"] = mine / o
        summary[n] = ratio
        goals = {"store/lmdb warm": 1.0, "store/npy-mmap warm": 0.8, "store/npy-mmap cold": 1.0,
                 "store-h5/h5raw warm": 1.0, "store-h5/h5raw cold": 1.0}
        for k, v in ratio.items():
            goal = next((g for p, g in goals.items() if k.startswith(p)), None)
            print(f"  {k:<32} {v:6.2f}x" + (f"  (goal >= {goal}: {'met' if v >= goal else 'NOT met'})" if goal else ""))
    mem = {(r["rows"], r["workers"]): r for r in results if r["layout"] == "store" and not r["cold"]}
    if len(args.images) > 1:
        lo, hi = min(args.images), max(args.images)
        for w in args.workers:
            a, b = mem.get((lo, w)), mem.get((hi, w))
            if a and b:
                who = "largest worker" if w else "main"
                for what, where in (("RSS", "rss_worker_mb" if w else "rss_main_mb"),
                                    ("private memory", "private_worker_mb" if w else "private_main_mb")):
                    summary[f"{where}_growth_{w}w"] = b[where] / a[where]
                    print(f"store peak {what} ({who}, {w} workers): {a[where]:.0f} MiB at {lo} rows, "
                          f"{b[where]:.0f} MiB at {hi} rows ({b[where] / a[where]:.2f}x)")
    if remote:
        for w in (0, 2):
            r = remote[w]
            print(f"S3 (moto, loopback), {remote['rows']} rows, {w} workers: {r['samples_per_s']:.0f} samples/s, "
                  f"{r['requests_per_epoch']} requests per epoch ({remote['chunk_files']} chunk objects)")
    return summary


if __name__ == "__main__":
    sys.exit(main())
