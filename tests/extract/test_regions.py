"""BUTD region selection (generate_tsv.py) on constructed box-head outputs, and its use on Detections."""

import numpy as np
import pytest
import torch
import yaml
from torchvision.ops import nms

from vlcache.stages.extract import regions as regions_mod
from vlcache.stages.extract.detectors import Detections, grid_boxes
from vlcache.stages.extract.regions import butd_select, region_candidates, select_regions


def _disjoint(n: int) -> np.ndarray:
    """``n`` disjoint 20-px boxes: NMS never suppresses one by another."""
    return np.array([[(i % 40) * 30, (i // 40) * 30, (i % 40) * 30 + 20, (i // 40) * 30 + 20] for i in range(n)],
                    np.float32)


def _one_class(conf, k: int = 3, cls: int = 0) -> np.ndarray:
    """Class scores where RoI i scores conf[i] in class ``cls`` and little elsewhere."""
    s = np.full((len(conf), k), 0.001, np.float32)
    s[:, cls] = conf
    return s


def _generate_tsv(boxes, scores, conf=0.2, min_boxes=10, max_boxes=100, iou=0.3):
    """BUTD's tools/generate_tsv.py selection, line for line (scores without the background column)."""
    max_conf = np.zeros(len(boxes))
    for c in range(scores.shape[1]):
        cls_scores = scores[:, c]
        keep = nms(torch.from_numpy(boxes), torch.from_numpy(cls_scores), iou).numpy()
        max_conf[keep] = np.where(cls_scores[keep] > max_conf[keep], cls_scores[keep], max_conf[keep])
    keep_boxes = np.where(max_conf >= conf)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(max_conf)[::-1][:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(max_conf)[::-1][:max_boxes]
    return keep_boxes, max_conf


def test_a_roi_passing_in_two_classes_gives_one_region():
    # RoI 0 is the best box of class 0 (0.5) and of class 1 (0.45): kept by both NMS runs, one region.
    boxes = np.array([[0, 0, 100, 100], [300, 300, 400, 400]], np.float32)
    scores = np.array([[0.5, 0.45, 0.01], [0.05, 0.02, 0.9]], np.float32)
    idx, labels, conf = butd_select(boxes, scores, min_regions=1)
    assert sorted(idx.tolist()) == [0, 1] and len(idx) == len(set(idx.tolist()))
    assert labels[idx.tolist().index(0)] == 0 and conf[idx.tolist().index(0)] == pytest.approx(0.5)
    assert labels[idx.tolist().index(1)] == 2 and conf[idx.tolist().index(1)] == pytest.approx(0.9)


def test_per_class_nms_decides_which_classes_a_roi_keeps():
    # RoIs 0 and 1 overlap (IoU 0.81 > 0.3). Class 0: RoI 0 (0.6) suppresses RoI 1 (0.5). Class 1: RoI 1
    # (0.3) is the best, kept. RoI 1's confidence is its best *kept* class score (0.3), not 0.5, and its
    # label the arg-max of its probabilities (class 0), as BUTD's demo labels a region.
    boxes = np.array([[0, 0, 100, 100], [5, 5, 95, 95]], np.float32)
    scores = np.array([[0.6, 0.1], [0.5, 0.3]], np.float32)
    idx, labels, conf = butd_select(boxes, scores, min_regions=1)
    assert idx.tolist() == [0, 1] and conf.tolist() == pytest.approx([0.6, 0.3]) and labels.tolist() == [0, 0]
    idx, _, conf = butd_select(boxes, scores, conf=0.4, min_regions=1)
    assert idx.tolist() == [0]  # RoI 1 does not pass 0.4 although one of its class scores is 0.5


def test_150_qualifying_rois_give_100():
    conf = np.linspace(0.99, 0.25, 150).astype(np.float32)
    idx, labels, s = butd_select(_disjoint(150), _one_class(conf))
    assert len(idx) == 100 and idx.tolist() == list(range(100))  # the 100 most confident
    np.testing.assert_allclose(s, conf[:100], rtol=1e-6)
    assert (labels == 0).all() and idx.dtype == np.int64 and s.dtype == np.float32


def test_3_qualifying_rois_give_10():
    conf = np.r_[[0.9, 0.5, 0.3], np.linspace(0.15, 0.02, 20)].astype(np.float32)
    idx, _, s = butd_select(_disjoint(23), _one_class(conf))
    assert len(idx) == 10 and idx.tolist() == list(range(10))  # the 3, then the next 7 by confidence
    np.testing.assert_allclose(s, conf[:10], rtol=1e-6)


def test_adaptive_between_bounds_and_fixed_36():
    conf = np.r_[np.linspace(0.9, 0.2, 40), np.linspace(0.19, 0.01, 60)].astype(np.float32)
    idx, _, s = butd_select(_disjoint(100), _one_class(conf))
    assert len(idx) == 40 and s.min() >= 0.2
    idx, _, s = butd_select(_disjoint(100), _one_class(conf), fixed=36)
    assert idx.tolist() == list(range(36))
    idx, _, _ = butd_select(_disjoint(60), _one_class(conf[40:]), fixed=36)  # none confident: still 36
    assert len(idx) == 36
    idx, _, _ = butd_select(_disjoint(5), _one_class(conf[:5]))
    assert len(idx) == 5  # fewer RoIs than the minimum: all of them, none invented


def test_matches_generate_tsv_on_random_overlapping_rois():
    rng = np.random.default_rng(0)
    for trial in range(4):
        n, k = 300, 12
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 150, (n, 2))], 1).astype(np.float32)
        logits = rng.normal(0, 2.5 if trial % 2 else 0.3, (n, k + 1))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        scores = probs[:, 1:].astype(np.float32)
        ref, max_conf = _generate_tsv(boxes, scores)
        idx, labels, conf = butd_select(boxes, scores)
        assert sorted(idx.tolist()) == sorted(ref.tolist())
        np.testing.assert_allclose(conf, max_conf[idx], rtol=1e-6)
        np.testing.assert_array_equal(labels, scores[idx].argmax(1))
        ref36, _ = _generate_tsv(boxes, scores, min_boxes=36, max_boxes=36)
        assert sorted(butd_select(boxes, scores, fixed=36)[0].tolist()) == sorted(ref36.tolist())


def test_score_floor_shortcut_equals_the_full_computation(monkeypatch):
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 200, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 100, (200, 2))], 1).astype(np.float32)
    scores = (rng.dirichlet(np.full(9, 0.2), 200)[:, 1:]).astype(np.float32)  # many tiny scores
    fast = [butd_select(boxes, scores, **kw) for kw in ({}, {"fixed": 36}, {"conf": 0.9})]
    monkeypatch.setattr(regions_mod, "_SCORE_FLOOR", 0.0)
    full = [butd_select(boxes, scores, **kw) for kw in ({}, {"fixed": 36}, {"conf": 0.9})]
    for a, b in zip(fast, full):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


