"""Retrieval metrics for image-text matching (METHODS §10): Recall@K both ways, rsum, COCO 1K/5K.

Ranks (0-based) are *pessimistic about ties*: a wrong item that scores exactly as high as the right
one is counted ahead of it. So

- text -> image: rank = number of wrong images scoring >= the right image's score;
- image -> text: rank = number of wrong captions scoring >= the best of the image's own captions
  (the best-ranked of its captions counts; images may have any number of captions >= 1).

A query is recalled at K when its rank < K. Recalls are percentages; rsum is the sum of all six (or
however many ``ks`` give). A constant similarity matrix therefore scores 0, never a lucky 100.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _as_inputs(sim, txt_to_img) -> tuple[torch.Tensor, torch.Tensor]:
    sim = torch.as_tensor(np.asarray(sim) if not torch.is_tensor(sim) else sim)
    t2i = torch.as_tensor(np.asarray(txt_to_img) if not torch.is_tensor(txt_to_img) else txt_to_img)
    if sim.dim() != 2:
        raise ValueError(f"similarity must be (n_img, n_txt), got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    if t2i.shape != (n_txt,):
        raise ValueError(f"txt_to_img must have one image index per caption ({n_txt}), got shape {tuple(t2i.shape)}")
    if not sim.is_floating_point():
        sim = sim.double()
    if torch.isnan(sim).any():
        i, t = torch.isnan(sim).nonzero()[0].tolist()
        raise ValueError(f"similarity has NaN (first at image {i}, caption {t})")
    t2i = t2i.long().to(sim.device)
    if n_txt and (int(t2i.min()) < 0 or int(t2i.max()) >= n_img):
        raise ValueError(f"txt_to_img has image indices outside [0, {n_img})")
    counts = torch.bincount(t2i, minlength=n_img)
    if (counts == 0).any():
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption: image->text recall is undefined")
    return sim, t2i


def ranks_i2t(sim, txt_to_img, chunk: int = 1024) -> torch.Tensor:
    """0-based pessimistic rank of each image's best-ranked own caption -> ``(n_img,)``."""
    sim, t2i = _as_inputs(sim, txt_to_img)
    out = []
    for s in range(0, sim.shape[0], chunk):
        block = sim[s:s + chunk]
        own = t2i[None, :] == torch.arange(s, s + block.shape[0], device=sim.device)[:, None]
        best = block.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
        out.append(((block >= best) & ~own).sum(1))
    return torch.cat(out).cpu()


def ranks_t2i(sim, txt_to_img, chunk: int = 4096) -> torch.Tensor:
    """0-based pessimistic rank of each caption's own image -> ``(n_txt,)``."""
    sim, t2i = _as_inputs(sim, txt_to_img)
    out = []
    for s in range(0, sim.shape[1], chunk):
        block = sim[:, s:s + chunk]
        own = block.gather(0, t2i[None, s:s + chunk])  # (1, c)
        out.append((block >= own).sum(0) - 1)  # the own image is >= itself exactly once
    return torch.cat(out).cpu()


def recall_at_k(sim, txt_to_img, ks: Sequence[int] = (1, 5, 10), sim_t2i=None) -> dict[str, float]:
    """Recall@K (percent) both ways from ``sim (n_img, n_txt)``; ``txt_to_img[t]`` = caption t's image.

    ``sim_t2i``: optional separate matrix to rank images for each caption (shortlist-and-rerank gives
    one per direction); default ``sim``. Returns ``i2t_r{k}``, ``t2i_r{k}``, ``rsum``, and the 1-based
    median ranks ``i2t_medr``, ``t2i_medr`` (:func:`median_rank`).
    """
    r_i2t = ranks_i2t(sim, txt_to_img)
    r_t2i = ranks_t2i(sim if sim_t2i is None else sim_t2i, txt_to_img)
    out: dict[str, float] = {}
    for name, ranks in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * float((ranks < k).double().mean())
    out["rsum"] = sum(out.values())
    out["i2t_medr"] = median_rank(r_i2t)
    out["t2i_medr"] = median_rank(r_t2i)
    return out


def median_rank(ranks) -> float:
    """1-based median rank as SCAN's/VSE++'s evaluation code computes it: ``floor(median(ranks)) + 1``
    over 0-based ranks, the median of an even count being the mean of the two middle ranks (numpy's)."""
    ranks = np.asarray(ranks.cpu() if torch.is_tensor(ranks) else ranks, dtype=np.float64)
    return float(np.floor(np.median(ranks))) + 1.0 if ranks.size else float("nan")


def coco_1k_5k(sim, txt_to_img, ks: Sequence[int] = (1, 5, 10), fold_size: int = 1000, sim_t2i=None) -> dict:
    """COCO protocol: ``"1k"`` = metrics averaged over consecutive folds of ``fold_size`` images (with
    their captions), ``"5k"`` = metrics on the whole set, ``"folds"`` = each fold's metrics."""
    sim, t2i = _as_inputs(sim, txt_to_img)
    n_img = sim.shape[0]
    if fold_size < 1 or n_img % fold_size:
        raise ValueError(f"{n_img} images do not split into folds of {fold_size} (COCO 5K test: 5 x 1000)")
    other = None if sim_t2i is None else _as_inputs(sim_t2i, txt_to_img)[0]
    folds = []
    for f in range(n_img // fold_size):
        lo, hi = f * fold_size, (f + 1) * fold_size
        cols = ((t2i >= lo) & (t2i < hi)).nonzero().squeeze(1)
        sub = lambda m: None if m is None else m[lo:hi][:, cols]  # noqa: E731
        folds.append(recall_at_k(sub(sim), t2i[cols] - lo, ks, sim_t2i=sub(other)))
    mean = {k: float(np.mean([fo[k] for fo in folds])) for k in folds[0]}
    return {"1k": mean, "5k": recall_at_k(sim, t2i, ks, sim_t2i=other), "folds": folds}


def rerank_report(exact_metrics: dict, rerank_metrics: dict) -> dict:
    """How far shortlist-and-rerank is from exact scoring: for each metric both share,
    ``{"exact", "rerank", "diff" = rerank - exact}``, plus ``max_abs_diff`` over the recalls and rsum.
    Nested dicts (e.g. the output of :func:`coco_1k_5k`) are compared key by key."""
    report: dict = {}
    worst = 0.0
    for key in exact_metrics:
        if key not in rerank_metrics:
            continue
        e, r = exact_metrics[key], rerank_metrics[key]
        if isinstance(e, dict):
            sub = rerank_report(e, r)
            report[key] = sub
            worst = max(worst, sub["max_abs_diff"])
        elif isinstance(e, (int, float)):
            report[key] = {"exact": float(e), "rerank": float(r), "diff": float(r) - float(e)}
            if "_r" in key or key == "rsum":
                worst = max(worst, abs(float(r) - float(e)))
    report["max_abs_diff"] = worst
    return report
