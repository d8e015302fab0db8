"""Derive image-, grid- and any-size masks from the detector's box-relative M x M mask probabilities.

The store keeps Mask R-CNN's mask head output as it is (``instances/masks``: ``M x M`` probabilities
x 255 in box coordinates, DESIGN.md principle 4). Everything else is pasted on read, here.

Two pasting conventions (METHODS.md section 12), chosen by ``convention`` and recorded in a store by the
backend that produced its masks (:func:`paste_convention`):

- ``"torchvision"`` (``roi_heads.paste_masks_in_image``): the mask is zero-padded by one cell, the box is
  expanded by ``(M + 2) / M`` about its centre and truncated to integer pixels, the padded mask is resized
  bilinearly (``align_corners=False``) onto that box's pixels, and pixels outside the box are zero.
- ``"detectron2"`` (``layers.mask_ops._do_paste_mask``): ``grid_sample(align_corners=False)`` of the mask
  over the float box, zeros outside it: source cell ``u = (x - x0) / (x1 - x0) * M - 0.5``.

We write either mapping as one separable bilinear operator per axis, ``Wy @ mask @ Wx^T``, evaluated at
arbitrary sample positions. At the image's own pixel centres it reproduces the backend's paste (to float
rounding), vectorised over instances; at other sizes it samples the *same* continuous mask, with no
rounding of boxes to the coarser grid.

All functions accept numpy arrays or torch tensors and return the kind they were given (``masks`` or
``full_mask`` decides); outputs are float32 unless stated.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "CONVENTIONS",
    "paste_convention",
    "paste_masks",
    "resize_masks",
    "grid_coverage",
    "merged_grid_coverage",
    "region_inside_fraction",
]


def _to_tensor(x, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t.detach().cpu()


def _like(t: torch.Tensor, ref):
    return t if isinstance(ref, torch.Tensor) else t.numpy()


def _check(boxes, masks, image_hw) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    b = _to_tensor(boxes, "boxes", 2).to(torch.float32)
    m = _to_tensor(masks, "masks", 3)
    if b.shape[1] != 4:
        raise ValueError(f"boxes must be (n, 4) x1,y1,x2,y2, got shape {tuple(b.shape)}")
    if m.shape[0] != b.shape[0]:
        raise ValueError(f"{b.shape[0]} boxes but {m.shape[0]} masks")
    if m.shape[1] != m.shape[2]:
        raise ValueError(f"masks must be square (n, M, M), got shape {tuple(m.shape)}")
    # uint8 masks are probabilities x 255, as the store keeps them.
    m = m.to(torch.float32) / 255.0 if m.dtype == torch.uint8 else m.to(torch.float32)
    H, W = (int(v) for v in image_hw)
    if H < 1 or W < 1:
        raise ValueError(f"image_hw must be positive, got {tuple(image_hw)}")
    return b, m, H, W


def _expanded_int_boxes(boxes: torch.Tensor, mask_size: int) -> torch.Tensor:
    """torchvision's ``expand_boxes`` with scale (M+2)/M, then int64 truncation, in float32 like it."""
    scale = float(mask_size + 2) / mask_size
    w_half = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
    h_half = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
    x_c = (boxes[:, 2] + boxes[:, 0]) * 0.5
    y_c = (boxes[:, 3] + boxes[:, 1]) * 0.5
    out = torch.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], dim=1)
    return out.to(torch.int64)


CONVENTIONS = ("torchvision", "detectron2")


def paste_convention(attrs: dict) -> str:
    """The pasting convention a store's masks were produced for, from its attributes: the detector
    config's ``mask_paste`` (METHODS.md section 12). Stores that do not record it read as "torchvision"
    (what the torchvision backend produces, and what all stores were pasted with before)."""
    detector = ((attrs or {}).get("models") or {}).get("detector") or {}
    convention = detector.get("mask_paste", "torchvision")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown mask_paste {convention!r} in the store's detector config; "
                         f"expected one of {list(CONVENTIONS)}")
    return convention


def _bilinear_weights(u: torch.Tensor, inside: torch.Tensor, P: int) -> torch.Tensor:
    """Weights (n, S, P) of samples at source positions ``u`` (n, S) (>= 0, cells of a zero-padded P-cell
    mask) interpolated bilinearly; samples where ``inside`` is False get no weight (read zero)."""
    i0 = u.floor().clamp(max=P - 1)
    lam = u - i0
    i0 = i0.to(torch.int64)
    i1 = (i0 + 1).clamp(max=P - 1)
    wt = torch.zeros((*u.shape, P), dtype=torch.float32)
    wt.scatter_add_(2, i0[..., None], ((1 - lam) * inside)[..., None])
    wt.scatter_add_(2, i1[..., None], (lam * inside)[..., None])
    return wt


