"""The notebook Store on a real tiny store (Zarr and HDF5): every accessor against what was written."""

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from vlcache.storage.errors import StoreError, StoreNotFoundError
from vlcache.storage.masks import merged_grid_coverage, paste_masks
from vlcache.storage.schema import Capacities, Layout
from vlcache.storage.store import RowNotDoneError, Store, open_store
from vlcache.storage.writer import StoreWriter

torch.set_num_threads(2)


def first_good(ts, need_match=False):
    t = ts.truth
    for r in range(len(t["images/id"])):
        if r in ts.error_rows:
            continue
        if not need_match or t["matches/count"][r, 0] > 0:
            return r
    raise AssertionError("tiny store has no such row")


def test_metadata_and_index(tiny_store):
    s = open_store(tiny_store.url)
    t = tiny_store.truth
    assert isinstance(s, Store) and len(s) == 20
    assert s.classes == ["person", "dog", "teddy bear", "car", "cat"]
    assert s.attrs["dataset"] == "tiny" and s.attrs["complete"] is True
    assert list(s.ids) == list(t["images/id"])
    assert s.index_of("img007") == 7
    with pytest.raises(KeyError, match="no image with id 'nope'"):
        s.index_of("nope")
    good = [r for r in range(20) if r not in tiny_store.error_rows]
    assert s.rows().tolist() == good
    assert s.rows(done_only=False).tolist() == list(range(20))
    assert s.rows("val").tolist() == [r for r in good if r % 3 == 1]
    with pytest.raises(ValueError, match="unknown split"):
        s.rows("dev")
    assert "rows=20" in repr(s)


def test_row_accessors(tiny_store):
    s, t = open_store(tiny_store.url), tiny_store.truth
    for r in (0, 9, 19):
        n = t["captions/count"][r]
        assert s.captions(r) == list(t["captions/text"][r, :n])
        assert s.tokens(r) == [line.split() for line in t["captions/tokens"][r, :n]]
        inst, k = s.instances(r), t["instances/count"][r]
        assert inst["boxes"].shape == (k, 4) and inst["masks"].shape == (k, 28, 28)
        np.testing.assert_array_equal(inst["labels"], t["instances/labels"][r, :k])
        np.testing.assert_array_equal(inst["masks"], t["instances/masks"][r, :k])
        assert inst["class_names"] == [s.classes[c] for c in t["instances/labels"][r, :k]]
        reg, nr = s.regions(r), t["regions/count"][r]
        assert reg["feats"].dtype == np.float16 and reg["feats"].shape == (nr, 16)
        np.testing.assert_array_equal(reg["feats"], t["regions/feats"][r, :nr])
        g = s.grid(r)
        assert g.shape == (16, 8) and g.dtype == np.float16
        np.testing.assert_array_equal(g, t["grid/feats"][r])
        assert s.hw(r) == tuple(t["images/hw"][r])
    assert s.split(1) == "val"


def test_image(tiny_store, tmp_path):
    s = open_store(tiny_store.url)
    img = s.image(3)
    expected = np.asarray(Image.open(tiny_store.image_root / "imgs/003.png"))
    np.testing.assert_array_equal(np.asarray(img), expected)
    assert img.size[::-1] == s.hw(3)
    # A moved image folder: the stored root fails clearly, an override finds them.
    moved = tmp_path / "moved"
    tiny_store.image_root.rename(moved)
    with pytest.raises(FileNotFoundError, match=r"row 3 \(image id 'img003'\).*image_root="):
        s.image(3)
    np.testing.assert_array_equal(np.asarray(open_store(tiny_store.url, image_root=moved).image(3)), expected)


def test_masks_sizes(tiny_store):
    s, t = open_store(tiny_store.url), tiny_store.truth
    r = 4
    k, (h, w) = t["instances/count"][r], t["images/hw"][r]
    full = s.masks(r)
    assert full.shape == (k, h, w) and full.dtype == np.float32
    np.testing.assert_allclose(full, paste_masks(t["instances/boxes"][r, :k], t["instances/masks"][r, :k], (h, w)))
    assert full.max() > 0.5
    assert s.masks(r, size=(20, 30)).shape == (k, 20, 30)
    grid = s.masks(r, size="grid")
    assert grid.shape == (k, 4, 4) and 0 <= grid.min() and grid.max() <= 1 and grid.max() > 0
    with pytest.raises(ValueError, match="size must be"):
        s.masks(r, size="huge")


