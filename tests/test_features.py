"""Grid and region features from ResNet-101 C5, BUTD region selection, float16 range checks."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torchvision.models import resnet101

from vlcache.stages.extract.detectors import Detections, DetectorError, grid_boxes
from vlcache.stages.extract.features import (
    FeatureExtractor,
    FeatureRangeError,
    grid_features,
    region_features,
    select_regions,
    to_float16_checked,
)

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def extractor():
    torch.manual_seed(0)
    return FeatureExtractor(weights="none", input_size=64)


def _images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8), rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)]


def test_prepare_and_c5_shapes(extractor):
    x = extractor.prepare(_images())
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    # normalised with the ImageNet statistics: a white image maps to (1 - mean) / std
    white = extractor.prepare([np.full((10, 12, 3), 255, np.uint8)])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(white[0, :, 0, 0], (1 - mean) / std)
    c5 = extractor(x)
    assert c5.shape == (2, 2048, 2, 2)
    assert not c5.requires_grad and not extractor.training  # frozen: no autograd graph is kept
    g = grid_features(c5, grid=2)
    assert g.shape == (2, 4, 2048)
    torch.testing.assert_close(g[1, 3], c5[1, :, 1, 1])  # row-major cells, identity pooling at G = map size
    assert extractor.config()["weights_id"] == "none (random init, zero_init_residual=True)"


def test_default_grid_is_14x14_and_random_init_fits_float16():
    torch.manual_seed(0)
    fx = FeatureExtractor(weights="none")  # the real default: 448 px -> C5 14x14
    with torch.no_grad():
        c5 = fx(fx.prepare(_images()[:1]))
    g = grid_features(c5)  # default grid 14
    assert g.shape == (1, 196, 2048)
    torch.testing.assert_close(g[0], c5[0].flatten(1).T)
    f16 = to_float16_checked(g[0], "grid of image 0")
    assert f16.dtype == np.float16 and f16.shape == (196, 2048) and np.isfinite(f16).all()
    assert np.abs(f16).max() > 0  # not trivially zero


def test_standard_random_init_would_overflow_float16_and_is_refused():
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(*list(resnet101(weights=None).children())[:-2]).eval()
    with torch.no_grad():
        c5 = trunk(torch.randn(1, 3, 256, 256))
    assert c5.abs().max() > 65504  # why weights="none" uses zero_init_residual
    with pytest.raises(FeatureRangeError, match=r"grid of image 3 \(a.jpg\): values up to .* exceed float16"):
        to_float16_checked(c5, "grid of image 3 (a.jpg)")
    with pytest.raises(FeatureRangeError, match=r"regions of image 0: features hold NaN or infinite values \(1 of 4\)"):
        to_float16_checked(np.array([1.0, np.nan, 2.0, 3.0]), "regions of image 0")
    edge = np.array([1.5, -65504.0])
    np.testing.assert_array_equal(to_float16_checked(edge, "x"), edge.astype(np.float16))


def test_region_features_on_a_linear_map_equal_the_box_centre_value():
    # On a map linear in (x, y), RoIAlign's bilinear mean over a box equals the value at the box centre
    # (pixel-centre coordinates, aligned=True). This checks the box scaling, 1/32 scale and alignment.
    C, S = 3, 4
    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    a, b, d = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0]), torch.tensor([0.0, 10.0, 2.0])
    c5 = (a[:, None, None] * xs + b[:, None, None] * ys + d[:, None, None])[None].repeat(2, 1, 1, 1)
    c5[1] *= 2  # second image: a different map
    input_size = S * 32  # 128
    # image 0 is 100 x 200 (h, w): input->original scales x by 200/128, y by 100/128
    box0 = np.array([[2 * 32 * 200 / 128, 32 * 100 / 128, 3 * 32 * 200 / 128, 2 * 32 * 100 / 128]], np.float32)
    box1 = np.array([[0.0, 0.0, 128.0, 128.0], [32.0, 32.0, 96.0, 64.0]], np.float32)  # image 1: 128 x 128
    out = region_features(c5, [box0, torch.from_numpy(box1)], [(100, 200), (128, 128)], input_size)
    assert [o.shape for o in out] == [(1, C), (2, C)]
    # box0 spans feature cells x in [2, 3], y in [1, 2] -> centre (2.5, 1.5) -> pixel-centre coords (2, 1)
    torch.testing.assert_close(out[0][0], a * 2 + b * 1 + d)
    torch.testing.assert_close(out[1][1], 2 * (a * 1.5 + b * 1 + d))  # x in [1, 3] -> 1.5, y in [1, 2] -> 1
    # the whole image samples past the border, where RoIAlign clamps: compare with the direct call
    from torchvision.ops import roi_align

    direct = roi_align(c5, [torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 4.0, 4.0]])], 7, 1.0, 2, True).mean((2, 3))
    torch.testing.assert_close(out[1][0], direct[0])


def test_region_features_from_the_extractor_batch(extractor):
    imgs = _images()
    with torch.no_grad():
        c5 = extractor(extractor.prepare(imgs))
    boxes = [np.array([[0, 0, 80, 64], [10, 5, 40, 30]], np.float32), np.zeros((0, 4), np.float32)]
    feats = region_features(c5, boxes, [i.shape[:2] for i in imgs], extractor.input_size)
    assert feats[0].shape == (2, 2048) and feats[1].shape == (0, 2048)
    assert torch.isfinite(feats[0]).all()
    with pytest.raises(ValueError):
        region_features(c5, boxes[:1], [(64, 80), (30, 50)], 64)


def test_input_size_must_be_a_multiple_of_32():
    with pytest.raises(DetectorError, match="input_size 100 must be a positive multiple of 32"):
        FeatureExtractor(weights="none", input_size=100)


def test_path_weights_loaded_and_sha256_recorded(tmp_path, extractor):
    sd = {k: v for k, v in resnet101(weights=None).state_dict().items() if not k.startswith("fc.")}
    torch.save(sd, tmp_path / "r101.pth")
    fx = FeatureExtractor(weights=str(tmp_path / "r101.pth"), input_size=64)
    assert fx.weights_sha256 == hashlib.sha256((tmp_path / "r101.pth").read_bytes()).hexdigest()
    torch.testing.assert_close(fx.trunk[0].weight, sd["conv1.weight"])
    torch.save({"conv1.weight": sd["conv1.weight"]}, tmp_path / "part.pth")
    with pytest.raises(DetectorError, match="part.pth: does not fit torchvision resnet101"):
        FeatureExtractor(weights=str(tmp_path / "part.pth"), input_size=64)


def test_default_weights_offline_gives_clear_message(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    code = ("from vlcache.stages.extract.features import FeatureExtractor\n"
            "try:\n    FeatureExtractor()\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "DetectorError" in r.stdout, r.stdout + r.stderr
    assert "no internet: pass --backbone-weights PATH (a local copy of that file; config key features.weights), " \
           "or --weights none for random init of every model" in r.stdout
    assert "resnet101" in r.stdout


# ------------------------------------------------------------------------------------------ regions


def _dets(scores, labels=None, boxes=None, proposals=None, proposal_scores=None, size=(1000, 1000)):
    n = len(scores)
    if boxes is None:  # disjoint 20 px boxes on a diagonal-free grid
        boxes = [[(i % 30) * 30, (i // 30) * 30, (i % 30) * 30 + 20, (i // 30) * 30 + 20] for i in range(n)]
    return Detections(boxes=np.asarray(boxes, np.float32).reshape(-1, 4), scores=np.asarray(scores, np.float32),
                      labels=np.zeros(n, np.int64) if labels is None else np.asarray(labels),
                      masks=np.zeros((n, 28, 28), np.float32), image_size=size,
                      proposals=proposals, proposal_scores=proposal_scores)


def _proposals(n, offset=600):
    return np.array([[offset + (i % 10) * 35, offset + (i // 10) * 35, offset + (i % 10) * 35 + 30,
                      offset + (i // 10) * 35 + 30] for i in range(n)], np.float32)


def test_adaptive_keeps_confident_ones_best_first():
    scores = np.linspace(0.9, 0.05, 15)  # 12 of them >= 0.2
    b, l, s = select_regions(_dets(scores))
    assert len(b) == (scores >= 0.2).sum() == 12
    np.testing.assert_allclose(s, scores[:12], rtol=1e-6)
    assert b.dtype == np.float32 and l.dtype == np.int64 and s.dtype == np.float32


def test_adaptive_caps_at_max_regions():
    b, _, s = select_regions(_dets(np.linspace(0.99, 0.3, 120)))
    assert len(b) == 100 and s.min() >= 0.3
    b, _, _ = select_regions(_dets(np.linspace(0.99, 0.3, 120)), max_regions=36)
    assert len(b) == 36


def test_too_few_are_topped_up_by_weak_detections_then_proposals():
    scores = [0.9, 0.5, 0.3, 0.1, 0.05, 0.04, 0.01]  # 3 confident, 7 detections in all
    props = _proposals(20)
    pscores = np.linspace(0.99, 0.5, 20).astype(np.float32)
    b, l, s = select_regions(_dets(scores, proposals=props, proposal_scores=pscores))
    assert len(b) == 10
    np.testing.assert_allclose(s[:7], scores, rtol=1e-6)  # every detection first, best first
    assert (l[:7] == 0).all() and (l[7:] == -1).all()  # proposals carry no class
    np.testing.assert_array_equal(b[7:], props[:3])
    np.testing.assert_allclose(s[7:], pscores[:3])


def test_fixed_36_ignores_confidence_and_tops_up():
    many = _dets(np.r_[np.linspace(0.9, 0.5, 10), np.linspace(0.19, 0.01, 40)])  # 10 confident
    b, _, s = select_regions(many, fixed=36)
    assert len(b) == 36 and s.min() < 0.2
    few = _dets([0.8, 0.7, 0.6, 0.5, 0.4], proposals=_proposals(40))
    b, l, _ = select_regions(few, fixed=36)
    assert len(b) == 36 and (l == -1).sum() == 31


def test_class_aware_nms():
    same = [[0, 0, 100, 100], [5, 5, 100, 100], [300, 300, 400, 400]]
    b, l, s = select_regions(_dets([0.9, 0.8, 0.7], labels=[1, 1, 2], boxes=same), min_regions=1)
    assert len(b) == 2 and s.tolist() == pytest.approx([0.9, 0.7])  # the overlapping same-class box went
    b, l, _ = select_regions(_dets([0.9, 0.8, 0.7], labels=[1, 3, 2], boxes=same), min_regions=1)
    assert len(b) == 3  # different classes may overlap


def test_top_up_prefers_new_boxes_then_takes_any():
    dets = _dets([0.9], boxes=[[0, 0, 100, 100]])
    props = np.array([[0, 0, 100, 100], [1, 1, 99, 99], [500, 500, 600, 600]], np.float32)
    b, l, _ = select_regions(dets, props, min_regions=3)
    np.testing.assert_array_equal(b[1], props[2])  # the new area first
    np.testing.assert_array_equal(b[2], props[0])  # then duplicates, in proposal order, to reach the minimum
    b, _, _ = select_regions(dets, props, min_regions=10)
    assert len(b) == 4  # cannot invent regions: 1 detection + 3 proposals


def test_annotation_grid_tops_up_and_bad_counts():
    dets = _dets([1.0, 1.0], boxes=[[0, 0, 50, 50], [60, 60, 90, 90]], proposals=grid_boxes(100, 100),
                 size=(100, 100))
    b, l, _ = select_regions(dets)
    assert len(b) == 10 and (l[2:] == -1).all()
    np.testing.assert_array_equal(b[2], [0, 0, 100, 100])  # the whole image is the first grid box
    with pytest.raises(ValueError, match="bad region counts"):
        select_regions(dets, min_regions=20, max_regions=10)
    with pytest.raises(ValueError, match="bad region counts"):
        select_regions(dets, fixed=0)
