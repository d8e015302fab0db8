"""Dataset readers on small files written in the published layouts, and every bad-input error."""

import json
import time
from pathlib import Path

import pytest

from vlcache.pipeline.datasets import DatasetError, load_coco_captions, load_dataset, load_jsonl, load_karpathy
from vlcache.pipeline.records import karpathy_tokens


def touch(root: Path, rel: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\x89PNG")


def karpathy_coco_image(imgid, cocoid, split, folder="val2014", n=5):
    fname = f"COCO_{folder}_{cocoid:012d}.jpg"
    sents = [
        {"tokens": ["a", "man", f"n{k}"], "raw": f"A man, number {k}. ", "imgid": imgid, "sentid": 10 * imgid + k}
        for k in range(n)
    ]
    return {"filepath": folder, "sentids": [s["sentid"] for s in sents], "filename": fname, "imgid": imgid,
            "split": split, "sentences": sents, "cocoid": cocoid}  # fmt: skip


@pytest.fixture
def coco_karpathy(tmp_path):
    """dataset_coco.json with one image per split (incl. restval) and the image files."""
    images = [
        karpathy_coco_image(0, 391895, "test"),
        karpathy_coco_image(1, 522418, "restval"),
        karpathy_coco_image(2, 184613, "train", folder="train2014"),
        karpathy_coco_image(3, 318219, "val"),
    ]
    del images[3]["sentences"][0]["tokens"]  # a sentence without tokens gets tokenised from raw
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    root = tmp_path / "coco"
    for im in images:
        touch(root, f"{im['filepath']}/{im['filename']}")
    return path, root, images


def write(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------------- Karpathy


def test_karpathy_coco(coco_karpathy):
    path, root, images = coco_karpathy
    ds = load_karpathy(path, root)
    assert ds.name == "coco" and ds.sources == [path] and ds.image_root == root
    assert [r.id for r in ds.records] == ["391895", "522418", "184613", "318219"]
    assert [r.split for r in ds.records] == ["test", "train", "train", "val"]  # restval -> train
    r = ds.records[0]
    assert r.path == "val2014/COCO_val2014_000000391895.jpg" and r.coco_id == 391895
    assert r.captions[0] == "A man, number 0." and len(r.captions) == 5
    assert r.tokens[1] == ("a", "man", "n1")  # the file's tokens, not re-tokenised
    assert ds.records[3].tokens[0] == karpathy_tokens("A man, number 0.")
    assert ds.records[2].path.startswith("train2014/")
    assert ds.split_counts() == {"test": 1, "train": 2, "val": 1}

    dropped = load_dataset(path, root, restval_to_train=False)
    assert [r.id for r in dropped.records] == ["391895", "184613", "318219"]
    only_test = load_dataset(path, root, splits=["test"])
    assert [r.id for r in only_test.records] == ["391895"]


def test_karpathy_flickr_uses_filename_as_id(tmp_path):
    images = [
        {"sentids": [0, 1], "imgid": 0, "split": "train", "filename": "1000092795.jpg",
         "sentences": [{"tokens": ["two", "dogs"], "raw": "Two dogs.", "imgid": 0, "sentid": 0},
                       {"tokens": ["a", "dog"], "raw": "A dog", "imgid": 0, "sentid": 1}]},
    ]  # fmt: skip
    path = write(tmp_path / "dataset_flickr30k.json", {"images": images, "dataset": "flickr30k"})
    touch(tmp_path / "flickr30k-images", "1000092795.jpg")
    ds = load_dataset(path, tmp_path / "flickr30k-images")
    assert ds.name == "flickr30k"
    r = ds.records[0]
    assert (r.id, r.path, r.coco_id, r.captions) == ("1000092795.jpg", "1000092795.jpg", None, ("Two dogs.", "A dog"))


def test_karpathy_with_instances(coco_karpathy, tmp_path):
    path, root, images = coco_karpathy
    inst = write(
        tmp_path / "instances_val2014.json",
        {
            "images": [{"id": 391895, "file_name": images[0]["filename"], "height": 360, "width": 640}],
            "annotations": [
                {"id": 1, "image_id": 391895, "category_id": 18, "bbox": [1, 2, 3, 4], "area": 12.0,
                 "iscrowd": 0, "segmentation": [[1, 2, 4, 2, 4, 6]]},
                {"id": 2, "image_id": 391895, "category_id": 1, "bbox": [5, 5, 5, 5], "area": 25.0,
                 "iscrowd": 0, "segmentation": [[5, 5, 10, 5, 10, 10]]},
            ],
            "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                           {"id": 1, "name": "person", "supercategory": "person"}],
        },
    )  # fmt: skip
    ds = load_dataset(path, root, instances=inst)
    assert ds.classes == ["person", "dog"]  # ordered by category id
    anns = ds.records[0].annotations
    assert [a["category_id"] for a in anns] == [1, 0] and anns[0]["bbox"] == [1, 2, 3, 4]
    assert ds.records[1].annotations == ()  # no annotations for that image
    assert ds.sources == [path, inst]


# ------------------------------------------------------------------------------------------ COCO captions


@pytest.fixture
def coco_captions(tmp_path):
    root = tmp_path / "train2014"
    imgs = [{"license": 1, "file_name": f"COCO_train2014_{i:012d}.jpg", "coco_url": "", "height": 480,
             "width": 640, "date_captured": "", "flickr_url": "", "id": i} for i in (57870, 384029)]  # fmt: skip
    for im in imgs:
        touch(root, im["file_name"])
    anns = [
        {"image_id": 57870, "id": 1, "caption": "A restaurant has modern wooden tables and chairs."},
        {"image_id": 384029, "id": 2, "caption": "A man preparing desserts in a kitchen."},
        {"image_id": 57870, "id": 3, "caption": "A long dining table with chairs. "},
    ]
    path = write(tmp_path / "captions_train2014.json", {"info": {}, "licenses": [], "images": imgs, "annotations": anns})
    return path, root, imgs


def test_coco_captions_and_instances(coco_captions, tmp_path):
    path, root, imgs = coco_captions
    ds = load_coco_captions(path, root)  # split from the file name
    assert [(r.id, r.split, r.height, r.width) for r in ds.records] == [("57870", "train", 480, 640), ("384029", "train", 480, 640)]
    assert ds.records[0].captions == ("A restaurant has modern wooden tables and chairs.", "A long dining table with chairs.")
    assert ds.records[0].tokens[1] == ("a", "long", "dining", "table", "with", "chairs")
    assert ds.records[1].path == "COCO_train2014_000000384029.jpg"
    assert load_coco_captions(path, root, split="val").records[0].split == "val"

    inst = write(
        tmp_path / "instances_train2014.json",
        {
            "images": imgs,
            "annotations": [
                {"id": 7, "image_id": 57870, "category_id": 67, "bbox": [0, 0, 10, 10], "area": 100,
                 "iscrowd": 1, "segmentation": {"size": [480, 640], "counts": "PPP"}},
                {"id": 8, "image_id": 57870, "category_id": 62, "bbox": [1, 1, 2, 2], "area": 4,
                 "iscrowd": 0, "segmentation": [[1, 1, 3, 1, 3, 3]]},
            ],
            "categories": [{"id": 62, "name": "chair"}, {"id": 1, "name": "person"}, {"id": 67, "name": "dining table"}],
        },
    )  # fmt: skip
    ds = load_dataset(path, root, fmt="auto", instances=[inst])
    assert ds.classes == ["person", "chair", "dining table"]
    assert [(a["id"], a["category_id"], a["iscrowd"]) for a in ds.records[0].annotations] == [(7, 2, 1), (8, 1, 0)]


# ------------------------------------------------------------------------------------------------- JSONL


def test_jsonl(tmp_path):
    touch(tmp_path / "img", "a/x.jpg")
    touch(tmp_path / "img", "y.png")
    lines = [
        json.dumps({"id": 1, "image": "a/x.jpg", "split": "train", "captions": ["A cat.", "Two cats!"]}),
        "",
        json.dumps({"id": "b", "image": "y.png", "split": "test", "captions": ["x"], "tokens": [["my", "tok"]],
                    "height": 10, "width": 20}),  # fmt: skip
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = load_dataset(path, tmp_path / "img")
    assert [r.id for r in ds.records] == ["1", "b"] and ds.name == "data"
    assert ds.records[0].tokens == (("a", "cat"), ("two", "cats"))
    assert ds.records[1].tokens == (("my", "tok"),) and (ds.records[1].height, ds.records[1].width) == (10, 20)
    assert load_jsonl(path, tmp_path / "img").records[0].path == "a/x.jpg"


# ------------------------------------------------------------------------------------------- bad input


def test_missing_images_lists_count_and_first_ten(coco_karpathy):
    path, root, images = coco_karpathy
    many = [karpathy_coco_image(10 + i, 1000 + i, "train") for i in range(12)]
    write(path, {"images": images + many})
    with pytest.raises(DatasetError) as e:
        load_dataset(path, root)
    msg = str(e.value)
    assert "dataset_coco.json" in msg and "12 of 16 image file(s) missing" in msg
    assert many[9]["filename"] in msg and many[10]["filename"] not in msg
    assert len(load_dataset(path, root, check_images=False)) == 16


def test_duplicate_ids(coco_karpathy, tmp_path):
    path, root, images = coco_karpathy
    images[2]["cocoid"] = 391895
    write(path, {"images": images})
    with pytest.raises(DatasetError, match=r"dataset_coco.json: 1 duplicate image id\(s\): \['391895'\]"):
        load_dataset(path, root, check_images=False)
    j = tmp_path / "d.jsonl"
    j.write_text('{"id": 5, "image": "a.jpg", "split": "train", "captions": ["x"]}\n' * 2)
    with pytest.raises(DatasetError, match=r"d.jsonl: 1 duplicate image id\(s\): \['5'\]"):
        load_jsonl(j, tmp_path, check_images=False)


def test_unknown_split(coco_karpathy, tmp_path):
    path, root, images = coco_karpathy
    images[1]["split"] = "training"
    write(path, {"images": images})
    with pytest.raises(DatasetError, match=r"dataset_coco.json: images\[1\] \('COCO_val2014_000000522418.jpg'\): unknown split 'training'"):
        load_dataset(path, root)
    j = tmp_path / "d.jsonl"
    j.write_text('{"id": "q", "image": "a.jpg", "split": "dev", "captions": ["x"]}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl: line 1: image 'q' has unknown split 'dev'"):
        load_jsonl(j, tmp_path)


def test_images_without_captions(coco_karpathy, coco_captions):
    path, root, images = coco_karpathy
    images[0]["sentences"] = []
    write(path, {"images": images})
    with pytest.raises(DatasetError, match=r"dataset_coco.json: 1 image\(s\) without captions, e.g. ids \['391895'\]"):
        load_dataset(path, root)
    cpath, croot, imgs = coco_captions
    data = json.loads(cpath.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 384029]
    write(cpath, data)
    with pytest.raises(DatasetError, match=r"captions_train2014.json: 1 image\(s\) without captions, e.g. ids \['384029'\]"):
        load_coco_captions(cpath, croot)


def test_malformed_json(tmp_path):
    bad = tmp_path / "dataset_coco.json"
    bad.write_text('{"images": [\n  {"filename": "a.jpg",\n   "split": }\n]}')
    with pytest.raises(DatasetError, match=r"dataset_coco.json: malformed JSON at line 3 column 13: Expecting value"):
        load_dataset(bad)
    j = tmp_path / "d.jsonl"
    j.write_text('{"id": 1, "image": "a.jpg", "split": "train", "captions": ["x"]}\n\n{"id": 2, "image": oops}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl: line 3: malformed JSON at column 20"):
        load_jsonl(j, tmp_path, check_images=False)
    with pytest.raises(DatasetError, match=r"nothere.json: cannot read"):
        load_dataset(tmp_path / "nothere.json")


def test_missing_required_field(coco_karpathy, coco_captions, tmp_path):
    path, root, images = coco_karpathy
    del images[1]["split"]
    write(path, {"images": images})
    with pytest.raises(DatasetError, match=r"dataset_coco.json: images\[1\] \('COCO_val2014_000000522418.jpg'\): missing required field 'split'"):
        load_dataset(path, root)
    del images[1]
    images[2]["sentences"][3].pop("raw")
    write(path, {"images": images})
    with pytest.raises(DatasetError, match=r"images\[2\] \('COCO_val2014_000000318219.jpg'\).sentences\[3\]: missing required field 'raw'"):
        load_karpathy(path, root)
    write(path, {"pictures": []})
    with pytest.raises(DatasetError, match=r"dataset_coco.json: top level: missing required field 'images'"):
        load_karpathy(path, root)

    cpath, croot, _ = coco_captions
    data = json.loads(cpath.read_text())
    del data["annotations"][1]["caption"]
    write(cpath, data)
    with pytest.raises(DatasetError, match=r"captions_train2014.json: annotations\[1\]: missing required field 'caption'"):
        load_coco_captions(cpath, croot)

    j = tmp_path / "d.jsonl"
    j.write_text('{"id": 1, "image": "a.jpg", "split": "train", "captions": ["x"]}\n{"id": 2, "image": "b.jpg", "split": "train"}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl: line 2: missing required field 'captions'"):
        load_jsonl(j, tmp_path)
    j.write_text('{"id": 1, "image": "a.jpg", "split": "train", "captions": ["x", "y"], "tokens": [["x"]]}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl: line 1 \(id '1'\): field 'tokens' must be a list with one token list per caption"):
        load_jsonl(j, tmp_path)


@pytest.mark.parametrize("evil", ["../secret.jpg", "a/../../secret.jpg", "/etc/passwd", "val2014/../../../x.jpg"])
def test_path_escape_rejected(tmp_path, evil):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"id": "e", "image": evil, "split": "train", "captions": ["x"]}) + "\n")
    with pytest.raises(DatasetError, match=r"d.jsonl: line 1 \(id 'e'\): image path .* escapes the image root"):
        load_jsonl(j, root)
    images = [karpathy_coco_image(0, 1, "train")]
    images[0]["filepath"], images[0]["filename"] = "", evil
    k = write(tmp_path / "dataset_x.json", {"images": images})
    with pytest.raises(DatasetError, match=r"dataset_x.json: images\[0\] .*escapes the image root"):
        load_karpathy(k, root, check_images=False)


def test_absolute_path_inside_root_becomes_relative(tmp_path):
    touch(tmp_path, "imgs/sub/a.jpg")
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"id": 1, "image": str(tmp_path / "imgs/sub/./a.jpg"), "split": "val", "captions": ["x"]}))
    assert load_jsonl(j, tmp_path / "imgs").records[0].path == "sub/a.jpg"


def test_instances_errors(coco_karpathy, tmp_path):
    path, root, images = coco_karpathy
    inst = {"images": [{"id": 999, "file_name": "z.jpg"}], "categories": [{"id": 1, "name": "person"}],
            "annotations": [{"id": 1, "image_id": 999, "category_id": 1, "bbox": [0, 0, 1, 1]}]}  # fmt: skip
    f = write(tmp_path / "instances_other.json", inst)
    with pytest.raises(DatasetError, match=r"instances_other.json: no annotated image matches any dataset image"):
        load_dataset(path, root, instances=f)
    inst["annotations"][0]["category_id"] = 5
    write(f, inst)
    with pytest.raises(DatasetError, match=r"instances_other.json: annotations\[0\]: unknown category_id 5"):
        load_dataset(path, root, instances=f)


def test_format_detection_errors(tmp_path, coco_captions):
    f = write(tmp_path / "odd.json", {"something": 1})
    with pytest.raises(DatasetError, match=r"odd.json: not a Karpathy split file"):
        load_dataset(f)
    cpath, croot, _ = coco_captions
    renamed = cpath.rename(tmp_path / "captions_2014.json")
    with pytest.raises(DatasetError, match=r"captions_2014.json: cannot tell the split"):
        load_dataset(renamed, croot)
    assert load_dataset(renamed, croot, split="test").records[0].split == "test"


def test_large_karpathy_file_is_linear(tmp_path):
    n = 20000  # a sixth of COCO: parsing stays well under a second per 10k images
    images = [karpathy_coco_image(i, i, ("train", "val", "test", "restval")[i % 4], n=5) for i in range(n)]
    path = write(tmp_path / "dataset_coco.json", {"images": images})
    t = time.perf_counter()
    ds = load_dataset(path, tmp_path, check_images=False)
    took = time.perf_counter() - t
    print(f"loaded {n} images / {5 * n} sentences in {took:.2f} s")
    assert len(ds) == n and ds.split_counts()["train"] == n // 2
    assert took < 15
