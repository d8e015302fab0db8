"""Detector training data: both ways of naming splits, targets, flips, aspect-ratio batches, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from vlcache.pipeline.datasets import DatasetError
from vlcache.pipeline.synth import SYNTH_CLASSES, generate
from vlcache.stages.detect.data import (DetectionDataset, DetectorData, grouped_batches, hflip, targets,
                                        with_targets)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_data")
    return generate(out, n_images=20, seed=2, size=(48, 48)), out / "instances.json"


def test_splits_from_the_dataset_file(synth):
    data = DetectorData.load([synth[1]], dataset=synth[0])
    splits = {img["filename"]: img["split"] for img in json.loads(synth[0].read_text())["images"]}
    assert data.classes == SYNTH_CLASSES
    assert len(data.train) == sum(s == "train" for s in splits.values()) and data.val
    assert all(r.annotations for r in data.train)


def test_splits_from_two_instances_files_as_coco_lays_them_out(synth, tmp_path):
    full = json.loads(synth[1].read_text())
    val_ids = {img["id"] for img in full["images"][:5]}
    for name, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        part = dict(full, images=[im for im in full["images"] if keep(im["id"])],
                    annotations=[a for a in full["annotations"] if keep(a["image_id"])])
        (tmp_path / f"{name}.json").write_text(json.dumps(part))
    data = DetectorData.load([tmp_path / "train.json"], image_root=synth[1].parent / "images",
                             val_instances=[tmp_path / "val.json"])
    assert (len(data.train), len(data.val)) == (15, 5) and data.classes == SYNTH_CLASSES
    image, target = DetectionDataset(data.val, data.val_root)[0]
    assert image.shape == (3, 48, 48) and len(target["boxes"]) == len(data.val[0].annotations)


def test_targets_follow_the_annotations_and_skip_crowds(synth):
    rec = DetectorData.load([synth[1]], dataset=synth[0]).train[0]
    t = targets(rec, 48, 48)
    a = rec.annotations[0]
    x, y, w, h = a["bbox"]
    assert t["boxes"][0].tolist() == pytest.approx([x, y, x + w, y + h])
    assert t["labels"][0] == a["category_id"] + 1 and t["masks"].shape == (len(rec.annotations), 48, 48)
    assert int(t["masks"][0].sum()) == pytest.approx(a["area"], abs=1)
    from dataclasses import replace

    crowd = replace(rec, annotations=tuple(dict(x, iscrowd=1) for x in rec.annotations))
    assert len(targets(crowd, 48, 48)["boxes"]) == 0 and with_targets([crowd]) == []


def test_mask_of_another_size_names_the_image(synth):
    from dataclasses import replace

    rec = DetectorData.load([synth[1]], dataset=synth[0]).train[0]
    with pytest.raises(DatasetError, match=rf"image {rec.id} \({rec.path}\): mask size \[48, 48\] differs"):
        targets(rec, 40, 48)
    bad = replace(rec, annotations=(dict(rec.annotations[0], segmentation=[[1, 2, 3]]),))
    with pytest.raises(DatasetError, match=rf"image {rec.id} .*malformed segmentation"):
        targets(bad, 48, 48)


def test_hflip_mirrors_boxes_and_masks():
    image = torch.zeros(3, 4, 10)
    image[:, :, 1] = 1
    masks = torch.zeros(1, 4, 10, dtype=torch.uint8)
    masks[0, :, 1:3] = 1
    img, t = hflip(image, {"boxes": torch.tensor([[1.0, 0, 3, 4]]), "masks": masks})
    assert t["boxes"].tolist() == [[7.0, 0, 9, 4]] and img[0, 0, 8] == 1
    assert t["masks"][0, 0].nonzero().flatten().tolist() == [7, 8]


def test_grouped_batches_hold_one_aspect_group_each_and_every_image_once():
    groups = [0, 1] * 7 + [0]
    batches = grouped_batches(groups, 3, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(15))
    assert all(len({groups[i] for i in b}) == 1 for b in batches)
    assert batches == grouped_batches(groups, 3, seed=0, epoch=0) != grouped_batches(groups, 3, seed=0, epoch=1)


def test_instances_are_required():
    with pytest.raises(DatasetError, match="--instances is required"):
        DetectorData.load([])


def test_a_corrupt_training_image_stops_with_one_line_naming_it_and_keeps_the_checkpoint(synth, tmp_path):
    import shutil

    from vlcache.pipeline.runs import RunDir
    from vlcache.stages.detect.train import DetectorTrainConfig, train_detector

    root = tmp_path / "copy"
    shutil.copytree(synth[1].parent, root)
    data = DetectorData.load([root / "instances.json"], dataset=root / synth[0].name)
    cfg = DetectorTrainConfig(dataset=str(root / synth[0].name), instances=[str(root / "instances.json")],
                              backbone="resnet18", fpn_channels=16, min_size=48, max_size=48, batch_size=len(data.train),
                              epochs=2, num_workers=1, eval_every=0, checkpoint_every=1, rpn_pre_nms_top_n_train=50,
                              rpn_post_nms_top_n_train=50, box_batch_size_per_image=16, rpn_batch_size_per_image=16)
    train_detector(DetectorTrainConfig(**{**cfg.__dict__, "max_iters": 1}), tmp_path / "run", progress=False)
    victim = data.train[3]
    (root / victim.path).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DatasetError) as err:
        train_detector(cfg, tmp_path / "run", progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"image {victim.id}" in msg and victim.path in msg and "corrupt" in msg
    assert RunDir(tmp_path / "run").load_checkpoint("last")["step"] == 1
