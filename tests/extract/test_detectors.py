"""Detector backends: one Detections type, 28x28 masks before pasting, weights recorded, clear errors."""

import hashlib
import sys

import numpy as np
import pytest
import torch
from extract_helpers import offline_build
from pycocotools import mask as cocomask
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.models.detection.roi_heads import paste_masks_in_image

from vlcache.pipeline.records import ImageRecord
from vlcache.stages.extract.detectors import (
    D2_MISSING,
    DETECTORS,
    Detections,
    Detector,
    DetectorError,
    coco_class_map,
    grid_boxes,
    to_chw_float,
)

torch.set_num_threads(2)
SMALL = dict(min_size=64, max_size=96, proposals=40, score_threshold=0.0)


@pytest.fixture(scope="module")
def tv_det():
    torch.manual_seed(0)
    return DETECTORS.build("torchvision", weights="none", **SMALL)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), rng.integers(0, 256, (70, 52, 3), dtype=np.uint8)]


@pytest.fixture(scope="module")
def tv_out(tv_det, images):
    return tv_det.detect(images)


def test_registry_names_and_unknown():
    assert {"torchvision", "detectron2", "annotations"} <= set(DETECTORS.names())
    with pytest.raises(KeyError, match="unknown detector 'yolo'.*annotations"):
        DETECTORS.build("yolo")


def test_coco_class_map_skips_background_and_na():
    names, lut = coco_class_map(["__background__", "person", "N/A", "car"])
    assert names == ["person", "car"] and lut.tolist() == [-1, 0, -1, 1]


def test_torchvision_random_weights_shapes_dtypes_ranges(tv_det, tv_out, images):
    assert isinstance(tv_det, Detector)
    assert len(tv_det.class_names) == 80 and tv_det.class_names[0] == "person" and "N/A" not in tv_det.class_names
    assert len(tv_out) == 2
    for d, img in zip(tv_out, images):
        h, w = img.shape[:2]
        assert d.image_size == (h, w)
        assert 0 < len(d) <= 32
        assert d.boxes.dtype == np.float32 and d.boxes.shape == (len(d), 4)
        assert d.labels.dtype == np.int64 and d.labels.min() >= 0 and d.labels.max() < 80
        assert d.scores.dtype == np.float32 and np.all(np.diff(d.scores) <= 1e-6)  # best first
        assert d.masks.dtype == np.float32 and d.masks.shape == (len(d), 28, 28)
        assert d.masks.min() >= 0 and d.masks.max() <= 1
        assert (d.boxes[:, 0] >= 0).all() and (d.boxes[:, 2] <= w).all() and (d.boxes[:, 3] <= h).all()
        assert (d.boxes[:, 2] >= d.boxes[:, 0]).all()
        assert d.proposals.shape == (40, 4) and np.all(np.diff(d.proposal_scores) <= 1e-6)
        assert (d.proposals[:, 2] <= w + 1e-3).all() and (d.proposals[:, 3] <= h + 1e-3).all()
    cfg = tv_det.config()
    assert cfg["weights_id"] == "none (random init)" and cfg["weights_sha256"] is None
    assert cfg["arch"] == "maskrcnn_resnet50_fpn_v2" and cfg["mask_size"] == 28 and cfg["min_size"] == 64


def test_pasting_our_masks_reproduces_the_full_model(tv_det, tv_out, images):
    with torch.no_grad():
        full = tv_det.model([to_chw_float(i) for i in images])  # same weights, eval mode, same batch
    for d, f in zip(tv_out, full):
        lut = torch.as_tensor(tv_det._lut)[f["labels"]]
        keep = lut >= 0  # our output drops COCO 'N/A' labels
        assert keep.sum() == len(d)
        np.testing.assert_allclose(d.boxes, f["boxes"][keep].numpy(), atol=1e-4)
        np.testing.assert_allclose(d.scores, f["scores"][keep].numpy(), atol=1e-6)
        np.testing.assert_array_equal(d.labels, lut[keep].numpy())
        pasted = paste_masks_in_image(torch.from_numpy(d.masks)[:, None], torch.from_numpy(d.boxes), d.image_size)
        assert pasted.shape == f["masks"][keep].shape
        torch.testing.assert_close(pasted, f["masks"][keep], atol=1e-5, rtol=0)


