"""Matching protocols as SCAN/VSE++ and seed 002 define them (issue 12): CCR/CCS over every word,
caption-level epochs, same-image negatives, median rank, evaluation protocol, validation subset."""

import math

import numpy as np
import pytest
import torch

from synth_store import make_synth_store
from vlcache.stages.match.caption_sampler import CaptionBatchSampler, block_groups
from vlcache.stages.match.losses import hardest_negative_triplet
from vlcache.stages.match.data import MatchDataset, match_loader
from vlcache.stages.match.evaluate import protocol_metrics
from vlcache.stages.match.model import caption_words, match_losses
from vlcache.stages.match.train import MatchTrainConfig, build_vocab
from vlcache.stages.match.retrieval import median_rank, recall_at_k
from vlcache.storage.store import open_store

TINY = dict(embed=32, word_dim=32, d=32, heads=4, vocab_min_count=1, device="cpu", log_every=1)


@pytest.fixture(scope="module")
def synth():
    url, _ = make_synth_store()
    return url


def _no_matches(P: int, R: int) -> dict:
    empty = torch.zeros(0, dtype=torch.long)
    return {"match_txt": empty, "match_pos": torch.zeros(0, 4), "match_has_ref": torch.zeros(0, dtype=torch.bool),
            "match_labels": torch.zeros(0, R)}


def _cos(a, b):
    return (a[0] * b[0] + a[1] * b[1]) / (math.hypot(*a) * math.hypot(*b))


def test_ccr_and_ccs_constrain_every_word_of_a_caption_without_class_words():
    # 2 images x 2 regions, one caption each: <start> w1 w2 <end>, no class-word match at all.
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]])
    junk = [5.0, -3.0]  # <start>/<end> queries: not words, must not count
    query = torch.tensor([[junk, [1.0, 0.0], [0.0, 1.0], junk], [junk, [1.0, 1.0], [1.0, -1.0], junk]])
    w = [[[1.0, 0.0], [0.75, 0.25], [0.5, 0.5], [1.0, 0.0]], [[1.0, 0.0], [0.8, 0.2], [0.25, 0.75], [1.0, 0.0]]]
    out = {"sim": torch.zeros(2, 2), "query": query, "values": values, "weights": torch.tensor(w),
           "scores": torch.zeros(2, 4, 2), "value_mask": torch.ones(2, 2, dtype=torch.bool)}
    batch = {"tokens": torch.tensor([[1, 4, 5, 2], [1, 6, 7, 2]]), "lengths": torch.tensor([4, 4]),
             "txt_img": torch.tensor([0, 1]), **_no_matches(2, 2)}
    cfg = MatchTrainConfig(model="scan", store="x", ccr=1.0, ccs=1.0, **TINY)
    res = match_losses(out, batch, cfg, torch.Generator().manual_seed(0))
    # By hand (gamma 0.2; with 2 regions abar = (w1 v0 + w0 v1) / 1; CCS swaps the caption's two words):
    # CCR per word: max(0, .2 - cos(q, a) + cos(q, abar)) = 0, .2, .2, .2 + 2 * 0.4472136
    assert res["ccr"].item() == pytest.approx((0 + 0.2 + 0.2 + 0.2 + 2 / math.sqrt(5)) / 4, abs=1e-6)
    assert res["ccr"].item() == pytest.approx(0.3736068, abs=1e-6)
    # CCS per word: caption 0: 0, 0; caption 1: .2 - cos((1,1),(.8,.2)) + cos((1,1),(.25,.75)), .2 + .4472 + .5145
    a = {(1, 1): (0.8, 0.2), (1, -1): (0.25, 0.75)}
    c1 = 0.2 - _cos((1, 1), a[1, 1]) + _cos((1, 1), a[1, -1])
    c2 = 0.2 - _cos((1, -1), a[1, -1]) + _cos((1, -1), a[1, 1])
    assert res["ccs"].item() == pytest.approx((c1 + c2) / 4, abs=1e-6)
    assert res["ccs"].item() == pytest.approx(0.349661, abs=1e-5)


