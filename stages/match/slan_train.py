"""SLAN in the matching pipeline (seed 003; METHODS §9): batch -> model inputs, loss terms, ITC queue
update, all-pairs scoring, box localisation of matched words, figures and the self-locator ablation.

``vlcache train match --model slan`` trains :class:`~vlcache.stages.match.slan.SLAN` with the matching
loop (``match_train``): a batch (``match_data``, kind ``slan``) carries the stored grid feature map
``grid (B, G*G, D_g)``, the image sizes ``hw`` (``images/hw``, which map pixel boxes onto the grid per
axis), the detector boxes ``region_boxes``/``region_mask`` (``regions/boxes``) and the captions' frozen
BERT outputs ``words``/``word_mask`` (the text cache, or BERT online). Caption p is paired with image
``txt_img[p]``; ITC treats texts of the same store row as positives, in the batch and in the queue.
Under torchrun the queue receives every rank's pairs (all-gathered), so it is the same on all ranks.

Grid resolution: SLAN re-pools regions and K x K sub-regions from the grid map, so a coarse map makes
every box look alike: it wants G >= 7. Extract with ``vlcache extract ... --set features.grid_size=G``
and ``--set features.input_size=32*G`` or more (the ResNet C5 map is input/32 per side and is
adaptive-average-pooled to G x G, which only repeats cells when the map is smaller than G). The
defaults (input 448, G = 14) suit SLAN. The synthetic ablation used G = 7 from 224-pixel inputs (96 x 96
images); the tests use G = 7 from 128-pixel inputs (a 4 x 4 map, repeated: enough to exercise the code).

Evaluation adds, per matched word with a reference (the word's merged mask, METHODS §8), its
*highest-matching region*: the kept region with the largest word -> region weight of the last Eq. 1
level (pooled over the word's BERT pieces), its detector box (before adaptation) and adapted box
(after). Localisation before/after (ours): the fraction of the box inside the merged mask (the §8
reference rule) and the box-mask IoU (inside area / union), averaged over words. Figures draw both
boxes over the image with the merged mask.

Ablation (:func:`run_slan_ablation`, seed 003 Tables 5-6): frozen boxes (0 adaptor levels) vs 1, 2, 3
levels, and 3 levels without the filter threshold (the top T by saliency), each with the same seeds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from ...storage.masks import region_inside_fraction
from ..common.distributed import all_gather_cat
from .data import pair_batch
from .slan_losses import slan_objective

# ------------------------------------------------------------------------------------ model inputs


def slan_forward(net, batch: dict, all_pairs: bool = True) -> dict:
    """SLAN's outputs for the batch's (caption p, image ``txt_img[p]``) pairs; ``net`` a ``MatchNet`` of
    kind slan (its ``regions`` standardises the grid features). ``all_pairs``: ``sim (P, P)`` (row = image
    of caption p, column = caption) and ``itm_logits (P, P, 2)`` for every pair, as the loss needs."""
    ti = batch["txt_img"]
    grid = net.regions(batch["grid"])[ti]
    return net.net(grid, batch["hw"][ti], batch["region_boxes"][ti], batch["region_mask"][ti], batch["words"],
                   batch["word_mask"], all_pairs=all_pairs)


def image_ids(batch: dict) -> torch.Tensor:
    """Store row of each caption's image: ITC's positives (same row = same image), in batch and queue."""
    return batch["rows"][batch["txt_img"]]


def slan_terms(out: dict, batch: dict, cfg, queue=None, generator: torch.Generator | None = None) -> dict:
    """``{"loss", "itc", "itm", "reg"}``: ``slan_losses.slan_objective`` (seed 003 Eqs. 3-6) on the raw
    outputs ``out["slan"]`` with the config's weights ``w_itc``, ``w_itm``, ``w_reg``."""
    s = out["slan"]
    return slan_objective(s, queue, image_ids=image_ids(batch).to(s["sim"].device), generator=generator,
                          w_itc=cfg.w_itc, w_itm=cfg.w_itm, w_reg=cfg.w_reg)


