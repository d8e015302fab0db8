import math

import pytest
import torch
import torch.nn.functional as F

from match_helpers import assert_every_parameter_learns
from vlcache.stages.match.scan import SCAN

torch.set_num_threads(1)

VOCAB, RD, EMB = 20, 12, 16
CONFIGS = [("t2i", "avg"), ("t2i", "lse"), ("i2t", "avg"), ("i2t", "lse")]


def _model(direction="t2i", agg="avg", **kw):
    torch.manual_seed(0)
    return SCAN(VOCAB, direction=direction, agg=agg, embed=EMB, region_dim=RD, word_dim=8, **kw)


def _batch(n_img, n_txt, R=5, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(n_img, R, RD, generator=g)
    rmask = torch.arange(R)[None] < torch.randint(2, R + 1, (n_img,), generator=g)[:, None]
    lengths = torch.randint(2, L + 1, (n_txt,), generator=g)
    tokens = torch.randint(1, VOCAB, (n_txt, L), generator=g) * (torch.arange(L)[None] < lengths[:, None])
    return regions, rmask, tokens, lengths


def _naive_pair(model, v, q_words, direction, agg):
    """SCAN's formulas for one (image, caption) pair, written with explicit loops."""
    q, c = (q_words, v) if direction == "t2i" else (v, q_words)  # queries, context
    s = [[float(q[i] @ c[j]) for j in range(len(c))] for i in range(len(q))]
    s = [[x if x > 0 else 0.1 * x for x in row] for row in s]
    col_norm = [math.sqrt(sum(s[i][j] ** 2 for i in range(len(q)))) + 1e-8 for j in range(len(c))]
    rel = []
    for i in range(len(q)):
        e = [math.exp(model.lambda_softmax * s[i][j] / col_norm[j]) for j in range(len(c))]
        w = [x / sum(e) for x in e]
        a = sum(w[j] * c[j] for j in range(len(c)))
        rel.append(float(F.cosine_similarity(q[i], a, dim=0)))
    if agg == "avg":
        return sum(rel) / len(rel)
    return math.log(sum(math.exp(model.lambda_lse * r) for r in rel)) / model.lambda_lse


@pytest.mark.parametrize("direction,agg", CONFIGS)
def test_sim_matrix_matches_naive_formula_and_matched_attention(direction, agg):
    model = _model(direction, agg)
    regions, rmask, tokens, lengths = _batch(3, 4)
    with torch.no_grad():
        img, cap = model.encode_image(regions), model.encode_text(tokens, lengths)
        S = model.sim_matrix(img, rmask, cap, lengths)
        assert S.shape == (3, 4)
        for i in range(3):
            for t in range(4):
                v, w = img[i][rmask[i]], cap[t, : lengths[t]]
                assert S[i, t].item() == pytest.approx(_naive_pair(model, v, w, direction, agg), abs=1e-5)
                att = model.attention(img[i:i + 1], rmask[i:i + 1], cap[t:t + 1], lengths[t:t + 1])
                assert att["sim"][0].item() == pytest.approx(S[i, t].item(), abs=1e-5)


def test_default_lambdas_follow_scan_flickr_settings():
    assert (_model("t2i").lambda_softmax, _model("t2i").lambda_lse) == (9.0, 6.0)
    assert (_model("i2t").lambda_softmax, _model("i2t").lambda_lse) == (4.0, 5.0)
    assert _model("t2i", lambda_softmax=3.0).lambda_softmax == 3.0


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_chunking_does_not_change_scores(direction):
    model = _model(direction, "lse")
    regions, rmask, tokens, lengths = _batch(5, 7)
    with torch.no_grad():
        img, cap = model.encode_image(regions), model.encode_text(tokens, lengths)
        whole = model.sim_matrix(img, rmask, cap, lengths)
        model.max_elements = 40  # fewer than one image x caption pair's R*L entries: 1 x 1 chunks
        tiny = model.sim_matrix(img, rmask, cap, lengths)
        model.max_elements = 5 * 6 * 3  # 3 pairs per chunk
        some = model.sim_matrix(img, rmask, cap, lengths)
    assert torch.allclose(whole, tiny, atol=1e-6) and torch.allclose(whole, some, atol=1e-6)


def test_attention_outputs_for_ccr_ccs():
    model = _model("t2i")
    regions, rmask, tokens, lengths = _batch(3, 3)
    img, cap = model.encode_image(regions), model.encode_text(tokens, lengths)
    att = model.attention(img, rmask, cap, lengths)
    w, qm, km = att["weights"], att["query_mask"], att["key_mask"]
    assert w.shape == (3, 6, 5)  # words x regions
    assert torch.equal(qm.sum(1), lengths) and torch.equal(km, rmask)
    assert torch.allclose(w.sum(-1)[qm], torch.ones(int(qm.sum())), atol=1e-6)
    assert (w.masked_select(~km[:, None, :].expand_as(w)) == 0).all()
    assert (w[~qm] == 0).all()
    assert torch.allclose(att["attended"], w @ att["values"])
    assert torch.allclose(att["query"], cap) and torch.allclose(att["values"], img)
    # i2t: queries are regions
    att2 = _model("i2t").attention(img, rmask, cap, lengths)
    assert att2["weights"].shape == (3, 5, 6)


def test_padded_regions_do_not_matter():
    model = _model("i2t", "avg")
    regions, rmask, tokens, lengths = _batch(2, 3)
    with torch.no_grad():
        cap = model.encode_text(tokens, lengths)
        a = model.sim_matrix(model.encode_image(regions), rmask, cap, lengths)
        regions[~rmask] = 77.0
        b = model.sim_matrix(model.encode_image(regions), rmask, cap, lengths)
        c = model.sim_matrix(model.encode_image(regions), None, cap, lengths)  # no mask: all regions real
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_every_parameter_gets_a_gradient_from_a_triplet_loss(direction):
    model = _model(direction, "lse")
    regions, rmask, tokens, lengths = _batch(4, 4)
    sim = model(regions, rmask, tokens, lengths)["sim"]
    assert_every_parameter_learns(model, sim)
    used = tokens[tokens > 0].unique()
    assert (model.txt_enc.embedding.weight.grad[used].abs().sum(1) > 0).all()


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="direction"):
        SCAN(VOCAB, direction="both")
    with pytest.raises(ValueError, match="agg"):
        SCAN(VOCAB, agg="max")
    model = _model()
    regions, rmask, tokens, lengths = _batch(2, 2)
    img, cap = model.encode_image(regions), model.encode_text(tokens, lengths)
    with pytest.raises(ValueError, match="caption 1 has length 0"):
        model.sim_matrix(img, rmask, cap, torch.tensor([2, 0]))
    rmask[0] = False
    with pytest.raises(ValueError, match="image 0 has no valid regions"):
        model.sim_matrix(img, rmask, cap, lengths)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_attention_gradients_are_finite_with_padding(direction):
    model = _model(direction)
    regions, rmask, tokens, lengths = _batch(3, 3)
    att = model.attention(model.encode_image(regions), rmask, model.encode_text(tokens, lengths), lengths)
    qm = att["query_mask"]
    rel = torch.cosine_similarity(att["query"], att["attended"], dim=-1)[qm].mean()
    (rel + att["sim"].sum()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
