"""Extraction is crash-safe, resumable and parallel: SIGKILL it anywhere, rerun, get the same store.

The reference is one uninterrupted in-process run. Extraction subprocesses (tests/helpers/extract_worker.py,
the real CLI plus kill hooks) are killed after k blocks, between a block's arrays and its done flags,
and in the middle of a forward pass; each rerun resumes, and the finished store equals the reference
array by array, with every row present once. Models are random-init (features ``none``) but seeded
from the config, so every process computes the same values. Two ranks writing concurrently give the
same store as one process. A content-config change is refused unless overwriting; runtime options
may change on resume.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlcache.pipeline.config import load_config
from vlcache.pipeline.datasets import load_dataset
from vlcache.pipeline.synth import generate
from vlcache.stages.extract.config import ExtractConfig
from vlcache.stages.extract.loop import extract
from vlcache.storage.backends import open_backend
from vlcache.storage.errors import ConfigMismatchError
from vlcache.storage.store import open_store
from vlcache.storage.writer import StoreWriter

torch.set_num_threads(2)  # the workers use 2 threads too (VLCACHE_TEST_THREADS): same numerics

WORKER = Path(__file__).parents[1] / "helpers" / "extract_worker.py"
N, BLOCK = 10, 2  # 5 blocks
SETS = ["detector.backend=annotations", "features.weights=none", "features.input_size=64", "features.grid_size=2",
        "features.max_regions=6", "features.fixed_regions=6", "features.min_regions=2", f"block_size={BLOCK}",
        "features.region_min_size=64", "features.region_max_size=128"]


def config(*extra: str, batch: int = 2, workers: int = 0) -> ExtractConfig:
    return load_config(ExtractConfig, overrides=[*SETS, f"runtime.batch_size={batch}",
                                                 f"runtime.num_workers={workers}", *extra])


def read_all(url: str) -> dict[str, np.ndarray]:
    with open_backend(url) as b:
        return {p: np.asarray(b.read(p, slice(None))) for p in b.arrays()}


def done_of(url: str) -> np.ndarray:
    with open_backend(url) as b:
        return np.asarray(b.read("images/done", slice(None))).astype(bool)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth-kill")
    generate(root / "data", n_images=N, seed=5, size=(64, 64))
    ds = load_dataset(root / "data" / "dataset_synth.json", instances=root / "data" / "instances.json")
    url = str(root / "reference.zarr")
    summary = extract(ds, url, config(), progress=False)
    assert summary.complete and summary.images_done == N
    return root / "data", ds, url, read_all(url)


def worker_cmd(data: Path, url: str, *flags: str, batch: int = 2, workers: int = 0) -> list[str]:
    return [sys.executable, str(WORKER), "extract", "--dataset", str(data / "dataset_synth.json"),
            "--instances", str(data / "instances.json"), "--out", url, "--batch-size", str(batch),
            "--num-workers", str(workers), *flags, *[a for s in SETS for a in ("--set", s)]]


def worker_env(**hooks) -> dict:
    return {**os.environ, "VLCACHE_TEST_THREADS": "2", **{f"VLCACHE_TEST_{k}": str(v) for k, v in hooks.items()}}


def run_worker(data, url, *flags, batch=2, workers=0, **hooks) -> subprocess.CompletedProcess:
    return subprocess.run(worker_cmd(data, url, *flags, batch=batch, workers=workers), env=worker_env(**hooks),
                          capture_output=True, text=True, timeout=300)


def assert_killed(proc) -> None:
    assert proc.returncode == -signal.SIGKILL, f"not killed: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def assert_whole_blocks(done: np.ndarray) -> None:
    per_block = done.reshape(-1, BLOCK)
    assert (per_block.all(1) | ~per_block.any(1)).all(), f"a block is partly done: {done.astype(int)}"


def assert_done_rows_final(url: str, reference: dict) -> np.ndarray:
    """Rows marked done already hold exactly the uninterrupted run's values; returns the done mask."""
    done = done_of(url)
    rows = np.flatnonzero(done)
    with open_backend(url) as b:
        for path, ref in reference.items():
            assert np.array_equal(np.asarray(b.read(path, rows)), ref[rows]), f"done rows of '{path}' differ"
    return done


def assert_equal_stores(url: str, reference: dict, ds) -> None:
    got = read_all(url)
    assert sorted(got) == sorted(reference)
    for path, ref in reference.items():
        assert got[path].dtype == ref.dtype and got[path].shape == ref.shape, path
        assert np.array_equal(got[path], ref), f"'{path}' differs from the uninterrupted run"
    ids = got["images/id"].tolist()
    assert ids == [r.id for r in ds.records] and len(set(ids)) == N  # none missing, none duplicated
    assert got["images/done"].all()


