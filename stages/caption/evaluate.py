"""Evaluate a captioning run on a store split: captions, caption metrics, attention metrics, figures, report.

``evaluate_caption(run_dir, split)`` loads the run's best checkpoint (its last one when it never
validated) and, streaming the split from the store the run was trained on (its fingerprint is checked):

* decodes every image with batched beam search and scores the captions with pycocoevalcap
  (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when its CoreNLP jars are present, else a note);
* measures attention against the pseudo masks (METHODS.md section 8): the model is teacher-forced on the
  ground-truth captions; for every matched word token, the attention ``alpha`` of the step predicting it
  is compared with the word's merged-mask grid coverage (exact pixel overlap). Reference cells: coverage
  >= 0.5, no fallback (:func:`attention_metrics.reference_sets`); a word with no such cell is not scored
  and is counted in ``attn_words_skipped``. Attended set: top cells until half the mass; precision,
  recall, F1 and correctness (sum of alpha inside the mask, sum_i alpha_i * coverage_i) averaged over
  the scored words. The correctness of uniform attention (the mean coverage of the scored words) is
  reported beside it as the chance level;
* writes ``eval/captions_<split>.json`` and ``eval/scores_<split>.json`` (the test split also as
  ``eval/captions.json``/``eval/scores.json``), attention-over-image figures in ``figures/`` and
  ``report.md``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ...pipeline.runs import RunDir, check_run_store, epochs
from ...storage.store import open_store
from ..common.attention_metrics import attention_correctness, attention_prf, reference_sets
from ..common.store_rows import split_rows, store_fingerprint
from ..common.vocab import Vocab
from .data import CaptionBatches, CaptionTransform, caption_loader, store_info
from .losses import ica_loss
from .metrics import CaptionScorer, score_captions, tokenize
from .sat import ShowAttendTell

__all__ = ["decode_split", "quick_scores", "load_run_model", "evaluate_caption", "attention_figure",
           "TABLE_METRICS"]

TABLE_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE",
                 "attn_precision", "attn_recall", "attn_f1", "attn_correctness")


@torch.no_grad()
def decode_split(model: ShowAttendTell, loader, vocab: Vocab, beam_size: int, max_len: int, device,
                 progress: bool = False, attention: bool = False) -> tuple[list[dict], dict]:
    """Beam-search captions for every image the loader yields, optionally with attention data.

    Returns (items, attn): items are ``{"row", "image_id", "caption", "references"}`` in loader order.
    With ``attention`` (the loader's transform must build ICA targets) ``attn`` holds, over all matched
    word tokens of the ground-truth captions, ``alphas`` and ``energies`` (m, P) teacher-forced attention
    and its pre-softmax energies, ``labels`` (ICA's training labels) and ``coverage`` (m, P), ``words``:
    per token (row, caption index, token index, class id), and ``no_mask``: matched tokens left out
    because their class has no instance mask above the score threshold (their reference is empty).
    """
    model.eval()
    items, alphas, energies, labels, coverage, words = [], [], [], [], [], []
    n_samples = n_pairs = no_mask = 0
    for batch in tqdm(loader, desc="decode", disable=not progress, leave=False):
        feats = batch["feats"].to(device)
        seqs = model.beam_search(feats, beam_size=beam_size, max_len=max_len)
        for b, seq in enumerate(seqs):
            items.append({"row": int(batch["rows"][b]), "image_id": batch["image_ids"][b],
                          "caption": vocab.decode_text(seq), "references": batch["references"][b]})
        if attention and batch["captions"].shape[0]:
            img = batch["img_index"].to(device)
            out = model(feats, batch["captions"].to(device), batch["lengths"].to(device), img_index=img)
            s, t = batch["ica_sample"], batch["ica_step"]
            alphas.append(out["alphas"][s.to(device), t.to(device)].float().cpu())
            energies.append(out["energies"][s.to(device), t.to(device)].float().cpu())
            labels.append(batch["ica_labels"])
            coverage.append(batch["ica_coverage"])
            rows = batch["rows"][batch["img_index"][s]]
            words += list(zip(rows.tolist(), batch["cap_index"][s].tolist(), t.tolist(), batch["ica_class"].tolist()))
            n_samples += int(batch["captions"].shape[0])
            no_mask += int(batch["ica_dropped"])
            n_pairs += len({(int(a), int(c)) for a, c in zip(s, batch["ica_class"])})
    attn = {}
    if attention:
        cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, 0)  # noqa: E731
        attn = {"alphas": cat(alphas), "energies": cat(energies), "labels": cat(labels), "coverage": cat(coverage), "words": words,
                "no_mask": no_mask, "objects_per_caption": n_pairs / max(n_samples, 1)}
    return items, attn


def quick_scores(items: list[dict]) -> dict:
    """BLEU-1..4 and CIDEr of decoded items (validation: one tokenizer run, no METEOR JVM)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    gts = {it["row"]: it["references"] for it in items}
    res = {it["row"]: it["caption"] for it in items}
    gts_t, res_t = tokenize(gts, res)
    bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
    out = {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    out["CIDEr"] = float(Cider().compute_score(gts_t, res_t)[0])
    return out


def attention_scores(attn: dict) -> dict:
    """Section 8 metrics over the matched word tokens of :func:`decode_split`'s ``attn``, and diagnostics.

    Scored words: those with a non-empty reference (cells covered >= 50%, no fallback); every metric,
    the chance level included, averages over the same words. ``attn_words_skipped`` counts the others:
    masks covering no cell by half (``attn_words_small_mask``) plus words with no mask at all
    (``attn_words_no_mask``).

    The diagnostics say *how* a model attends, which the section 8 metrics cannot tell apart (a flat map
    and a map that misses the object can score alike); they use ICA's training labels (with their
    fallback) over every supervised word: ``attn_energy_spread``, the std of a step's pre-softmax
    energies across cells (0 = uniform attention); ``attn_energy_gap``, mean energy of labelled minus
    unlabelled cells; ``attn_mass_on_labels``, attention on labelled cells (uniform attention puts
    ``attn_label_share`` there); ``attn_ica_loss``, the ICA loss of these steps (1 for a flat map at
    energy 0, the hinge's kink: raising the labelled cells by d lowers it only by d times the labelled
    share of cells).
    """
    n = int(attn["alphas"].shape[0]) if attn else 0
    no_mask = int(attn.get("no_mask", 0)) if attn else 0
    keys = ("attn_precision", "attn_recall", "attn_f1", "attn_correctness", "attn_correctness_uniform",
            "attn_energy_spread", "attn_energy_gap", "attn_mass_on_labels", "attn_label_share", "attn_ica_loss")
    if n == 0:
        return {**dict.fromkeys(keys, float("nan")), "attn_words": 0, "attn_words_skipped": no_mask,
                "attn_words_small_mask": 0, "attn_words_no_mask": no_mask}
    reference = reference_sets(attn["coverage"], 0.5, what="coverage")
    scored = reference.any(dim=1)
    prf = attention_prf(attn["alphas"], reference)
    cov = attn["coverage"][scored].float()
    nan = float("nan")
    out = {"attn_precision": prf["precision"], "attn_recall": prf["recall"], "attn_f1": prf["f1"],
           "attn_correctness": float(attention_correctness(attn["alphas"][scored], cov).mean()) if len(cov) else nan,
           "attn_correctness_uniform": float(cov.mean()) if len(cov) else nan,  # uniform attention's mass
           "attn_words": prf["n_words"], "attn_words_skipped": prf["n_skipped"] + no_mask,
           "attn_words_small_mask": prf["n_skipped"], "attn_words_no_mask": no_mask}
    e = attn.get("energies")
    labelled = attn["labels"] > 0
    if e is not None and e.shape == labelled.shape:
        y = labelled.float()
        pos = (e * y).sum(1) / y.sum(1).clamp_min(1)
        neg = (e * (1 - y)).sum(1) / (1 - y).sum(1).clamp_min(1)
        out.update(attn_energy_spread=float(e.std(dim=1).mean()), attn_energy_gap=float((pos - neg).mean()),
                   attn_mass_on_labels=float((attn["alphas"] * y).sum(1).mean()),
                   attn_label_share=float(y.mean(1).mean()), attn_ica_loss=float(ica_loss(e, attn["labels"])))
    return out


def load_run_model(run_dir, which: str = "best", device="cpu") -> tuple[ShowAttendTell, Vocab, dict, dict]:
    """(model in eval mode, vocab, checkpoint, run config) of a run; ``best`` falls back to ``last``."""
    run = RunDir(run_dir)
    config = run.read_config()
    ckpt = run.load_checkpoint(which, map_location="cpu")
    if ckpt is None and which == "best":
        which, ckpt = "last", run.load_checkpoint("last", map_location="cpu")
    if ckpt is None:
        raise FileNotFoundError(f"run {run.path} has no checkpoint ({run.checkpoints}/best.pt or last.pt)")
    vocab = Vocab.from_dict(ckpt["vocab"])
    model = ShowAttendTell(**ckpt["model_args"])
    model.load_state_dict(ckpt["model"])
    ckpt["name"] = which
    return model.to(device).eval(), vocab, ckpt, config


def evaluate_caption(run_dir, split: str = "test", beam_size: int | None = None, max_images: int | None = None,
                     figures: int = 8, *, device: str | None = None, store: str | None = None,
                     image_root: str | None = None, progress: bool = False, batch_images: int | None = None,
                     scorer: CaptionScorer | None = None) -> dict:
    """Evaluate the run in ``run_dir`` on ``split`` of its store; returns the scores (also in eval/).

    ``store`` overrides the store URL recorded in the run (a moved copy; its fingerprint must match);
    ``image_root`` where the images are for the figures (default: the run's, then the store's);
    ``scorer`` an open :class:`CaptionScorer` to reuse (one METEOR JVM for many evaluations).
    """
    from ..common.distributed import resolve_device

    started = time.time()
    run = RunDir(run_dir)
    dev = resolve_device(device or "auto")
    model, vocab, ckpt, config = load_run_model(run_dir, device=dev)
    url = store or config["store"]
    fp = store_fingerprint(url)
    store_notes = check_run_store(run.path, config, url, fp)  # also says when it was a partial store
    info = store_info(url)
    beam = int(beam_size or config.get("beam_size", 3))
    max_len = int(config.get("max_len", vocab.max_len))
    rows = split_rows(url, split)
    if max_images is not None:
        rows = rows[: int(max_images)]
    transform = CaptionTransform(vocab, info["grid_size"], ica=info["has_ica"],
                                 score_threshold=float(config.get("ica_score_threshold", 0.5)),
                                 cover_threshold=float(config.get("ica_cover_threshold", 0.5)),
                                 mask_paste=info["mask_paste"], url=url)
    loader, _ = caption_loader(CaptionBatches(url, transform, rows=rows), batch_images or config.get("batch_images", 16),
                               shuffle=False, num_workers=0)
    items, attn = decode_split(model, loader, vocab, beam, max_len, dev, progress, attention=info["has_ica"])
    gts = {it["row"]: it["references"] for it in items}
    res = {it["row"]: it["caption"] for it in items}
    scores = scorer.score(gts, res) if scorer is not None else score_captions(gts, res)
    notes = store_notes + scores.pop("notes")
    scores.update(attention_scores(attn) if info["has_ica"] else {})
    if not info["has_ica"]:
        notes.append("attention metrics not computed: the store has no instances/matches groups")
    scores.update({"split": split, "n_images": len(items), "beam_size": beam, "checkpoint": ckpt["name"],
                   "epoch": int(ckpt["epoch"]), "step": int(ckpt["step"]), "store": str(url),
                   "store_fingerprint": fp, "objects_per_caption": attn.get("objects_per_caption"),
                   "notes": notes, "seconds": round(time.time() - started, 2)})
    run.create()
    names = [f"captions_{split}.json", f"scores_{split}.json"] + (["captions.json", "scores.json"] if split == "test" else [])
    for name in names:
        if name.startswith("captions"):
            (run.eval / name).write_text(json.dumps(items, indent=1, default=_json_default))
        else:
            run.write_scores(name, scores)  # NaN -> null, with a note saying why
    fig_paths = _attention_figures(run, url, image_root or config.get("image_root") or info["image_root"], vocab,
                                   attn, items, figures, float(config.get("ica_score_threshold", 0.5)),
                                   info["grid_size"], split) if info["has_ica"] and figures else []
    _write_report(run, scores, config, fig_paths)
    return scores


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


# ------------------------------------------------------------------------------------------- figures
def attention_figure(image: np.ndarray, panels: list[dict], caption: str, title: str = ""):
    """A matplotlib Figure (Agg, no pyplot): per panel the image, the word's attention map upsampled over
    it (jet, translucent), and the word's merged mask outlined in white.

    ``panels``: dicts with ``word``, ``alpha`` (G, G), ``mask`` (H, W) bool, ``correctness`` float.
    Colours span each map's own [min, max]; the panel title gives those values and the uniform level.
    """
    import textwrap

    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    n = max(1, len(panels))
    fig = Figure(figsize=(3.0 * n, 3.0 * h / w + 1.3), dpi=100)
    for j, p in enumerate(panels):
        ax = fig.add_subplot(1, n, j + 1)
        ax.imshow(image)
        alpha = np.asarray(p["alpha"], dtype=np.float32)
        span = float(alpha.max() - alpha.min())
        ax.imshow((alpha - alpha.min()) / max(span, 1e-12), cmap="jet", alpha=0.45, extent=(0, w, h, 0),
                  interpolation="bilinear", vmin=0, vmax=1)
        if np.asarray(p["mask"]).any():
            ax.contour(np.asarray(p["mask"], dtype=np.float32), levels=[0.5], colors="white", linewidths=1.5)
        ax.set_xlim(0, w)
        ax.set_ylim(h, 0)
        ax.set_axis_off()
        # colours span [min, max] of alpha: the title gives the scale (uniform attention is 1/P everywhere)
        ax.set_title(f"{p['word']}: in mask {p['correctness']:.2f}\nalpha {alpha.min():.3f}..{alpha.max():.3f}, "
                     f"uniform {1 / alpha.size:.3f}",
                     fontsize=8)
    text = "\n".join(textwrap.fill(line, 48 * n) for line in caption.splitlines())
    fig.suptitle(f"{title}\n{text}" if title else text, fontsize=8)
    fig.tight_layout()
    return fig


def _attention_figures(run: RunDir, url, image_root, vocab: Vocab, attn: dict, items: list[dict], limit: int,
                       score_threshold: float, G: int, split: str) -> list[Path]:
    """Figures for the first ``limit`` images with matched words (their first caption that has one)."""
    store = open_store(url, image_root=image_root)
    by_caption: dict[tuple[int, int], list[int]] = {}
    for j, (row, c, _, _) in enumerate(attn["words"]):
        by_caption.setdefault((row, c), []).append(j)
    chosen, seen = [], set()
    for (row, c), js in by_caption.items():
        if row not in seen and len(chosen) < limit:
            seen.add(row)
            chosen.append((row, c, js))
    generated = {it["row"]: it["caption"] for it in items}
    paths = []
    for row, c, js in chosen:
        tokens = store.tokens(row)[c]
        try:
            image = np.asarray(store.image(row).convert("RGB"))
        except (FileNotFoundError, OSError, AttributeError, KeyError):
            h, w = store.hw(row)  # images moved: draw over grey, the attention/mask still tell the story
            image = np.full((h, w, 3), 200, np.uint8)
        panels = []
        for j in js[:4]:
            _, _, k, _ = attn["words"][j]
            alpha = attn["alphas"][j]
            panels.append({"word": tokens[k] if k < len(tokens) else f"token {k}", "alpha": alpha.reshape(G, G).numpy(),
                           "mask": store.merged_mask(row, c, k, score_threshold=score_threshold, size="image"),
                           "correctness": float((alpha / alpha.sum() * attn["coverage"][j]).sum())})
        gen = generated.get(row, "")
        gen = gen if len(gen) <= 150 else gen[:150] + " ..."
        fig = attention_figure(image, panels, f"GT: {' '.join(tokens)}\ngenerated: {gen}",
                               f"row {row} caption {c} (teacher-forced attention)")
        path = run.figures / f"attention_{split}_row{row:06d}.png"
        paths.append(run.save_figure(fig, path))
    return paths


# -------------------------------------------------------------------------------------------- report
def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.4f}"


def _write_report(run: RunDir, scores: dict, config: dict, figures: list[Path]) -> None:
    rows = [("BLEU-1", "Bleu_1"), ("BLEU-2", "Bleu_2"), ("BLEU-3", "Bleu_3"), ("BLEU-4", "Bleu_4"),
            ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE_L"), ("CIDEr", "CIDEr"), ("SPICE", "SPICE"),
            ("attention precision", "attn_precision"), ("attention recall", "attn_recall"),
            ("attention F1", "attn_f1"), ("attention correctness", "attn_correctness"),
            ("correctness of uniform attention (chance)", "attn_correctness_uniform"),
            ("attention mass on labelled cells", "attn_mass_on_labels"),
            ("labelled share of cells (uniform attention's mass)", "attn_label_share"),
            ("energy spread across cells (0 = flat)", "attn_energy_spread"),
            ("energy gap, labelled - unlabelled cells", "attn_energy_gap"),
            ("ICA loss (1 = flat map at 0)", "attn_ica_loss")]
    lines = [f"# Captioning evaluation: {run.path.name}", "",
             f"Split **{scores['split']}**, {scores['n_images']} images, beam {scores['beam_size']}, "
             f"checkpoint `{scores['checkpoint']}` (after {epochs(scores['epoch'])}, step {scores['step']}).", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_fmt(scores.get(key))} |" for name, key in rows if key in scores]
    lines += ["", f"Attention metrics over {scores.get('attn_words', 0)} matched word tokens of the ground-truth "
              f"captions (teacher forcing); {scores.get('attn_words_skipped', 0)} matched tokens not scored "
              f"(reference empty: {scores.get('attn_words_small_mask', 0)} masks cover no cell by half, "
              f"{scores.get('attn_words_no_mask', 0)} have no mask above the score threshold); "
              f"{_fmt(scores.get('objects_per_caption'))} matched objects per caption.", ""]
    if scores["notes"]:
        lines += ["Notes:", ""] + [f"- {n}" for n in scores["notes"]] + [""]
    lines += ["## How this was made", "",
              f"- store: `{scores['store']}`, fingerprint `{scores['store_fingerprint']}`",
              f"- model: Show-Attend-Tell, ICA weight {config.get('ica_weight')}, embed/attn/hidden "
              f"{config.get('embed_dim')}/{config.get('attn_dim')}/{config.get('hidden_dim')}, seed {config.get('seed')}",
              "- captions: batched beam search; scores: pycocoevalcap (PTB tokenizer, corpus-level)",
              "- attention (METHODS.md section 8): reference cells covered >= 50% by the word's merged mask "
              "(exact pixel overlap, no fallback: a word without such a cell is not scored), attended set = "
              "top cells up to half the attention mass; correctness = attention mass inside the mask",
              f"- outputs: `eval/captions_{scores['split']}.json`, `eval/scores_{scores['split']}.json`", ""]
    if figures:
        lines += ["## Attention figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figures] + [""]
    (run.path / "report.md").write_text("\n".join(lines))
