"""The Lovász hinge (common/losses.py) against a brute-force Lovász extension and segmentation-models-pytorch."""

import pytest
import torch
from segmentation_models_pytorch.losses import LovaszLoss

from vlcache.stages.common.losses import lovasz_hinge, lovasz_hinge_flat

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
