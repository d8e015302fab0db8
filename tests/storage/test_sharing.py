"""copy_store / diff_stores / fingerprint on real stores: local Zarr and HDF5, memory://, http:// (a real
HTTP server on loopback), an unfinished source, a copy killed with SIGKILL and resumed, and bad input."""

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from vlcache.storage.backends import open_backend
from vlcache.storage.errors import SchemaVersionError, StoreError, StoreNotFoundError
from vlcache.storage.fingerprint import compute_fingerprint, fingerprint
from vlcache.storage.schema import DONE
from vlcache.storage.sharing import copy_store, diff_stores
from vlcache.storage.store import open_store
from vlcache.storage.verify import format_info, info, verify
from vlcache.storage.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]


def attrs_of(url):
    with open_backend(url) as b:
        return b.attrs()


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    return msg


def test_round_trip_zarr_hdf5_zarr_is_exact(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr")
    b, c = str(tmp_path / "b.h5"), str(tmp_path / "c.zarr")
    rep = copy_store(a.url, b, progress=False)
    assert (rep.blocks_total, rep.blocks_copied, rep.blocks_already_done, rep.complete) == (3, 3, 0, True)
    rep2 = copy_store(b, c, progress=False)
    assert rep2.complete and rep2.blocks_copied == 3
    for other in (b, c):
        d = diff_stores(a.url, other)
        assert d.identical, d.summary()
        assert d.arrays and all(n == 0 for n in d.arrays.values()) and d.fingerprint_a == d.fingerprint_b
    # One fingerprint for the same data in both formats, recorded at finalize and equal to the content hash.
    fps = {fingerprint(u) for u in (a.url, b, c)}
    assert len(fps) == 1 and len(fps.pop()) == 16
    assert fingerprint(b, recompute=True) == fingerprint(a.url) == rep.fingerprint == rep2.fingerprint
    src, dst = attrs_of(a.url), attrs_of(c)
    for key in ("layout", "config", "classes", "dataset", "fingerprint", "schema_version"):
        assert dst[key] == src[key], key
    assert dst["complete"] is True and dst["store_id"] != src["store_id"]
    assert dst["copied_from"]["url"] == b and dst["copied_from"]["store_id"] == attrs_of(b)["store_id"]
    assert verify(c).ok
    assert diff_stores(a.url, "file://" + c).identical  # file:// URLs are local paths
    with open_store(c) as s:
        k = a.truth["instances/count"][4]
        np.testing.assert_array_equal(s.instances(4)["masks"], a.truth["instances/masks"][4, :k])


def test_complete_destination_is_not_overwritten_unless_forced(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr")
    dst = str(tmp_path / "copy.zarr")
    copy_store(a.url, dst, progress=False)
    before = attrs_of(dst)["store_id"]
    with pytest.raises(StoreError, match="is a complete store .*force=True") as e:
        copy_store(a.url, dst, progress=False)
    one_line(e)
    assert attrs_of(dst)["store_id"] == before and diff_stores(a.url, dst).identical
    rep = copy_store(a.url, dst, force=True, progress=False)
    assert rep.blocks_copied == 3 and attrs_of(dst)["store_id"] != before
    assert diff_stores(a.url, dst).identical


def test_diff_names_what_differs(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr")
    b = str(tmp_path / "b.zarr")
    copy_store(a.url, b, progress=False)
    with open_backend(b, "r+", force=True) as w:
        feats = w.read_block("regions/feats", 1)
        feats[[0, 3, 5], 0, 0] += 1  # rows 8, 11, 13 (row 11 is an error row: still a done row)
        w.write_rows("regions/feats", 8, feats)
        ids = w.read_block("images/id", 0)
        ids[[1, 2]] = ids[[2, 1]]
        w.write_rows("images/id", 0, ids)
        w.update_attrs(config={"detector": "other"})
    d = diff_stores(a.url, b)
    assert not d.identical
    assert d.arrays["regions/feats"] == 3 and d.arrays["images/id"] == 2
    assert sum(d.arrays.values()) == 5 and d.ids_differ == 2 and not d.rows_same
    assert d.config == ["detector (stored 'synthetic', given 'other')"]
    assert d.fingerprint_a != d.fingerprint_b and d.fingerprint_a == fingerprint(a.url)
    text = d.summary()
    assert "regions/feats: 3 rows differ" in text and "DIFFERENT" in text


def test_unfinished_source_then_resume(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr", blocks=[0, 2], finalize=False)
    dst = str(tmp_path / "copy.h5")
    rep = copy_store(a.url, dst, progress=False)
    assert (rep.blocks_copied, rep.blocks_not_in_source, rep.complete) == (2, 1, False)
    assert "not complete" in rep.summary()
    assert info(dst)["blocks"]["done"] == 2 and info(dst)["state"] == "writing"
    # The source finishes; the rerun copies only the new block and finalizes.
    with StoreWriter(a.url) as w:
        rows = a.layout.block_rows(1)
        w.write_block(1, {p: v[rows.start:rows.stop] for p, v in a.truth.items() if p != DONE})
        assert w.finalize()
    rep = copy_store(a.url, dst, progress=False)
    assert (rep.blocks_copied, rep.blocks_already_done, rep.complete) == (1, 2, True)
    assert diff_stores(a.url, dst).identical and fingerprint(dst) == fingerprint(a.url)


_SLOW_COPY = """
import sys, time
from vlcache.storage.sharing import copy_store
from vlcache.storage.writer import StoreWriter
orig = StoreWriter.write_block
def slow(self, block, arrays):
    orig(self, block, arrays)
    print("block", block, flush=True)
    time.sleep(0.4)
StoreWriter.write_block = slow
copy_store(sys.argv[1], sys.argv[2], progress=False, workers=2)
print("finished", flush=True)
"""


def test_copy_killed_midway_resumes(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr", n=40, block_size=4)
    dst = str(tmp_path / "copy.h5")
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_COPY, a.url, dst], stdout=subprocess.PIPE,
                                stderr=err, text=True, cwd=ROOT)
        seen = []
        while len([s for s in seen if s.startswith("block")]) < 3 and (not seen or seen[-1]):
            seen.append(proc.stdout.readline())  # '' = the copy ended (it must not have)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen[-1].startswith("block"), (seen, (tmp_path / "stderr.txt").read_text()[-3000:])
    # The destination is a normal unfinished store: not readable as finished, resumable.
    with pytest.raises(StoreNotFoundError, match="still being written") as e:
        diff_stores(a.url, dst)
    one_line(e)
    done_before = info(dst)["blocks"]["done"]
    assert 3 <= done_before < 10
    rep = copy_store(a.url, dst, progress=False)
    assert rep.blocks_already_done == done_before and rep.blocks_copied == 10 - done_before and rep.complete
    d = diff_stores(a.url, dst)
    assert d.identical, d.summary()
    assert verify(dst).ok


def test_bad_input(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr")
    with pytest.raises(StoreNotFoundError, match="no vlcache store at .*nowhere.zarr") as e:
        copy_store(tmp_path / "nowhere.zarr", tmp_path / "x.zarr", progress=False)
    one_line(e)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(StoreNotFoundError, match="no vlcache store") as e:
        copy_store(junk, tmp_path / "x.zarr", progress=False)
    one_line(e)
    # A destination that holds something else is left alone.
    with pytest.raises(StoreError, match="not a vlcache store; refusing") as e:
        copy_store(a.url, junk, progress=False)
    one_line(e)
    assert (junk / "notes.txt").read_text() == "mine" and sorted(os.listdir(junk)) == ["notes.txt"]
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(StoreError, match="same store"):
        copy_store(a.url, a.url + "/", progress=False)
    with pytest.raises(StoreError, match="read-only"):
        copy_store(a.url, "https://example.invalid/team/store.zarr", progress=False)
    # A store written by a newer vlcache: refused on open, by copy and by diff.
    newer = str(tmp_path / "newer.zarr")
    copy_store(a.url, newer, progress=False)
    meta = json.loads(Path(newer, "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    Path(newer, "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(SchemaVersionError, match="schema_version 99, newer than this vlcache") as e:
        copy_store(newer, tmp_path / "y.zarr", progress=False)
    one_line(e)
    assert not (tmp_path / "y.zarr").exists()
    with pytest.raises(SchemaVersionError):
        diff_stores(a.url, newer)


def test_fingerprint_recorded_computed_and_in_info(tiny_store_factory):
    a = tiny_store_factory("a.h5")
    recorded = attrs_of(a.url)["fingerprint"]
    with open_backend(a.url) as b:
        assert compute_fingerprint(b) == recorded
    data = info(a.url)
    assert data["fingerprint"] == recorded and f"fingerprint {recorded}" in format_info(data)
    z = tiny_store_factory("z.zarr")
    assert attrs_of(z.url)["fingerprint"] == recorded  # same content, other backend
    with open_backend(z.url, "r+", force=True) as w:
        w.update_attrs(fingerprint=None)
    assert fingerprint(z.url) == recorded and info(z.url)["fingerprint"] == recorded
    other = tiny_store_factory("other.zarr", seed=2)
    assert fingerprint(other.url) != recorded


def test_memory_url_round_trip(tiny_store_factory):
    a = tiny_store_factory("a.zarr")
    rep = copy_store(a.url, "memory://vlcache-test/team/a.zarr", progress=False)
    assert rep.complete
    assert diff_stores(a.url, "memory://vlcache-test/team/a.zarr").identical
    with open_store("memory://vlcache-test/team/a.zarr") as s:
        assert list(s.ids) == list(a.truth["images/id"])
    open_backend("memory://vlcache-test/team/a.zarr").close()


@pytest.fixture
def http_root(tmp_path):
    """A real HTTP server on loopback serving ``tmp_path/www`` (read-only, like a published store)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_store_is_readable_and_copyable(tiny_store_factory, http_root, tmp_path):
    www, base = http_root
    a = tiny_store_factory("a.zarr")
    copy_store(a.url, www / "published.zarr", progress=False)
    url = f"{base}/published.zarr"
    with open_store(url) as s:
        k = int(a.truth["instances/count"][5])
        np.testing.assert_array_equal(s.instances(5)["boxes"], a.truth["instances/boxes"][5, :k])
        assert s.captions(0) == list(a.truth["captions/text"][0, :a.truth["captions/count"][0]])
    assert verify(url).ok
    data = info(url)
    assert data["fingerprint"] == fingerprint(a.url) and data["size_bytes"] > 1000
    back = str(tmp_path / "back.zarr")
    assert copy_store(url, back, progress=False).complete
    assert diff_stores(a.url, back).identical
    with pytest.raises(StoreError, match="read-only"):
        open_backend(url, "r+")
    with pytest.raises(StoreNotFoundError, match="no vlcache store at http://127.0.0.1"):
        open_backend(f"{base}/missing.zarr")


def test_urls_are_redacted_before_they_are_shown():
    from vlcache.storage.backends import redact_url

    assert redact_url("https://alice:s3cr3t@data.example.org/stores/a.zarr?X-Amz-Signature=abc") == \
        "https://data.example.org/stores/a.zarr"
    assert redact_url("s3://bucket/team/a.zarr") == "s3://bucket/team/a.zarr"
    assert redact_url("/data/a@b.zarr") == "/data/a@b.zarr"
