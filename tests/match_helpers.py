"""Checks shared by the matching models' tests (tests/match/)."""

from math import comb

import torch


def chance_rsum(n: int, c: int = 5) -> float:
    """Expected rsum of random scores: t->i R@K = K/n; i->t R@K = P(one of c own captions in the top K of c*n)."""
    t2i = sum(100 * min(k, n) / n for k in (1, 5, 10))
    i2t = sum(100 * (1 - comb(c * n - c, k) / comb(c * n, k)) for k in (1, 5, 10))
    return t2i + i2t


def assert_every_parameter_learns(model: torch.nn.Module, sim: torch.Tensor) -> None:
    """Backpropagate the hardest-negative triplet of a square ``sim`` (margin 1, large enough to be active
    at random init, both directions) and check every parameter gets a finite, non-zero gradient."""
    n = sim.shape[0]
    pos = sim.diag()
    off = ~torch.eye(n, dtype=torch.bool)
    cost_t = (1.0 + sim - pos[:, None]).clamp(min=0)[off].view(n, n - 1).max(1).values
    cost_i = (1.0 + sim - pos[None, :]).clamp(min=0).T[off].view(n, n - 1).max(1).values
    (cost_t.sum() + cost_i.sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
