import itertools
import json

import pytest
import torch

from vlcache.stages.caption.losses import caption_xent, doubly_stochastic
from vlcache.stages.caption.sat import ShowAttendTell
from vlcache.stages.common.vocab import Vocab

torch.set_num_threads(2)


def tiny(vocab_size=9, seed=0, peaky=False, feat_dim=8):
    torch.manual_seed(seed)
    m = ShowAttendTell(vocab_size, feat_dim=feat_dim, embed_dim=6, attn_dim=5, hidden_dim=7, dropout=0.5)
    if peaky:  # random-init outputs are near uniform; larger weights give decisions that differ
        for p in m.parameters():
            torch.nn.init.normal_(p, std=0.8)
    return m


def random_captions(B, T, V, gen):
    caps = torch.randint(3, V, (B, T), generator=gen)
    caps[:, 0] = 1
    return caps


# ---- vocabulary --------------------------------------------------------------------------------------


def test_vocab_build_encode_decode_roundtrip():
    caps = [["a", "dog", "runs"]] * 5 + [["a", "cat"]] * 5 + [["rare", "dog"]]
    v = Vocab.build(caps, min_count=5, max_len=3)
    assert v.itos[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert v.itos[4:] == ["a", "dog", "cat", "runs"]  # by count (10, 6, 5, 5), ties alphabetical
    assert "rare" not in v.stoi and len(v) == 8
    assert v.encode("a rare dog") == [1, v.stoi["a"], 3, v.stoi["dog"], 2]
    assert v.encode(["a", "dog", "runs", "far", "away"]) == [1, 4, 5, 7, 2]  # truncated to 3 words
    assert v.decode([1, 4, 5, 2, 6, 0]) == ["a", "dog"]
    assert v.decode_text([4, 3]) == "a <unk>"
    caps_t, lengths = v.encode_batch(["a dog", "a"])
    assert caps_t.tolist() == [[1, 4, 5, 2], [1, 4, 2, 0]] and lengths.tolist() == [4, 3]
    d = json.loads(json.dumps(v.to_dict()))
    assert Vocab.from_dict(d) == v
    with pytest.raises(ValueError, match="not a vlcache vocabulary"):
        Vocab.from_dict({"words": []})
    with pytest.raises(ValueError, match="collide"):
        Vocab(["<unk>"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v.decode([99])


# ---- teacher forcing -----------------------------------------------------------------------------------


def test_forward_shapes_mask_and_softmax():
    m = tiny()
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(3, 4, 8, generator=gen)
    caps = random_captions(3, 6, 9, gen)
    out = m(feats, caps, torch.tensor([6, 4, 2]))
    assert out["logits"].shape == (3, 5, 9)
    assert out["alphas"].shape == out["energies"].shape == (3, 5, 4)
    assert out["betas"].shape == (3, 5)
    assert out["mask"].tolist() == [[True] * 5, [True] * 3 + [False] * 2, [True] + [False] * 4]
    torch.testing.assert_close(out["alphas"], out["energies"].softmax(-1))
    assert ((out["betas"] > 0) & (out["betas"] < 1)).all()
    # fp16 features from the store are accepted
    half = m(feats.half(), caps, torch.tensor([6, 4, 2]))
    assert half["logits"].dtype == torch.float32


def test_step_alignment_energies_belong_to_the_step_predicting_the_next_token():
    """energies[:, s] depend on captions[:, :s] only; logits[:, s] on captions[:, :s+1] (predict s+1)."""
    m = tiny().eval()
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(2, 4, 8, generator=gen)
    caps = random_captions(2, 7, 9, gen)
    base = m(feats, caps)
    j = 3
    changed = caps.clone()
    changed[:, j] = torch.where(caps[:, j] == 4, 5, 4)
    alt = m(feats, changed)
    torch.testing.assert_close(alt["energies"][:, : j + 1], base["energies"][:, : j + 1])
    assert not torch.allclose(alt["energies"][:, j + 1], base["energies"][:, j + 1])
    torch.testing.assert_close(alt["logits"][:, :j], base["logits"][:, :j])
    assert not torch.allclose(alt["logits"][:, j], base["logits"][:, j])


def test_forward_rejects_bad_input():
    m = tiny()
    caps = torch.tensor([[1, 4, 2]])
    with pytest.raises(ValueError, match="16 channels, the model expects 8"):
        m(torch.randn(1, 4, 16), caps)
    with pytest.raises(ValueError, match="2 images but captions 1"):
        m(torch.randn(2, 4, 8), caps)
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(1, 4, 8), caps, torch.tensor([5]))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 9\)"):
        m(torch.randn(1, 4, 8), torch.tensor([[1, 40, 2]]))


def test_training_overfits_two_captions():
    torch.manual_seed(0)
    m = ShowAttendTell(8, feat_dim=8, embed_dim=16, attn_dim=16, hidden_dim=32, dropout=0.0)
    feats = torch.randn(2, 4, 8)
    caps = torch.tensor([[1, 4, 5, 6, 2], [1, 7, 6, 2, 0]])
    lengths = torch.tensor([5, 4])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = m(feats, caps, lengths)
        loss = caption_xent(out["logits"], caps[:, 1:], out["mask"]) + 0.01 * doubly_stochastic(
            out["alphas"], out["mask"]
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 5.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    assert m.greedy(feats, max_len=10) == [[4, 5, 6], [7, 6]]
    assert m.beam_search(feats, beam_size=3, max_len=10) == [[4, 5, 6], [7, 6]]
    assert m.training  # decoding restores the module's mode


# ---- decoding ------------------------------------------------------------------------------------------


def test_beam_one_equals_greedy():
    for seed in range(4):
        m = tiny(seed=seed, peaky=True)
        feats = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(seed))
        g = m.greedy(feats, max_len=8, return_details=True)
        b = m.beam_search(feats, beam_size=1, max_len=8, return_details=True)
        assert b.tokens == g.tokens and b.ended == g.ended
        torch.testing.assert_close(b.log_probs, g.log_probs)
        for x, y in zip(b.alphas, g.alphas):
            torch.testing.assert_close(x, y)


def teacher_forced(m, feats, tokens, ended):
    """Sequence log-probs and attention via the teacher-forced forward pass."""
    seqs = [[m.start_id] + t + ([m.end_id] if e else []) for t, e in zip(tokens, ended)]
    T = max(len(s) for s in seqs)
    caps = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        caps[i, : len(s)] = torch.tensor(s)
    lengths = torch.tensor([len(s) for s in seqs])
    m.eval()
    with torch.no_grad():
        return m.log_prob(feats, caps, lengths), m(feats, caps, lengths)["alphas"], lengths


def test_beam_scores_alphas_match_teacher_forcing_and_beat_greedy():
    improved = 0
    for seed in range(4):
        m = tiny(seed=seed, peaky=True)
        feats = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(10 + seed))
        g = m.greedy(feats, max_len=6, return_details=True)
        b = m.beam_search(feats, beam_size=3, max_len=6, return_details=True)
        lp, alphas, lengths = teacher_forced(m, feats, b.tokens, b.ended)
        torch.testing.assert_close(b.log_probs, lp, atol=1e-4, rtol=1e-4)
        for i, al in enumerate(b.alphas):
            torch.testing.assert_close(al, alphas[i, : lengths[i] - 1], atol=1e-5, rtol=1e-5)
        assert (b.log_probs >= g.log_probs - 1e-5).all()
        improved += int((b.log_probs > g.log_probs + 1e-3).sum())
    assert improved > 0  # the test models are ones where beam search actually matters


