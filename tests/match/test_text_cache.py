"""Text cache: frozen BERT outputs row-aligned to a real store, resumable, and tied to its store."""

import numpy as np
import pytest
import torch

from vlcache.stages.common.store_rows import store_fingerprint
from vlcache.stages.match.data import MatchDataset
from vlcache.stages.match.text_cache import build_text_cache, check_text_cache
from vlcache.stages.common.text_encoders import DEFAULT_BERT, char_span_to_token_mask, encode_tokens, load_bert
from vlcache.storage.backends import open_backend
from vlcache.storage.errors import ConfigMismatchError, StoreError

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def bert():
    return load_bert()


def _read_all(url):
    with open_backend(url, "r") as be:
        return {p: np.asarray(be.read(p, slice(None))) for p in be.arrays()}, be.attrs(), be.layout


def test_round_trip_rows_aligned_and_offsets_map_matches(tiny_store_factory, tmp_path, bert):
    tiny = tiny_store_factory("main.zarr", n=20, block_size=8)
    out = str(tmp_path / "text.zarr")
    res = build_text_cache(tiny.url, out, max_len=24, batch_size=16)
    assert res["complete"] and res["blocks_written"] == 3
    arrays, attrs, layout = _read_all(out)
    # Same rows and blocks; images/* and captions/* copied verbatim.
    assert layout.num_rows == 20 and layout.block_size == 8 and layout.groups == ("images", "captions", "text")
    for path in ("images/id", "images/path", "images/error", "captions/count", "captions/text", "captions/tokens"):
        assert np.array_equal(arrays[path], tiny.truth[path]), path
    assert attrs["text_encoder"]["name"] == DEFAULT_BERT and attrs["text_encoder"]["hidden_size"] == 384
    assert attrs["config"]["main_fingerprint"] == store_fingerprint(tiny.url)
    assert check_text_cache(out, tiny.url)["main_store"]["block_size"] == 8

    hidden, mask, offsets = arrays["text/hidden"], arrays["text/mask"], arrays["text/offsets"]
    assert hidden.shape == (20, 3, 24, 384) and hidden.dtype == np.float16
    counts = tiny.truth["captions/count"]
    tok, model = bert
    where = [(r, c) for r in range(20) for c in range(3) if c < counts[r]]
    h, m, o = encode_tokens([str(tiny.truth["captions/text"][r, c]) for r, c in where], tok, model, max_len=24)
    n_checked = 0
    for r in range(20):
        for c in range(counts[r], 3):  # padding captions stay empty
            assert mask[r, c].sum() == 0 and not hidden[r, c].any()
    for j, (r, c) in enumerate(where):
        text = str(tiny.truth["captions/text"][r, c])
        L = m.shape[1]
        real = m[j].numpy()
        assert np.array_equal(mask[r, c, :L], real) and mask[r, c, L:].sum() == 0
        assert np.array_equal(offsets[r, c, :L][real], o[j].numpy()[real])
        np.testing.assert_allclose(hidden[r, c, :L][real].astype(np.float32), h[j].numpy()[real], atol=2e-2, rtol=1e-2)
        # Every matched word's character span maps to exactly the word pieces that spell it.
        for k in range(int(tiny.truth["matches/count"][r, c])):
            cs, ce = (int(v) for v in tiny.truth["matches/span"][r, c, k, 2:4])
            sel = char_span_to_token_mask(torch.from_numpy(offsets[r, c]), cs, ce)
            pieces = offsets[r, c][sel.numpy()]
            assert len(pieces) >= 1
            assert pieces[0, 0] == cs and pieces[-1, 1] == ce
            covered = "".join(text[a:b] for a, b in pieces)
            assert covered == text[cs:ce].replace(" ", "")
            n_checked += 1
    assert n_checked > 20


def test_ranks_share_the_work_and_a_rerun_resumes(tiny_store_factory, tmp_path):
    tiny = tiny_store_factory("main.zarr", n=20, block_size=8)
    out = str(tmp_path / "text.zarr")
    first = build_text_cache(tiny.url, out, max_len=16, rank=0, world_size=2)  # blocks 0 and 2
    assert first == {"url": out, "blocks_written": 2, "complete": False}
    with open_backend(out, "r") as be:
        assert np.asarray(be.read("images/done", slice(None))).tolist() == [1] * 8 + [0] * 8 + [1] * 4
    assert build_text_cache(tiny.url, out, max_len=16, rank=0, world_size=2)["blocks_written"] == 0  # nothing redone
    second = build_text_cache(tiny.url, out, max_len=16, rank=1, world_size=2)
    assert second["blocks_written"] == 1 and second["complete"]
    arrays, attrs, _ = _read_all(out)
    assert attrs["complete"] and np.array_equal(arrays["captions/text"], tiny.truth["captions/text"])
    # Same BERT settings only: a different max_len is a different cache.
    with pytest.raises(ConfigMismatchError, match="max_len"):
        build_text_cache(tiny.url, out, max_len=20)


def test_needs_a_complete_store(tiny_store_factory, tmp_path):
    partial = tiny_store_factory("partial.zarr", n=20, block_size=8, blocks=[0], finalize=False)
    with pytest.raises(StoreError, match="not complete .8 of 20 rows"):
        build_text_cache(partial.url, str(tmp_path / "text.zarr"))


def test_cache_of_another_store_is_refused(tiny_store_factory, tmp_path):
    a = tiny_store_factory("a.zarr", n=12, block_size=4)
    b = tiny_store_factory("b.zarr", n=12, block_size=6)
    out = str(tmp_path / "text_a.zarr")
    build_text_cache(a.url, out, max_len=16)
    with pytest.raises(StoreError, match="another store|block_size"):
        check_text_cache(out, b.url)
    with pytest.raises(StoreError, match="block size"):
        MatchDataset(b.url, text="bert", visual="regions", text_cache=out)
    with pytest.raises(StoreError, match="not a text cache"):
        check_text_cache(a.url, a.url)
