"""Several dataset files as one dataset, the record selection and the image-root check (issue #13.2, #13.7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlcache.pipeline.dataset_files import check_image_root, load_datasets, select_records
from vlcache.pipeline.datasets import DatasetError


def _captions(path: Path, ids: list[int]) -> Path:
    path.write_text(json.dumps({"images": [{"id": i, "file_name": f"COCO_{i:012d}.jpg"} for i in ids],
                                "annotations": [{"id": i, "image_id": i, "caption": f"a dog number {i}"} for i in ids]}))
    return path


def test_coco_files_one_per_split_make_one_dataset(tmp_path):
    ann = tmp_path / "annotations"
    ann.mkdir()
    train = _captions(ann / "captions_train2014.json", [1, 2, 3])
    val = _captions(ann / "captions_val2014.json", [7, 8])
    (tmp_path / "val2014").mkdir()  # only val's folder exists: train's images sit in the root itself
    for ds in (load_datasets([train, val], tmp_path, check_images=False), load_datasets(ann, tmp_path, check_images=False)):
        assert ds.name == "coco" and [r.id for r in ds.records] == ["1", "2", "3", "7", "8"]
        assert [r.split for r in ds.records] == ["train"] * 3 + ["val"] * 2
        assert ds.records[0].path == "COCO_000000000001.jpg" and ds.records[3].path == "val2014/COCO_000000000007.jpg"
        assert ds.sources == [train, val]
    # the same image in two files is a duplicate id, named
    _captions(ann / "captions_test2014.json", [3])
    with pytest.raises(DatasetError, match=r"1 duplicate image id\(s\): \['3'\]"):
        load_datasets(ann, tmp_path, check_images=False)


def test_several_files_must_be_coco_captions_and_a_folder_must_hold_some(tmp_path):
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "train", "sentences": [{"raw": "a"}]}]}))
    other = _captions(tmp_path / "captions_val2014.json", [5])
    with pytest.raises(DatasetError, match="dataset_coco.json: several dataset files must all be COCO captions"):
        load_datasets([karpathy, other], tmp_path, check_images=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: a dataset folder must hold COCO captions files"):
        load_datasets(tmp_path / "empty", tmp_path, check_images=False)
    assert [r.id for r in load_datasets([karpathy], tmp_path, check_images=False).records] == ["a.jpg"]


def test_select_records_and_image_root_check(tmp_path):
    ds = load_datasets(_captions(tmp_path / "captions_val2014.json", [1, 2, 3]), tmp_path, check_images=False)
    assert [r.id for r in select_records(ds, "val", 2)] == ["1", "2"]
    with pytest.raises(DatasetError, match="no images selected"):
        select_records(ds, "train")
    with pytest.raises(DatasetError, match="unknown split 'dev'"):
        select_records(ds, "dev")
    with pytest.raises(DatasetError, match="image root .*nowhere is not a folder"):
        check_image_root(tmp_path / "nowhere", ds.records)
    with pytest.raises(DatasetError, match="none of the first 2 images exist under the image root"):
        check_image_root(tmp_path, ds.records[:2])
    (tmp_path / "COCO_000000000002.jpg").write_bytes(b"x")  # one present is enough: the rest is per image
    check_image_root(tmp_path, ds.records[:2])