def after_step(net, out: dict, batch: dict) -> None:
    """Push the step's matched-pair embeddings into the ITC queue (after the optimizer step, so the
    loss of this step saw only earlier batches). Under DDP every rank calls it: the embeddings and
    image ids of all ranks are all-gathered (rank order, no gradient) and pushed on every rank, as
    ALBEF does, so the queues stay identical and hold the whole global batch. Image ids are store rows,
    so a queued entry from another rank is a positive exactly when it shows the same image."""
    s = out["slan"]
    ids = image_ids(batch).to(s["img_embed"].device)
    net.net.queue.enqueue(all_gather_cat(s["img_embed"]), all_gather_cat(s["txt_embed"]), all_gather_cat(ids))


@torch.no_grad()
def slan_similarity(net, data: dict, device, block: int = 1024) -> torch.Tensor:
    """S for every (image, caption) pair of a split batch (``load_split``) -> ``(n_img, n_txt)`` on CPU.
    Grid features are standardised in chunks and kept on the CPU; ``score_matrix`` moves its blocks."""
    grid = torch.cat([net.regions(data["grid"][s:s + 256].to(device)).cpu() for s in range(0, len(data["grid"]), 256)])
    return net.net.score_matrix(grid, data["hw"], data["region_boxes"], data["region_mask"], data["words"],
                                data["word_mask"], block=block).cpu()


# ------------------------------------------------------------------------------ matched-word boxes


@torch.no_grad()
def word_boxes(net, data: dict, txt: torch.Tensor, pos: torch.Tensor, device, chunk: int = 128) -> dict:
    """Per query (caption ``txt (n,)`` with its own image, positions ``pos (n, L)``): ``weights (n, R)``
    word -> region attention over the image's regions, ``region (n,)`` the highest-matching kept region
    (index into the image's regions), ``before``/``after (n, 4)`` its detector and adapted boxes (pixels),
    ``kept (n,)`` how many regions the filter kept for that pair. Eval mode."""
    net.eval()
    n, R = len(txt), data["region_mask"].shape[1]
    out = {"weights": torch.zeros(n, R), "region": torch.zeros(n, dtype=torch.long), "before": torch.zeros(n, 4),
           "after": torch.zeros(n, 4), "kept": torch.zeros(n, dtype=torch.long)}
    for s in range(0, n, chunk):
        sub, inv = pair_batch(data, txt[s:s + chunk], device)
        r = {k: v.cpu() for k, v in slan_forward(net, sub, all_pairs=False).items() if torch.is_tensor(v)}
        p = pos[s:s + chunk].float()
        L = r["attn"].shape[1]
        p = p[:, :L]
        keep = r["keep"][inv]
        wk = torch.einsum("nl,nlt->nt", p, r["attn_kept"][inv].float()).masked_fill(~keep, -1.0)
        t = wk.argmax(1)
        k = torch.arange(len(t))
        out["weights"][s:s + chunk] = torch.einsum("nl,nlr->nr", p, r["attn"][inv].float())
        out["region"][s:s + chunk] = r["keep_idx"][inv][k, t]
        out["before"][s:s + chunk] = r["boxes_before"][inv][k, t].float()
        out["after"][s:s + chunk] = r["boxes_after"][inv][k, t].float()
        out["kept"][s:s + chunk] = keep.sum(1)
    return out


