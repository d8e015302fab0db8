"""The synthetic dataset: determinism, scene statistics, occlusion-correct masks, caption grammar, speed."""

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from vlcache.pipeline.datasets import load_dataset
from vlcache.pipeline.synth import NOISE, SYNTH_CLASSES, SYNTH_COLOURS, SYNTH_SYNONYMS, generate
from vlcache.stages.extract.matching import ClassWordMatcher

NUMBERS = {"two": 2, "three": 3, "four": 4}
# pycocotools.mask.decode trips a numpy 2 deprecation inside the library itself
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    path = generate(out, n_images=200, seed=1, size=(96, 96))
    return out, json.loads(path.read_text()), json.loads((out / "instances.json").read_text())


def files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path):
    a = files(generate(tmp_path / "a", n_images=12, seed=3, size=(64, 64)).parent)
    b = files(generate(tmp_path / "b", n_images=12, seed=3, size=(64, 64)).parent)
    assert len(a) == 12 + 3 and a == b  # images, dataset_synth.json, instances.json, class_words.txt
    c = files(generate(tmp_path / "c", n_images=12, seed=4, size=(64, 64)).parent)
    assert c["images/synth_000000.png"] != a["images/synth_000000.png"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        generate(tmp_path, n_images=0)
    with pytest.raises(ValueError, match="at least 32x32"):
        generate(tmp_path, size=(16, 64))


def test_scene_statistics(synth):
    out, kdata, inst = synth
    assert [c["name"] for c in sorted(inst["categories"], key=lambda c: c["id"])] == SYNTH_CLASSES
    per_image = Counter(a["image_id"] for a in inst["annotations"])
    assert len(per_image) == 200 and set(per_image.values()) == {1, 2, 3, 4}
    assert {a["category_id"] for a in inst["annotations"]} == set(range(1, len(SYNTH_CLASSES) + 1))
    assert len({a["attributes"]["color"] for a in inst["annotations"]}) == len(SYNTH_COLOURS)
    assert {a["attributes"]["size"] for a in inst["annotations"]} == {"small", "large"}
    splits = Counter(im["split"] for im in kdata["images"])
    assert splits == {"train": 160, "val": 20, "test": 20}
    for im in kdata["images"]:
        raws = [s["raw"] for s in im["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        assert Image.open(out / im["filepath"] / im["filename"]).size == (96, 96)


def test_masks_follow_occlusion(synth):
    out, kdata, inst = synth
    by_image = {}
    for a in inst["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    occluded = 0
    for im in inst["images"]:
        pixels = np.asarray(Image.open(out / "images" / im["file_name"])).astype(int)
        union = np.zeros((96, 96), int)
        for a in by_image[im["id"]]:
            m = mask_utils.decode(a["segmentation"]).astype(bool)
            union += m
            assert a["area"] == m.sum() > 0 and a["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            # every mask pixel shows this object's colour: occluded parts are not in the mask
            colour = np.array(SYNTH_COLOURS[a["attributes"]["color"]])
            assert np.abs(pixels[m] - colour).max() <= NOISE, (im["file_name"], a["id"])
            full = a["attributes"]["full_area"]
            assert 0.4 * full <= a["area"] <= full
            occluded += a["area"] < full
        assert union.max() == 1, f"{im['file_name']}: masks overlap"
    assert occluded >= 10  # occlusion actually happens


def test_captions_name_the_scene(synth):
    _, kdata, inst = synth
    matcher = ClassWordMatcher(SYNTH_CLASSES, SYNTH_SYNONYMS)
    counts = {}
    for a in inst["annotations"]:
        counts.setdefault(a["image_id"], Counter())[a["category_id"] - 1] += 1
    words = Counter()
    for im in kdata["images"]:
        present = counts[im["cocoid"]]
        for k, s in enumerate(im["sentences"]):
            ms = matcher.match(s["raw"], s["tokens"])
            assert ms, s["raw"]
            assert {m.label for m in ms} <= set(present), s["raw"]  # never an absent class
            words.update(m.words for m in ms)
            assert all(s["raw"][m.char_start : m.char_end].lower() == m.words for m in ms)
            if k == 0:  # the first caption lists every class with its count
                assert {m.label for m in ms} == set(present), s["raw"]
                for m in ms:
                    before = s["tokens"][max(0, m.token_start - 2) : m.token_start]
                    said = [NUMBERS[t] for t in before if t in NUMBERS]
                    n = present[m.label]
                    assert (said == [n]) if n > 1 else (not said), (s["raw"], m.words, n)
    # the grammar exercises plurals, synonyms and multi-word names (class names and a synonym)
    for w in ("balls", "boxes", "crosses", "spheres", "crates", "crescents", "stop signs", "half moons", "plus sign"):
        assert words[w] > 0, w
    assert words["stop sign"] > 0 and words["half moon"] > 0 and words["octagon"] > 0


def test_loads_with_instances(synth):
    out, kdata, inst = synth
    ds = load_dataset(out / "dataset_synth.json", instances=out / "instances.json")
    assert ds.name == "synth" and ds.classes == SYNTH_CLASSES and len(ds) == 200
    r = ds.records[5]
    assert r.id == "5" and r.path == "images/synth_000005.png" and len(r.captions) == 5
    assert len(r.annotations) == sum(a["image_id"] == 5 for a in inst["annotations"])
    assert all(0 <= a["category_id"] < len(SYNTH_CLASSES) for rec in ds.records for a in rec.annotations)


def test_thousand_images_fast(tmp_path):
    t = time.perf_counter()
    path = generate(tmp_path, n_images=1000, seed=0)
    took = time.perf_counter() - t
    print(f"generated 1000 synthetic images (160x160) in {took:.1f} s")
    assert len(list((tmp_path / "images").glob("*.png"))) == 1000
    assert len(json.loads(path.read_text())["images"]) == 1000
    assert took < 60
