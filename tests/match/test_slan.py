"""SLAN in the matching pipeline on a real synthetic store (G = 7 grid): batches, learning above chance,
boxes inside the image, evaluation outputs, exact resume with the ITC queue, the ablation table."""

import json

import numpy as np
import pytest
import torch

from match_helpers import assert_resumed_equals_uninterrupted, chance_rsum
from synth_store import make_synth_store, make_text_cache
from vlcache.stages.match.data import MatchDataset
from vlcache.stages.match.evaluate import evaluate_match
from vlcache.stages.match.model import MatchNet
from vlcache.stages.match.train import (MatchTrainConfig, load_match_run, make_dataset, retrieval_metrics, train_match,
    visual_dim)
from vlcache.stages.match.slan import box_mask_scores, slan_forward
from vlcache.stages.match.slan_ablation import run_slan_ablation
from vlcache.storage.errors import StoreError
from vlcache.storage.schema import Capacities, Layout
from vlcache.storage.store import open_store
from vlcache.storage.writer import StoreWriter

torch.set_num_threads(2)
TINY = dict(model="slan", d=32, slan_levels=2, slan_regions=4, slan_samples=1, slan_queue=16, region_norm=True,
            device="cpu", log_every=1)


@pytest.fixture(scope="module")
def synth():
    return make_synth_store(grid=7)[0]


@pytest.fixture(scope="module")
def cache(synth):
    return make_text_cache(synth)


@pytest.fixture(scope="module")
def slan_run(synth, cache, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "slan"
    # one caption per image per epoch: 4 steps an epoch (caption-level epochs would take 5x the CPU)
    cfg = MatchTrainConfig(store=synth, text_cache=cache, epochs=3, batch_size=10, lr=1e-3, val_split="train",
                           val_max_images=20, captions="one", **TINY)
    return run, cfg, train_match(cfg, run)


def test_slan_batches_carry_the_grid_and_bert_positions(synth, cache):
    ds = MatchDataset(synth, text="bert", visual="grid", text_cache=cache, split="train")
    b = ds[ds.rows[:6]]
    assert "regions" not in b and b["grid"].shape == (6, 49, 2048) and b["grid"].dtype == torch.float16
    store = open_store(synth)
    for i, row in enumerate(b["rows"].tolist()):
        assert np.array_equal(b["grid"][i].numpy(), store.grid(row))
        assert b["hw"][i].tolist() == list(store.hw(row))
        n = int(b["region_mask"][i].sum())
        assert np.array_equal(b["region_boxes"][i, :n].numpy(), store.regions(row)["boxes"])
    m = MatchDataset(synth, text="bert", visual="regions", text_cache=cache, split="train")[ds.rows[:6]]
    for k in ("words", "word_mask", "match_txt", "match_pos", "match_labels"):
        assert torch.equal(b[k], m[k]), k  # same text and matched-word positions as MMCA
    assert b["match_txt"].numel() > 4


def test_a_store_without_grid_is_refused_by_name(tmp_path):
    layout = Layout(num_rows=2, block_size=2, capacities=Capacities(regions=3, region_dim=4, captions=1),
                    groups=("images", "captions", "regions"))
    url = str(tmp_path / "nogrid.zarr")
    w = StoreWriter(url, layout, {"dataset": "x", "classes": []}, overwrite=True)
    w.write_block(0, {s.path: s.empty_rows(2) for s in layout.specs() if s.path != "images/done"})
    w.finalize()
    w.close()
    with pytest.raises(StoreError, match=r"nogrid\.zarr.*'grid'"):
        MatchDataset(url, text="bert", visual="grid")
    with pytest.raises(ValueError, match=r"nogrid\.zarr has no 'grid' group"):
        visual_dim(MatchTrainConfig(store=url, **TINY))


def test_slan_learns_above_chance_and_rsum_rises(slan_run):
    run, cfg, res = slan_run
    chance = chance_rsum(20)  # 20 validation images x 5 captions: 148.6
    # The same model untrained (same seed, same standardisation) on the same validation images.
    torch.manual_seed(cfg.seed)
    net, _, ckpt, _ = load_match_run(run)
    fresh = MatchNet(**ckpt["model_args"])
    fresh.feat_mean, fresh.feat_std = net.feat_mean, net.feat_std
    from vlcache.stages.match.data import load_split
    val = load_split(make_dataset(cfg, "train", None, "all", False, cfg.val_max_images))
    before = retrieval_metrics(fresh, val, "cpu")["rsum"]
    after = retrieval_metrics(net, val, "cpu")["rsum"]
    assert after == pytest.approx(res["best_rsum"])
    assert after > chance + 100 and after > before + 60, (before, after, chance)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "itc" in r]
    assert len(steps) == 12 and all(np.isfinite([r["itc"], r["itm"], r["reg"]]).all() for r in steps)
    assert any(r["reg"] > 0 for r in steps)  # two levels disagree: L_reg is active
    assert np.mean([r["itc"] for r in steps[-4:]]) < np.mean([r["itc"] for r in steps[:4]])
    assert len([r for r in recs if "val_rsum" in r]) == 3 and (run / "figures" / "loss.png").is_file()


