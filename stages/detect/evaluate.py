"""``vlcache evaluate detector``: COCO bbox and segm AP with pycocotools' own COCOeval.

Predictions are the model's full output (``model.eval()``: boxes in original pixels, masks pasted to
the image and thresholded at 0.5, as torchvision's reference ``evaluate`` does), written as a COCO
results file; the ground truth is the instances file(s) as given, restricted to the evaluated images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

from ...pipeline.records import ImageRecord
from .data import gt_image_ids

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def load_gt(gt_files: list[Path]):
    """One pycocotools ``COCO`` over the given instances files (one file: exactly ``COCO(file)``)."""
    from pycocotools.coco import COCO

    if len(gt_files) == 1:
        return _quiet(COCO, str(gt_files[0]))
    merged: dict = {"images": [], "annotations": [], "categories": None}
    for f in gt_files:
        d = json.loads(Path(f).read_text())
        merged["images"] += d["images"]
        merged["annotations"] += d["annotations"]
        merged["categories"] = merged["categories"] or d["categories"]
    gt = COCO()
    gt.dataset = merged
    _quiet(gt.createIndex)
    return gt


def _quiet(fn, *args):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@torch.inference_mode()
def predict(model, records: list[ImageRecord], root: Path, image_ids: list[int], category_ids: list[int],
            device: torch.device, batch_size: int = 2) -> list[dict]:
    """COCO results (bbox xywh, score, category_id, RLE segmentation) for ``records``."""
    from ...storage.images import load_image

    model.eval()
    out: list[dict] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        images = [torch.from_numpy(np.array(load_image(Path(root) / r.path), order="C")).permute(2, 0, 1)
                  .float().div_(255).to(device) for r in chunk]
        for res, iid in zip(model(images), image_ids[start:start + batch_size]):
            boxes = res["boxes"].float().cpu().numpy()
            masks = (res["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
            for b, s, lab, rle in zip(boxes, res["scores"].tolist(), res["labels"].tolist(), rles):
                rle["counts"] = rle["counts"].decode("ascii")
                out.append({"image_id": int(iid), "category_id": int(category_ids[lab - 1]),
                            "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                            "score": float(s), "segmentation": rle})
    return out


def coco_scores(gt, results: list[dict], image_ids: list[int]) -> dict:
    """COCOeval bbox and segm over ``image_ids``: {"bbox_AP": ..., "segm_AP50": ..., ...}."""
    from pycocotools.cocoeval import COCOeval

    scores: dict = {}
    for iou_type in ("bbox", "segm"):
        if results:
            dt = _quiet(gt.loadRes, [dict(r) for r in results])
            ev = COCOeval(gt, dt, iou_type)
            ev.params.imgIds = sorted(set(image_ids))
            _quiet(ev.evaluate)
            _quiet(ev.accumulate)
            _quiet(ev.summarize)
            stats = ev.stats.tolist()
        else:  # pycocotools cannot load an empty result list; nothing detected scores 0
            stats = [0.0] * len(STAT_NAMES)
        scores.update({f"{iou_type}_{n}": float(v) for n, v in zip(STAT_NAMES, stats)})
    return scores


def category_ids(gt) -> list[int]:
    """Category ids in label order (label k+1 <-> the k-th category by id, as the data loader numbers them)."""
    return sorted(gt.getCatIds())


def evaluate_model(model, records: list[ImageRecord], root: Path, gt_files: list[Path], device: torch.device,
                   max_images: int | None = None, batch_size: int = 2, results_path: Path | None = None) -> dict:
    records = records[:max_images] if max_images else records
    gt = load_gt(gt_files)
    ids = gt_image_ids(records, gt_files)
    results = predict(model, records, root, ids, category_ids(gt), device, batch_size)
    if results_path is not None:
        Path(results_path).write_text(json.dumps(results))
    return {**coco_scores(gt, results, ids), "images": len(records), "detections": len(results)}


def evaluate_detector(run_dir, split: str = "val", checkpoint: str | None = None, device: str = "cpu",
                      max_images: int | None = None, batch_size: int = 2, score_threshold: float = 0.05) -> dict:
    """Evaluate ``RUN/detector.pt`` (or ``checkpoint``) on the run's validation images; writes
    ``RUN/eval/detections_<split>.json`` and ``RUN/eval/scores_<split>.json``."""
    from ...pipeline.config import from_dict
    from ...pipeline.runs import RunDir
    from .config import DetectorTrainConfig
    from .data import DetectorData
    from ..extract.maskrcnn import checkpoint_meta, model_from_meta
    from ..extract.detectors import load_state_dict

    run = RunDir(run_dir)
    cfg = run.read_config()
    if split != "val":
        raise ValueError(f"split {split!r}: a detector run evaluates on its validation images (val)")
    c = from_dict(DetectorTrainConfig, cfg, str(run.config_path))
    data = DetectorData.load([Path(p) for p in c.instances], Path(c.dataset) if c.dataset else None,
                             Path(c.image_root) if c.image_root else None, [Path(p) for p in c.val_instances],
                             Path(c.val_image_root) if c.val_image_root else None)
    if not data.val:
        raise ValueError(f"{run.path}: the run's data has no validation images")
    path = Path(checkpoint) if checkpoint else run.path / "detector.pt"
    meta = checkpoint_meta(path) if path.is_file() else None
    if meta is None:
        raise ValueError(f"{path}: not a `vlcache train detector` checkpoint (train first, or pass --checkpoint)")
    model = model_from_meta(meta, min_size=meta["min_size"], max_size=meta["max_size"],
                            box_score_thresh=score_threshold)
    model.load_state_dict(load_state_dict(path, "detector"))
    dev = torch.device(device)
    run.eval.mkdir(parents=True, exist_ok=True)
    scores = evaluate_model(model.to(dev), data.val, data.val_root, data.gt_files, dev, max_images=max_images,
                            batch_size=batch_size, results_path=run.eval / f"detections_{split}.json")
    scores["checkpoint"] = str(path)
    (run.eval / f"scores_{split}.json").write_text(json.dumps(scores, indent=2))
    return scores
