"""Reliability evidence (issue 7): SIGKILL at random moments, bad inputs, flipped bytes, concurrent readers.

* Extraction killed with SIGKILL at 10 seeded random moments (printed), each life resuming the same store;
  after every kill each done row already equals an uninterrupted run, and the finished store equals it.
  The lives are forked from a "zygote" process that imported torch once, so ten lives cost seconds:
  each is still a separate process that nothing can clean up after.
* Caption training killed mid-run and resumed: weights bit-identical to an uninterrupted run.
* `copy_store` killed mid-copy and rerun: the copy equals its source (``diff_stores``), for both backends.
* A battery of bad images and bad dataset files, each handled as documented; the count is printed.
* One flipped byte in the first chunk of every array of a store (Zarr and HDF5): named by
  ``verify`` and raised by reads.
* One writer and two reader processes at once: readers only ever see complete rows.

Everything is tiny (64 px images, 64 px feature input, 2x2 grid, the annotations detector) and runs on
the CPU with one torch thread, so numerics are identical across processes.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from PIL import Image
from synth_store import make_synth_store
from typer.testing import CliRunner

from vlcache.cli import app
from vlcache.pipeline.datasets import DatasetError, load_dataset
from vlcache.pipeline.records import karpathy_tokens
from vlcache.pipeline.runs import RunDir
from vlcache.pipeline.synth import generate
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
from vlcache.storage.backends import open_backend
from vlcache.storage.errors import CorruptChunkError
from vlcache.storage.fingerprint import fingerprint
from vlcache.storage.schema import DONE
from vlcache.storage.sharing import copy_store, diff_stores
from vlcache.storage.store import open_store
from vlcache.storage.verify import verify

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("write_worker", ROOT / "tests" / "helpers" / "write_worker.py")
ww = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ww)

SEED = 20240607  # the kill moments below are drawn from this seed and printed
EXTRACT_SETS = ["detector.backend=annotations", "features.weights=none", "features.input_size=64",
                "features.grid_size=2", "features.max_regions=6", "features.fixed_regions=6",
                "features.min_regions=2", "block_size=2", "features.region_min_size=64",
                "features.region_max_size=128"]


@pytest.fixture
def report(capsys):
    """``report(line)`` prints past pytest's capture, so `make test` (-q) shows the evidence."""

    def say(line: str) -> None:
        with capsys.disabled():
            print(f"\n[reliability] {line}", flush=True)

    return say


@pytest.fixture
def one_thread():
    """Run this test's torch work on one thread (what the subprocesses use): identical numerics."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def read_all(url: str) -> dict[str, np.ndarray]:
    with open_backend(url) as b:
        return {p: np.asarray(b.read(p, slice(None))) for p in b.arrays()}


# ---------------------------------------------------------------------------------- extraction kills
ZYGOTE = r'''
"""Imports torch and the extraction code once, then forks one child per command read from stdin.