def test_trained_boxes_stay_inside_the_image_and_move(slan_run, synth, cache):
    run, cfg, _ = slan_run
    net, _, _, _ = load_match_run(run, "last")
    ds = MatchDataset(synth, text="bert", visual="grid", text_cache=cache, split="train", captions="all")
    b = ds[ds.rows[:8]]
    with torch.no_grad():
        out = slan_forward(net, b, all_pairs=False)
    hw = b["hw"][b["txt_img"]].float()
    boxes = out["boxes"]  # (P, levels, T, 4)
    W, H = hw[:, 1, None, None], hw[:, 0, None, None]
    x1, y1, x2, y2 = boxes.unbind(-1)
    assert boxes.shape[1] == 2 and torch.isfinite(boxes).all()
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= W + 1e-4).all() and (y2 <= H + 1e-4).all()
    assert ((x2 - x1) >= 1 - 1e-4).all() and ((y2 - y1) >= 1 - 1e-4).all()
    keep = out["keep"]
    moved = (out["boxes_after"] - out["boxes_before"]).abs().sum(-1)[keep]
    assert (moved > 0.5).float().mean() > 0.5  # the adaptor does move boxes (not a vacuous check)
    assert not torch.allclose(net.net.log_pw, torch.zeros(2))  # learned box scales


