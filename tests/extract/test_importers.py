"""Importing BUTD features (generate_tsv TSV, per-image npz, SCAN npy) into a store, read back by id."""

import base64
import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlcache.pipeline.datasets import load_dataset
from vlcache.pipeline.records import Dataset, ImageRecord
from vlcache.stages.extract.importers import (
    FeatureImportError,
    IdResolver,
    find_source_files,
    format_import_report,
    import_features,
)
from vlcache.stages.extract.matching import ClassWordMatcher
from vlcache.storage.backends import open_backend

COCO_IDS = [391895, 522418, 184613, 318219, 554625, 397133, 37777]  # 7 dataset images
D = 2048
GEN_TSV = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
LXMERT_TSV = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
              "num_boxes", "boxes", "features"]


@pytest.fixture
def dataset(tmp_path):
    """A Karpathy dataset_coco.json of 7 tiny images (sizes differ per image), images on disk."""
    root = tmp_path / "images"
    images = []
    for k, cid in enumerate(COCO_IDS):
        fname = f"COCO_val2014_{cid:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + k, 10 + k), (k * 30, 0, 0)).save(root / "val2014" / fname, format="PNG")
        raw = ["A dog on a bench.", f"Picture number {k}."][: 1 + k % 2]
        sents = [{"raw": r, "tokens": r.lower().strip(".").split()} for r in raw]
        split = ["train", "val", "test"][k % 3]
        images.append({"filepath": "val2014", "filename": fname, "cocoid": cid, "split": split, "sentences": sents})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return load_dataset(path, root)


