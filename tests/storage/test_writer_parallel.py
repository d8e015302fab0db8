"""Two writer processes (rank 0 and 1 of 2) on disjoint blocks produce the same store as one writer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vlcache.storage.backends import open_backend
from vlcache.storage.errors import ConfigMismatchError, StoreNotFoundError
from vlcache.storage.verify import verify
from vlcache.storage.writer import StoreWriter

WORKER = Path(__file__).parents[1] / "helpers" / "write_worker.py"
_spec = importlib.util.spec_from_file_location("write_worker", WORKER)
ww = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ww)
LAYOUT = ww.LAYOUT


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_two_ranks_equal_one_writer(tmp_path, suffix):
    one, two = str(tmp_path / f"one{suffix}"), str(tmp_path / f"two{suffix}")
    ww.main([one])
    # rank 1 starts first: it must wait for rank 0 to create the store, not race it
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), two, "--rank", str(r), "--world", "2", "--sleep", "0.02"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (1, 0)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert sorted(b for r in results for b in r["written"]) == list(range(LAYOUT.num_blocks))
    assert {r["rank"]: r["written"] for r in results} == {0: [0, 2, 4], 1: [1, 3, 5]}
    assert any(r["complete"] for r in results)  # whichever finished last completed the store
    ww.assert_same(ww.read_all(two), ww.read_all(one), where="two ranks vs one")
    ww.assert_same(ww.read_all(two), ww.expected_arrays(LAYOUT), where="two ranks vs expected")
    with open_backend(two) as b, open_backend(one) as a:
        for key in ("complete", "config", "layout", "statistics"):
            assert b.attrs()[key] == a.attrs()[key]
    assert verify(two).ok
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two")) == [f"two{suffix}"]


def test_other_ranks_wait_for_rank_zero(tmp_path):
    url = str(tmp_path / "w.zarr")
    t0 = time.monotonic()
    with pytest.raises(StoreNotFoundError, match="rank 1: store .* was not created within"):
        StoreWriter(url, ww.LAYOUT, ww.ATTRS, rank=1, world_size=2, wait_timeout=0.3)
    assert time.monotonic() - t0 >= 0.3

    got = {}

    def rank1():
        got["w"] = StoreWriter(url, ww.LAYOUT, ww.ATTRS, rank=1, world_size=2, wait_timeout=30)

    t = threading.Thread(target=rank1)
    t.start()
    time.sleep(0.3)
    assert "w" not in got  # still waiting
    w0 = StoreWriter(url, ww.LAYOUT, ww.ATTRS, rank=0, world_size=2)
    t.join(timeout=30)
    assert got["w"].pending_blocks() == [1, 3, 5] and w0.pending_blocks() == [0, 2, 4]
    got["w"].close()
    w0.close()
    other = {**ww.ATTRS, "config": {"detector": "other"}}
    with pytest.raises(ConfigMismatchError, match="detector"):
        StoreWriter(url, ww.LAYOUT, other, rank=1, world_size=2, wait_timeout=0.2)


def test_concurrent_finalize_packs_hdf5_once(tmp_path):
    url = str(tmp_path / "c.h5")
    writers = [StoreWriter(url, ww.LAYOUT, ww.ATTRS, rank=r, world_size=2) for r in (0, 1)]
    for w in writers:
        for b in w.pending_blocks():
            w.write_block(b, ww.block_arrays(ww.LAYOUT, b))
    assert not Path(url).exists()
    results = [None, None]
    barrier = threading.Barrier(2)

    def fin(i):
        barrier.wait()
        results[i] = writers[i].finalize(ww.STATS)

    threads = [threading.Thread(target=fin, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == [True, True]
    assert all(w.backend.kind == "hdf5" and w.pending_blocks() == [] for w in writers)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
    ww.assert_same(ww.read_all(url), ww.expected_arrays(ww.LAYOUT), where=url)
    for w in writers:
        w.close()
