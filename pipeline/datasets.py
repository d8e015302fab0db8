"""Dataset readers: Karpathy split JSON, COCO captions (+ instances) JSON and generic JSONL.

Every reader returns a :class:`~vlcache.pipeline.records.Dataset` of
:class:`~vlcache.pipeline.records.ImageRecord` in file order (that order becomes the store's row order).
Bad input raises :class:`DatasetError` naming the file and the offending line, field, id or path.
Image paths are kept relative to ``image_root`` and must stay inside it: a dataset file cannot make
us read ``../../etc/passwd`` or an absolute path elsewhere.

(Just over 400 lines: three readers sharing the validation helpers below, each a few lines.)
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from ..storage.schema import SPLITS
from .records import Dataset, ImageRecord, karpathy_tokens

_FIRST = 10  # how many offending items an error message lists
# Longest caption (characters, and characters of its tokens) accepted. Real captions are < 1,000; a
# longer one would cost ~150 bytes/char in class-word matching and O(n^2) time to align its tokens.
MAX_CAPTION_CHARS = 4096


class DatasetError(ValueError):
    """A dataset file is malformed or inconsistent; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------------
# entry points


def load_dataset(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    fmt: str = "auto",
    instances: str | Path | Iterable[str | Path] | None = None,
    restval_to_train: bool = True,
    check_images: bool = True,
    splits: Iterable[str] | None = None,
    split: str | None = None,
) -> Dataset:
    """Read any supported dataset file.

    ``fmt``: ``"karpathy"``, ``"coco"`` (captions JSON), ``"jsonl"`` or ``"auto"`` (``.jsonl`` files
    are JSONL; JSON files are told apart by their content). ``image_root`` defaults to the dataset
    file's folder. ``instances``: COCO instances JSON file(s) whose annotations are attached to the
    records (by COCO image id, else by file name). ``splits`` keeps only those splits. ``split`` is
    the split of a COCO captions file (inferred from names like ``captions_val2014.json`` if omitted).
    """
    path = Path(path)
    if fmt not in ("auto", "karpathy", "coco", "jsonl"):
        raise ValueError(f"unknown dataset format {fmt!r}; expected auto, karpathy, coco or jsonl")
    if fmt == "jsonl" or (fmt == "auto" and path.suffix.lower() == ".jsonl"):
        ds = load_jsonl(path, image_root, check_images=check_images, instances=instances)
        return _keep_splits(ds, splits)
    data = _read_json(path)
    if fmt == "auto":
        fmt = _detect(path, data)
    if fmt == "karpathy":
        ds = _karpathy(path, data, image_root, instances, restval_to_train, check_images)
    else:
        ds = _coco(path, data, image_root, instances, split, check_images)
    return _keep_splits(ds, splits)


def load_karpathy(
    json_path: str | Path,
    image_root: str | Path | None = None,
    *,
    instances: str | Path | Iterable[str | Path] | None = None,
    restval_to_train: bool = True,
    check_images: bool = True,
) -> Dataset:
    """Read a Karpathy split file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...).

    Record id: ``str(cocoid)`` when the file has COCO ids, else the file name; path:
    ``filepath/filename`` (COCO) or ``filename``. The file's ``tokens`` are used; captions without
    them are tokenised with :func:`~vlcache.pipeline.records.karpathy_tokens`. The store knows only
    train/val/test: ``restval`` rows become ``train`` (COCO's usual "train + restval") when
    ``restval_to_train`` is true and are **dropped** otherwise.
    """
    json_path = Path(json_path)
    return _karpathy(json_path, _read_json(json_path), image_root, instances, restval_to_train, check_images)


def load_coco_captions(
    captions_json: str | Path,
    image_root: str | Path | None = None,
    instances_json: str | Path | Iterable[str | Path] | None = None,
    split: str | None = None,
    *,
    check_images: bool = True,
) -> Dataset:
    """Read a COCO captions file (``captions_train2014.json`` style) as one split.

    ``split`` defaults to the one named in the file name (train/val/test); ``image_root`` is the
    folder holding the images' ``file_name`` (e.g. ``coco/train2014``). With ``instances_json`` the
    instance annotations are attached, ``category_id`` remapped to an index into ``Dataset.classes``
    (category names ordered by category id).
    """
    captions_json = Path(captions_json)
    data = _read_json(captions_json)
    return _coco(captions_json, data, image_root, instances_json, split, check_images)


