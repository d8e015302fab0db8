"""detectron2's mask-pasting convention (METHODS.md section 12), without detectron2 installed.

The reference is the heart of detectron2's ``layers.mask_ops._do_paste_mask`` (``skip_empty=False``):
``F.grid_sample`` over the float box, written out here because CI has no detectron2. Where detectron2
is importable, tests/test_detectron2.py compares against its own ``paste_masks_in_image`` as well.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_masks import H, W, brute_coverage, random_instances, torchvision_paste

from vlcache.storage.masks import grid_coverage, paste_convention, paste_masks, resize_masks
from vlcache.storage.store import open_store

torch.set_num_threads(2)
D2_ATTRS = {"models": {"detector": {"backend": "detectron2", "mask_paste": "detectron2"}}}


def grid_sample_paste(boxes, masks_u8, hw):
    """detectron2's ``_do_paste_mask(masks, boxes, h, w, skip_empty=False)``: probabilities (n, h, w)."""
    masks = torch.from_numpy(np.asarray(masks_u8)).float()[:, None] / 255.0
    x0, y0, x1, y1 = torch.split(torch.from_numpy(np.asarray(boxes, np.float32)), 1, dim=1)
    img_y = torch.arange(0, hw[0], dtype=torch.float32) + 0.5
    img_x = torch.arange(0, hw[1], dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    n = masks.shape[0]
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    return F.grid_sample(masks, torch.stack([gx, gy], dim=3), align_corners=False)[:, 0].numpy()


def assert_same_paste(mine, ref):
    assert np.abs(mine - ref).max() < 1e-5
    near = np.abs(ref - 0.5) < 1e-5  # float rounding may flip only pixels this close to the threshold
    assert np.array_equal((mine >= 0.5)[~near], (ref >= 0.5)[~near])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detectron2_paste_matches_grid_sample(seed):
    boxes, masks = random_instances(seed)  # sub-pixel, whole-image and partly outside boxes
    mine = paste_masks(boxes, masks, (H, W), convention="detectron2")
    assert mine.dtype == np.float32 and mine.shape == (7, H, W)
    assert_same_paste(mine, grid_sample_paste(boxes, masks, (H, W)))
    # the two conventions really differ (the torchvision paste extends past the box by one mask cell)
    tv = torchvision_paste(boxes, masks, (H, W))
    assert np.abs(mine - tv).max() > 0.1 and not np.array_equal(mine >= 0.5, tv >= 0.5)


def test_detectron2_resize_and_coverage_sample_the_same_mask():
    boxes, masks = random_instances(4)
    full = paste_masks(boxes, masks, (H, W), convention="detectron2")
    assert np.allclose(resize_masks(boxes, masks, (H, W), (H, W), convention="detectron2"), full, atol=1e-6)
    assert np.abs(resize_masks(boxes, masks, (H, W), (H * 2, W * 2), convention="detectron2")[:, ::2, ::2]
                  - full).max() < 0.35  # half-pixel shifted samples of the same smooth masks
    cov = grid_coverage(boxes, masks, (H, W), 5, samples_per_cell=None, convention="detectron2")
    assert np.allclose(cov, brute_coverage(full >= 0.5, 5), atol=1e-5)


def test_detectron2_paste_of_an_empty_box_is_zero():
    masks = np.full((2, 28, 28), 255, np.uint8)
    boxes = np.array([[10, 10, 10, 30], [5, 7, 25, 7]], np.float32)  # zero width, zero height
    out = paste_masks(boxes, masks, (40, 40), convention="detectron2")
    assert np.isfinite(out).all() and out.max() == 0


def test_unknown_convention_is_named():
    boxes, masks = random_instances(0)
    with pytest.raises(ValueError, match="convention must be one of .*'detectron3'"):
        paste_masks(boxes, masks, (H, W), convention="detectron3")
    with pytest.raises(ValueError, match="unknown mask_paste 'detectron3'"):
        paste_convention({"models": {"detector": {"mask_paste": "detectron3"}}})


def test_store_pastes_with_the_recorded_convention(tiny_store_factory):
    d2 = tiny_store_factory("d2.zarr", n=6, block_size=3, extra_attrs=D2_ATTRS)
    old = tiny_store_factory("old.zarr", n=6, block_size=3)  # written before mask_paste was recorded
    s2, so = open_store(d2.url), open_store(old.url)
    assert s2.mask_paste == "detectron2" and so.mask_paste == "torchvision"
    for i in (0, 2, 3):
        n = int(d2.truth["instances/count"][i])
        boxes, masks = d2.truth["instances/boxes"][i, :n], d2.truth["instances/masks"][i, :n]
        hw = tuple(int(v) for v in d2.truth["images/hw"][i])
        assert_same_paste(s2.masks(i), grid_sample_paste(boxes, masks, hw))
        assert np.allclose(s2.masks(i, size=hw), s2.masks(i), atol=1e-6)
        assert np.allclose(s2.masks(i, size="grid"),
                           grid_coverage(boxes, masks, hw, d2.layout.capacities.grid_size, convention="detectron2"))
        n = int(old.truth["instances/count"][i])
        boxes, masks = old.truth["instances/boxes"][i, :n], old.truth["instances/masks"][i, :n]
        hw = tuple(int(v) for v in old.truth["images/hw"][i])
        assert np.abs(so.masks(i) - torchvision_paste(boxes.astype(np.float32), masks, hw)).max() < 1e-5
    # merged masks follow the convention too
    found = [(i, c, m) for i in s2.rows() for c in range(len(s2.captions(i))) for m in s2.matches(i, c)]
    assert found
    for i, c, match in found[:3]:
        inst = s2.instances(i)
        keep = (inst["labels"] == match["label"]) & (inst["scores"] >= 0.5)
        ref = (grid_sample_paste(inst["boxes"][keep], inst["masks"][keep], s2.hw(i)) >= 0.5).any(axis=0)
        assert np.array_equal(s2.merged_mask(i, c, match["token_start"]), ref)
