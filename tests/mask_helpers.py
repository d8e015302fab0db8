"""Reference mask pasting and brute-force coverage shared by the mask tests (storage, detectron2 backend)."""

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image

H, W = 97, 131


def random_instances(seed: int, n: int = 7):
    rng = np.random.default_rng(seed)
    # Some boxes stick out of the image (expanded boxes always may), none lies wholly outside it.
    x1 = rng.uniform(-10, W - 10, n)
    y1 = rng.uniform(-10, H - 10, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(12, 90, n), y1 + rng.uniform(12, 70, n)], 1).astype(np.float32)
    boxes[0] = [10.3, 5.7, 10.6, 6.1]  # sub-pixel box
    boxes[1] = [0, 0, W, H]  # whole image
    # Smooth blobs, like real mask heads, plus noise so thresholds are exercised everywhere.
    yy, xx = np.mgrid[0:28, 0:28]
    cy, cx = rng.uniform(6, 22, (2, n))
    blob = np.exp(-(((yy - cy[:, None, None]) ** 2) + (xx - cx[:, None, None]) ** 2) / 60.0)
    masks = np.clip(blob + rng.normal(0, 0.05, blob.shape), 0, 1)
    return boxes, (masks * 255).round().astype(np.uint8)


def torchvision_paste(boxes, masks_u8, hw):
    m = torch.from_numpy(masks_u8).float()[:, None] / 255.0
    return paste_masks_in_image(m, torch.from_numpy(boxes), hw)[:, 0].numpy()


def brute_coverage(binary: np.ndarray, grid: int) -> np.ndarray:
    """Cell fractions by supersampling every pixel grid x grid times: each cell is then exactly H x W."""
    h, w = binary.shape[-2:]
    up = np.repeat(np.repeat(binary.astype(np.float64), grid, -2), grid, -1)
    return up.reshape(*binary.shape[:-2], grid, h, grid, w).mean(axis=(-3, -1))


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
