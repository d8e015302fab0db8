"""Streaming-reader benchmark: region rows from a store vs a BUTD-style .npz directory vs RAM.

    python bench/stream.py [--images N] [--workers 0 2] [--batch 64] [--backend zarr|hdf5]

Data: N synthetic BUTD-style rows, 36 regions x 2048 features + boxes. Features are ReLU(N(0,1)) (half
zeros, like pooled post-ReLU CNN features), so compression behaves realistically. The same values are
written three ways:

* store  -- a vlcache store (regions group; float16; the backend's own codecs and checksums), read by
            ``stream_loader`` (block-shuffled sampler, batch-level dataset, lanes = workers);
* npz    -- one ``np.savez_compressed`` file per image with ``x`` (float32), ``bbox``, ``num_bbox``,
            ``image_h``, ``image_w`` as the bottom-up-attention tools write them, read by a standard
            map-style ``Dataset`` with a shuffled ``RandomSampler`` and the default collate;
* ram    -- one float16 numpy array loaded whole into memory, read by the same standard ``Dataset``
            (``ram-gather`` additionally shows a batch-gather reader over that array, an upper bound).

Each configuration runs in a fresh subprocess (best of 3 timed rounds, as the machine may be shared),
so its peak RSS is its own: ``ru_maxrss`` of the main process, and the largest DataLoader worker's RSS
sampled with psutil (when installed; forked workers count pages they share with the main process). The
store is also run at a second size (half the rows; both exceed the reader's block cache) to show its
memory does not grow with the dataset. Files are freshly written, so every reader hits a warm page cache.
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

R, D = 36, 2048


# ------------------------------------------------------------------------------------------ data
def row_block(seed: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start+n): features float16 (n,R,D) and boxes float32 (n,R,4), deterministic."""
    rng = np.random.default_rng([seed, start])
    feats = np.maximum(rng.standard_normal((n, R, D), dtype=np.float32), 0).astype(np.float16)
    xy = rng.uniform(0, 400, (n, R, 2)).astype(np.float32)
    return feats, np.concatenate([xy, xy + rng.uniform(8, 200, (n, R, 2)).astype(np.float32)], axis=2)


def write_store(url: str, n: int, seed: int, block: int = 64, hdf5_compression: str = "gzip") -> None:
    from vlcache.storage.schema import Capacities, Layout
    from vlcache.storage.writer import StoreWriter

    layout = Layout(num_rows=n, block_size=block, capacities=Capacities(regions=R, region_dim=D),
                    groups=("images", "captions", "regions"))
    w = StoreWriter(url, layout, {"classes": [], "dataset": {"name": "bench"}}, overwrite=True,
                    hdf5_compression=hdf5_compression)
    for b in w.pending_blocks():
        rows = layout.block_rows(b)
        feats, boxes = row_block(seed, rows.start, len(rows))
        w.write_block(b, {"regions/feats": feats, "regions/boxes": boxes,
                          "regions/count": np.full(len(rows), R, np.int16),
                          "images/id": np.array([str(i) for i in rows], dtype=object)})
    assert w.finalize()
    w.close()


def _write_npz_part(args) -> None:
    folder, n, seed, part, parts = args
    for start in range(part * 64, n, parts * 64):
        feats, boxes = row_block(seed, start, min(64, n - start))
        for k in range(len(feats)):
            np.savez_compressed(Path(folder) / f"{start + k:07d}.npz", x=feats[k].astype(np.float32),
                                bbox=boxes[k], num_bbox=R, image_h=480, image_w=640)


def write_npz(folder: Path, n: int, seed: int) -> None:
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    parts = max(1, os.cpu_count() or 1)
    with Pool(parts) as pool:
        pool.map(_write_npz_part, [(str(folder), n, seed, p, parts) for p in range(parts)])


def write_ram(path: Path, n: int, seed: int) -> None:
    feats = np.lib.format.open_memmap(path / "feats.npy", "w+", np.float16, (n, R, D))
    boxes = np.empty((n, R, 4), np.float32)
    for start in range(0, n, 64):
        feats[start:start + 64], boxes[start:start + 64] = row_block(seed, start, min(64, n - start))
    feats.flush()
    np.save(path / "boxes.npy", boxes)


