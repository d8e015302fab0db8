"""Security evidence (issue 7): no pickle anywhere, and hostile dataset files stay inside their roots.

* The package source (every ``.py`` of the repository outside ``.venv`` and ``tests``) is parsed and
  searched for anything that unpickles: pickle-family imports, ``torch.load`` without
  ``weights_only=True``, ``np.load`` without ``allow_pickle=False``, ``allow_pickle=True``,
  ``weights_only=False``, extra safe globals. (Tests are left out on purpose: they pickle the store's
  own reader objects in memory to prove DataLoader workers can receive them.)
* Store arrays are numeric or string only (Zarr metadata and HDF5 dtypes, both backends).
* Training checkpoints load with ``torch.load(weights_only=True)``; a checkpoint or weights file that
  carries code is refused and the code never runs.
* A hostile dataset file cannot make extraction read or write outside the image root and the store.
  Checked with a Python audit hook in the extraction process (and its decode workers): every ``open``,
  ``mkdir``, ``rename``, ``remove``... is logged. Paths are checked lexically at load time, so an image
  path with ``..`` or an absolute path elsewhere is refused before any image is opened. A *symlink inside
  the image root* is followed: the image root is the user's folder and trusted; the dataset file is not.
* A 50 MB caption is refused with a clear error in bounded time and memory.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from synth_store import make_synth_store

from vlcache.pipeline.datasets import DatasetError, load_dataset
from vlcache.pipeline.runs import RunDir
from vlcache.stages.extract.detectors import DetectorError, load_state_dict
from vlcache.stages.caption.train import CaptionTrainConfig, train_caption
from vlcache.storage.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "tests", ".git", "build", "dist", "demo", "runs", "__pycache__", ".pytest_cache"}


# ------------------------------------------------------------------------------------------ no pickle
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call target: ``torch.load``, ``np.load``, ``load``..."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _const_kw(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return "<missing>"


def pickle_hazards(source: str, filename: str) -> list[str]:
    """Every place in ``source`` that could unpickle data, as ``file:line: what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where}: imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            if name == "torch.load" or name.endswith("serialization.load"):
                if _const_kw(node, "weights_only") is not True:
                    found.append(f"{where}: {name}(...) without weights_only=True")
            if name in ("np.load", "numpy.load") and _const_kw(node, "allow_pickle") is not False:
                found.append(f"{where}: {name}(...) without allow_pickle=False")
            if name.endswith(("read_pickle", "add_safe_globals", "safe_globals")):
                found.append(f"{where}: {name}(...)")
            for kw in node.keywords:
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    found.append(f"{where}: allow_pickle={ast.unparse(kw.value)}")
                if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    found.append(f"{where}: weights_only={ast.unparse(kw.value)}")
    return sorted(set(found))


def package_sources(suffix: str = ".py") -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")
                       and not d.startswith(".ipynb")]
        out += [Path(dirpath, f) for f in filenames if f.endswith(suffix)]
    return sorted(out)


def notebook_code(path: Path) -> str:
    """A notebook's code cells as one Python source (IPython magics and shell lines dropped)."""
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    lines = "".join("".join(c["source"]) + "\n" for c in cells).splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith(("%", "!")))


def test_the_hazard_finder_finds_every_pattern():
    hostile = ("import pickle\nfrom dill import loads\nimport numpy as np, torch\ntorch.load(f)\n"
               "torch.load(f, weights_only=False)\nnp.load(f)\nnp.load(f, allow_pickle=True)\n"
               "pd.read_pickle(f)\ntorch.serialization.add_safe_globals([X])\nx = f(allow_pickle=flag)\n")
    found = pickle_hazards(hostile, "evil.py")
    for line in (1, 2, 4, 5, 6, 7, 8, 9, 10):  # line 3 is a harmless import
        assert any(h.startswith(f"evil.py:{line}:") for h in found), (line, found)
    safe = ("import numpy as np, torch\ntorch.load(f, map_location='cpu', weights_only=True)\n"
            "np.load(f, mmap_mode='r', allow_pickle=False)\n")
    assert pickle_hazards(safe, "ok.py") == []


