"""The README's streaming tables from ``bench/stream.py --json`` files (one per run, e.g. one per size).

    python bench/stream_table.py run-4096.json run-32768.json
"""

from __future__ import annotations

import json
import sys

WHO = {
    "store": "**vlcache Zarr store** (schema v2)",
    "store-h5": "vlcache HDF5 store",
    "npz": "per-image `.npz`, float32 (BUTD tools)",
    "h5raw": "one HDF5 file, raw float16, one row per chunk (ImageCaptioning.pytorch)",
    "lmdb": "LMDB, raw bytes per image (UNITER, ImageCaptioning.pytorch)",
    "lmdb-lz4": "LMDB, lz4 per image (UNITER)",
    "tsv": "TSV + base64 + line index (Oscar/VinVL)",
    "npy-mmap": "one `.npy`, memory-mapped (SCAN-style)",
    "ram": "in-RAM numpy",
}
GOALS = [  # (label, mine, other, condition, goal)
    ("store ≥ LMDB raw, warm, 0 / 2 workers", "store", "lmdb", [(0, False), (2, False)], 1.0),
    ("store ≥ 0.8× memory-mapped `.npy`, warm, 0 / 2 workers", "store", "npy-mmap", [(0, False), (2, False)], 0.8),
    ("store ≥ memory-mapped `.npy`, cold, 0 workers", "store", "npy-mmap", [(0, True)], 1.0),
    ("HDF5 store ≥ raw HDF5 layout, warm 0 / warm 2 / cold 0", "store-h5", "h5raw", [(0, False), (2, False), (0, True)], 1.0),
]


def tables(runs: list[dict]) -> str:
    out = []
    rates = {}
    for run in runs:
        for r in run["results"]:
            rates[(r["layout"], r["rows"], r["workers"], r["cold"])] = r
    sizes = sorted({k[1] for k in rates})
    for n in sizes:
        rows = [r for r in rates.values() if r["rows"] == n]
        loads = [r["load"] for r in rows]
        out.append(f"\n{n:,} rows (load average {min(loads):.1f}–{max(loads):.1f} during the run):\n")
        out.append("| layout (who uses it) | warm, 0 workers | warm, 2 workers | cold, 0 workers | on disk |")
        out.append("|---|---|---|---|---|")
        for layout in WHO:
            got = [rates.get((layout, n, w, c)) for w, c in [(0, False), (2, False), (0, True)]]
            if not any(got):
                continue
            cells = [("—" if g is None or g.get("samples_per_s") is None else f"{g['samples_per_s']:,.0f}") for g in got]
            if layout == "store":
                cells = [f"**{c}**" for c in cells]
            size = next(g["bytes"] for g in got if g)
            disk = "" if layout == "ram" else f"{size / 2**20:,.0f} MiB"
            out.append(f"| {WHO[layout]} | {' | '.join(cells)} | {disk} |")
    out.append("\n| goal (issue #17) | " + " | ".join(f"{n:,} rows" for n in sizes) + " |")
    out.append("|---|" + "---|" * len(sizes))
    for label, mine, other, conds, goal in GOALS:
        cells = []
        for n in sizes:
            parts = []
            for w, c in conds:
                a, b = rates.get((mine, n, w, c)), rates.get((other, n, w, c))
                if a and b and a.get("samples_per_s") and b.get("samples_per_s"):
                    v = a["samples_per_s"] / b["samples_per_s"]
                    parts.append(f"{v:.2f}×" if v >= goal else f"**{v:.2f}×** (not met)")
                else:
                    parts.append("—")
            cells.append(" / ".join(parts))
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    for layout in ("store", "lmdb", "npy-mmap"):
        for what, main_key, worker_key in (("RSS", "rss_main_mb", "rss_worker_mb"),
                                           ("private memory", "private_main_mb", "private_worker_mb")):
            cells = []
            for n in sizes:
                a, b = rates.get((layout, n, 0, False)), rates.get((layout, n, 2, False))
                if a and b and main_key in a and worker_key in b:
                    cells.append(f"{a[main_key]:.0f} / {b[worker_key]:.0f} MiB")
            if len(cells) == len(sizes):
                name = "store" if layout == "store" else WHO[layout].split(" (")[0]
                out.append(f"| {name} peak {what} (main, 0 workers / largest worker, 2 workers) | "
                           + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    runs = [json.loads(open(p).read()) for p in (argv or sys.argv[1:])]
    print(tables(runs))
    for run in runs:
        print("\n" + run["info"]["machine"], "| load at start", run["info"]["load_average_start"], "|", run["info"]["cold"])
        for n, b in run.get("regions_bytes", {}).items():
            print(f"regions/ bytes at {n} rows: {b}")
        if run.get("remote"):
            for w in ("0", "2"):
                r = run["remote"][w]
                print(f"S3 {run['remote']['rows']} rows {w} workers: {r['samples_per_s']:.0f} samples/s, "
                      f"{r['requests_per_epoch']} requests/epoch ({run['remote']['chunk_files']} chunk objects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