def make_features(seed=0, ids=COCO_IDS, max_boxes=10):
    """Known per-image features: id -> (h, w, boxes (n,4), feats (n,D)), n in 3..max_boxes."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, cid in enumerate(ids):
        n = max_boxes if k == 1 else int(rng.integers(3, max_boxes))
        boxes = rng.uniform(0, 20, (n, 4)).astype(np.float32)
        out[cid] = (10 + k, 20 + k, boxes, rng.standard_normal((n, D)).astype(np.float32))
    return out


def b64(a) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")


def write_tsv(path: Path, rows: list[dict], fieldnames) -> None:
    # generate_tsv.py: csv.DictWriter(delimiter='\t', fieldnames=FIELDNAMES), default '\r\n' line ends
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=fieldnames)
        for r in rows:
            writer.writerow(r)


def gen_row(cid, h, w, boxes, feats):
    return {"image_id": cid, "image_w": w, "image_h": h, "num_boxes": len(boxes), "boxes": b64(boxes),
            "features": b64(feats)}


def store_rows(url):
    """Store content by image id: (hw, count, boxes, labels, scores, feats, error)."""
    b = open_backend(url)
    read = {p: b.read(p, slice(None)) for p in ("images/id", "images/hw", "images/error", "regions/count",
                                                "regions/boxes", "regions/labels", "regions/scores", "regions/feats")}
    assert b.attr("complete") is True
    out = {}
    for i, rid in enumerate(read["images/id"]):
        n = int(read["regions/count"][i])
        out[rid] = (tuple(read["images/hw"][i]), n, read["regions/boxes"][i], read["regions/labels"][i],
                    read["regions/scores"][i], read["regions/feats"][i], read["images/error"][i])
    return out, b.attrs()


def assert_matches(rows, feats, regions, skip=()):
    for cid, (h, w, boxes, f) in feats.items():
        if str(cid) not in rows or cid in skip:
            continue
        hw, n, sboxes, _, _, sfeats, err = rows[str(cid)]
        m = min(len(boxes), regions)
        assert err == "" and hw == (h, w) and n == m
        np.testing.assert_allclose(sboxes[:m], boxes[:m])
        np.testing.assert_allclose(sfeats[:m].astype(np.float32), f[:m], rtol=1e-3, atol=1e-3)
        assert not sboxes[m:].any() and not sfeats[m:].any()  # padding


def test_tsv_shuffled_split_files_with_mismatched_ids(dataset, tmp_path, capsys):
    feats = make_features()
    missing_id = COCO_IDS[4]
    rows = [gen_row(cid, *v) for cid, v in feats.items() if cid != missing_id]
    extra = make_features(seed=1, ids=[999001, 999002])
    rows += [gen_row(cid, *v) for cid, v in extra.items()]
    random.Random(3).shuffle(rows)  # rows arrive in arbitrary order
    src = tmp_path / "butd"
    src.mkdir()
    write_tsv(src / "karpathy_val_resnet101_faster_rcnn_genome.tsv.0", rows[:4], GEN_TSV)
    write_tsv(src / "karpathy_val_resnet101_faster_rcnn_genome.tsv.1", rows[4:], GEN_TSV)
    url = str(tmp_path / "store.zarr")

    report = import_features(dataset, src, url, block_size=3, regions=8, progress=False)

    assert report.format == "tsv" and report.source_entries == 8 and report.matched == 6 and report.complete
    assert report.extra_ids.count == 2 and sorted(report.extra_ids.examples) == ["999001", "999002"]
    assert report.missing.count == 1 and report.missing.examples == [str(missing_id)]
    assert report.truncated.count == 1 and report.truncated.examples == [f"{COCO_IDS[1]} (10 boxes)"]
    assert report.blocks_written == 3 and report.written == 7
    printed = capsys.readouterr().err
    assert "999001" in printed and "2 source id(s) match no dataset image" in printed
    text = format_import_report(report)
    assert f"1 dataset image(s) have no features" in text and str(missing_id) in text

    rows_by_id, attrs = store_rows(url)
    assert list(rows_by_id) == [str(c) for c in COCO_IDS]  # dataset order, not source order
    assert_matches(rows_by_id, feats, regions=8, skip={missing_id})
    hw, n, _, labels, scores, _, err = rows_by_id[str(missing_id)]
    assert n == 0 and err.startswith("no features in") and str(missing_id) in err
    assert (rows_by_id[str(COCO_IDS[0])][3] == -1).all() and not rows_by_id[str(COCO_IDS[0])][4].any()
    cfg = attrs["config"]
    assert cfg["source"] == "import" and cfg["format"] == "tsv" and cfg["regions"] == 8
    assert len(cfg["source_files"]) == 2 and all(len(f["sha256"]) == 64 for f in cfg["source_files"])
    assert attrs["classes"] == [] and attrs["dataset"] == "coco"

    again = import_features(dataset, src, url, block_size=3, regions=8, progress=False)  # resume: no work
    assert again.complete and again.written == 0 and again.blocks_written == 0


def test_tsv_lxmert_and_cls_prob_variants(dataset, tmp_path):
    feats = make_features(seed=2)
    rng = np.random.default_rng(5)
    lx_rows, cp_rows, expect = [], [], {}
    for cid, (h, w, boxes, f) in feats.items():
        n = len(boxes)
        obj, conf = rng.integers(0, 1600, n), rng.uniform(0, 1, n).astype(np.float32)
        lx_rows.append({"img_id": f"COCO_val2014_{cid:012d}", "img_h": h, "img_w": w, "objects_id": b64(obj),
                        "objects_conf": b64(conf), "attrs_id": b64(obj % 400), "attrs_conf": b64(conf),
                        "num_boxes": n, "boxes": b64(boxes), "features": b64(f)})  # fmt: skip
        prob = rng.uniform(0, 1, (n, 1601)).astype(np.float32)
        prob[:, 0] = 2.0  # background column must be ignored
        cp_rows.append({**gen_row(cid, h, w, boxes, f), "cls_prob": b64(prob)})
        expect[cid] = (obj, conf, prob[:, 1:].argmax(1), prob[:, 1:].max(1))
    write_tsv(tmp_path / "lxmert.tsv", lx_rows, LXMERT_TSV)
    write_tsv(tmp_path / "google.tsv", cp_rows, GEN_TSV + ["cls_prob"])

    for name, col in [("lxmert.tsv", 0), ("google.tsv", 2)]:
        url = str(tmp_path / f"{name}.zarr")
        report = import_features(dataset, tmp_path / name, url, regions=10, progress=False, classes=["a", "b"])
        assert report.matched == 7 and report.extra_ids.count == 0 and report.missing.count == 0
        rows, attrs = store_rows(url)
        assert_matches(rows, feats, regions=10)
        assert attrs["classes"] == ["a", "b"]
        for cid, e in expect.items():
            _, n, _, labels, scores, _, _ = rows[str(cid)]
            np.testing.assert_array_equal(labels[:n], e[col])
            np.testing.assert_allclose(scores[:n], e[col + 1], rtol=1e-6)
            assert (labels[n:] == -1).all()


def test_tsv_corrupt_base64_names_file_and_line(dataset, tmp_path):
    feats = make_features()
    rows = [gen_row(cid, *v) for cid, v in feats.items()]
    rows[2]["features"] = rows[2]["features"][:100] + "!!not-base64!!" + rows[2]["features"][114:]
    path = tmp_path / "bad.tsv"
    write_tsv(path, rows, GEN_TSV)
    bad_b64 = rf"bad\.tsv:3 \(image id {COCO_IDS[2]}\): field 'features' is not valid base64"
    with pytest.raises(FeatureImportError, match=bad_b64):
        import_features(dataset, path, str(tmp_path / "s.zarr"), progress=False)

    rows[2] = gen_row(COCO_IDS[2], *feats[COCO_IDS[2]])
    rows[5]["num_boxes"] = 99  # boxes no longer match the count
    write_tsv(path, rows, GEN_TSV)
    bad_count = r"bad\.tsv:6 .*'boxes' holds \d+ float32 values, which is not num_boxes=99"
    with pytest.raises(FeatureImportError, match=bad_count):
        import_features(dataset, path, str(tmp_path / "s.zarr"), overwrite=True, progress=False)

    path.write_text("391895\t10\t20\t3\tAAAA\n")  # 5 fields: not a known layout
    with pytest.raises(FeatureImportError, match=r"bad\.tsv:1: 5 tab-separated fields"):
        import_features(dataset, path, str(tmp_path / "s.zarr"), overwrite=True, progress=False)


def test_features_out_of_float16_range_name_the_image(dataset, tmp_path):
    feats = make_features()
    h, w, boxes, f = feats[COCO_IDS[3]]
    f = f.copy()
    f[1, 7] = 1e6
    feats[COCO_IDS[3]] = (h, w, boxes, f)
    path = tmp_path / "big.tsv"
    write_tsv(path, [gen_row(cid, *v) for cid, v in feats.items()], GEN_TSV)
    with pytest.raises(FeatureImportError, match=rf"big\.tsv:4 \(image id {COCO_IDS[3]}\): .*float16 range"):
        import_features(dataset, path, str(tmp_path / "s.zarr"), progress=False)


def test_npz_directory_both_orientations_and_names(dataset, tmp_path):
    feats = make_features(seed=4)
    src = tmp_path / "npz"
    src.mkdir()
    for k, (cid, (h, w, boxes, f)) in enumerate(feats.items()):
        if k == 6:
            continue  # one dataset image without a file
        name = f"{cid}.npz" if k % 2 else f"COCO_val2014_{cid:012d}.jpg.npz"  # MILVLG / openvqa names
        x = f if k % 2 else f.T  # openvqa files store x as D x num_bbox
        np.savez(src / name, x=x, bbox=boxes, num_bbox=len(boxes), image_h=h, image_w=w)
    np.savez(src / "123.npz", x=f, bbox=boxes, num_bbox=len(boxes), image_h=1, image_w=1)  # not in dataset
    url = str(tmp_path / "store.h5")  # the single-file backend
    report = import_features(dataset, src, url, block_size=4, regions=10, progress=False)
    assert report.format == "npz" and report.matched == 6
    assert report.extra_ids.examples == ["123"] and report.missing.examples == [str(COCO_IDS[6])]
    rows, attrs = store_rows(url)
    assert_matches(rows, feats, regions=10, skip={COCO_IDS[6]})
    assert rows[str(COCO_IDS[6])][6].startswith("no features in")

    np.savez(src / f"{COCO_IDS[6]}.npz", x=np.zeros((5, 7)), bbox=np.zeros((4, 4)), num_bbox=4)
    with pytest.raises(FeatureImportError, match=rf"{COCO_IDS[6]}\.npz: 'x' has shape \(5, 7\)"):
        import_features(dataset, src, str(tmp_path / "b.zarr"), progress=False)


@pytest.mark.parametrize("repeat", [1, 5])
def test_scan_arrays_with_single_or_repeated_ids(dataset, tmp_path, repeat):
    rng = np.random.default_rng(6)
    ids = COCO_IDS[:5] + [777]  # 777 is not in the dataset
    ims = rng.standard_normal((len(ids), 36, D)).astype(np.float32)
    np.save(tmp_path / "test_ims.npy", ims)
    (tmp_path / "test_ids.txt").write_text("".join(f"{i}\n" * repeat for i in ids))
    url = str(tmp_path / "scan.zarr")
    report = import_features(dataset, tmp_path / "test_ims.npy", url, regions=36, progress=False)
    assert report.format == "scan" and report.matched == 5 and report.extra_ids.examples == ["777"]
    assert report.missing.count == 2 and any("boxes unavailable (SCAN format)" in n for n in report.notes)
    rows, attrs = store_rows(url)
    assert attrs["config"]["boxes"] == "unavailable (SCAN format)"
    for k, cid in enumerate(COCO_IDS[:5]):
        hw, n, boxes, labels, _, f, err = rows[str(cid)]
        assert err == "" and n == 36 and not boxes.any() and (labels == -1).all()
        assert hw == (10 + k, 20 + k)  # read from the image file: SCAN has no sizes
        np.testing.assert_allclose(f.astype(np.float32), ims[k], rtol=1e-3, atol=1e-3)


def test_scan_inconsistent_repeats_and_missing_ids_file(dataset, tmp_path):
    np.save(tmp_path / "dev_ims.npy", np.zeros((2, 3, 8), np.float32))
    with pytest.raises(FeatureImportError, match="no ids file"):
        import_features(dataset, tmp_path, str(tmp_path / "s.zarr"), progress=False)
    (tmp_path / "dev_ids.txt").write_text("1\n1\n2\n3\n")
    with pytest.raises(FeatureImportError, match=r"dev_ids\.txt: lines 3-4 should repeat one image id"):
        import_features(dataset, tmp_path, str(tmp_path / "s.zarr"), progress=False)


def test_matches_written_with_a_matcher_and_no_overlap_is_an_error(dataset, tmp_path):
    feats = make_features(seed=7)
    path = tmp_path / "f.tsv"
    write_tsv(path, [gen_row(cid, *v) for cid, v in feats.items()], GEN_TSV)
    matcher = ClassWordMatcher.coco()
    url = str(tmp_path / "m.zarr")
    import_features(dataset, path, url, regions=10, matcher=matcher, progress=False)
    b = open_backend(url)
    count, label, span = (b.read(p, slice(None)) for p in ("matches/count", "matches/label", "matches/span"))
    names = b.attr("classes")
    assert names == matcher.class_names  # match labels index the store's class list
    assert (count[:, 0] == 2).all()  # "A dog on a bench." names two COCO classes
    assert [names[label[0, 0, j]] for j in range(2)] == ["dog", "bench"]
    assert span[0, 0, 0].tolist() == [1, 2, 2, 5]  # tokens [1, 2), chars [2, 5): "dog"
    assert count[1, 1] == 0 and count[0, 1] == 0  # "Picture number 1." names nothing; row 0 has 1 caption

    write_tsv(path, [gen_row(5, *feats[COCO_IDS[0]])], GEN_TSV)
    with pytest.raises(FeatureImportError, match=r"none of the 1 image ids .* match dataset coco"):
        import_features(dataset, path, str(tmp_path / "n.zarr"), progress=False)


def test_id_resolution_duplicates_and_size_mismatch(tmp_path):
    recs = [
        ImageRecord("1000092795.jpg", "flickr/1000092795.jpg", "train", ("a dog",), (("a", "dog"),)),
        ImageRecord("123", "val2014/COCO_val2014_000000000123.jpg", "val", ("a cat",), (("a", "cat"),),
                    height=10, width=20, coco_id=123),
        ImageRecord("x", "x.png", "test", ("a cow",), (("a", "cow"),)),
    ]
    resolver = IdResolver(recs)
    assert resolver.row("1000092795") == 0  # Flickr TSV ids are file stems
    assert resolver.row("1000092795.jpg.npz") == 0
    assert resolver.row("COCO_val2014_000000000123") == 1 and resolver.row("000123") == 1
    assert resolver.row("COCO_train2014_000000000123.jpg") == 1  # trailing integer as COCO id
    assert resolver.row("x") == 2 and resolver.row("124") is None and resolver.row("y") is None

    ds = Dataset("tiny", tmp_path, recs)
    rng = np.random.default_rng(8)
    rows = [
        gen_row(1000092795, 7, 9, np.ones((2, 4), np.float32), rng.standard_normal((2, 16)).astype(np.float32)),
        gen_row(123, 11, 20, np.ones((3, 4), np.float32), rng.standard_normal((3, 16)).astype(np.float32)),
        gen_row(123, 10, 20, np.zeros((1, 4), np.float32), np.zeros((1, 16), np.float32)),  # duplicate
    ]
    write_tsv(tmp_path / "f.tsv", rows, GEN_TSV)
    report = import_features(ds, tmp_path / "f.tsv", str(tmp_path / "s.zarr"), regions=4, progress=False)
    assert report.duplicates.examples == ["123"] and report.missing.examples == ["x"]
    assert report.hw_mismatch.examples == ["123 (source (11, 20), dataset (10, 20))"]
    stored, attrs = store_rows(str(tmp_path / "s.zarr"))
    assert stored["123"][1] == 3  # the first occurrence is kept
    assert attrs["config"]["region_dim"] == 16 and stored["x"][0] == (0, 0)  # no image file, no size


def test_find_source_files_detects_formats(tmp_path):
    for name in ["a.tsv.10", "a.tsv.2", "a.tsv", "notes.txt"]:
        (tmp_path / name).write_text("")
    fmt, files = find_source_files(tmp_path)
    assert fmt == "tsv" and [f.name for f in files] == ["a.tsv", "a.tsv.2", "a.tsv.10"]
    fmt, files = find_source_files(str(tmp_path / "a.tsv.*"))
    assert [f.name for f in files] == ["a.tsv.2", "a.tsv.10"]
    (tmp_path / "b.npz").write_bytes(b"")
    with pytest.raises(FeatureImportError, match="files of several formats \\(tsv, npz\\); .*pass fmt="):
        find_source_files(tmp_path)
    assert find_source_files(tmp_path, "npz")[1] == [tmp_path / "b.npz"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_source_files(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown feature format 'hdf'"):
        find_source_files(tmp_path, "hdf")


# ------------------------------------------------------------- MILVLG npz 'info' (issue 12 item 10)


def _milvlg_npz(path, h, w, boxes, f, seed=0, attrs=True):
    """A file as MILVLG's bottom-up-attention.pytorch writes it: np.savez_compressed(..., info=dict)."""
    rng = np.random.default_rng(seed)
    n = len(boxes)
    info = {"image_id": path.stem, "image_h": h, "image_w": w, "num_boxes": n,
            "objects_id": rng.integers(0, 1600, n), "objects_conf": rng.uniform(0.2, 1, n).astype(np.float32)}
    if attrs:
        info |= {"attrs_id": rng.integers(0, 400, n), "attrs_conf": rng.uniform(0, 1, n).astype(np.float32)}
    np.savez_compressed(path, x=f, bbox=boxes, num_bbox=n, image_h=h, image_w=w, info=info)
    return info


