"""The ``torchvision`` detector backend (registered in ``detectors.DETECTORS``): Mask R-CNN R50-FPN v2 or v1,
its modules called in order so the 28x28 mask probabilities come out before any pasting (``detectors``
module doc).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .detectors import (MASK_SIZE, DetectorError, Detections, _autocast, coco_class_map, fetch_torchvision_weights,
                        load_state_dict, sha256_file, to_chw_float)


class TorchvisionDetector:
    """torchvision Mask R-CNN R50-FPN (``arch`` "v2" default, or "v1").

    ``weights``: "DEFAULT" (torchvision's COCO weights, downloaded to the torch hub cache; offline this
    is a clear error), a PATH to a state dict (sha256 recorded), or "none" (random init, backbone too).
    ``proposals`` is the RPN's pre- and post-NMS top-n at test time (torchvision's default 1000).
    ``class_names`` is needed only for checkpoints that are not 91-class COCO (labels 1..K -> 0..K-1).
    """

    def __init__(self, arch: str = "v2", weights: str = "DEFAULT", score_threshold: float = 0.05,
                 max_instances: int = 32, min_size: int = 800, max_size: int = 1333, nms_iou: float = 0.5,
                 proposals: int = 1000, device: str = "cpu", amp: bool = True,
                 class_names: Sequence[str] | None = None, roi_features: bool = False):
        from torchvision.models import detection as tvd

        builders = {"v2": (tvd.maskrcnn_resnet50_fpn_v2, tvd.MaskRCNN_ResNet50_FPN_V2_Weights),
                    "v1": (tvd.maskrcnn_resnet50_fpn, tvd.MaskRCNN_ResNet50_FPN_Weights)}
        if arch not in builders:
            raise DetectorError(f"torchvision arch {arch!r} unknown; choose one of {sorted(builders)}")
        build, enum = builders[arch]
        self.arch, self.device, self.amp = arch, torch.device(device), bool(amp)
        self.opts = dict(score_threshold=float(score_threshold), max_instances=int(max_instances),
                         min_size=int(min_size), max_size=int(max_size), nms_iou=float(nms_iou),
                         proposals=int(proposals))
        kw = dict(box_score_thresh=score_threshold, box_detections_per_img=max_instances, min_size=min_size,
                  max_size=max_size, box_nms_thresh=nms_iou, rpn_pre_nms_top_n_test=proposals,
                  rpn_post_nms_top_n_test=proposals)
        categories = enum.DEFAULT.meta["categories"]
        self.weights_sha256: str | None = None
        if weights == "DEFAULT":
            self.weights_id = f"torchvision:{enum.DEFAULT}"
            self.weights_sha256 = fetch_torchvision_weights(enum.DEFAULT)
            model = build(weights=enum.DEFAULT, **kw)  # now loads from the hub cache
        elif weights == "none":
            model = build(weights=None, weights_backbone=None, num_classes=len(categories), **kw)
            self.weights_id = "none (random init)"
        else:
            from .maskrcnn import arch_name, checkpoint_meta, model_from_meta

            sd = load_state_dict(weights, "detector")
            cls_w = sd.get("roi_heads.box_predictor.cls_score.weight")
            if cls_w is None:
                raise DetectorError(f"{weights}: not a torchvision Mask R-CNN state dict (no box predictor)")
            meta = checkpoint_meta(weights)  # `vlcache train detector` checkpoints name their own architecture
            if meta is not None:
                model, self.arch = model_from_meta(meta, **kw), arch_name(meta)
                class_names = class_names if class_names is not None else meta["class_names"]
            else:
                model = build(weights=None, weights_backbone=None, num_classes=cls_w.shape[0], **kw)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            # FrozenBatchNorm checkpoints lack BatchNorm's step counter; anything else is a real mismatch
            bad = [k for k in missing + unexpected if not k.endswith("num_batches_tracked")]
            if bad:
                raise DetectorError(f"{weights}: does not fit Mask R-CNN {arch}; mismatched keys {bad[:5]}")
            self.weights_id, self.weights_sha256 = str(weights), sha256_file(weights)
        num_classes = model.roi_heads.box_predictor.cls_score.out_features
        if class_names is not None:
            if len(class_names) != num_classes - 1:
                raise DetectorError(f"{len(class_names)} class_names for a {num_classes}-way (with background) model")
            self.class_names, self._lut = list(class_names), np.arange(-1, num_classes - 1)
        elif num_classes == len(categories):
            self.class_names, self._lut = coco_class_map(categories)
        else:
            raise DetectorError(f"{weights}: {num_classes}-class checkpoint; pass class_names (without background)")
        self.model = model.eval().to(self.device)
        # the box head's representation of a RoI (TwoMLPHead fc7 / ConvFC head output), kept on request
        self.roi_features = bool(roi_features)
        self.roi_feature_dim = model.roi_heads.box_predictor.cls_score.in_features

    def config(self) -> dict[str, Any]:
        import torchvision

        arch = {"v2": "maskrcnn_resnet50_fpn_v2", "v1": "maskrcnn_resnet50_fpn"}.get(self.arch, self.arch)
        return {"backend": "torchvision", "arch": arch,
                "weights_id": self.weights_id, "weights_sha256": self.weights_sha256, **self.opts,
                "mask_size": MASK_SIZE, "num_classes": len(self.class_names), "amp": self.amp,
                "roi_features": self.roi_features, "roi_feature_dim": self.roi_feature_dim,
                "torchvision": torchvision.__version__}

    def _rpn(self, images, features) -> tuple[list[Tensor], list[Tensor]]:
        """The RPN's forward at test time, keeping the objectness scores it normally drops."""
        from torchvision.models.detection.rpn import concat_box_prediction_layers

        rpn, feats = self.model.rpn, list(features.values())
        objectness, deltas = rpn.head(feats)
        anchors = rpn.anchor_generator(images, feats)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return rpn.filter_proposals(boxes, objectness, images.image_sizes, per_level)

    @torch.inference_mode()
    def detect(self, images, records=None) -> list[Detections]:
        from torchvision.models.detection.transform import resize_boxes

        if len(images) == 0:
            return []
        tensors = [to_chw_float(img, i).to(self.device) for i, img in enumerate(images)]
        sizes = [tuple(t.shape[-2:]) for t in tensors]
        m = self.model
        with _autocast(self.device, self.amp):
            batch, _ = m.transform(tensors)
            features = m.backbone(batch.tensors)
            proposals, prop_scores = self._rpn(batch, features)
            results, class_probs, box_feats = self._roi_heads(features, proposals, batch.image_sizes)
        columns = torch.from_numpy(np.flatnonzero(self._lut >= 0))  # foreground classes, in class_names order
        out = []
        for res, props, pscores, probs, feats, in_size, size in zip(results, proposals, prop_scores, class_probs,
                                                                    box_feats, batch.image_sizes, sizes):
            labels = torch.as_tensor(self._lut)[res["labels"].cpu()]
            keep = labels >= 0  # drops COCO 'N/A' ids (never trained; random weights can emit them)
            roi_boxes = resize_boxes(props.float(), in_size, size)
            out.append(Detections(
                boxes=resize_boxes(res["boxes"].float(), in_size, size)[keep.to(res["boxes"].device)],
                labels=labels[keep], scores=res["scores"].float().cpu()[keep],
                masks=res["masks"][:, 0].float().cpu()[keep], image_size=size,
                proposals=roi_boxes, proposal_scores=pscores.float(),
                roi_boxes=roi_boxes, roi_scores=probs.float().cpu()[:, columns],
                roi_feats=feats.float().cpu() if self.roi_features else None,
            ))
        return out

    def _roi_heads(self, features, proposals, image_sizes) -> tuple[list[dict], list[Tensor], list[Tensor]]:
        """``RoIHeads.forward`` at test time, step by step, also returning every proposal's class
        probabilities (softmax over background + classes), which BUTD region selection needs, and its
        box-head representation (the input of the class/box predictor)."""
        from torchvision.models.detection.roi_heads import maskrcnn_inference

        h = self.model.roi_heads
        box_features = h.box_head(h.box_roi_pool(features, proposals, image_sizes))
        class_logits, box_regression = h.box_predictor(box_features)
        boxes, scores, labels = h.postprocess_detections(class_logits, box_regression, proposals, image_sizes)
        results = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
        mask_logits = h.mask_predictor(h.mask_head(h.mask_roi_pool(features, boxes, image_sizes)))
        for res, probs in zip(results, maskrcnn_inference(mask_logits, labels)):
            res["masks"] = probs
        counts = [len(p) for p in proposals]
        class_probs = torch.softmax(class_logits.float(), -1).split(counts)
        return results, list(class_probs), list(box_features.split(counts))
