"""Image-text matching batches streamed from a store (and, for MMCA/SLAN, its text cache).

A batch is a dict of tensors built in the DataLoader worker from one :class:`StoreBatchDataset` read:

- images ``B``: ``rows``, ``regions (B, R, D)`` float16 (SLAN instead: ``grid (B, G*G, D_g)`` float16,
  its regions being pooled from the grid), ``region_mask (B, R)``, ``region_boxes (B, R, 4)``, ``hw (B, 2)``;
- texts ``P``: ``txt_img (P,)`` (which image of the batch), ``caption (P,)`` (caption index in its row),
  ``texts`` (raw captions), ``token_texts`` (their space-joined Karpathy tokens); SCAN: ``tokens (P, T)``,
  ``lengths (P,)`` (vocabulary ids, ``<start>`` .. ``<end>``, so Karpathy token k sits at position k + 1);
  MMCA and SLAN: ``words (P, L, H)`` cached BERT outputs,
  ``word_mask``, ``offsets`` (absent when no cache is given: the training loop then runs BERT online
  and calls :func:`resolve_positions` itself);
- matched words ``n`` (class-word matches of those captions): ``match_txt``, ``match_class``,
  ``match_char``/``match_tok`` spans, ``match_pos (n, L)`` pooling weights over the word's text
  positions (its Karpathy tokens for SCAN; its BERT word pieces via character offsets for MMCA/SLAN; rows
  sum to 1), region labels ``match_labels (n, R)`` with ``match_has_ref (n,)``, and the attention
  metrics' reference ``match_reference (n, R)`` bool (the labels' rule without their fallback).

Captions per step (``captions``): ``"each"`` (default; SCAN/VSE++) makes an epoch every caption of the
split once, shuffled at caption level within windows of blocks (``caption_sampler``): a batch is B
(caption, image) pairs, and two captions of one image may share a batch. ``"one"`` pairs each image with
one of its captions, drawn by a hash of (seed, epoch, row), so an epoch is one caption per image and a
batch holds B distinct images; ``"all"`` pairs each image with all its captions (P = sum of counts).

Region labels (METHODS §8 pseudo reference, §2 non-empty rule): the word's merged mask is the union of
the instances of its class with score >= ``score_threshold`` (pasted at image resolution); a region is
a reference when >= ``inside_threshold`` of its box lies inside that mask; when none does, the region(s)
with the largest inside fraction are (``ica.region_labels``). A word whose class has no instance above
the threshold, or whose mask touches no region, has ``match_has_ref`` False.

The Flickr30k Entities reference (phrase boxes) is read by ``entities``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from ...storage.backends import open_backend
from ...storage.errors import StoreError
from ...storage.masks import paste_convention, paste_masks, region_inside_fraction
from ...storage.streaming import BlockSampler, StoreBatchDataset
from ..common.attention_metrics import reference_sets
from ..common.ica import region_labels
from ..common.text_encoders import char_span_to_token_mask
from .caption_sampler import CaptionBatchSampler

IMAGE_FIELDS = ["images/id", "images/hw", "regions/count", "regions/feats", "regions/boxes",
                "captions/count", "captions/text", "captions/tokens"]
MATCH_FIELDS = ["matches/count", "matches/span", "matches/label"]
INSTANCE_FIELDS = ["instances/count", "instances/labels", "instances/scores", "instances/boxes", "instances/masks"]
CACHE_FIELDS = ["text/hidden", "text/mask", "text/offsets"]
TEXTS = ("tokens", "bert")  # a model reads vocabulary token ids (SCAN) | frozen BERT outputs (MMCA, SLAN)
VISUALS = ("regions", "grid")  # a model reads region features (SCAN, MMCA) | the grid feature map (SLAN)
CAPTION_MODES = ("each", "one", "all")  # captions per epoch/step (module doc)
TEXT_KEYS = ("tokens", "lengths", "words", "word_mask", "offsets")  # per-caption text tensors of a batch
IMAGE_KEYS = ("rows", "regions", "grid", "region_mask", "region_boxes", "hw")  # per-image tensors of a batch


def caption_choice(rows: np.ndarray, counts: np.ndarray, epoch: int, seed: int) -> np.ndarray:
    """One caption index per row in ``[0, count)``, a splitmix64 hash of (seed, epoch, row): the same
    for any batch composition, worker count or resume point."""
    x = (np.asarray(rows, np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + np.uint64((int(epoch) * 0xBF58476D1CE4E5B9 + int(seed) * 0x94D049BB133111EB) % 2 ** 64))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x % np.asarray(counts, np.uint64)).astype(np.int64)


def image_masks(inst: dict, i: int, score_threshold: float,
                convention: str = "torchvision") -> tuple[np.ndarray, np.ndarray]:
    """Binary full-resolution masks (k, H, W) and class ids (k,) of batch image ``i``'s instances with
    score >= ``score_threshold`` (pixels with mask probability >= 0.5), pasted once per image in the
    store's ``convention`` (METHODS §12)."""
    n = int(inst["instances/count"][i])
    keep = inst["instances/scores"][i, :n] >= score_threshold
    hw = (int(inst["images/hw"][i][0]), int(inst["images/hw"][i][1]))
    probs = paste_masks(inst["instances/boxes"][i, :n][keep], inst["instances/masks"][i, :n][keep], hw, convention)
    return probs >= 0.5, inst["instances/labels"][i, :n][keep]


