"""ICA supervision: label maps from mask coverage, and which decoder steps to supervise.

METHODS.md section 2. For a caption token that names a detected class c, the label over the G x G
attention grid marks the cells the merged mask M_c covers by >= 50%; when no cell reaches that (a
small object) the cell(s) with the largest coverage are marked, so a matched word never gets an empty
label. A word whose mask covers no cell at all (coverage 0 everywhere) cannot be supervised and is
dropped through the returned ``keep`` mask. The same rule gives region labels from the fraction of
each region box lying inside the mask. The fallback is for training labels only: the attention
metrics' reference (section 8, ``attention_metrics.reference_sets``) has none.

Coverage itself (fraction of each cell covered by the mask) is computed by
``vlcache.storage.masks.grid_coverage``; this module only turns it into labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention_metrics import reference_sets


def _labels_from_fraction(frac: torch.Tensor, threshold: float, valid: torch.Tensor | None, what: str):
    """The reference rule of the metrics (>= threshold), plus the training-only largest-fraction fallback."""
    labels = reference_sets(frac, threshold, valid, what)  # also checks shapes and range
    frac = frac.float()
    if valid is not None:  # padded entries are never labelled, not even by the fallback
        frac = frac.masked_fill(~torch.as_tensor(valid, device=frac.device).bool().expand_as(frac), 0.0)
    if frac.shape[1] == 0:
        return frac.clone(), torch.zeros(frac.shape[0], dtype=torch.bool, device=frac.device)
    best = frac.max(dim=1, keepdim=True).values
    keep = best.squeeze(1) > 0
    fallback = ~labels.any(dim=1, keepdim=True) & (frac == best)
    labels = (labels | fallback) & keep[:, None]
    return labels.float(), keep


def ica_labels(coverage: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid label maps: (labels (n, P) float in {0, 1}, keep (n,) bool).

    coverage: (n, G, G) or (n, P), the fraction of each grid cell covered by the word's merged mask.
    labels[j, i] = 1 when coverage[j, i] >= threshold; if no cell of row j reaches it, the cell(s) with
    the largest coverage are 1. keep[j] is False (and labels[j] all 0) when row j has no coverage at
    all: drop those rows (``labels[keep]``, and the matching energies) before :func:`losses.ica_loss`.
    """
    if coverage.dim() == 3:
        coverage = coverage.reshape(coverage.shape[0], -1)
    return _labels_from_fraction(coverage, threshold, None, "coverage")


def region_labels(
    region_inside_fraction: torch.Tensor, threshold: float = 0.5, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Region labels by the same rule: (labels (n, R) float, keep (n,) bool).

    region_inside_fraction (n, R): the fraction of each region box lying inside the word's merged
    mask. ``valid`` (n, R) or (R,) bool marks real regions; padded regions are never labelled.
    """
    return _labels_from_fraction(region_inside_fraction, threshold, valid, "region_inside_fraction")


@dataclass
class MatchedSteps:
    """Supervision targets for a batch: parallel (m,) long tensors.

    ``batch``: row in the batch; ``step``: decoder step index (into the model's (B, T-1, ...) outputs)
    that predicts the token; ``label``: class id; ``token``: Karpathy token index in the caption.
    """

    batch: torch.Tensor
    step: torch.Tensor
    label: torch.Tensor
    token: torch.Tensor

    def __len__(self) -> int:
        return int(self.batch.numel())

    def select(self, per_step: torch.Tensor) -> torch.Tensor:
        """Rows of a (B, T-1, ...) model output at the supervised steps, e.g. energies -> (m, P)."""
        return per_step[self.batch.to(per_step.device), self.step.to(per_step.device)]


def matched_steps(
    num_tokens: torch.Tensor,
    spans: torch.Tensor,
    labels: torch.Tensor,
    counts: torch.Tensor | None = None,
    max_len: int = 50,
) -> MatchedSteps:
    """The (batch, decoder step, class id) triples to supervise for one caption per batch row.

    num_tokens (B,): Karpathy token count of each caption (before truncation). spans (B, K, 2+):
    ``token_start, token_end_exclusive`` (the store's ``matches/span``; extra columns are ignored).
    labels (B, K): class id, -1 = padding. counts (B,): valid matches per row (default: labels >= 0).

    Every token k of a matched span is supervised. With the encoding ``<start> w_0 .. <end>`` token k
    sits at position k + 1 and is predicted by decoder step k (see ``sat``), so step = k. Tokens at or
    past ``min(num_tokens, max_len)`` were truncated away by the vocabulary and are dropped. Duplicate
    (row, token, class) triples (overlapping spans of one class) are kept once.
    """
    num_tokens = torch.as_tensor(num_tokens).long().cpu()
    spans = torch.as_tensor(spans).long().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    B = num_tokens.shape[0]
    if spans.dim() != 3 or spans.shape[0] != B or spans.shape[2] < 2:
        raise ValueError(f"spans must be (B={B}, K, >=2), got {tuple(spans.shape)}")
    if labels.shape != spans.shape[:2]:
        raise ValueError(f"labels must be (B, K) = {tuple(spans.shape[:2])}, got {tuple(labels.shape)}")
    K = spans.shape[1]
    if counts is None:
        valid = labels >= 0
    else:
        counts = torch.as_tensor(counts).long().cpu()
        if counts.shape != (B,) or bool((counts < 0).any()) or bool((counts > K).any()):
            raise ValueError(f"counts must be (B,) = ({B},) with values in [0, {K}], got {counts.tolist()}")
        valid = torch.arange(K)[None] < counts[:, None]
    seen: set[tuple[int, int, int]] = set()
    out: list[tuple[int, int, int]] = []
    for b, j in valid.nonzero().tolist():
        start, end, cls = int(spans[b, j, 0]), int(spans[b, j, 1]), int(labels[b, j])
        if cls < 0:
            raise ValueError(f"batch row {b}, match {j}: class id {cls} inside the valid count")
        if not 0 <= start < end <= int(num_tokens[b]):
            raise ValueError(
                f"batch row {b}, match {j}: span [{start}, {end}) is not inside the caption's "
                f"{int(num_tokens[b])} tokens"
            )
        for k in range(start, min(end, int(num_tokens[b]), max_len)):
            if (b, k, cls) not in seen:
                seen.add((b, k, cls))
                out.append((b, k, cls))
    t = torch.tensor(out, dtype=torch.long).reshape(-1, 3)
    return MatchedSteps(batch=t[:, 0], step=t[:, 1], label=t[:, 2], token=t[:, 1].clone())
