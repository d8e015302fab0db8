"""Loss pieces both model families use: the Lovász hinge (ICA in captioning and matching) and a zero
that stays in the autograd graph. Pure functions of tensors.

Each docstring gives the formula and the METHODS.md section it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def graph_zero(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0 that stays in the autograd graph of ``tensors`` (so ``.backward()`` works on empty batches)."""
    return sum(t.sum() * 0.0 for t in tensors)


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
        return graph_zero(scores)
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