def merged_region_labels(masks: np.ndarray, classes: np.ndarray, cls: int, boxes: np.ndarray, count: int,
                         inside_threshold: float) -> tuple[torch.Tensor, bool, torch.Tensor]:
    """Region labels (R,) float for class ``cls`` (union of its ``masks``), whether they are non-empty,
    and the attention metrics' reference (R,) bool: the same rule without the fallback (METHODS §8)."""
    R = boxes.shape[0]
    sel = classes == cls
    if not sel.any() or count == 0:
        return torch.zeros(R), False, torch.zeros(R, dtype=torch.bool)
    frac = np.zeros(R, np.float32)
    frac[:count] = region_inside_fraction(boxes[:count], masks[sel].any(axis=0))
    frac_t, valid = torch.from_numpy(frac)[None], torch.arange(R) < count
    labels, ok = region_labels(frac_t, inside_threshold, valid)
    return labels[0], bool(ok[0]), reference_sets(frac_t, inside_threshold, valid)[0]


def resolve_positions(batch: dict, text: str) -> dict:
    """Fill ``match_pos`` (n, L) from the text representation and drop matched words that have no text
    position (truncated away). ``text="tokens"`` (SCAN): Karpathy tokens [start, end) at positions +1
    (``<start>`` first), inside the encoded length. ``"bert"`` (MMCA/SLAN): BERT word pieces overlapping
    the word's character span."""
    n = batch["match_txt"].shape[0]
    if text == "tokens":
        T = batch["tokens"].shape[1]
        pos = torch.arange(T)[None]
        tok, last = batch["match_tok"], batch["lengths"][batch["match_txt"]] - 1  # <end> is at length - 1
        hit = (pos >= tok[:, :1] + 1) & (pos < tok[:, 1:] + 1) & (pos < last[:, None])
    elif text == "bert":
        offs = batch["offsets"]
        hit = torch.zeros(n, offs.shape[1], dtype=torch.bool)
        for j in range(n):
            cs, ce = (int(v) for v in batch["match_char"][j])
            if ce > cs >= 0:
                hit[j] = char_span_to_token_mask(offs[batch["match_txt"][j]], cs, ce)
    else:
        raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
    keep = hit.any(1)
    for key in [k for k in batch if k.startswith("match_") and k != "match_pos"]:
        batch[key] = batch[key][keep]
    hit = hit[keep].float()
    batch["match_pos"] = hit / hit.sum(1, keepdim=True).clamp_min(1.0)
    batch["dropped_words"] = int(batch.get("dropped_words", 0)) + int((~keep).sum())
    return batch


