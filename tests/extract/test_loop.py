"""The extraction loop end to end: the CLI on a Karpathy-format dataset with a random-init Mask R-CNN,
the annotations backend on the synthetic set, every kind of bad image, --strict, and deterministic models.

Everything runs on the CPU at toy sizes (64-96 px images, 64 px feature input, 2x2 grid, 20 RPN
proposals, 4 instances) so the whole file stays fast on two cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as cocomask
from typer.testing import CliRunner

from extract_helpers import grid_sets, jpeg_bytes, write_karpathy

from vlcache.cli import app
from vlcache.pipeline.config import load_config
from vlcache.pipeline.datasets import load_dataset
from vlcache.pipeline.records import Dataset
from vlcache.pipeline.synth import SYNTH_CLASSES, SYNTH_SYNONYMS, _plural, generate
from vlcache.stages.extract.config import ExtractConfig
from vlcache.stages.extract.detectors import DETECTORS
from vlcache.stages.extract.loop import extract
from vlcache.stages.extract.models import build_models
from vlcache.storage.backends import open_backend
from vlcache.storage.schema import SPLITS
from vlcache.storage.store import open_store

torch.set_num_threads(2)

# toy-size settings shared by the tests (CLI form and config form)
TV_SET = ["detector.min_size=64", "detector.max_size=96", "detector.proposals=20", "detector.max_instances=4",
          "detector.score_threshold=0.0", "features.input_size=64", "features.grid_size=2",
          "features.max_regions=6", "features.fixed_regions=6", "features.min_regions=2", "block_size=2",
          "features.region_min_size=64", "features.region_max_size=128"]


def _cli_sets(pairs):
    return [a for p in pairs for a in ("--set", p)]


def _textured(rng, h, w):
    """An RGB image with a few flat rectangles on noise (something for a detector to look at)."""
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        img[y : y + h // 3, x : x + w // 3] = rng.integers(0, 256, 3)
    return img


# ------------------------------------------------------------------------------- torchvision via the CLI
KARPATHY = [
    ("1000268201_693b08cb0e.jpg", "train", ["A man rides a bike next to a dog .", "A person on a bicycle ."]),
    ("1001773457_577c3a7d70.jpg", "restval", ["Two teddy bears sit on a couch .", "Toys on a sofa .",
                                               "A stuffed bear ."]),
    ("1002674143_1b742ab4b8.jpg", "val", ["A traffic light over a street with cars ."]),
    ("1003163366_44323f5815.jpg", "test", ["A cat sleeps .", "Kittens playing ."]),
    ("1007129816_e794419615.jpg", "restval", ["Three women and a child walk ."]),
    ("1007320043_627395c3d8.jpg", "train", ["Nothing here matches ."]),
]
SIZES = [(64, 80), (96, 72), (80, 80), (72, 96), (64, 64), (90, 70)]


@pytest.fixture(scope="module")
def karpathy_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flickr8k")
    rng = np.random.default_rng(0)
    (root / "Flicker8k_Dataset").mkdir()
    for (fname, _, _), (h, w) in zip(KARPATHY, SIZES):
        Image.fromarray(_textured(rng, h, w)).save(root / "Flicker8k_Dataset" / fname, quality=90)
    write_karpathy(root, KARPATHY)
    return root


def test_cli_torchvision_random_weights_creates_complete_store(karpathy_dir, tmp_path):
    url = str(tmp_path / "tv.zarr")
    cmd = [sys.executable, "-m", "vlcache", "extract", "--dataset", str(karpathy_dir / "dataset_flickr8k.json"),
           "--image-root", str(karpathy_dir / "Flicker8k_Dataset"), "--out", url, "--detector", "torchvision",
           "--weights", "none", "--batch-size", "2", "--num-workers", "2",  # none: every model (#13.1)
           *_cli_sets(TV_SET)]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "extracted 6 images" in r.stdout and "store complete: True" in r.stdout, r.stdout

    store = open_store(url)
    n = len(KARPATHY)
    assert len(store) == n and store.done.all() and (store.errors == "").all()
    assert list(store.ids) == [e[0] for e in KARPATHY]
    # restval is folded into train (the Karpathy convention for COCO); the splits attribute counts it so
    assert [store.split(i) for i in range(n)] == ["train", "train", "val", "test", "train", "train"]
    assert store.attrs["splits"] == {"train": 4, "val": 1, "test": 1}
    assert [store.hw(i) for i in range(n)] == SIZES
    assert store.layout.capacities.captions == 3 and store.captions(1)[2] == "A stuffed bear ."

    with open_backend(url) as b:
        a = {p: np.asarray(b.read(p, slice(None))) for p in b.arrays()}
    # instances: 0..4 per image, padded past the count, inside the image, masks are 28x28 uint8
    counts = a["instances/count"]
    assert a["instances/masks"].shape == (n, 4, 28, 28) and a["instances/masks"].dtype == np.uint8
    assert ((counts >= 0) & (counts <= 4)).all() and counts.sum() > 0
    for i, (h, w) in enumerate(SIZES):
        k = counts[i]
        boxes, labels, scores = a["instances/boxes"][i], a["instances/labels"][i], a["instances/scores"][i]
        assert (labels[:k] >= 0).all() and (labels[:k] < 80).all() and (labels[k:] == -1).all()
        assert ((scores[:k] >= 0) & (scores[:k] <= 1)).all() and (scores[k:] == 0).all()
        assert (boxes[:k, 0] <= boxes[:k, 2]).all() and (boxes[:k, 2] <= w + 1e-3).all()
        assert (boxes[:k, 3] <= h + 1e-3).all() and (boxes[:k] >= -1e-3).all()
        assert (a["instances/masks"][i, k:] == 0).all()
    # regions: adaptive 2..6 per image (detections topped up with RPN proposals), float16 features
    rc = a["regions/count"]
    assert ((rc >= 2) & (rc <= 6)).all()
    assert a["regions/feats"].shape == (n, 6, 2048) and a["regions/feats"].dtype == np.float16
    assert np.isfinite(a["regions/feats"].astype(np.float32)).all()
    assert all(np.abs(a["regions/feats"][i, : rc[i]]).sum() > 0 for i in range(n))
    assert all((a["regions/feats"][i, rc[i]:] == 0).all() for i in range(n))
    # grid: 2x2 cells of 2048 channels, one per image, not constant
    g = a["grid/feats"]
    assert g.shape == (n, 4, 2048) and g.dtype == np.float16 and np.isfinite(g.astype(np.float32)).all()
    assert all(g[i].std() > 0 for i in range(n))

    # matches come from the captions and the COCO synonym table, whatever the random detector found
    classes = store.classes
    assert len(classes) == 80 and classes[0] == "person"
    got = {(m["words"], m["class_name"], m["token_start"], m["token_end"]) for m in store.matches(0, 0)}
    assert got == {("man", "person", 1, 2), ("bike", "bicycle", 4, 5), ("dog", "dog", 8, 9)}
    teddy = store.matches(1, 0)
    assert [(m["words"], m["class_name"], m["token_start"], m["token_end"]) for m in teddy] == [
        ("teddy bears", "teddy bear", 1, 3), ("couch", "couch", 6, 7)]
    assert teddy[0]["char_start"] == 4 and teddy[0]["char_end"] == 15  # "teddy bears" in the raw caption
    assert {m["class_name"] for m in store.matches(2, 0)} == {"traffic light", "car"}
    assert {m["class_name"] for m in store.matches(4, 0)} == {"person"}
    assert store.matches(5, 0) == []
    assert a["matches/count"][1].tolist() == [2, 1, 1]  # teddy bears + couch; sofa -> couch; stuffed bear
    assert [m["class_name"] for m in store.matches(1, 2)] == ["teddy bear"]

    # provenance: the weights and the full content config, without runtime knobs
    attrs = store.attrs
    assert attrs["models"]["detector"]["weights_id"] == "none (random init)"
    assert attrs["models"]["detector"]["arch"] == "maskrcnn_resnet50_fpn_v2"
    assert attrs["models"]["features"]["weights_id"].startswith("none (random init")
    cfg = attrs["config"]
    assert cfg["detector"]["weights"] == "none" and cfg["features"]["weights"] == "none"
    assert cfg["detector"]["min_size"] == 64 and cfg["detector"]["proposals"] == 20
    assert cfg["features"]["grid_size"] == 2 and cfg["block_size"] == 2 and cfg["seed"] == 0
    assert "runtime" not in cfg
    assert attrs["dataset"] == "flickr8k" and attrs["complete"] is True
    src = attrs["sources"][0]
    assert src["path"].endswith("dataset_flickr8k.json") and len(src["sha256"]) == 64


def test_models_are_built_deterministically_from_the_seed():
    """Random-init Mask R-CNN and ResNet-101 weights depend only on cfg.seed (resume and ranks rely on it)."""
    empty = Dataset(name="none", image_root=Path("."), records=[])  # torchvision needs no dataset classes
    overrides = ["detector.weights=none", "features.weights=none", *TV_SET]

    def weights(seed):
        cfg = load_config(ExtractConfig, overrides=[*overrides, f"seed={seed}"])
        m = build_models(cfg, empty)
        return {**{"det." + k: v for k, v in m.detector.model.state_dict().items()},
                **{"feat." + k: v for k, v in m.extractor.state_dict().items()}}

    torch.manual_seed(123)
    a = weights(0)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3)), "build_models must leave the caller's RNG state alone"
    b, c = weights(0), weights(1)
    assert a.keys() == b.keys() and len(a) > 500
    assert all(torch.equal(a[k], b[k]) for k in a)
    kernels = [k for k in a if a[k].ndim == 4]  # every conv kernel is randomly initialised
    assert len(kernels) > 150 and not any(torch.equal(a[k], c[k]) for k in kernels)


# ---------------------------------------------------------------------------------- annotations backend
def synth_config(**extra) -> ExtractConfig:
    sets = ["detector.backend=annotations", "features.weights=none", "features.input_size=64",
            "features.grid_size=2", "features.max_regions=6", "features.fixed_regions=6",
            "features.min_regions=2", "block_size=4", "runtime.batch_size=4", "runtime.num_workers=0",
            "features.region_min_size=64", "features.region_max_size=128"]
    return load_config(ExtractConfig, overrides=sets + [f"{k}={v}" for k, v in extra.items()])


def test_annotations_backend_masks_and_synonym_matches(tmp_path):
    data = tmp_path / "synth"
    generate(data, n_images=12, seed=3, size=(72, 72))
    ds = load_dataset(data / "dataset_synth.json", instances=data / "instances.json")
    url = str(tmp_path / "ann.zarr")
    summary = extract(ds, url, synth_config(), progress=False)
    assert summary.complete and summary.images_done == 12 and summary.bad_images == []
    store = open_store(url)
    assert store.classes == SYNTH_CLASSES
    assert store.attrs["models"]["detector"]["weights_id"] == "annotations (dataset ground truth)"
    assert "class_words.txt" in store.attrs["models"]["matching"]["class_words"]

    coco = json.loads((data / "instances.json").read_text())
    anns: dict[int, list] = {}
    for ann in coco["annotations"]:
        anns.setdefault(ann["image_id"], []).append(ann)
    ious = []
    for i, rec in enumerate(ds.records):
        truth = anns[rec.coco_id]
        inst = store.instances(i)
        assert inst["labels"].tolist() == [t["category_id"] - 1 for t in truth]  # index into SYNTH_CLASSES
        assert np.allclose(inst["scores"], 1.0)
        pasted = store.masks(i) >= 0.5
        for k, t in enumerate(truth):
            rle = dict(t["segmentation"], counts=t["segmentation"]["counts"].encode())
            gt = cocomask.decode(rle).astype(bool)
            ious.append((pasted[k] & gt).sum() / (pasted[k] | gt).sum())
            np.testing.assert_allclose(inst["boxes"][k], np.add(t["bbox"], [0, 0, t["bbox"][0], t["bbox"][1]]),
                                       atol=1e-3)
    ious = np.asarray(ious)
    # the masks are made the detectron2 way (roi_align aligned=True) and pasted back that way
    assert store.mask_paste == "detectron2"
    assert len(ious) >= 12 and ious.mean() > 0.98 and ious.min() > 0.9, ious

    # matches: every class name, synonym and their plurals (as the generator writes them) is found
    forms = {}
    for cls in SYNTH_CLASSES:
        for phrase in [cls, *SYNTH_SYNONYMS.get(cls, [])]:
            forms[tuple(phrase.split())] = forms[tuple(_plural(phrase).split())] = (cls, phrase != cls)
    seen_multi = seen_syn = 0
    for i, rec in enumerate(ds.records):
        for c, toks in enumerate(rec.tokens):
            found = {(m["token_start"], m["token_end"]): m["class_name"] for m in store.matches(i, c)}
            for form, (cls, synonym) in forms.items():
                for s in range(len(toks) - len(form) + 1):
                    if tuple(toks[s : s + len(form)]) == form:
                        assert found.get((s, s + len(form))) == cls, f"row {i} caption {c}: {form} in {toks}"
                        seen_multi += len(form) > 1
                        seen_syn += synonym
    assert seen_multi >= 2 and seen_syn >= 2, (seen_multi, seen_syn)
    assert store.attrs["splits"] == ds.split_counts()


# ------------------------------------------------------------------------------------------ bad images
def write_image_zoo(folder: Path) -> dict[str, tuple]:
    """Write one file per kind; returns name -> ("good", (h, w)) or ("bad", reason fragment)."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = _textured(rng, 64, 80)
    out = {}
    Image.fromarray(rgb).save(folder / "rgb.png")
    out["rgb.png"] = ("good", (64, 80))
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    out["grey.png"] = ("good", (64, 80))
    rgba = np.dstack([rgb, rng.integers(0, 256, (64, 80), dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    out["rgba.png"] = ("good", (64, 80))
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=90)
    out["cmyk.jpg"] = ("good", (64, 80))
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    out["palette.png"] = ("good", (64, 80))
    deep = (rng.integers(0, 65536, (72, 64))).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I;16")
    out["deep16.png"] = ("good", (72, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 80x64 (w x h) shows as 64x80
    (folder / "exif6.jpg").write_bytes(jpeg_bytes(rgb, exif=exif.tobytes()))
    out["exif6.jpg"] = ("good", (80, 64))
    (folder / "corrupt.jpg").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    out["corrupt.jpg"] = ("bad", "not an image")
    whole = jpeg_bytes(_textured(rng, 96, 96))
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    out["truncated.jpg"] = ("bad", "truncated or corrupt image data")
    (folder / "empty.jpg").write_bytes(b"")
    out["empty.jpg"] = ("bad", "empty file (0 bytes)")
    out["missing.jpg"] = ("bad", "file not found")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "pixel.gif")
    out["pixel.gif"] = ("bad", "image too small (1x1")
    return out


ZOO_ORDER = ["rgb.png", "grey.png", "corrupt.jpg", "rgba.png", "truncated.jpg", "cmyk.jpg", "empty.jpg",
             "palette.png", "missing.jpg", "deep16.png", "pixel.gif", "exif6.jpg"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    kinds = write_image_zoo(root / "images")
    write_karpathy(root, [(name, SPLITS[i % 3], [f"picture {i} of a dog"]) for i, name in enumerate(ZOO_ORDER)])
    return root, kinds


def test_overwrite_with_several_ranks_is_refused_before_touching_the_store(tmp_path):
    data = tmp_path / "synth"
    generate(data, n_images=4, seed=3, size=(64, 64))
    ds = load_dataset(data / "dataset_synth.json", instances=data / "instances.json")
    url = str(tmp_path / "s.zarr")
    extract(ds, url, synth_config(), progress=False)
    before = open_store(url).attrs["fingerprint"]
    with pytest.raises(ValueError, match=r"--overwrite with 2 ranks would race: delete .*s\.zarr first"):
        extract(ds, url, synth_config(), overwrite=True, rank=0, world_size=2, progress=False)
    assert open_store(url).attrs["fingerprint"] == before and open_store(url).done.all()


def test_bad_images_are_recorded_and_the_run_goes_on(zoo, tmp_path):
    root, kinds = zoo
    ds = load_dataset(root / "dataset_flickr8k.json", root / "images", check_images=False)
    cfg = load_config(ExtractConfig, overrides=grid_sets())
    url = str(tmp_path / "zoo.zarr")
    summary = extract(ds, url, cfg, progress=False)
    bad = [n for n in ZOO_ORDER if kinds[n][0] == "bad"]
    good = [n for n in ZOO_ORDER if kinds[n][0] == "good"]
    assert summary.complete and summary.images_done == len(good)
    assert [Path(p).name for p, _ in summary.bad_images] == bad
    text = summary.describe()
    assert f"{len(bad)} bad image(s) recorded in images/error" in text
    for (path, reason), name in zip(summary.bad_images, bad):
        assert kinds[name][1] in reason and f"{path}: {reason}" in text

    store = open_store(url)
    assert store.done.all()
    errors = store.errors
    with open_backend(url) as b:
        hw, grid = b.read("images/hw", slice(None)), b.read("grid/feats", slice(None))
    for row, name in enumerate(ZOO_ORDER):
        kind, what = kinds[name]
        if kind == "bad":
            assert what in errors[row], (name, errors[row])
            assert (grid[row] == 0).all() and tuple(hw[row]) == (0, 0)
        else:
            assert errors[row] == "", (name, errors[row])
            assert tuple(hw[row]) == what, name  # EXIF-rotated: height and width swapped
            assert np.isfinite(grid[row].astype(np.float32)).all() and grid[row].std() > 0
    assert store.rows().tolist() == [r for r, n in enumerate(ZOO_ORDER) if kinds[n][0] == "good"]
    # EXIF orientation was applied before the features: the rotated copy differs from the plain one
    assert not np.array_equal(grid[ZOO_ORDER.index("exif6.jpg")], grid[ZOO_ORDER.index("rgb.png")])


def test_strict_stops_at_first_bad_image_and_keeps_finished_blocks(zoo, tmp_path):
    root, _ = zoo
    order = ["rgb.png", "grey.png", "rgba.png", "cmyk.jpg", "palette.png", "deep16.png", "truncated.jpg",
             "exif6.jpg", "corrupt.jpg"]
    dataset = root / "dataset_strict.json"
    write_karpathy(tmp_path, [(n, "train", ["a dog"]) for n in order]).rename(dataset)
    url = str(tmp_path / "strict.zarr")

    def cli(*flags, batch):
        return CliRunner().invoke(app, ["extract", "--dataset", str(dataset), "--image-root", str(root / "images"),
                                        "--out", url, *flags, *_cli_sets(grid_sets(2, batch, 0))])

    result = cli("--strict", batch=2)
    assert result.exit_code == 1, result.output
    bad_path = str(root / "images" / "truncated.jpg")  # click >= 8.2: output holds stdout and stderr
    assert f"bad image {bad_path}: truncated or corrupt image data" in result.output and "--strict" in result.output
    with open_backend(url) as b:
        done = np.asarray(b.read("images/done", slice(None)))
        assert b.attr("complete") in (None, False)
    assert done.tolist() == [1] * 6 + [0] * 3  # blocks 0-2 were written whole before the stop

    # a rerun without --strict resumes (same content config) and records the bad ones instead; only the
    # last two blocks are processed (one good image, two bad), the finished ones are not redone
    result = cli(batch=1)  # a runtime option may change on resume
    assert result.exit_code == 3, result.output  # finished, but the store holds failed images (#13.2)
    assert "extracted 1 images" in result.output and "2 bad image(s)" in result.output
    store = open_store(url)
    assert store.done.all() and store.attrs["complete"] is True
    assert [bool(e) for e in store.errors] == [False] * 6 + [True, False, True]


def test_detector_registry_has_every_backend_and_imports_each_only_when_asked():
    # each backend is its own module below the registry, imported on first use (no cycle; detectron2 optional)
    assert DETECTORS.names() == ["annotations", "detectron2", "torchvision"]
    code = ("import sys\nfrom vlcache.stages.extract.detectors import DETECTORS\n"
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('vlcache.stages.extract.detector_')))\n"
            "DETECTORS.get('annotations')\n"
            "print(sorted(m.rsplit('.', 1)[1] for m in sys.modules if m.startswith('vlcache.stages.extract.detector_')))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.split("\n")[:2] == ["[]", "['detector_annotations']"], r.stdout + r.stderr
    from vlcache.stages.extract import detector_annotations

    assert DETECTORS.get("annotations") is detector_annotations.AnnotationsDetector


def test_a_dataset_smaller_than_one_block_gets_one_block_of_its_size(tmp_path):
    """Chunks are stored whole, padding included: 3 images in 64-row blocks would be 95% padding."""
    data = tmp_path / "synth"
    generate(data, n_images=3, seed=4, size=(64, 64))
    ds = load_dataset(data / "dataset_synth.json", instances=data / "instances.json")
    url = str(tmp_path / "s.zarr")
    extract(ds, url, synth_config(block_size=64), progress=False)
    store = open_store(url)
    assert store.layout.block_size == 3 and store.layout.num_blocks == 1 and store.done.all()
    feats = Path(url) / "regions" / "feats" / "c" / "0" / "0" / "0"
    assert feats.stat().st_size == 3 * 6 * store.layout.capacities.region_dim * 2 + 4  # 3 rows + crc32c
    assert extract(ds, url, synth_config(block_size=64), progress=False).images_done == 0  # resumes as done
