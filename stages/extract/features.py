"""Grid and bottom-up region features from one ResNet-101 C5 map (METHODS section 1; issue 3 items 2-3).

Choices (ours; the README repeats them):

- One backbone pass per image: the image is resized to ``input_size`` x ``input_size`` (448 by default,
  ignoring aspect ratio, as common Show-Attend-Tell implementations do), giving a 14x14x2048 C5 map.
- Grid features: adaptive average pooling of C5 to G x G (identity at 448 / G=14), flattened to
  (G*G, 2048).
- Region features, BUTD-style: ``roi_align`` of each box on the *same* C5 map (boxes mapped from
  original pixels to the resized input, ``spatial_scale`` 1/32, ``sampling_ratio=2``, ``aligned=True``),
  7x7 output mean-pooled to 2048-d. Anderson et al. pooled a Visual Genome Faster R-CNN's own res5
  head on 600-px inputs; ours is the ImageNet ResNet-101 trunk, which is what a user has offline.
- Region selection follows BUTD: detections with confidence >= 0.2 after class-aware NMS (IoU 0.3),
  10..100 per image, or a fixed number (36); too few are topped up first by lower-confidence
  detections, then by proposals (RPN proposals, or the annotations backend's box grid), label -1.
- Random init (``weights="none"``) uses torchvision's ``zero_init_residual=True``: the standard init
  grows activations past float16's range (~2e5 at 448 px) through 33 residual sums; with residual
  branches starting at zero the C5 values stay O(1). Values are never rescaled afterwards:
  :func:`to_float16_checked` refuses to store what float16 cannot hold.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, roi_align

from .detectors import (Detections, DetectorError, fetch_torchvision_weights, load_state_dict, sha256_file,
                        to_chw_float)

STRIDE = 32  # ResNet C5 stride
FLOAT16_MAX = float(np.finfo(np.float16).max)
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class FeatureRangeError(ValueError):
    """Features that float16 cannot store (inf/NaN, or beyond +-65504); the message names them."""


class FeatureExtractor(nn.Module):
    """Frozen ResNet trunk up to C5 (eval mode, no gradients); ResNet-101 by default (``backbone``:
    resnet18/34/50/101). ``weights``: "DEFAULT" (ImageNet), a PATH to a state dict, a ``vlcache train
    detector`` checkpoint (its own trained trunk, whose backbone then comes from the checkpoint), or "none".

    ``prepare(images)`` resizes and normalises a list of images to a (B,3,S,S) batch; ``forward(x)``
    returns C5, (B, channels, S/32, S/32) (channels 2048, or 512 for ResNet-18/34).
    """

    def __init__(self, weights: str = "DEFAULT", input_size: int = 448, backbone: str = "resnet101"):
        super().__init__()
        import torchvision

        if input_size % STRIDE or input_size < STRIDE:
            raise DetectorError(f"input_size {input_size} must be a positive multiple of {STRIDE}")
        if backbone not in ("resnet18", "resnet34", "resnet50", "resnet101"):
            raise DetectorError(f"feature backbone {backbone!r}: choose resnet18, resnet34, resnet50 or resnet101")
        self.input_size = int(input_size)
        self.backbone = backbone
        self.weights_sha256: str | None = None
        if weights == "DEFAULT":
            enum = torchvision.models.get_model_weights(backbone).DEFAULT
            self.weights_sha256 = fetch_torchvision_weights(enum, "--backbone-weights", "features.weights")
            self.weights_id = f"torchvision:{enum}"
            net = getattr(torchvision.models, backbone)(weights=enum)
        elif weights == "none":
            net = getattr(torchvision.models, backbone)(weights=None, zero_init_residual=True)
            self.weights_id = "none (random init, zero_init_residual=True)"
        else:
            from ..detect.model import backbone_body_state, checkpoint_meta

            sd, meta = load_state_dict(weights, "feature"), checkpoint_meta(weights)
            if meta is not None:  # a `vlcache train detector` checkpoint: its own trained ResNet trunk
                self.backbone, sd = meta["backbone"], backbone_body_state(sd)
            net = getattr(torchvision.models, self.backbone)(weights=None)
            missing, unexpected = net.load_state_dict(sd, strict=False)
            # the classifier is unused; FrozenBatchNorm trunks lack BatchNorm's step counter
            bad = [k for k in missing if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]
            if bad + list(unexpected):
                raise DetectorError(f"{weights}: does not fit torchvision {self.backbone}; "
                                    f"mismatched keys {(bad + list(unexpected))[:5]}")
            self.weights_id, self.weights_sha256 = str(weights), sha256_file(weights)
        self.channels = net.fc.in_features  # C5 width: 2048 (ResNet-50/101), 512 (ResNet-18/34)
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool,
                                   net.layer1, net.layer2, net.layer3, net.layer4)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.eval().requires_grad_(False)  # frozen by design: stage one never trains it

    def prepare(self, images: Sequence[np.ndarray] | Sequence[Tensor]) -> Tensor:
        """Images -> normalised (B,3,S,S) batch on this module's device."""
        s = self.input_size
        batch = [F.interpolate(to_chw_float(img, i)[None].to(self.mean.device), size=(s, s), mode="bilinear",
                               align_corners=False, antialias=True) for i, img in enumerate(images)]
        return (torch.cat(batch).clamp_(0, 1) - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "layer": "C5", "weights_id": self.weights_id,
                "weights_sha256": self.weights_sha256, "input_size": self.input_size, "resize": "square, bilinear"}


