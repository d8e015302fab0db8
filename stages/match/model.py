"""Any registered matching model (``registry``: SCAN, MMCA, SLAN) as one ``nn.Module``, and the loss every
model trains with; METHODS §4, §6, §7, §9.

Loss per batch (``txt_img`` maps each caption to its image; a batch may hold several captions of one
image, and by default, as in SCAN/VSE++'s code, those are negatives of each other; ``same_image_negatives
=False`` leaves them out):

    SCAN, MMCA:  L = triplet_hardest(S, margin) + λ_ccr CCR + λ_ccs CCS + λ_ica ICA
    SLAN:        L = w_itc L_itc + w_itm L_itm + w_reg L_reg + λ_ccr CCR + λ_ccs CCS + λ_ica ICA

- ``S``: SCAN's all-pairs similarity / MMCA's S(I, T) / SLAN's S(I, T) for every pair of the batch
  (differentiable). The first terms are the model's own (``MatchModel.objective``): the triplet by
  default; SLAN's ITC/ITM/L_reg, ``slan_losses.slan_objective`` (queue-based ITC; the batch's inputs and
  the queue update are in ``slan``).
- Word -> region attention of the positive pairs (query q_i, values v_j, weights w_ij): SCAN t2i's
  softmax(λ1 s̄) (``SCAN.attention``); MMCA's cross-unit attention, word rows restricted to region keys
  and renormalised; SLAN's last Eq. 1 attention over the kept regions (``slan.SlanMatch``). A
  matched word spanning several text positions (Karpathy tokens, BERT pieces) is one query: its
  positions' q and w rows averaged (``match_pos``); a_i = Σ_j w_ij v_j.
- CCR/CCS (METHODS §7, ``losses.ccr_loss``/``ccs_loss``) on **every real word** of each positive pair
  (``caption_words``: SCAN's Karpathy tokens between ``<start>`` and ``<end>``; for BERT text the word
  pieces of one whitespace-separated word, grouped by character offsets, [CLS]/[SEP]/padding left out):
  they need no class match. ICA and the attention metrics use the class-word matches.
- ICA for matching (ours, after METHODS §2): Lovász hinge between a word's attention *scores* over
  regions and its region labels (``data``: regions >= 50% inside the merged mask, non-empty
  rule). Scores: SCAN's pre-softmax λ1 s̄_ij (``logits``); MMCA and SLAN have softmax weights only, so
  we use log(w_ij · R_valid) — the log of the weight relative to uniform, positive exactly when a
  region gets more than its uniform share. Padded regions get a score of -100 (never foreground, and
  they sort last, so the hinge equals the one over real regions only).
"""

from __future__ import annotations

import torch
from torch import nn

from ..common.losses import lovasz_hinge
from .losses import ccr_loss, ccs_loss
from .protocol import PAD_SCORE
from .registry import match_model


def model_args(cfg, region_dim: int, vocab_size: int = 0, text_dim: int = 0) -> dict:
    """The model's constructor arguments (saved in checkpoints): ``kind`` and its network's arguments
    (``MatchModel.network_args``). ``region_dim``: the width of the visual features the model reads
    (region features; the grid's for SLAN)."""
    return {"kind": cfg.model, **match_model(cfg.model).network_args(cfg, region_dim, vocab_size, text_dim)}


class MatchNet(nn.Module):
    """A registered matching model (``registry``) behind one interface (tensors in, tensors out), so DDP
    wraps a single forward. ``net`` is the model's network; ``family`` its ``protocol.MatchModel``.

    ``feat_mean``/``feat_std`` (buffers, saved with the model) standardise the visual features (region
    features; SLAN: grid features) before the model when ``region_norm`` is on (ours, off by default as
    in the papers): features whose variation is small against a large shared mean (e.g. from a randomly
    initialised backbone) otherwise make every embedding nearly the same direction and learning crawls.
    SLAN's ITC queue is a buffer of ``net.queue``, so it is saved with the model too.
    """

    def __init__(self, kind: str, **kw):
        super().__init__()
        self.family = match_model(kind)
        self.kind = kind
        self.net = self.family.network(**kw)
        dim = self.family.visual_width(kw)
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))

    @property
    def has_unused_parameters(self) -> bool:
        """True when some parameters never get a gradient, so DDP must look for them (``wrap_model(...,
        find_unused_parameters=True)``, an extra autograd-graph walk per step): SLAN with 0 adaptor levels,
        whose per-level ``log_pw``/``log_ph``/``log_offset_tau`` are then empty (kept so checkpoints of
        every level count share one layout). Every other configuration uses all parameters in each step
        (a SLAN term at weight 0 still gives zero gradients; CCR/CCS/ICA have no parameters of their own)."""
        return self.family.unused_parameters(self)

    def regions(self, feats: torch.Tensor) -> torch.Tensor:
        """Visual features as the model sees them (float, standardised when statistics are set)."""
        return (feats.to(self.feat_mean.dtype) - self.feat_mean) / self.feat_std

    def attention(self, batch: dict) -> dict:
        """Word->region attention of matched pairs only (caption p with image ``txt_img[p]``): ``query,
        values, weights, scores, value_mask`` as in :meth:`forward`, without scoring all pairs."""
        return self.family.attention(self, batch)

    def forward(self, batch: dict, attention: bool = True) -> dict:
        """``sim (P, P)``: row p = image of caption p, column = caption (the loss's layout). With
        ``attention``: matched-pair word->region ``query (P, L, d)``, ``values (P, R, d)``, ``weights
        (P, L, R)``, ``scores (P, L, R)`` (module doc) and ``value_mask (P, R)``. SLAN adds ``slan``,
        its raw outputs for ``slan_objective``."""
        return self.family.forward(self, batch, attention)


