"""Stores on object storage, against a real S3-compatible HTTP server on loopback (moto's
ThreadedMotoServer) with s3fs as the client: push, open by URL from another process, inspect, pull back,
diff; requests per open/read counted on the server; credentials never stored or printed; missing
credentials, missing URLs and a copy killed midway."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image

from conftest import make_tiny_store

from vlcache.storage.backends import StoreAccessError, open_backend
from vlcache.storage.errors import StoreError, StoreNotFoundError
from vlcache.storage.fingerprint import fingerprint
from vlcache.storage.sharing import copy_store, diff_stores
from vlcache.storage.store import Store
from vlcache.storage.verify import format_info, info

ROOT = Path(__file__).resolve().parents[2]
KEY, SECRET = "AKIAVLCACHETESTKEY42", "vlcache/test+secret/Zq81xw"
BUCKET = "team-stores"
TAB10 = {0: (31, 119, 180), 1: (255, 127, 14), 2: (44, 160, 44), 3: (214, 39, 40), 4: (148, 103, 189)}


class _RequestLog(logging.Handler):
    """Every HTTP request the server answers ('GET /bucket/key'), from werkzeug's access log."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if '"' in msg:
            self.lines.append(msg.split('"')[1].rsplit(" ", 1)[0])


@pytest.fixture(scope="module")
def s3():
    log = _RequestLog()
    wz = logging.getLogger("werkzeug")
    wz.addHandler(log)
    wz.setLevel(logging.INFO)
    wz.propagate = False
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata probing on loopback tests
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint}}
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        yield SimpleNamespace(endpoint=endpoint, options=options, requests=log.lines)
        server.stop()
    wz.removeHandler(log)


@pytest.fixture(scope="module")
def pushed(s3, tmp_path_factory):
    """A tiny local store (20 rows, 3 blocks) pushed once to ``s3://team-stores/team/tiny.zarr``."""
    root = tmp_path_factory.mktemp("pushed")
    local = make_tiny_store(str(root / "tiny.zarr"), root / "images")
    url = f"s3://{BUCKET}/team/tiny.zarr"
    report = copy_store(local.url, url, storage_options_dst=s3.options, progress=False)
    return SimpleNamespace(local=local, url=url, report=report)


