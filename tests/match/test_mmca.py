import pytest
import torch

from match_helpers import assert_every_parameter_learns
from vlcache.stages.match.mmca import MMCA, TransformerUnit
from vlcache.stages.match.retrieval import recall_at_k

torch.set_num_threads(1)

RD, TD, D = 16, 12, 16


def _model(dropout=0.1, seed=0):
    torch.manual_seed(seed)
    return MMCA(region_dim=RD, text_dim=TD, d=D, heads=4, dropout=dropout)


def _batch(n_img, n_txt, R=5, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_img, R, RD, generator=g)
    words = torch.randn(n_txt, L, TD, generator=g)
    rcount = torch.randint(2, R + 1, (n_img,), generator=g)
    wcount = torch.randint(2, L + 1, (n_txt,), generator=g)
    rmask = torch.arange(R)[None] < rcount[:, None]
    wmask = torch.arange(L)[None] < wcount[:, None]
    return regions, rmask, words, wmask


def test_forward_shapes_norms_and_attention():
    model = _model().eval()
    regions, rmask, words, wmask = _batch(3, 3)
    out = model(regions, rmask, words, wmask)
    assert out["score"].shape == (3,)
    for k in ("i0", "c0", "i1", "c1"):
        assert out[k].shape == (3, D)
        assert torch.allclose(out[k].norm(dim=-1), torch.ones(3), atol=1e-5)
    s = (out["i0"] * out["c0"]).sum(-1) + 0.2 * (out["i1"] * out["c1"]).sum(-1)
    assert torch.allclose(out["score"], s)
    attn = out["attn"]
    assert attn.shape == (3, 6, 5)
    # valid word rows sum to 1 over regions, padded regions get 0, padded word rows are 0
    assert torch.allclose(attn.sum(-1)[wmask], torch.ones(int(wmask.sum())), atol=1e-5)
    assert (attn.masked_select(~rmask[:, None, :].expand_as(attn)) == 0).all()
    assert (attn[~wmask] == 0).all()
    assert torch.allclose(out["attended"], attn @ out["region_embed"])
    assert out["word_embed"].shape == (3, 6, D)


def test_padding_does_not_change_scores():
    model = _model().eval()
    regions, rmask, words, wmask = _batch(2, 2)
    base = model(regions, rmask, words, wmask)["score"]
    # extra padded slots, filled with garbage, must not matter
    regions2 = torch.cat([regions, 100 * torch.randn(2, 3, RD)], 1)
    rmask2 = torch.cat([rmask, torch.zeros(2, 3, dtype=torch.bool)], 1)
    regions2[~rmask2] = 50.0
    words2 = torch.cat([words, 100 * torch.randn(2, 4, TD)], 1)
    wmask2 = torch.cat([wmask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    words2[~wmask2] = -50.0
    assert torch.allclose(model(regions2, rmask2, words2, wmask2)["score"], base, atol=1e-5)


def test_every_parameter_gets_a_gradient_from_a_triplet_loss():
    model = _model().train()
    regions, rmask, words, wmask = _batch(4, 4)
    out = model(regions, rmask, words, wmask, all_pairs=True)
    sim = out["sim"]
    assert sim.shape == (4, 4)
    assert_every_parameter_learns(model, sim)


def test_attention_is_differentiable_for_ccr_ccs():
    model = _model().train()
    regions, rmask, words, wmask = _batch(2, 2)
    out = model(regions, rmask, words, wmask)
    # a CCR-like quantity: how relevant the attended content is to each word
    rel = torch.cosine_similarity(out["word_embed"], out["attended"], dim=-1)[wmask].mean()
    rel.backward()
    assert model.cross_unit.qkv.weight.grad.abs().sum() > 0
    assert model.region_fc.weight.grad.abs().sum() > 0


def test_score_matrix_equals_looping_forward():
    model = _model().train()
    regions, rmask, words, wmask = _batch(3, 4)
    S = model.score_matrix(regions, rmask, words, wmask, block=5)  # blocks split the 12 pairs unevenly
    assert model.training  # mode restored
    assert S.shape == (3, 4)
    model.eval()
    with torch.no_grad():
        for i in range(3):
            for t in range(4):
                s = model(regions[i:i + 1], rmask[i:i + 1], words[t:t + 1], wmask[t:t + 1])["score"]
                assert torch.allclose(S[i, t], s[0], atol=1e-5), (i, t)
        square = model(regions, rmask, words[:3], wmask[:3], all_pairs=True)["sim"]
    assert torch.allclose(square, S[:, :3], atol=1e-5)


def test_rerank_with_all_candidates_equals_exact_and_shortlist_orders_correctly():
    model = _model().eval()
    regions, rmask, words, wmask = _batch(4, 8, seed=3)
    t2i = torch.arange(4).repeat_interleave(2)
    S = model.score_matrix(regions, rmask, words, wmask)
    full = model.rerank(None, top_k=8, regions=regions, region_mask=rmask, words=words, word_mask=wmask, block=7)
    assert full["n_pairs"] == 32
    assert torch.allclose(full["i2t"], S, atol=1e-5) and torch.allclose(full["t2i"], S, atol=1e-5)
    assert recall_at_k(full["i2t"], t2i, sim_t2i=full["t2i"]) == recall_at_k(S, t2i)

    short = model.rerank(full["i0c0"], top_k=2, regions=regions, region_mask=rmask, words=words, word_mask=wmask)
    assert short["n_pairs"] < 32
    top_rows = full["i0c0"].topk(2, dim=1).indices
    for i in range(4):
        row = short["i2t"][i]
        kept = top_rows[i]
        assert torch.allclose(row[kept], S[i, kept], atol=1e-5)
        rest = torch.ones(8, dtype=torch.bool)
        rest[kept] = False
        assert row[rest].max() < row[kept].min()
        # the non-shortlisted keep their i0.c0 order
        assert torch.equal(row[rest].argsort(), full["i0c0"][i, rest].argsort())
    top_cols = full["i0c0"].topk(2, dim=0).indices
    for t in range(8):
        assert torch.allclose(short["t2i"][top_cols[:, t], t], S[top_cols[:, t], t], atol=1e-5)


def test_empty_masks_and_mismatched_pairs_are_errors():
    model = _model()
    regions, rmask, words, wmask = _batch(3, 3)
    rmask[1] = False
    with pytest.raises(ValueError, match="image 1 has no valid"):
        model(regions, rmask, words, wmask)
    regions, rmask, words, wmask = _batch(3, 2)
    with pytest.raises(ValueError, match="3 images, 2 texts"):
        model(regions, rmask, words, wmask)
    with pytest.raises(ValueError, match="divisible"):
        TransformerUnit(10, heads=4)


def test_transformer_unit_attention_matches_head_average():
    torch.manual_seed(0)
    unit = TransformerUnit(8, heads=2, dropout=0.0)
    x = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, True, False]])
    _, attn = unit(x, mask)
    q, k, _ = unit.qkv(x).view(1, 4, 3, 2, 4).permute(2, 0, 3, 1, 4)
    manual = ((q @ k.transpose(-1, -2)) / 2.0).masked_fill(~mask[:, None, None], float("-inf")).softmax(-1).mean(1)
    assert torch.allclose(attn, manual, atol=1e-6)
    assert (attn[..., 3] == 0).all()