def test_caption_words_group_word_pieces_and_skip_special_tokens():
    # [CLS] a sur ##fing dog [SEP] <pad>   ("a surfing dog"); second caption: [CLS] cat [SEP]
    offsets = torch.tensor([[[0, 0], [0, 1], [2, 5], [5, 9], [10, 13], [0, 0], [0, 0]],
                            [[0, 0], [0, 3], [0, 0], [0, 0], [0, 0], [0, 0], [0, 0]]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    txt, pos = caption_words({"offsets": offsets, "word_mask": mask})
    assert txt.tolist() == [0, 0, 0, 1]
    assert pos.tolist() == [[0, 1, 0, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0, 0, 0], [0, 0, 0, 0, 1, 0, 0],
                            [0, 1, 0, 0, 0, 0, 0]]
    # Karpathy tokens: between <start> and <end> only.
    txt, pos = caption_words({"tokens": torch.zeros(2, 5, dtype=torch.long), "lengths": torch.tensor([5, 3])})
    assert txt.tolist() == [0, 0, 0, 1] and pos.argmax(1).tolist() == [1, 2, 3, 1]


def test_same_image_captions_are_negatives_by_default_as_in_scan_code():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.85, 0.9, 0.2], [0.3, 0.1, 0.7]])  # captions 0, 1 of one image
    batch = {"txt_img": torch.tensor([0, 0, 1])}
    out = {"sim": sim}
    cfg = MatchTrainConfig(model="scan", store="x", **TINY)
    assert cfg.same_image_negatives
    assert match_losses(out, batch, cfg)["triplet"].item() == pytest.approx(hardest_negative_triplet(sim).item())
    off = MatchTrainConfig(model="scan", store="x", same_image_negatives=False, **TINY)
    expect = hardest_negative_triplet(sim, image_ids=torch.tensor([0, 0, 1])).item()
    assert match_losses(out, batch, off)["triplet"].item() == pytest.approx(expect)
    assert expect < hardest_negative_triplet(sim).item()


def test_median_rank_is_scan_floor_of_numpy_median_plus_one():
    assert median_rank(torch.tensor([0, 0, 3, 3])) == 2.0  # numpy median 1.5 -> floor 1 -> 2
    assert median_rank(np.array([4, 0, 2])) == 3.0
    # Captions 2, 3 rank their own image last: t2i ranks (0, 0, 3, 3).
    sim = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, -1.0, 0], [0, 0, 0, -1.0]])
    m = recall_at_k(sim, torch.arange(4))
    assert m["t2i_medr"] == 2.0 == m["i2t_medr"]


def test_coco_protocol_that_cannot_apply_is_reported_not_replaced():
    sim, t2i = torch.randn(20, 100), torch.arange(20).repeat_interleave(5)
    m = protocol_metrics(sim, t2i)
    assert m["protocol"] == "full" and "COCO 1K/5K not applied" in m["protocol_note"] and "20 images" in m["protocol_note"]
    with pytest.raises(ValueError, match="5,000-image test split; this split has 20 images"):
        protocol_metrics(sim, t2i, protocol="coco")
    with pytest.raises(ValueError, match="protocol must be one of"):
        protocol_metrics(sim, t2i, protocol="coco5k")
    assert "protocol_note" not in protocol_metrics(sim, t2i, protocol="full")


def test_config_validates_choices_and_validates_on_1k_images_by_default():
    assert MatchTrainConfig().val_max_images == 1000 and MatchTrainConfig().captions == "each"
    with pytest.raises(ValueError, match=r"captions must be one of \('each', 'one', 'all'\), got 'eech'"):
        MatchTrainConfig(captions="eech")
    with pytest.raises(ValueError, match="agg must be one of"):
        MatchTrainConfig(agg="max")


def test_block_groups_touch_at_most_the_window():
    order = np.array([0, 17, 1, 33, 16, 2, 48, 34])
    groups = block_groups(order, 16, 2)
    assert [g.tolist() for g in groups] == [[0, 17, 1], [33, 16], [2, 48], [34]]


