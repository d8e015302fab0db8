"""Grid and bottom-up region features from a ResNet-101 C5 map (METHODS sections 1 and 11).

Choices (ours; the README repeats them):

- Grid features: the image resized to ``input_size`` x ``input_size`` (448 by default, ignoring aspect
  ratio, as common Show-Attend-Tell implementations do), giving a 14x14x2048 C5 map, adaptively
  average-pooled to G x G (identity at 448 / G=14) and flattened to (G*G, 2048).
- Region features, BUTD-style: ``roi_align`` of each box on C5 (``spatial_scale`` 1/32,
  ``sampling_ratio=2``, ``aligned=True``), 7x7 output mean-pooled to 2048-d. By default C5 comes from
  a pass at BUTD's test scale (:meth:`FeatureExtractor.prepare_scaled`: shorter side 600, longer side at
  most 1000, aspect kept, one image at a time as generate_tsv.py does); ``region_scale=square`` pools
  from the grid's square pass instead (cheaper, coarser). Anderson et al. pooled a Visual Genome Faster
  R-CNN's own res5 head; ours is the ImageNet ResNet-101 trunk, which is what a user has offline.
- Which regions: :mod:`.regions` (BUTD's selection).
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
from torchvision.ops import roi_align

from .detectors import (DetectorError, fetch_torchvision_weights, load_state_dict, sha256_file,
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
            from .maskrcnn import backbone_body_state, checkpoint_meta

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

    def prepare_scaled(self, image, min_size: int = 600, max_size: int = 1000) -> tuple[Tensor, tuple[int, int]]:
        """One image at BUTD's test scale (:func:`butd_scale`; bilinear without antialiasing, as
        cv2.resize in generate_tsv.py), normalised and zero-padded at the bottom/right to a multiple of 32
        so C5 cells stay at stride 32 -> ((1,3,H,W) batch, (h', w') before padding)."""
        x = to_chw_float(image)[None].to(self.mean.device)
        h, w = butd_scale(x.shape[-2], x.shape[-1], min_size, max_size)
        x = (F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp_(0, 1) - self.mean) / self.std
        return F.pad(x, (0, -w % STRIDE, 0, -h % STRIDE)), (h, w)

    def forward(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def config(self) -> dict[str, Any]:
        return {"backbone": self.backbone, "layer": "C5", "weights_id": self.weights_id,
                "weights_sha256": self.weights_sha256, "input_size": self.input_size, "resize": "square, bilinear"}


def grid_features(c5: Tensor, grid: int = 14) -> Tensor:
    """(B,C,h,w) -> (B, grid*grid, C) by adaptive average pooling, row-major cells."""
    return F.adaptive_avg_pool2d(c5, grid).flatten(2).transpose(1, 2)


def region_features(c5: Tensor, boxes_per_image: Sequence, image_sizes: Sequence[tuple[int, int]],
                    input_sizes, output_size: int = 7) -> list[Tensor]:
    """RoIAlign-pooled region features: one (r, C) tensor per image.

    ``boxes_per_image`` are xyxy in original pixels of images of ``image_sizes`` (h, w); image k was
    resized to ``input_sizes[k]`` (h', w') before the backbone (an int S means S x S for all, one
    (h', w') pair the same for all) and may have been padded at the bottom/right. Each box is scaled by
    (w'/w, h'/h), pooled to output_size^2 bins on C5 (``spatial_scale`` 1/32, sampling_ratio 2,
    aligned=True) and mean-pooled.
    """
    n = len(image_sizes)
    if isinstance(input_sizes, int):
        input_sizes = [(input_sizes, input_sizes)] * n
    elif len(input_sizes) == 2 and all(isinstance(v, int) for v in input_sizes):
        input_sizes = [tuple(input_sizes)] * n
    rois = []
    for boxes, (h, w), (in_h, in_w) in zip(boxes_per_image, image_sizes, input_sizes, strict=True):
        if -(-in_h // STRIDE) > c5.shape[-2] or -(-in_w // STRIDE) > c5.shape[-1]:
            raise ValueError(f"C5 of {tuple(c5.shape[-2:])} does not match an input of {in_h}x{in_w}")
        b = torch.as_tensor(np.asarray(boxes, np.float32) if not isinstance(boxes, Tensor) else boxes)
        b = b.to(c5.device, torch.float32).reshape(-1, 4)
        rois.append(b * b.new_tensor([in_w / w, in_h / h, in_w / w, in_h / h]))
    pooled = roi_align(c5.float(), rois, output_size, spatial_scale=1 / STRIDE, sampling_ratio=2, aligned=True)
    return list(pooled.mean(dim=(2, 3)).split([len(r) for r in rois]))


def butd_scale(height: int, width: int, min_size: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """(h', w') of an image at BUTD's test scale: shorter side ``min_size`` unless the longer side would
    exceed ``max_size`` (then longer side = ``max_size``), aspect kept (py-faster-rcnn ``_get_image_blob``)."""
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


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
