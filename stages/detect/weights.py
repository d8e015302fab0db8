"""Initialising a detector to train: ImageNet backbones and detectors to fine-tune (new heads)."""

from __future__ import annotations

import torch

from ..extract.detectors import fetch_torchvision_weights, load_state_dict, sha256_file
from ..extract.maskrcnn import DetectorCheckpointError


def init_backbone(model: torch.nn.Module, backbone: str, weights: str) -> str:
    """Load ImageNet ResNet weights ("DEFAULT" = torchvision's, or a PATH) into the FPN trunk; their sha256."""
    import torchvision

    if weights == "DEFAULT":
        enum = torchvision.models.get_model_weights(backbone).DEFAULT
        sha = fetch_torchvision_weights(enum)
        sd = enum.get_state_dict(progress=False)
    else:
        sd, sha = load_state_dict(weights, "backbone"), sha256_file(weights)
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}  # the classifier is not part of the trunk
    missing, unexpected = model.backbone.body.load_state_dict(sd, strict=False)
    bad = [k for k in list(missing) + list(unexpected) if not k.endswith("num_batches_tracked")]
    if bad:
        raise DetectorCheckpointError(f"{weights}: does not fit torchvision {backbone}; mismatched keys {bad[:5]}")
    return sha


def init_detector(model: torch.nn.Module, cfg, weights: str) -> tuple[str, list[str]]:
    """Fine-tuning: load a whole detector ("DEFAULT" = torchvision's COCO Mask R-CNN R50-FPN, or a PATH),
    keeping this model's own (new) weights where shapes differ — the class-specific predictors when the
    classes differ. Returns the file's sha256 and the re-initialised keys."""
    if weights == "DEFAULT":
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

        if cfg.backbone != "resnet50" or cfg.fpn_channels != 256:
            raise DetectorCheckpointError("--weights DEFAULT (torchvision's COCO Mask R-CNN) needs backbone "
                                          "resnet50 and fpn_channels 256")
        enum = MaskRCNN_ResNet50_FPN_Weights.DEFAULT
        sha = fetch_torchvision_weights(enum)
        sd = enum.get_state_dict(progress=False)
    else:
        sd, sha = load_state_dict(weights, "detector"), sha256_file(weights)
    own = model.state_dict()
    fits = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    unknown = [k for k in sd if k not in own and not k.endswith("num_batches_tracked")]
    if unknown or len(fits) < len(own) // 2:
        raise DetectorCheckpointError(f"{weights}: does not fit a Mask R-CNN {cfg.backbone}-FPN "
                                      f"(fpn_channels {cfg.fpn_channels}); e.g. keys {unknown[:3]}")
    model.load_state_dict(fits, strict=False)
    return sha, sorted(k for k in own if k not in fits and not k.endswith("num_batches_tracked"))
