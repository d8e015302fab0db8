import math

import pytest
import torch
from segmentation_models_pytorch.losses import LovaszLoss

from vlcache.stages.train.losses import (
    caption_xent,
    ccr_loss,
    ccs_loss,
    derangement,
    doubly_stochastic,
    hardest_negative_triplet,
    ica_loss,
    lovasz_hinge,
    lovasz_hinge_flat,
)

torch.set_num_threads(2)


# ---- brute-force Lovász extension of the Jaccard loss ------------------------------------------------


def jaccard_loss_of_set(mispredicted: set[int], positives: set[int]) -> float:
    """Delta_J(M) = |M| / |G u M|, with Delta_J(empty) = 0."""
    union = positives | mispredicted
    return len(mispredicted) / len(union) if union else 0.0


def brute_lovasz_hinge(scores: torch.Tensor, labels: list[int]) -> torch.Tensor:
    """sum_k m_(k) (Delta(top-k) - Delta(top-(k-1))), explicit sets, m = relu(1 - F s)."""
    signs = torch.tensor([2.0 * y - 1.0 for y in labels], dtype=scores.dtype)
    m = torch.relu(1.0 - scores * signs)
    order = sorted(range(len(labels)), key=lambda i: -float(m[i].detach()))
    positives = {i for i, y in enumerate(labels) if y == 1}
    total = scores.sum() * 0.0
    prev = 0.0
    for k in range(1, len(order) + 1):
        cur = jaccard_loss_of_set(set(order[:k]), positives)
        total = total + m[order[k - 1]] * (cur - prev)
        prev = cur
    return total


def test_lovasz_matches_brute_force_values_and_gradients():
    gen = torch.Generator().manual_seed(0)
    for trial in range(150):
        p = int(torch.randint(1, 8, (1,), generator=gen))
        labels = torch.randint(0, 2, (p,), generator=gen)
        if trial % 10 == 0:
            labels.zero_()
        elif trial % 10 == 1:
            labels.fill_(1)
        base = torch.randn(p, generator=gen, dtype=torch.float64) * 2
        mine_in = base.clone().float().requires_grad_(True)
        ref_in = base.clone().requires_grad_(True)
        mine = lovasz_hinge_flat(mine_in, labels)
        ref = brute_lovasz_hinge(ref_in, labels.tolist())
        mine.backward()
        ref.backward()
        assert mine.item() == pytest.approx(ref.item(), abs=1e-5), (trial, labels.tolist())
        torch.testing.assert_close(mine_in.grad.double(), ref_in.grad, atol=1e-5, rtol=1e-5)


def test_lovasz_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 0]])
    x = scores.clone().float().requires_grad_(True)
    lovasz_hinge(x, labels).backward()
    eps = 1e-3
    for i in range(3):
        for j in range(6):
            up, down = scores.clone(), scores.clone()
            up[i, j] += eps
            down[i, j] -= eps
            fd = (brute_rows(up, labels) - brute_rows(down, labels)) / (2 * eps)
            assert x.grad[i, j].item() == pytest.approx(fd, abs=1e-3)


def brute_rows(scores, labels):
    return sum(brute_lovasz_hinge(s, y.tolist()).item() for s, y in zip(scores, labels)) / len(scores)


def test_lovasz_matches_segmentation_models_pytorch():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 49, generator=gen) * 3
    labels = (torch.rand(5, 49, generator=gen) > 0.7).float()
    labels[3] = 0  # empty map
    labels[4] = 1  # full map
    a = scores.clone().requires_grad_(True)
    b = scores.clone().requires_grad_(True)
    mine = lovasz_hinge(a, labels)
    theirs = LovaszLoss(mode="binary", per_image=True, from_logits=True)(b.reshape(5, 7, 7), labels.reshape(5, 7, 7))
    mine.backward()
    theirs.backward()
    assert mine.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad)


