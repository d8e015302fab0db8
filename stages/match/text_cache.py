"""Text cache: the frozen BERT's token outputs for every caption, computed once (METHODS §4).

MMCA's BERT is frozen, so its outputs are data, not computation: ``build_text_cache`` writes them to a
separate store (groups ``images``, ``captions``, ``text``) with exactly the main store's rows and block
size, so a training batch reads ``text/hidden`` (N, C, L, H) for the same row indices it reads regions
from. ``text/offsets`` holds each subword token's character span in ``captions/text``; the class-word
matches (``matches/span`` char columns) map onto BERT tokens through them
(:func:`~vlcache.stages.common.text_encoders.char_span_to_token_mask`).

The cache records the BERT it used and the main store's fingerprint (``common.store_rows.store_fingerprint``,
the one runs record); :func:`check_text_cache` refuses a
cache built from another store or another row layout. Writing goes through :class:`StoreWriter`, block
by block, so an interrupted build resumes where it stopped (same BERT and main store, else a
:class:`ConfigMismatchError` asks for another output or ``overwrite``).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch

from ...storage.backends import open_backend
from ...storage.errors import StoreError
from ...storage.schema import DONE, TEXT_GROUP, Layout
from ...storage.writer import StoreWriter, done_mask
from ..common.store_rows import store_fingerprint
from ..common.text_encoders import DEFAULT_BERT, encode_tokens, load_bert

KIND = "text_cache"
COPIED = ("images", "captions")  # groups copied row for row from the main store


def _bert_id(bert) -> str:
    return DEFAULT_BERT if bert is None else os.fspath(bert)


def cache_config(fingerprint: str, bert, max_len: int, hidden: int) -> dict:
    """The cache's ``config`` attribute: what must match for a resumed build to continue."""
    return {"kind": KIND, "bert": _bert_id(bert), "max_len": int(max_len), "hidden_size": int(hidden),
            "main_fingerprint": fingerprint}


def build_text_cache(store_url, out_url, bert=None, max_len: int = 32, batch_size: int = 256,
                     device: str | torch.device = "cpu", overwrite: bool = False, progress: bool = False,
                     rank: int = 0, world_size: int = 1, storage_options: dict | None = None) -> dict:
    """Encode every caption of the store at ``store_url`` with the frozen BERT into a cache at ``out_url``.

    ``bert``: None (bundled all-MiniLM-L6-v2) or a local BERT directory / cached Hugging Face name.
    Captions longer than ``max_len`` subword tokens ([CLS]/[SEP] included) are truncated; matched words
    past the cut have no tokens and are skipped by training. The main store must be complete (its
    fingerprint, which the cache records, is final only then). ``rank``/``world_size``: processes that
    share the work own disjoint blocks (as extraction does); a rerun writes only the blocks not done.
    Returns ``{"url", "blocks_written", "complete"}`` (complete once every rank's blocks are done).
    """
    src = open_backend(os.fspath(store_url), "r", storage_options=storage_options)
    try:
        attrs, layout = src.attrs(), src.layout
        if not attrs.get("complete"):
            done = int(done_mask(src).sum())
            raise StoreError(f"store {store_url} is not complete ({done} of {layout.num_rows} rows done): finish "
                             "its extraction before building a text cache")
        fingerprint = store_fingerprint(store_url, storage_options)
        tokenizer, model = load_bert(bert, device=device)
        hidden = int(model.config.hidden_size)
        cap = dataclasses.replace(layout.capacities, text_len=int(max_len), text_dim=hidden)
        out_layout = Layout(layout.num_rows, layout.block_size, cap, COPIED + (TEXT_GROUP,))
        out_attrs = {
            "dataset": attrs.get("dataset"), "image_root": attrs.get("image_root"), "classes": attrs.get("classes"),
            "config": cache_config(fingerprint, bert, max_len, hidden),
            "main_store": {"url": src.url, "fingerprint": fingerprint, "num_rows": layout.num_rows,
                           "block_size": layout.block_size},
            "text_encoder": {"name": _bert_id(bert), "hidden_size": hidden, "max_len": int(max_len),
                             "layers": int(model.config.num_hidden_layers)},
        }
        writer = StoreWriter(out_url, out_layout, out_attrs, rank=rank, world_size=world_size, overwrite=overwrite,
                             storage_options=storage_options)
        written = 0
        pending = writer.pending_blocks()
        it = pending
        if progress:
            from tqdm import tqdm
            it = tqdm(pending, desc="text cache", unit="block")
        for b in it:
            rows = layout.block_rows(b)
            arrays = {s.path: src.read_block(s.path, b) for s in out_layout.specs()
                      if s.group in COPIED and s.path != DONE}
            arrays.update(_encode_block(arrays, cap, tokenizer, model, batch_size, device, src.url, rows.start))
            writer.write_block(b, arrays)
            written += 1
        complete = writer.finalize()
        writer.close()
        return {"url": os.fspath(out_url), "blocks_written": written, "complete": complete}
    finally:
        src.close()


