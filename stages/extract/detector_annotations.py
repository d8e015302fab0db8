"""The ``annotations`` detector backend (registered in ``detectors.DETECTORS``): a dataset's own COCO-format
instance annotations as detections, the oracle run (``detectors`` module doc).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .detectors import MASK_SIZE, Detections, DetectorError, ImageDataError, grid_boxes

class AnnotationsDetector:
    """A dataset's own COCO-format instance annotations as detections (score 1.0): the oracle run.

    Each annotation (``bbox`` xywh, ``category_id`` an index into ``class_names``, ``segmentation``
    polygons, RLE or crowd RLE) is decoded with pycocotools to a full-resolution binary mask, then
    cropped to its box and resized to MxM with ``roi_align(aligned=True)`` on the float mask, the way
    detectron2 makes Mask R-CNN's mask targets; so the store pastes them back detectron2's way
    (``mask_paste``, METHODS.md section 12), which returns the annotation. Choices (ours): annotations without a segmentation count as
    their filled box; zero-area boxes are dropped; above ``max_instances`` the largest areas are kept;
    crowd regions are kept unless ``include_crowd=False``. Proposals are a deterministic grid
    (:func:`grid_boxes`), used only to top up bottom-up regions.
    """

    weights_sha256 = None
    weights_id = "annotations (dataset ground truth)"

    def __init__(self, class_names: Sequence[str], mask_size: int = MASK_SIZE, max_instances: int = 32,
                 include_crowd: bool = True, grid_levels: Sequence[int] = (1, 2, 3, 4)):
        if not class_names:
            raise DetectorError("the annotations backend needs the dataset's class names")
        self.class_names = list(class_names)
        self.mask_size, self.max_instances = int(mask_size), int(max_instances)
        self.include_crowd, self.grid_levels = bool(include_crowd), tuple(int(n) for n in grid_levels)

    def config(self) -> dict[str, Any]:
        return {"backend": "annotations", "weights_id": self.weights_id, "weights_sha256": None,
                "mask_size": self.mask_size, "max_instances": self.max_instances,
                "include_crowd": self.include_crowd, "grid_levels": list(self.grid_levels),
                "num_classes": len(self.class_names), "mask_paste": "detectron2"}

    def detect(self, images, records=None) -> list[Detections]:
        if records is None or len(records) != len(images):
            raise DetectorError("the annotations backend needs one record (with annotations) per image")
        out = []
        for i, (img, rec) in enumerate(zip(images, records)):
            h, w = (img.shape[:2] if isinstance(img, np.ndarray) else tuple(img.shape[-2:]))
            out.append(self.from_annotations(rec, h, w))
        return out

    def from_annotations(self, record, height: int, width: int) -> Detections:
        """One record's annotations -> :class:`Detections` for a decoded image of ``height`` x ``width``."""
        from torchvision.ops import roi_align

        where = f"image {record.id} ({record.path})"
        if record.annotations is None:
            raise DetectorError(f"{where}: no instance annotations in this dataset")
        if record.height is not None and (record.height, record.width) != (height, width):
            raise ImageDataError(f"{where}: annotations are for {record.width}x{record.height} but the decoded "
                                f"image is {width}x{height} (EXIF orientation, or the wrong file?)")
        items = []
        for k, ann in enumerate(record.annotations):
            if ann.get("iscrowd", 0) and not self.include_crowd:
                continue
            box, label = self._box_label(ann, f"{where} annotation {k}", height, width)
            if box is not None:
                items.append((box, label, ann, k))
        if len(items) > self.max_instances:  # keep the largest; sorted() is stable for ties
            items = sorted(items, key=lambda t: -(t[0][2] - t[0][0]) * (t[0][3] - t[0][1]))[: self.max_instances]
        M = self.mask_size
        masks = np.zeros((len(items), M, M), np.float32)
        for j, (box, _, ann, k) in enumerate(items):
            full = self._mask(ann, f"{where} annotation {k}", height, width, box)
            # crop (one pixel of margin) before roi_align so memory stays O(box), not O(image)
            x0, y0 = max(int(box[0]) - 1, 0), max(int(box[1]) - 1, 0)
            x1, y1 = min(int(np.ceil(box[2])) + 1, width), min(int(np.ceil(box[3])) + 1, height)
            crop = torch.from_numpy(full[y0:y1, x0:x1].astype(np.float32))[None, None]
            roi = torch.tensor([[0, box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0]], dtype=torch.float32)
            masks[j] = roi_align(crop, roi, (M, M), spatial_scale=1.0, sampling_ratio=0, aligned=True)[0, 0].numpy()
        return Detections(
            boxes=np.asarray([t[0] for t in items], np.float32).reshape(-1, 4),
            labels=np.asarray([t[1] for t in items], np.int64), scores=np.ones(len(items), np.float32),
            masks=masks.clip(0, 1), image_size=(height, width),
            proposals=grid_boxes(height, width, self.grid_levels),
        )

    def _box_label(self, ann: dict, where: str, h: int, w: int):
        try:
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            label = int(ann["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ImageDataError(f"{where}: needs bbox [x, y, w, h] and category_id ({type(e).__name__}: {e})") from None
        if not 0 <= label < len(self.class_names):
            raise DetectorError(f"{where}: category_id {label} is not an index into {len(self.class_names)} classes")
        if not np.isfinite([x, y, bw, bh]).all() or bw < 0 or bh < 0:
            raise ImageDataError(f"{where}: invalid bbox {ann['bbox']}")
        box = np.array([x, y, x + bw, y + bh], np.float32)
        box[0::2], box[1::2] = box[0::2].clip(0, w), box[1::2].clip(0, h)
        if box[2] <= box[0] or box[3] <= box[1]:
            return None, label  # zero area inside the image
        return box, label

    @staticmethod
    def _mask(ann: dict, where: str, h: int, w: int, box: np.ndarray) -> np.ndarray:
        from pycocotools import mask as cocomask

        seg = ann.get("segmentation")
        if not seg:
            full = np.zeros((h, w), np.uint8)
            full[int(box[1]):int(np.ceil(box[3])), int(box[0]):int(np.ceil(box[2]))] = 1
            return full
        try:
            if isinstance(seg, list):  # polygons
                rle = cocomask.merge(cocomask.frPyObjects(seg, h, w))
            elif isinstance(seg, dict) and isinstance(seg.get("counts"), list):  # uncompressed RLE
                rle = cocomask.frPyObjects(seg, *seg["size"])
            elif isinstance(seg, dict):  # compressed RLE
                counts = seg["counts"]
                rle = {"size": seg["size"], "counts": counts.encode() if isinstance(counts, str) else counts}
            else:
                raise TypeError(f"unsupported segmentation of type {type(seg).__name__}")
            if list(rle["size"]) != [h, w]:
                raise ValueError(f"RLE size {list(rle['size'])} differs from the image's {[h, w]}")
            return cocomask.decode(rle)
        except Exception as e:
            raise ImageDataError(f"{where}: bad segmentation ({type(e).__name__}: {e})") from None
