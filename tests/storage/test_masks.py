"""Mask pasting against torchvision, grid coverage and box-inside fractions against brute force."""

import numpy as np
import pytest
import torch
from mask_helpers import H, W, brute_coverage, random_instances, torchvision_paste

from vlcache.storage.masks import (
    grid_coverage,
    merged_grid_coverage,
    paste_masks,
    region_inside_fraction,
    resize_masks,
)

torch.set_num_threads(2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paste_matches_torchvision(seed):
    boxes, masks = random_instances(seed)
    ref = torchvision_paste(boxes, masks, (H, W))
    mine = paste_masks(boxes, masks, (H, W))
    assert isinstance(mine, np.ndarray) and mine.dtype == np.float32 and mine.shape == (7, H, W)
    assert np.abs(mine - ref).max() < 1e-5
    assert np.array_equal(mine >= 0.5, ref >= 0.5)
    assert mine[1].max() > 0.5  # the whole-image instance is really there


def test_paste_float_and_torch_inputs():
    boxes, masks = random_instances(3)
    ref = torchvision_paste(boxes, masks, (H, W))
    out = paste_masks(torch.from_numpy(boxes), torch.from_numpy(masks.astype(np.float32) / 255.0), (H, W))
    assert isinstance(out, torch.Tensor)
    assert torch.allclose(out, torch.from_numpy(ref), atol=1e-5)


def test_paste_empty_and_bad_input():
    assert paste_masks(np.zeros((0, 4)), np.zeros((0, 28, 28), np.uint8), (5, 6)).shape == (0, 5, 6)
    with pytest.raises(ValueError, match="2 boxes but 1 masks"):
        paste_masks(np.zeros((2, 4)), np.zeros((1, 28, 28)), (5, 6))
    with pytest.raises(ValueError, match="boxes must be"):
        paste_masks(np.zeros((2, 3)), np.zeros((2, 28, 28)), (5, 6))


def test_resize_masks():
    boxes, masks = random_instances(4)
    full = paste_masks(boxes, masks, (H, W))
    assert np.abs(resize_masks(boxes, masks, (H, W), (H, W)) - full).max() < 1e-6
    # A larger size samples the same continuous mask: pooling it back gives (nearly) the full paste.
    big = resize_masks(boxes, masks, (H, W), (3 * H, 3 * W))
    assert big.shape == (7, 3 * H, 3 * W)
    pooled = big.reshape(7, H, 3, W, 3).mean(axis=(2, 4))
    assert np.abs(pooled - full).mean() < 0.01
    # Smaller sizes: the thresholded masks keep their area fraction.
    small = resize_masks(boxes, masks, (H, W), (40, 50))
    assert abs((small >= 0.5).mean() - (full >= 0.5).mean()) < 0.02


@pytest.mark.parametrize("grid", [7, 14])
def test_grid_coverage_is_exact_by_pixel_overlap(grid):
    """The default coverage is exact (METHODS §2, §8), not sampled: it equals a brute-force pixel count
    to float rounding, also for cells that do not align with pixels (97 x 131 px over 7 or 14 cells)."""
    boxes, masks = random_instances(5)
    brute = brute_coverage(torchvision_paste(boxes, masks, (H, W)) >= 0.5, grid)
    exact = grid_coverage(boxes, masks, (H, W), grid)
    assert exact.shape == (7, grid, grid)
    assert np.abs(exact - brute).max() < 1e-5
    assert brute.max() == 1.0 and brute[1].sum() > 0


def test_merged_grid_coverage_is_union():
    boxes, masks = random_instances(7)
    union = (torchvision_paste(boxes[2:5], masks[2:5], (H, W)) >= 0.5).any(0)
    brute = brute_coverage(union, 14)
    exact = merged_grid_coverage(boxes[2:5], masks[2:5], (H, W), 14)
    assert exact.shape == (14, 14) and np.abs(exact - brute).max() < 1e-5
    assert merged_grid_coverage(np.zeros((0, 4)), np.zeros((0, 28, 28)), (H, W), 14).sum() == 0


def test_region_inside_fraction_vs_brute_force():
    rng = np.random.default_rng(8)
    mask = np.zeros((H, W), bool)
    mask[20:60, 30:100] = True
    mask[rng.random((H, W)) < 0.1] = True
    # Box corners on a 1/8-pixel lattice so an 8x supersampled brute force is exact.
    q = rng.integers(-40, 8 * 140, (20, 4)) / 8.0
    boxes = np.stack([np.minimum(q[:, 0], q[:, 2]), np.minimum(q[:, 1], q[:, 3]) * 0.7,
                      np.maximum(q[:, 0], q[:, 2]), np.maximum(q[:, 1], q[:, 3]) * 0.7], 1)
    boxes = (np.round(boxes * 8) / 8).astype(np.float64)
    boxes[0] = [30, 20, 100, 60]  # exactly the solid rectangle
    boxes[1] = [5, 5, 5, 9]  # zero area
    boxes[2] = [W - 2, H - 2, W + 2, H + 2]  # mostly outside the image
    fr = region_inside_fraction(boxes, mask)
    up = np.repeat(np.repeat(mask, 8, 0), 8, 1)
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        area = (x2 - x1) * (y2 - y1)
        if area <= 0:
            assert fr[k] == 0
            continue
        a, b, c, d = (int(round(v * 8)) for v in (y1, y2, x1, x2))
        inside = up[max(a, 0):max(b, 0), max(c, 0):max(d, 0)].sum() / 64.0
        assert abs(fr[k] - inside / area) < 1e-5, k
    assert fr[0] == pytest.approx(1.0)
    assert fr.dtype == np.float32
