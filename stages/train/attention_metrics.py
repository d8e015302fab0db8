"""Attention quality metrics (METHODS.md section 8; seed 002 names them, the project defines them).

For a word with attention weights w over p key fragments (regions or grid cells) and a non-empty
reference set G (fragments that lie >= 50% inside the word's mask, see ``ica.region_labels``):

- attended set A: the highest-weighted fragments, in decreasing weight, until their cumulative
  weight reaches ``mass`` (0.5) of the row's total (rows are normalised, so a row that does not sum
  to 1, e.g. attention restricted to region keys, is read as a distribution);
- precision |A & G| / |A|, recall |A & G| / |G|, F1 their harmonic mean (0 when both are 0);
  each averaged over words with a non-empty reference (F1 per word, then averaged);
- attention correctness (Liu et al., AAAI 2017): the attention mass inside the mask. With grid cells
  the mask covers cell i by a fraction c_i, so the mass inside is sum_i w_i c_i: exactly the mass the
  paper measures after spreading each cell's weight evenly over its pixels (nearest upsampling).
"""

from __future__ import annotations

import torch


def _normalised(weights: torch.Tensor, what: str = "weights") -> torch.Tensor:
    w = weights.detach().float()
    if w.dim() != 2:
        raise ValueError(f"{what} must be (n, p), got shape {tuple(w.shape)}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what} must be finite and non-negative")
    total = w.sum(dim=1, keepdim=True)
    if w.shape[0] and bool((total <= 0).any()):
        rows = (total.squeeze(1) <= 0).nonzero().squeeze(1).tolist()
        raise ValueError(f"{what} rows {rows[:10]} sum to 0: no attention to measure")
    return w / total


def attended_sets(weights: torch.Tensor, mass: float = 0.5) -> torch.Tensor:
    """(n, p) bool: per row, the top-weighted fragments until cumulative weight >= mass (inclusive)."""
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    w = _normalised(weights)
    sorted_w, order = w.sort(dim=1, descending=True, stable=True)
    before = sorted_w.cumsum(dim=1) - sorted_w  # mass of the strictly higher-ranked fragments
    take_sorted = before < mass - 1e-6  # keep adding while the target is not reached yet
    take = torch.zeros_like(take_sorted)
    return take.scatter(1, order, take_sorted)


def attended_set(weights: torch.Tensor, mass: float = 0.5) -> torch.Tensor:
    """(p,) bool attended set of one word's weights (p,). See :func:`attended_sets`."""
    if weights.dim() != 1:
        raise ValueError(f"weights must be (p,), got shape {tuple(weights.shape)}")
    return attended_sets(weights[None], mass)[0]


def attention_prf(weights: torch.Tensor, reference: torch.Tensor, mass: float = 0.5) -> dict:
    """Attention precision, recall and F1 averaged over words with a non-empty reference.

    weights (n, p) attention per word; reference (n, p) bool. Returns {"precision", "recall", "f1"}
    (floats, NaN when no word has a reference) and "n_words" (words counted).
    """
    reference = torch.as_tensor(reference).bool()
    if reference.shape != weights.shape:
        raise ValueError(f"reference {tuple(reference.shape)} must match weights {tuple(weights.shape)}")
    has_ref = reference.any(dim=1)
    n = int(has_ref.sum())
    if n == 0:
        nan = float("nan")
        return {"precision": nan, "recall": nan, "f1": nan, "n_words": 0}
    attended = attended_sets(weights[has_ref], mass)
    ref = reference[has_ref].to(attended.device)
    hit = (attended & ref).sum(dim=1).float()
    precision = hit / attended.sum(dim=1).float()
    recall = hit / ref.sum(dim=1).float()
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(denom))
    return {
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "n_words": n,
    }


def attention_correctness(weights: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """(n,) attention mass inside each word's mask: sum_i w_i * coverage_i (weights normalised per row).

    coverage (n, p) or (n, G, G): fraction of each cell covered by the mask, in [0, 1]. Words whose
    mask covers nothing score 0; leave them out of averages (as :func:`attention_prf` does).
    """
    if coverage.dim() == 3:
        coverage = coverage.reshape(coverage.shape[0], -1)
    if coverage.shape != weights.shape:
        raise ValueError(f"coverage {tuple(coverage.shape)} must match weights {tuple(weights.shape)}")
    cov = coverage.detach().float()
    if bool(((cov < 0) | (cov > 1)).any()):
        raise ValueError("coverage must hold fractions in [0, 1]")
    w = _normalised(weights)
    return (w * cov.to(w.device)).sum(dim=1)