def test_every_roi_comes_with_its_class_probabilities(tv_det, tv_out):
    # BUTD region selection needs the box head's class probabilities of every RoI, not only detections
    for d in tv_out:
        assert d.roi_boxes.shape == (40, 4) and d.roi_scores.shape == (40, 80) and d.roi_scores.dtype == np.float32
        np.testing.assert_array_equal(d.roi_boxes, d.proposals)
        assert (d.roi_scores > 0).all() and (d.roi_scores.sum(1) < 1).all()  # background and N/A columns dropped
        for label, score in zip(d.labels, d.scores):  # each detection is some RoI's probability of its class
            assert np.abs(d.roi_scores[:, label] - score).min() < 1e-5


def test_roi_features_are_the_box_head_representation_of_every_roi(images):
    # region_source=detector ("FPN fc7"): the box head's output for every RoI, computed here independently
    # with the model's own transform, backbone, RPN, RoI pooler and box head
    torch.manual_seed(0)
    det = DETECTORS.build("torchvision", weights="none", roi_features=True, **SMALL)
    out = det.detect(images)
    m = det.model
    with torch.no_grad():
        batch, _ = m.transform([to_chw_float(i) for i in images])
        feats = m.backbone(batch.tensors)
        props, _ = m.rpn(batch, feats)
        ref = m.roi_heads.box_head(m.roi_heads.box_roi_pool(feats, props, batch.image_sizes))
    assert det.roi_feature_dim == 1024 and det.config()["roi_feature_dim"] == 1024
    got = np.concatenate([d.roi_feats for d in out])
    assert got.shape == (sum(len(p) for p in props), 1024)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    assert all(d.roi_feats is None for d in DETECTORS.build("torchvision", weights="none", **SMALL).detect(images))


def test_tensor_inputs_match_numpy_inputs(tv_det, tv_out, images):
    as_tensors = [torch.from_numpy(images[0]).permute(2, 0, 1), to_chw_float(images[1])]  # uint8 and float
    for d, ref in zip(tv_det.detect(as_tensors), tv_out):
        np.testing.assert_allclose(d.boxes, ref.boxes, atol=1e-4)
        np.testing.assert_allclose(d.masks, ref.masks, atol=1e-5)
    with pytest.raises(DetectorError, match="image 1: expected \\(H, W, 3\\) uint8"):
        tv_det.detect([images[0], images[0][..., :2]])


def test_path_weights_v1_custom_classes_sha256_recorded(tmp_path, images):
    torch.manual_seed(1)
    src = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=96,
                                rpn_pre_nms_top_n_test=40, rpn_post_nms_top_n_test=40, box_score_thresh=0.0,
                                box_detections_per_img=32)
    # a FrozenBatchNorm-style checkpoint: no num_batches_tracked entries
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "mrcnn.pth"
    torch.save(sd, path)
    with pytest.raises(DetectorError, match="3-class checkpoint; pass class_names"):
        DETECTORS.build("torchvision", arch="v1", weights=str(path), **SMALL)
    det = DETECTORS.build("torchvision", arch="v1", weights=str(path), class_names=["cat", "dog"], **SMALL)
    assert det.weights_id == str(path)
    assert det.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert det.config()["arch"] == "maskrcnn_resnet50_fpn" and det.class_names == ["cat", "dog"]
    out = det.detect(images[:1])[0]
    with torch.no_grad():
        ref = src.eval()([to_chw_float(images[0])])[0]
    assert len(out) == len(ref["boxes"]) > 0
    np.testing.assert_array_equal(out.labels, ref["labels"].numpy() - 1)  # 1..K -> 0..K-1
    np.testing.assert_allclose(out.scores, ref["scores"].numpy(), atol=1e-6)


