"""The one interface every matching model implements (METHODS §4, §6, §9), so the training loop
(``train``), the evaluator (``evaluate``) and the ablations (``ablation``) use a model without knowing
which one it is. Each model is one module (``scan``, ``mmca``, ``slan``) with a :class:`MatchModel`
subclass, registered by name in ``registry`` (the config's ``model``).

A model's network (an ``nn.Module``: tensors in, tensors out) sits inside ``MatchNet`` (``model``) as
``net.net``; ``net.regions(x)`` standardises the visual features the network reads (``MatchNet`` doc).
The hooks take that ``MatchNet`` and the batch dicts of ``data`` and return tensors:

- what the model reads: ``text`` (``"tokens"``: vocabulary ids, a vocabulary is built; ``"bert"``:
  frozen BERT outputs, from the text cache or encoded online) and ``visual`` (``"regions"``:
  ``regions/feats``; ``"grid"``: ``grid/feats``);
- building: :meth:`check_config`, :meth:`options` (the model's own hyperparameters, :attr:`defaults`
  overridden by the config's ``model_options``), :meth:`network_args` (saved in checkpoints as ``model_args``),
  :meth:`visual_width`, :meth:`unused_parameters` (DDP);
- training: :meth:`forward` (all-pairs ``sim`` + matched-pair attention), :meth:`objective` (the model's
  own loss terms; CCR/CCS/ICA are added by ``model.match_losses`` for every model), :meth:`after_step`;
- evaluation: :meth:`similarity` (every pair of a split), :meth:`attention` (matched pairs only),
  :meth:`attention_missing`, :meth:`evaluate_words` (what the attention metrics score, plus any extra
  scores), :meth:`figures` and :meth:`report_lines` (the model's own figures and report section).

Attention (``forward``/``attention``): word->region ``query (P, L, d)``, ``values (P, R, d)``, ``weights
(P, L, R)`` (softmax over regions), ``scores (P, L, R)`` (what ICA's Lovász hinge ranks) and ``value_mask
(P, R)``. A model with softmax weights only scores log(w · R_valid) (:func:`attention_scores`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from .data import pair_batch
from .losses import hardest_negative_triplet

PAD_SCORE = -100.0


def report_number(v) -> str:
    """A score for ``report.md``: two decimals, n/a when undefined (None, NaN)."""
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.2f}"


def attention_scores(weights: torch.Tensor, value_mask: torch.Tensor) -> torch.Tensor:
    """ICA scores from softmax weights ``(P, L, R)``: log(w · R_valid), -inf at padded regions (module doc)."""
    logw = torch.log(weights.clamp_min(1e-12)) + torch.log(value_mask.sum(1).float())[:, None, None]
    return logw.masked_fill(~value_mask[:, None, :], float("-inf"))


@torch.no_grad()
def query_attention(net, data: dict, txt: torch.Tensor, pos: torch.Tensor, device, chunk: int = 256) -> torch.Tensor:
    """Word->region attention ``(n, R)`` of queries ``txt (n,)`` (caption index into ``data``) pooled
    over text positions ``pos (n, L)``, each caption paired with its own image. Eval mode."""
    net.eval()
    out = torch.zeros(len(txt), data["region_mask"].shape[1])
    for s in range(0, len(txt), chunk):
        sub, inv = pair_batch(data, txt[s:s + chunk], device)
        p = pos[s:s + chunk]
        w = net.attention(sub)["weights"].cpu()  # (u, L, R)
        L = w.shape[1]
        out[s:s + chunk] = torch.einsum("nl,nlr->nr", p[:, :L].float(), w[inv].float())
    return out


class MatchModel(ABC):
    """One matching model (module doc). Subclasses set ``name``, ``text``, ``visual`` and ``network`` and
    implement :meth:`network_args`, :meth:`forward`, :meth:`attention` and :meth:`similarity`; the other
    hooks default to what a hardest-negative-triplet model with no extras needs."""

    name: str = ""
    text: str = "bert"  # "tokens" | "bert"
    visual: str = "regions"  # "regions" | "grid"
    network: type[nn.Module]
    shortlist: bool = False  # has a cheap shortlist score, so evaluation can shortlist-and-rerank (MMCA)
    defaults: dict = {}  # hyperparameters of this model alone and their defaults (the config's model_options)

    # ------------------------------------------------------------------------------------- building
    def check_config(self, cfg) -> None:
        """Raise ValueError for a config this model cannot train with."""

    def options(self, cfg) -> dict:
        """This model's own hyperparameters: :attr:`defaults` overridden by the config's ``model_options``
        (``--set model_options.NAME=VALUE``, recorded in the run's config.yaml). A new model declares its
        hyperparameters here instead of adding fields to the shared config; an unknown name is an error."""
        given = dict(getattr(cfg, "model_options", None) or {})
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise ValueError(f"model_options {unknown} are not hyperparameters of model {self.name!r}; it takes "
                             f"{sorted(self.defaults) or 'none'}")
        return {**self.defaults, **given}

    @abstractmethod
    def network_args(self, cfg, visual_dim: int, vocab_size: int, text_dim: int) -> dict:
        """The network's constructor arguments (saved in checkpoints, without ``kind``)."""

    def visual_width(self, args: dict) -> int:
        """Width of the visual features the network reads, from its arguments (``MatchNet``'s statistics)."""
        return int(args["region_dim"])

    def unused_parameters(self, net) -> bool:
        """True when some parameters never get a gradient, so DDP must look for them (an extra graph walk)."""
        return False

    # ------------------------------------------------------------------------------------- training
    @abstractmethod
    def forward(self, net, batch: dict, attention: bool) -> dict:
        """``sim (P, P)`` (row p = image of caption p, column = caption) and, with ``attention``, the
        matched pairs' attention (module doc)."""

    def objective(self, net, out: dict, batch: dict, cfg, generator: torch.Generator | None) -> dict:
        """The model's own loss terms, with ``"loss"`` their weighted sum. Default: the hardest-negative
        triplet (METHODS §4/§6), other captions of the same image negatives unless
        ``same_image_negatives`` is off."""
        ids = None if cfg.same_image_negatives else batch["txt_img"]
        triplet = hardest_negative_triplet(out["sim"], cfg.margin, image_ids=ids)
        return {"triplet": triplet, "loss": triplet}

    def after_step(self, net, out: dict, batch: dict) -> None:
        """Called after every optimizer step on every rank (e.g. a queue update)."""

    # ----------------------------------------------------------------------------------- evaluation
    @abstractmethod
    def similarity(self, net, data: dict, device, rerank_top: int = 0, block: int = 1024) -> dict:
        """``sim (n_img, n_txt)`` on the CPU for a split batch (``data.load_split``), eval mode set by the
        caller; a ``shortlist`` model with ``rerank_top`` also returns ``sim_t2i`` and ``n_pairs``."""

    @abstractmethod
    def attention(self, net, batch: dict) -> dict:
        """Word->region attention of matched pairs only (caption p with image ``txt_img[p]``)."""

    def attention_missing(self, cfg) -> str | None:
        """Why this configuration has no word->region attention (then no attention metrics), or None."""
        return None

    def evaluate_words(self, net, data: dict, has: torch.Tensor, device, store, cfg, figures: int) -> dict:
        """``weights (n, R)``: word->region attention of the matched words ``has`` (with a reference) for
        the attention metrics; a model may add ``scores`` (merged into the evaluation's scores) and
        anything its :meth:`figures` needs."""
        return {"weights": query_attention(net, data, data["match_txt"][has], data["match_pos"][has], device)}

    def figures(self, run, image_of, data: dict, has: torch.Tensor, words: dict, limit: int, split: str) -> list[Path]:
        """The model's own evaluation figures (``image_of(row)`` -> HxWx3 uint8), besides the attention ones."""
        return []

    def report_lines(self, scores: dict, config: dict) -> list[str]:
        """The model's own section of ``report.md`` (markdown lines)."""
        return []

    def config_lines(self, config: dict) -> list[str]:
        """The model's settings in the report's "How this was made" list."""
        return []