def test_matches_and_merged_mask(tiny_store):
    s, t = open_store(tiny_store.url), tiny_store.truth
    r = first_good(tiny_store, need_match=True)
    ms = s.matches(r, 0)
    assert len(ms) == t["matches/count"][r, 0]
    text, toks = t["captions/text"][r, 0], t["captions/tokens"][r, 0].split()
    for m, span, lab in zip(ms, t["matches/span"][r, 0], t["matches/label"][r, 0]):
        assert (m["token_start"], m["token_end"], m["char_start"], m["char_end"]) == tuple(span)
        assert m["label"] == lab and m["class_name"] == s.classes[lab]
        assert m["words"] == " ".join(toks[m["token_start"]:m["token_end"]]) == m["class_name"]
        assert text[m["char_start"]:m["char_end"]].lower() == m["class_name"]
    m = ms[0]
    k = t["instances/count"][r]
    labels, scores = t["instances/labels"][r, :k], t["instances/scores"][r, :k]
    boxes, masks, hw = t["instances/boxes"][r, :k], t["instances/masks"][r, :k], tuple(t["images/hw"][r])
    for thr in (0.0, 0.5, 1.01):
        keep = (labels == m["label"]) & (scores >= thr)
        expected = (paste_masks(boxes[keep], masks[keep], hw) >= 0.5).any(0) if keep.any() else np.zeros(hw, bool)
        by_index = s.merged_mask(r, 0, m["token_start"], score_threshold=thr)
        by_word = s.merged_mask(r, 0, m["words"], score_threshold=thr)
        assert by_index.dtype == bool and by_index.shape == hw
        np.testing.assert_array_equal(by_index, expected)
        np.testing.assert_array_equal(by_word, expected)
    assert s.merged_mask(r, 0, m["token_start"], score_threshold=1.01).sum() == 0
    keep = (labels == m["label"]) & (scores >= 0.0)
    g = s.merged_mask(r, 0, m["token_start"], score_threshold=0.0, size="grid")
    np.testing.assert_allclose(g, merged_grid_coverage(boxes[keep], masks[keep], hw, 4))
    assert s.merged_mask(r, 0, m["token_start"], 0.0, size=(10, 12)).shape == (10, 12)
    unmatched = next(i for i in range(len(toks)) if not any(x["token_start"] <= i < x["token_end"] for x in ms))
    with pytest.raises(KeyError, match=f"caption 0: word {unmatched} is not matched"):
        s.merged_mask(r, 0, unmatched)
    with pytest.raises(IndexError, match="captions; no caption 7"):
        s.matches(r, 7)


def test_show_renders(tiny_store):
    s = open_store(tiny_store.url)
    r = first_good(tiny_store, need_match=True)
    fig = s.show(r)
    assert isinstance(fig, Figure)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    png = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(int)
    assert png.std() > 10 and len(np.unique(png.reshape(-1, 3), axis=0)) > 100  # not blank
    # word=... draws only that word's merged mask: a different picture.
    word = s.matches(r, 0)[0]["token_start"]
    buf2 = io.BytesIO()
    s.show(r, caption=0, word=word).savefig(buf2, format="png")
    assert buf2.getvalue() != buf.getvalue()
    # Into a caller's axes.
    fig3 = Figure()
    ax = fig3.add_subplot()
    assert s.show(r, ax=ax) is fig3 and len(ax.images) >= 1


def test_error_rows_and_bad_indices(tiny_store):
    s = open_store(tiny_store.url)
    bad = tiny_store.error_rows[0]
    with pytest.raises(RowNotDoneError, match=f"row {bad} .*failed extraction: decoder failed"):
        s.captions(bad)
    with pytest.raises(IndexError, match="row 20 out of range"):
        s.grid(20)
    with pytest.raises(TypeError, match="index_of"):
        s.grid("img001")


def test_not_done_rows(tiny_store_factory):
    ts = tiny_store_factory("partial.zarr", n=20, block_size=8, blocks=[0, 2], finalize=False)
    s = open_store(ts.url)
    assert s.done.tolist() == [True] * 8 + [False] * 8 + [True] * 4
    assert 9 not in s.rows() and 17 in s.rows()
    with pytest.raises(RowNotDoneError, match=r"row 9 \(image id ''\) is not extracted yet"):
        s.instances(9)
    assert s.captions(17) == list(ts.truth["captions/text"][17, :ts.truth["captions/count"][17]])


def test_missing_store_and_group(tmp_path, tiny_store_factory):
    with pytest.raises(StoreNotFoundError):
        open_store(tmp_path / "nothing.zarr")
    # A store without the optional groups.
    lay = Layout(num_rows=4, block_size=4, capacities=Capacities(), groups=("images", "captions"))
    w = StoreWriter(str(tmp_path / "bare.zarr"), lay, {"classes": []})
    w.write_block(0, {"images/id": np.array(["a", "b", "c", "d"], dtype=object)})
    w.finalize()
    s = open_store(tmp_path / "bare.zarr")
    assert s.index_of("c") == 2
    with pytest.raises(StoreError, match="has no 'instances' group"):
        s.instances(0)