def test_caption_epoch_sees_every_caption_once_shuffled_at_caption_level(synth):
    cfg = MatchTrainConfig(model="scan", store=synth, **TINY)
    vocab = build_vocab(cfg)
    ds = MatchDataset(synth, text="tokens", visual="regions", vocab=vocab, split="train", captions="each", labels=False)
    counts = ds.caption_counts()
    loader, sampler = match_loader(ds, batch_size=7, seed=3, window_blocks=1)
    sampler.set_epoch(0)
    store = open_store(synth)
    seen, batches = [], 0
    for batch in loader:
        pairs = list(zip((batch["rows"][batch["txt_img"]]).tolist(), batch["caption"].tolist()))
        assert len(pairs) <= 7
        for (row, c), text in zip(pairs, batch["texts"]):
            assert text == store.captions(row)[c]  # each caption comes with its own image
        # streaming: one batch reads rows of at most 2 windows of 1 block
        assert len(set(r // ds.block_size for r, _ in pairs)) <= 2
        seen += pairs
        batches += 1
    expect = sorted((int(r), c) for r, n in zip(ds.rows, counts) for c in range(int(n)))
    assert sorted(seen) == expect and len(seen) == len(set(seen)) == counts.sum()  # every caption once
    assert batches == len(loader) == -(-int(counts.sum()) // 7)
    # caption-level shuffle: an image's captions are not kept together
    where = {}
    for i, (r, _) in enumerate(seen):
        where.setdefault(r, []).append(i)
    assert sum(max(p) - min(p) + 1 > len(p) for p in where.values()) > len(where) // 2
    # another epoch, another order; the same epoch again, the same order
    again = sampler.epoch_pairs(0).copy()
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.epoch_pairs(1), again)
    fresh = CaptionBatchSampler(ds.main.sampler(seed=3, window_blocks=1), counts, 7)
    assert np.array_equal(fresh.epoch_pairs(0), again)


def test_caption_epoch_resumes_mid_epoch_and_ranks_take_equal_steps(synth):
    ds = MatchDataset(synth, text="bert", visual="regions", split="train", captions="each", labels=False)
    counts = ds.caption_counts()
    full = CaptionBatchSampler(ds.main.sampler(seed=1), counts, 8)
    batches = [p for _, p in full]
    state = full.state_dict(position=3 * 8)
    resumed = CaptionBatchSampler(ds.main.sampler(seed=1), counts, 8)
    resumed.load_state_dict(state)
    assert len(resumed) == len(batches) - 3
    assert all(np.array_equal(a, b) for a, (_, b) in zip(batches[3:], resumed))
    counts = counts.copy()
    counts[0] = 1  # ranks now hold different numbers of captions
    ranks = [CaptionBatchSampler(ds.main.sampler(seed=1, rank=r, world_size=2, drop_last=True), counts, 8,
                                 drop_last=True) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    both = np.concatenate([r.epoch_pairs(0) for r in ranks])
    assert len({tuple(p) for p in both.tolist()}) == len(both)  # disjoint shards
    with pytest.raises(ValueError, match="row-level epochs"):
        resumed.load_state_dict({"epoch": 0, "seed": 1, "position": 0})


def test_caption_epoch_reads_ahead_before_each_batch(synth):
    """match_loader's caption-level sampler tells the reader's readahead of every block (once) before the
    first batch that reads it, as the row sampler of stream_loader does."""
    cfg = MatchTrainConfig(model="scan", store=synth, **TINY)
    ds = MatchDataset(synth, text="tokens", visual="regions", vocab=build_vocab(cfg), split="train", captions="each", labels=False)
    _, sampler = match_loader(ds, batch_size=7, seed=3, window_blocks=1)
    assert sampler.rows.readahead == ds.main.reader.readahead and sampler.rows.readahead_rows > 0
    calls, announced, batches = [], [], 0
    sampler.rows.readahead = calls.append
    for _, pairs in sampler:
        announced += [b for c in calls for b in c]
        calls.clear()
        assert set((pairs[:, 0] // ds.block_size).tolist()) <= set(announced)
        batches += 1
    assert batches > 1 and len(announced) == len(set(announced)) == len(set(ds.main.rows // ds.block_size))
