"""SLAN behind the matching protocol (seed 003; METHODS §9): :class:`SlanMatch` — batch -> network
inputs, loss terms, ITC queue update, all-pairs scoring, box localisation of matched words and its figures.
The network is ``slan_network.SLAN``, its losses ``slan_losses``, the self-locator ablation ``slan_ablation``.

``vlcache train match --model slan`` trains :class:`~vlcache.stages.match.slan_network.SLAN` with the matching
loop (``train``): a batch (``data``, text ``bert``, visual ``grid``) carries the stored grid feature map
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

"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...storage.masks import region_inside_fraction
from ..common.distributed import all_gather_cat
from .data import pair_batch
from .protocol import MatchModel, attention_scores, report_number
from .slan_losses import slan_objective
from .slan_network import SLAN

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


# ------------------------------------------------------------------------------------ the protocol


class SlanMatch(MatchModel):
    """SLAN in the matching loop (``protocol.MatchModel``): BERT text and the grid map in; ITC + ITM +
    L_reg (``slan_losses.slan_objective``) with the ITC queue (a buffer of the network, so checkpoints
    keep it) filled after every step; evaluation adds each matched word's box before/after adaptation."""

    name, text, visual, network = "slan", "bert", "grid", SLAN

    def check_config(self, cfg) -> None:
        if cfg.slan_ratios is not None and len(cfg.slan_ratios) != cfg.slan_levels:
            raise ValueError(f"slan_ratios needs one ratio per level: slan_levels={cfg.slan_levels}, "
                             f"slan_ratios={cfg.slan_ratios}")

    def network_args(self, cfg, visual_dim: int, vocab_size: int, text_dim: int) -> dict:
        return dict(grid_dim=visual_dim, text_dim=text_dim, d=cfg.d, levels=cfg.slan_levels,
                    ratios=None if cfg.slan_ratios is None else [float(r) for r in cfg.slan_ratios], K=cfg.slan_k,
                    max_regions=cfg.slan_regions, threshold=cfg.slan_threshold, pool=cfg.slan_pool,
                    samples=cfg.slan_samples, box_grad=cfg.slan_box_grad, queue_size=cfg.slan_queue,
                    tau=cfg.slan_tau, offset_tau=cfg.slan_offset_tau)

    def visual_width(self, args: dict) -> int:
        return int(args["grid_dim"])

    def unused_parameters(self, net) -> bool:
        # 0 adaptor levels: the per-level log_pw/log_ph/log_offset_tau are empty, kept so checkpoints of
        # every level count share one layout
        return net.net.levels == 0

    @staticmethod
    def _attention(s: dict, vm: torch.Tensor) -> dict:
        # Words as first embedded, regions RoIAligned at the detector boxes, weights of the last Eq. 1 level
        # (0 on regions the filter dropped).
        return dict(query=s["word_embed"], values=s["region_embed"], weights=s["attn"],
                    scores=attention_scores(s["attn"], vm), value_mask=vm)

    def forward(self, net, batch: dict, attention: bool) -> dict:
        s = slan_forward(net, batch, all_pairs=True)
        vm = batch["region_mask"][batch["txt_img"]]
        return {"sim": s["sim"], "slan": s, **(self._attention(s, vm) if attention else {})}

    def attention(self, net, batch: dict) -> dict:
        s = slan_forward(net, batch, all_pairs=False)
        return {**self._attention(s, batch["region_mask"][batch["txt_img"]]), "slan": s}

    def objective(self, net, out: dict, batch: dict, cfg, generator: torch.Generator | None) -> dict:
        return slan_terms(out, batch, cfg, None if net is None else net.net.queue, generator)

    def after_step(self, net, out: dict, batch: dict) -> None:
        after_step(net, out, batch)

    def similarity(self, net, data: dict, device, rerank_top: int = 0, block: int = 1024) -> dict:
        return {"sim": slan_similarity(net, data, device, block)}

    def evaluate_words(self, net, data: dict, has: torch.Tensor, device, store, cfg, figures: int) -> dict:
        # the same weights, plus each word's highest-matching region before/after adaptation
        boxes = word_boxes(net, data, data["match_txt"][has], data["match_pos"][has], device)
        loc = localisation(store, data, has.nonzero().squeeze(1), boxes, cfg.ica_score_threshold, keep_masks=figures)
        return {"weights": boxes["weights"], "scores": loc["summary"], "boxes": boxes, "localisation": loc}

    def figures(self, run, image_of, data: dict, has: torch.Tensor, words: dict, limit: int, split: str) -> list[Path]:
        return box_figures(run, image_of, data, has.nonzero().squeeze(1), words["boxes"], words["localisation"],
                           limit, split)

    def report_lines(self, scores: dict, config: dict) -> list[str]:
        if "box_inside_after" not in scores:
            return []
        fmt = report_number
        return ["## SLAN: the word's highest-matching region before / after adaptation (METHODS §9)", "",
                "| box | inside mask | box-mask IoU |", "|---|---|---|",
                f"| detector (before) | {fmt(scores['box_inside_before'])} | {fmt(scores['box_iou_before'])} |",
                f"| adapted (after) | {fmt(scores['box_inside_after'])} | {fmt(scores['box_iou_after'])} |", "",
                f"{scores['box_words']} words; the filter kept {fmt(scores['kept_regions'])} regions per pair on "
                f"average; {fmt(scores['box_moved'] and 100 * scores['box_moved'])}% of the words' boxes moved by more than half a pixel.",
                ""]

    def config_lines(self, config: dict) -> list[str]:
        return [f"- SLAN: {config.get('slan_levels')} adaptor levels (ratios {config.get('slan_ratios') or 'default'}), "
                f"K {config.get('slan_k')}, at most T = {config.get('slan_regions')} regions, threshold "
                f"{config.get('slan_threshold')}, d {config.get('d')}, queue {config.get('slan_queue')}, "
                f"ITC/ITM/reg weights {config.get('w_itc')}/{config.get('w_itm')}/{config.get('w_reg')}"]

