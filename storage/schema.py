"""Schema v2 of a vlcache store: the contract between extraction and training.

One store = one dataset x one extraction configuration. Every per-image array has the image index on
axis 0 and is chunked by ``block_size`` rows along it (other axes whole), so a *block* of rows is the
unit of writing, resuming, verifying and streaming. Variable-length data is padded to a fixed capacity
with a ``count`` array beside it. Nothing here knows about models.

Tree (``N`` images, capacities from :class:`Capacities`)::

    images/    id (N,) str, path (N,) str, hw (N,2) int32, split (N,) uint8, done (N,) uint8,
               error (N,) str                      -- error '' means the row is good
    captions/  count (N,) uint8, text (N,C) str, tokens (N,C) str (space-joined Karpathy tokens)
    instances/ count (N,) int16, labels (N,I) int16, scores (N,I) float32, boxes (N,I,4) float32,
               masks (N,I,M,M) uint8               -- box-relative mask probabilities x 255
    regions/   count (N,) int16, boxes (N,R,4) float32, labels (N,R) int16, scores (N,R) float32,
               feats (N,R,D_r) float16             -- bottom-up (BUTD-style) region features
    grid/      feats (N,G*G,D_g) float16           -- grid features (Show-Attend-Tell input)
    matches/   count (N,C) int16, span (N,C,K,4) int32, label (N,C,K) int16
               span = (token_start, token_end_exclusive, char_start, char_end_exclusive)
    text/      hidden (N,C,L,H) float16, mask (N,C,L) uint8, offsets (N,C,L,2) int32
                                                   -- a text cache: frozen BERT outputs per caption,
                                                      usually in its own store, row-aligned to the main one

Boxes are ``x1, y1, x2, y2`` in original image pixels. Padding: labels -1, everything else 0.
``images/done`` is written after every other array of its block; readers treat rows whose ``done`` is
0 as absent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT_NAME = "vlcache"
# v2 (this version): float16 feature arrays are stored uncompressed (crc32c-checked; v1: Blosc-LZ4 in
# Zarr, gzip in HDF5), so the streaming reader can map their chunks. The tree is the same, so v1 stores
# are read as they are; `vlcache store copy v1 v2` rewrites one as v2.
SCHEMA_VERSION = 2
SPLITS = ("train", "val", "test")
STR = "str"  # marker dtype for variable-length UTF-8 strings (zarr: vlen-utf8, HDF5: string_dtype)


@dataclass(frozen=True)
class Capacities:
    """Fixed per-image capacities; everything variable-length is padded to these."""

    captions: int = 5  # C: captions per image
    instances: int = 32  # I: instances per image
    mask_size: int = 28  # M: Mask R-CNN mask head resolution
    regions: int = 36  # R: bottom-up regions per image (max when adaptive)
    region_dim: int = 2048  # D_r
    grid_size: int = 14  # G: grid is G x G
    grid_dim: int = 2048  # D_g
    matches: int = 8  # K: matched word spans per caption
    text_len: int = 32  # L: subword tokens per caption in a text cache
    text_dim: int = 384  # H: frozen text-encoder width in a text cache


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: its path, per-row shape (after axis 0), dtype and fill value."""

    path: str
    row_shape: tuple[int, ...]
    dtype: str  # numpy dtype string, or STR
    fill: Any = 0

    @property
    def group(self) -> str:
        return self.path.split("/", 1)[0]

    def empty_rows(self, n: int) -> np.ndarray:
        """A block of ``n`` padded rows, what a writer starts from."""
        if self.dtype == STR:
            return np.full((n, *self.row_shape), "", dtype=object)
        return np.full((n, *self.row_shape), self.fill, dtype=self.dtype)


# Groups that every store has, and the optional feature groups extraction may add.
CORE_GROUPS = ("images", "captions")
OPTIONAL_GROUPS = ("instances", "regions", "grid", "matches")
TEXT_GROUP = "text"
DONE = "images/done"


