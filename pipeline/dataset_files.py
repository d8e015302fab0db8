"""What an extraction reads, checked before anything is built: several COCO captions files (or their
folder) as one dataset, the records selected by split and limit, and a fail-fast check of the image root.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from ..storage.schema import SPLITS
from .datasets import DatasetError, _coco, _detect, _finish, _read_json, _root, load_dataset
from .records import Dataset, ImageRecord


def load_datasets(
    paths: str | Path | Iterable[str | Path],
    image_root: str | Path | None = None,
    *,
    instances: str | Path | Iterable[str | Path] | None = None,
    check_images: bool = True,
) -> Dataset:
    """One dataset from one file, several COCO captions files, or a folder of them (``captions_*.json``).

    COCO captions come one file per split (``captions_train2014.json``, ``captions_val2014.json``): their
    records are concatenated in the order given (folder: sorted by name), each file's split read from its
    name. Each file's images are looked up in ``image_root/<name after "captions_">/`` (``coco/train2014/``)
    when that folder exists, else in ``image_root`` itself. ``instances`` are attached to all of them.
    """
    files = _expand(paths)
    if len(files) == 1:
        return load_dataset(files[0], image_root, instances=instances, check_images=check_images)
    root = _root(files[0], image_root)
    records: list[ImageRecord] = []
    for f in files:
        data = _read_json(f) if f.suffix.lower() != ".jsonl" else None
        if data is None or _detect(f, data) != "coco":
            raise DatasetError(f"{f}: several dataset files must all be COCO captions files (one per split); a "
                               "Karpathy or JSONL file already holds every split: pass it alone")
        sub = f.stem[len("captions_"):] if f.stem.startswith("captions_") else ""
        if not (sub and (root / sub).is_dir()):
            sub = ""
        part = _coco(f, data, root / sub if sub else root, None, None, False)
        records += [replace(r, path=f"{sub}/{r.path}") if sub else r for r in part.records]
    names = [f.stem for f in files]
    name = "coco" if all(n.startswith("captions_") for n in names) else "+".join(names)
    return _finish(files[0], name, root, records, files, instances, check_images)


def _expand(paths) -> list[Path]:
    """Dataset files from paths that may be files or folders (a folder gives its ``captions_*.json``)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise DatasetError("no dataset file given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("captions_*.json"))
            if not found:
                raise DatasetError(f"{p}: a dataset folder must hold COCO captions files (captions_*.json); none found")
            files += found
        else:
            files.append(p)
    return files


def select_records(dataset: Dataset, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """The records of ``split`` (all when None), the first ``limit`` of them; an error when none are left."""
    records = dataset.records
    if split is not None:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; expected one of {SPLITS}")
        records = [r for r in records if r.split == split]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise DatasetError(f"no images selected from {dataset.name} (split={split}, limit={limit})")
    return records


def check_image_root(root: str | Path, first: list[ImageRecord]) -> None:
    """Fail fast on a wrong image root, before any model is built or anything written: the root must be a
    folder, and ``first`` (the first block to process) may not be missing entirely."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image root {root} is not a folder; pass --image-root DIR, the folder the dataset's "
                           "image paths are relative to")
    missing = [r.path for r in first if not os.path.isfile(os.path.join(root, r.path))]
    if first and len(missing) == len(first):
        raise DatasetError(f"none of the first {len(first)} images exist under the image root {root} (e.g. "
                           f"{root / missing[0]}); wrong --image-root?")
