"""detectron2's mask-pasting convention (METHODS.md section 12), without detectron2 installed.

The reference is the heart of detectron2's ``layers.mask_ops._do_paste_mask`` (``skip_empty=False``):
``F.grid_sample`` over the float box, written out here because CI has no detectron2. Where detectron2
is importable, tests/extract/test_detector_detectron2.py compares against its own ``paste_masks_in_image`` as well.
"""

import numpy as np
import pytest
import torch
from mask_helpers import H, W, assert_same_paste, brute_coverage, grid_sample_paste, random_instances, torchvision_paste

from vlcache.storage.masks import grid_coverage, paste_convention, paste_masks, resize_masks
from vlcache.storage.store import open_store

torch.set_num_threads(2)
D2_ATTRS = {"models": {"detector": {"backend": "detectron2", "mask_paste": "detectron2"}}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detectron2_paste_matches_grid_sample(seed):
    boxes, masks = random_instances(seed)  # sub-pixel, whole-image and partly outside boxes
    mine = paste_masks(boxes, masks, (H, W), convention="detectron2")
    assert mine.dtype == np.float32 and mine.shape == (7, H, W)
    assert_same_paste(mine, grid_sample_paste(boxes, masks, (H, W)))
    # the two conventions really differ (the torchvision paste extends past the box by one mask cell)
    tv = torchvision_paste(boxes, masks, (H, W))
    assert np.abs(mine - tv).max() > 0.1 and not np.array_equal(mine >= 0.5, tv >= 0.5)


def test_detectron2_resize_and_coverage_sample_the_same_mask():
    boxes, masks = random_instances(4)
    full = paste_masks(boxes, masks, (H, W), convention="detectron2")
    assert np.allclose(resize_masks(boxes, masks, (H, W), (H, W), convention="detectron2"), full, atol=1e-6)
    assert np.abs(resize_masks(boxes, masks, (H, W), (H * 2, W * 2), convention="detectron2")[:, ::2, ::2]
                  - full).max() < 0.35  # half-pixel shifted samples of the same smooth masks
    cov = grid_coverage(boxes, masks, (H, W), 5, convention="detectron2")  # exact by pixel overlap
    assert np.allclose(cov, brute_coverage(full >= 0.5, 5), atol=1e-5)


def test_detectron2_paste_of_an_empty_box_is_zero():
    masks = np.full((2, 28, 28), 255, np.uint8)
    boxes = np.array([[10, 10, 10, 30], [5, 7, 25, 7]], np.float32)  # zero width, zero height
    out = paste_masks(boxes, masks, (40, 40), convention="detectron2")
    assert np.isfinite(out).all() and out.max() == 0


def test_unknown_convention_is_named():
    boxes, masks = random_instances(0)
    with pytest.raises(ValueError, match="convention must be one of .*'detectron3'"):
        paste_masks(boxes, masks, (H, W), convention="detectron3")
    with pytest.raises(ValueError, match="unknown mask_paste 'detectron3'"):
        paste_convention({"models": {"detector": {"mask_paste": "detectron3"}}})


def test_store_pastes_with_the_recorded_convention(tiny_store_factory):
    d2 = tiny_store_factory("d2.zarr", n=6, block_size=3, extra_attrs=D2_ATTRS)
    old = tiny_store_factory("old.zarr", n=6, block_size=3)  # written before mask_paste was recorded
    s2, so = open_store(d2.url), open_store(old.url)
    assert s2.mask_paste == "detectron2" and so.mask_paste == "torchvision"
    for i in (0, 2, 3):
        n = int(d2.truth["instances/count"][i])
        boxes, masks = d2.truth["instances/boxes"][i, :n], d2.truth["instances/masks"][i, :n]
        hw = tuple(int(v) for v in d2.truth["images/hw"][i])
        assert_same_paste(s2.masks(i), grid_sample_paste(boxes, masks, hw))
        assert np.allclose(s2.masks(i, size=hw), s2.masks(i), atol=1e-6)
        assert np.allclose(s2.masks(i, size="grid"),
                           grid_coverage(boxes, masks, hw, d2.layout.capacities.grid_size, convention="detectron2"))
        n = int(old.truth["instances/count"][i])
        boxes, masks = old.truth["instances/boxes"][i, :n], old.truth["instances/masks"][i, :n]
        hw = tuple(int(v) for v in old.truth["images/hw"][i])
        assert np.abs(so.masks(i) - torchvision_paste(boxes.astype(np.float32), masks, hw)).max() < 1e-5
    # merged masks follow the convention too
    found = [(i, c, m) for i in s2.rows() for c in range(len(s2.captions(i))) for m in s2.matches(i, c)]
    assert found
    for i, c, match in found[:3]:
        inst = s2.instances(i)
        keep = (inst["labels"] == match["label"]) & (inst["scores"] >= 0.5)
        ref = (grid_sample_paste(inst["boxes"][keep], inst["masks"][keep], s2.hw(i)) >= 0.5).any(axis=0)
        assert np.array_equal(s2.merged_mask(i, c, match["token_start"]), ref)


def test_training_readers_paste_with_the_store_convention(tiny_store_factory):
    from vlcache.stages.caption.data import CaptionBatches, CaptionTransform, store_info
    from vlcache.stages.common.store_rows import train_tokens
    from vlcache.stages.common.ica import region_labels
    from vlcache.stages.match.data import MatchDataset, image_masks
    from vlcache.stages.common.vocab import Vocab
    from vlcache.storage.masks import region_inside_fraction

    d2 = tiny_store_factory("d2train.zarr", n=6, block_size=3, extra_attrs=D2_ATTRS)
    store = open_store(d2.url)
    rows = store.rows()
    info = store_info(d2.url)
    assert info["mask_paste"] == "detectron2"
    vocab = Vocab.build(train_tokens(d2.url, rows), 1)
    # captioning: each ICA target's coverage is the word's merged mask, pasted the detectron2 way
    tf = CaptionTransform(vocab, info["grid_size"], ica=True, mask_paste=info["mask_paste"], url=d2.url)
    b = CaptionBatches(d2.url, tf, rows=rows)[list(rows)]
    assert len(b["ica_sample"]) > 3
    for j, (s, step) in enumerate(zip(b["ica_sample"].tolist(), b["ica_step"].tolist())):
        row, c = int(b["rows"][b["img_index"][s]]), int(b["cap_index"][s])
        want = store.merged_mask(row, c, step, size="grid").reshape(-1)
        assert np.allclose(b["ica_coverage"][j].numpy(), want)
    # matching: the dataset reads the convention, pastes each image's masks with it, and labels regions
    # from the merged mask pasted the same way
    ds = MatchDataset(d2.url, text="tokens", visual="regions", vocab=vocab, rows=rows)
    assert ds.mask_paste == "detectron2"
    raw = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in ds.main[list(rows)].items()}
    for i, row in enumerate(rows):
        binary, classes = image_masks(raw, i, 0.5, ds.mask_paste)
        inst = store.instances(int(row))
        keep = inst["scores"] >= 0.5
        assert np.array_equal(binary, store.masks(int(row))[keep] >= 0.5)
        assert np.array_equal(classes, inst["labels"][keep])
    mb = ds[list(rows)]
    assert mb["match_txt"].numel() > 3
    for j in range(mb["match_txt"].numel()):
        t = int(mb["match_txt"][j])
        row, c = int(mb["rows"][mb["txt_img"][t]]), int(mb["caption"][t])
        mask = store.merged_mask(row, c, int(mb["match_tok"][j][0]), score_threshold=0.5)
        frac = np.zeros(mb["region_mask"].shape[1], np.float32)
        reg = store.regions(row)
        frac[:len(reg["boxes"])] = region_inside_fraction(reg["boxes"], mask)
        want, _ = region_labels(torch.from_numpy(frac)[None], 0.5, mb["region_mask"][mb["txt_img"][t]])
        assert torch.equal(mb["match_labels"][j], want[0])
