import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, roi_align

from vlcache.stages.match.slan_network import (SLAN, boxes_to_grid, clip_boxes, eq2_offsets, filter_regions, roi_pool,
    subregion_similarity, update_boxes)
from vlcache.stages.match.slan_losses import (FeatureQueue, box_regression_loss, itc_loss, itm_loss, slan_objective,
    slan_reg_loss)

torch.set_num_threads(1)

GD, TD, D, G = 8, 12, 16, 4


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"max_regions": 4, "queue_size": 8, **kw}
    return SLAN(grid_dim=GD, text_dim=TD, d=D, **kw)


def _batch(B=4, R=5, L=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    grid = torch.randn(B, G * G, GD, generator=g).half()
    hw = torch.stack([torch.randint(30, 65, (B,), generator=g), torch.randint(30, 81, (B,), generator=g)], 1)
    x1 = torch.rand(B, R, generator=g) * hw[:, 1:] * 0.5
    y1 = torch.rand(B, R, generator=g) * hw[:, :1] * 0.5
    boxes = torch.stack([x1, y1, x1 + 4 + torch.rand(B, R, generator=g) * hw[:, 1:] * 0.4,
                         y1 + 4 + torch.rand(B, R, generator=g) * hw[:, :1] * 0.4], -1)
    bmask = torch.arange(R)[None] < torch.randint(1, R + 1, (B,), generator=g)[:, None]
    bmask[0] = True
    words = torch.randn(B, L, TD, generator=g)
    wmask = torch.arange(L)[None] < torch.randint(2, L + 1, (B,), generator=g)[:, None]
    return grid, hw, boxes, bmask, words, wmask


def _inside(boxes, hw):
    W, H = hw[..., 1:2].float(), hw[..., 0:1].float()
    x1, y1, x2, y2 = boxes.unbind(-1)
    return bool(((x1 >= 0) & (y1 >= 0) & (x2 <= W[..., 0]) & (y2 <= H[..., 0])
                 & (x2 - x1 >= 1 - 1e-4) & (y2 - y1 >= 1 - 1e-4)).all())


# ---------------------------------------------------------------------------------------- geometry


def test_roi_pool_matches_torchvision_and_has_box_gradient():
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(2, 3, 5, 5, generator=g)
    xy = torch.rand(2, 4, 2, generator=g) * 3
    boxes = torch.cat([xy, xy + 0.3 + torch.rand(2, 4, 2, generator=g) * (5 - xy - 0.3)], -1).clamp(max=5)
    for out, samples in ((2, 2), (3, 1)):
        ours = roi_pool(fmap, boxes, out, samples)
        ref = roi_align(fmap, list(boxes), out, spatial_scale=1.0, sampling_ratio=samples, aligned=True)
        assert torch.allclose(ours.reshape(-1, 3, out, out), ref, atol=1e-5)
    b = boxes.clone().requires_grad_(True)
    roi_pool(fmap, b, 2, 2).sum().backward()
    assert b.grad.abs().sum() > 0


def test_boxes_to_grid_per_axis_for_non_square_images():
    hw = torch.tensor([[40.0, 80.0]])  # H=40, W=80, G=4 -> a cell is 20 px wide, 10 px tall
    boxes = torch.tensor([[[0.0, 0.0, 80.0, 40.0], [20.0, 10.0, 40.0, 20.0]]])
    assert torch.allclose(boxes_to_grid(boxes, hw[:, None], 4), torch.tensor([[[0.0, 0, 4, 4], [1, 1, 2, 2]]]))


def test_eq2_offsets_weighted_subregion_centres():
    K, nw, nh = 3, torch.tensor(60.0), torch.tensor(30.0)
    j = torch.arange(9)
    right = (j // K == K - 1).float() / 3  # column-major: ⌊j/K⌋ is the column
    dx, dy = eq2_offsets(right, nw, nh, K)
    assert torch.isclose(dx, torch.tensor(20.0)) and torch.isclose(dy, torch.tensor(0.0))
    top_middle = ((j // K == 1) & (j % K == 0)).float()
    dx, dy = eq2_offsets(top_middle, nw, nh, K)
    assert torch.isclose(dx, torch.tensor(0.0)) and torch.isclose(dy, torch.tensor(-10.0))
    dx, dy = eq2_offsets(torch.full((9,), 1 / 9), nw, nh, K)
    assert abs(dx) < 1e-6 and abs(dy) < 1e-6
    dx, _ = eq2_offsets(((torch.arange(25) // 5) == 4).float() / 5, torch.tensor(50.0), nh, 5)
    assert torch.isclose(dx, torch.tensor(20.0))  # two 10-px steps right of the centre


@pytest.mark.parametrize("shape, hot, box, expect", [
    # 60 x 60 image, G=6: right third (x >= 40) holds the words' feature -> centre moves right by W/3.
    ((60, 60), (slice(None), slice(4, 6)), [25.0, 25, 35, 35], [45.0, 25, 55, 35]),
    # 60 tall x 30 wide: top third (y < 20) holds it -> centre moves up by H/3 (per-axis grid mapping).
    ((60, 30), (slice(0, 2), slice(None)), [10.0, 25, 20, 35], [10.0, 5, 20, 15]),
])
def test_hand_built_neighbourhood_moves_box_toward_the_words(shape, hot, box, expect):
    H, W = shape
    fmap = torch.zeros(1, 2, 6, 6)
    fmap[0, 0] = 1.0
    fmap[0, 0][hot], fmap[0, 1][hot] = 0.0, 1.0  # e2 where the words are, e1 elsewhere
    words = torch.tensor([[0.0, 1.0]]).view(1, 1, 1, 2)
    hw = torch.tensor([[float(H), float(W)]])
    boxes = torch.tensor(box).view(1, 1, 1, 4)
    sim, inside, nw, nh = subregion_similarity(fmap, boxes, hw, 1.0, 3, 2, words, torch.ones(1, 1, 1, dtype=torch.bool))
    assert sim.shape == (1, 1, 1, 9) and inside.all()
    assert sorted(sim.flatten().tolist()) == pytest.approx([0.0] * 6 + [1.0] * 3, abs=1e-5)
    s = (sim / 0.01).softmax(-1)
    dx, dy = eq2_offsets(s, nw, nh, 3)
    new = update_boxes(boxes, dx, dy, torch.tensor(1.0), torch.tensor(1.0), hw[:, None, None])
    assert torch.allclose(new.flatten(), torch.tensor(expect), atol=1e-3)


def test_subregions_outside_the_image_are_flagged():
    fmap = torch.randn(1, 2, 4, 4)
    hw = torch.tensor([[40.0, 40.0]])
    boxes = torch.tensor([0.0, 0.0, 4.0, 4.0]).view(1, 1, 1, 4)  # top-left corner: centre (2, 2)
    _, inside, _, _ = subregion_similarity(fmap, boxes, hw, 1.0, 3, 1, torch.randn(1, 1, 2, 2),
                                           torch.ones(1, 1, 2, dtype=torch.bool))
    j = torch.arange(9)
    expect = (j // 3 >= 1) & (j % 3 >= 1)  # only sub-regions right of and below the centre column/row
    assert torch.equal(inside.flatten(), expect)


def test_update_boxes_stay_inside_for_extreme_offsets():
    g = torch.Generator().manual_seed(3)
    hw = torch.tensor([[30.0, 50.0], [64.0, 20.0], [1.0, 1.0]])[:, None].expand(3, 50, 2)
    boxes = torch.rand(3, 50, 4, generator=g) * 200 - 60  # many outside, some inverted
    boxes = clip_boxes(boxes, hw)
    assert _inside(boxes, hw)
    for scale in (1e4, -1e4, 37.0):
        dx = torch.randn(3, 50, generator=g) * scale
        dy = torch.randn(3, 50, generator=g) * scale
        for p in (math.exp(-8), 1.0, math.exp(6)):
            assert _inside(update_boxes(boxes, dx, dy, torch.tensor(p), torch.tensor(1 / p), hw), hw)


def test_model_boxes_stay_inside_with_extreme_scales():
    model = _model(levels=3)
    with torch.no_grad():
        model.log_pw.fill_(4.0)
        model.log_ph.fill_(-6.0)
        model.log_offset_tau.fill_(-8.0)  # near-argmax sub-region choice: the largest moves
    grid, hw, boxes, bmask, words, wmask = _batch(seed=7)
    boxes = boxes * 3 - 20  # detector boxes partly outside their images
    out = model(grid, hw, boxes, bmask, words, wmask)
    hwb = hw[:, None, None, :].expand(*out["boxes"].shape[:3], 2)
    assert _inside(out["boxes"], hwb) and _inside(out["boxes_before"], hwb[:, 0])
    assert _inside(out["target"], hwb[:, 0])


# ---------------------------------------------------------------------------------------- filter


def test_filter_selection_rule():
    scores = torch.tensor([[0.2, 0.8, 0.4, 2.0, 0.6, 0.3]])
    valid = torch.tensor([[True, True, True, False, True, True]])  # the invalid 2.0 must not normalise
    idx, keep, norm = filter_regions(scores, valid, 5, 0.5)
    assert torch.allclose(norm, torch.tensor([[0.25, 1.0, 0.5, 0.0, 0.75, 0.375]]))
    # strictly above h: the region at exactly 0.5 is dropped
    assert idx.tolist() == [[1, 4, 2, 5, 0]] and keep.tolist() == [[True, True, False, False, False]]
    idx, keep, _ = filter_regions(scores, valid, 2, 0.5)  # at most T
    assert idx.tolist() == [[1, 4]] and keep.all()
    idx, keep, _ = filter_regions(scores, valid, 4, None)  # threshold off: top T of the valid ones
    assert idx.tolist() == [[1, 4, 2, 5]] and keep.all()
    idx, keep, _ = filter_regions(scores, valid, 6, None)
    assert keep.tolist() == [[True] * 5 + [False]] and idx[0, 5] == 3


def test_model_filter_keeps_and_weights_by_normalised_saliency():
    model = _model(levels=0, threshold=0.5, max_regions=3)
    grid, hw, boxes, bmask, words, wmask = _batch(B=3, R=6, seed=2)
    out = model(grid, hw, boxes, bmask, words, wmask)
    sal, idx, keep = out["saliency"], out["keep_idx"], out["keep"]
    assert torch.allclose(sal.amax(1), torch.ones(3)) and (sal[~bmask] == 0).all()
    assert torch.equal(out["weights"], sal.gather(1, idx) * keep)
    assert (sal.gather(1, idx)[keep] > 0.5).all() and (keep.sum(1) <= 3).all() and keep[:, 0].all()
    for b in range(3):  # a valid region left out is at or below h, or ranked after T kept ones
        dropped = bmask[b].clone()
        dropped[idx[b][keep[b]]] = False
        assert ((sal[b][dropped] <= 0.5) | (keep[b].sum() == 3)).all()
    # The image embedding is v_cls + the mean of the kept, saliency-weighted region embeddings.
    img = model.encode_images(grid, hw, boxes, bmask)
    e = img.region.gather(1, idx[..., None].expand(-1, -1, D)) * out["weights"][..., None]
    v = img.vcls + (e * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    assert torch.allclose(out["img_embed"], F.normalize(model.img_head(v), dim=-1), atol=1e-5)


def test_threshold_off_keeps_top_t():
    model = _model(levels=1, threshold=None, max_regions=3)
    grid, hw, boxes, bmask, words, wmask = _batch(B=3, R=5, seed=4)
    out = model(grid, hw, boxes, bmask, words, wmask)
    assert torch.equal(out["keep"].sum(1), bmask.sum(1).clamp(max=3))


# ---------------------------------------------------------------------------------------- model


def test_forward_shapes_attention_and_all_pairs_consistency():
    model = _model(levels=2).eval()
    B, R, L = 4, 5, 6
    grid, hw, boxes, bmask, words, wmask = _batch(B, R, L)
    out = model(grid, hw, boxes, bmask, words, wmask)
    T = 4
    assert out["sim"].shape == (B, B) and out["itm_logits"].shape == (B, B, 2)
    assert out["boxes"].shape == (B, 2, T, 4) and out["boxes_before"].shape == (B, T, 4)
    assert torch.equal(out["boxes_after"], out["boxes"][:, -1])
    assert torch.allclose(out["target"], out["boxes"].mean(1))
    assert torch.allclose(out["score"], out["sim"].diagonal())
    assert torch.allclose(out["img_embed"].norm(dim=-1), torch.ones(B), atol=1e-5)
    attn = out["attn"]
    assert attn.shape == (B, L, R)
    assert torch.allclose(attn.sum(-1)[wmask], torch.ones(int(wmask.sum())), atol=1e-5)
    assert (attn[~wmask] == 0).all()
    kept = torch.zeros(B, R, dtype=torch.bool).scatter(1, out["keep_idx"], out["keep"])
    assert (attn.masked_fill(kept[:, None, :], 0) == 0).all()
    matched = model(grid, hw, boxes, bmask, words, wmask, all_pairs=False)
    assert "sim" not in matched and matched["itm_logits"].shape == (B, 2)
    assert torch.allclose(matched["score"], out["score"], atol=1e-5)
    assert torch.allclose(matched["boxes"], out["boxes"], atol=1e-4)


def test_padding_does_not_change_results():
    model = _model(levels=2).eval()
    grid, hw, boxes, bmask, words, wmask = _batch(B=3, R=5, L=6, seed=5)
    ref = model(grid, hw, boxes, bmask, words, wmask)["sim"]
    g = torch.Generator().manual_seed(9)
    boxes2 = torch.cat([boxes, torch.rand(3, 3, 4, generator=g) * 50], 1)  # extra padded boxes, garbage
    bmask2 = torch.cat([bmask, torch.zeros(3, 3, dtype=torch.bool)], 1)
    words2 = torch.where(wmask[..., None], words, torch.randn(words.shape, generator=g) * 100)
    out = model(grid, hw, boxes2, bmask2, words2, wmask)["sim"]
    assert torch.allclose(out, ref, atol=1e-5)


def test_levels_zero_keeps_the_input_boxes():
    model = _model(levels=0)
    grid, hw, boxes, bmask, words, wmask = _batch(seed=6)
    boxes = clip_boxes(boxes, hw[:, None].float())
    out = model(grid, hw, boxes, bmask, words, wmask)
    expect = boxes.gather(1, out["keep_idx"][..., None].expand(-1, -1, 4))
    assert out["boxes"].shape[1] == 0
    assert torch.equal(out["boxes_after"], expect) and torch.equal(out["boxes_before"], expect)
    assert torch.equal(out["target"], expect)
    assert slan_objective(out, model.queue)["reg"] == 0
    moved = _model(levels=3)(grid, hw, boxes, bmask, words, wmask)
    assert not torch.allclose(moved["boxes_after"], moved["boxes_before"])  # the adaptor does move boxes


@pytest.mark.parametrize("box_grad", [True, False])
def test_every_parameter_gets_a_gradient(box_grad):
    model = _model(levels=3, box_grad=box_grad)
    grid, hw, boxes, bmask, words, wmask = _batch()
    out = model(grid, hw, boxes, bmask, words, wmask)
    res = slan_objective(out, model.queue, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(res[k]) for k in ("itc", "itm", "reg", "loss")) and res["reg"] > 0
    res["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    # What the flag means: only with box_grad does ITC reach the box scales through the pooled features.
    model.zero_grad()
    out = model(grid, hw, boxes, bmask, words, wmask)
    itc_loss(out["sim"], out["img_embed"], out["txt_embed"], out["tau"]).backward()
    reached = model.log_pw.grad is not None and model.log_pw.grad.abs().sum() > 0
    assert reached == box_grad


def test_score_matrix_matches_per_pair_forward_in_blocks():
    model = _model(levels=2)
    model.train()
    grid, hw, boxes, bmask, words, wmask = _batch(B=5, seed=8)
    n_img, n_txt = 3, 5
    ref = torch.stack([torch.stack([
        model.eval()(grid[i:i + 1], hw[i:i + 1], boxes[i:i + 1], bmask[i:i + 1], words[j:j + 1], wmask[j:j + 1],
                     all_pairs=False)["score"][0] for j in range(n_txt)]) for i in range(n_img)]).detach()
    model.train()
    for block in (1, 4, 7, 100):
        s = model.score_matrix(grid[:n_img], hw[:n_img], boxes[:n_img], bmask[:n_img], words, wmask, block=block,
                               enc_block=2)
        assert s.shape == (n_img, n_txt) and torch.allclose(s, ref, atol=1e-5)
    assert model.training


def test_bad_inputs_name_what_is_wrong():
    model = _model()
    grid, hw, boxes, bmask, words, wmask = _batch(B=3)
    nobox = bmask.clone()
    nobox[1] = False
    with pytest.raises(ValueError, match="image 1"):
        model(grid, hw, boxes, nobox, words, wmask)
    with pytest.raises(ValueError, match="square"):
        model(grid[:, :15], hw, boxes, bmask, words, wmask)
    nocls = wmask.clone()
    nocls[2, 0] = False
    with pytest.raises(ValueError, match="caption 2"):
        model(grid, hw, boxes, bmask, words, nocls)
    with pytest.raises(ValueError, match="grid_dim"):
        model(grid[..., :4], hw, boxes, bmask, words, wmask)
    with pytest.raises(ValueError, match="text_dim"):
        model(grid, hw, boxes, bmask, words[..., :5], wmask)
    with pytest.raises(ValueError, match="K must be odd"):
        _model(K=4)
    with pytest.raises(ValueError, match="threshold"):
        _model(threshold=1.0)
    with pytest.raises(ValueError, match="ratio"):
        _model(levels=2, ratios=(1.0, 0.5, 0.25))


# ---------------------------------------------------------------------------------------- losses


def test_box_regression_loss_is_l1_plus_torchvision_giou():
    pred, target = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    hw = torch.tensor([[4.0, 4.0]])
    giou = 1 / 7 - (9 - 7) / 9  # IoU 1/7, enclosing box 3 x 3, union 7
    assert box_regression_loss(pred, target, hw).item() == pytest.approx(4 * 0.25 + 1 - giou, abs=1e-6)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, 2, generator=g) * 20
    b = torch.rand(6, 2, generator=g) * 20
    p = torch.cat([a, a + 1 + torch.rand(6, 2, generator=g) * 10], 1)
    t = torch.cat([b, b + 1 + torch.rand(6, 2, generator=g) * 10], 1)
    hw = torch.tensor([[40.0, 30.0]]).expand(6, 2)
    l1 = ((p - t).abs() / torch.tensor([30.0, 40.0, 30.0, 40.0])).sum(1).mean()
    assert torch.isclose(box_regression_loss(p, t, hw), l1 + generalized_box_iou_loss(p, t, reduction="mean"))
    assert box_regression_loss(p, p, hw).abs() < 1e-6


def test_reg_loss_targets_the_detached_level_mean():
    lv = torch.tensor([[[[0.0, 0, 2, 2]], [[1.0, 1, 3, 3]]]], requires_grad=True)  # (B=1, L=2, T=1, 4)
    hw = torch.tensor([[4.0, 4.0]])
    loss = slan_reg_loss(lv, torch.tensor([[True]]), hw)
    mean = torch.tensor([[0.5, 0.5, 2.5, 2.5]])
    expect = 0.5 * (box_regression_loss(lv[0, 0], mean, hw) + box_regression_loss(lv[0, 1], mean, hw))
    assert torch.isclose(loss, expect)
    (g_loss,) = torch.autograd.grad(loss, lv)
    (g_const,) = torch.autograd.grad(expect, lv)  # the mean entered as a constant
    assert torch.allclose(g_loss, g_const)
    assert (g_loss[0, 0] < 0).all() and (g_loss[0, 1] > 0).all()  # both levels pulled toward the mean
    assert slan_reg_loss(lv, torch.tensor([[False]]), hw) == 0


def test_queue_fifo_semantics_and_checkpointing():
    q = FeatureQueue(3, 2)
    assert q.get()[0].shape == (0, 2)
    x = torch.arange(10.0).view(5, 2)
    q.enqueue(x[:2], -x[:2], torch.tensor([0, 1]))
    img, txt, ids = q.get()
    assert torch.equal(img, x[:2]) and torch.equal(txt, -x[:2]) and ids.tolist() == [0, 1]
    q.enqueue(x[2:4], -x[2:4], torch.tensor([2, 3]))  # wraps: slot 0 gets the 4th row
    img, _, ids = q.get()
    assert int(q.filled) == 3 and int(q.ptr) == 1 and ids.tolist() == [3, 1, 2]
    assert torch.equal(img, x[[3, 1, 2]])
    big = torch.randn(7, 2, requires_grad=True)
    q.enqueue(big, big * 2, torch.arange(10, 17))  # more rows than slots: the last 3 are kept
    assert sorted(q.get()[2].tolist()) == [14, 15, 16] and not q.get()[0].requires_grad
    state = q.state_dict()
    assert {"img", "txt", "ids", "ptr", "filled"} <= set(state)
    q2 = FeatureQueue(3, 2)
    q2.load_state_dict(state)
    assert torch.equal(q2.get()[0], q.get()[0])
    with pytest.raises(ValueError, match="enqueue"):
        q.enqueue(torch.zeros(2, 3), torch.zeros(2, 3))


def test_itc_with_queue_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    B, d, tau = 3, 4, 0.5
    img = F.normalize(torch.randn(B, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(B, d, generator=g), dim=-1)
    sim = torch.randn(B, B, generator=g)
    arange = torch.arange(B)
    plain = 0.5 * (F.cross_entropy(sim / tau, arange) + F.cross_entropy(sim.T / tau, arange))
    assert torch.isclose(itc_loss(sim, img, txt, tau, FeatureQueue(4, d)), plain)  # empty queue: in-batch only
    q = FeatureQueue(4, d)
    qi, qt = F.normalize(torch.randn(2, d, generator=g), dim=-1), F.normalize(torch.randn(2, d, generator=g), dim=-1)
    q.enqueue(qi, qt, torch.tensor([7, 1]))
    li2t = torch.cat([sim, img @ qt.T], 1) / tau
    lt2i = torch.cat([sim.T, txt @ qi.T], 1) / tau
    assert torch.isclose(itc_loss(sim, img, txt, tau, q),
                         0.5 * (F.cross_entropy(li2t, arange) + F.cross_entropy(lt2i, arange)))
    # With ids, queue entry of image 1 is a second positive of row 1 (targets split evenly).
    ids = torch.tensor([5, 1, 6])
    tgt = torch.zeros(B, B + 2)
    tgt[arange, arange] = 1
    tgt[1] = torch.tensor([0, 0.5, 0, 0, 0.5])
    manual = 0.5 * (-(tgt * li2t.log_softmax(1)).sum(1).mean() - (tgt * lt2i.log_softmax(1)).sum(1).mean())
    assert torch.isclose(itc_loss(sim, img, txt, tau, q, image_ids=ids), manual)
    # The loss only reads the queue.
    before = q.state_dict()["img"].clone()
    itc_loss(sim, img, txt, tau, q)
    assert torch.equal(q.img, before)


def test_itm_uses_hardest_in_batch_negatives():
    B = 3
    sim = torch.zeros(B, B)
    hard = [(0, 2), (1, 0), (2, 1)]  # row argmax for each image; the columns' argmax are the same pairs
    for i, j in hard:
        sim[i, j] = 10.0
    logits = torch.zeros(B, B, 2)
    for i, j in hard:
        logits[i, j, 1] = 5.0
    loss = itm_loss(logits, sim, tau=0.01, generator=torch.Generator().manual_seed(0))
    expect = (3 * math.log(2) + 6 * math.log1p(math.exp(5))) / 9
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    same = itm_loss(torch.zeros(B, B, 2), sim, image_ids=torch.zeros(B, dtype=torch.long))
    assert same.item() == pytest.approx(math.log(2))  # one image, no negatives: positives only


def test_training_step_enqueues_and_reduces_loss():
    model = _model(levels=2)
    grid, hw, boxes, bmask, words, wmask = _batch(seed=11)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        out = model(grid, hw, boxes, bmask, words, wmask)
        res = slan_objective(out, model.queue, image_ids=torch.arange(4), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        model.queue.enqueue(out["img_embed"], out["txt_embed"], torch.arange(4))
        losses.append(res["itc"].item())
    assert int(model.queue.filled) == 8
    assert losses[-1] < losses[0]