def du(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ one configuration
def run_config(kind: str, path: str, workers: int, batch: int, seconds: float, rounds: int = 3) -> dict:
    """Read shuffled batches for ``seconds`` (after one warm-up batch) in ``rounds``; best samples/s, peak RSS."""
    import torch
    from torch.utils.data import DataLoader, Dataset, RandomSampler

    torch.set_num_threads(1)
    if kind == "idle":
        return {"samples_per_s": 0.0, "rss_main_mb": rss_mb(resource.RUSAGE_SELF), "rss_worker_mb": 0.0}
    if kind == "store":
        from vlcache.storage.streaming import stream_loader

        loader, sampler = stream_loader(path, ["regions/feats", "regions/boxes", "regions/count"], batch,
                                        num_workers=workers, lanes=max(1, workers), seed=0)
        key = "regions/feats"
    elif kind in ("npz", "ram"):
        if kind == "npz":
            files = sorted(Path(path).glob("*.npz"))

            class Rows(Dataset):
                def __len__(self):
                    return len(files)

                def __getitem__(self, i):
                    z = np.load(files[i], allow_pickle=False)
                    return {"x": z["x"], "bbox": z["bbox"], "num_bbox": int(z["num_bbox"])}
        else:
            feats, boxes = (np.load(Path(path) / "feats.npy", allow_pickle=False),
                            np.load(Path(path) / "boxes.npy", allow_pickle=False))

            class Rows(Dataset):
                def __len__(self):
                    return len(feats)

                def __getitem__(self, i):
                    return {"x": feats[i], "bbox": boxes[i], "num_bbox": R}
        ds = Rows()
        loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)),
                            num_workers=workers, persistent_workers=workers > 0)
        key = "x"
    elif kind == "ram-gather":
        feats, boxes = (np.load(Path(path) / "feats.npy", allow_pickle=False),
                        np.load(Path(path) / "boxes.npy", allow_pickle=False))

        class Batches(Dataset):
            def __len__(self):
                return len(feats)

            def __getitem__(self, idx):
                idx = np.sort(np.asarray(idx))
                return {"x": torch.from_numpy(feats[idx]), "bbox": torch.from_numpy(boxes[idx])}
        from torch.utils.data import BatchSampler

        ds = Batches()
        loader = DataLoader(ds, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                            sampler=BatchSampler(RandomSampler(ds, generator=torch.Generator().manual_seed(0)), batch, False))
        key = "x"
    else:
        raise ValueError(f"unknown configuration {kind!r}")
    watcher = WorkerRSS()
    it = iter(loader)
    next(it)  # warm-up: worker start, first open
    # Best of `rounds` timed rounds: the machine is shared, so the best round is the least disturbed one.
    rates, n_total, epoch = [], 0, 0
    for _ in range(rounds):
        n, t0 = 0, time.perf_counter()
        while True:  # as many epochs as fit in the round: small datasets are timed too
            for b in it:
                n += len(b[key])
                if time.perf_counter() - t0 > seconds / rounds:
                    break
            else:
                epoch += 1
                if kind == "store":
                    sampler.set_epoch(epoch)
                it = iter(loader)
                continue
            break
        rates.append(n / (time.perf_counter() - t0))
        n_total += n
    worker_mb = watcher.stop()
    del it, loader
    return {"samples_per_s": max(rates), "rounds": [round(r) for r in rates], "samples": n_total,
            "rss_main_mb": rss_mb(resource.RUSAGE_SELF), "rss_worker_mb": worker_mb}


