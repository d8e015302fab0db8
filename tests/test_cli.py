"""The command line as a user meets it: every expected failure is one line naming the input and the fix,
exit 1 (2 for usage), no traceback unless --debug, and cheap checks happen before torch is imported.

Each case runs the real CLI in a subprocess (``tests/helpers/cli_probe.py`` reports whether torch was
imported); the cases that need no torch take ~0.3 s each.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_store

from vlcache.pipeline.synth import generate

TQDM = re.compile(r"\|[^|]*\| *\d+/\d+ \[")
PROBE = Path(__file__).parent / "helpers" / "cli_probe.py"
HAS_NVIDIA_DRIVER = any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version"))


def run_cli(*args, cwd=None, timeout=300, env=None):
    """(exit code, stdout, stderr without the probe's line, whether torch was imported)."""
    r = subprocess.run([sys.executable, str(PROBE), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})
    lines = r.stderr.rstrip("\n").split("\n")
    assert lines[-1].startswith("torch imported: "), r.stderr
    return r.returncode, r.stdout, "\n".join(lines[:-1]), lines[-1] == "torch imported: True"


def assert_one_line_error(code, err, *needles, exit_code=1):
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not TQDM.search(ln)]  # progress bars aside
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, n_images=4, seed=0, size=(48, 48))
    return root


