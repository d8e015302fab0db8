"""Checks shared by the matching models' tests (tests/match/)."""

import json
from math import comb
from pathlib import Path

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


def assert_resumed_equals_uninterrupted(full: Path, part: Path) -> None:
    """A run stopped and resumed (``part``) ends exactly as one that ran straight through (``full``): the same
    final weights, tensor for tensor, and the same metrics records (wall-clock times aside)."""
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    def records(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]

    assert records(full) == records(part)
