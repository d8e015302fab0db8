"""Mask R-CNN with a ResNet-18/34/50/101 FPN backbone, and the metadata its checkpoints carry (built and
written by ``stages/detect``, read here by extraction: it sits below both, so neither imports upwards).

A checkpoint written by ``vlcache train detector`` is ``{"model": state_dict, "meta": {...}}`` (plus the
optimiser state in the run's own resume checkpoints). ``meta`` names everything needed to rebuild the
network without any other file: backbone, number of classes (with background), class names, the norm
layer used, and the input sizes it was trained at. Extraction (``vlcache extract --weights PATH``)
builds the architecture from it, so the user never repeats the backbone or class list.

Following torchvision's detection builders: a backbone initialised from ImageNet weights uses
``FrozenBatchNorm2d`` and trains its last 3 stages; a backbone trained from scratch uses ordinary
``BatchNorm2d`` and trains all 5 (``maskrcnn_resnet50_fpn(weights_backbone=None)`` does the same).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "vlcache-maskrcnn/1"
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")
C5_CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


class DetectorCheckpointError(ValueError):
    """A detector checkpoint that cannot be used; the message names the file and what is wrong."""


def build_maskrcnn(backbone: str, num_classes: int, norm: str = "batch", trainable_layers: int = 5,
                   fpn_channels: int = 256, **maskrcnn_kw: Any) -> nn.Module:
    """A randomly initialised torchvision ``MaskRCNN`` with a ``backbone``-FPN trunk.

    ``num_classes`` counts the background. ``norm``: "batch" (BatchNorm2d, training from scratch) or
    "frozen" (FrozenBatchNorm2d, for ImageNet-initialised backbones). ``maskrcnn_kw`` go to ``MaskRCNN``
    (min_size, max_size, box_score_thresh, ...).
    """
    import torchvision
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops.misc import FrozenBatchNorm2d

    if backbone not in BACKBONES:
        raise DetectorCheckpointError(f"backbone {backbone!r} unknown; choose one of {list(BACKBONES)}")
    if norm not in ("batch", "frozen"):
        raise DetectorCheckpointError(f"norm {norm!r} unknown; choose 'batch' or 'frozen'")
    trunk = getattr(torchvision.models, backbone)(
        weights=None, norm_layer=FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d)
    body = _resnet_fpn_extractor(trunk, trainable_layers)
    if fpn_channels == 256:  # torchvision's own heads, so torchvision checkpoints fit
        return MaskRCNN(body, num_classes=num_classes, **maskrcnn_kw)
    # narrower FPN and heads (CPU): same structure as torchvision's, every width = fpn_channels
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads

    body = BackboneWithFPN(body.body, {k: v for k, v in body.body.return_layers.items()},
                           [C5_CHANNELS[backbone] // 8 * 2 ** i for i in range(4)], fpn_channels,
                           extra_blocks=body.fpn.extra_blocks)
    c = fpn_channels
    return MaskRCNN(body, num_classes=None, box_head=TwoMLPHead(c * 7 * 7, 4 * c),
                    box_predictor=_box_predictor(4 * c, num_classes), mask_head=MaskRCNNHeads(c, (c,) * 4, 1),
                    mask_predictor=_mask_predictor(c, num_classes), **maskrcnn_kw)


def _box_predictor(dim: int, num_classes: int) -> nn.Module:
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

    return FastRCNNPredictor(dim, num_classes)


def _mask_predictor(dim: int, num_classes: int) -> nn.Module:
    from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

    return MaskRCNNPredictor(dim, dim, num_classes)


def checkpoint_meta(path: str | os.PathLike) -> dict | None:
    """The ``meta`` of a ``vlcache train detector`` checkpoint, or None for any other weights file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DetectorCheckpointError(f"{path}: not a loadable weights-only checkpoint ({type(e).__name__}: {e})") from None
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        return None
    missing = [k for k in ("backbone", "num_classes", "class_names", "norm") if k not in meta]
    if missing:
        raise DetectorCheckpointError(f"{path}: detector checkpoint metadata lacks {missing}")
    if len(meta["class_names"]) != meta["num_classes"] - 1:
        raise DetectorCheckpointError(f"{path}: {len(meta['class_names'])} class names for "
                                      f"{meta['num_classes']} classes (with background)")
    return meta


def model_from_meta(meta: dict, **maskrcnn_kw: Any) -> nn.Module:
    """The network a checkpoint's ``meta`` describes (random weights; load the state dict next)."""
    return build_maskrcnn(meta["backbone"], meta["num_classes"], norm=meta["norm"],
                          fpn_channels=int(meta.get("fpn_channels", 256)), **maskrcnn_kw)


def arch_name(meta: dict) -> str:
    width = int(meta.get("fpn_channels", 256))
    return f"maskrcnn_{meta['backbone']}_fpn" + ("" if width == 256 else f"{width}")


def backbone_body_state(state_dict: dict) -> dict:
    """The ResNet trunk's weights (``backbone.body.*`` keys, prefix removed) of a Mask R-CNN state dict:
    what a torchvision ``resnetXX`` loads, minus its classifier."""
    prefix = "backbone.body."
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