def caption_words(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Every real word of every caption of the batch: ``txt (n,)`` (its caption) and ``pos (n, L)``
    (pooling weights over the caption's text positions, rows sum to 1).

    SCAN (``tokens``/``lengths``): each Karpathy token, positions 1 .. length - 2 (between ``<start>`` and
    ``<end>``). BERT text (``word_mask``/``offsets``): the word pieces of one word (pieces whose character
    spans touch, e.g. "sur" + "##fing"), averaged; [CLS], [SEP] and padding (empty spans) are no word.
    """
    if "tokens" in batch:
        lengths = torch.as_tensor(batch["lengths"])
        T = batch["tokens"].shape[1]
        at = torch.arange(T, device=lengths.device)[None]
        real = (at >= 1) & (at < lengths[:, None] - 1)  # (P, T)
        txt, col = real.nonzero(as_tuple=True)
        pos = torch.zeros(len(txt), T)
        pos[torch.arange(len(txt)), col.cpu()] = 1.0
        return txt.cpu(), pos
    offs, mask = batch["offsets"].cpu(), batch["word_mask"].cpu().bool()
    real = mask & (offs[..., 1] > offs[..., 0])  # (P, L)
    prev_end = torch.nn.functional.pad(offs[..., 1], (1, 0), value=-1)[:, :-1]
    prev_real = torch.nn.functional.pad(real, (1, 0), value=False)[:, :-1]
    starts = real & ~(prev_real & (offs[..., 0] == prev_end))  # a piece that does not continue a word
    word_id = starts.long().cumsum(1) - 1  # per caption, the word each real piece belongs to
    txt_of, first = starts.nonzero(as_tuple=True)
    base = torch.cumsum(starts.sum(1), 0) - starts.sum(1)  # index of each caption's first word
    p_idx, l_idx = real.nonzero(as_tuple=True)
    pos = torch.zeros(len(txt_of), offs.shape[1])
    pos[base[p_idx] + word_id[p_idx, l_idx], l_idx] = 1.0
    return txt_of, pos / pos.sum(1, keepdim=True).clamp_min(1.0)


def word_views(out: dict, batch: dict, words: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Per word: q (n, d), w (n, R), values (n, R, d), value_mask (n, R), scores (n, R). ``words`` =
    ``(txt, pos)`` as :func:`caption_words` gives; default: the class-word matches (``match_txt/pos``)."""
    m, pos = words if words is not None else (batch["match_txt"], batch["match_pos"])
    dev = out["query"].device
    m, pos = m.to(dev), pos.to(dev, out["query"].dtype)
    L = out["query"].shape[1]
    pos = pos[:, :L]
    vm = out["value_mask"][m]
    scores = torch.einsum("nl,nlr->nr", pos, out["scores"][m].masked_fill(~vm[:, None, :], 0.0))
    return {"q": torch.einsum("nl,nld->nd", pos, out["query"][m]),
            "w": torch.einsum("nl,nlr->nr", pos, out["weights"][m]),
            "values": out["values"][m], "value_mask": vm, "scores": scores.masked_fill(~vm, PAD_SCORE)}


def match_losses(out: dict, batch: dict, cfg, generator: torch.Generator | None = None,
                 terms: tuple[str, ...] | None = None, net: MatchNet | None = None) -> dict:
    """``{"loss", "triplet" | "itc", "itm", "reg", "ccr", "ccs", "ica"}`` (module doc): the model's own
    terms (``MatchModel.objective``) plus the weighted CCR/CCS/ICA terms. ``terms`` forces extra terms
    to be computed (and logged) even at weight 0; by default only weighted terms are computed. ``net``:
    the ``MatchNet`` (SLAN reads its ITC queue from it; None = in-batch ITC only); ``generator`` also
    draws SLAN's ITM hard negatives."""
    terms = set(terms or ()) | {t for t in ("ccr", "ccs", "ica") if getattr(cfg, t) > 0}
    res = match_model(cfg.model).objective(net, out, batch, cfg, generator)
    main = res.pop("loss")
    if terms:
        if "query" not in out:
            raise ValueError("CCR/CCS/ICA need the word->region attention (SCAN t2i, MMCA or SLAN)")
        if terms & {"ccr", "ccs"}:
            words = caption_words(batch)
            v = word_views(out, batch, words)
            if "ccr" in terms:
                res["ccr"] = ccr_loss(v["q"], v["values"], v["w"], cfg.gamma_r, v["value_mask"])
            if "ccs" in terms:
                attended = torch.einsum("nr,nrd->nd", v["w"], v["values"])
                res["ccs"] = ccs_loss(v["q"], attended, words[0].to(attended.device), cfg.gamma_s, generator)
        if "ica" in terms:
            v = word_views(out, batch)
            has = batch["match_has_ref"]
            res["ica"] = lovasz_hinge(v["scores"][has], batch["match_labels"][has].to(v["scores"].device))
    res["loss"] = main + sum(getattr(cfg, t) * res[t] for t in ("ccr", "ccs", "ica") if t in res)
    return res