def test_large_beam_finds_the_exhaustive_best_sequence():
    V, max_len = 6, 3  # allowed tokens: <end>, <unk>, two words
    m = tiny(vocab_size=V, seed=3, peaky=True).eval()
    feats = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(5))
    allowed = [2, 3, 4, 5]
    cands = []
    for L in range(1, max_len + 1):
        for seq in itertools.product(allowed, repeat=L):
            if m.end_id in seq[:-1] or (L < max_len and seq[-1] != m.end_id):
                continue
            ended = seq[-1] == m.end_id
            cands.append((list(seq[:-1]) if ended else list(seq), ended))
    assert len(cands) == 1 + 3 + 9 + 27
    best = []
    for b in range(3):
        f = feats[b : b + 1].expand(len(cands), -1, -1)
        lp, _, _ = teacher_forced(m, f, [c[0] for c in cands], [c[1] for c in cands])
        best.append((cands[int(lp.argmax())], float(lp.max())))
    out = m.beam_search(feats, beam_size=12, max_len=max_len, return_details=True)
    for b in range(3):
        assert (out.tokens[b], out.ended[b]) == best[b][0]
        assert out.log_probs[b].item() == pytest.approx(best[b][1], abs=1e-4)


def test_batched_beam_search_equals_one_image_at_a_time():
    m = tiny(seed=1, peaky=True)
    feats = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(7))
    batched = m.beam_search(feats, beam_size=3, max_len=7, return_details=True)
    for b in range(4):
        single = m.beam_search(feats[b : b + 1], beam_size=3, max_len=7, return_details=True)
        assert single.tokens[0] == batched.tokens[b]
        assert single.log_probs[0].item() == pytest.approx(batched.log_probs[b].item(), abs=1e-5)


def test_decoding_never_emits_pad_or_start_and_respects_max_len():
    m = tiny(seed=2, peaky=True)
    feats = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(8))
    for out in (m.greedy(feats, max_len=4, return_details=True), m.beam_search(feats, 2, 4, return_details=True)):
        for toks, al, ended in zip(out.tokens, out.alphas, out.ended):
            assert all(t not in (0, 1, 2) for t in toks)
            assert len(toks) + int(ended) == al.shape[0] <= 4
            torch.testing.assert_close(al.sum(-1), torch.ones(al.shape[0]))
    with pytest.raises(ValueError, match="beam_size"):
        m.beam_search(feats, beam_size=0)
