"""What both model families read about a store before training: its fingerprint, the good rows of a
split, and the caption tokens a vocabulary is built from."""

from __future__ import annotations

import os

import numpy as np

from ...storage.backends import open_backend
from ...storage.fingerprint import fingerprint
from ...storage.streaming import good_rows


def store_fingerprint(url, storage_options: dict | None = None) -> str:
    """The store's fingerprint (:func:`vlcache.storage.fingerprint.fingerprint`: the recorded one, or
    computed from content for a store that has none), so `store info`, `store diff` and training runs agree.

    Runs record it in config.yaml so an evaluation can tell that the store it reads is the one the model
    was trained on.
    """
    return fingerprint(os.fspath(url), storage_options)


def split_rows(url, split: str | None, storage_options: dict | None = None) -> np.ndarray:
    """Good (done, error-free) rows of ``split``; a clear error when there are none."""
    backend = open_backend(os.fspath(url), "r", storage_options=storage_options)
    try:
        rows = good_rows(backend, split)
    finally:
        backend.close()
    if rows.size == 0:
        raise ValueError(f"store {url} has no extracted rows in split {split!r}; extract a dataset that has one "
                         "(COCO captions come one file per split: pass each, e.g. --dataset captions_train2014.json "
                         "--dataset captions_val2014.json, or their folder)")
    return rows


def train_tokens(url, rows: np.ndarray, storage_options: dict | None = None) -> list[str]:
    """Space-joined Karpathy tokens of every caption of ``rows`` (what the vocabulary is built from)."""
    backend = open_backend(os.fspath(url), "r", storage_options=storage_options)
    try:
        counts = np.asarray(backend.read("captions/count", rows))
        tokens = np.asarray(backend.read("captions/tokens", rows), dtype=object)
    finally:
        backend.close()
    return [str(tokens[i, c]) for i in range(len(rows)) for c in range(int(counts[i]))]