def env_with_credentials(s3) -> dict:
    """Another process configured the usual way: credentials and endpoint in the environment."""
    return {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


_INSPECT = """
import json, sys
from vlcache.storage.store import open_store
from vlcache.storage.inspect_png import inspect_image
url, png, images = sys.argv[1:4]  # the images are on the teammate's disk, the store on S3
with open_store(url, image_root=images) as s:
    k = s.index_of("img003")
    print(json.dumps({"rows": len(s), "labels": s.instances(k)["labels"].tolist(), "caption": s.captions(k)[0]}))
inspect_image(url, "img003", caption=0, out=png, image_root=images)
"""


def test_push_open_elsewhere_inspect_pull_back(s3, pushed, tmp_path):
    a, url, rep = pushed.local, pushed.url, pushed.report
    assert rep.complete and rep.blocks_copied == 3 and rep.fingerprint == fingerprint(a.url)

    # Credentials passed explicitly are used, never stored nor printed.
    with open_backend(url, "r", s3.options) as b:
        shown = json.dumps(b.attrs()) + repr(b)
    data = info(url, s3.options)
    diff = diff_stores(a.url, url, storage_options_b=s3.options)
    shown += format_info(data) + json.dumps(data, default=str) + rep.summary() + diff.summary()
    for secret in (KEY, SECRET):
        assert secret not in shown
    assert "s3://team-stores/team/tiny.zarr" in shown and diff.identical

    # A teammate's process opens it by URL, credentials and endpoint from its environment, and draws it.
    png = tmp_path / "img003.png"
    out = subprocess.run([sys.executable, "-c", _INSPECT, url, str(png), str(a.image_root)],
                         env=env_with_credentials(s3), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    t = a.truth
    assert seen["rows"] == 20 and seen["caption"] == t["captions/text"][3, 0]
    assert seen["labels"] == t["instances/labels"][3, :t["instances/count"][3]].tolist()
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300 and pixels.std() > 20
    for label in set(seen["labels"]):  # each instance's box/mask colour is drawn
        close = (np.abs(pixels - TAB10[label]).max(axis=-1) <= 12).sum()
        assert close > 30, (label, close)

    # Pulled back into a single HDF5 file: exactly the original.
    back = tmp_path / "back.h5"
    assert copy_store(url, back, storage_options_src=s3.options, progress=False).complete
    d = diff_stores(a.url, back)
    assert d.identical, d.summary()
    assert fingerprint(back) == fingerprint(url, s3.options) == fingerprint(a.url)


def test_open_is_one_request_and_reads_only_rows_asked_for(s3, pushed):
    a, url = pushed.local, pushed.url
    s3.requests.clear()
    backend = open_backend(url, "r", s3.options)
    assert s3.requests == [f"GET /{BUCKET}/team/tiny.zarr/zarr.json"]  # consolidated metadata: one GET
    store = Store(backend)
    store.instances(0)
    s3.requests.clear()
    inst = store.instances(19)  # row 19 is in block 2: only block 2's chunks of the 5 instance arrays
    assert len(inst["labels"]) == a.truth["instances/count"][19]
    assert len(s3.requests) == 5, s3.requests
    assert all(r.startswith(f"GET /{BUCKET}/team/tiny.zarr/instances/") and "/c/2" in r for r in s3.requests)
    store.close()


def test_hdf5_file_on_object_storage(s3, pushed):
    a = pushed.local
    url = f"s3://{BUCKET}/team/tiny.h5"
    rep = copy_store(a.url, url, storage_options_dst=s3.options, progress=False)
    assert rep.complete and rep.dst == url
    assert diff_stores(a.url, url, storage_options_b=s3.options).identical
    with pytest.raises(StoreError, match="exists; pass force=True"):
        copy_store(a.url, url, storage_options_dst=s3.options, progress=False)


def test_missing_urls_and_missing_credentials(s3, pushed, tmp_path, monkeypatch):
    a, url = pushed.local, pushed.url
    fs = s3fs.S3FileSystem(**s3.options)
    store_id = json.loads(fs.cat(f"{BUCKET}/team/tiny.zarr/zarr.json"))["attributes"]["store_id"]
    with pytest.raises(StoreNotFoundError, match=f"no vlcache store at s3://{BUCKET}/nothing.zarr"):
        open_backend(f"s3://{BUCKET}/nothing.zarr", "r", s3.options)
    with pytest.raises(StoreNotFoundError, match="no vlcache store at s3://no-such-bucket/x.zarr"):
        copy_store("s3://no-such-bucket/x.zarr", tmp_path / "x.zarr", storage_options_src=s3.options, progress=False)
    assert not (tmp_path / "x.zarr").exists()

    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    no_creds = {"client_kwargs": {"endpoint_url": s3.endpoint}}
    for action in (lambda: open_backend(url, "r", no_creds),
                   lambda: copy_store(url, tmp_path / "pulled.zarr", storage_options_src=no_creds, progress=False),
                   lambda: copy_store(a.url, f"s3://{BUCKET}/team/new.zarr", storage_options_dst=no_creds,
                                      progress=False)):
        with pytest.raises(StoreAccessError, match=f"no credentials to access s3://{BUCKET}/team/.*AWS_ACCESS_KEY_ID"
                           ) as e:
            action()
        assert "\n" not in str(e.value) and e.value.__cause__ is None
    # Both sides as they were: nothing pulled, nothing pushed, the source untouched.
    assert not (tmp_path / "pulled.zarr").exists()
    assert not fs.exists(f"{BUCKET}/team/new.zarr")
    assert json.loads(fs.cat(f"{BUCKET}/team/tiny.zarr/zarr.json"))["attributes"]["store_id"] == store_id
    assert attrs_complete(a.url)


_SLOW_PUSH = """
import sys, time
from vlcache.storage.sharing import copy_store
from vlcache.storage.writer import StoreWriter
orig = StoreWriter.write_block
def slow(self, block, arrays):
    orig(self, block, arrays)
    print("block", block, flush=True)
    time.sleep(0.3)
StoreWriter.write_block = slow
copy_store(sys.argv[1], sys.argv[2], progress=False, workers=1)
"""


def test_push_killed_midway_resumes(s3, tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr", n=16, block_size=4)
    url = f"s3://{BUCKET}/team/killed.zarr"
    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_PUSH, a.url, url], env=env_with_credentials(s3),
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        seen = [proc.stdout.readline()]
        while seen[-1] and not seen[-1].startswith("block"):  # '' = the push ended (it must not have)
            seen.append(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert seen[-1].startswith("block"), (seen, (tmp_path / "stderr.txt").read_text()[-3000:])
    half = info(url, s3.options)
    assert half["state"] == "incomplete" and 1 <= half["blocks"]["done"] < 4 and half["fingerprint"] is None
    assert not diff_stores(a.url, url, storage_options_b=s3.options).identical
    rep = copy_store(a.url, url, storage_options_dst=s3.options, progress=False)
    assert rep.blocks_already_done == half["blocks"]["done"] and rep.complete
    assert rep.blocks_copied + rep.blocks_already_done == 4
    assert diff_stores(a.url, url, storage_options_b=s3.options).identical


def attrs_complete(url) -> bool:
    with open_backend(url) as b:
        return bool(b.attr("complete"))


def test_streaming_from_object_storage(s3, pushed):
    """stream_loader over S3 gives the local store's batches, each chunk fetched once per epoch; an HDF5
    file on S3 streams too (through h5py; the memory-mapped fast paths are local-only)."""
    import torch

    from vlcache.storage.streaming import stream_loader

    fields = ["regions/feats", "regions/boxes", "captions/tokens"]

    def epoch(url, options=None):
        loader, _ = stream_loader(url, fields, 4, seed=3, window_blocks=2, storage_options=options)
        return [{k: (v.clone() if isinstance(v, torch.Tensor) else v.copy()) for k, v in b.items()} for b in loader]

    local = epoch(pushed.local.url)
    s3.requests.clear()
    remote = epoch(pushed.url, s3.options)
    chunk_gets = [r for r in s3.requests if "/c/" in r and "/images/" not in r]
    assert len(chunk_gets) == len(set(chunk_gets)) == 3 * len(fields), s3.requests  # 3 blocks, once each
    flags = [r for r in s3.requests if "/images/" in r]  # done + error once to pick the rows, done once to read
    assert sorted(flags) == sorted(f"GET /{BUCKET}/team/tiny.zarr/images/{a}/c/{b}"
                                   for a in ("done", "error", "done") for b in range(3)), flags
    h5_url = f"s3://{BUCKET}/team/stream.h5"
    copy_store(pushed.local.url, h5_url, storage_options_dst=s3.options, progress=False)
    for other in (remote, epoch(h5_url, s3.options)):
        assert len(other) == len(local) > 0
        for x, y in zip(local, other):
            for k in x:
                assert (torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else np.array_equal(x[k], y[k])), k