def _axis_weights(lo: torch.Tensor, hi: torch.Tensor, pos: torch.Tensor, P: int) -> torch.Tensor:
    """torchvision: bilinear weights (n, len(pos), P) mapping a padded P-cell mask onto sample positions.

    ``lo``/``hi`` are the expanded integer box's first/last pixel (inclusive, torchvision's convention);
    ``pos`` are continuous image coordinates of the samples (pixel centres are ``k + 0.5``). Matches
    ``F.interpolate(bilinear, align_corners=False)``: source ``u = (x - lo) * P / w - 0.5``, clamped at 0.
    """
    w = (hi - lo + 1).clamp(min=1).to(torch.float32)[:, None]
    rel = pos[None, :] - lo.to(torch.float32)[:, None]
    inside = (rel >= 0) & (rel < w)
    return _bilinear_weights((rel * (P / w) - 0.5).clamp(min=0.0), inside, P)


def _grid_sample_weights(lo: torch.Tensor, hi: torch.Tensor, pos: torch.Tensor, M: int) -> torch.Tensor:
    """detectron2: weights (n, len(pos), M + 2) onto the zero-padded mask, as ``grid_sample`` reads the
    M-cell mask over the float box [lo, hi] (``align_corners=False``, zeros outside), in its arithmetic:
    ``g = (x - lo) / (hi - lo) * 2 - 1``, ``u = ((g + 1) * M - 1) / 2``, plus one for the padding cell."""
    g = (pos[None, :] - lo[:, None]) / (hi - lo)[:, None] * 2 - 1
    u = ((g + 1) * M - 1) / 2 + 1
    inside = torch.isfinite(u) & (u >= 0) & (u <= M + 1)  # zero-width boxes read zero everywhere
    return _bilinear_weights(torch.where(inside, u, torch.zeros_like(u)), inside, M + 2)


def _sample(b: torch.Tensor, m: torch.Tensor, H: int, W: int, out_h: int, out_w: int,
            convention: str = "torchvision") -> torch.Tensor:
    """Mask probabilities (n, out_h, out_w) sampled at the centres of an out_h x out_w tiling of the image."""
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")
    n, M = m.shape[0], m.shape[-1]
    if n == 0:
        return torch.zeros((0, out_h, out_w), dtype=torch.float32)
    padded = torch.nn.functional.pad(m, (1, 1, 1, 1))
    ys = (torch.arange(out_h, dtype=torch.float32) + 0.5) * (H / out_h)
    xs = (torch.arange(out_w, dtype=torch.float32) + 0.5) * (W / out_w)
    if convention == "detectron2":
        wy = _grid_sample_weights(b[:, 1], b[:, 3], ys, M)
        wx = _grid_sample_weights(b[:, 0], b[:, 2], xs, M)
    else:
        eb = _expanded_int_boxes(b, M)
        wy = _axis_weights(eb[:, 1], eb[:, 3], ys, M + 2)  # (n, out_h, P)
        wx = _axis_weights(eb[:, 0], eb[:, 2], xs, M + 2)  # (n, out_w, P)
    return torch.bmm(torch.bmm(wy, padded), wx.transpose(1, 2))


def paste_masks(boxes, masks, image_hw, convention: str = "torchvision") -> np.ndarray | torch.Tensor:
    """Full-resolution mask probabilities (n, H, W) float32, identical to the pasting of ``convention``
    (torchvision's or detectron2's, see the module docstring).

    ``boxes`` (n, 4) x1,y1,x2,y2 in image pixels; ``masks`` (n, M, M) uint8 (probability x 255) or float.
    """
    b, m, H, W = _check(boxes, masks, image_hw)
    return _like(_sample(b, m, H, W, H, W, convention), masks)


