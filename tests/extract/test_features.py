"""Grid and region features from ResNet-101 C5, BUTD region selection, float16 range checks."""

import hashlib

import numpy as np
import pytest
import torch
from extract_helpers import offline_build
from torchvision.models import resnet101

from vlcache.stages.extract.detectors import DetectorError
from vlcache.stages.extract.features import (
    FeatureExtractor,
    FeatureRangeError,
    grid_features,
    region_features,
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
    r = offline_build(tmp_path, "FeatureExtractor()",
                      "from vlcache.stages.extract.features import FeatureExtractor")
    assert "DetectorError" in r.stdout, r.stdout + r.stderr
    assert "no internet: pass --backbone-weights PATH (a local copy of that file; config key features.weights), " \
           "or --weights none for random init of every model" in r.stdout
    assert "resnet101" in r.stdout


# ------------------------------------------------------------------------ BUTD's test scale for regions


def test_butd_scale_shorter_600_longer_at_most_1000():
    from vlcache.stages.extract.features import butd_scale

    assert butd_scale(480, 640) == (600, 800)  # a COCO image: shorter side 600
    assert butd_scale(300, 1000) == (300, 1000)  # 600 would make the longer side 2000: longer = 1000
    assert butd_scale(1000, 250) == (1000, 250)
    assert butd_scale(64, 80, 96, 200) == (96, 120)
    assert butd_scale(64, 80) != (448, 448)  # not the grid's square stretch


def test_prepare_scaled_keeps_aspect_and_pads_to_stride(extractor):
    img = np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)
    x, (h, w) = extractor.prepare_scaled(img, 60, 200)
    assert (h, w) == (60, 105) and x.shape == (1, 3, 64, 128)  # padded at the bottom/right to 32s
    assert (x[..., 60:, :] == 0).all() and (x[..., :, 105:] == 0).all()
    c5 = extractor(x)
    assert c5.shape == (1, 2048, 2, 4)
    (feats,) = region_features(c5, [np.array([[0, 0, 70, 40]], np.float32)], [(40, 70)], [(h, w)])
    assert feats.shape == (1, 2048) and torch.isfinite(feats).all()


def test_region_features_on_a_padded_non_square_input():
    # C5 of a 64x128 padded input from a 40x64 image resized to 80x128 (scale 2): a box maps through the
    # resize (not through the padded size) to C5 at 1/32; on a linear map the mean is the centre value
    C = 2
    ys, xs = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([2.0, 3.0])
    c5 = (a[:, None, None] * xs + b[:, None, None] * ys)[None]
    box = np.array([[16, 8, 48, 24]], np.float32)  # -> input [32, 16, 96, 48] -> C5 [1, .5, 3, 1.5]
    (out,) = region_features(c5, [box], [(40, 64)], [(80, 128)])
    torch.testing.assert_close(out[0], a * 1.5 + b * 0.5)  # aligned=True: centre (2, 1) - 0.5
    with pytest.raises(ValueError, match="does not match an input of 200x128"):
        region_features(c5, [box], [(40, 64)], [(200, 128)])


def test_extraction_pools_regions_at_butd_scale_by_default(tmp_path):
    from vlcache.pipeline.config import load_config
    from vlcache.pipeline.datasets import load_dataset
    from vlcache.pipeline.synth import generate
    from vlcache.stages.extract.config import ExtractConfig, FeatureConfig
    from vlcache.stages.extract.models import build_models

    assert (FeatureConfig().region_scale, FeatureConfig().region_min_size, FeatureConfig().region_max_size) == (
        "butd", 600, 1000)
    assert (FeatureConfig().min_regions, FeatureConfig().max_regions, FeatureConfig().fixed_regions) == (10, 100, 36)
    generate(tmp_path, n_images=2, seed=0, size=(48, 64))
    ds = load_dataset(tmp_path / "dataset_synth.json", instances=tmp_path / "instances.json")
    sets = ["detector.backend=annotations", "features.weights=none", "features.input_size=64",
            "features.grid_size=2", "features.region_min_size=96", "features.region_max_size=160",
            "groups=[regions,grid]"]
    models = build_models(load_config(ExtractConfig, overrides=sets), ds)
    from vlcache.storage.images import load_image

    images = [load_image(ds.image_root / r.path) for r in ds.records]
    outs = models.run(images, ds.records)
    fx = models.extractor
    for img, out in zip(images, outs):
        x, scaled = fx.prepare_scaled(img, 96, 160)
        assert scaled == (96, 128)
        with torch.no_grad():
            (ref,) = region_features(fx(x), [out.reg_boxes], [img.shape[:2]], [scaled])
        np.testing.assert_allclose(out.reg_feats.astype(np.float32), ref.numpy(), rtol=1e-2, atol=1e-3)
    assert "shorter side 96" in models.describe()["regions"]["feature_scale"]
    # region_scale=square pools from the grid's 64x64 pass instead: different features
    square = build_models(load_config(ExtractConfig, overrides=sets + ["features.region_scale=square"]), ds)
    outs_sq = square.run(images, ds.records)
    np.testing.assert_array_equal(outs_sq[0].reg_boxes, outs[0].reg_boxes)
    assert not np.allclose(outs_sq[0].reg_feats.astype(np.float32), outs[0].reg_feats.astype(np.float32), atol=1e-3)
