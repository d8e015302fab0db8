"""Evaluate a matching run: retrieval (METHODS §10), attention quality (§8), MMCA rerank vs exact (§4),
SLAN box localisation before/after adaptation (§9).

``evaluate_match(run_dir, split)`` scores every (image, caption) pair of the split with the run's model:

- protocol (``protocol_metrics``): COCO 1K (mean of 5 folds of 1000 images) + 5K on a 5,000-image split,
  else the whole split (Flickr30k's 1K test protocol) with a note saying COCO 1K/5K was not applied;
  asking for ``"coco"`` on another size is an error;
- MMCA: exact S for all pairs (one cross pass each, batched), and with ``rerank_top=K`` also
  shortlist-and-rerank, with its distance from exact (``retrieval.rerank_report``) and speed-up;
- attention precision/recall/F1 of the word->region attention of matched (image, own caption) pairs:
  against the pseudo reference (regions >= 50% inside the word's merged mask, ``data``), and,
  given ``entities`` (a Flickr30k Entities directory), against its phrase boxes (region IoU >= 0.5);
- a model's own additions (``MatchModel.evaluate_words``/``figures``/``report_lines``), e.g. SLAN: each
  matched word's highest-matching region before and after adaptation, scored against the word's merged
  mask, with figures of both boxes over the image (``slan``);
- figures of a word's attention over regions, ``eval/scores_<split>.json`` (and ``scores.json`` for the
  test split, as captioning does) and ``report.md``.

A multi-word query (a matched span, an Entities phrase) is one query: its text positions' attention
rows averaged (the same pooling training uses).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ...pipeline.runs import RunDir, check_run_store, epochs
from ...storage.backends import open_backend
from ...storage.store import open_store
from ..common.attention_metrics import attention_prf
from ..common.distributed import resolve_device
from ..common.store_rows import store_fingerprint
from .data import load_split
from .entities import entity_queries
from .retrieval import coco_1k_5k, recall_at_k, rerank_report
from .protocol import query_attention, report_number
from .train import TextEncoder, load_match_run, make_dataset, similarity

PROTOCOLS = ("auto", "coco", "full")
COCO_TEST_IMAGES = 5000


def check_protocol(protocol: str, n_images: int) -> None:
    """A clear error for an unknown protocol, or COCO 1K/5K asked of a split that is not 5,000 images."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "coco" and n_images != COCO_TEST_IMAGES:
        raise ValueError(f"protocol 'coco' (1K = 5 folds of 1,000 images, 5K) needs the {COCO_TEST_IMAGES:,}-image "
                         f"test split; this split has {n_images:,} images (protocol 'full' scores all its pairs)")


def protocol_metrics(sim, txt_img, sim_t2i=None, protocol: str = "auto") -> dict:
    """Retrieval metrics under an evaluation protocol (METHODS §10).

    ``"coco"``: COCO 1K (mean of 5 folds of 1000 images) and 5K, ``{"protocol": "coco", "1k", "5k",
    "folds"}``; it needs the 5,000-image test split, and any other size is an error (never a silent
    substitute). ``"full"``: every pair of the split, ``{"protocol": "full", "full": recall_at_k}`` (Flickr30k's
    1K test protocol on its 1,000 test images). ``"auto"``: COCO for exactly 5,000 images, else full, and
    then ``protocol_note`` says that COCO 1K/5K was not applied and why.
    """
    n = sim.shape[0]
    check_protocol(protocol, n)
    if protocol != "full" and n == COCO_TEST_IMAGES:
        return {"protocol": "coco", **coco_1k_5k(sim, txt_img, sim_t2i=sim_t2i)}
    out = {"protocol": "full", "full": recall_at_k(sim, txt_img, sim_t2i=sim_t2i)}
    if protocol == "auto":
        out["protocol_note"] = (f"COCO 1K/5K not applied: the split has {n:,} images, not {COCO_TEST_IMAGES:,}; "
                                f"recalls are over all {n:,} images and their captions")
    return out