def array_specs(cap: Capacities, groups: tuple[str, ...] = CORE_GROUPS + OPTIONAL_GROUPS) -> list[ArraySpec]:
    """All arrays of a store holding ``groups``, ``images/done`` last (it is written last)."""
    C, I, M, R, K = cap.captions, cap.instances, cap.mask_size, cap.regions, cap.matches
    L, H = cap.text_len, cap.text_dim
    table = {
        "images": [
            ArraySpec("images/id", (), STR),
            ArraySpec("images/path", (), STR),
            ArraySpec("images/hw", (2,), "int32"),
            ArraySpec("images/split", (), "uint8"),
            ArraySpec("images/error", (), STR),
        ],
        "captions": [
            ArraySpec("captions/count", (), "uint8"),
            ArraySpec("captions/text", (C,), STR),
            ArraySpec("captions/tokens", (C,), STR),
        ],
        "instances": [
            ArraySpec("instances/count", (), "int16"),
            ArraySpec("instances/labels", (I,), "int16", -1),
            ArraySpec("instances/scores", (I,), "float32"),
            ArraySpec("instances/boxes", (I, 4), "float32"),
            ArraySpec("instances/masks", (I, M, M), "uint8"),
        ],
        "regions": [
            ArraySpec("regions/count", (), "int16"),
            ArraySpec("regions/boxes", (R, 4), "float32"),
            ArraySpec("regions/labels", (R,), "int16", -1),
            ArraySpec("regions/scores", (R,), "float32"),
            ArraySpec("regions/feats", (R, cap.region_dim), "float16"),
        ],
        "grid": [
            ArraySpec("grid/feats", (cap.grid_size * cap.grid_size, cap.grid_dim), "float16"),
        ],
        "matches": [
            ArraySpec("matches/count", (C,), "int16"),
            ArraySpec("matches/span", (C, K, 4), "int32"),
            ArraySpec("matches/label", (C, K), "int16", -1),
        ],
        "text": [
            ArraySpec("text/hidden", (C, L, H), "float16"),
            ArraySpec("text/mask", (C, L), "uint8"),
            ArraySpec("text/offsets", (C, L, 2), "int32"),
        ],
    }
    unknown = set(groups) - set(table)
    if unknown:
        raise ValueError(f"unknown store groups {sorted(unknown)}; known: {sorted(table)}")
    specs = [s for g in table if g in groups for s in table[g]]
    return specs + [ArraySpec(DONE, (), "uint8")]


@dataclass
class Layout:
    """Everything needed to create an empty store: row count, block size, capacities, groups."""

    num_rows: int
    block_size: int = 64
    capacities: Capacities = field(default_factory=Capacities)
    groups: tuple[str, ...] = CORE_GROUPS + OPTIONAL_GROUPS

    def __post_init__(self):
        if self.num_rows < 1:
            raise ValueError("a store needs at least one row")
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.groups = tuple(self.groups)
        for g in CORE_GROUPS:
            if g not in self.groups:
                raise ValueError(f"group {g!r} is required in every store")

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.block_size)

    def block_rows(self, block: int) -> range:
        """Row indices of ``block`` (the last block may be short)."""
        if not 0 <= block < self.num_blocks:
            raise IndexError(f"block {block} out of range [0, {self.num_blocks})")
        start = block * self.block_size
        return range(start, min(start + self.block_size, self.num_rows))

    def blocks_of_rank(self, rank: int, world_size: int) -> list[int]:
        """Disjoint block ownership: rank r of W owns blocks r, r+W, r+2W, ..."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        return list(range(rank, self.num_blocks, world_size))

    def specs(self) -> list[ArraySpec]:
        return array_specs(self.capacities, self.groups)

    def to_attrs(self) -> dict:
        return {
            "num_rows": self.num_rows,
            "block_size": self.block_size,
            "capacities": dataclasses.asdict(self.capacities),
            "groups": list(self.groups),
        }

    @classmethod
    def from_attrs(cls, attrs: dict) -> "Layout":
        return cls(
            num_rows=int(attrs["num_rows"]),
            block_size=int(attrs["block_size"]),
            capacities=Capacities(**attrs["capacities"]),
            groups=tuple(attrs["groups"]),
        )


def split_code(split: str) -> int:
    try:
        return SPLITS.index(split)
    except ValueError:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}") from None
