"""A deterministic store writer for the kill and parallel tests: every value is a function of the row index.

    python write_worker.py URL [--rank R --world W --sleep S]

Test-only kill hooks (environment variables; the library has none):
    VLCACHE_TEST_KILL_AFTER_BLOCKS=k  SIGKILL itself after writing k blocks
    VLCACHE_TEST_KILL_BEFORE_DONE=b   SIGKILL itself in block b after its arrays, before its done flags
    VLCACHE_TEST_KILL_MID_ARRAYS=b    SIGKILL itself in block b after half of its arrays
    VLCACHE_TEST_KILL_IN_PACK=n       SIGKILL itself while packing the HDF5 file, after n datasets
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

from vlcache.storage.schema import DONE, Capacities, Layout
from vlcache.storage.writer import StoreWriter

LAYOUT = Layout(num_rows=23, block_size=4, capacities=Capacities(
    captions=3, instances=4, mask_size=6, regions=5, region_dim=8, grid_size=3, grid_dim=4, matches=2))
ATTRS = {"dataset": "kill-test", "config": {"detector": "maskrcnn_r50", "score_threshold": 0.5, "sizes": [4, 6]}}
STATS = {"statistics": {"rows": LAYOUT.num_rows}}


def row_values(row: int, cap: Capacities) -> dict[str, np.ndarray]:
    """Every array's value for one row (strings with unicode, float16 feats, uint8 masks, -1 padding)."""
    rng = np.random.default_rng(1000 + row)
    C, I, M, R, K = cap.captions, cap.instances, cap.mask_size, cap.regions, cap.matches
    n_cap, n_inst, n_reg = 1 + row % C, row % (I + 1), 1 + row % R
    labels = np.full(I, -1, np.int16)
    labels[:n_inst] = rng.integers(0, 80, n_inst)
    reg_labels = np.full(R, -1, np.int16)
    reg_labels[:n_reg] = rng.integers(0, 1600, n_reg)
    text = [f"ein Hund läuft 🐕 nr {row}/{c}" if c < n_cap else "" for c in range(C)]
    match_label = np.full((C, K), -1, np.int16)
    match_label[0, : row % (K + 1)] = rng.integers(0, 80, row % (K + 1))
    return {
        "images/id": np.array(f"img{row:04d}", dtype=object),
        "images/path": np.array(f"bilder/ü{row}.jpg", dtype=object),
        "images/hw": np.array([100 + row, 200 - row], np.int32),
        "images/split": np.array(row % 3, np.uint8),
        "images/error": np.array("bad header — é" if row % 7 == 3 else "", dtype=object),
        "captions/count": np.array(n_cap, np.uint8),
        "captions/text": np.array(text, dtype=object),
        "captions/tokens": np.array([t.lower() for t in text], dtype=object),
        "instances/count": np.array(n_inst, np.int16),
        "instances/labels": labels,
        "instances/scores": rng.random(I).astype(np.float32),
        "instances/boxes": (rng.random((I, 4)) * 100).astype(np.float32),
        "instances/masks": rng.integers(0, 256, (I, M, M)).astype(np.uint8),
        "regions/count": np.array(n_reg, np.int16),
        "regions/boxes": (rng.random((R, 4)) * 50).astype(np.float32),
        "regions/labels": reg_labels,
        "regions/scores": rng.random(R).astype(np.float32),
        "regions/feats": rng.standard_normal((R, cap.region_dim)).astype(np.float16),
        "grid/feats": rng.standard_normal((cap.grid_size**2, cap.grid_dim)).astype(np.float16),
        "matches/count": (match_label >= 0).sum(1).astype(np.int16),
        "matches/span": rng.integers(0, 20, (C, K, 4)).astype(np.int32),
        "matches/label": match_label,
    }


def block_arrays(layout: Layout, block: int) -> dict[str, np.ndarray]:
    rows = [row_values(r, layout.capacities) for r in layout.block_rows(block)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def expected_arrays(layout: Layout) -> dict[str, np.ndarray]:
    """Every array of a finished store, done included."""
    rows = [row_values(r, layout.capacities) for r in range(layout.num_rows)]
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    out[DONE] = np.ones(layout.num_rows, np.uint8)
    return out


def read_all(url) -> dict[str, np.ndarray]:
    """Every array of the store at ``url``, whole."""
    from vlcache.storage.backends import open_backend

    with open_backend(url) as b:
        return {p: b.read(p, slice(None)) for p in b.arrays()}


def assert_same(actual: dict, expected: dict, rows=slice(None), where: str = "") -> None:
    """Equal arrays (same keys, dtypes, values) on ``rows``; the message names the array."""
    assert sorted(actual) == sorted(expected), f"{where}: arrays differ: {sorted(actual)} vs {sorted(expected)}"
    for k in expected:
        a, e = actual[k][rows], np.asarray(expected[k])[rows]
        assert a.dtype == e.dtype, f"{where}: '{k}' dtype {a.dtype} != {e.dtype}"
        assert a.shape == e.shape and np.array_equal(a, e), f"{where}: '{k}' differs"


def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install_hooks(writer: StoreWriter) -> None:
    before_done = int(os.environ.get("VLCACHE_TEST_KILL_BEFORE_DONE", -1))
    mid_arrays = int(os.environ.get("VLCACHE_TEST_KILL_MID_ARRAYS", -1))
    in_pack = int(os.environ.get("VLCACHE_TEST_KILL_IN_PACK", -1))
    backend_write = writer.backend.write_rows
    half = len(writer.layout.specs()) // 2
    written: dict[int, int] = {}

    def write_rows(path, start, data):
        block = start // writer.layout.block_size
        if path == DONE and int(np.asarray(data).max(initial=0)) == 1 and block == before_done:
            _die()
        backend_write(path, start, data)
        if path != DONE:
            written[block] = written.get(block, 0) + 1
            if block == mid_arrays and written[block] == half:
                _die()

    writer.backend.write_rows = write_rows
    if in_pack >= 0:
        import h5py

        create = h5py.Group.create_dataset
        count = [0]

        def create_dataset(self, *a, **kw):
            count[0] += 1
            if count[0] > in_pack:
                _die()
            return create(self, *a, **kw)

        h5py.Group.create_dataset = create_dataset


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--sleep", type=float, default=0.0)
    args = ap.parse_args(argv)
    kill_after = int(os.environ.get("VLCACHE_TEST_KILL_AFTER_BLOCKS", -1))
    writer = StoreWriter(args.url, LAYOUT, ATTRS, rank=args.rank, world_size=args.world)
    _install_hooks(writer)
    pending = writer.pending_blocks()
    for i, block in enumerate(pending):
        if i == kill_after:
            _die()
        time.sleep(args.sleep)
        writer.write_block(block, block_arrays(writer.layout, block))
    complete = writer.finalize(STATS)
    writer.close()
    print(json.dumps({"rank": args.rank, "written": pending, "complete": complete}))


if __name__ == "__main__":
    main()