def rss_mb(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # Linux reports KiB


class WorkerRSS:
    """Peak RSS of the largest DataLoader worker, sampled every 20 ms with psutil (when installed).

    RUSAGE_CHILDREN is no use here: any fork+exec (torch runs some at import) reports the parent's
    size as a child's peak.
    """

    def __init__(self):
        import threading

        self.peak, self._stop = float("nan"), threading.Event()
        try:
            import psutil
        except ImportError:
            return
        self.peak, me = 0.0, psutil.Process()

        def watch():
            while not self._stop.wait(0.02):
                for child in me.children(recursive=True):
                    try:
                        self.peak = max(self.peak, child.memory_info().rss / 2**20)
                    except psutil.Error:
                        pass

        self._thread = threading.Thread(target=watch, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()
        return self.peak


def measure(kind: str, path, workers: int, batch: int, seconds: float) -> dict:
    cmd = [sys.executable, __file__, "--run", kind, "--path", str(path), "--workers", str(workers),
           "--batch", str(batch), "--seconds", str(seconds)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1024, help="rows in the large dataset (the small one has half)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring time per configuration")
    ap.add_argument("--backend", choices=["zarr", "hdf5"], default="zarr")
    ap.add_argument("--hdf5-compression", choices=["gzip", "lzf"], default="gzip")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder, removed)")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run:  # child: one configuration
        print(json.dumps(run_config(args.run, args.path, args.workers[0], args.batch, args.seconds)))
        return 0

    work = args.dir or Path(tempfile.mkdtemp(prefix="vlcache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n_big, n_small, seed = args.images, max(args.batch * 2, args.images // 2), 0
    ext = ".zarr" if args.backend == "zarr" else ".h5"
    try:
        t = time.perf_counter()
        store_big, store_small = work / f"big{ext}", work / f"small{ext}"
        write_store(str(store_big), n_big, seed, hdf5_compression=args.hdf5_compression)
        write_store(str(store_small), n_small, seed, hdf5_compression=args.hdf5_compression)
        write_npz(work / "npz", n_big, seed)
        (work / "ram").mkdir(exist_ok=True)
        write_ram(work / "ram", n_big, seed)
        print(f"wrote data in {time.perf_counter() - t:.0f}s under {work}")

        import torch

        print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
              f"python {platform.python_version()}, torch {torch.__version__}")
        raw = n_big * R * D * 2
        print(f"data: {n_big} rows x {R} regions x {D} float16 = {raw / 2**20:.0f} MiB raw; store ({args.backend}{'/' + args.hdf5_compression if args.backend == 'hdf5' else ''}) "
              f"{du(store_big) / 2**20:.0f} MiB on disk; npz dir {du(work / 'npz') / 2**20:.0f} MiB "
              f"({n_big} files, float32); in-RAM array {raw / 2**20:.0f} MiB; batch {args.batch}")
        idle = measure("idle", "", 0, args.batch, 0)
        print(f"baseline RSS of a process that only imports torch: {idle['rss_main_mb']:.0f} MiB\n")

        rows = []
        for w in args.workers:
            for kind, path, n in (("store", store_big, n_big), ("store", store_small, n_small),
                                  ("npz", work / "npz", n_big), ("ram", work / "ram", n_big),
                                  ("ram-gather", work / "ram", n_big)):
                r = measure(kind, path, w, args.batch, args.seconds)
                r.update(kind=kind, workers=w, rows=n)
                rows.append(r)
        hdr = f"{'reader':<11}{'workers':>8}{'rows':>7}{'samples/s':>11}{'peak RSS main':>15}{'peak RSS worker':>17}"
        print(hdr + "\n" + "-" * len(hdr))
        for r in rows:
            worker = f"{r['rss_worker_mb']:>14.0f} MiB" if r["workers"] else f"{'-':>17}"
            print(f"{r['kind']:<11}{r['workers']:>8}{r['rows']:>7}{r['samples_per_s']:>11.0f}"
                  f"{r['rss_main_mb']:>12.0f} MiB{worker}")
        print()
        get = {(r["kind"], r["workers"], r["rows"]): r for r in rows}
        for w in args.workers:
            s, z = get[("store", w, n_big)], get[("npz", w, n_big)]
            m, g = get[("ram", w, n_big)], get[("ram-gather", w, n_big)]
            small = get[("store", w, n_small)]
            print(f"workers={w}: store/npz = {s['samples_per_s'] / z['samples_per_s']:.1f}x (target >= 5), "
                  f"store/in-RAM = {s['samples_per_s'] / m['samples_per_s']:.2f}x (target >= 0.3), "
                  f"store/in-RAM gather = {s['samples_per_s'] / g['samples_per_s']:.2f}x; "
                  f"store peak RSS {small['rss_main_mb']:.0f} -> {s['rss_main_mb']:.0f} MiB (main)"
                  + (f", {small['rss_worker_mb']:.0f} -> {s['rss_worker_mb']:.0f} MiB (worker)" if w else "")
                  + f" for {n_small} -> {n_big} rows")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