def test_bad_weights_files(tmp_path):
    with pytest.raises(DetectorError, match="weights file not found: .*nope.pth"):
        DETECTORS.build("torchvision", weights=str(tmp_path / "nope.pth"), **SMALL)
    torch.save({"roi_heads.box_predictor.cls_score.weight": torch.zeros(91, 1024)}, tmp_path / "part.pth")
    with pytest.raises(DetectorError, match="part.pth: does not fit Mask R-CNN v2; mismatched keys"):
        DETECTORS.build("torchvision", weights=str(tmp_path / "part.pth"), **SMALL)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DetectorError, match="junk.pth: not a loadable weights-only checkpoint"):
        DETECTORS.build("torchvision", weights=str(tmp_path / "junk.pth"), **SMALL)
    with pytest.raises(DetectorError, match="arch 'v3' unknown"):
        DETECTORS.build("torchvision", arch="v3", weights="none")


def test_default_weights_offline_gives_clear_message(tmp_path):
    r = offline_build(tmp_path, "DETECTORS.build('torchvision', weights='DEFAULT')",
                      "from vlcache.stages.extract.detectors import DETECTORS")
    assert "DetectorError" in r.stdout, r.stdout + r.stderr
    # the detector's own flag, and the one flag that gives random weights for every model
    assert "no internet: pass --detector-weights PATH (a local copy of that file; config key detector.weights), " \
           "or --weights none for random init of every model" in r.stdout
    assert "maskrcnn_resnet50_fpn_v2_coco" in r.stdout


def test_detectron2_missing_gives_install_instructions(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)  # what an absent package looks like to import
    with pytest.raises(ImportError) as e:
        DETECTORS.build("detectron2")
    assert str(e.value) == D2_MISSING and "git+https://github.com/facebookresearch/detectron2.git" in D2_MISSING


def test_detectron2_backend_when_installed(images):
    pytest.importorskip("detectron2")
    det = DETECTORS.build("detectron2", weights="none", min_size=64, max_size=96, proposals=40, score_threshold=0.0)
    assert len(det.class_names) == 80 and det.weights_id == "none (random init)"
    out = det.detect(images)
    for d, img in zip(out, images):
        assert d.image_size == img.shape[:2] and d.masks.shape[1:] == (28, 28)
        assert d.masks.min() >= 0 and d.masks.max() <= 1 and d.labels.max() < 80


def test_detections_validate_and_convert():
    d = Detections(boxes=torch.zeros(2, 4), labels=torch.tensor([0, 1]), scores=[0.5, 0.4],
                   masks=torch.rand(2, 28, 28), image_size=(10, 20))
    assert d.boxes.dtype == np.float32 and d.labels.dtype == np.int64 and isinstance(d.masks, np.ndarray)
    empty = Detections(np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros(0), (5, 5))
    assert len(empty) == 0 and empty.masks.shape == (0, 28, 28)
    with pytest.raises(DetectorError, match="inconsistent detections"):
        Detections(np.zeros((2, 4)), np.zeros(1), np.zeros(2), np.zeros((2, 28, 28)), (5, 5))


# ---------------------------------------------------------------------------------------- annotations

H, W = 64, 80


def _ellipse(cx, cy, rx, ry, n=32):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).ravel().tolist()


def _uncompressed_rle(mask):
    flat = mask.ravel(order="F")
    runs, current, n = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(n)
            current, n = v, 0
        n += 1
    return {"size": list(mask.shape), "counts": runs + [n]}


