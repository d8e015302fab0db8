"""Loss functions shared by the captioning and matching models. Pure functions of tensors.

Each docstring gives the formula and the METHODS.md section it implements. Where a seed is silent
the choice made here is stated as the project's (sections 7's CCR/CCS are ours entirely).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that stays in the autograd graph of ``tensors`` (so ``.backward()`` works on empty batches)."""
    return sum(t.sum() * 0.0 for t in tensors)


# ---- captioning (section 1) ----------------------------------------------------------------------


# The two published Show-Attend-Tell loss balances (METHODS section 1); their reductions differ.
SAT_RECIPES = ("sgrvinod", "xu-theano")


def _check_recipe(recipe: str) -> None:
    if recipe not in SAT_RECIPES:
        raise ValueError(f"Show-Attend-Tell loss recipe must be one of {SAT_RECIPES}, got {recipe!r}")


def caption_xent(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                 recipe: str = "sgrvinod") -> torch.Tensor:
    """Teacher-forcing cross-entropy over the valid tokens M = {(b, s): mask[b, s]} (METHODS section 1).

    ``sgrvinod`` (PyTorch tutorial code, our default): mean over tokens,
        L = -(1/|M|) sum_{(b,s) in M} log p_{b,s};
    ``xu-theano`` (Xu et al.'s arctic-captions ``capgen.py``): sum over each caption's words, mean over
    the B captions, L = -(1/B) sum_b sum_{s: (b,s) in M} log p_{b,s}.
    logits (B, S, V), targets (B, S) long, mask (B, S) bool. Computed in fp32.
    """
    _check_recipe(recipe)
    if logits.shape[:2] != targets.shape or targets.shape != mask.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    if not bool(mask.any()):
        return _zero(logits)
    if recipe == "sgrvinod":
        return F.cross_entropy(logits[mask].float(), targets[mask])
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum") / mask.shape[0]


def doubly_stochastic(alphas: torch.Tensor, mask: torch.Tensor, alpha_c: float = 1.0,
                      recipe: str = "sgrvinod") -> torch.Tensor:
    """Doubly stochastic attention regulariser (METHODS section 1; Xu et al. 2015, eq. 14).

    With D_{b,i} = (1 - sum_{t valid} alpha[b, t, i])^2 over the B captions and P locations:
    ``sgrvinod``: alpha_c * (1/(B P)) sum_b sum_i D_{b,i} (mean over captions and locations);
    ``xu-theano``: alpha_c * (1/P) sum_i sum_b D_{b,i} (``((1 - alphas.sum(0))**2).sum(0).mean()``:
    summed over the minibatch's captions, averaged over locations). The paper's eq. 14 sums over
    locations per caption; neither code does. alphas (B, S, P), mask (B, S) bool (invalid steps do not
    count towards sum_t; Xu's batches hold captions of one length, so there are none).
    """
    _check_recipe(recipe)
    if alphas.dim() != 3 or alphas.shape[:2] != mask.shape:
        raise ValueError(f"alphas must be (B, S, P) and mask (B, S); got {tuple(alphas.shape)}, {tuple(mask.shape)}")
    total = (alphas.float() * mask[..., None].float()).sum(dim=1)  # (B, P)
    per = (1.0 - total) ** 2
    return alpha_c * (per.mean() if recipe == "sgrvinod" else per.sum(dim=0).mean())


# ---- Lovász hinge (section 3) and ICA (section 2) ---------------------------------------------------


def _lovasz_grad(labels_sorted: torch.Tensor) -> torch.Tensor:
    """Per-row gradient of the Lovász extension of the Jaccard loss w.r.t. errors sorted decreasingly.

    g = sum y*; J_k = 1 - (g - cumsum(y*)_k) / (g + cumsum(1 - y*)_k); grad_1 = J_1, grad_k = J_k - J_{k-1}.
    The union is never 0: its first term is 1 either through g or through 1 - y*_1.
    """
    g = labels_sorted.sum(dim=-1, keepdim=True)
    inter = g - labels_sorted.cumsum(dim=-1)
    union = g + (1.0 - labels_sorted).cumsum(dim=-1)
    jac = 1.0 - inter / union
    return torch.cat([jac[..., :1], jac[..., 1:] - jac[..., :-1]], dim=-1)


def lovasz_hinge(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary Lovász hinge, each row a separate map ("per image"), mean over rows (METHODS section 3).

    For one row with scores F (positive = foreground) and labels y in {0,1}^p:
    s = 2y - 1; e = 1 - F*s; sort e decreasingly (y permuted alike, y*); loss = <relu(e_sorted), grad(y*)>
    with grad from :func:`_lovasz_grad`. Berman et al., CVPR 2018 (bermanmaxim/LovaszSoftmax).
    Computed in fp32; labels may be bool/int/float; no gradient flows through the sort or the grad.
    An all-zero label row gives relu(1 + max F). scores, labels: (n, p). n = 0 gives a 0 with grad.
    """
    if scores.dim() != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must both be (n, p); got {tuple(scores.shape)} and {tuple(labels.shape)}")
    if scores.shape[0] == 0 or scores.shape[1] == 0:
        return _zero(scores)
    scores = scores.float()
    y = labels.detach().float()
    if bool(((y != 0) & (y != 1)).any()):
        raise ValueError("lovasz_hinge labels must be 0/1")
    errors = 1.0 - scores * (2.0 * y - 1.0)
    perm = errors.detach().argsort(dim=1, descending=True)
    errors_sorted = errors.gather(1, perm)
    grad = _lovasz_grad(y.gather(1, perm))
    return (F.relu(errors_sorted) * grad).sum(dim=1).mean()


def lovasz_hinge_flat(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász hinge of one flattened map: scores (p,), labels (p,). See :func:`lovasz_hinge`."""
    if scores.dim() != 1 or scores.shape != labels.shape:
        raise ValueError(f"scores and labels must both be (p,); got {tuple(scores.shape)} and {tuple(labels.shape)}")
    return lovasz_hinge(scores[None], labels[None])


def ica_loss(energies: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ICA loss (seed 000 section 3; METHODS section 2): mean Lovász hinge over matched steps.

    ICA = (1/n) sum_{j=1..n} LovaszHinge(e_j, y_j), where e_j (P,) are the pre-softmax attention energies
    of the decoder step predicting matched token j and y_j (P,) its label map (from ``ica.ica_labels``).
    energies, labels: (n, P). Returns a 0 that keeps the graph when n == 0 (a batch without matches).
    """
    if energies.dim() != 2 or energies.shape != labels.shape:
        raise ValueError(
            f"energies and labels must both be (n, P); got {tuple(energies.shape)} and {tuple(labels.shape)}"
        )
    if energies.shape[0] == 0:
        return _zero(energies)
    return lovasz_hinge(energies, labels)


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