def test_no_pickle_anywhere_in_the_package_source():
    files = package_sources()
    rel = {str(p.relative_to(ROOT)) for p in files}
    assert {"cli.py", "storage/writer.py", "pipeline/runs.py", "bench/stream.py"} <= rel, sorted(rel)[:20]
    assert not any(r.startswith(("tests/", ".venv/")) for r in rel)
    hazards = [h for p in files for h in pickle_hazards(p.read_text(), str(p.relative_to(ROOT)))]
    # the one audited exception: MILVLG npz 'info' through an Unpickler whose find_class admits only numpy's
    # array builders (tests/extract/test_importers.py feeds it hostile files); it never calls pickle.load(s)
    audited = (ROOT / "stages/extract/npz_info.py").read_text()
    assert "def find_class" in audited and "pickle.load(" not in audited and "pickle.loads(" not in audited
    audited_import = [h for h in hazards if h.startswith("stages/extract/npz_info.py:") and h.endswith(": imports pickle")]
    assert len(audited_import) == 1, audited_import  # the checker sees it
    hazards.remove(audited_import[0])
    notebooks = package_sources(".ipynb")  # the examples users copy from
    assert notebooks, "no example notebook found"
    hazards += [h for p in notebooks for h in pickle_hazards(notebook_code(p), str(p.relative_to(ROOT)))]
    assert hazards == [], "code that could unpickle:\n" + "\n".join(hazards)
    # the checker is live on this code base: it sees the weights-only loads that are there
    sites = [p for p in files if "torch.load(" in p.read_text()]
    assert len(sites) >= 2, sites


def _stored_types(url: str) -> dict[str, str]:
    """array path -> stored element type, read from the store's own metadata (no library code)."""
    out = {}
    if url.endswith(".h5"):
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                dt = obj.dtype
                out[name] = "string" if h5py.check_string_dtype(dt) or dt.kind == "S" else dt.str
        with h5py.File(url, "r") as f:
            f.visititems(visit)
        return out
    for meta in Path(url).rglob("zarr.json"):
        doc = json.loads(meta.read_text())
        for path, node in ([(str(meta.parent.relative_to(url)), doc)] +
                           list(doc.get("consolidated_metadata", {}).get("metadata", {}).items())):
            if node.get("node_type") == "array":
                codecs = json.dumps(node.get("codecs", []))
                assert "pickle" not in codecs.lower() and "object" not in codecs.lower(), (path, codecs)
                out[path] = node["data_type"] if isinstance(node["data_type"], str) else json.dumps(node["data_type"])
    return out


@pytest.mark.parametrize("suffix", [".zarr", ".h5"])
def test_store_arrays_are_numeric_or_string_only(tmp_path, suffix):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ww", ROOT / "tests" / "helpers" / "write_worker.py")
    ww = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ww)
    url = str(tmp_path / f"s{suffix}")
    w = StoreWriter(url, ww.LAYOUT, ww.ATTRS)
    for b in w.pending_blocks():
        w.write_block(b, ww.block_arrays(ww.LAYOUT, b))
    assert w.finalize(ww.STATS)
    w.close()
    types = _stored_types(url)
    assert {s.path for s in ww.LAYOUT.specs()} <= set(types), sorted(types)
    numeric = {"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16",
               "float32", "float64", "string", "<i2", "<i4", "<i8", "|u1", "|i1", "<u2", "<u4", "<f2", "<f4", "<f8"}
    odd = {p: t for p, t in types.items() if t not in numeric}
    assert odd == {}, f"arrays stored as something other than numbers or strings: {odd}"


