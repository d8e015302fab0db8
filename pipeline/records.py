"""The one record type every dataset reader yields, and the dataset that holds them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

_PUNCT = re.compile(r"[^a-z0-9' ]+")


def karpathy_tokens(raw: str) -> tuple[str, ...]:
    """Tokenise a raw caption the way Karpathy's splits were made: lowercase, drop punctuation."""
    return tuple(t for t in _PUNCT.sub(" ", raw.lower().replace("'", " ")).split() if t)


@dataclass(frozen=True)
class ImageRecord:
    """One image with its captions.

    ``path`` is relative to the dataset's image root. ``annotations`` holds COCO-format instance
    annotations (``bbox`` xywh, ``category_id`` as an index into ``Dataset.classes``, ``segmentation``
    polygons or RLE) when the dataset has them, else ``None``.
    """

    id: str
    path: str
    split: str
    captions: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]
    height: int | None = None
    width: int | None = None
    coco_id: int | None = None
    annotations: tuple[dict, ...] | None = None


@dataclass
class Dataset:
    """A dataset: its records (in store row order), where its images live, and what it was read from."""

    name: str
    image_root: Path
    records: list[ImageRecord]
    sources: list[Path] = field(default_factory=list)
    classes: list[str] | None = None  # category names when instance annotations are present

    def __len__(self) -> int:
        return len(self.records)

    def split_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.split] = counts.get(r.split, 0) + 1
        return counts