def test_evaluation_writes_scores_report_and_box_figures(slan_run):
    run, _, _ = slan_run
    s = evaluate_match(run, "test", figures=2, device="cpu")
    assert s["model"] == "slan" and s["n_images"] == 4 and s["n_captions"] == 20
    recalls = [s[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert all(0 <= r <= 100 for r in recalls) and s["rsum"] == pytest.approx(sum(recalls))
    for k in ("attn_precision", "attn_recall", "attn_f1", "box_inside_before", "box_inside_after",
              "box_iou_before", "box_iou_after", "box_moved"):
        assert 0.0 <= s[k] <= 1.0, k
    assert 0 < s["attn_words"] <= s["box_words"] <= s["matched_words"] and 1 <= s["kept_regions"] <= 4
    assert s["attn_words"] + s["attn_words_skipped"] == s["matched_words"]  # METHODS §8: skipped words counted
    assert json.loads((run / "eval" / "scores_test.json").read_text())["box_iou_after"] == s["box_iou_after"]
    report = (run / "report.md").read_text()
    assert "before / after adaptation" in report and f"{s['box_inside_after']:.2f}" in report
    assert "2 adaptor levels" in report
    figs = sorted((run / "figures").glob("slan_boxes_test_*.png"))
    assert len(figs) == 2 and all(f.stat().st_size > 5000 for f in figs)
    assert all(f"figures/{f.name}" in report for f in figs)


def test_box_mask_scores_by_hand():
    mask = np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True  # 16 pixels
    inside, iou = box_mask_scores(np.array([[2, 2, 6, 6], [2, 2, 4, 6], [0, 0, 10, 10], [6, 6, 9, 9]], np.float32), mask)
    assert np.allclose(inside, [1.0, 1.0, 0.16, 0.0]) and np.allclose(iou, [1.0, 0.5, 0.16, 0.0])


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()  # bit-for-bit comparison needs one summation order
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_mid_epoch_restores_the_queue_and_equals_uninterrupted(synth, cache, tmp_path, one_thread):
    # caption-level epochs: 200 captions, 5 batches of 40 an epoch
    cfg = MatchTrainConfig(store=synth, text_cache=cache, epochs=2, batch_size=40, val_max_images=2,
                           **{**TINY, "slan_queue": 48})
    full = train_match(cfg, tmp_path / "full")
    part = train_match(MatchTrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path / "part")
    assert part["stopped"] and part["step"] == 3
    q = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert int(q["net.queue.filled"]) == 48 and int(q["net.queue.ptr"]) == 120 % 48  # 3 steps x 40 pairs, wrapped
    assert (q["net.queue.ids"] >= 0).all() and q["net.queue.txt"].norm(dim=1).allclose(torch.ones(48))
    done = train_match(cfg, tmp_path / "part")
    assert done["step"] == full["step"] == 10
    assert_resumed_equals_uninterrupted(tmp_path / "full", tmp_path / "part")


def test_slan_ablation_writes_a_table(synth, cache, tmp_path):
    variants = {"frozen boxes (L=0)": {"slan_levels": 0}, "L=1, no threshold": {"slan_levels": 1,
                                                                                 "slan_threshold": None}}
    res = run_slan_ablation(synth, seeds=1, runs_root=tmp_path, variants=variants, figures=0,
                            options={"text_cache": cache, "d": 16, "slan_regions": 4, "val_max_images": 2},
                            overrides=["epochs=1", "batch_size=10", "captions=one"])
    assert [r["variant"] for r in res["rows"]] == list(variants) and res["config"]["model"] == "slan"
    assert res["config"]["epochs"] == 1 and res["config"]["slan_samples"] == 1  # ablation default kept
    md = (tmp_path / "slan-ablation" / "ablation.md").read_text()
    assert "| frozen boxes (L=0) | 1 |" in md and "Δ L=1, no threshold − frozen boxes (L=0)" in md
    assert "inside after" in md and "rsum" in md
    frozen = next(r for r in res["rows"] if r["variant"].startswith("frozen"))
    assert frozen["box_moved"] == 0.0 and frozen["box_iou_before"] == frozen["box_iou_after"]


def test_ccr_ccs_ica_terms_reach_slan_through_its_attention(synth, cache):
    from vlcache.stages.match.model import match_losses, model_args
    cfg = MatchTrainConfig(store=synth, text_cache=cache, ccr=1, ccs=1, ica=1, **TINY)
    ds = MatchDataset(synth, text="bert", visual="grid", text_cache=cache, split="train")
    b = ds[ds.rows[:8]]
    torch.manual_seed(0)
    net = MatchNet(**model_args(cfg, 2048, 0, 384))
    out = net(b)
    assert out["weights"].shape == (8, b["words"].shape[1], b["region_mask"].shape[1])
    assert torch.allclose(out["weights"].sum(-1)[b["word_mask"]], torch.ones(()))  # rows over kept regions
    res = match_losses(out, b, cfg, torch.Generator().manual_seed(0), net=net)
    assert set(res) == {"loss", "itc", "itm", "reg", "ccr", "ccs", "ica"} and "triplet" not in res
    for term in ("itc", "itm", "reg", "ccr", "ccs", "ica"):
        assert torch.isfinite(res[term]) and float(res[term].detach()) > 0, term
        grad, = torch.autograd.grad(res[term], net.net.sal_q.weight, retain_graph=True, allow_unused=True)
        assert term == "reg" or (grad is not None and grad.abs().sum() > 0), term  # the filter learns from each
    assert torch.allclose(res["loss"], sum(res[t] for t in ("itc", "itm", "reg", "ccr", "ccs", "ica")))
