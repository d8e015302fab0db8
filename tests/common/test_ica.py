import pytest
import torch

from vlcache.stages.common.ica import ica_labels, matched_steps, region_labels
from vlcache.stages.caption.losses import ica_loss
from vlcache.stages.caption.sat import ShowAttendTell
from vlcache.stages.common.vocab import Vocab

torch.set_num_threads(2)


# ---- labels ------------------------------------------------------------------------------------------


def test_ica_labels_threshold_fallback_and_drop():
    cov = torch.zeros(4, 3, 3)
    cov[0] = torch.tensor([[1.0, 0.5, 0.49], [0.0, 0.7, 0.0], [0.0, 0.0, 0.2]])  # cells >= .5
    cov[1, 2, 1] = 0.3  # small object: only the best cell
    cov[1, 0, 0] = 0.1
    cov[2, 0, 2] = cov[2, 1, 1] = 0.25  # tie for the best coverage: both cells
    cov[2, 2, 2] = 0.05
    # cov[3] stays 0: the word's mask covers nothing -> dropped
    labels, keep = ica_labels(cov)
    assert keep.tolist() == [True, True, True, False]
    assert labels.dtype == torch.float32 and labels.shape == (4, 9)
    assert labels[0].tolist() == [1, 1, 0, 0, 1, 0, 0, 0, 0]
    assert labels[1].nonzero().squeeze(1).tolist() == [7]
    assert labels[2].nonzero().squeeze(1).tolist() == [2, 4]
    assert labels[3].sum() == 0
    assert (labels[keep].sum(1) > 0).all()  # a kept word never has an empty label
    # flat (n, P) input gives the same labels; float rounding at the threshold still counts
    flat, _ = ica_labels(cov.reshape(4, 9))
    assert torch.equal(flat, labels)
    near, _ = ica_labels(torch.tensor([[0.4999999, 0.1]]))
    assert near.tolist() == [[1.0, 0.0]]
    higher, _ = ica_labels(cov[:1], threshold=0.9)
    assert higher[0].nonzero().squeeze(1).tolist() == [0]


def test_ica_labels_reject_bad_coverage():
    with pytest.raises(ValueError, match=r"fractions in \[0, 1\]"):
        ica_labels(torch.tensor([[0.2, 1.7]]))
    with pytest.raises(ValueError, match=r"must be \(n, p\)"):
        ica_labels(torch.zeros(3))
    with pytest.raises(ValueError, match="threshold"):
        ica_labels(torch.zeros(1, 4), threshold=0.0)


def test_region_labels_ignore_padded_regions():
    frac = torch.tensor([[0.9, 0.2, 0.6, 1.0], [0.1, 0.3, 0.0, 0.8], [0.0, 0.0, 0.0, 0.7]])
    valid = torch.tensor([True, True, True, False])  # region 3 is padding
    labels, keep = region_labels(frac, valid=valid)
    assert labels.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]]
    assert keep.tolist() == [True, True, False]
    per_row = torch.tensor([[True] * 4, [True] * 4, [True] * 4])
    labels2, keep2 = region_labels(frac, valid=per_row)
    assert labels2[2].tolist() == [0, 0, 0, 1] and keep2.tolist() == [True] * 3


# ---- matched steps -----------------------------------------------------------------------------------