def _encode_block(arrays: dict, cap, tokenizer, model, batch_size, device, url, first_row) -> dict:
    """``text/*`` arrays (n, C, L, ...) for one block's captions."""
    counts = np.asarray(arrays["captions/count"]).astype(int)
    texts = np.asarray(arrays["captions/text"], dtype=object)
    n, C, L, H = len(counts), cap.captions, cap.text_len, cap.text_dim
    hidden = np.zeros((n, C, L, H), np.float16)
    mask = np.zeros((n, C, L), np.uint8)
    offsets = np.zeros((n, C, L, 2), np.int32)
    where = [(r, c) for r in range(n) for c in range(counts[r])]
    if where:
        batch = [str(texts[r, c]) for r, c in where]
        h, m, o = encode_tokens(batch, tokenizer, model, max_len=L, device=device, batch_size=batch_size,
                                out_device="cpu")
        if h.shape[-1] != H:
            raise StoreError(f"text cache for {url}: BERT width {h.shape[-1]} != layout text_dim {H}")
        if not torch.isfinite(h).all():
            r, c = where[int((~torch.isfinite(h)).flatten(1).any(1).nonzero()[0])]
            raise StoreError(f"text cache for {url}: BERT output is not finite for row {first_row + r} caption {c}")
        ri = np.array([r for r, _ in where])
        ci = np.array([c for _, c in where])
        w = h.shape[1]
        hidden[ri, ci, :w] = h.numpy().astype(np.float16)
        mask[ri, ci, :w] = m.numpy()
        offsets[ri, ci, :w] = o.numpy()
    return {"text/hidden": hidden, "text/mask": mask, "text/offsets": offsets}


def check_text_cache(cache_url, store_url, storage_options: dict | None = None) -> dict:
    """Verify that the cache at ``cache_url`` was built from the store at ``store_url`` and has its rows
    and blocks; return the cache's attributes. Errors name both stores and what differs."""
    with open_backend(os.fspath(cache_url), "r", storage_options=storage_options) as cache, \
            open_backend(os.fspath(store_url), "r", storage_options=storage_options) as main:
        ca = cache.attrs()
        if (ca.get("config") or {}).get("kind") != KIND or TEXT_GROUP not in cache.layout.groups:
            raise StoreError(f"{cache_url} is not a text cache (no 'text' group / config.kind != {KIND!r})")
        want, got = store_fingerprint(store_url, storage_options), ca["config"].get("main_fingerprint")
        if want != got:
            raise StoreError(f"text cache {cache_url} was built from another store (fingerprint {got}), not "
                             f"{store_url} ({want}); rebuild it with `vlcache store text-cache`")
        for key in ("num_rows", "block_size"):
            a, b = getattr(cache.layout, key), getattr(main.layout, key)
            if a != b:
                raise StoreError(f"text cache {cache_url} has {key}={a} but store {store_url} has {b}")
        if main.layout.capacities.captions != cache.layout.capacities.captions:
            raise StoreError(f"text cache {cache_url} holds {cache.layout.capacities.captions} captions per row, "
                             f"store {store_url} {main.layout.capacities.captions}")
        return ca
