"""Shared fixtures: a complete tiny store (every group, deterministic random content) on both backends.

``tiny_store`` is a real store written through :class:`StoreWriter` (Zarr directory or HDF5 file), with
small PNG images on disk for ``Store.image``; its ``truth`` dict holds every array as written, so
tests compare reads against it. ``make_tiny_store`` is the factory behind it (other sizes, partial
stores).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlcache.storage.schema import Capacities, Layout, SPLITS
from vlcache.storage.writer import StoreWriter

CLASSES = ["person", "dog", "teddy bear", "car", "cat"]
TINY_CAPS = Capacities(captions=3, instances=4, mask_size=28, regions=5, region_dim=16, grid_size=4,
                       grid_dim=8, matches=3)
_FILLERS = ["a", "on", "the", "grass", "near", "with", "big", "red", "and", "street"]


@dataclass
class TinyStore:
    url: str
    image_root: Path
    layout: Layout
    truth: dict  # array path -> (N, ...) numpy array, as written
    error_rows: list[int]


def _blob_masks(rng, n: int, m: int) -> np.ndarray:
    yy, xx = np.mgrid[0:m, 0:m]
    cy, cx = rng.uniform(m * 0.3, m * 0.7, (2, n))
    blob = np.exp(-((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2) / (m * 2.5))
    return (blob * 255).round().astype(np.uint8)


def _row_content(rng, cap: Capacities, row: int):
    """One image's arrays: instances of 1..I classes, captions naming some of them, their matches."""
    C, I, M, R, K = cap.captions, cap.instances, cap.mask_size, cap.regions, cap.matches
    h, w = int(rng.integers(40, 61)), int(rng.integers(50, 71))
    n_inst = int(rng.integers(1, I + 1))
    labels = rng.integers(0, len(CLASSES), n_inst)
    x1, y1 = rng.uniform(0, w * 0.5, n_inst), rng.uniform(0, h * 0.5, n_inst)
    boxes = np.stack([x1, y1, x1 + rng.uniform(8, w * 0.5, n_inst), y1 + rng.uniform(8, h * 0.5, n_inst)], 1)
    inst = {
        "count": n_inst, "labels": labels, "scores": rng.uniform(0.3, 1.0, n_inst),
        "boxes": np.minimum(boxes, [w, h, w, h]), "masks": _blob_masks(rng, n_inst, M),
    }
    n_caps = int(rng.integers(1, C + 1))
    texts, token_lines, spans, span_labels = [], [], [], []
    for _ in range(n_caps):
        toks, sp, sl = [], [], []
        for k in range(K):
            toks += list(rng.choice(_FILLERS, int(rng.integers(1, 3))))
            if rng.random() < 0.8:  # name one of the detected classes
                lab = int(labels[rng.integers(n_inst)])
                words = CLASSES[lab].split()
                sp.append((len(toks), len(toks) + len(words)))
                sl.append(lab)
                toks += words
        toks.append(str(rng.choice(_FILLERS)))
        line = " ".join(toks)
        starts = np.cumsum([0] + [len(t) + 1 for t in toks])
        spans.append([(ts, te, int(starts[ts]), int(starts[te] - 1)) for ts, te in sp])
        span_labels.append(sl)
        texts.append(line.capitalize() + ".")
        token_lines.append(line)
    return (h, w), inst, texts, token_lines, spans, span_labels


def make_tiny_store(url, image_root: Path, n: int = 20, block_size: int = 8, *, seed: int = 0,
                    blocks=None, finalize: bool = True, caps: Capacities = TINY_CAPS,
                    extra_attrs: dict | None = None) -> TinyStore:
    """Write a store of ``n`` rows (all blocks, or only ``blocks``) plus its images under ``image_root``;
    ``extra_attrs`` are added to its root attributes."""
    rng = np.random.default_rng(seed)
    layout = Layout(num_rows=n, block_size=block_size, capacities=caps)
    specs = {s.path: s for s in layout.specs()}
    truth = {p: s.empty_rows(n) for p, s in specs.items()}
    image_root = Path(image_root)
    image_root.mkdir(parents=True, exist_ok=True)
    error_rows = [n // 2 + 1]
    for r in range(n):
        (h, w), inst, texts, tlines, spans, slabels = _row_content(rng, caps, r)
        path = f"imgs/{r:03d}.png"
        (image_root / "imgs").mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_root / path)
        truth["images/id"][r], truth["images/path"][r] = f"img{r:03d}", path
        truth["images/hw"][r], truth["images/split"][r] = (h, w), r % len(SPLITS)
        truth["images/error"][r] = "decoder failed: truncated file" if r in error_rows else ""
        truth["captions/count"][r] = len(texts)
        truth["captions/text"][r, :len(texts)] = texts
        truth["captions/tokens"][r, :len(texts)] = tlines
        k = inst["count"]
        truth["instances/count"][r] = k
        for name in ("labels", "scores", "boxes", "masks"):
            truth[f"instances/{name}"][r, :k] = inst[name]
        nr = int(rng.integers(1, caps.regions + 1))
        truth["regions/count"][r] = nr
        truth["regions/boxes"][r, :nr] = np.sort(rng.uniform(0, min(h, w), (nr, 4)), axis=1)[:, [0, 1, 2, 3]]
        truth["regions/labels"][r, :nr] = rng.integers(0, len(CLASSES), nr)
        truth["regions/scores"][r, :nr] = rng.uniform(0, 1, nr)
        truth["regions/feats"][r, :nr] = rng.normal(0, 1, (nr, caps.region_dim))
        truth["grid/feats"][r] = rng.normal(0, 1, truth["grid/feats"].shape[1:])
        for c, (sp, sl) in enumerate(zip(spans, slabels)):
            truth["matches/count"][r, c] = len(sp)
            truth["matches/span"][r, c, :len(sp)] = np.asarray(sp, dtype=np.int32).reshape(-1, 4)
            truth["matches/label"][r, c, :len(sl)] = sl
    attrs = {"dataset": "tiny", "image_root": str(image_root), "splits": {s: 0 for s in SPLITS}, "sources": [],
             "config": {"detector": "synthetic"}, "classes": CLASSES, **(extra_attrs or {})}
    writer = StoreWriter(url, layout, attrs, overwrite=True)
    todo = range(layout.num_blocks) if blocks is None else blocks
    for b in todo:
        rows = layout.block_rows(b)
        writer.write_block(b, {p: truth[p][rows.start:rows.stop] for p in specs if p != "images/done"})
        truth["images/done"][rows.start:rows.stop] = 1
    if finalize:
        assert writer.finalize(), "tiny store did not finalize"
    writer.close()
    return TinyStore(str(url), image_root, layout, truth, error_rows)


@pytest.fixture(params=["zarr", "hdf5"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def tiny_store(tmp_path, backend) -> TinyStore:
    """A complete 20-row store (block size 8, so the last block is short) on the ``backend`` param."""
    name = "tiny.zarr" if backend == "zarr" else "tiny.h5"
    return make_tiny_store(str(tmp_path / name), tmp_path / "images")


@pytest.fixture
def tiny_store_factory(tmp_path):
    """``factory(name, **kw) -> TinyStore`` for other sizes / partial stores, under ``tmp_path``."""

    def factory(name: str, **kw) -> TinyStore:
        return make_tiny_store(str(tmp_path / name), tmp_path / f"images-{name}", **kw)

    return factory
