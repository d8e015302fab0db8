"""Matching losses: hardest-negative triplet (METHODS sections 4, 6) and the CCR/CCS attention constraints
(section 7, the project's definitions entirely). Pure functions of tensors.

Each docstring gives the formula and the METHODS.md section it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.losses import graph_zero as _zero

# ---- image-text matching (sections 4, 6) ------------------------------------------------------------


def hardest_negative_triplet(
    sim: torch.Tensor, margin: float = 0.2, image_ids: torch.Tensor | None = None, reduction: str = "sum"
) -> torch.Tensor:
    """VSE++ max-violation triplet loss, both directions (METHODS sections 4 and 6; Faghri et al. 2018).

    sim[i, j] = S(image i, caption j), positives on the diagonal. For each positive pair (i, i):
        l_i = max_{j != i} [m - sim[i, i] + sim[i, j]]_+  +  max_{j != i} [m - sim[i, i] + sim[j, i]]_+
    reduction "sum" (VSE++/SCAN's choice, the default) sums l_i over the batch, "mean" averages.
    ``image_ids`` (B,): pairs whose images are the same (several captions of one image in a batch)
    are not negatives. A row without negatives contributes 0.
    """
    if sim.dim() != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square (B, B) matrix, got {tuple(sim.shape)}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    B = sim.shape[0]
    if B == 0:
        return _zero(sim)
    pos = sim.diagonal()
    not_neg = torch.eye(B, dtype=torch.bool, device=sim.device)
    if image_ids is not None:
        image_ids = torch.as_tensor(image_ids, device=sim.device)
        if image_ids.shape != (B,):
            raise ValueError(f"image_ids must be (B,) = ({B},), got {tuple(image_ids.shape)}")
        not_neg = not_neg | (image_ids[:, None] == image_ids[None, :])
    cost_cap = (margin - pos[:, None] + sim).clamp(min=0).masked_fill(not_neg, 0.0)  # image i vs caption j
    cost_img = (margin - pos[None, :] + sim).clamp(min=0).masked_fill(not_neg, 0.0)  # caption j vs image i
    per_pair = cost_cap.max(dim=1).values + cost_img.max(dim=0).values
    return per_pair.sum() if reduction == "sum" else per_pair.mean()


# ---- CCR / CCS attention constraints (section 7, the project's definitions) -------------------------


def ccr_loss(
    q: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    gamma: float = 0.2,
    value_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Contrastive content re-sourcing (METHODS section 7; the project's definition of seed 002's CCR).

    a_i = sum_j w_ij v_ij;  abar_i = sum_j (1 - w_ij) v_ij / sum_j (1 - w_ij)   (valid j only)
    L_CCR = mean_i [gamma - cos(q_i, a_i) + cos(q_i, abar_i)]_+
    q (n, d) word queries, values (n, r, d) the keys/values each word attended over, weights (n, r)
    its attention (rows sum to 1 over valid j). ``value_mask`` (n, r) bool marks real (non-padded)
    values. A word with a single valid value has nothing left out and contributes nothing.
    """
    shapes = f"q {tuple(q.shape)}, values {tuple(values.shape)}, weights {tuple(weights.shape)}"
    if q.dim() != 2 or values.dim() != 3 or weights.dim() != 2:
        raise ValueError(f"expected q (n, d), values (n, r, d), weights (n, r); got {shapes}")
    n, r, d = values.shape
    if q.shape != (n, d) or weights.shape != (n, r):
        raise ValueError(f"inconsistent shapes: {shapes}")
    valid = torch.ones(n, r, dtype=torch.bool, device=q.device) if value_mask is None else value_mask.bool()
    if valid.shape != (n, r):
        raise ValueError(f"value_mask must be (n, r) = ({n}, {r}), got {tuple(valid.shape)}")
    w = weights * valid
    rest = (1.0 - weights) * valid
    rest_sum = rest.sum(dim=1)
    use = valid.sum(dim=1) >= 2
    if not bool(use.any()):
        return _zero(q, values, weights)
    attended = torch.einsum("nr,nrd->nd", w, values)
    left_out = torch.einsum("nr,nrd->nd", rest, values) / rest_sum.clamp(min=1e-12)[:, None]
    hinge = (gamma - F.cosine_similarity(q, attended, dim=-1) + F.cosine_similarity(q, left_out, dim=-1)).clamp(min=0)
    return hinge[use].mean()


def derangement(groups: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly random derangement within each group: (pi (n,) long, eligible (n,) bool).

    pi[i] is another member of i's group (never i) for groups of >= 2 members; members of singleton
    groups map to themselves and are not eligible. Uniform by rejection sampling (accepts ~1/e).
    """
    groups = torch.as_tensor(groups)
    if groups.dim() != 1:
        raise ValueError(f"group index must be (n,), got {tuple(groups.shape)}")
    pi = torch.arange(groups.shape[0])
    eligible = torch.zeros(groups.shape[0], dtype=torch.bool)
    for g in torch.unique(groups.cpu()):
        members = (groups.cpu() == g).nonzero().squeeze(1)
        m = members.numel()
        if m < 2:
            continue
        while True:
            p = torch.randperm(m, generator=generator)
            if bool((p != torch.arange(m)).all()):
                break
        pi[members] = members[p]
        eligible[members] = True
    return pi.to(groups.device), eligible.to(groups.device)


def ccs_loss(
    q: torch.Tensor,
    attended: torch.Tensor,
    caption_index: torch.Tensor,
    gamma: float = 0.2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Contrastive content swapping (METHODS section 7; the project's definition of seed 002's CCS).

    L_CCS = mean_i [gamma - cos(q_i, a_i) + cos(q_i, a_pi(i))]_+, pi a random derangement of the words
    of each caption (same caption, same image). q (n, d) word queries, attended (n, d) their attended
    content a_i, caption_index (n,) which caption each word belongs to. Captions with fewer than two
    matched words contribute nothing; when none has two, the loss is a 0 with grad.
    """
    if q.dim() != 2 or q.shape != attended.shape:
        raise ValueError(f"q and attended must both be (n, d); got {tuple(q.shape)} and {tuple(attended.shape)}")
    caption_index = torch.as_tensor(caption_index, device=q.device)
    if caption_index.shape != (q.shape[0],):
        raise ValueError(f"caption_index must be (n,) = ({q.shape[0]},), got {tuple(caption_index.shape)}")
    pi, eligible = derangement(caption_index, generator)
    if not bool(eligible.any()):
        return _zero(q, attended)
    own = F.cosine_similarity(q, attended, dim=-1)
    swapped = F.cosine_similarity(q, attended[pi], dim=-1)
    return (gamma - own + swapped).clamp(min=0)[eligible].mean()
