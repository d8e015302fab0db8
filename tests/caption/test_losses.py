"""Captioning losses (caption/losses.py): ICA, cross-entropy and doubly stochastic reductions, the SAT recipes."""

import pytest
import torch

from vlcache.stages.caption.losses import caption_xent, doubly_stochastic, ica_loss
from vlcache.stages.common.losses import lovasz_hinge

torch.set_num_threads(2)


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
