"""Captioning batches streamed from a store, with ICA targets built on the fly (METHODS.md sections 1-2).

A :class:`CaptionBatches` dataset yields one *training batch* per ``__getitem__``: it reads a batch of
store rows with :class:`~vlcache.storage.streaming.StoreBatchDataset` (whole chunks, one copy per array)
and runs :class:`CaptionTransform` on it. Both run inside DataLoader workers, so the training step gets
ready tensors and never waits on the CPU work below.

Every caption of every image is one sample. Grid features stay per image (``feats`` (B, P, D) float16)
with ``img_index`` (S,) saying which image each sample belongs to; expand on the device with
``feats[img_index]``, which moves 5x fewer bytes than per-sample copies.

ICA targets come from the stored detector output and matches; nothing is re-extracted, so the score
threshold is a training option. For every token k of a matched span of caption s naming class c:

* the decoder step that predicts token k is step k (``<start>`` sits at position 0, see ``sat``);
* the merged mask is the union of the instances of class c with score >= ``score_threshold``, its grid
  coverage comes from :func:`~vlcache.storage.masks.merged_grid_coverage` (pixels binarised at
  probability 0.5, cell fractions exact by pixel overlap), and the label map from :func:`~vlcache.stages.common.ica.ica_labels` (cells covered
  >= 50%, else the cell(s) of largest coverage). A word whose class has no instance above the threshold
  (or whose mask covers no cell) cannot be supervised and is dropped; ``ica_dropped`` counts those.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from ...storage.backends import open_backend
from ...storage.masks import merged_grid_coverage, paste_convention
from ...storage.shared_batches import SlotReleasingLoader, transform_keeping_slot
from ...storage.streaming import BlockSampler, StoreBatchDataset
from ..common.ica import ica_labels, matched_steps
from ..common.vocab import Vocab

__all__ = [
    "BASE_FIELDS", "ICA_FIELDS", "caption_fields", "grid_feature_stats",
    "CaptionTransform", "CaptionBatches", "store_info", "identity_collate", "caption_loader",
]

BASE_FIELDS = ("grid/feats", "captions/count", "captions/tokens", "captions/text", "images/hw", "images/id")
ICA_FIELDS = ("instances/count", "instances/labels", "instances/scores", "instances/boxes", "instances/masks",
              "matches/count", "matches/span", "matches/label")


def caption_fields(ica: bool) -> list[str]:
    """Store arrays a captioning batch reads; the ICA ones only when targets are built."""
    return list(BASE_FIELDS) + (list(ICA_FIELDS) if ica else [])


def store_info(url, storage_options: dict | None = None) -> dict:
    """What a captioning run needs to know about a store: grid size/dim, block size, classes, image root."""
    backend = open_backend(os.fspath(url), "r", storage_options=storage_options)
    try:
        layout, attrs = backend.layout, backend.attrs()
        missing = [f for f in BASE_FIELDS if not backend.has(f)]
    finally:
        backend.close()
    if missing:
        raise ValueError(f"store {url} cannot train a captioner: it has no {missing} (extract the 'grid' group)")
    dataset = attrs.get("dataset")
    root = attrs.get("image_root") or (dataset.get("image_root") if isinstance(dataset, dict) else None)
    cap = layout.capacities
    return {"grid_size": cap.grid_size, "grid_dim": cap.grid_dim, "block_size": layout.block_size,
            "classes": list(attrs.get("classes") or []), "image_root": root, "mask_paste": paste_convention(attrs),
            "has_ica": all(g in layout.groups for g in ("instances", "matches"))}


def grid_feature_stats(url, rows: np.ndarray, max_images: int | None = 2000, chunk: int = 64,
                       storage_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (float32, (D,)) of ``grid/feats`` over every cell of ``rows``.

    At most ``max_images`` rows, evenly spaced (the statistics of 2,000 images are within noise of the
    full COCO train split, and reading them costs seconds instead of minutes). Sums are float64, so the
    float16 features lose nothing.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise ValueError(f"store {url}: no rows to compute feature statistics from")
    if max_images is not None and rows.size > max_images:
        rows = rows[np.linspace(0, rows.size - 1, max_images).round().astype(np.int64)]
    backend = open_backend(os.fspath(url), "r", storage_options=storage_options)
    total = total_sq = None
    n = 0
    try:
        for start in range(0, rows.size, chunk):
            feats = np.asarray(backend.read("grid/feats", rows[start:start + chunk]), dtype=np.float64)
            feats = feats.reshape(-1, feats.shape[-1])
            if not np.isfinite(feats).all():
                raise ValueError(f"store {url}: grid/feats of rows {rows[start:start + chunk][:4].tolist()}... "
                                 "hold non-finite values; run `vlcache store verify`")
            total = feats.sum(0) if total is None else total + feats.sum(0)
            total_sq = (feats ** 2).sum(0) if total_sq is None else total_sq + (feats ** 2).sum(0)
            n += feats.shape[0]
    finally:
        backend.close()
    mean = total / n
    var = np.maximum(total_sq / n - mean ** 2, 0.0)
    return torch.from_numpy(mean).float(), torch.from_numpy(np.sqrt(var)).float()


@dataclass
class CaptionTransform:
    """Store batch (numpy arrays, as :class:`StoreBatchDataset` gives) -> training tensors.

    Picklable (plain fields only), so DataLoader workers run it. Output keys:

    ``rows`` (B,) store rows; ``feats`` (B, P, D) float16; ``hw`` (B, 2); ``image_ids`` list[str];
    ``references`` list[list[str]] raw captions per image; ``img_index``/``cap_index`` (S,) image in the
    batch and caption index of each sample; ``captions`` (S, T) long ``<start> .. <end>`` padded with
    ``<pad>``; ``lengths`` (S,). With ``ica``: ``ica_sample``, ``ica_step`` (= the Karpathy token index),
    ``ica_class`` (m,) long, ``ica_labels`` (m, P) float 0/1, ``ica_coverage`` (m, P) float (fraction of
    each cell covered by the merged mask) and ``ica_dropped`` () long.
    """

    vocab: Vocab
    grid_size: int
    ica: bool = False
    score_threshold: float = 0.5
    cover_threshold: float = 0.5
    mask_threshold: float = 0.5
    mask_paste: str = "torchvision"  # the store's pasting convention (store_info's "mask_paste", METHODS §12)
    url: str = "store"

    def __call__(self, batch: dict) -> dict:
        feats = torch.as_tensor(batch["grid/feats"])  # a tensor in shared memory in workers: passed on as is
        batch = {k: _numpy(v) for k, v in batch.items() if k != "grid/feats"}
        rows = batch["row"].astype(np.int64)
        P = self.grid_size * self.grid_size
        if feats.ndim != 3 or feats.shape[1] != P:
            raise ValueError(f"store {self.url} rows {rows[:4].tolist()}: grid/feats has shape {feats.shape[1:]}, "
                             f"expected ({P}, D) for a {self.grid_size}x{self.grid_size} grid")
        counts = np.asarray(batch["captions/count"]).astype(np.int64)
        tokens = batch["captions/tokens"]
        texts = batch["captions/text"]
        cap_slots = tokens.shape[1]
        if (counts > cap_slots).any():
            b = int(np.flatnonzero(counts > cap_slots)[0])
            raise ValueError(f"store {self.url} row {rows[b]}: captions/count {counts[b]} exceeds capacity {cap_slots}")
        img_index = np.repeat(np.arange(rows.size), counts)
        cap_index = np.concatenate([np.arange(n) for n in counts]) if rows.size else np.zeros(0, np.int64)
        token_lines = [str(tokens[b, c]) for b, c in zip(img_index.tolist(), cap_index.tolist())]
        if token_lines:
            captions, lengths = self.vocab.encode_batch(token_lines)
        else:
            captions, lengths = torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        out = {
            "rows": torch.from_numpy(rows),
            "feats": feats,
            "hw": torch.from_numpy(batch["images/hw"].astype(np.int64)),
            "image_ids": [str(v) for v in batch["images/id"]],
            "references": [[str(t) for t in texts[b, :counts[b]]] for b in range(rows.size)],
            "img_index": torch.from_numpy(img_index.astype(np.int64)),
            "cap_index": torch.from_numpy(cap_index.astype(np.int64)),
            "captions": captions,
            "lengths": lengths,
        }
        if self.ica:
            out.update(self._ica_targets(batch, rows, img_index, cap_index, token_lines))
        return out

    def _ica_targets(self, batch, rows, img_index, cap_index, token_lines) -> dict:
        P = self.grid_size * self.grid_size
        n_inst = np.asarray(batch["instances/count"]).astype(np.int64)
        inst_labels, inst_scores = batch["instances/labels"], batch["instances/scores"]
        boxes, masks, hw = batch["instances/boxes"], batch["instances/masks"], batch["images/hw"]
        m_count, m_span, m_label = batch["matches/count"], batch["matches/span"], batch["matches/label"]
        coverage_of: dict[tuple[int, int], torch.Tensor] = {}
        samples, steps, classes, covs = [], [], [], []
        for s, (b, c) in enumerate(zip(img_index.tolist(), cap_index.tolist())):
            if n_inst[b] > inst_labels.shape[1] or n_inst[b] < 0:
                raise ValueError(f"store {self.url} row {rows[b]}: instances/count {n_inst[b]} outside "
                                 f"[0, {inst_labels.shape[1]}]")
            k = int(m_count[b, c])
            if k == 0:
                continue
            try:
                ms = matched_steps(torch.tensor([len(token_lines[s].split())]), torch.from_numpy(m_span[b, c][None]),
                                   torch.from_numpy(m_label[b, c][None]), torch.tensor([k]), max_len=self.vocab.max_len)
            except ValueError as e:
                raise ValueError(f"store {self.url} row {rows[b]} (image {batch['images/id'][b]}) caption {c}: "
                                 f"bad matches: {e}") from None
            for step, cls in zip(ms.step.tolist(), ms.label.tolist()):
                key = (b, cls)
                if key not in coverage_of:
                    n = int(n_inst[b])
                    keep = (inst_labels[b, :n] == cls) & (inst_scores[b, :n] >= self.score_threshold)
                    if keep.any():
                        cov = merged_grid_coverage(torch.from_numpy(boxes[b, :n][keep]),
                                                   torch.from_numpy(masks[b, :n][keep]), tuple(hw[b]),
                                                   self.grid_size, self.mask_threshold,
                                                   convention=self.mask_paste)
                        coverage_of[key] = cov.reshape(P)
                    else:
                        coverage_of[key] = torch.zeros(P)
                samples.append(s)
                steps.append(step)
                classes.append(cls)
                covs.append(coverage_of[key])
        coverage = torch.stack(covs) if covs else torch.zeros(0, P)
        labels, keep = ica_labels(coverage, self.cover_threshold)
        idx = lambda v: torch.tensor(v, dtype=torch.long)[keep]  # noqa: E731 - local shorthand
        return {
            "ica_sample": idx(samples), "ica_step": idx(steps), "ica_class": idx(classes),
            "ica_labels": labels[keep], "ica_coverage": coverage[keep].float(),
            "ica_dropped": torch.tensor(int((~keep).sum()), dtype=torch.long),
        }


def _numpy(x) -> np.ndarray:
    """Store batch fields arrive as tensors (numeric) or object arrays (strings); work on numpy views."""
    return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class CaptionBatches(Dataset):
    """``ds[[r0, r1, ...]]`` -> one transformed training batch (use with ``BatchSampler`` and ``batch_size=None``).

    Reading and :class:`CaptionTransform` both happen here, i.e. in the DataLoader worker.
    """

    def __init__(self, url, transform: CaptionTransform, *, rows=None, split: str | None = None,
                 cache_blocks: int = 4, storage_options: dict | None = None):
        self.store = StoreBatchDataset(url, caption_fields(transform.ica), rows=rows, split=split,
                                       cache_blocks=cache_blocks, storage_options=storage_options)
        self.transform = transform

    @property
    def rows(self) -> np.ndarray:
        return self.store.rows

    @property
    def block_size(self) -> int:
        return self.store.block_size

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, rows) -> dict:
        return transform_keeping_slot(self.transform, self.store[rows])


def identity_collate(batch):
    """The batch is already built by the dataset (``batch_size=None``): pass it through."""
    return batch


def caption_loader(dataset: CaptionBatches, batch_images: int, *, shuffle: bool, seed: int = 0,
                   window_blocks: int = 4, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                   lanes: int | None = None, pin_memory: bool = False) -> tuple[DataLoader, BlockSampler]:
    """A DataLoader of transformed batches of ``batch_images`` images, and its (resumable) block sampler.

    ``lanes`` (default ``num_workers``) deals whole windows of blocks to workers so each block is decoded
    by one worker (see :class:`BlockSampler`); the order depends on it, so a resumed run must reuse it.

    The loader gets its own ``torch.Generator``: creating an iterator then draws no number from the global
    RNG, so a run resumed mid-epoch (global RNG restored from the checkpoint) continues exactly as an
    uninterrupted one.
    """
    if batch_images < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    lanes = max(1, num_workers if lanes is None else int(lanes))
    sampler = BlockSampler(dataset.rows, dataset.block_size, shuffle=shuffle, seed=seed,
                           window_blocks=window_blocks, rank=rank, world_size=world_size, lanes=lanes,
                           batch_size=batch_images)
    extra = {"prefetch_factor": 4, "persistent_workers": True} if num_workers > 0 else {}
    # workers read into shared-memory slots they reuse once this process lets go of a batch
    # (storage/shared_batches.py); the grid features pass through the transform into the batch unchanged
    loader = SlotReleasingLoader(dataset, batch_size=None, sampler=BatchSampler(sampler, batch_images, drop_last=False),
                                 num_workers=num_workers, collate_fn=identity_collate, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(seed), reader=dataset.store.reader, **extra)
    return loader, sampler