def test_bad_inputs():
    with pytest.raises(ValueError, match="bad region counts"):
        butd_select(_disjoint(3), _one_class([0.5] * 3), min_regions=20, max_regions=10)
    with pytest.raises(ValueError, match="bad region counts"):
        butd_select(_disjoint(3), _one_class([0.5] * 3), fixed=0)
    with pytest.raises(ValueError, match=r"class_scores \(2, 3\) must be \(n, K\) for 3 boxes"):
        butd_select(_disjoint(3), _one_class([0.5] * 2))
    idx, labels, conf = butd_select(np.zeros((0, 4), np.float32), np.zeros((0, 5), np.float32))
    assert idx.shape == labels.shape == conf.shape == (0,)


def _dets(n_det=2, **kw):
    boxes = np.array([[0, 0, 50, 50], [60, 60, 90, 90], [0, 0, 45, 45]], np.float32)[:n_det]
    return Detections(boxes=boxes, labels=np.array([1, 0, 1])[:n_det], scores=np.array([1.0, 0.9, 0.8])[:n_det],
                      masks=np.zeros((n_det, 28, 28), np.float32), image_size=(100, 100), **kw)


def test_detections_without_roi_scores_fill_with_unscored_proposals():
    # the annotations backend: its boxes, then its grid of proposals (label -1, score 0) to reach 10
    det = _dets(3, proposals=grid_boxes(100, 100))
    idx, b, labels, conf = select_regions(det)
    assert len(b) == 10
    # boxes 0 and 2 are class 1 and overlap (IoU 0.81): the per-class NMS keeps the better one only
    np.testing.assert_array_equal(b[:2], det.boxes[:2])
    assert labels[:2].tolist() == [1, 0] and conf[:2].tolist() == pytest.approx([1.0, 0.9])
    assert (labels[3:] == -1).all() and (conf[3:] == 0).all()
    np.testing.assert_array_equal(b[3], [0, 0, 100, 100])  # the whole image: the grid's first box
    boxes, scores = region_candidates(det)
    assert boxes.shape == (3 + 30, 4) and scores.shape == (33, 2)