def test_cheap_input_errors_are_one_line_before_torch(synth, tmp_path):
    bad = tmp_path / "dataset_typo.json"
    bad.write_text('{"images": [ {"filename": "a.jpg",, } ]}')
    code, _, err, torch_ = run_cli("extract", "--dataset", bad, "--out", tmp_path / "s.zarr", "--weights", "none")
    assert_one_line_error(code, err, str(bad), "malformed JSON at line 1")
    assert not torch_ and not (tmp_path / "s.zarr").exists()

    # a config file that does not exist, a config key that does not exist
    code, _, err, torch_ = run_cli("extract", "--dataset", synth / "dataset_synth.json", "--out", tmp_path / "s.zarr",
                                   "--config", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found", "nope.yaml")
    assert not torch_
    code, _, err, torch_ = run_cli("extract", "--dataset", synth / "dataset_synth.json", "--out", tmp_path / "s.zarr",
                                   "--set", "detector.min_sise=400")
    assert_one_line_error(code, err, "unknown key(s) ['min_sise']")
    assert not torch_

    # a store path with a typo, for training
    code, _, err, torch_ = run_cli("train", "caption", "--store", tmp_path / "stores" / "synht.zarr", "--run",
                                   tmp_path / "run")
    assert_one_line_error(code, err, f"--store {tmp_path / 'stores' / 'synht.zarr'}: no such store", "vlcache extract")
    assert not torch_ and not (tmp_path / "run").exists()

    # --debug shows the traceback of the same error
    code, _, err, _ = run_cli("--debug", "extract", "--dataset", bad, "--out", tmp_path / "s.zarr")
    assert code == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("argv", [
    ["train", "caption", "--store", "{store}", "--run", "{tmp}/run"],
    ["train", "match", "--store", "{store}", "--run", "{tmp}/run"],
    ["store", "text-cache", "--store", "{store}", "--out", "{tmp}/text.zarr"],
    ["demo", "--out", "{tmp}/demo"],
    ["extract", "--dataset", "{synth}/dataset_synth.json", "--out", "{tmp}/s.zarr", "--weights", "none"],
], ids=["train-caption", "train-match", "text-cache", "demo", "extract"])
def test_cuda_without_cuda_is_one_line_and_writes_nothing(argv, synth, tmp_path):
    device = "cuda:7"  # no machine here has 8 GPUs; without an NVIDIA driver even "cuda" fails the same way
    args = [a.format(store=tmp_path / "missing.zarr", tmp=tmp_path, synth=synth) for a in argv]
    code, _, err, torch_ = run_cli(*args, "--device", device)
    assert_one_line_error(code, err, f"--device {device}: CUDA is not available on this machine", "--device cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run, store, cache or demo folder
    assert torch_ == HAS_NVIDIA_DRIVER  # the cheap check needs no torch where there is no driver
    code, _, err, _ = run_cli(*args, "--device", "gpu")
    assert code == 2 and "--device 'gpu': expected cpu, cuda, cuda:N or auto" in err


def _run_dir(path: Path, config: dict) -> Path:
    path.mkdir()
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def test_evaluate_refuses_the_other_kind_of_run(tmp_path):
    # the config.yaml each trainer writes: a matching run names its model, a captioning run has model args
    match_run = _run_dir(tmp_path / "scan", {"model": "scan", "store": "s.zarr", "ccr": 1.0})
    caption_run = _run_dir(tmp_path / "sat", {"ica_weight": 0.1, "model": {"vocab_size": 30}, "store": "s.zarr"})
    code, _, err, torch_ = run_cli("evaluate", "caption", "--run", match_run)
    assert_one_line_error(code, err, f"{match_run} is a matching run (scan)",
                          f"vlcache evaluate match --run {match_run}")
    assert not torch_
    code, _, err, torch_ = run_cli("evaluate", "match", "--run", caption_run)
    assert_one_line_error(code, err, f"{caption_run} is a captioning run", "vlcache evaluate caption")
    code, _, err, torch_ = run_cli("evaluate", "caption", "--run", tmp_path / "nowhere")
    assert_one_line_error(code, err, "is not a run directory (no config.yaml)", "vlcache train caption")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sat", "scan"]


def test_inspect_tells_ids_from_row_numbers(tmp_path):
    url = str(tmp_path / "tiny.zarr")
    tiny = make_tiny_store(url, tmp_path / "images", n=6, block_size=3)
    ids = [str(i) for i in tiny.truth["images/id"]]
    assert "7" not in ids  # an id that looks like a row number but is neither
    code, _, err, torch_ = run_cli("inspect", url, "--image", "7", "--out", tmp_path / "f.png")
    assert_one_line_error(code, err, "has no image with id '7'", repr(ids[0]), "use --row (0..5)")
    code, _, err, _ = run_cli("inspect", url, "--row", "7", "--out", tmp_path / "f.png")
    assert_one_line_error(code, err, "--row 7:", "has 6 rows (0..5)")
    code, _, err, _ = run_cli("inspect", url, "--out", tmp_path / "f.png")
    assert code == 2 and "--image ID or as --row N" in err
    assert not (tmp_path / "f.png").exists() and not torch_
    code, out, err, _ = run_cli("inspect", url, "--image", ids[2], "--out", tmp_path / "f.png")
    assert code == 0 and (tmp_path / "f.png").stat().st_size > 0, err


def test_missing_weights_name_the_flag_of_the_model_that_needs_them(synth, tmp_path):
    # offline with an empty torch cache: the backbone's DEFAULT weights cannot be fetched (a proxy that
    # refuses connections stands in for no network); the error names --backbone-weights, not --weights
    offline = {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}
    code, _, err, _ = run_cli("extract", "--dataset", synth / "dataset_synth.json", "--out", tmp_path / "s.zarr",
                              "--weights", "none", "--backbone-weights", "DEFAULT", "--set", "groups=[grid]",
                              env=offline)
    assert_one_line_error(code, err, "resnet101", "no internet: pass --backbone-weights PATH",
                          "or --weights none for random init of every model")
    assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------ a wrong --image-root (#13.2)
CHEAP = ["--detector", "annotations", "--weights", "none", "--num-workers", "0", "--batch-size", "2",
         "--set", "features.input_size=64", "--set", "features.grid_size=2", "--set", "features.max_regions=4",
         "--set", "features.min_regions=2", "--set", "block_size=2", "--set", "features.region_min_size=64",
         "--set", "features.region_max_size=128"]


def test_wrong_image_root_fails_before_writing_anything(synth, tmp_path):
    args = ["extract", "--dataset", synth / "dataset_synth.json", "--instances", synth / "instances.json",
            "--out", tmp_path / "s.zarr", *CHEAP]
    code, _, err, torch_ = run_cli(*args, "--image-root", tmp_path / "no-such-folder")
    assert_one_line_error(code, err, f"image root {tmp_path / 'no-such-folder'} is not a folder", "--image-root DIR")
    assert not torch_
    (tmp_path / "empty").mkdir()
    code, _, err, torch_ = run_cli(*args, "--image-root", tmp_path / "empty")
    assert_one_line_error(code, err, "none of the first 2 images exist under the image root",
                          str(tmp_path / "empty" / "images" / "synth_000000.png"), "wrong --image-root?")
    assert not torch_ and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def _extract_without_images_1_and_3(synth: Path, tmp_path: Path, url: Path) -> tuple[list, Path, str]:
    """Extract into ``url`` from an image root "partial" that lacks images 1 and 3 of 4 (blocks of 2: each
    block keeps one good row); exit 3. Returns the command's arguments (without --image-root), that root and
    the command's stdout."""
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(synth / "images", partial / "images")
    for k in (1, 3):
        (partial / "images" / f"synth_{k:06d}.png").unlink()
    args = ["extract", "--dataset", synth / "dataset_synth.json", "--instances", synth / "instances.json",
            "--out", url, *CHEAP]
    code, out, err, _ = run_cli(*args, "--image-root", partial)
    assert code == 3, err
    assert "2 bad image(s) recorded in images/error" in out and "rerun with --retry-errors" in out
    return args, partial, out


def _all_arrays(url: Path) -> dict:
    from vlcache.storage.backends import open_backend

    with open_backend(str(url)) as b:
        return {p: b.read(p, slice(None)) for p in b.arrays()}


def test_failed_images_exit_3_and_retry_errors_redoes_only_them(synth, tmp_path):
    import numpy as np

    from vlcache.pipeline.config import load_config
    from vlcache.pipeline.datasets import load_dataset
    from vlcache.stages.extract.config import ExtractConfig
    from vlcache.stages.extract.loop import extract
    from vlcache.storage.backends import open_backend
    from vlcache.storage.store import open_store

    url = tmp_path / "s.zarr"
    args, partial, out = _extract_without_images_1_and_3(synth, tmp_path, url)
    for k in (1, 3):
        assert f"{partial / 'images' / f'synth_{k:06d}.png'}: file not found" in out
    before, first_fingerprint = _all_arrays(url), open_store(str(url)).attrs["fingerprint"]
    assert [bool(e) for e in before["images/error"]] == [False, True, False, True]

    # a plain rerun keeps the error rows (and still exits 3); --retry-errors with the right root redoes them
    code, out, err, _ = run_cli(*args, "--image-root", partial)
    assert code == 3 and "extracted 0 images" in out, err
    code, out, err, _ = run_cli(*args, "--image-root", synth, "--retry-errors")
    assert code == 0 and "extracted 2 images" in out and "store complete: True" in out, err + out
    store = open_store(str(url))
    assert store.done.all() and (store.errors == "").all() and store.attrs["complete"]
    assert store.attrs["image_root"] == str(synth.resolve()) and store.attrs["fingerprint"] != first_fingerprint
    after = _all_arrays(url)
    for p, old in before.items():  # the good rows are written back as they were, byte for byte
        np.testing.assert_array_equal(after[p][[0, 2]], old[[0, 2]], err_msg=p)
    # and the retried store equals one extracted in one go from the right root (features up to float16
    # rounding: a batch of 1 and a batch of 2 give ResNet outputs that differ in the last bits on CPU)
    sets = [a.split("=", 1)[0] + "=" + a.split("=", 1)[1] for a in CHEAP[CHEAP.index("--set"):] if a != "--set"]
    cfg = load_config(ExtractConfig, overrides=sets + ["detector.backend=annotations", "features.weights=none",
                                                        "detector.weights=none", "runtime.num_workers=0",
                                                        "runtime.batch_size=2"])
    ds = load_dataset(synth / "dataset_synth.json", synth, instances=synth / "instances.json")
    extract(ds, str(tmp_path / "straight.zarr"), cfg, progress=False)
    with open_backend(str(tmp_path / "straight.zarr")) as b:
        for p, got in after.items():
            want = np.asarray(b.read(p, slice(None)))
            if got.dtype == np.float16:
                np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-4, err_msg=p)
            else:
                np.testing.assert_array_equal(got, want, err_msg=p)


def test_retry_errors_on_a_packed_hdf5_store_repacks_it_and_a_kill_leaves_the_old_file(synth, tmp_path):
    import hashlib
    import signal
    import time

    import numpy as np

    from vlcache.storage.backends import open_backend

    url = tmp_path / "s.h5"
    args, _, _ = _extract_without_images_1_and_3(synth, tmp_path, url)
    before = _all_arrays(url)
    with open_backend(str(url)) as b:
        store_id, first_fingerprint = b.attr("store_id"), b.attr("fingerprint")
    sha_before = hashlib.sha256(url.read_bytes()).hexdigest()

    # killed (-9) after redoing the first block, before repacking: the packed file is as it was
    blocks_file = tmp_path / "blocks_written"
    proc = subprocess.Popen([sys.executable, str(PROBE), *map(str, args), "--image-root", str(synth), "--retry-errors"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "VLCACHE_PROBE_BLOCK_SLEEP": "5",
                                 "VLCACHE_PROBE_BLOCKS_FILE": str(blocks_file)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not blocks_file.exists():
        time.sleep(0.05)
    assert proc.poll() is None and blocks_file.read_text() == "1"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert (tmp_path / "s.h5.partial.zarr").is_dir()  # the redone block was in the staging directory
    assert hashlib.sha256(url.read_bytes()).hexdigest() == sha_before

    code, out, err, _ = run_cli(*args, "--image-root", synth, "--retry-errors")
    assert code == 0 and "extracted 2 images" in out and "store complete: True" in out, err + out
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("s.h5")) == ["s.h5"]  # no staging, no temp
    with open_backend(str(url)) as b:
        assert b.kind == "hdf5" and b.attr("complete") and b.attr("store_id") == store_id
        assert b.attr("fingerprint") != first_fingerprint and b.attr("image_root") == str(synth.resolve())
    after = _all_arrays(url)
    assert set(after) == set(before)
    for p, old in before.items():  # 4 rows, none duplicated; the good rows as they were, byte for byte
        assert after[p].shape == old.shape, p
        np.testing.assert_array_equal(after[p][[0, 2]], old[[0, 2]], err_msg=p)
    assert list(after["images/error"]) == ["", "", "", ""] and after["images/done"].all()
    assert (after["images/hw"][[1, 3]] == 48).all() and (after["captions/count"][[1, 3]] > 0).all()
    assert np.abs(after["grid/feats"][[1, 3]].astype(np.float32)).sum() > 0  # features of the redone images
    code, out, err, _ = run_cli("store", "verify", url)  # every chunk's checksum and the recorded fingerprint
    assert code == 0, err + out


# ------------------------------------------------------------------------------------ Ctrl-C (#13.5)
def _as_a_terminal_job():
    """In the child, before exec: SIGINT back to its default, as in a terminal's foreground job. A test run
    started in the background by a non-interactive shell (``pytest ... &``) ignores SIGINT, every child
    inherits that, and Python then installs no KeyboardInterrupt handler: the extraction would not see the
    Ctrl-C at all (the cause of this test's old full-suite failures, exit 0)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("signame, exit_code, said_as", [("SIGINT", 130, "interrupted: "),  # a terminal's Ctrl-C
                                                    ("SIGTERM", 143, "terminated (SIGTERM): ")])  # a scheduler's stop
def test_ctrl_c_stops_promptly_says_where_and_how_to_resume(tmp_path, signame, exit_code, said_as):
    import shlex
    import signal
    import time

    from vlcache.storage.store import open_store

    n = 40
    generate(tmp_path / "synth", n_images=n, seed=1, size=(160, 160))
    url = tmp_path / "s.zarr"
    args = ["extract", "--dataset", tmp_path / "synth" / "dataset_synth.json", "--instances",
            tmp_path / "synth" / "instances.json", "--out", url, *CHEAP[:CHEAP.index("--num-workers")],
            "--num-workers", "1", "--batch-size", "4", *CHEAP[CHEAP.index("--set"):]]
    # a terminal's Ctrl-C signals the whole foreground process group: the CLI and its decode worker. The probe
    # (tests/helpers/cli_probe.py) reports each block written through a file and makes each take 0.5 s longer,
    # so the signal comes right after the first block, with 19 to go
    blocks_file = tmp_path / "blocks_written"
    proc = subprocess.Popen([sys.executable, str(PROBE), *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_as_a_terminal_job,
                            env={**os.environ, "VLCACHE_PROBE_BLOCK_SLEEP": "0.5",
                                 "VLCACHE_PROBE_BLOCKS_FILE": str(blocks_file)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not blocks_file.exists():
        time.sleep(0.05)
    assert proc.poll() is None and blocks_file.exists(), proc.communicate()
    os.killpg(proc.pid, getattr(signal, signame))
    t = time.monotonic()
    said = []  # when the "interrupted: ..." line came: the process exits later, after torch's own teardown (~2 s here)
    lines = []
    for line in proc.stderr:  # text mode reads tqdm's \r as line ends too
        lines.append(line)
        if line.startswith(said_as) and not said:
            said.append(time.monotonic() - t)
    proc.wait(timeout=120)
    err = "".join(lines)
    assert proc.returncode == exit_code, err
    # the message comes once the blocks already queued are written (<= 3 here, 0.5 s each with the probe). Before the
    # decode worker ignored SIGINT it came 5 s late: the worker stopped with a decoded batch (4 x 77 kB, more than a
    # pipe holds) unsent, hung on exit, and the DataLoader waited 5 s before killing it
    assert said and said[0] < 4.5, f"said where it stopped {said[0] if said else None} s after the Ctrl-C\n{err}"
    assert "Traceback" not in err, err
    last = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("torch imported")][-1]
    assert last.startswith(said_as) and f"of {n} rows of {url} are done" in last, last
    done = int(last.split(said_as)[1].split(" ")[0])
    assert 2 <= done < n and done % 2 == 0  # whole blocks only
    assert done == 2 * int(blocks_file.read_text())  # every block written (those queued at the signal too)
    resume = last.split("rerun the same command to resume: ")[1]
    argv = shlex.split(resume)
    assert argv[0] == "vlcache" and argv[1:] == [str(a) for a in args]
    code, out, err, _ = run_cli(*argv[1:])
    assert code == 0 and f"extracted {n - done} images" in out, err
    assert open_store(str(url)).attrs["complete"] is True


# --------------------------------------------------- COCO captions: one file per split (#13.7)
def _coco_layout(tmp_path: Path) -> Path:
    """COCO's own layout from the synthetic set: annotations/captions_{train,val}2017.json, train2017/ and
    val2017/ image folders, annotations/instances.json; image 1 is stored rotated (as an EXIF-rotated
    photo decodes), so its decoded size differs from the size its annotations are for."""
    from PIL import Image

    src = tmp_path / "synth"
    generate(src, n_images=6, seed=2, size=(40, 56))
    karpathy = json.loads((src / "dataset_synth.json").read_text())
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        images, anns = [], []
        (root / f"{split}2017").mkdir()
        for img in karpathy["images"]:
            if img["split"] != split:
                continue
            pic = Image.open(src / img["filepath"] / img["filename"])
            if img["cocoid"] == 1:
                pic = pic.transpose(Image.Transpose.ROTATE_90)
            pic.save(root / f"{split}2017" / img["filename"])
            images.append({"id": img["cocoid"], "file_name": img["filename"], "height": 40, "width": 56})
            anns += [{"id": len(anns), "image_id": img["cocoid"], "caption": s["raw"]} for s in img["sentences"]]
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"images": images, "annotations": anns}))
    (root / "annotations" / "instances.json").write_text((src / "instances.json").read_text())
    return root


def test_coco_captions_folder_one_store_and_a_size_mismatch_is_one_images_error(tmp_path):
    from vlcache.storage.backends import open_backend
    from vlcache.storage.schema import SPLITS
    from vlcache.storage.store import open_store

    root = _coco_layout(tmp_path)
    splits = {img["split"] for img in json.loads((tmp_path / "synth" / "dataset_synth.json").read_text())["images"]}
    assert {"train", "val"} <= splits
    url = tmp_path / "coco.zarr"
    code, out, err, _ = run_cli("extract", "--dataset", root / "annotations", "--image-root", root,
                                "--instances", root / "annotations" / "instances.json", "--out", url, *CHEAP)
    assert code == 3, err + out  # finished; image 1 failed and is listed
    assert "1 bad image(s) recorded in images/error" in out
    assert "image 1 (train2017/synth_000001.png): annotations are for 56x40 but the decoded image is 40x56" in out
    store = open_store(str(url))
    assert store.attrs["complete"] and store.attrs["dataset"] == "coco"
    assert [s["path"].rsplit("/", 1)[1] for s in store.attrs["sources"]][:2] == [
        "captions_train2017.json", "captions_val2017.json"]
    with open_backend(str(url)) as b:  # train rows first, then val rows, in file order
        splits = [SPLITS[int(c)] for c in b.read("images/split", slice(None))]
    assert splits == sorted(splits, key=["train", "val"].index) and set(splits) == {"train", "val"}
    errors = {str(store.ids[i]): e for i, e in enumerate(store.errors)}
    assert "annotations are for 56x40" in errors["1"] and all(e == "" for k, e in errors.items() if k != "1")
    assert store.captions(int(store.rows()[0]))[0]  # captions came along

    # the same files given one by one make the same rows; --strict stops at the mismatch, naming it
    code, out, err, _ = run_cli("extract", "--dataset", root / "annotations" / "captions_train2017.json",
                                "--dataset", root / "annotations" / "captions_val2017.json", "--image-root", root,
                                "--instances", root / "annotations" / "instances.json", "--out",
                                tmp_path / "strict.zarr", "--strict", *CHEAP)
    assert_one_line_error(code, err, "bad image", "synth_000001.png", "annotations are for 56x40", "--strict")


def test_training_without_a_val_split_fails_before_making_the_run(tmp_path):
    from vlcache.pipeline.config import load_config
    from vlcache.pipeline.dataset_files import load_datasets
    from vlcache.stages.extract.config import ExtractConfig
    from vlcache.stages.extract.loop import extract

    root = _coco_layout(tmp_path)
    # a store from the train captions file alone (what one COCO captions file gives): no val split
    ds = load_datasets([root / "annotations" / "captions_train2017.json"], root / "train2017",
                       instances=root / "annotations" / "instances.json")
    cfg = load_config(ExtractConfig, overrides=["detector.backend=annotations", "features.weights=none",
                                                "features.input_size=64", "features.grid_size=2", "block_size=2",
                                                "features.max_regions=4", "features.min_regions=2",
                                                "runtime.num_workers=0"])
    extract(ds, str(tmp_path / "train-only.zarr"), cfg, progress=False)
    run = tmp_path / "runs" / "sat"
    code, _, err, _ = run_cli("train", "caption", "--store", tmp_path / "train-only.zarr", "--run", run,
                              "--epochs", "1", "--device", "cpu", "--set", "ica_weight=0")
    assert_one_line_error(code, err, "has no extracted rows in split 'val'", "--dataset captions_val2014.json")
    assert not run.exists() and not run.parent.exists()


# ------------------------------------------------------------------------------- --help (#13.10)
def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group (typer ships its own click: no isinstance checks)
            yield from _commands(cmd, prefix + (name,))
        else:
            yield prefix + (name,), cmd


def _shown_default(opt) -> str | None:
    """What ``--help`` prints as the option's default (click's own rule), or None."""
    if isinstance(opt.show_default, str):
        return opt.show_default
    if opt.show_default is not False and opt.default is not None:
        return str(opt.default)
    return None


def test_help_shows_a_default_for_every_option():
    import typer

    from vlcache.cli import app

    root = typer.main.get_command(app)
    missing = []
    for path, cmd in _commands(root):
        for opt in cmd.params:
            if opt.param_type_name != "option" or opt.required or opt.is_flag or opt.name == "help":
                continue
            if not _shown_default(opt):
                missing.append(f"vlcache {' '.join(path)} {opt.opts[0]}")
    assert not missing, f"options whose --help shows no default: {missing}"


def test_help_defaults_of_training_options_are_the_configs_defaults():
    import dataclasses

    import typer

    from vlcache.cli import app
    from vlcache.stages.caption.train import CaptionTrainConfig
    from vlcache.stages.match.train import MatchTrainConfig

    root = typer.main.get_command(app)
    checked = 0
    for cls, cmd in ((CaptionTrainConfig, root.commands["train"].commands["caption"]),
                     (MatchTrainConfig, root.commands["train"].commands["match"])):
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for opt in cmd.params:
            if opt.name in defaults and defaults[opt.name] not in ("", None) and not getattr(opt, "is_flag", False):
                assert _shown_default(opt) == str(defaults[opt.name]), (cls.__name__, opt.name)
                checked += 1
    assert checked >= 10