# ---------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """Unpickling this runs ``Path.touch(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _plain(x) -> bool:
    if isinstance(x, torch.Tensor) or x is None or isinstance(x, (bool, int, float, str)):
        return True
    if isinstance(x, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return False


def test_checkpoints_load_weights_only_and_code_in_a_checkpoint_never_runs(tmp_path):
    url, _ = make_synth_store()
    cfg = CaptionTrainConfig(store=url, epochs=1, batch_images=8, val_max_images=2, embed_dim=16, attn_dim=16,
                             hidden_dim=16, num_workers=0, device="cpu", beam_size=1, max_len=12)
    train_caption(cfg, tmp_path / "run", progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert [p.name for p in ckpts] == ["best.pt", "last.pt"]
    for p in ckpts:
        state = torch.load(p, map_location="cpu", weights_only=True)  # the only way vlcache loads them
        assert _plain(state) and any(isinstance(v, torch.Tensor) for v in state["model"].values()), p.name

    marker = tmp_path / "payload-ran"
    torch.save({"model": _Payload(marker)}, tmp_path / "evil.pt")
    # resuming a run whose checkpoint was replaced: refused, the payload never runs
    (tmp_path / "evil.pt").replace(tmp_path / "run" / "checkpoints" / "last.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        RunDir(tmp_path / "run").load_checkpoint("last")
    with pytest.raises(Exception, match="Weights only load failed"):
        train_caption(cfg, tmp_path / "run", progress=False)
    # a detector / backbone weights file given by path: the same
    torch.save({"conv1.weight": _Payload(marker)}, tmp_path / "weights.pth")
    with pytest.raises(DetectorError, match="not a loadable weights-only checkpoint"):
        load_state_dict(tmp_path / "weights.pth", "feature")
    assert not marker.exists(), "code inside a checkpoint ran"
    # the same file *would* run its code under a plain unpickler: the test's payload is real
    torch.load(tmp_path / "weights.pth", weights_only=False)  # noqa: S614 - deliberately unsafe, on our own file
    assert marker.exists()


# ------------------------------------------------------------------------------------ hostile datasets
AUDITED = r'''
"""Run `vlcache extract` once per argument list (argv[2:] split at '--next') under an audit hook that logs
every file opened (R/W) and every filesystem change (M) to argv[1], in this process and its workers."""
import os, sys, json
import torch
torch.set_num_threads(1)
from vlcache.cli import app
import vlcache.pipeline.config, vlcache.pipeline.datasets, vlcache.stages.extract.config  # noqa: F401
import vlcache.stages.extract.loop, vlcache.stages.extract.models  # noqa: F401
import torchvision.models  # noqa: F401  (imports done: what they open is not the dataset's doing)

LOG = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.copyfile", "os.symlink",
           "os.link", "os.truncate", "os.chmod", "os.chown", "os.utime", "shutil.move"}


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int) or path is None:
            return
        w = any(c in str(mode) for c in "wax+") if mode else bool(flags & WRITE)
        os.write(LOG, f"{'W' if w else 'R'}\t{os.fsdecode(path)!r}\n".encode())
    elif event in CHANGES:
        for p in args[:2]:
            if isinstance(p, (str, bytes, os.PathLike)):
                os.write(LOG, f"M\t{os.fsdecode(p)!r}\t{event}\n".encode())


sys.addaudithook(hook)
runs, cur = [], []
for a in sys.argv[2:]:
    if a == "--next":
        runs.append(cur)
        cur = []
    else:
        cur.append(a)
runs.append(cur)
codes = []
for argv in runs:
    os.write(LOG, b"RUN\n")
    try:
        app(args=argv, prog_name="vlcache")
        codes.append(0)
    except SystemExit as e:
        codes.append(e.code if isinstance(e.code, int) else 0)
print(json.dumps(codes))
'''


def _audit(log: Path) -> list[list[tuple[str, str]]]:
    """The audit log per run: [(kind R/W/M, path), ...]."""
    runs = []
    for line in log.read_text().splitlines():
        if line == "RUN":
            runs.append([])
        elif runs:
            kind, path = line.split("\t")[:2]
            runs[-1].append((kind, ast.literal_eval(path)))
    return runs


def _under(path: str, folder: Path) -> bool:
    p = os.path.normpath(os.path.abspath(path))
    return p == str(folder) or p.startswith(str(folder) + os.sep)


def test_hostile_dataset_cannot_read_or_write_outside_its_roots(tmp_path):
    root, secret, shared = tmp_path / "root", tmp_path / "secret", tmp_path / "shared"
    for d in (root / "images", secret, shared, tmp_path / "stores"):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for path in (root / "images" / "good.png", secret / "secret.png", shared / "pic.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    (root / "images" / "linked").symlink_to(shared, target_is_directory=True)

    def jsonl(name, images):
        p = tmp_path / name
        p.write_text("\n".join(json.dumps({"id": f"x{k}", "image": im, "split": "train", "captions": ["a dog"]})
                               for k, im in enumerate(images)))
        return p

    escaping = ["good.png", "../../secret/secret.png", str(secret / "secret.png"), "linked/../../../secret/secret.png"]
    odd = ["good.png", "linked/pic.png", "http://127.0.0.1:9/secret.png", f"file://{secret}/secret.png",
           "~/secret.png", "$HOME/secret.png", "a\x00b.png", "images/../good.png"]
    grid = ["--set", "groups=[grid]", "--set", "features.weights=none", "--set", "features.input_size=64",
            "--set", "features.grid_size=2", "--set", "block_size=4", "--num-workers", "1", "--batch-size", "2"]
    out_a, out_b = tmp_path / "stores" / "a.zarr", tmp_path / "stores" / "b.zarr"
    args = ["extract", "--dataset", str(jsonl("escaping.jsonl", escaping)), "--image-root", str(root / "images"),
            "--out", str(out_a), *grid, "--next",
            "extract", "--dataset", str(jsonl("odd.jsonl", odd)), "--image-root", str(root / "images"),
            "--out", str(out_b), *grid]
    (tmp_path / "audited.py").write_text(AUDITED)
    proc = subprocess.run([sys.executable, str(tmp_path / "audited.py"), str(tmp_path / "audit.log"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == [1, 3], proc.stdout + proc.stderr[-3000:]  # 3: finished, with failed images (#13.2)
    refused, ran = _audit(tmp_path / "audit.log")

    # 1. escaping paths: refused while reading the dataset file, naming it and the entry; nothing touched
    assert f"{tmp_path / 'escaping.jsonl'}: line 2 (id 'x1'): image path '../../secret/secret.png' escapes the " \
           f"image root {root / 'images'}" in proc.stderr
    assert not out_a.exists()
    assert not [p for _, p in refused if _under(p, secret) or _under(p, root)], "an image was read"
    assert [e for e in refused if e[0] != "R" and not e[1].startswith("/dev/")] == [], "something was written"

    # 2. paths that only look hostile are relative names under the root: not found, recorded, run goes on
    reads = [p for k, p in ran if k == "R"]
    assert not [p for p in reads if _under(p, secret)], f"read outside the image root: {reads}"
    assert str(root / "images" / "good.png") in reads
    assert str(root / "images" / "linked" / "pic.png") in reads  # a symlink inside the root is followed
    writes = [(k, p) for k, p in ran if k != "R" and not p.startswith("/dev/")]
    assert writes and all(_under(p, out_b) for _, p in writes), \
        f"written outside the store: {[w for w in writes if not _under(w[1], out_b)]}"
    from vlcache.storage.store import open_store

    store = open_store(out_b)
    assert store.attrs["complete"] is True
    errors = list(store.errors)
    assert errors[0] == errors[1] == errors[7] == "" and all("file not found" in e for e in errors[2:7]), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.log", "audited.py", "escaping.jsonl", "odd.jsonl",
                                                         "root", "secret", "shared", "stores"]
    assert sorted(p.name for p in (tmp_path / "stores").iterdir()) == ["b.zarr"]


@pytest.mark.parametrize("fmt", ["karpathy", "coco", "jsonl"])
@pytest.mark.parametrize("evil", ["../secret.png", "sub/../../secret.png", "ABSOLUTE", "./sub/./../../x/../secret.png"])
def test_escaping_image_paths_are_refused_in_every_format(tmp_path, fmt, evil):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    image = str(tmp_path / "secret.png") if evil == "ABSOLUTE" else evil
    if fmt == "karpathy":
        path = tmp_path / "dataset_x.json"
        path.write_text(json.dumps({"images": [{"filename": image, "split": "train", "sentences": [{"raw": "a"}]}]}))
    elif fmt == "coco":
        path = tmp_path / "captions_val.json"
        path.write_text(json.dumps({"images": [{"id": 1, "file_name": image}],
                                    "annotations": [{"image_id": 1, "caption": "a"}]}))
    else:
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps({"id": 1, "image": image, "split": "val", "captions": ["a"]}))
    with pytest.raises(DatasetError, match="escapes the image root") as e:
        load_dataset(path, root, check_images=False)
    assert str(e.value).startswith(str(path)) and repr(image) in str(e.value)


HUGE = r'''
import json, resource, sys, time
from vlcache.pipeline.datasets import DatasetError, load_dataset
t = time.perf_counter()
try:
    load_dataset(sys.argv[1], check_images=False)
    error = None
except DatasetError as e:
    error = str(e)
print(json.dumps({"error": error, "seconds": time.perf_counter() - t,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def test_a_50_mb_caption_is_refused_in_bounded_time_and_memory(tmp_path):
    path = tmp_path / "dataset_huge.json"
    caption = "a dog on a red bus " * (50_000_000 // 19)
    path.write_text(json.dumps({"images": [{"filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}]},
                                           {"filename": "b.png", "split": "train", "sentences": [{"raw": caption}]}]}))
    assert path.stat().st_size > 50_000_000
    out = subprocess.run([sys.executable, "-c", HUGE, str(path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["error"] == (f"{path}: 1 image(s) with a caption (or its tokens) longer than 4096 characters, "
                          f"e.g. id 'b.png' ({len(caption.strip())} characters)")
    # parsing and tokenising the file is linear (~20 bytes of memory per byte of caption); nothing after it runs
    assert r["seconds"] < 60 and r["peak_mb"] < 2500, r