def grid_features(c5: Tensor, grid: int = 14) -> Tensor:
    """(B,C,h,w) -> (B, grid*grid, C) by adaptive average pooling, row-major cells."""
    return F.adaptive_avg_pool2d(c5, grid).flatten(2).transpose(1, 2)


def region_features(c5: Tensor, boxes_per_image: Sequence, image_sizes: Sequence[tuple[int, int]],
                    input_size: int | tuple[int, int], output_size: int = 7) -> list[Tensor]:
    """RoIAlign-pooled region features: one (r, C) tensor per image.

    ``boxes_per_image`` are xyxy in original pixels of images of ``image_sizes`` (h, w); each image was
    resized to ``input_size`` before the backbone. Each box is pooled to output_size^2 bins on C5
    (``spatial_scale`` = C5 size / input size, sampling_ratio 2, aligned=True) and mean-pooled.
    """
    in_h, in_w = (input_size, input_size) if isinstance(input_size, int) else input_size
    if c5.shape[-2] / in_h != c5.shape[-1] / in_w:
        raise ValueError(f"C5 of {tuple(c5.shape[-2:])} does not match an input of {in_h}x{in_w}")
    rois = []
    for boxes, (h, w) in zip(boxes_per_image, image_sizes, strict=True):
        b = torch.as_tensor(np.asarray(boxes, np.float32) if not isinstance(boxes, Tensor) else boxes)
        b = b.to(c5.device, torch.float32).reshape(-1, 4)
        rois.append(b * b.new_tensor([in_w / w, in_h / h, in_w / w, in_h / h]))
    pooled = roi_align(c5.float(), rois, output_size, spatial_scale=c5.shape[-1] / in_w,
                       sampling_ratio=2, aligned=True)
    return list(pooled.mean(dim=(2, 3)).split([len(r) for r in rois]))


def select_regions(det: Detections, proposals: np.ndarray | None = None, *, conf: float = 0.2,
                   min_regions: int = 10, max_regions: int = 100, fixed: int | None = None,
                   nms_iou: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BUTD region selection -> (boxes (r,4) float32, labels (r,) int64, scores (r,) float32).

    Detections go through class-aware NMS (``nms_iou``). Adaptive (``fixed=None``): those with score
    >= ``conf``, at most ``max_regions``; if fewer than ``min_regions``, the best remaining detections,
    then proposals (``proposals`` or ``det.proposals``, best first; label -1, score = objectness),
    preferring proposals that overlap no chosen box by IoU >= ``nms_iou``. Fixed: the best ``fixed``
    detections regardless of ``conf``, topped up the same way.
    """
    if (fixed is not None and fixed < 1) or min_regions > max_regions:
        raise ValueError(f"bad region counts: fixed={fixed}, min_regions={min_regions}, max_regions={max_regions}")
    boxes, scores = torch.from_numpy(det.boxes), torch.from_numpy(det.scores)
    order = batched_nms(boxes, scores, torch.from_numpy(det.labels), nms_iou).numpy()  # best first
    if fixed is not None:
        want, chosen = fixed, order[:fixed]
    else:
        confident = order[det.scores[order] >= conf][:max_regions]
        want, chosen = min_regions, (confident if len(confident) >= min_regions else order[:min_regions])
    out_b, out_l, out_s = det.boxes[chosen], det.labels[chosen], det.scores[chosen]
    if len(chosen) < want:
        props = det.proposals if proposals is None else np.asarray(proposals, np.float32).reshape(-1, 4)
        pscores = (det.proposal_scores if proposals is None and det.proposal_scores is not None
                   else np.zeros(0 if props is None else len(props), np.float32))
        if props is not None and len(props):
            take = _top_up(out_b, props, want - len(chosen), nms_iou)
            out_b = np.concatenate([out_b, props[take]])
            out_l = np.concatenate([out_l, np.full(len(take), -1, np.int64)])
            out_s = np.concatenate([out_s, pscores[take]])
    return out_b.astype(np.float32), out_l.astype(np.int64), out_s.astype(np.float32)


def _top_up(chosen: np.ndarray, props: np.ndarray, need: int, iou: float) -> np.ndarray:
    """Indices of ``need`` proposals, in order: first those new (IoU < iou with all kept), then any."""
    taken: list[int] = []
    kept = torch.from_numpy(chosen.reshape(-1, 4))
    for i, p in enumerate(torch.from_numpy(props)):
        if len(taken) == need:
            break
        if len(kept) == 0 or box_iou(p[None], kept).max() < iou:
            taken.append(i)
            kept = torch.cat([kept, p[None]])
    used = set(taken)
    rest = [i for i in range(len(props)) if i not in used]
    return np.asarray(taken + rest[: need - len(taken)], np.int64)


def to_float16_checked(x, what: str) -> np.ndarray:
    """``x`` as float16, or :class:`FeatureRangeError` naming ``what`` if it holds inf/NaN or overflows."""
    a = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, np.float32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise FeatureRangeError(f"{what}: features hold NaN or infinite values ({bad} of {a.size})")
    peak = float(np.abs(a).max()) if a.size else 0.0
    if peak > FLOAT16_MAX:
        raise FeatureRangeError(
            f"{what}: values up to {peak:.3g} exceed float16's range (+-{FLOAT16_MAX:.0f}); "
            "random-weight backbones can do this (vlcache's --weights none initialises residual branches at "
            "zero to avoid it); values are never rescaled silently"
        )
    return a.astype(np.float16)