def box_mask_scores(boxes: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(inside, iou)`` of pixel boxes ``(n, 4)`` against one bool ``mask (H, W)``: the fraction of each
    box inside the mask (METHODS §8's rule) and inside area / (box area + mask area - inside area)."""
    inside = np.asarray(region_inside_fraction(np.asarray(boxes, np.float32), mask), np.float64)
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    inter = inside * area
    union = area + float(mask.sum()) - inter
    return inside, np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def localisation(store, data: dict, idx: torch.Tensor, boxes: dict, score_threshold: float = 0.5,
                 keep_masks: int = 0) -> dict:
    """Box localisation of matched words ``data["match_*"][idx]`` (module doc) from :func:`word_boxes`
    output ``boxes`` (same order): per word ``inside_before/after``, ``iou_before/after`` (numpy); means
    in ``summary``; ``masks`` {k: merged mask} for the first word of the first ``keep_masks`` distinct
    images (what :func:`box_figures` draws). ``store``: the run's store (``open_store``), for the masks."""
    per = {k: np.zeros(len(idx)) for k in ("inside_before", "inside_after", "iou_before", "iou_after")}
    masks, memo = {}, {}
    for k, j in enumerate(idx.tolist()):
        t = int(data["match_txt"][j])
        row, cap = int(data["rows"][data["txt_img"][t]]), int(data["caption"][t])
        key = (row, int(data["match_class"][j]))
        if key not in memo:  # one image's captions often name the same class; keep one image's masks only
            memo = {k2: v for k2, v in memo.items() if k2[0] == row}
            memo[key] = store.merged_mask(row, cap, int(data["match_tok"][j, 0]), score_threshold=score_threshold)
        if len(masks) < keep_masks and all(m_row != row for m_row, _ in masks.values()):
            masks[k] = (row, memo[key])
        both = np.stack([boxes["before"][k].numpy(), boxes["after"][k].numpy()]).astype(np.float32)
        inside, iou = box_mask_scores(both, memo[key])
        per["inside_before"][k], per["inside_after"][k] = inside
        per["iou_before"][k], per["iou_after"][k] = iou
    summary = {f"box_{k}": float(v.mean()) if len(v) else float("nan") for k, v in per.items()}
    summary["box_words"] = len(idx)
    summary["kept_regions"] = float(boxes["kept"].float().mean()) if len(idx) else float("nan")
    summary["box_moved"] = float((boxes["after"] - boxes["before"]).abs().sum(1).gt(0.5).float().mean()) \
        if len(idx) else float("nan")
    return {**per, "masks": {k: m for k, (_, m) in masks.items()}, "summary": summary}


# ------------------------------------------------------------------------------------------ figures


def box_figure(image: np.ndarray, before: np.ndarray, after: np.ndarray, mask: np.ndarray | None, title: str):
    """A matplotlib Figure (no pyplot): the image, the word's merged mask tinted and outlined in green, its
    highest-matching region's detector box (cyan, dashed) and adapted box (red, solid), an arrow between
    their centres."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, Rectangle

    h, w = image.shape[:2]
    fig = Figure(figsize=(4.2, 4.2 * h / w + 0.7), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image)
    if mask is not None and mask.any():
        tint = np.zeros((*mask.shape, 4), np.float32)
        tint[mask] = (0.1, 0.9, 0.2, 0.35)
        ax.imshow(tint)
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[(0.2, 1.0, 0.2)], linewidths=1.2)
    for box, colour, style, label in ((before, (0.1, 0.9, 1.0), "--", "before"), (after, (1.0, 0.15, 0.1), "-", "after")):
        x1, y1, x2, y2 = (float(v) for v in box)
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, ls=style, lw=2, label=label))
    c0 = ((before[0] + before[2]) / 2, (before[1] + before[3]) / 2)
    c1 = ((after[0] + after[2]) / 2, (after[1] + after[3]) / 2)
    if np.hypot(c1[0] - c0[0], c1[1] - c0[1]) > 0.5:
        ax.add_patch(FancyArrowPatch(c0, c1, arrowstyle="->", mutation_scale=10, color="white", lw=1.2))
    ax.legend(loc="lower right", fontsize=6, framealpha=0.6)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def box_figures(run, image_of, data: dict, idx: torch.Tensor, boxes: dict, loc: dict, limit: int,
                split: str) -> list[Path]:
    """``figures/slan_boxes_<split>_row<row>.png`` for the first matched word of up to ``limit`` distinct
    images; ``image_of(row)`` -> HxWx3 uint8 array."""
    seen, paths = set(), []
    for k, j in enumerate(idx.tolist()):
        t = int(data["match_txt"][j])
        row = int(data["rows"][data["txt_img"][t]])
        if row in seen or len(paths) >= limit:
            continue
        seen.add(row)
        cs, ce = (int(v) for v in data["match_char"][j])
        text = data["texts"][t]
        title = (f"row {row}: '{text[cs:ce]}'  inside {loc['inside_before'][k]:.2f} -> {loc['inside_after'][k]:.2f}, "
                 f"IoU {loc['iou_before'][k]:.2f} -> {loc['iou_after'][k]:.2f}\n{text}")
        fig = box_figure(image_of(row), boxes["before"][k].numpy(), boxes["after"][k].numpy(), loc["masks"].get(k),
                         title)
        path = run.figures / f"slan_boxes_{split}_row{row:06d}.png"
        paths.append(run.save_figure(fig, path))
    return paths


# ----------------------------------------------------------------------------------------- ablation

SLAN_VARIANTS = {
    "frozen boxes (L=0)": {"slan_levels": 0},
    "adaptor L=1": {"slan_levels": 1},
    "adaptor L=2": {"slan_levels": 2},
    "adaptor L=3": {"slan_levels": 3},
    "L=3, no threshold (top T)": {"slan_levels": 3, "slan_threshold": None},
}
SLAN_METRICS = ["i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum", "attn_precision", "attn_recall", "attn_f1",
                "box_inside_before", "box_inside_after", "box_iou_before", "box_iou_after", "kept_regions"]
SLAN_LABELS = {"i2t_r1": "i→t R@1", "i2t_r5": "i→t R@5", "t2i_r1": "t→i R@1", "t2i_r5": "t→i R@5", "rsum": "rsum",
               "box_inside_before": "inside before", "box_inside_after": "inside after",
               "box_iou_before": "IoU before", "box_iou_after": "IoU after", "kept_regions": "kept"}
# Small enough for a CPU: the ablation's defaults (any can be overridden by options/overrides).
ABLATION_DEFAULTS = dict(epochs=4, batch_size=12, lr=1e-3, lr_decay_epoch=3, d=64, region_norm=True,
                         slan_regions=6, slan_samples=1, slan_queue=256, val_max_images=16, device="cpu",
                         log_every=20)


def run_slan_ablation(store: str, seeds: int = 3, *, name: str = "slan-ablation", runs_root="runs",
                      config_file=None, options: dict | None = None, overrides: list[str] | None = None,
                      split: str = "test", variants: dict | None = None, figures: int = 2) -> dict:
    """Seed 003 Tables 5-6 on ``store``: ``SLAN_VARIANTS`` (frozen boxes vs 1/2/3 adaptor levels, and
    threshold off at 3 levels), ``seeds`` seeds each (config seed, +1, ...), trained with ``train_match``
    and evaluated with ``evaluate_match`` on ``split``. Config precedence: ``ABLATION_DEFAULTS`` < built-in
    defaults < ``config_file`` < ``options`` < ``overrides``. The table (mean ± sample std,
    paired Δ against frozen boxes) goes to ``runs_root/name/ablation.md`` and ``ablation.json``; finished
    runs and evaluations are reused, so an interrupted experiment resumes."""
    from ...pipeline.config import load_config
    from .evaluate import ablation_rows, write_ablation
    from .train import MatchTrainConfig

    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    try:  # the ablation's small defaults sit below the config file: leave out what the file sets
        in_file = set(yaml.safe_load(Path(config_file).read_text()) or {}) if config_file else set()
    except (OSError, yaml.YAMLError, TypeError):
        in_file = set()  # load_config reports the bad file
    opts = {**{k: v for k, v in ABLATION_DEFAULTS.items() if k not in in_file},
            **{k: v for k, v in (options or {}).items() if v is not None}, "store": store, "model": "slan"}
    base = load_config(MatchTrainConfig, config_file, opts, overrides)
    variants = variants or SLAN_VARIANTS
    root = Path(runs_root) / name
    root.mkdir(parents=True, exist_ok=True)

    seed_list, rows = ablation_rows(base, variants, seeds, root, split, figures)
    intro = (f"SLAN on `{store}`, split **{split}**, seeds {seed_list}; mean ± sample std over seeds; Δ = paired "
             "per-seed difference against frozen boxes. Recalls in %; attention P/R/F1 of the word -> region "
             "attention against the pseudo reference (regions >= 50% inside the word's merged mask, METHODS §8); "
             "inside/IoU before/after: the word's highest-matching kept region's detector box and adapted box "
             "against its merged mask (fraction of the box inside it; box-mask IoU); kept: regions the filter "
             "kept per (image, caption) pair.")
    shared = (f"epochs {base.epochs}, batch {base.batch_size}, lr {base.lr} (×{base.lr_decay} from epoch "
              f"{base.lr_decay_epoch}), d {base.d}, K {base.slan_k}, T {base.slan_regions}, h {base.slan_threshold}, "
              f"pool {base.slan_pool}, samples {base.slan_samples}, queue {base.slan_queue}, captions/step "
              f"{base.captions}, region_norm {base.region_norm}, validation on the first {base.val_max_images or 'all'} "
              f"{base.val_split} images")
    return write_ablation(root, "SLAN self-locator ablation", intro, shared, base=base, store=store, model="slan",
                          split=split, seed_list=seed_list, variants=variants, rows=rows, metrics=SLAN_METRICS,
                          labels=SLAN_LABELS)