def test_matched_steps_every_span_token_and_truncation():
    # row 0: "a teddy bear on a bench": span [1,3) teddy bear (77), [5,6) bench (13, cut by max_len 4)
    # row 1: 6 tokens, max_len 4 keeps tokens 0..3: span [2,3) kept, [3,5) keeps only token 3, [5,6) gone
    spans = torch.zeros(2, 4, 4, dtype=torch.int32)
    labels = torch.full((2, 4), -1, dtype=torch.int16)
    spans[0, 0, :2] = torch.tensor([1, 3])
    spans[0, 1, :2] = torch.tensor([5, 6])
    labels[0, :2] = torch.tensor([77, 13])
    spans[1, 0, :2] = torch.tensor([2, 3])
    spans[1, 1, :2] = torch.tensor([3, 5])
    spans[1, 2, :2] = torch.tensor([5, 6])
    labels[1, :3] = torch.tensor([1, 2, 3])
    ms = matched_steps(torch.tensor([6, 6]), spans, labels, max_len=4)
    got = list(zip(ms.batch.tolist(), ms.step.tolist(), ms.label.tolist()))
    assert got == [(0, 1, 77), (0, 2, 77), (1, 2, 1), (1, 3, 2)]
    assert len(ms) == 4
    # counts limit the valid matches; overlapping spans of one class are supervised once
    spans[1, 1, :2] = torch.tensor([2, 4])
    labels[1, 1] = 1
    ms2 = matched_steps(torch.tensor([6, 6]), spans, labels, counts=torch.tensor([1, 2]), max_len=50)
    assert list(zip(ms2.batch.tolist(), ms2.step.tolist(), ms2.label.tolist())) == [
        (0, 1, 77), (0, 2, 77), (1, 2, 1), (1, 3, 1)
    ]
    empty = matched_steps(torch.tensor([3]), torch.zeros(1, 2, 4), torch.full((1, 2), -1))
    assert len(empty) == 0 and empty.step.dtype == torch.long


def test_matched_steps_rejects_bad_spans():
    spans = torch.tensor([[[2, 9, 0, 0]]])
    with pytest.raises(ValueError, match=r"batch row 0, match 0: span \[2, 9\)"):
        matched_steps(torch.tensor([5]), spans, torch.tensor([[4]]))
    with pytest.raises(ValueError, match="class id -1 inside the valid count"):
        matched_steps(torch.tensor([5]), torch.tensor([[[0, 1]]]), torch.tensor([[-1]]), counts=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"labels must be \(B, K\)"):
        matched_steps(torch.tensor([5]), spans, torch.tensor([4]))


def test_matched_steps_select_the_energies_that_predict_the_matched_token():
    tokens = [["a", "dog", "on", "a", "bench"], ["two", "dogs", "and", "a", "cat"]]
    vocab = Vocab.build(tokens * 5, min_count=5, max_len=4)
    caps, lengths = vocab.encode_batch(tokens)
    spans = torch.tensor([[[1, 2], [4, 5]], [[1, 2], [4, 5]]])  # dog, bench | dogs, cat (cat truncated)
    labels = torch.tensor([[16, 13], [16, 15]])
    ms = matched_steps(torch.tensor([5, 5]), spans, labels, max_len=vocab.max_len)
    assert list(zip(ms.batch.tolist(), ms.step.tolist())) == [(0, 1), (1, 1)]
    # the decoder step s predicts captions[:, s + 1], which is the matched word
    for b, s, k in zip(ms.batch.tolist(), ms.step.tolist(), ms.token.tolist()):
        assert vocab.itos[int(caps[b, s + 1])] == tokens[b][k]
    torch.manual_seed(0)
    model = ShowAttendTell(len(vocab), feat_dim=8, embed_dim=6, attn_dim=5, hidden_dim=7)
    out = model(torch.randn(2, 9, 8), caps, lengths)
    sel = ms.select(out["energies"])
    assert sel.shape == (2, 9)
    torch.testing.assert_close(sel[1], out["energies"][1, 1])


def test_ica_loss_training_moves_attention_onto_the_label():
    torch.manual_seed(0)
    model = ShowAttendTell(8, feat_dim=8, embed_dim=6, attn_dim=8, hidden_dim=8, dropout=0.0)
    feats = torch.randn(2, 9, 8)
    caps = torch.tensor([[1, 4, 5, 2], [1, 6, 7, 2]])
    cov = torch.zeros(2, 3, 3)
    cov[0, 0, :2] = 1.0  # word at step 1 of row 0 -> top-left cells
    cov[1, 2, 2] = 0.3  # small object in row 1 -> its best cell only
    y, keep = ica_labels(cov)
    ms = matched_steps(torch.tensor([2, 2]), torch.tensor([[[1, 2]], [[0, 1]]]), torch.tensor([[3], [5]]))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)

    def mass_on_label():
        with torch.no_grad():
            a = ms.select(model(feats, caps)["alphas"])
        return (a * y).sum(1)

    before = mass_on_label()
    for _ in range(30):
        loss = ica_loss(ms.select(model(feats, caps)["energies"])[keep], y[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = mass_on_label()
    assert (after > before + 0.3).all() and (after > 0.7).all()