def headline(metrics: dict) -> dict:
    """The main numbers: COCO 5K (and 1K) or the full split."""
    return metrics["5k"] if metrics["protocol"] == "coco" else metrics["full"]


def _prf(weights: torch.Tensor, reference: torch.Tensor) -> dict:
    res = attention_prf(weights, reference) if len(weights) else attention_prf(torch.ones(0, 1), torch.zeros(0, 1))
    names = {"n_words": "attn_words", "n_skipped": "attn_words_skipped"}
    return {names.get(k, f"attn_{k}"): v for k, v in res.items()}


def evaluate_match(run_dir, split: str = "test", rerank_top: int | None = None, entities=None, figures: int = 6,
                   *, device: str | None = None, store: str | None = None, image_root=None,
                   checkpoint: str = "best", protocol: str = "auto") -> dict:
    """Evaluate the run in ``run_dir`` on ``split`` of its store; returns the scores (also written to
    ``eval/`` and ``report.md``). ``store``: a moved copy of the run's store (same fingerprint).
    ``protocol``: see :func:`protocol_metrics` (checked before anything is scored)."""
    check_protocol(protocol, COCO_TEST_IMAGES)  # the name only; the size once the split is read
    started = time.time()
    run = RunDir(run_dir)
    dev = resolve_device(device or "auto")
    net, vocab, ckpt, cfg = load_match_run(run_dir, checkpoint, dev)
    config = run.read_config()
    url = store or cfg.store
    fp = store_fingerprint(url)
    store_notes = check_run_store(run.path, config, url, fp)  # also says when it was a partial store
    data = load_split(make_dataset(cfg, split, vocab, "all", True, store=url))
    check_protocol(protocol, len(data["rows"]))  # before the (long) scoring
    family = net.family
    if family.text == "bert" and "words" not in data:
        data = TextEncoder(cfg.bert, cfg.text_len, dev)(data)
    notes = list(store_notes)
    t0 = time.time()
    exact = similarity(net, data, dev)
    exact_s = time.time() - t0
    n_img, n_txt = exact["sim"].shape
    metrics = protocol_metrics(exact["sim"], data["txt_img"], protocol=protocol)
    if "protocol_note" in metrics:
        notes.append(metrics["protocol_note"])
    scores = {"split": split, "model": cfg.model, "n_images": n_img, "n_captions": n_txt, "retrieval": metrics,
              **{k: v for k, v in headline(metrics).items()},
              "scoring_seconds": round(exact_s, 3), "pairs_per_second": round(n_img * n_txt / max(exact_s, 1e-9), 1)}
    if rerank_top:
        if not family.shortlist:
            notes.append(f"--rerank-top {rerank_top} ignored: only MMCA has a shortlist score (i0·c0); "
                         f"{cfg.model.upper()} scores all pairs exactly")
        else:
            t0 = time.time()
            rr = similarity(net, data, dev, rerank_top=rerank_top)
            rr_s = time.time() - t0
            rmetrics = protocol_metrics(rr["sim"], data["txt_img"], sim_t2i=rr["sim_t2i"], protocol=protocol)
            scores["rerank"] = {"top_k": int(rerank_top), "metrics": rmetrics, "seconds": round(rr_s, 3),
                                "cross_passes": rr["n_pairs"], "exact_cross_passes": n_img * n_txt,
                                "speedup": round(exact_s / max(rr_s, 1e-9), 2),
                                "vs_exact": rerank_report(metrics, rmetrics)}
    has = data["match_has_ref"]
    scores["matched_words"] = int(len(data["match_txt"]))
    missing = family.attention_missing(cfg)
    if missing:  # e.g. SCAN i2t: regions attend to words, no word->region attention
        notes.append(missing)
        has = torch.zeros_like(has)
        entities = None
    store_view = _open_store(url, image_root)
    words = family.evaluate_words(net, data, has, dev, store_view, cfg, figures)
    weights = words["weights"]
    scores.update(words.get("scores", {}))
    scores.update(_prf(weights, data["match_reference"][has]))  # no fallback: empty references are skipped
    scores["attn_words_skipped"] = scores["matched_words"] - scores["attn_words"]
    scores["attn_reference"] = "pseudo: regions >= 50% inside the word's merged mask (no fallback)"
    if not len(data["match_txt"]):
        notes.append("the store has no class-word matches: no attention metrics")
    if entities is not None:
        q = entity_queries(entities, url, data, family.text)
        ew = query_attention(net, data, q["txt"], q["pos"], dev)
        scores["entities"] = {**_prf(ew, q["reference"]), **q["stats"]}
    scores.update({"checkpoint": ckpt.get("name", checkpoint), "epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]),
                   "store": str(url), "store_fingerprint": fp, "notes": notes,
                   "seconds": round(time.time() - started, 2)})
    run.create()
    names = [f"scores_{split}.json"] + (["scores.json"] if split == "test" else [])
    for name in names:
        run.write_scores(name, scores)  # NaN -> null, with a note saying why
    paths = attention_figures(run, store_view, data, weights, has, figures, split) if figures else []
    if figures:
        paths += family.figures(run, lambda row: _image(store_view, row), data, has, words, figures, split)
    write_report(run, scores, config, paths, family)
    return scores