def test_npz_info_labels_and_confidences_are_imported(dataset, tmp_path):
    feats = make_features(seed=7)
    src = tmp_path / "milvlg"
    src.mkdir()
    infos = {cid: _milvlg_npz(src / f"{cid}.npz", h, w, boxes, f, seed=k, attrs=k != 2)
             for k, (cid, (h, w, boxes, f)) in enumerate(feats.items()) if k != 5}
    np.savez(src / f"{COCO_IDS[5]}.npz", x=feats[COCO_IDS[5]][3], bbox=feats[COCO_IDS[5]][2])  # no info
    url = str(tmp_path / "s.zarr")
    report = import_features(dataset, src, url, block_size=4, regions=10, progress=False)
    rows, attrs = store_rows(url)
    assert_matches(rows, feats, regions=10)
    for cid, info in infos.items():
        _, n, _, labels, scores, _, _ = rows[str(cid)]
        np.testing.assert_array_equal(labels[:n], info["objects_id"][:n])
        np.testing.assert_allclose(scores[:n], info["objects_conf"][:n])
    _, n, _, labels, scores, _, _ = rows[str(COCO_IDS[5])]
    assert (labels[:n] == -1).all() and (scores[:n] == 0).all()
    text = format_import_report(report)
    assert "npz info keys not imported: attrs_conf, attrs_id, image_h, image_id, image_w, num_boxes" in text
    assert "1 npz file(s) read without info['objects_id']" in text
    assert any("info['objects_id']" in n for n in attrs["import_notes"])


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


