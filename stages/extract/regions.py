"""Bottom-up region selection as BUTD's ``tools/generate_tsv.py`` does it (METHODS section 11).

``butd_select`` is the pure function (boxes and class probabilities of every RoI in, chosen RoIs out);
any backend that can score its RoIs with a box head can call it. ``select_regions`` applies it to a
:class:`~.detectors.Detections`: to the RoIs the detector scored (``roi_boxes``/``roi_scores``) when it
gives them, else to its final detections plus its unscored proposals.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .detectors import Detections

# Per-class NMS runs on (RoI, class) pairs scoring at least this much first; the result is exact for
# every RoI whose confidence is >= the floor, and the full computation runs only when fewer such RoIs
# exist than must be chosen (see _kept_confidence).
_SCORE_FLOOR = 0.01


def butd_select(boxes, class_scores, *, conf: float = 0.2, min_regions: int = 10, max_regions: int = 100,
                fixed: int | None = None, nms_iou: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BUTD's region selection over ``n`` RoIs -> (indices (r,), labels (r,) int64, scores (r,) float32).

    ``boxes`` (n, 4) are the RoIs (BUTD keeps the RoI boxes, not the class-regressed ones);
    ``class_scores`` (n, K) their foreground class probabilities (softmax, background column dropped).
    As ``generate_tsv.py``::

        for every class c: keep_c = NMS(boxes, class_scores[:, c], nms_iou)      # 0.3 = cfg.TEST.NMS
        conf_i = max over classes c with i in keep_c of class_scores[i, c]       # 0 if none kept i
        adaptive: {i : conf_i >= conf}; fewer than min_regions -> the top min_regions by conf_i;
                  more than max_regions -> the top max_regions                   # 10..100
        fixed:    the top ``fixed`` by conf_i                                    # 36

    One RoI gives at most one region. Its label is the arg-max of its class probabilities (as BUTD's
    demo and LXMERT's ``objects_id``), -1 for a RoI with no class score at all (an unscored proposal);
    its score is conf_i, the number it was selected by. Returned best first (BUTD keeps index order
    when no cap applies; the set is the same).
    """
    if (fixed is not None and fixed < 1) or min_regions > max_regions or max_regions < 1:
        raise ValueError(f"bad region counts: fixed={fixed}, min_regions={min_regions}, max_regions={max_regions}")
    b, s = _cpu_float(boxes).reshape(-1, 4), _cpu_float(class_scores)
    if s.ndim != 2 or len(s) != len(b):
        raise ValueError(f"class_scores {tuple(s.shape)} must be (n, K) for {len(b)} boxes")
    need = fixed if fixed is not None else min_regions
    confidence = _kept_confidence(b, s, nms_iou, need).numpy()
    order = np.argsort(-confidence, kind="stable")  # ties keep RoI order (RPN proposals come best first)
    if fixed is not None:
        chosen = order[:fixed]
    else:
        passing = int((confidence >= conf).sum())
        chosen = order[: min(max(passing, min_regions), max_regions)]
    row_max, row_arg = s.max(1) if s.shape[1] else (torch.zeros(len(s)), torch.zeros(len(s), dtype=torch.long))
    labels = torch.where(row_max > 0, row_arg, -1).numpy()
    return chosen.astype(np.int64), labels[chosen].astype(np.int64), confidence[chosen].astype(np.float32)


def _kept_confidence(boxes: Tensor, scores: Tensor, iou: float, need: int) -> Tensor:
    """Per RoI: the maximum of its class scores over the classes whose NMS kept it (0 if none).

    Greedy NMS decides a box's fate from higher-scoring boxes only, so running it on the pairs scoring
    >= a floor gives every pair above the floor its exact kept flag; a RoI's confidence is then exact
    when it is >= the floor and 0 otherwise. If fewer than ``need`` RoIs reach the floor, the ranking
    below it matters and all pairs are used.
    """
    n, k = scores.shape
    out = torch.zeros(n)
    if n == 0 or k == 0:
        return out
    for floor in (_SCORE_FLOOR, 0.0):
        roi, cls = torch.nonzero(scores >= floor, as_tuple=True)
        pair_scores = scores[roi, cls]
        kept = batched_nms(boxes[roi], pair_scores, cls, iou)
        out = torch.zeros(n).scatter_reduce(0, roi[kept], pair_scores[kept], reduce="amax")
        if floor == 0.0 or int((out >= floor).sum()) >= min(need, n):
            return out
    return out


def _cpu_float(x) -> Tensor:
    return x.detach().float().cpu() if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x, np.float32))


def region_candidates(det: Detections) -> tuple[np.ndarray, np.ndarray]:
    """(boxes (n,4), class scores (n,K)) that :func:`butd_select` chooses from for one image.

    The RoIs the detector scored when it gives them; otherwise (backends that give final detections
    only, e.g. dataset annotations) each detection scored in its own class, then the proposals with no
    class score: they never pass the confidence threshold and fill the minimum in proposal order.
    """
    if det.roi_scores is not None:
        return det.roi_boxes, det.roi_scores
    k = int(det.labels.max()) + 1 if len(det.labels) else 1
    scores = np.zeros((len(det), k), np.float32)
    scores[np.arange(len(det)), det.labels] = det.scores
    props = det.proposals if det.proposals is not None else np.zeros((0, 4), np.float32)
    return (np.concatenate([det.boxes, props]),
            np.concatenate([scores, np.zeros((len(props), k), np.float32)]))


def select_regions(det: Detections, *, conf: float = 0.2, min_regions: int = 10, max_regions: int = 100,
                   fixed: int | None = None, nms_iou: float = 0.3
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One image's bottom-up regions -> (candidate indices, boxes (r,4) float32, labels, scores).

    The indices point into :func:`region_candidates` (and so into ``det.roi_feats`` when present).
    """
    boxes, scores = region_candidates(det)
    idx, labels, conf_ = butd_select(boxes, scores, conf=conf, min_regions=min_regions, max_regions=max_regions,
                                     fixed=fixed, nms_iou=nms_iou)
    return idx, np.asarray(boxes, np.float32)[idx].reshape(-1, 4), labels, conf_