def test_lovasz_empty_and_full_masks_and_separation():
    scores = torch.tensor([[0.3, -2.0, 1.5, 0.0]])
    # all-zero label: relu(1 + max F)
    assert lovasz_hinge(scores, torch.zeros(1, 4)).item() == pytest.approx(1 + 1.5)
    # all-one label: errors 1 - F = (.7, 3, -.5, 1); every Jaccard step is 1/4 -> (3 + 1 + .7 + 0) / 4
    assert lovasz_hinge(scores, torch.ones(1, 4)).item() == pytest.approx(1.175)
    # perfectly separated with margin: zero loss and zero gradient
    s = torch.tensor([[3.0, -2.0, 1.0, -1.5]], requires_grad=True)
    loss = lovasz_hinge(s, torch.tensor([[1, 0, 1, 0]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(s.grad) == 0


def test_lovasz_accepts_bool_labels_and_half_scores_in_fp32():
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 10, generator=gen)
    labels = torch.rand(4, 10, generator=gen) > 0.5
    ref = lovasz_hinge(scores, labels.float())
    out = lovasz_hinge(scores.half(), labels)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(lovasz_hinge(scores.half().float(), labels.float()).item(), rel=1e-6)
    assert out.item() == pytest.approx(ref.item(), rel=1e-2)
    with pytest.raises(ValueError, match="0/1"):
        lovasz_hinge(scores, labels.float() * 2)
    with pytest.raises(ValueError, match=r"\(n, p\)"):
        lovasz_hinge(scores, labels[:, :3])


def test_lovasz_is_mean_of_rows():
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(3, 8, generator=gen)
    labels = torch.rand(3, 8, generator=gen) > 0.5
    rows = [lovasz_hinge_flat(s, y).item() for s, y in zip(scores, labels)]
    assert lovasz_hinge(scores, labels).item() == pytest.approx(sum(rows) / 3, rel=1e-6)


def test_ica_loss_mean_and_empty_batch_keeps_graph():
    gen = torch.Generator().manual_seed(5)
    e = torch.randn(4, 9, generator=gen, requires_grad=True)
    y = torch.rand(4, 9, generator=gen) > 0.6
    y[:, 0] = True
    assert ica_loss(e, y).item() == pytest.approx(lovasz_hinge(e, y).item())
    empty = e[:0]
    loss = ica_loss(empty, torch.zeros(0, 9))
    loss.backward()
    assert loss.item() == 0.0 and e.grad is not None and torch.count_nonzero(e.grad) == 0


# ---- captioning losses -------------------------------------------------------------------------------


def test_caption_xent_reductions():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 4, 7, generator=gen)
    targets = torch.randint(0, 7, (2, 4), generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    terms = [
        -torch.log_softmax(logits[b, s], -1)[targets[b, s]].item() for b in range(2) for s in range(4) if mask[b, s]
    ]
    assert caption_xent(logits, targets, mask).item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    # Xu et al.: summed over each caption's words, averaged over the 2 captions
    assert caption_xent(logits, targets, mask, "xu-theano").item() == pytest.approx(sum(terms) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="shape mismatch"):
        caption_xent(logits, targets[:, :3], mask)
    with pytest.raises(ValueError, match=r"one of \('sgrvinod', 'xu-theano'\), got 'xu'"):
        caption_xent(logits, targets, mask, "xu")


def test_doubly_stochastic_reductions():
    gen = torch.Generator().manual_seed(7)
    alphas = torch.softmax(torch.randn(2, 3, 5, generator=gen), -1)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    total = 0.0
    for b in range(2):
        for i in range(5):
            s = sum(alphas[b, t, i].item() for t in range(3) if mask[b, t])
            total += (1 - s) ** 2
    # default (sgrvinod): mean over the 2 captions and the 5 locations; Xu: summed over captions, mean over locations
    assert doubly_stochastic(alphas, mask).item() == pytest.approx(total / 10, rel=1e-6)
    assert doubly_stochastic(alphas, mask, alpha_c=0.5).item() == pytest.approx(total / 20, rel=1e-6)
    assert doubly_stochastic(alphas, mask, recipe="xu-theano").item() == pytest.approx(total / 5, rel=1e-6)
    # attention that visits each location exactly once costs nothing
    perfect = torch.eye(3)[None]
    assert doubly_stochastic(perfect, torch.ones(1, 3, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="recipe must be one of"):
        doubly_stochastic(alphas, mask, recipe="sum")


def test_sat_recipes_equal_their_reference_code():
    """Each recipe, end to end, equals a line-by-line transcription of its reference code's loss.

    sgrvinod train.py: ``criterion(pack_padded(scores), pack_padded(targets)) + alpha_c * ((1. -
    alphas.sum(dim=1)) ** 2).mean()`` (alphas zero at steps not decoded). Xu et al. capgen.py, time-major
    (T, N, ...) with one caption length per batch: ``cost = (-log(p[x] + 1e-8) * mask).sum(0); cost.mean()
    + alpha_c * ((1. - alphas.sum(0)) ** 2).sum(0).mean()``."""
    gen = torch.Generator().manual_seed(8)
    N, T, P, V = 4, 6, 9, 11
    logits = torch.randn(N, T, V, generator=gen)
    targets = torch.randint(0, V, (N, T), generator=gen)
    alphas = torch.softmax(torch.randn(N, T, P, generator=gen), -1)
    lengths = torch.tensor([6, 5, 3, 2])
    mask = torch.arange(T)[None] < lengths[:, None]
    from torch.nn.utils.rnn import pack_padded_sequence
    ours = caption_xent(logits, targets, mask) + doubly_stochastic(alphas, mask)
    ref = (torch.nn.CrossEntropyLoss()(pack_padded_sequence(logits, lengths, batch_first=True).data,
                                       pack_padded_sequence(targets, lengths, batch_first=True).data)
           + 1.0 * ((1.0 - (alphas * mask[..., None]).sum(dim=1)) ** 2).mean())
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    full = torch.ones(N, T, dtype=torch.bool)  # Xu's HomogeneousData: every caption of a batch has length T
    ours = caption_xent(logits, targets, full, "xu-theano") + doubly_stochastic(alphas, full, 1.0, "xu-theano")
    x, a = targets.T, alphas.transpose(0, 1)  # time-major, as capgen.py
    probs = torch.softmax(logits.transpose(0, 1), -1)
    cost = -torch.log(probs.gather(2, x[..., None])[..., 0] + 1e-8)
    ref = cost.sum(0).mean() + 1.0 * ((1.0 - a.sum(0)) ** 2).sum(0).mean()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


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
