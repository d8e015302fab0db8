"""Attention quality metrics (METHODS.md section 8; seed 002 names them, the project defines them).

For a word with attention weights w over p key fragments (regions or grid cells):

- reference set G (:func:`reference_sets`): the fragments lying at least 50% inside the word's merged
  mask (grid cells: covered >= 50%, exact pixel overlap; regions: >= 50% of the box inside). There is
  no fallback: a word whose G is empty is not scored, and :func:`attention_prf` counts it as skipped.
  (ICA's *training* labels add the largest-coverage cells when G is empty, ``ica.ica_labels``; a metric
  must not, or a word whose object covers no cell would be scored against cells its object is not in.)
- attended set A: the highest-weighted fragments, in decreasing weight, until their cumulative
  weight reaches ``mass`` (0.5) of the row's total (rows are normalised, so a row that does not sum
  to 1, e.g. attention restricted to region keys, is read as a distribution);
- precision |A & G| / |A|, recall |A & G| / |G|, F1 their harmonic mean (0 when both are 0);
  each averaged over the scored words (F1 per word, then averaged);
- attention correctness (Liu et al., AAAI 2017): the attention mass inside the mask. With grid cells
  the mask covers cell i by a fraction c_i, so the mass inside is sum_i w_i c_i: exactly the mass the
  paper measures after spreading each cell's weight evenly over its pixels (nearest upsampling).
"""

from __future__ import annotations

import torch

_EPS = 1e-6  # absorbs float rounding in a fraction that is "exactly" the threshold


def reference_sets(fraction: torch.Tensor, threshold: float = 0.5, valid: torch.Tensor | None = None,
                   what: str = "fraction") -> torch.Tensor:
    """(n, p) bool: fragments whose ``fraction`` (n, p) inside the word's mask is >= ``threshold``.

    No fallback: a row with no such fragment stays empty. ``valid`` (n, p) or (p,) bool marks real
    fragments (padded regions are never a reference). Fractions outside [0, 1] are an error.
    """
    frac = torch.as_tensor(fraction)
    if frac.dim() != 2:
        raise ValueError(f"{what} must be (n, p), got shape {tuple(frac.shape)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    frac = frac.detach().float()
    if frac.numel() and bool(((frac < -_EPS) | (frac > 1 + _EPS) | ~torch.isfinite(frac)).any()):
        raise ValueError(f"{what} must hold fractions in [0, 1]; got min {frac.min().item()}, max {frac.max().item()}")
    ref = frac >= threshold - _EPS
    if valid is not None:
        valid = torch.as_tensor(valid, device=frac.device).bool()
        if valid.dim() == 1:
            valid = valid[None].expand_as(frac)
        if valid.shape != frac.shape:
            raise ValueError(f"valid mask {tuple(valid.shape)} does not match {what} {tuple(frac.shape)}")
        ref = ref & valid
    return ref


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

    weights (n, p) attention per word; reference (n, p) bool (:func:`reference_sets`). Returns
    {"precision", "recall", "f1"} (floats, NaN when no word has a reference), "n_words" (words scored)
    and "n_skipped" (words not scored because their reference is empty).
    """
    reference = torch.as_tensor(reference).bool()
    if reference.shape != weights.shape:
        raise ValueError(f"reference {tuple(reference.shape)} must match weights {tuple(weights.shape)}")
    has_ref = reference.any(dim=1)
    n = int(has_ref.sum())
    if n == 0:
        nan = float("nan")
        return {"precision": nan, "recall": nan, "f1": nan, "n_words": 0, "n_skipped": int(reference.shape[0])}
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
        "n_skipped": int(reference.shape[0]) - n,
    }


def attention_correctness(weights: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """(n,) attention mass inside each word's mask: sum_i w_i * coverage_i (weights normalised per row).

    coverage (n, p) or (n, G, G): fraction of each cell covered by the mask, in [0, 1]. Average it over
    the words :func:`attention_prf` scores (non-empty reference), so every metric has the same words.
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