def test_kill_anywhere_then_resume_equals_uninterrupted_run(synth, tmp_path):
    data, ds, _, reference = synth
    url = str(tmp_path / "killed.zarr")
    blocks = lambda done: np.flatnonzero(done.reshape(-1, BLOCK).all(1)).tolist()  # noqa: E731

    r = run_worker(data, url, KILL_AFTER_BLOCKS=2)  # killed right after block 1's done flags
    assert_killed(r)
    assert blocks(assert_done_rows_final(url, reference)) == [0, 1]

    r = run_worker(data, url, KILL_BEFORE_DONE=3)  # resumes at block 2; dies with block 3's arrays written
    assert_killed(r)
    done = assert_done_rows_final(url, reference)
    assert blocks(done) == [0, 1, 2]
    with open_backend(url) as b:  # block 3's rows are there but not done: readers treat them as absent
        assert b.read("images/id", slice(6, 8)).tolist() == reference["images/id"][6:8].tolist()
    assert open_store(url).rows().tolist() == list(range(6))

    # a runtime change (decode workers) is accepted on resume; killed at the start of its 2nd forward pass
    r = run_worker(data, url, workers=2, KILL_AT_BATCH=2)
    assert_killed(r)
    done = assert_done_rows_final(url, reference)
    assert_whole_blocks(done)
    assert blocks(done) in ([0, 1, 2], [0, 1, 2, 3])  # block 3 may or may not have left the writer thread

    r = run_worker(data, url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "store complete: True" in r.stdout
    assert_equal_stores(url, reference, ds)
    assert open_store(url).attrs["complete"] is True


def test_two_ranks_give_the_same_store_as_one_process(synth, tmp_path):
    data, ds, _, reference = synth
    url = str(tmp_path / "ranks.zarr")
    procs = [subprocess.Popen(worker_cmd(data, url), env={**worker_env(), "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err
    # each rank did its own blocks (0, 2, 4 and 1, 3): 3 and 2 blocks of 2 images
    assert "extracted 6 images" in outs[0][0] and "extracted 4 images" in outs[1][0]
    assert "store complete: True" in outs[0][0] + outs[1][0]  # whichever finished last marked it complete
    assert_equal_stores(url, reference, ds)
    assert open_store(url).attrs["complete"] is True


def test_content_change_refused_unless_overwrite(synth, tmp_path):
    _, ds, ref_url, reference = synth
    url = str(tmp_path / "copy.zarr")
    shutil.copytree(ref_url, url)
    with pytest.raises(ConfigMismatchError, match=r"features\.grid_size \(stored 2, given 4\)"):
        extract(ds, url, config("features.grid_size=4"), progress=False)
    with pytest.raises(ConfigMismatchError, match=r"seed \(stored 0, given 1\)"):
        extract(ds, url, config("seed=1"), progress=False)
    with pytest.raises(ConfigMismatchError, match=r"match \(stored 'synonyms', given 'exact'\)"):
        extract(ds, url, config("match=exact"), progress=False)
    assert_equal_stores(url, reference, ds)  # refused before anything was touched

    # runtime options are not content: accepted, and a complete store has nothing left to do
    summary = extract(ds, url, config(batch=1, workers=2), progress=False)
    assert summary.complete and summary.images_done == 0 and summary.blocks_written == 0
    assert summary.describe().startswith(f"extracted 0 images: every row of {url} was already done")

    summary = extract(ds, url, config("features.grid_size=4"), overwrite=True, progress=False)
    assert summary.complete and summary.images_done == N
    store = open_store(url)
    assert store.attrs["config"]["features"]["grid_size"] == 4 and store.grid(0).shape == (16, 2048)


def test_writer_error_stops_the_run_and_resume_accepts_new_batch_size(synth, tmp_path, monkeypatch):
    _, ds, _, reference = synth
    url = str(tmp_path / "failing.zarr")
    write_block = StoreWriter.write_block

    def failing(self, block, arrays):
        if block == 2:
            raise OSError(f"disk full while writing block {block}")
        write_block(self, block, arrays)

    monkeypatch.setattr(StoreWriter, "write_block", failing)
    with pytest.raises(OSError, match="disk full while writing block 2"):
        extract(ds, url, config(), progress=False)
    assert done_of(url).tolist() == [True] * 4 + [False] * 6  # blocks after the failed one were not written
    monkeypatch.undo()

    # resume with another batch size and decode workers: accepted; batch size changes float rounding
    # (batched convolutions), so the resumed rows agree to float16 precision, the earlier ones exactly
    summary = extract(ds, url, config(batch=3, workers=2), progress=False)
    assert summary.complete and summary.images_done == N - 4
    got = read_all(url)
    for path, ref in reference.items():
        if ref.dtype.kind == "f":
            assert np.array_equal(got[path][:4], ref[:4]), path
            np.testing.assert_allclose(got[path].astype(np.float32), ref.astype(np.float32), rtol=1e-2, atol=1e-3,
                                       err_msg=path)
        else:
            assert np.array_equal(got[path], ref), path
