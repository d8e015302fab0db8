"""Matching losses (match/losses.py): hardest-negative triplet, CCR, CCS and the derangement behind CCS."""

import math

import pytest
import torch

from vlcache.stages.match.losses import ccr_loss, ccs_loss, derangement, hardest_negative_triplet

torch.set_num_threads(2)


# ---- triplet -----------------------------------------------------------------------------------------


def brute_triplet(sim, margin, ids=None):
    B = len(sim)
    ids = list(range(B)) if ids is None else ids
    total = []
    for i in range(B):
        worst_c = max([max(0.0, margin - sim[i][i] + sim[i][j]) for j in range(B) if ids[j] != ids[i]], default=0.0)
        worst_i = max([max(0.0, margin - sim[i][i] + sim[j][i]) for j in range(B) if ids[j] != ids[i]], default=0.0)
        total.append(worst_c + worst_i)
    return total


def test_hardest_negative_triplet_vs_loops():
    gen = torch.Generator().manual_seed(8)
    sim = torch.rand(6, 6, generator=gen) * 2 - 1
    per = brute_triplet(sim.tolist(), 0.2)
    assert hardest_negative_triplet(sim, 0.2).item() == pytest.approx(sum(per), rel=1e-6)
    assert hardest_negative_triplet(sim, 0.2, reduction="mean").item() == pytest.approx(sum(per) / 6, rel=1e-6)
    ids = torch.tensor([0, 0, 1, 2, 2, 3])
    per_ids = brute_triplet(sim.tolist(), 0.2, ids.tolist())
    assert hardest_negative_triplet(sim, 0.2, image_ids=ids).item() == pytest.approx(sum(per_ids), rel=1e-6)
    assert sum(per_ids) != pytest.approx(sum(per))  # the id mask changes something in this case
    s = sim.clone().requires_grad_(True)
    hardest_negative_triplet(s).backward()
    assert s.grad.abs().sum() > 0
    assert hardest_negative_triplet(torch.tensor([[0.3]])).item() == 0.0  # no negatives


# ---- CCR / CCS on hand-built attention ---------------------------------------------------------------


def test_ccr_by_hand():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]])
    # word 0 attends mostly the matching value: a = (.75,.25), abar = (.25,.75) -> hinge negative -> 0
    # word 1 attends mostly the wrong one:     a = (.25,.75), abar = (.75,.25)
    weights = torch.tensor([[0.75, 0.25], [0.25, 0.75]])
    r = math.sqrt(0.625)
    w0 = max(0.0, 0.2 - 0.75 / r + 0.25 / r)
    w1 = max(0.0, 0.2 - 0.25 / r + 0.75 / r)
    assert w0 == 0.0 and w1 > 0
    assert ccr_loss(q, values, weights, gamma=0.2).item() == pytest.approx((w0 + w1) / 2, rel=1e-6)


def test_ccr_value_mask_and_single_value():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]], [[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    weights = torch.tensor([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])  # word 1 has one real value: skipped
    r = math.sqrt(0.625)
    expected = max(0.0, 0.2 - 0.25 / r + 0.75 / r)  # the padded (5, 5) value is ignored
    loss = ccr_loss(q, values, weights, value_mask=mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    only_single = ccr_loss(q[1:], values[1:], weights[1:], value_mask=mask[1:])
    only_single.backward()
    assert only_single.item() == 0.0


def test_ccs_by_hand():
    # caption 0 has two words (pi swaps them); caption 1 has one word and contributes nothing.
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    attended = torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    cap = torch.tensor([0, 0, 1])
    l0 = max(0.0, 0.2 - 1 / math.sqrt(2) + 1.0)  # cos(q0, a0) = .707, cos(q0, a1) = 1
    l1 = max(0.0, 0.2 - 0.0 + 1 / math.sqrt(2))  # cos(q1, a1) = 0,   cos(q1, a0) = .707
    assert ccs_loss(q, attended, cap).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    none = ccs_loss(q[2:], attended[2:], cap[2:])
    assert none.item() == 0.0


def test_derangement_stays_in_caption_without_fixed_points():
    groups = torch.tensor([4, 4, 4, 7, 7, 7, 7, 9])
    gen = torch.Generator().manual_seed(9)
    seen_size3 = set()
    for _ in range(60):
        pi, eligible = derangement(groups, gen)
        assert eligible.tolist() == [True] * 7 + [False]
        assert pi[7] == 7
        assert (pi[:7] != torch.arange(7)).all()
        assert (groups[pi] == groups).all()
        assert sorted(pi.tolist()) == list(range(8))
        seen_size3.add(tuple(pi[:3].tolist()))
    assert seen_size3 == {(1, 2, 0), (2, 0, 1)}  # both derangements of 3 occur
    a, _ = derangement(groups, torch.Generator().manual_seed(3))
    b, _ = derangement(groups, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