def test_detections_with_roi_scores_choose_from_every_roi_not_the_final_detections():
    # one final detection (capped by max_instances) but 12 scored RoIs: regions come from the RoIs
    rois = _disjoint(12)
    scores = _one_class(np.linspace(0.9, 0.4, 12), k=2, cls=1)
    det = _dets(1, roi_boxes=rois, roi_scores=scores)
    idx, b, labels, conf = select_regions(det, fixed=12)
    assert idx.tolist() == list(range(12)) and (labels == 1).all()
    np.testing.assert_array_equal(b, rois)


def test_torchvision_regions_are_independent_of_max_instances():
    # 2 stored instances, yet 12 regions, every one a scored RoI with a class (none padded from proposals)
    from vlcache.stages.extract.detectors import DETECTORS

    torch.manual_seed(0)
    det = DETECTORS.build("torchvision", weights="none", min_size=64, max_size=96, proposals=30,
                          score_threshold=0.0, max_instances=2)
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)
    d = det.detect([image])[0]
    assert len(d) <= 2
    idx, boxes, labels, conf = select_regions(d, fixed=12)
    assert len(boxes) == 12 and (labels >= 0).all() and (conf > 0).all()
    np.testing.assert_array_equal(labels, d.roi_scores[idx].argmax(1))


def test_region_features_from_the_detector_box_head_end_to_end(tmp_path):
    # features.region_source=detector: the store holds the box head's 1024-d RoI representation, says so,
    # and matching training builds its model from the store's dimension
    from vlcache.pipeline.config import load_config
    from vlcache.pipeline.datasets import load_dataset
    from vlcache.pipeline.synth import generate
    from vlcache.stages.extract.config import ExtractConfig
    from vlcache.stages.extract.loop import extract
    from vlcache.stages.extract.models import build_models
    from vlcache.stages.match.train import MatchTrainConfig, train_match
    from vlcache.storage.backends import open_backend

    generate(tmp_path / "data", n_images=12, seed=0, size=(64, 64))
    ds = load_dataset(tmp_path / "data" / "dataset_synth.json", instances=tmp_path / "data" / "instances.json")
    sets = ["detector.weights=none", "detector.min_size=64", "detector.max_size=96", "detector.proposals=20",
            "detector.max_instances=3", "groups=[regions]", "features.region_source=detector",
            "features.min_regions=4", "features.max_regions=8", "block_size=4", "runtime.num_workers=0"]
    url = str(tmp_path / "det.zarr")
    summary = extract(ds, url, load_config(ExtractConfig, overrides=sets), progress=False)
    assert summary.complete
    with open_backend(url) as b:
        feats, count, labels = (np.asarray(b.read(p, slice(None))) for p in
                                ("regions/feats", "regions/count", "regions/labels"))
        regions_attrs = b.attr("models")["regions"]
    assert feats.shape == (12, 8, 1024) and ((count >= 4) & (count <= 8)).all()
    assert all((labels[i, : count[i]] >= 0).all() for i in range(12))  # every region is a scored RoI
    assert regions_attrs["feature_dim"] == 1024 and regions_attrs["feature_source"].startswith("detector box head")
    cfg = MatchTrainConfig(model="scan", store=url, epochs=1, batch_size=4, max_steps=1, val_split="train",
                           embed=16, word_dim=16, vocab_min_count=1, device="cpu")
    train_match(cfg, tmp_path / "run")
    run_cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert run_cfg["region_dim"] == 1024 and run_cfg["model_args"]["region_dim"] == 1024
    # the annotations backend has no box head to take features from: a clear error, before anything runs
    with pytest.raises(ValueError, match="region_source=detector needs a detector that gives its box head"):
        build_models(load_config(ExtractConfig, overrides=sets + ["detector.backend=annotations"]), ds)