def load_jsonl(
    path: str | Path,
    image_root: str | Path | None = None,
    *,
    check_images: bool = True,
    instances: str | Path | Iterable[str | Path] | None = None,
) -> Dataset:
    """Read generic JSONL: one ``{"id", "image", "split", "captions": [...], "tokens"?: [[...]]}``
    object per line (blank lines are skipped). ``image`` is relative to ``image_root``; optional
    ``height``/``width`` are kept.
    """
    path = Path(path)
    root = _root(path, image_root)
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read dataset file: {e}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: line {lineno}: malformed JSON at column {e.colno}: {e.msg}") from None
        except RecursionError:
            raise DatasetError(f"{path}: line {lineno}: JSON nested too deeply") from None
        where = f"{path}: line {lineno}"
        if not isinstance(obj, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for key in ("id", "image", "split", "captions"):
            if key not in obj:
                raise DatasetError(f"{where}: missing required field {key!r}")
        rid = str(obj["id"])
        captions = _captions(obj["captions"], f"{where} (id {rid!r}): field 'captions'")
        tokens = obj.get("tokens")
        if tokens is None:
            toks = tuple(karpathy_tokens(c) for c in captions)
        else:
            toks = _tokens(tokens, len(captions), f"{where} (id {rid!r}): field 'tokens'")
        split = obj["split"]
        if split not in SPLITS:
            raise DatasetError(f"{where}: image {rid!r} has unknown split {split!r}; expected one of {SPLITS}")
        rel = _inside(root, obj["image"], path, f"line {lineno} (id {rid!r})")
        records.append(
            ImageRecord(rid, rel, split, captions, toks, _opt_int(obj, "height", where), _opt_int(obj, "width", where))
        )
    return _finish(path, path.stem, root, records, [path], instances, check_images)


# ---------------------------------------------------------------------------------------------------
# format readers


def _objects(items: list, path, name: str):
    """``(i, "name[i]", item)`` for each item of a JSON list that must hold objects (dicts)."""
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise DatasetError(f"{path}: {where}: expected an object, got {type(item).__name__}")
        yield i, where, item


def _karpathy(path, data, image_root, instances, restval_to_train, check_images) -> Dataset:
    images = _field(data, "images", path, "top level", list)
    root = _root(path, image_root)
    records = []
    for i, where, img in _objects(images, path, "images"):
        filename = _field(img, "filename", path, where, str)
        where = f"images[{i}] ({filename!r})"
        split = _field(img, "split", path, where, str)
        sentences = _field(img, "sentences", path, where, list)
        if split == "restval":
            if not restval_to_train:
                continue
            split = "train"
        elif split not in SPLITS:
            raise DatasetError(
                f"{path}: {where}: unknown split {split!r}; expected train, val, test or restval"
            )
        captions, toks = [], []
        for _, swhere, s in _objects(sentences, path, f"{where}.sentences"):
            raw = _field(s, "raw", path, swhere, str).strip()
            captions.append(raw)
            t = s.get("tokens")
            toks.append(karpathy_tokens(raw) if t is None else _token_list(t, f"{path}: {swhere}.tokens"))
        cocoid = img.get("cocoid")
        if cocoid is not None and not isinstance(cocoid, int):
            raise DatasetError(f"{path}: {where}: field 'cocoid' must be an integer, got {cocoid!r}")
        filepath = img.get("filepath")
        rel = f"{filepath}/{filename}" if filepath else filename
        rel = _inside(root, rel, path, where)
        rid = str(cocoid) if cocoid is not None else filename
        records.append(ImageRecord(rid, rel, split, tuple(captions), tuple(toks), coco_id=cocoid))
    name = path.stem[len("dataset_") :] if path.stem.startswith("dataset_") else path.stem
    return _finish(path, name, root, records, [path], instances, check_images)


def _coco(path, data, image_root, instances, split, check_images) -> Dataset:
    if split is None:
        m = re.search(r"(train|val|test)", path.name)
        if not m:
            raise DatasetError(
                f"{path}: cannot tell the split of a COCO captions file from its name; pass split="
            )
        split = m.group(1)
    if split not in SPLITS:
        raise DatasetError(f"{path}: unknown split {split!r}; expected one of {SPLITS}")
    images = _field(data, "images", path, "top level", list)
    anns = _field(data, "annotations", path, "top level", list)
    caps: dict[int, list[str]] = {}
    for _, where, a in _objects(anns, path, "annotations"):
        caps.setdefault(_field(a, "image_id", path, where, int), []).append(
            _field(a, "caption", path, where, str).strip()
        )
    root = _root(path, image_root)
    records = []
    for _, where, img in _objects(images, path, "images"):
        iid = _field(img, "id", path, where, int)
        fname = _field(img, "file_name", path, where, str)
        rel = _inside(root, fname, path, f"{where} (id {iid})")
        c = tuple(caps.get(iid, ()))
        records.append(
            ImageRecord(
                str(iid), rel, split, c, tuple(karpathy_tokens(x) for x in c),
                _opt_int(img, "height", f"{path}: {where}"), _opt_int(img, "width", f"{path}: {where}"), iid,
            )
        )  # fmt: skip
    known = {r.coco_id for r in records}
    orphans = sorted(set(caps) - known)
    if orphans:
        raise DatasetError(
            f"{path}: {len(orphans)} caption annotation image_id(s) have no entry in images[], "
            f"e.g. {orphans[:_FIRST]}"
        )
    return _finish(path, path.stem, root, records, [path], instances, check_images)


# ---------------------------------------------------------------------------------------------------
# instances


def _attach_instances(records: list[ImageRecord], files, sources: list[Path]):
    """Attach COCO instance annotations to ``records``; return (records, class names)."""
    files = [Path(files)] if isinstance(files, (str, Path)) else [Path(f) for f in files]
    classes: list[str] | None = None
    by_id: dict[int, list[dict]] = {}
    by_name: dict[str, list[dict]] = {}
    for f in files:
        data = _read_json(f)
        cats = _field(data, "categories", f, "top level", list)
        for i, c in enumerate(cats):
            if not isinstance(c, dict):
                raise DatasetError(f"{f}: categories[{i}]: expected an object")
            _field(c, "id", f, f"categories[{i}]", int)
            _field(c, "name", f, f"categories[{i}]", str)
        cats = sorted(cats, key=lambda c: c["id"])
        names = [c["name"] for c in cats]
        if classes is None:
            classes = names
        elif names != classes:
            raise DatasetError(f"{f}: categories differ from those of {files[0]}")
        remap = {c["id"]: k for k, c in enumerate(cats)}
        file_of = {}
        for i, img in enumerate(_field(data, "images", f, "top level", list)):
            file_of[_field(img, "id", f, f"images[{i}]", int)] = _field(img, "file_name", f, f"images[{i}]", str)
        for i, a in enumerate(_field(data, "annotations", f, "top level", list)):
            where = f"annotations[{i}]"
            iid = _field(a, "image_id", f, where, int)
            cid = _field(a, "category_id", f, where, int)
            _field(a, "bbox", f, where, list)
            if cid not in remap:
                raise DatasetError(f"{f}: {where}: unknown category_id {cid}")
            if iid not in file_of:
                raise DatasetError(f"{f}: {where}: image_id {iid} has no entry in images[]")
            ann = dict(a, category_id=remap[cid])
            by_id.setdefault(iid, []).append(ann)
            by_name.setdefault(Path(file_of[iid]).name, []).append(ann)
        sources.append(f)
    out, hits = [], 0
    for r in records:
        anns = by_id.get(r.coco_id) if r.coco_id is not None else by_name.get(Path(r.path).name)
        hits += anns is not None
        out.append(replace(r, annotations=tuple(anns or ())))
    if records and (by_id or by_name) and hits == 0:
        raise DatasetError(
            f"{', '.join(map(str, files))}: no annotated image matches any dataset image "
            f"(compared {'COCO ids' if records[0].coco_id is not None else 'file names'}); wrong file?"
        )
    return out, classes


# ---------------------------------------------------------------------------------------------------
# checks and helpers


def _finish(path, name, root, records, sources, instances, check_images) -> Dataset:
    _check_unique(path, records)
    _check_captions(path, records)
    if check_images:
        _check_images(path, root, records)
    classes = None
    if instances is not None:
        records, classes = _attach_instances(records, instances, sources)
    return Dataset(name=name, image_root=root, records=records, sources=list(sources), classes=classes)


def _check_unique(path: Path, records: list[ImageRecord]) -> None:
    dup = [k for k, n in Counter(r.id for r in records).items() if n > 1]
    if dup:
        raise DatasetError(f"{path}: {len(dup)} duplicate image id(s): {dup[:_FIRST]}")


def _check_captions(path: Path, records: list[ImageRecord]) -> None:
    empty = [r.id for r in records if not r.captions]
    if empty:
        raise DatasetError(f"{path}: {len(empty)} image(s) without captions, e.g. ids {empty[:_FIRST]}")
    blank = [r.id for r in records if any(not c for c in r.captions)]
    if blank:
        raise DatasetError(f"{path}: {len(blank)} image(s) with an empty caption, e.g. ids {blank[:_FIRST]}")
    longest = {r.id: max(max(map(len, r.captions)), max(sum(map(len, t)) for t in r.tokens) if r.tokens else 0)
               for r in records}
    long = [(k, n) for k, n in longest.items() if n > MAX_CAPTION_CHARS]
    if long:
        raise DatasetError(f"{path}: {len(long)} image(s) with a caption (or its tokens) longer than "
                           f"{MAX_CAPTION_CHARS} characters, e.g. id {long[0][0]!r} ({long[0][1]} characters)")


def _check_images(path: Path, root: Path, records: list[ImageRecord]) -> None:
    missing = [r.path for r in records if not os.path.isfile(os.path.join(root, r.path))]
    if missing:
        raise DatasetError(
            f"{path}: {len(missing)} of {len(records)} image file(s) missing under {root}, "
            f"first: {missing[:_FIRST]}"
        )


def _root(path: Path, image_root) -> Path:
    root = Path(image_root) if image_root is not None else path.parent
    return Path(os.path.normpath(root.absolute()))


def _inside(root: Path, rel: Any, path: Path, where: str) -> str:
    """``rel`` as a normalised POSIX path relative to ``root``; reject anything that leaves it."""
    if not isinstance(rel, str) or not rel.strip():
        raise DatasetError(f"{path}: {where}: image path must be a non-empty string, got {rel!r}")
    full = os.path.normpath(os.path.join(root, rel))  # lexical: symlinked image folders stay usable
    if os.path.commonpath([full, root]) != str(root):
        raise DatasetError(f"{path}: {where}: image path {rel!r} escapes the image root {root}")
    return Path(os.path.relpath(full, root)).as_posix()


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except RecursionError:  # json's decoder recurses per nesting level
        raise DatasetError(f"{path}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read dataset file: {e}") from None


def _detect(path: Path, data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = data["images"][0] if data["images"] else {}
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy"
        if "annotations" in data:
            return "coco"
    raise DatasetError(
        f"{path}: not a Karpathy split file (images[].sentences) nor a COCO captions file "
        f"(images[] + annotations[]); pass fmt= explicitly"
    )


def _field(obj: Any, key: str, path: Path, where: str, typ: type) -> Any:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DatasetError(f"{path}: {where}: missing required field {key!r}")
    v = obj[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise DatasetError(f"{path}: {where}: field {key!r} must be {typ.__name__}, got {type(v).__name__}")
    return v


def _opt_int(obj: dict, key: str, where: str) -> int | None:
    v = obj.get(key)
    if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
        raise DatasetError(f"{where}: field {key!r} must be an integer, got {v!r}")
    return v


def _captions(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise DatasetError(f"{where} must be a list of strings")
    return tuple(c.strip() for c in value)


def _token_list(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise DatasetError(f"{where} must be a list of strings")
    return tuple(value)


def _tokens(value: Any, n: int, where: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(value, list) or len(value) != n:
        raise DatasetError(f"{where} must be a list with one token list per caption ({n})")
    return tuple(_token_list(t, f"{where}[{k}]") for k, t in enumerate(value))


def _keep_splits(ds: Dataset, splits: Iterable[str] | None) -> Dataset:
    if splits is None:
        return ds
    keep = set([splits] if isinstance(splits, str) else splits)
    bad = keep - set(SPLITS)
    if bad:
        raise ValueError(f"unknown split(s) {sorted(bad)}; expected some of {SPLITS}")
    ds.records = [r for r in ds.records if r.split in keep]
    return ds
