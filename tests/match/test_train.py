"""Matching training on a real synthetic store: batches, losses, learning above chance, exact resume."""

import json

import numpy as np
import pytest
import torch

from match_helpers import assert_resumed_equals_uninterrupted, chance_rsum
from synth_store import make_synth_store, make_text_cache
from vlcache.stages.common.ica import region_labels
from vlcache.stages.common.losses import lovasz_hinge
from vlcache.stages.match.data import MatchDataset, caption_choice
from vlcache.stages.match.model import PAD_SCORE, MatchNet, match_losses, model_args, word_views
from vlcache.stages.match.train import MatchTrainConfig, build_vocab, train_match
from vlcache.storage.masks import region_inside_fraction
from vlcache.storage.store import open_store

torch.set_num_threads(2)
TINY = dict(embed=32, word_dim=32, d=32, heads=4, vocab_min_count=1, device="cpu", log_every=1)


@pytest.fixture(scope="module")
def synth():
    url, _ = make_synth_store()
    return url


@pytest.fixture(scope="module")
def cache(synth):
    return make_text_cache(synth)


def _batch(cfg, vocab, n=8, labels=True, cache=None):
    ds = MatchDataset(cfg.store, text=cfg.family.text, visual=cfg.family.visual, text_cache=cache, vocab=vocab, split="train", labels=labels)
    return ds[ds.rows[:n]]


def test_caption_choice_is_deterministic_and_changes_per_epoch():
    rows, counts = np.arange(500), np.full(500, 5)
    a, b = caption_choice(rows, counts, 3, 0), caption_choice(rows, counts, 3, 0)
    assert np.array_equal(a, b) and a.min() >= 0 and a.max() <= 4
    assert (caption_choice(rows, counts, 4, 0) != a).mean() > 0.6  # another epoch, mostly other captions
    assert (caption_choice(rows, counts, 3, 1) != a).mean() > 0.6  # another seed too
    assert np.bincount(a, minlength=5).min() > 60  # roughly uniform
    assert np.array_equal(caption_choice(rows[::-1], counts, 3, 0), a[::-1])  # per row, not per position
    assert caption_choice(np.arange(4), np.array([1, 1, 2, 1]), 0, 0)[[0, 1, 3]].tolist() == [0, 0, 0]


def test_batch_positions_and_region_labels_agree_with_the_store(synth, cache):
    cfg = MatchTrainConfig(model="scan", store=synth, **TINY)
    vocab = build_vocab(cfg)
    b = _batch(cfg, vocab, 12)
    assert b["match_txt"].numel() > 8 and b["dropped_words"] == 0
    store = open_store(synth)
    for j in range(b["match_txt"].numel()):
        t = int(b["match_txt"][j])
        row, c = int(b["rows"][b["txt_img"][t]]), int(b["caption"][t])
        ts, te = (int(v) for v in b["match_tok"][j])
        # SCAN: the word's positions hold exactly its Karpathy tokens (position = token index + 1).
        pos = b["match_pos"][j].nonzero().squeeze(1)
        assert pos.tolist() == list(range(ts + 1, te + 1))
        assert [vocab.itos[int(i)] for i in b["tokens"][t, pos]] == store.tokens(row)[c][ts:te]
        # Region labels: regions >= 50% inside the merged mask, computed here through the notebook API.
        mask = store.merged_mask(row, c, ts, score_threshold=0.5)
        reg = store.regions(row)
        frac = np.zeros(b["region_mask"].shape[1], np.float32)
        frac[:len(reg["boxes"])] = region_inside_fraction(reg["boxes"], mask)
        want, ok = region_labels(torch.from_numpy(frac)[None], 0.5, b["region_mask"][b["txt_img"][t]])
        assert torch.equal(b["match_labels"][j], want[0]) and bool(b["match_has_ref"][j]) == bool(ok[0])
        # the metrics' reference: the same rule without the fallback (METHODS §8)
        assert torch.equal(b["match_reference"][j], (torch.from_numpy(frac) >= 0.5) & b["region_mask"][b["txt_img"][t]])
    assert b["match_has_ref"].float().mean() > 0.8
    # MMCA from the cache: the word's positions are the BERT pieces inside its character span.
    mb = _batch(MatchTrainConfig(model="mmca", store=synth, text_cache=cache, **TINY), None, 12, cache=cache)
    assert torch.equal(mb["match_txt"], b["match_txt"]) and torch.equal(mb["match_labels"], b["match_labels"])
    for j in range(mb["match_txt"].numel()):
        t = int(mb["match_txt"][j])
        cs, ce = (int(v) for v in mb["match_char"][j])
        offs = mb["offsets"][t][mb["match_pos"][j] > 0]
        assert len(offs) and int(offs[0, 0]) == cs and int(offs[-1, 1]) == ce