def resize_masks(boxes, masks, image_hw, out_hw, convention: str = "torchvision") -> np.ndarray | torch.Tensor:
    """Mask probabilities (n, h, w) pasted directly at ``out_hw`` (the image stretched to that size).

    Samples the same continuous mask as :func:`paste_masks` at the centres of an h x w tiling of the
    image, so ``out_hw == image_hw`` gives exactly the full-resolution paste.
    """
    b, m, H, W = _check(boxes, masks, image_hw)
    h, w = (int(v) for v in out_hw)
    if h < 1 or w < 1:
        raise ValueError(f"out_hw must be positive, got {tuple(out_hw)}")
    return _like(_sample(b, m, H, W, h, w, convention), masks)


def _cell_overlap(size: int, grid: int) -> torch.Tensor:
    """(grid, size) overlap of each pixel [k, k+1) with each of ``grid`` equal cells tiling [0, size)."""
    edges = torch.arange(grid + 1, dtype=torch.float64) * (size / grid)
    px = torch.arange(size, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], px[None, :])
    hi = torch.minimum(edges[1:, None], px[None, :] + 1)
    return ((hi - lo).clamp(min=0) / (size / grid)).to(torch.float32)


def _cell_fractions(binary: torch.Tensor, H: int, W: int, grid: int) -> torch.Tensor:
    """(..., G, G) fraction of each cell's area covered by the pixel-constant ``binary`` (..., H, W) mask."""
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    ay, ax = _cell_overlap(H, grid), _cell_overlap(W, grid)
    return torch.matmul(torch.matmul(ay, binary), ax.T)


def grid_coverage(boxes, masks, image_hw, grid: int, threshold: float = 0.5,
                  convention: str = "torchvision") -> np.ndarray | torch.Tensor:
    """Fraction (n, G, G) of each cell of a G x G tiling of the image covered by each binarised mask.

    Exact by pixel overlap (METHODS.md sections 2 and 8): the mask is pasted at full resolution as
    :func:`paste_masks` does, a pixel is covered when its probability is >= ``threshold``, and each
    pixel counts with the area it shares with the cell (cells need not align with pixels). Cost
    O(n H W); no sub-sampling, so a small object's coverage is never an estimate.
    """
    b, m, H, W = _check(boxes, masks, image_hw)
    binary = (_sample(b, m, H, W, H, W, convention) >= threshold).to(torch.float32)
    return _like(_cell_fractions(binary, H, W, grid), masks)


def merged_grid_coverage(boxes, masks, image_hw, grid: int, threshold: float = 0.5,
                         convention: str = "torchvision") -> np.ndarray | torch.Tensor:
    """Fraction (G, G) of each cell covered by the union of the binarised masks (all zero when n = 0).

    The merged mask of ICA (METHODS.md section 2) at grid resolution, exact as :func:`grid_coverage`.
    """
    b, m, H, W = _check(boxes, masks, image_hw)
    union = (_sample(b, m, H, W, H, W, convention) >= threshold).any(dim=0).to(torch.float32)
    return _like(_cell_fractions(union, H, W, grid), masks)


def region_inside_fraction(region_boxes, full_mask) -> np.ndarray | torch.Tensor:
    """Fraction (r,) of each box's area that lies inside ``full_mask`` (H, W) bool.

    Exact for the pixel-constant mask: each pixel counts with its overlap with the (fractional) box.
    Box area outside the image counts as outside the mask; empty boxes give 0. Used by the attention
    metrics (METHODS.md section 8): a region is a reference fragment when this is >= 0.5.
    """
    rb = _to_tensor(region_boxes, "region_boxes", 2).to(torch.float64)
    fm = _to_tensor(full_mask, "full_mask", 2).to(torch.float64)
    if rb.shape[1] != 4:
        raise ValueError(f"region_boxes must be (r, 4) x1,y1,x2,y2, got shape {tuple(rb.shape)}")
    H, W = fm.shape

    def overlap(lo, hi, size):  # (r, size): length of [lo, hi] inside each pixel [k, k+1)
        px = torch.arange(size, dtype=torch.float64)
        return (torch.minimum(hi[:, None], px + 1) - torch.maximum(lo[:, None], px)).clamp(min=0)

    wy = overlap(rb[:, 1], rb[:, 3], H)
    wx = overlap(rb[:, 0], rb[:, 2], W)
    inside = ((wy @ fm) * wx).sum(dim=1)
    area = (rb[:, 2] - rb[:, 0]).clamp(min=0) * (rb[:, 3] - rb[:, 1]).clamp(min=0)
    frac = torch.where(area > 0, inside / area.clamp(min=1e-12), torch.zeros_like(area))
    return _like(frac.to(torch.float32), full_mask)
