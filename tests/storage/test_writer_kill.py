"""SIGKILL a writer process at many points, rerun it: the store equals an uninterrupted one, row for row.

After every kill the half-written store is also checked: every row marked done already holds exactly
its final values (a kill never leaves a finished-looking row with wrong data).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vlcache.storage.backends import open_backend, staging_url
from vlcache.storage.errors import StoreError, StoreNotFoundError
from vlcache.storage.schema import DONE
from vlcache.storage.writer import StoreWriter, done_mask

WORKER = Path(__file__).parents[1] / "helpers" / "write_worker.py"
_spec = importlib.util.spec_from_file_location("write_worker", WORKER)
ww = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ww)
LAYOUT = ww.LAYOUT
EXPECTED = ww.expected_arrays(LAYOUT)


def run_worker(url: str, *args: str, **hooks) -> subprocess.CompletedProcess:
    env = {**os.environ, **{f"VLCACHE_TEST_{k}": str(v) for k, v in hooks.items()}}
    return subprocess.run([sys.executable, str(WORKER), url, *args], env=env, capture_output=True, text=True,
                          timeout=120)


def writing_url(url: str) -> str:
    """Where a store being written lives: the zarr store itself, or an HDF5 store's staging directory."""
    return staging_url(url) if url.endswith(".h5") else url


def assert_done_rows_are_final(url: str) -> np.ndarray:
    """Rows marked done hold exactly their final values; returns the done mask."""
    with open_backend(writing_url(url)) as b:
        done = done_mask(b)
        rows = np.nonzero(done)[0]
        for path, exp in EXPECTED.items():
            got = b.read(path, rows)
            assert np.array_equal(got, exp[rows]), f"done rows of '{path}' differ from the uninterrupted run"
    return done


def assert_killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, f"worker was not killed: rc={proc.returncode}\n{proc.stderr}"


def assert_finished_equals_reference(url: str, reference: str) -> None:
    actual = ww.read_all(url)
    ww.assert_same(actual, ww.read_all(reference), where=f"{url} vs uninterrupted {reference}")
    ww.assert_same(actual, EXPECTED, where=url)
    ids = actual["images/id"]
    assert len(set(ids)) == LAYOUT.num_rows  # no duplicated or missing rows
    with open_backend(url) as b, open_backend(reference) as r:
        a, e = b.attrs(), r.attrs()
        for key in ("complete", "config", "layout", "statistics", "dataset", "format", "schema_version"):
            assert a[key] == e[key], key


@pytest.fixture(params=["zarr", "hdf5"])
def kind(request):
    return request.param


def suffix(kind: str) -> str:
    return ".zarr" if kind == "zarr" else ".h5"


def test_kill_at_many_points_then_resume(kind, tmp_path):
    url, ref = str(tmp_path / f"killed{suffix(kind)}"), str(tmp_path / f"ref{suffix(kind)}")
    ww.main([ref])  # the uninterrupted run, in-process

    assert_killed(run_worker(url, KILL_AFTER_BLOCKS=2))  # after k whole blocks
    assert assert_done_rows_are_final(url).sum() == 8

    assert_killed(run_worker(url, KILL_BEFORE_DONE=3))  # block 3: arrays written, done not yet
    done = assert_done_rows_are_final(url)
    assert done.sum() == 12 and not done[12:16].any()
    with open_backend(writing_url(url)) as b:  # its arrays did land, but the rows stay absent
        np.testing.assert_array_equal(b.read_block("images/id", 3), EXPECTED["images/id"][12:16])

    assert_killed(run_worker(url, KILL_MID_ARRAYS=3))  # block 3 again, half of its arrays
    assert assert_done_rows_are_final(url).sum() == 12

    # resumed runs only write what is pending
    w = StoreWriter(url, LAYOUT, ww.ATTRS)
    assert w.pending_blocks() == [3, 4, 5] and not w.finalize()
    w.close()

    if kind == "hdf5":  # every block written, killed while packing the file
        assert_killed(run_worker(url, KILL_IN_PACK=5))
        assert not Path(url).exists() and list(tmp_path.glob("killed.h5.tmp-*"))
        with pytest.raises(StoreNotFoundError, match=r"still being written \(6/6 blocks done"):
            open_backend(url)

    out = run_worker(url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["complete"] is True
    assert_finished_equals_reference(url, ref)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("killed"))
    assert leftovers == [Path(url).name]  # no staging dir, no temp files


@pytest.mark.parametrize("after_blocks", [1, 4])
def test_kill_at_random_moments_then_resume(kind, tmp_path, after_blocks):
    """The parent kills the worker as soon as k blocks are done: mostly mid-write of the next block."""
    url, ref = str(tmp_path / f"timed{suffix(kind)}"), str(tmp_path / f"ref{suffix(kind)}")
    ww.main([ref])
    proc = subprocess.Popen([sys.executable, str(WORKER), url, "--sleep", "0.01"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with open_backend(writing_url(url)) as b:
                if done_mask(b).sum() >= after_blocks * LAYOUT.block_size:
                    break
        except StoreError:  # not created yet
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.returncode != 0:  # killed (it may rarely have finished first; then the rerun has nothing to do)
        assert_killed(proc)
        done = assert_done_rows_are_final(url)
        assert done.sum() >= after_blocks * LAYOUT.block_size
    out = run_worker(url)
    assert out.returncode == 0, out.stderr
    assert_finished_equals_reference(url, ref)
    with open_backend(url) as b:
        assert b.read(DONE, slice(None)).all()
