import numpy as np
import pytest
import torch

from vlcache.stages.match.retrieval import coco_1k_5k, ranks_i2t, ranks_t2i, recall_at_k, rerank_report

torch.set_num_threads(1)

# 3 images, 5 captions; image 0 has 2 captions, image 1 one, image 2 two.
SIM = torch.tensor([
    [0.9, 0.1, 0.5, 0.2, 0.3],
    [0.8, 0.7, 0.6, 0.1, 0.0],
    [0.4, 0.3, 0.6, 0.5, 0.2],
])
TXT_TO_IMG = torch.tensor([0, 0, 1, 2, 2])


def test_ranks_hand_computed_with_ties_and_multi_caption_rule():
    # i0: best own caption 0.9, nothing wrong >= 0.9 -> 0; i1: own 0.6 < 0.8, 0.7 -> 2;
    # i2: best own 0.5 (of 0.5, 0.2) beaten only by 0.6 -> 1.
    assert ranks_i2t(SIM, TXT_TO_IMG).tolist() == [0, 2, 1]
    # t2 ties with image 2 (0.6 == 0.6): the tie counts against the query -> rank 1.
    assert ranks_t2i(SIM, TXT_TO_IMG).tolist() == [0, 2, 1, 0, 1]


def test_recall_at_k_hand_computed():
    m = recall_at_k(SIM, TXT_TO_IMG, ks=(1, 2, 3))
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r2"] == pytest.approx(200 / 3)
    assert m["i2t_r3"] == pytest.approx(100.0)
    assert m["t2i_r1"] == pytest.approx(40.0)
    assert m["t2i_r2"] == pytest.approx(80.0)
    assert m["t2i_r3"] == pytest.approx(100.0)
    assert m["rsum"] == pytest.approx(100 / 3 + 200 / 3 + 100 + 40 + 80 + 100)
    assert m["i2t_medr"] == 2.0 and m["t2i_medr"] == 2.0
    # numpy input gives the same answer
    assert recall_at_k(SIM.numpy(), TXT_TO_IMG.numpy(), ks=(1, 2, 3)) == m


def test_constant_scores_are_pessimistic_not_lucky():
    m = recall_at_k(torch.zeros(4, 4), torch.arange(4), ks=(1, 4))
    assert m["i2t_r1"] == 0.0 and m["t2i_r1"] == 0.0
    assert m["i2t_r4"] == 100.0 and m["t2i_r4"] == 100.0


def test_own_captions_tied_at_top_still_rank_first():
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.3, 0.8]])
    assert ranks_i2t(sim, torch.tensor([0, 0, 1])).tolist() == [0, 0]
    # a wrong caption tying the best own caption pushes the image to rank 1
    sim[0, 2] = 0.9
    assert ranks_i2t(sim, torch.tensor([0, 0, 1])).tolist() == [1, 0]


def test_separate_t2i_matrix_is_used_for_text_queries():
    other = SIM.clone()
    other[:, 1] = torch.tensor([0.9, 0.0, 0.0])  # caption 1 now finds image 0 first
    m = recall_at_k(SIM, TXT_TO_IMG, ks=(1,), sim_t2i=other)
    assert m["t2i_r1"] == pytest.approx(60.0)
    assert m["i2t_r1"] == pytest.approx(100 / 3)  # rows still come from SIM


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="image 1 has no caption"):
        recall_at_k(torch.rand(3, 2), torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="one image index per caption"):
        recall_at_k(torch.rand(3, 4), torch.tensor([0, 1, 2]))
    bad = torch.rand(2, 2)
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="image 1, caption 0"):
        recall_at_k(bad, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.rand(2, 2), torch.tensor([0, 5]))


def _naive_recalls(sim, t2i, ks):
    """Independent per-query loop with the same pessimistic tie rule."""
    sim, t2i = np.asarray(sim), np.asarray(t2i)
    ri = []
    for i in range(sim.shape[0]):
        own = t2i == i
        best = sim[i, own].max()
        ri.append(int(np.sum((sim[i] >= best) & ~own)))
    rt = [int(np.sum(sim[:, t] >= sim[t2i[t], t])) - 1 for t in range(sim.shape[1])]
    out = {f"i2t_r{k}": 100 * np.mean(np.array(ri) < k) for k in ks}
    out.update({f"t2i_r{k}": 100 * np.mean(np.array(rt) < k) for k in ks})
    return out


def test_coco_folds_on_synthetic_case():
    g = torch.Generator().manual_seed(0)
    n_img, per, fold = 12, 2, 4
    t2i = torch.arange(n_img).repeat_interleave(per)
    sim = torch.rand(n_img, n_img * per, generator=g)
    # Each caption beats every image of its own fold, but one image of the next fold beats it.
    sim[t2i, torch.arange(len(t2i))] = 2.0
    for t in range(len(t2i)):
        sim[(int(t2i[t]) + fold) % n_img, t] = 3.0
    out = coco_1k_5k(sim, t2i, ks=(1, 5), fold_size=fold)
    assert len(out["folds"]) == 3
    assert out["1k"]["t2i_r1"] == 100.0 and out["1k"]["i2t_r1"] == 100.0
    assert out["5k"]["t2i_r1"] == 0.0 and out["5k"]["i2t_r1"] == 0.0
    # against an independent implementation on a random matrix
    sim = torch.rand(n_img, n_img * per, generator=g)
    out = coco_1k_5k(sim, t2i, ks=(1, 5), fold_size=fold)
    folds = []
    for f in range(3):
        cols = ((t2i >= f * fold) & (t2i < (f + 1) * fold)).nonzero().squeeze(1)
        folds.append(_naive_recalls(sim[f * fold:(f + 1) * fold][:, cols], t2i[cols] - f * fold, (1, 5)))
    for k in folds[0]:
        assert out["1k"][k] == pytest.approx(np.mean([fo[k] for fo in folds]))
        assert out["5k"][k] == pytest.approx(_naive_recalls(sim, t2i, (1, 5))[k])
    assert out["1k"]["rsum"] == pytest.approx(sum(np.mean([fo[k] for fo in folds]) for k in folds[0]))
    with pytest.raises(ValueError, match="folds of 5"):
        coco_1k_5k(sim, t2i, fold_size=5)


def test_rerank_report_differences():
    exact = {"i2t_r1": 50.0, "t2i_r1": 40.0, "rsum": 90.0}
    rer = {"i2t_r1": 48.0, "t2i_r1": 40.0, "rsum": 88.0}
    rep = rerank_report(exact, rer)
    assert rep["i2t_r1"] == {"exact": 50.0, "rerank": 48.0, "diff": -2.0}
    assert rep["t2i_r1"]["diff"] == 0.0
    assert rep["max_abs_diff"] == 2.0
    nested = rerank_report({"1k": exact, "5k": exact}, {"1k": exact, "5k": rer})
    assert nested["1k"]["max_abs_diff"] == 0.0 and nested["max_abs_diff"] == 2.0