def build_batch(b: dict, cache: dict | None, *, text: str, visual: str, epoch: int = 0, seed: int = 0, captions: str = "one",
                vocab=None, score_threshold: float = 0.5, inside_threshold: float = 0.5,
                url: str = "?", mask_paste: str = "torchvision", pairs: np.ndarray | None = None) -> dict:
    """Turn one store read ``b`` (and the row-aligned cache read) into a matching batch (module doc).
    ``pairs (P, 2)``: explicit (store row, caption) pairs (``captions="each"``) instead of ``captions``."""
    feats = b[f"{visual}/feats"]  # kept as is: a worker's shared-memory tensor is sent without a copy
    b = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in b.items()}
    if cache is not None:
        cache = {k: (v.numpy() if torch.is_tensor(v) else v) for k, v in cache.items()}
    rows = np.asarray(b["row"])
    ids = b["images/id"]
    nreg = np.asarray(b["regions/count"]).astype(int)
    ncap = np.asarray(b["captions/count"]).astype(int)
    for what, cnt in (("regions", nreg), ("captions", ncap)):
        if (cnt == 0).any():
            i = int(np.flatnonzero(cnt == 0)[0])
            raise StoreError(f"store {url}: row {int(rows[i])} (image id {ids[i]!r}) has no {what}")
    B, R = b["regions/boxes"].shape[:2]
    if pairs is not None:
        by_row = np.argsort(rows)  # the read orders rows by block: find each pair's image in it
        txt_img = by_row[np.searchsorted(rows, pairs[:, 0], sorter=by_row)]
        cap = np.asarray(pairs[:, 1], np.int64)
        if (cap >= ncap[txt_img]).any():
            j = int(np.flatnonzero(cap >= ncap[txt_img])[0])
            raise StoreError(f"store {url}: row {int(pairs[j, 0])} has {int(ncap[txt_img[j]])} captions, "
                             f"caption {int(cap[j])} asked for")
    elif captions == "one":
        txt_img = np.arange(B)
        cap = caption_choice(rows, ncap, epoch, seed)
    elif captions in ("all", "each"):  # "each" without explicit pairs: every caption of these rows
        txt_img = np.repeat(np.arange(B), ncap)
        cap = np.concatenate([np.arange(c) for c in ncap])
    else:
        raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
    out = {
        "rows": torch.from_numpy(rows.astype(np.int64)),
        visual:
            feats if torch.is_tensor(feats) else torch.from_numpy(np.ascontiguousarray(feats)),
        "region_mask": torch.arange(R)[None] < torch.from_numpy(nreg)[:, None],
        "region_boxes": torch.from_numpy(np.ascontiguousarray(b["regions/boxes"], np.float32)),
        "hw": torch.from_numpy(np.asarray(b["images/hw"], np.int64)),
        "txt_img": torch.from_numpy(txt_img.astype(np.int64)),
        "caption": torch.from_numpy(cap.astype(np.int64)),
        "texts": [str(t) for t in b["captions/text"][txt_img, cap]],
        "token_texts": [str(t) for t in b["captions/tokens"][txt_img, cap]],
    }
    if text == "tokens":
        if vocab is None:
            raise ValueError("SCAN batches need a vocabulary (vocab=...)")
        out["tokens"], out["lengths"] = vocab.encode_batch([str(t) for t in b["captions/tokens"][txt_img, cap]])
    elif text == "bert":
        if cache is not None:
            if not np.array_equal(np.asarray(cache["row"]), rows):
                raise StoreError(f"text cache rows {cache['row'][:5]} do not line up with store rows {rows[:5]}")
            mask = torch.from_numpy(cache["text/mask"][txt_img, cap].astype(bool))
            if not mask.any(1).all():
                p = int((~mask.any(1)).nonzero()[0])
                raise StoreError(f"text cache: row {int(rows[txt_img[p]])} caption {int(cap[p])} has no tokens "
                                 "(cache built before the caption existed? rebuild it)")
            L = int(mask.any(0).nonzero()[-1]) + 1  # trim padding columns shared by the whole batch
            out["word_mask"] = mask[:, :L]
            out["words"] = torch.from_numpy(np.ascontiguousarray(cache["text/hidden"][txt_img, cap][:, :L]))
            out["offsets"] = torch.from_numpy(cache["text/offsets"][txt_img, cap][:, :L].astype(np.int64))
    else:
        raise ValueError(f"text must be one of {TEXTS}, got {text!r}")
    out.update(_matches(b, txt_img, cap, R, score_threshold, inside_threshold, mask_paste))
    if text == "tokens" or "offsets" in out:
        resolve_positions(out, text)
    return out