# ------------------------------------------------------------------------------------------- figures
def attention_figure(image: np.ndarray, boxes: np.ndarray, weights: np.ndarray, reference: np.ndarray,
                     title: str, top: int = 5):
    """A matplotlib Figure (no pyplot): the image, the ``top`` highest-weighted regions filled with an
    alpha proportional to their weight (labelled with it), reference regions outlined in white dashes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    fig = Figure(figsize=(4.2, 4.2 * h / w + 0.8), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(image)
    wmax = max(float(weights.max()), 1e-12)
    for j in np.argsort(weights)[-top:]:  # strongest drawn last, on top
        x1, y1, x2, y2 = boxes[j]
        a = 0.45 * float(weights[j]) / wmax
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=(1, 0.2, 0.1, a), edgecolor=(1, 0.2, 0.1, 1),
                               lw=1.2))
        ax.text(x1 + 1, y1 + 1, f"{weights[j]:.2f}", fontsize=7, color="white", va="top",
                bbox=dict(facecolor="black", alpha=0.5, pad=1, lw=0))
    for j in np.flatnonzero(reference):
        x1, y1, x2, y2 = boxes[j]
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="white", ls="--", lw=1.5))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def _open_store(url, image_root=None):
    """The notebook Store of ``url`` with its images (``image_root``: the store's own when None)."""
    if image_root is None:  # the store's own: a top-level attribute, or inside a dataset dict
        with open_backend(str(url), "r") as be:
            attrs = be.attrs()
        ds = attrs.get("dataset")
        image_root = attrs.get("image_root") or (ds.get("image_root") if isinstance(ds, dict) else None)
    return open_store(url, image_root=image_root)


def _image(store, row: int) -> np.ndarray:
    try:
        return np.asarray(store.image(row).convert("RGB"))
    except (FileNotFoundError, OSError, KeyError, ValueError):
        h, w = store.hw(row)  # images moved: the regions and weights still tell the story
        return np.full((h, w, 3), 200, np.uint8)


def attention_figures(run: RunDir, store, data: dict, weights: torch.Tensor, has: torch.Tensor,
                      limit: int, split: str) -> list[Path]:
    """Figures for the first matched word (with a reference) of up to ``limit`` distinct images."""
    idx = has.nonzero().squeeze(1)
    seen, paths = set(), []
    for k, j in enumerate(idx.tolist()):
        t = int(data["match_txt"][j])
        i = int(data["txt_img"][t])
        row = int(data["rows"][i])
        if row in seen or len(paths) >= limit:
            continue
        seen.add(row)
        image = _image(store, row)
        cs, ce = (int(v) for v in data["match_char"][j])
        text = data["texts"][t]
        nreg = int(data["region_mask"][i].sum())
        fig = attention_figure(image, data["region_boxes"][i, :nreg].numpy(), weights[k, :nreg].numpy(),
                               data["match_reference"][j, :nreg].numpy(),
                               f"row {row}: '{text[cs:ce]}'\n{text}")
        path = run.figures / f"match_attention_{split}_row{row:06d}.png"
        paths.append(run.save_figure(fig, path))
    return paths


# -------------------------------------------------------------------------------------------- report
def _recall_rows(m: dict) -> str:
    keys = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
    return " | ".join(report_number(m.get(k)) for k in keys)


def _whole_split(n_images: int) -> str:
    """The retrieval row's label: the Flickr30k/8k protocol is the whole 1,000-image test split."""
    return f"whole split, {n_images:,} images" + (" (the Flickr 1K protocol)" if n_images == 1000 else "")


def write_report(run: RunDir, scores: dict, config: dict, figures: list[Path], family) -> None:
    ret = scores["retrieval"]
    head = "| protocol | i→t R@1 | R@5 | R@10 | t→i R@1 | R@5 | R@10 | rsum |\n|---|---|---|---|---|---|---|---|"
    rows = ([f"| COCO 1K (5 folds) | {_recall_rows(ret['1k'])} |", f"| COCO 5K | {_recall_rows(ret['5k'])} |"]
            if ret["protocol"] == "coco" else [f"| {_whole_split(scores['n_images'])} | {_recall_rows(ret['full'])} |"])
    lines = [f"# Matching evaluation: {run.path.name}", "",
             f"Model **{scores['model']}**, split **{scores['split']}**: {scores['n_images']} images, "
             f"{scores['n_captions']} captions; checkpoint `{scores['checkpoint']}` (after {epochs(scores['epoch'])}, "
             f"step {scores['step']}).", "", head, *rows, "",
             f"Exact scoring: {scores['scoring_seconds']} s, {scores['pairs_per_second']} pairs/s.", ""]
    if "rerank" in scores:
        rr = scores["rerank"]
        lines += [f"## Shortlist-and-rerank (top {rr['top_k']} by i0·c0, METHODS §4)", "", head,
                  *([f"| rerank 1K | {_recall_rows(rr['metrics']['1k'])} |",
                     f"| rerank 5K | {_recall_rows(rr['metrics']['5k'])} |"] if rr["metrics"]["protocol"] == "coco"
                    else [f"| rerank | {_recall_rows(rr['metrics']['full'])} |"]),
                  "", f"{rr['cross_passes']} cross passes instead of {rr['exact_cross_passes']}, {rr['seconds']} s "
                  f"(×{rr['speedup']} faster); largest |rerank − exact| over recalls and rsum: "
                  f"{report_number(rr['vs_exact']['max_abs_diff'])} points.", ""]
    lines += ["## Attention (METHODS §8)", "", "| reference | precision | recall | F1 | words |",
              "|---|---|---|---|---|",
              f"| pseudo (merged masks) | {report_number(scores['attn_precision'])} | {report_number(scores['attn_recall'])} | "
              f"{report_number(scores['attn_f1'])} | {scores['attn_words']} |"]
    if "entities" in scores:
        e = scores["entities"]
        lines.append(f"| Flickr30k Entities boxes | {report_number(e['attn_precision'])} | {report_number(e['attn_recall'])} | "
                     f"{report_number(e['attn_f1'])} | {e['attn_words']} |")
    lines += ["", "Attended set: top regions up to half the attention mass; reference: regions with >= 50% of "
              "their box inside the word's merged mask (a word with none is not scored), or with IoU >= 0.5 with an "
              "Entities phrase box. Multi-word queries average their positions' attention.", ""]
    lines += family.report_lines(scores, config)
    if scores["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in scores["notes"]] + [""]
    lines += ["## How this was made", "", f"- store: `{scores['store']}`, fingerprint `{scores['store_fingerprint']}`",
              f"- training: CCR {config.get('ccr')}, CCS {config.get('ccs')}, ICA {config.get('ica')}, "
              f"margin {config.get('margin')}, seed {config.get('seed')}, captions per step: {config.get('captions')}",
              *family.config_lines(config),
              f"- outputs: `eval/scores_{scores['split']}.json`", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures] + [""]
    (run.path / "report.md").write_text("\n".join(lines))
