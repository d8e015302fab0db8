"""Captioning losses (Show-Attend-Tell, METHODS section 1; ICA, section 2). Pure functions of tensors.

Each docstring gives the formula and the METHODS.md section it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common.losses import graph_zero as _zero
from ..common.losses import lovasz_hinge

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