@pytest.mark.parametrize("kind", ["scan", "mmca"])
def test_ccr_ccs_ica_terms_are_finite_and_train_the_attention(synth, cache, kind):
    cfg = MatchTrainConfig(model=kind, store=synth, text_cache=cache if kind == "mmca" else None, ccr=1, ccs=1,
                           ica=1, region_norm=True, **TINY)
    vocab = build_vocab(cfg) if kind == "scan" else None
    b = _batch(cfg, vocab, 8, cache=cfg.text_cache)
    torch.manual_seed(0)
    net = MatchNet(**model_args(cfg, 2048, len(vocab) if vocab else 0, 384))
    out = net(b)
    res = match_losses(out, b, cfg, torch.Generator().manual_seed(0))
    assert set(res) == {"loss", "triplet", "ccr", "ccs", "ica"}
    attn_param = net.net.img_fc.weight if kind == "scan" else net.net.cross_unit.qkv.weight
    for term in ("triplet", "ccr", "ccs", "ica"):
        assert torch.isfinite(res[term]) and float(res[term].detach()) > 0, term
        grad, = torch.autograd.grad(res[term], attn_param, retain_graph=True)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, term
    assert torch.allclose(res["loss"], res["triplet"] + res["ccr"] + res["ccs"] + res["ica"])
    # ICA: padded regions score PAD_SCORE, so the hinge equals the one over each word's real regions.
    v = word_views(out, b)
    assert (v["scores"][~v["value_mask"]] == PAD_SCORE).all()
    has = b["match_has_ref"]
    per_row = [lovasz_hinge(v["scores"][j][v["value_mask"][j]][None], b["match_labels"][j][v["value_mask"][j]][None])
               for j in has.nonzero().squeeze(1).tolist()]
    assert torch.allclose(res["ica"], torch.stack(per_row).mean(), atol=1e-5)
    # A constraint's weight of 0 leaves it out of the loss (and does not compute it).
    cfg0 = MatchTrainConfig(model=kind, store=synth, **{**TINY, "device": "cpu"})
    assert set(match_losses(out, b, cfg0)) == {"loss", "triplet"}


def test_scan_learns_above_chance(synth, tmp_path):
    cfg = MatchTrainConfig(model="scan", store=synth, epochs=5, batch_size=10, captions="all", lr=5e-3,
                           region_norm=True, val_split="train", **{**TINY, "log_every": 100})
    res = train_match(cfg, tmp_path / "scan")
    chance = chance_rsum(40)  # 40 training images x 5 captions: 77.3
    assert res["best_rsum"] > chance + 30, (res, chance)
    metrics = [json.loads(x) for x in (tmp_path / "scan" / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if "val_rsum" in m]) == 5
    assert (tmp_path / "scan" / "figures" / "loss.png").is_file() and (tmp_path / "scan" / "vocab.json").is_file()


def test_mmca_learns_above_chance_from_the_text_cache(synth, cache, tmp_path):
    cfg = MatchTrainConfig(model="mmca", store=synth, text_cache=cache, epochs=2, batch_size=8, lr=1e-3,
                           region_norm=True, val_split="train", val_max_images=20, **TINY)
    res = train_match(cfg, tmp_path / "mmca")
    assert res["best_rsum"] > chance_rsum(20) + 60, res  # chance for 20 images: 148.6


@pytest.fixture
def one_thread():
    # Multi-threaded CPU kernels may sum in a different order from run to run (last-bit differences even
    # without any resume); bit-for-bit comparison needs one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_mid_epoch_equals_uninterrupted(synth, cache, tmp_path, one_thread):
    # MMCA has dropout (global RNG) and CCS draws derangements (its own generator): both must resume.
    cfg = MatchTrainConfig(model="mmca", store=synth, text_cache=cache, epochs=2, batch_size=40, ccs=1.0, ccr=0.5,
                           val_max_images=4, **TINY)
    full = train_match(cfg, tmp_path / "full")
    part = train_match(MatchTrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path / "part")
    assert part["stopped"] and part["step"] == 3 and part["epochs_completed"] == 0  # 200 captions: 5 batches an epoch
    done = train_match(cfg, tmp_path / "part")
    assert done["step"] == full["step"] == 10 and not done["stopped"]
    assert_resumed_equals_uninterrupted(tmp_path / "full", tmp_path / "part")
    with pytest.raises(ValueError, match="different config"):
        train_match(MatchTrainConfig(**{**cfg.__dict__, "ccs": 0.0}), tmp_path / "part")