def _matches(b: dict, txt_img, cap, R: int, score_threshold: float, inside_threshold: float,
             mask_paste: str) -> dict:
    P = len(txt_img)
    if "matches/count" not in b:
        empty = torch.zeros(0, dtype=torch.long)
        return {"match_txt": empty, "match_class": empty, "match_char": torch.zeros(0, 2, dtype=torch.long),
                "match_tok": torch.zeros(0, 2, dtype=torch.long), "match_labels": torch.zeros(0, R),
                "match_has_ref": torch.zeros(0, dtype=torch.bool), "match_reference": torch.zeros(0, R, dtype=torch.bool)}
    cnt = np.asarray(b["matches/count"])[txt_img, cap].astype(int)
    spans = np.asarray(b["matches/span"])[txt_img, cap]
    labs = np.asarray(b["matches/label"])[txt_img, cap]
    p_idx = np.repeat(np.arange(P), cnt)
    k_idx = np.concatenate([np.arange(c) for c in cnt]) if P else np.zeros(0, int)
    sp, cls = spans[p_idx, k_idx].astype(np.int64).reshape(-1, 4), labs[p_idx, k_idx].astype(np.int64)
    labels, has_ref = torch.zeros(len(p_idx), R), torch.zeros(len(p_idx), dtype=torch.bool)
    reference = torch.zeros(len(p_idx), R, dtype=torch.bool)
    if "instances/count" in b:
        pasted: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        memo: dict[tuple[int, int], tuple[torch.Tensor, bool]] = {}
        for j, (p, c) in enumerate(zip(p_idx.tolist(), cls.tolist())):
            i = int(txt_img[p])
            if (i, c) not in memo:  # several captions of one image often name the same class
                if i not in pasted:
                    pasted[i] = image_masks(b, i, score_threshold, mask_paste)
                memo[i, c] = merged_region_labels(*pasted[i], c, np.asarray(b["regions/boxes"][i]),
                                                  int(b["regions/count"][i]), inside_threshold)
            labels[j], has_ref[j], reference[j] = memo[i, c]
    return {"match_txt": torch.from_numpy(p_idx.astype(np.int64)), "match_class": torch.from_numpy(cls),
            "match_char": torch.from_numpy(sp[:, 2:4].copy()), "match_tok": torch.from_numpy(sp[:, 0:2].copy()),
            "match_labels": labels, "match_has_ref": has_ref, "match_reference": reference}