Command (a JSON line): {"argv": [...CLI args], "sleep": seconds before each array write, "log": path}.
Replies (JSON lines on stdout): {"pid"}, then from the child {"ready"} once its StoreWriter is open,
then {"exit", "signal", "code"} when the child ends (killed or not).
"""
import json, os, sys, time, traceback
import torch
torch.set_num_threads(1)
from vlcache.cli import app
import vlcache.pipeline.config, vlcache.pipeline.datasets, vlcache.stages.extract.config  # noqa: F401
import vlcache.stages.extract.loop, vlcache.stages.extract.models  # noqa: F401  (what `extract` imports)
from vlcache.storage.writer import StoreWriter

OUT = sys.stdout.fileno()


def say(**msg):
    os.write(OUT, (json.dumps(msg) + "\n").encode())


def child(cmd):
    global OUT
    torch.set_num_threads(1)
    OUT = os.dup(1)  # replies still reach the parent; the CLI's own output goes to the log
    log = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    init, pause = StoreWriter.__init__, float(cmd["sleep"])

    def hooked_init(self, *a, **kw):
        init(self, *a, **kw)
        if pause:  # slow the writer down so random moments land inside blocks, not only between them
            write = self.backend.write_rows

            def slow(path, start, data):
                time.sleep(pause)
                write(path, start, data)

            self.backend.write_rows = slow
        say(ready=os.getpid())

    StoreWriter.__init__ = hooked_init
    code = 0
    try:
        app(args=cmd["argv"], prog_name="vlcache")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


while True:
    line = sys.stdin.readline()
    if not line:
        break
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        child(cmd)
    say(pid=pid)
    _, status = os.waitpid(pid, 0)
    say(exit=pid, signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
        code=os.WEXITSTATUS(status) if os.WIFEXITED(status) else None)
'''


class Zygote:
    """Drives the zygote: ``start`` a forked extraction, wait for it to be ready, kill it or let it end."""

    def __init__(self, folder: Path):
        (folder / "zygote.py").write_text(ZYGOTE)
        self.log = folder / "lives.log"
        # its own process group: on a failed test, close() ends the zygote and any live child at once
        self.proc = subprocess.Popen([sys.executable, str(folder / "zygote.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, cwd=ROOT, start_new_session=True)
        self.buf = b""

    def _next(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"zygote died (rc={self.proc.poll()}); log:\n{self._tail()}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def start(self, argv: list[str], sleep: float = 0.0) -> int:
        self.proc.stdin.write((json.dumps({"argv": argv, "sleep": sleep, "log": str(self.log)}) + "\n").encode())
        self.proc.stdin.flush()
        msg = self._next(60)
        assert msg and "pid" in msg, f"no pid from the zygote: {msg}"
        return msg["pid"]

    def ready_or_exit(self, timeout: float = 120) -> dict:
        msg = self._next(timeout)
        assert msg is not None, f"extraction neither got ready nor ended in {timeout}s; log:\n{self._tail()}"
        return msg

    def run_to_end(self, argv: list[str]) -> dict:
        self.start(argv)
        while True:
            msg = self.ready_or_exit()
            if "exit" in msg:
                assert msg["code"] == 0 and msg["signal"] == 0, f"extraction failed: {msg}\n{self._tail()}"
                return msg

    def close(self):
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a child still running (the test failed mid-life)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def assert_whole_blocks(done: np.ndarray, block: int) -> None:
    per_block = done.reshape(-1, block)
    assert (per_block.all(1) | ~per_block.any(1)).all(), f"a block is partly done: {done.astype(int)}"


def done_count(url: str) -> int:
    with open_backend(url) as b:
        return int(np.asarray(b.read(DONE, slice(None))).sum())


def test_extraction_killed_at_10_random_moments_resumes_to_the_uninterrupted_store(tmp_path, report):
    n, block = 48, 2  # 24 blocks; a life finishes at most 2 (see the moments below), so 10 lives never finish
    generate(tmp_path / "data", n_images=n, seed=3, size=(64, 64))
    data = tmp_path / "data"

    def argv(url):
        return ["extract", "--dataset", str(data / "dataset_synth.json"), "--instances", str(data / "instances.json"),
                "--out", url, "--batch-size", "2", "--num-workers", "0",
                *[a for s in EXTRACT_SETS for a in ("--set", s)]]

    zyg = Zygote(tmp_path)
    try:
        ref_url, url = str(tmp_path / "reference.zarr"), str(tmp_path / "killed.zarr")
        zyg.run_to_end(argv(ref_url))
        reference = read_all(ref_url)
        # A moment: let the life finish `k` more blocks (0 or 1), then kill it `delay` seconds later. The writer
        # sleeps 20 ms before each of a block's 26 array writes (>= 0.52 s a block), so the delay lands anywhere
        # in the next block: between arrays, inside a chunk file's write, before the done flags, or in compute.
        rng = random.Random(SEED)
        moments = [(rng.randint(0, 1), round(rng.uniform(0.0, 0.5), 3)) for _ in range(10)]
        report(f"extraction kill moments (seed {SEED}), (blocks to finish, then seconds): {moments}")
        progress = []
        for life, (k, delay) in enumerate(moments):
            pid = zyg.start(argv(url), sleep=0.02)
            msg = zyg.ready_or_exit()
            assert msg.get("ready") == pid, f"life {life}: not ready: {msg}"
            target, deadline = (progress[-1] if progress else 0) * block + k * block, time.monotonic() + 120
            while done_count(url) < target:  # a reader polling the live store
                assert time.monotonic() < deadline, f"life {life}: no progress"
                early = zyg._next(0.02)
                assert early is None, f"life {life} ended before its kill: {early}"
            early = zyg._next(delay)
            assert early is None, f"life {life} ended before its kill at +{delay}s: {early}"
            os.kill(pid, signal.SIGKILL)
            msg = zyg.ready_or_exit(60)
            assert msg == {"exit": pid, "signal": signal.SIGKILL, "code": None}, msg
            with open_backend(url) as b:  # no writer alive: what a reader would see now
                done = np.asarray(b.read(DONE, slice(None))).astype(bool)
                rows = np.flatnonzero(done)
                for path, ref in reference.items():
                    got = np.asarray(b.read(path, rows))
                    assert np.array_equal(got, ref[rows]), f"after kill {life}: done rows of '{path}' differ"
            assert_whole_blocks(done, block)
            assert not done.all(), f"kill {life}: the store finished before the last kill"
            progress.append(int(done.sum()) // block)
        report(f"blocks done after each kill: {progress} of {n // block}")
        assert progress == sorted(progress)  # resumed lives never lose a finished block
        assert progress[-1] >= sum(k for k, _ in moments)  # every life asked to finish a block did
        zyg.run_to_end(argv(url))  # the final, uninterrupted resume
    finally:
        zyg.close()
    got = read_all(url)
    assert sorted(got) == sorted(reference)
    for path, ref in reference.items():
        assert got[path].dtype == ref.dtype and np.array_equal(got[path], ref), f"'{path}' differs from the reference"
    ids = got["images/id"].tolist()
    assert len(ids) == n and len(set(ids)) == n and got[DONE].all()  # none lost, none duplicated
    assert open_store(url).attrs["complete"] is True and verify(url).ok
    assert "store complete: True" in (tmp_path / "lives.log").read_text()


# ------------------------------------------------------------------------------------ training kill
TRAIN_SCRIPT = r'''
import json, sys, time, torch
torch.set_num_threads(1)
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
cfg = CaptionTrainConfig(**json.loads(sys.argv[1]))

def on_step(step, terms):
    print(f"step {step}", flush=True)
    time.sleep(0.08)  # slow enough that the parent's kill lands mid-run

train_caption(cfg, sys.argv[2], progress=False, on_step=on_step)
print("finished", flush=True)
'''


def test_caption_training_killed_then_resumed_equals_uninterrupted(tmp_path, report, one_thread):
    url, _ = make_synth_store()
    cfg = CaptionTrainConfig(store=url, epochs=2, batch_images=8, dropout=0.5, checkpoint_every=2, log_every=1,
                             val_max_images=2, embed_dim=32, attn_dim=32, hidden_dim=32, num_workers=0,
                             device="cpu", beam_size=2, max_len=20)
    full = train_caption(cfg, tmp_path / "full", progress=False)
    assert full["steps"] >= 8  # >= 5 more steps of >= 80 ms after step 3: the kill below lands mid-run
    delay = round(random.Random(SEED + 1).uniform(0.0, 0.35), 3)
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_SCRIPT, json.dumps(cfg.__dict__), str(tmp_path / "killed")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    seen = []
    while not seen or seen[-1] != "step 3":  # past the first checkpoint (step 2)
        line = proc.stdout.readline()
        assert line, f"training ended early: {proc.stderr.read()[-2000:]}"
        seen.append(line.strip())
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"not killed (rc {proc.returncode})"
    killed_at = RunDir(tmp_path / "killed").load_checkpoint("last")
    report(f"caption training killed {delay}s after step 3 (seed {SEED + 1}); last checkpoint at step "
           f"{killed_at['step']} of {full['steps']}")
    assert 2 <= killed_at["step"] < full["steps"]

    resumed = train_caption(cfg, tmp_path / "killed", progress=False)
    assert resumed["steps"] == full["steps"] and resumed["epochs_completed"] == full["epochs_completed"]
    a, b = RunDir(tmp_path / "full").load_checkpoint("last"), RunDir(tmp_path / "killed").load_checkpoint("last")
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), f"weight {name} differs after kill + resume"
    assert a["best"] == b["best"] and a["epoch"] == b["epoch"]
    steps = [r["step"] for r in RunDir(tmp_path / "killed").metrics() if "loss" in r]
    assert steps == list(range(1, full["steps"] + 1))  # no step logged twice or lost
    leftovers = [p.name for p in (tmp_path / "killed" / "checkpoints").iterdir() if not p.name.endswith(".pt")]
    assert leftovers == [], f"temporary checkpoint files left behind: {leftovers}"


# ---------------------------------------------------------------------------------------- copy kill
COPY_SCRIPT = r'''
import sys, time
from vlcache.storage.sharing import copy_store
from vlcache.storage.writer import StoreWriter
write_block = StoreWriter.write_block

def slow(self, block, arrays):
    time.sleep(0.08)
    write_block(self, block, arrays)
    print("block", block, flush=True)

StoreWriter.write_block = slow
copy_store(sys.argv[1], sys.argv[2], progress=False, workers=2)
print("finished", flush=True)
'''


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_store_copy_killed_then_rerun_equals_its_source(tiny_store_factory, tmp_path, report, suffix):
    src = tiny_store_factory("src.zarr", n=48, block_size=2)  # 24 blocks
    dst = str(tmp_path / f"copy{suffix}")
    delay = round(random.Random(f"{SEED}{suffix}").uniform(0.0, 0.4), 3)
    proc = subprocess.Popen([sys.executable, "-c", COPY_SCRIPT, src.url, dst], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT)
    assert proc.stdout.readline().startswith("block")
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    staging = dst if suffix == ".zarr" else dst + ".partial.zarr"
    with open_backend(staging) as b:  # every block the killed copy marked done is already exact
        done = np.asarray(b.read(DONE, slice(None))).astype(bool)
        rows = np.flatnonzero(done)
        for path, truth in src.truth.items():
            assert np.array_equal(np.asarray(b.read(path, rows)), truth[rows]), path
    before = int(done.sum()) // 2
    report(f"store copy to {suffix} killed {delay}s after its first block: {before}/24 blocks done")
    assert 1 <= before < 24
    rep = copy_store(src.url, dst, progress=False)
    assert rep.complete and rep.blocks_already_done == before and rep.blocks_copied == 24 - before
    d = diff_stores(src.url, dst)
    assert d.identical, d.summary()
    assert fingerprint(dst) == fingerprint(src.url) == rep.fingerprint
    assert verify(dst).ok
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("copy")) == [Path(dst).name]


# ----------------------------------------------------------------------------------- bad input battery
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _jpeg(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def image_battery(folder: Path) -> dict[str, tuple]:
    """name -> ("bad", reason fragment) or ("good", (h, w) as stored); every file written here."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(11)
    rgb = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    out = {}
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 256, 2048, dtype=np.uint8).tobytes())
    out["corrupt.jpg"] = ("bad", "not an image")
    whole = _jpeg(rgb)
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    out["truncated.jpg"] = ("bad", "truncated or corrupt image data")
    (folder / "zero.png").write_bytes(b"")
    out["zero.png"] = ("bad", "empty file (0 bytes)")
    out["missing.png"] = ("bad", "file not found")
    (folder / "bomb.png").write_bytes(bomb_png(60_000, 60_000))  # 3.6e9 pixels: PIL refuses to open it
    out["bomb.png"] = ("bad", "too large")
    (folder / "bomb2.png").write_bytes(bomb_png(10_000, 10_000))  # 1e8: PIL's warning, escalated to an error
    out["bomb2.png"] = ("bad", "too large")
    Image.new("RGB", (1, 1), (3, 4, 5)).save(folder / "pixel.png")
    out["pixel.png"] = ("bad", "image too small (1x1")
    (folder / "folder.jpg").mkdir()
    out["folder.jpg"] = ("bad", "not a regular file")
    Image.fromarray(rgb[..., 1]).save(folder / "grey.png")
    out["grey.png"] = ("good", (48, 40))
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(folder / "rgba.png")
    out["rgba.png"] = ("good", (48, 40))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    out["cmyk.jpg"] = ("good", (48, 40))
    Image.fromarray(rng.integers(0, 65536, (48, 40)).astype(np.uint16)).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I;16")
    out["deep16.png"] = ("good", (48, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 48x40 stored, 40x48 shown
    (folder / "exif6.jpg").write_bytes(_jpeg(rgb, exif=exif.tobytes()))
    out["exif6.jpg"] = ("good", (40, 48))
    Image.fromarray(rgb).save(folder / "plain.png")
    out["plain.png"] = ("good", (48, 40))
    return out


def _karpathy(images: list[dict]) -> dict:
    return {"images": images, "dataset": "battery"}


def _kimg(name, split="train", caps=("a dog on a mat",), cocoid=None):
    d = {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": list(karpathy_tokens(c))} for c in caps]}
    if cocoid is not None:
        d["cocoid"] = cocoid
    return d


def dataset_battery(folder: Path) -> list[tuple[str, Path, dict, str, Path]]:
    """(case, dataset file, load_dataset kwargs, expected DatasetError fragment, the file the error must name)."""
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    cases = []

    def add(case, name, content, fragment, **kw):
        p = folder / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        cases.append((case, p, kw, fragment, p))

    good = json.dumps(_karpathy([_kimg("a.png", cocoid=1)]))
    add("malformed JSON (truncated file)", "dataset_trunc.json", good[: len(good) // 2], "malformed JSON at line 1")
    add("malformed JSONL line", "bad.jsonl",
        '{"id": 1, "image": "a.png", "split": "train", "captions": ["x"]}\n{"id": 2, "image": \n',
        "line 2: malformed JSON")
    add("not UTF-8", "dataset_latin1.json", good.replace("a dog", "ein Hünd").encode("latin-1"),
        "cannot read dataset file")
    add("JSON nested 100k deep", "dataset_deep.json", "[" * 100_000 + "]" * 100_000, "JSON nested too deeply")
    add("duplicate image ids", "dataset_dup.json", json.dumps(_karpathy([_kimg("a.png", cocoid=7),
                                                                         _kimg("a.png", cocoid=7)])),
        "1 duplicate image id(s): ['7']")
    coco = {"images": [{"id": 1, "file_name": "a.png"}],
            "annotations": [{"image_id": 1, "caption": "a dog"}, {"image_id": 99, "caption": "orphan"}]}
    add("captions for images the file does not list", "captions_train.json", json.dumps(coco),
        "1 caption annotation image_id(s) have no entry in images[], e.g. [99]")
    add("JSONL tokens not one list per caption", "tok.jsonl",
        json.dumps({"id": 1, "image": "a.png", "split": "train", "captions": ["a", "b"], "tokens": [["a"]]}),
        "field 'tokens' must be a list with one token list per caption (2)")
    add("image without captions", "dataset_nocap.json", json.dumps(_karpathy([_kimg("a.png", caps=())])),
        "1 image(s) without captions")
    add("unknown split", "dataset_split.json", json.dumps(_karpathy([_kimg("a.png", split="training")])),
        "unknown split 'training'")
    add("missing required field", "dataset_nofield.json", json.dumps({"images": [{"filename": "a.png"}]}),
        "missing required field 'split'", fmt="karpathy")
    add("caption of 100k characters", "dataset_long.json",
        json.dumps(_karpathy([_kimg("a.png", caps=("a dog " * 20_000,))])), "longer than 4096 characters")
    add("image path escaping the root", "dataset_escape.json", json.dumps(_karpathy([_kimg("../a.png")])),
        "escapes the image root")
    inst = {"images": [{"id": 5, "file_name": "zzz.png"}], "categories": [{"id": 1, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 2, 2]}]}
    (folder / "instances_other.json").write_text(json.dumps(inst))
    (folder / "dataset_ok.json").write_text(good)
    cases.append(("instances file of another dataset", folder / "dataset_ok.json",
                  {"instances": folder / "instances_other.json"}, "no annotated image matches any dataset image",
                  folder / "instances_other.json"))
    return cases


def test_bad_input_battery_each_case_handled_as_documented(tmp_path, report, one_thread):
    handled, failures = [], []
    # images: the run goes on; a bad image becomes a done row with its reason in images/error
    kinds = image_battery(tmp_path / "imgs")
    names = list(kinds) + ["plain.png"]  # the last row repeats a good image: ids differ, paths may not
    records = [{"id": f"im{k}", "image": n, "split": "train", "captions": [f"picture {k} of a dog"]}
               for k, n in enumerate(names)]
    (tmp_path / "zoo.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    url = str(tmp_path / "zoo.zarr")
    t = time.perf_counter()
    result = CliRunner().invoke(app, ["extract", "--dataset", str(tmp_path / "zoo.jsonl"), "--image-root",
                                      str(tmp_path / "imgs"), "--out", url, "--batch-size", "3", "--num-workers", "0",
                                      "--set", "groups=[grid]", "--set", "features.weights=none",
                                      "--set", "features.input_size=64", "--set", "features.grid_size=2",
                                      "--set", "block_size=4"])
    seconds = time.perf_counter() - t
    assert result.exit_code == 3, result.output  # finished; failed images listed (#13.2)
    n_bad = sum(v[0] == "bad" for v in kinds.values())
    assert f"{n_bad} bad image(s) recorded in images/error" in result.output
    store = open_store(url)
    hw = np.asarray(store.backend.read("images/hw", slice(None)))
    grid = np.asarray(store.backend.read("grid/feats", slice(None))).astype(np.float32)
    assert store.done.all() and store.attrs["complete"] is True
    for row, name in enumerate(names):
        kind, what = kinds[name]
        err = store.errors[row]
        if kind == "bad":
            ok = what in err and tuple(hw[row]) == (0, 0) and not grid[row].any() and row not in store.rows()
            detail = err
        else:
            ok = err == "" and tuple(hw[row]) == what and grid[row].std() > 0 and row in store.rows()
            detail = f"decoded to RGB, hw {tuple(int(v) for v in hw[row])}"
        (handled if ok else failures).append(f"image {name}: {detail}")
    assert seconds < 120, f"the battery's extraction took {seconds:.0f}s (a bomb must be refused from its header)"

    # dataset files: a DatasetError naming the file and what is wrong, before anything is read or written
    for case, path, kw, fragment, named in dataset_battery(tmp_path / "files"):
        try:
            load_dataset(path, tmp_path / "files", **kw)
            failures.append(f"dataset {case}: accepted")
        except DatasetError as e:
            msg = str(e)
            ok = msg.startswith(str(named)) and fragment in msg and "\n" not in msg
            (handled if ok else failures).append(f"dataset {case}: {msg.replace(str(tmp_path) + os.sep, '')[:150]}")
    total = len(handled) + len(failures)
    report(f"bad-input battery: {len(handled)}/{total} cases handled as documented\n  " + "\n  ".join(handled))
    assert not failures and len(handled) >= 12, (
        f"{len(handled)}/{total} bad inputs handled; not handled: {failures}")


# ------------------------------------------------------------------------------------- flipped bytes
SPECS = [s.path for s in ww.LAYOUT.specs()]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One complete store per backend, written once; each test damages its own copy."""
    root = tmp_path_factory.mktemp("pristine")
    urls = {}
    for kind, name in (("zarr", "s.zarr"), ("hdf5", "s.h5")):
        url = str(root / name)
        w = ww.StoreWriter(url, ww.LAYOUT, ww.ATTRS)
        for b in w.pending_blocks():
            w.write_block(b, ww.block_arrays(ww.LAYOUT, b))
        assert w.finalize(ww.STATS)
        w.close()
        urls[kind] = url
    return urls


def flip_first_chunk(url: str, array: str) -> tuple[int, ...]:
    """Flip one byte in the middle of ``array``'s first chunk as stored; returns that chunk's index."""
    if url.endswith(".h5"):
        with h5py.File(url) as f:
            ds = f[array]
            where = ds.id.get_chunk_info_by_coord((0,) * ds.ndim)
            offset = where.byte_offset + where.size // 2
            path = Path(url)
    else:
        ndim = zarr.open_array(f"{url}/{array}", mode="r").ndim
        path = Path(url, array, "c", *["0"] * ndim)
        offset = path.stat().st_size // 2
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    return (0,) * (len(ww.LAYOUT.specs()[SPECS.index(array)].row_shape) + 1)


@pytest.mark.parametrize("array", SPECS)
@pytest.mark.parametrize("kind", ["zarr", "hdf5"])
def test_flipped_byte_in_any_array_is_caught_by_verify_and_reads(pristine, tmp_path, kind, array):
    url = str(tmp_path / Path(pristine[kind]).name)
    (shutil.copytree if kind == "zarr" else shutil.copy)(pristine[kind], url)
    chunk = flip_first_chunk(url, array)
    rep = verify(url)
    assert [(d.array, d.chunk) for d in rep.damaged] == [(array, chunk)], rep.describe()
    assert not rep.ok and rep.chunks_checked == len(SPECS) * ww.LAYOUT.num_blocks
    with open_backend(url) as b:
        with pytest.raises(CorruptChunkError) as e:
            b.read(array, slice(0, 2))
        assert e.value.array == array and e.value.chunk == chunk and array in str(e.value)
        other = SPECS[(SPECS.index(array) + 1) % len(SPECS)]  # the rest of the store still reads exactly
        exp = ww.expected_arrays(ww.LAYOUT)
        assert np.array_equal(np.asarray(b.read(other, slice(None))), exp[other])
        assert np.array_equal(np.asarray(b.read(array, slice(4, None))), exp[array][4:])
    if array == DONE:  # opening the store reads the done flags: refused, never guessed
        with pytest.raises(CorruptChunkError):
            open_store(url)


# ------------------------------------------------------------------------------ one writer, two readers
READER = r'''
import json, sys, time
import numpy as np
import importlib.util
spec = importlib.util.spec_from_file_location("ww", sys.argv[1])
ww = importlib.util.module_from_spec(spec); spec.loader.exec_module(ww)
from vlcache.storage.backends import open_backend
from vlcache.storage.errors import StoreError
url, stop_file = sys.argv[2], sys.argv[3]
expected = ww.expected_arrays(ww.LAYOUT)
n = ww.LAYOUT.num_rows
seen, snapshots, refused, problems = set(), 0, 0, []
print("ready", flush=True)
import os
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    finished = os.path.exists(stop_file)  # read before the snapshot: the last one sees the final state
    try:
        s = open_backend(url)
        done = np.asarray(s.read("images/done", slice(None))) != 0  # the done flags first (as Store does) ...
    except StoreError as e:  # not created yet, being created, or (HDF5) still being written
        refused += 1
        if finished:
            problems.append(f"finished store refused: {e}")
            break
        time.sleep(0.01)
        continue
    rows = np.flatnonzero(done)  # ... then the rows they mark, in every array
    for path, exp in expected.items():
        got = np.asarray(s.read(path, rows))
        if not np.array_equal(got, exp[rows]):
            problems.append(f"'{path}': a row marked done differs from the final data ({len(rows)} done)")
    s.close()
    snapshots += 1
    seen.add(len(rows))
    if finished:
        break
    time.sleep(0.02)
print(json.dumps({"snapshots": snapshots, "done_counts": sorted(seen), "refused": refused, "problems": problems}))
'''


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_one_writer_two_readers_readers_only_see_complete_rows(tmp_path, report, suffix):
    url, stop = str(tmp_path / f"live{suffix}"), tmp_path / "writer-finished"
    worker = ROOT / "tests" / "helpers" / "write_worker.py"
    readers = [subprocess.Popen([sys.executable, "-c", READER, str(worker), url, str(stop)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    for r in readers:
        assert r.stdout.readline().strip() == "ready", r.stderr.read()
    writer = subprocess.run([sys.executable, str(worker), url, "--sleep", "0.3"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert writer.returncode == 0, writer.stderr
    stop.touch()
    outs = []
    for r in readers:
        out, err = r.communicate(timeout=120)
        assert r.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    n = ww.LAYOUT.num_rows
    report(f"writer + 2 readers ({suffix}): " + "; ".join(
        f"reader {i}: {o['snapshots']} snapshots, done counts seen {o['done_counts']}, {o['refused']} refused opens"
        for i, o in enumerate(outs)))
    for o in outs:
        assert o["problems"] == [], o["problems"]
        assert o["done_counts"][-1] == n  # the last snapshot is the finished store
        if suffix == ".zarr":  # a Zarr store is readable while written: readers saw it grow
            assert len([c for c in o["done_counts"] if 0 < c < n]) >= 2, o
        else:  # an HDF5 file appears whole: readers saw nothing, then everything
            assert o["done_counts"] == [n] and o["refused"] > 0, o