class _HostileEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("payload", [_Hostile, _HostileEval])
def test_hostile_npz_info_is_refused_and_never_runs(dataset, tmp_path, payload):
    feats = make_features(seed=8)
    src = tmp_path / "evil"
    src.mkdir()
    marker = tmp_path / "pwned"
    for k, (cid, (h, w, boxes, f)) in enumerate(feats.items()):
        if k == 5:  # one poisoned file (in the second block) among honest ones
            info = {"objects_id": np.zeros(len(boxes), np.int64), "x": payload(marker)}
            np.savez(src / f"{cid}.npz", x=f, bbox=boxes, num_bbox=len(boxes), info=np.array(info, dtype=object))
        else:
            _milvlg_npz(src / f"{cid}.npz", h, w, boxes, f)
    url = str(tmp_path / "s.zarr")
    with pytest.raises(FeatureImportError, match=rf"{COCO_IDS[5]}\.npz: the pickled 'info' entry was refused "
                                                 r"\(it refers to (posix|os|nt|builtins)\.(system|eval)\)"):
        import_features(dataset, src, url, block_size=4, regions=10, progress=False)
    assert not marker.exists()
    # the block before the poisoned row was written and stays (a rerun resumes once the file is fixed)
    done = open_backend(url).read("images/done", slice(None))
    assert done[:4].all() and not done[4:].any()


def test_npz_info_that_is_not_plain_data_is_refused(tmp_path):
    from vlcache.stages.extract.npz_info import InfoError, read_npz_info

    np.savez(tmp_path / "a.npz", info=np.array({"objects_id": np.array([1, 2], dtype=object)}, dtype=object))
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z, pytest.raises(InfoError, match="not a dict of plain"):
        read_npz_info(z)
    np.savez(tmp_path / "b.npz", info=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with np.load(tmp_path / "b.npz", allow_pickle=False) as z, pytest.raises(InfoError, match="not a dict of plain"):
        read_npz_info(z)
    np.savez(tmp_path / "c.npz", info=np.array({"s": np.float32(2.5), "l": [1, "x", None]}, dtype=object))
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert read_npz_info(z) == {"s": 2.5, "l": [1, "x", None]}
