"""COCO-format instance annotations -> Mask R-CNN training samples and COCO ground truth.

Two ways to name the data (``DetectorData.load``):

- ``dataset`` (Karpathy / COCO captions / JSONL file, its splits) + ``instances`` (COCO instances
  JSON, one or several files): train on the dataset's ``train`` split, validate on ``val``.
- ``instances`` alone (e.g. ``instances_train2017.json``) + ``val_instances``: every image of the first
  is a training image, every image of the second a validation image (COCO's own layout).

As in torchvision's detection reference (``references/detection/coco_utils.py``): crowd annotations
and boxes without area are not training targets, and training skips images left without targets;
evaluation uses the instances files as they are (pycocotools handles crowds). Labels are 1..K in the
order of the categories' ids (0 is the background), matching ``Dataset.classes``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ...pipeline.datasets import DatasetError, _attach_instances, load_dataset
from ...pipeline.records import ImageRecord
from ...storage.images import BadImageError, load_image


@dataclass
class DetectorData:
    """Train/val records (with annotations), where their images live, class names, and the COCO GT."""

    train: list[ImageRecord]
    val: list[ImageRecord]
    train_root: Path
    val_root: Path
    classes: list[str]
    gt_files: list[Path]  # instances files holding the validation images' ground truth

    @classmethod
    def load(cls, instances: list[Path], dataset: Path | None = None, image_root: Path | None = None,
             val_instances: list[Path] | None = None, val_image_root: Path | None = None) -> "DetectorData":
        instances = [Path(p) for p in instances or []]
        if not instances:
            raise DatasetError("--instances is required: COCO instances JSON with the training annotations")
        if dataset is not None:
            ds = load_dataset(dataset, image_root, instances=instances, check_images=False)
            by_split = {s: [r for r in ds.records if r.split == s] for s in ("train", "val")}
            if not by_split["train"]:
                raise DatasetError(f"{dataset}: no image in the train split")
            return cls(by_split["train"], by_split["val"], ds.image_root, ds.image_root, list(ds.classes), instances)
        train, classes = _records_from_instances(instances, "train")
        val, val_classes = _records_from_instances(val_instances or [], "val")
        if val and val_classes != classes:
            raise DatasetError(f"{val_instances[0]}: categories differ from those of {instances[0]}")
        root = Path(image_root) if image_root is not None else instances[0].parent
        return cls(train, val, root, Path(val_image_root) if val_image_root else root, classes,
                   list(val_instances or []))

    def describe(self) -> dict:
        return {"train_images": len(self.train), "val_images": len(self.val), "classes": self.classes,
                "train_root": str(self.train_root), "val_root": str(self.val_root),
                "gt_files": [str(p) for p in self.gt_files]}


def _records_from_instances(files: list[Path], split: str) -> tuple[list[ImageRecord], list[str] | None]:
    """One record per image listed in the instances files, annotations attached (validated there)."""
    records: list[ImageRecord] = []
    for f in files:
        try:
            images = json.loads(Path(f).read_text()).get("images", [])
        except (OSError, ValueError, AttributeError) as e:
            raise DatasetError(f"{f}: cannot read COCO instances JSON ({e})") from None
        for i, img in enumerate(images):
            if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or not isinstance(img.get("id"), int):
                raise DatasetError(f"{f}: images[{i}]: needs integer 'id' and string 'file_name'")
            records.append(ImageRecord(str(img["id"]), img["file_name"], split, (), (), img.get("height"),
                                       img.get("width"), coco_id=img["id"]))
    if not files:
        return [], None
    return _attach_instances(records, files, [])


def gt_image_ids(records: list[ImageRecord], gt_files: list[Path]) -> list[int]:
    """The COCO image id of each record in the ground-truth files (by COCO id, else by file name)."""
    by_name: dict[str, int] = {}
    for f in gt_files:
        for img in json.loads(Path(f).read_text())["images"]:
            by_name.setdefault(Path(img["file_name"]).name, img["id"])
    out = []
    for r in records:
        iid = r.coco_id if r.coco_id is not None else by_name.get(Path(r.path).name)
        if iid is None:
            raise DatasetError(f"image {r.id} ({r.path}): not in the instances files {[str(f) for f in gt_files]}")
        out.append(int(iid))
    return out


def targets(record: ImageRecord, height: int, width: int) -> dict[str, torch.Tensor]:
    """Mask R-CNN targets of one image: boxes xyxy, labels 1..K, masks (n, H, W) uint8.

    Crowd annotations and boxes of zero width or height are left out (torchvision's reference does the
    same). A segmentation whose size disagrees with the decoded image is an error naming the image.
    """
    boxes, labels, masks = [], [], []
    for a in record.annotations or ():
        if a.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in a["bbox"])
        x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x1 <= x0 or y1 <= y0:
            continue
        boxes.append((x0, y0, x1, y1))
        labels.append(int(a["category_id"]) + 1)
        masks.append(_decode_mask(a.get("segmentation"), height, width, record))
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8),
    }


def _decode_mask(seg, height: int, width: int, record: ImageRecord) -> np.ndarray:
    where = f"image {record.id} ({record.path})"
    if seg is None or (isinstance(seg, list) and not seg):
        raise DatasetError(f"{where}: an annotation has no segmentation (Mask R-CNN needs masks)")
    if isinstance(seg, dict) and list(seg.get("size", [])) != [height, width]:
        raise DatasetError(f"{where}: mask size {seg.get('size')} differs from the decoded image {height}x{width}")
    try:
        if isinstance(seg, dict) and isinstance(seg.get("counts"), str):
            rle = seg  # compressed RLE, as pycocotools' COCO.annToRLE takes it
        else:  # polygons or uncompressed RLE
            rle = mask_utils.frPyObjects(seg, height, width)
            rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        return mask_utils.decode(rle).astype(np.uint8)
    except Exception as e:  # pycocotools raises TypeError/ValueError on malformed polygons or counts
        raise DatasetError(f"{where}: malformed segmentation ({type(e).__name__}: {e})") from None


def hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """Horizontal flip of a (3, H, W) image and its boxes and masks."""
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    return image.flip(-1), dict(target, boxes=boxes, masks=target["masks"].flip(-1))


class DetectionDataset(torch.utils.data.Dataset):
    """``(image (3,H,W) float in [0,1], target)`` per record; ``flip(index, epoch) -> bool`` decides the
    horizontal flip, so that a resumed run flips exactly the images an uninterrupted one would."""

    def __init__(self, records: list[ImageRecord], root: Path, flip=None):
        self.records, self.root, self.flip = records, Path(root), flip
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        rec = self.records[index]
        try:
            arr = load_image(self.root / rec.path)
            target = targets(rec, arr.shape[0], arr.shape[1])
        except (BadImageError, DatasetError) as e:
            # handed to the main process as data: an exception from a loader worker reaches the user
            # wrapped in a multi-line traceback; :func:`raise_bad_samples` makes it one line there
            return None, {"error": f"image {rec.id}: {e}"}
        image = torch.from_numpy(np.array(arr, order="C")).permute(2, 0, 1).float().div_(255)
        if self.flip is not None and self.flip(index, self.epoch):
            image, target = hflip(image, target)
        target["index"] = torch.tensor(index)
        return image, target


def with_targets(records: list[ImageRecord]) -> list[ImageRecord]:
    """The records that have at least one usable (non-crowd) annotation."""
    return [r for r in records if any(not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0
                                      for a in r.annotations or ())]


def aspect_groups(records: list[ImageRecord], root: Path) -> list[int]:
    """0 for landscape (w >= h), 1 for portrait, from the records' sizes (or the image header)."""
    from PIL import Image

    out = []
    for r in records:
        h, w = r.height, r.width
        if h is None or w is None:
            try:
                with Image.open(root / r.path) as im:  # header only; EXIF rotation does not matter for grouping
                    w, h = im.size
            except Exception:  # noqa: BLE001 - a bad image is reported, naming it, when it is loaded
                w, h = 1, 1
        out.append(0 if w >= h else 1)
    return out


def grouped_batches(groups: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: a seeded shuffle, each batch drawn from one aspect-ratio group (as the
    reference's ``GroupedBatchSampler``), so padding to a common size wastes little; leftovers of each
    group end the epoch. A pure function of (groups, batch_size, seed, epoch): resumable by position."""
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    buckets: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for i in order.tolist():
        b = buckets.setdefault(groups[i], [])
        b.append(i)
        if len(b) == batch_size:
            batches.append(list(b))
            b.clear()
    batches += [b for b in buckets.values() if b]
    return batches


def collate(batch):
    return tuple(zip(*batch))


def raise_bad_samples(targets) -> None:
    """The first sample that could not be read, as one clear error naming the image and why."""
    for t in targets:
        if "error" in t:
            raise DatasetError(t["error"] + " (fix or remove it from the annotations; the run resumes from "
                               "its last checkpoint)")