class MatchDataset(Dataset):
    """``ds[(epoch, rows)]`` (or ``ds[rows]``) -> a matching batch of those store rows (module doc).

    Reads the main store and, for MMCA/SLAN, the row-aligned text cache (same block size: checked); both open
    lazily per worker. ``labels=False`` skips instances and region labels (faster when neither the ICA
    loss nor an attention metric needs them; matched words are still read when the store has matches).
    """

    def __init__(self, store, *, text: str, visual: str, text_cache=None, vocab=None, split: str | None = None, rows=None,
                 captions: str = "one", seed: int = 0, labels: bool = True, score_threshold: float = 0.5,
                 inside_threshold: float = 0.5, cache_blocks: int = 4, storage_options: dict | None = None):
        for name, value, allowed in (("text", text, TEXTS), ("visual", visual, VISUALS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {captions!r}")
        with open_backend(str(store), "r", storage_options=storage_options) as be:
            groups = be.layout.groups
            self.mask_paste = paste_convention(be.attrs())
        fields = list(IMAGE_FIELDS)
        if visual == "grid":  # regions pooled from the grid map (SLAN): no region features needed
            if "grid" not in groups:
                raise StoreError(f"store {store} has no 'grid' group: the model reads the grid feature map")
            fields[fields.index("regions/feats")] = "grid/feats"
        if "matches" in groups:
            fields += MATCH_FIELDS
        if labels and "instances" in groups:
            fields += INSTANCE_FIELDS
        self.main = StoreBatchDataset(store, fields, rows=rows, split=split, cache_blocks=cache_blocks,
                                      storage_options=storage_options)
        self.cache = None
        if text_cache is not None and text == "bert":
            self.cache = StoreBatchDataset(text_cache, ["images/id"] + CACHE_FIELDS, rows=self.main.rows,
                                           cache_blocks=cache_blocks, storage_options=storage_options)
            if self.cache.block_size != self.main.block_size:
                raise StoreError(f"text cache {text_cache} has block size {self.cache.block_size}, store {store} "
                                 f"{self.main.block_size}: rebuild the cache from this store")
        self.url, self.text, self.visual = str(store), text, visual
        self.vocab, self.captions, self.seed = vocab, captions, int(seed)
        self.score_threshold, self.inside_threshold = score_threshold, inside_threshold

    @property
    def rows(self) -> np.ndarray:
        return self.main.rows

    @property
    def block_size(self) -> int:
        return self.main.block_size

    def __len__(self) -> int:
        return len(self.main)

    def caption_counts(self) -> np.ndarray:
        """``captions/count`` of every row of the dataset (one int each: what caption-level epochs expand)."""
        with open_backend(self.url, "r") as be:
            return np.asarray(be.read("captions/count", self.rows)).astype(np.int64)

    def __getitem__(self, key) -> dict:
        """``ds[rows]``, ``ds[(epoch, rows)]`` or ``ds[(epoch, pairs (n, 2))]`` (row, caption) pairs."""
        epoch, rows = key if isinstance(key, tuple) else (0, key)
        pairs = None
        if np.ndim(rows) == 2:
            pairs = np.asarray(rows, np.int64)
            rows = np.unique(pairs[:, 0])
        b = self.main[rows]
        c = None
        if self.cache is not None:
            c = self.cache[rows]
            if not np.array_equal(np.asarray(c["images/id"]), np.asarray(b["images/id"])):
                raise StoreError(f"text cache and store {self.url} disagree on image ids of rows {list(rows)[:5]}")
        return build_batch(b, c, text=self.text, visual=self.visual, epoch=epoch, seed=self.seed, captions=self.captions,
                           vocab=self.vocab, score_threshold=self.score_threshold,
                           inside_threshold=self.inside_threshold, url=self.url, mask_paste=self.mask_paste,
                           pairs=pairs)


class EpochBatchSampler:
    """Batches of a :class:`BlockSampler` tagged with its epoch: yields ``(epoch, rows)``, so workers
    draw the epoch's captions without shared state."""

    def __init__(self, sampler: BlockSampler, batch_size: int, drop_last: bool = False):
        self.sampler, self.batches = sampler, BatchSampler(sampler, batch_size, drop_last)

    def __iter__(self):
        for rows in self.batches:
            yield self.sampler.epoch, rows

    def __len__(self) -> int:
        return len(self.batches)


def _identity(x):
    return x


def match_loader(ds: MatchDataset, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 window_blocks: int = 4, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                 num_workers: int = 0) -> tuple[DataLoader, BlockSampler | CaptionBatchSampler]:
    """DataLoader of matching batches and its sampler (``set_epoch``, ``state_dict`` for mid-epoch resume
    as in :func:`~vlcache.storage.streaming.stream_loader`): a :class:`CaptionBatchSampler` when
    ``ds.captions == "each"`` (positions count captions), else the :class:`BlockSampler` (rows)."""
    lanes = max(1, num_workers)  # each worker reads its own windows' blocks (BlockSampler lanes)
    sampler = ds.main.sampler(shuffle=shuffle, seed=seed, window_blocks=window_blocks, rank=rank,
                              world_size=world_size, drop_last=drop_last, lanes=lanes,
                              batch_size=batch_size if lanes > 1 else None)
    # It starts the page-cache reads of the next windows' chunks, as stream_loader's does.
    sampler.readahead, sampler.readahead_rows = ds.main.reader.readahead, 2 * window_blocks * ds.main.block_size * lanes
    # Its own generator: creating an iterator must not draw from the global RNG (resume determinism).
    batches = EpochBatchSampler(sampler, batch_size, drop_last)
    if ds.captions == "each":
        sampler = batches = CaptionBatchSampler(sampler, ds.caption_counts(), batch_size, drop_last)
    loader = DataLoader(ds, batch_size=None, sampler=batches,
                        num_workers=num_workers, collate_fn=_identity, persistent_workers=num_workers > 0,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def concat_batches(batches: list[dict]) -> dict:
    """One batch from several (for evaluation over a whole split): images and texts stacked, text
    tensors padded to the widest, indices shifted."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    out: dict = {}
    n_img = np.cumsum([0] + [b["rows"].shape[0] for b in batches])
    n_txt = np.cumsum([0] + [b["txt_img"].shape[0] for b in batches])
    for key in batches[0]:
        vals = [b[key] for b in batches]
        if isinstance(vals[0], list):
            out[key] = [t for v in vals for t in v]
        elif key == "dropped_words":
            out[key] = sum(vals)
        elif key in ("txt_img", "match_txt"):
            shift = n_img if key == "txt_img" else n_txt
            out[key] = torch.cat([v + int(s) for v, s in zip(vals, shift[:-1])])
        elif vals[0].dim() >= 2 and key in ("tokens", "words", "word_mask", "offsets", "match_pos"):
            width = max(v.shape[1] for v in vals)
            out[key] = torch.cat([torch.nn.functional.pad(v, [0, 0] * (v.dim() - 2) + [0, width - v.shape[1]])
                                  for v in vals])
        else:
            out[key] = torch.cat(vals)
    return out


def pair_batch(data: dict, txt: torch.Tensor, device=None) -> tuple[dict, torch.Tensor]:
    """The captions ``txt (n,)`` of a split batch, deduplicated, each with its own image: a batch of u
    (caption, image) pairs (``txt_img = arange(u)``, text padding shared by all trimmed) on ``device``,
    and ``inv (n,)`` mapping each entry of ``txt`` to its pair."""
    uniq, inv = torch.unique(txt, return_inverse=True)
    img = data["txt_img"][uniq]
    sub = {k: data[k][uniq] for k in TEXT_KEYS if k in data}
    sub.update({k: data[k][img] for k in IMAGE_KEYS if k in data})
    sub["txt_img"] = torch.arange(len(uniq))
    if "word_mask" in sub:
        width = int(sub["word_mask"].any(0).nonzero()[-1]) + 1
        sub.update({k: sub[k][:, :width] for k in ("words", "word_mask", "offsets") if k in sub})
    return {k: v.to(device) if device is not None else v for k, v in sub.items()}, inv


def load_split(ds: MatchDataset, batch_size: int = 256) -> dict:
    """Every row of ``ds`` with all its captions, as one batch (``ds.captions`` must be ``"all"``)."""
    if ds.captions != "all":
        raise ValueError("load_split needs a dataset built with captions='all'")
    sampler = ds.main.sampler(shuffle=False)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    if order.size == 0:
        raise StoreError(f"store {ds.url}: no rows to evaluate")
    return concat_batches([ds[order[s:s + batch_size]] for s in range(0, order.size, batch_size)])