def _bbox(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def _record(anns, h=H, w=W):
    return ImageRecord(id="img7", path="a/b.jpg", split="train", captions=("x",), tokens=(("x",),),
                       height=h, width=w, annotations=tuple(anns))


def _gt_objects():
    ell = _ellipse(40, 30, 22, 14)
    ell_mask = cocomask.decode(cocomask.merge(cocomask.frPyObjects([ell], H, W)))
    tri = np.zeros((H, W), np.uint8)
    for y in range(10, 50):
        tri[y, 5 : 5 + (y - 10) // 2 + 1] = 1
    rle = cocomask.encode(np.asfortranarray(tri))
    rle = {"size": rle["size"], "counts": rle["counts"].decode()}  # as COCO JSON stores it
    blob = np.zeros((H, W), np.uint8)
    blob[40:60, 50:75] = 1
    blob[45:55, 60:70] = 0
    anns = [
        {"bbox": _bbox(ell_mask), "category_id": 2, "segmentation": [ell], "iscrowd": 0},
        {"bbox": _bbox(tri), "category_id": 0, "segmentation": rle, "iscrowd": 0},
        {"bbox": _bbox(blob), "category_id": 1, "segmentation": _uncompressed_rle(blob), "iscrowd": 1},
    ]
    return anns, [ell_mask, tri, blob]


def test_annotations_backend_masks_paste_back_with_high_iou():
    anns, gts = _gt_objects()
    det = DETECTORS.build("annotations", class_names=["a", "b", "c"])
    assert det.weights_id.startswith("annotations") and det.config()["backend"] == "annotations"
    d = det.detect([np.zeros((H, W, 3), np.uint8)], [_record(anns)])[0]
    assert d.labels.tolist() == [2, 0, 1] and (d.scores == 1).all() and d.masks.shape == (3, 28, 28)
    assert d.masks.min() >= 0 and d.masks.max() <= 1
    np.testing.assert_allclose(d.boxes[1], [5, 10, 5 + anns[1]["bbox"][2], 10 + anns[1]["bbox"][3]])
    pasted = paste_masks_in_image(torch.from_numpy(d.masks)[:, None], torch.from_numpy(d.boxes), (H, W))[:, 0] > 0.5
    for k, gt in enumerate(gts):
        iou = (pasted[k].numpy() & (gt > 0)).sum() / (pasted[k].numpy() | (gt > 0)).sum()
        assert iou > 0.85, (k, iou)
    assert d.proposals.shape == (30, 4)  # grid 1 + 4 + 9 + 16
    np.testing.assert_array_equal(d.proposals[0], [0, 0, W, H])


def test_annotations_options_and_errors():
    anns, _ = _gt_objects()
    box_only = {"bbox": [10, 10, 20, 10], "category_id": 0}
    zero = {"bbox": [5, 5, 0, 3], "category_id": 0, "segmentation": []}
    det = DETECTORS.build("annotations", class_names=["a", "b", "c"], max_instances=2, include_crowd=False)
    d = det.detect([np.zeros((H, W, 3), np.uint8)], [_record(anns + [box_only, zero])])[0]
    assert len(d) == 2 and d.labels.tolist() == [2, 0]  # crowd dropped, the two largest kept, zero-area gone
    one = DETECTORS.build("annotations", class_names=["a"])
    d = one.detect([np.zeros((H, W, 3), np.uint8)], [_record([box_only])])[0]
    assert d.masks[0].min() > 0.5 and d.masks[0, 2:-2, 2:-2].min() > 0.999  # no segmentation: its filled box

    det = DETECTORS.build("annotations", class_names=["a", "b"])
    img = [np.zeros((H, W, 3), np.uint8)]
    with pytest.raises(DetectorError, match="image img7 .*annotation 0: category_id 2 is not an index into 2"):
        det.detect(img, [_record(anns[:1])])
    with pytest.raises(DetectorError, match="annotations are for 80x64 but the decoded image is 64x80"):
        det.detect([np.zeros((W, H, 3), np.uint8)], [_record([box_only])])
    with pytest.raises(DetectorError, match="img7.*no instance annotations"):
        det.detect(img, [ImageRecord("img7", "a/b.jpg", "train", ("x",), (("x",),))])
    with pytest.raises(DetectorError, match="one record"):
        det.detect(img)
    bad_rle = {"bbox": [1, 1, 5, 5], "category_id": 0, "segmentation": {"size": [10, 10], "counts": "00"}}
    with pytest.raises(DetectorError, match="annotation 0: bad segmentation .*RLE size"):
        det.detect(img, [_record([bad_rle])])
    with pytest.raises(DetectorError, match="annotation 0: invalid bbox"):
        det.detect(img, [_record([{"bbox": [1, 1, -5, 5], "category_id": 0}])])


def test_grid_boxes():
    g = grid_boxes(30, 60, levels=(1, 2))
    expected = [[0, 0, 60, 30], [0, 0, 30, 15], [30, 0, 60, 15], [0, 15, 30, 30], [30, 15, 60, 30]]
    np.testing.assert_array_equal(g, expected)
