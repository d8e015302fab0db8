"""Readers of published bottom-up feature files (the sources of ``vlcache store import``).

Supported source layouts (each as published):


* ``tsv`` -- peteanderson80/bottom-up-attention ``tools/generate_tsv.py``: tab-separated, no header,
  ``image_id, image_w, image_h, num_boxes, boxes, features`` with ``boxes``/``features`` base64 of
  float32 ``(num_boxes, 4)`` / ``(num_boxes, D)``. Also the 7-column variant with ``cls_prob``
  (float32 ``(num_boxes, 1 + classes)``; label = argmax over the non-background columns, score = that
  probability) and LXMERT's 10 columns ``img_id, img_h, img_w, objects_id (int64), objects_conf,
  attrs_id, attrs_conf, num_boxes, boxes, features`` (labels = objects_id, scores = objects_conf;
  attributes are not stored). Without those columns labels are -1 and scores 0. Several files (a
  directory, a glob, ``*.tsv`` and split ``*.tsv.0``/``*.tsv.1`` files) are one source. Fields are split
  on tabs (generate_tsv writes no quoted fields and base64 holds no tabs), so csv's field size limit,
  which the published readers must raise, does not apply.
* ``npz`` -- one ``<image>.npz`` per image with ``x`` (``num_bbox x D`` or ``D x num_bbox``; the
  orientation is told by ``num_bbox``), ``bbox``, ``num_bbox``, ``image_h``, ``image_w``, and MILVLG's
  ``info``: a pickled dict whose ``objects_id``/``objects_conf`` become the labels and scores. ``info`` is
  read by :func:`.npz_info.read_npz_info`, a restricted unpickler that builds nothing but plain containers,
  strings, numbers and numeric numpy arrays (any other global, e.g. ``os.system``, is refused before it
  is called); its other keys (``attrs_id``, ``attrs_conf``, ``obj_cls_prob``, ...) are not imported.
* ``scan`` -- SCAN's precomputed ``{split}_ims.npy`` ``(n, R, D)`` with ``{split}_ids.txt`` (one id per
  image, or the id repeated k times per image in consecutive lines). No boxes: boxes are stored as zeros
  and the store's config says ``boxes: unavailable (SCAN format)``.

Each source yields ``(source id, locator)`` pairs in pass one (``index``) and reads one image's boxes
and features by locator in pass two (``read``); :class:`IdResolver` maps source ids to dataset rows.
"""

from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ...pipeline.records import ImageRecord
from ...storage.provenance import sha256_file
from .npz_info import InfoError, read_npz_info

FORMATS = ("tsv", "npz", "scan")
_PATTERNS = {"tsv": re.compile(r"\.tsv(\.\d+)?$"), "npz": re.compile(r"\.npz$"), "scan": re.compile(r"_ims\.npy$")}
_TSV_COLUMNS = {
    6: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features"),
    7: ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"),
    10: ("image_id", "image_h", "image_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
         "num_boxes", "boxes", "features"),
}
_IMAGE_EXT = re.compile(r"(\.(jpe?g|png|bmp|gif|webp))+$", re.IGNORECASE)
HASH_LIMIT = 1 << 30  # source files up to 1 GiB get a sha256 in the store; larger ones size + mtime
LISTING_LIMIT = 64  # more source files than this are recorded as one listing digest


class FeatureImportError(ValueError):
    """A feature source is malformed; the message names the file, line/row and image id."""


# ------------------------------------------------------------------------------------ one image's data
@dataclass
class SourceFeatures:
    boxes: np.ndarray  # (n, 4) float32
    feats: np.ndarray  # (n, D) float32
    labels: np.ndarray | None = None
    scores: np.ndarray | None = None
    hw: tuple[int, int] | None = None


def _int(raw, name: str, where: str) -> int:
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise FeatureImportError(f"{where}: field '{name}' is not an integer: {str(raw)[:40]}") from None


def _b64(raw: bytes, name: str, where: str, n: int, dtype, width: int | None = None) -> np.ndarray:
    try:
        arr = np.frombuffer(base64.b64decode(raw, validate=True), dtype=dtype)
    except (binascii.Error, ValueError) as e:
        raise FeatureImportError(f"{where}: field '{name}' is not valid base64 {np.dtype(dtype)} data ({e})") from None
    if arr.size != (n * width if width else arr.size) or (n and arr.size % n) or (not n and arr.size):
        raise FeatureImportError(
            f"{where}: field '{name}' holds {arr.size} {np.dtype(dtype)} values, which is not "
            f"num_boxes={n} x {width or 'D'}"
        )
    return arr.reshape(n, -1) if n else arr.reshape(0, width or 0)


# ----------------------------------------------------------------------------------------- sources
class TsvSource:
    """generate_tsv.py files: pass one indexes ``id -> (file, offset, line)``, pass two seeks."""

    def __init__(self, files: list[Path]):
        self.files, self._handles, self.columns = files, {}, set()

    def index(self, progress: bool):
        bar = tqdm(total=sum(f.stat().st_size for f in self.files), unit="B", unit_scale=True,
                   desc="index tsv", disable=not progress, dynamic_ncols=True)
        with bar:
            for k, path in enumerate(self.files):
                offset = 0
                with open(path, "rb") as f:
                    for lineno, line in enumerate(f, 1):
                        start, offset = offset, offset + len(line)
                        bar.update(len(line))
                        if not line.strip():
                            continue
                        ncol = line.count(b"\t") + 1
                        if ncol not in _TSV_COLUMNS:
                            raise FeatureImportError(
                                f"{path}:{lineno}: {ncol} tab-separated fields; expected 6 (generate_tsv.py: "
                                "image_id, image_w, image_h, num_boxes, boxes, features), 7 (+ cls_prob) or "
                                "10 (LXMERT: img_id, img_h, img_w, objects_id, objects_conf, attrs_id, "
                                "attrs_conf, num_boxes, boxes, features)"
                            )
                        self.columns.add(ncol)
                        sid = line[: line.index(b"\t")].decode("utf-8", "replace").strip()
                        yield sid, (k, start, lineno)

    def read(self, loc) -> tuple[SourceFeatures, str]:
        k, offset, lineno = loc
        if k not in self._handles:
            self._handles[k] = open(self.files[k], "rb")
        f = self._handles[k]
        f.seek(offset)
        fields = f.readline().rstrip(b"\r\n").split(b"\t")
        if len(fields) not in _TSV_COLUMNS:
            raise FeatureImportError(f"{self.files[k]}:{lineno}: the file changed since it was indexed")
        row = dict(zip(_TSV_COLUMNS[len(fields)], fields))
        where = f"{self.files[k]}:{lineno} (image id {row['image_id'].decode('utf-8', 'replace')})"
        n = _int(row["num_boxes"], "num_boxes", where)
        out = SourceFeatures(
            boxes=_b64(row["boxes"], "boxes", where, n, np.float32, 4),
            feats=_b64(row["features"], "features", where, n, np.float32),
            hw=(_int(row["image_h"], "image_h", where), _int(row["image_w"], "image_w", where)),
        )
        if "objects_id" in row:
            out.labels = _b64(row["objects_id"], "objects_id", where, n, np.int64, 1)[:, 0]
            out.scores = _b64(row["objects_conf"], "objects_conf", where, n, np.float32, 1)[:, 0]
        elif "cls_prob" in row:
            prob = _b64(row["cls_prob"], "cls_prob", where, n, np.float32)
            if n and prob.shape[1] < 2:
                raise FeatureImportError(f"{where}: 'cls_prob' has {prob.shape[1]} column(s), not background + classes")
            out.labels = prob[:, 1:].argmax(1) if n else np.zeros(0, np.int64)  # column 0 is background
            out.scores = prob[np.arange(n), out.labels + 1] if n else np.zeros(0, np.float32)
        if out.labels is not None and out.labels.size and not (-1 <= out.labels.min() and out.labels.max() < 2**15):
            raise FeatureImportError(f"{where}: object labels outside the int16 range")
        return out, where

    def close(self):
        for f in self._handles.values():
            f.close()


class NpzSource:
    """A directory of per-image ``.npz`` files, named by image id."""

    IMPORTED_INFO = ("objects_id", "objects_conf")

    def __init__(self, files: list[Path]):
        self.files = files
        self.info_keys: set[str] = set()  # keys seen in the files' info dicts
        self.unlabelled = 0  # files read without info['objects_id']

    def index(self, progress: bool):
        for k, path in enumerate(self.files):
            yield path.name[: -len(".npz")], k

    def read(self, k) -> tuple[SourceFeatures, str]:
        path = self.files[k]
        where = str(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                absent = {"x", "bbox"} - set(z.files)
                if absent:
                    raise FeatureImportError(f"{where}: lacks field(s) {sorted(absent)}; it has {sorted(z.files)}")
                x, bbox = np.asarray(z["x"]), np.asarray(z["bbox"], dtype=np.float32)
                n = _int(z["num_bbox"], "num_bbox", where) if "num_bbox" in z.files else len(bbox)
                hw = None
                if "image_h" in z.files and "image_w" in z.files:
                    hw = (_int(z["image_h"], "image_h", where), _int(z["image_w"], "image_w", where))
                try:
                    info = read_npz_info(z) if "info" in z.files else {}
                except InfoError as e:
                    raise FeatureImportError(f"{where}: {e}") from None
        except (OSError, ValueError) as e:
            if isinstance(e, FeatureImportError):
                raise
            raise FeatureImportError(f"{where}: cannot be read as .npz ({e})") from None
        if bbox.shape != (n, 4):
            raise FeatureImportError(f"{where}: 'bbox' has shape {bbox.shape}, expected (num_bbox={n}, 4)")
        if x.ndim != 2 or n not in x.shape or (x.shape[0] == x.shape[1] and n):
            raise FeatureImportError(
                f"{where}: 'x' has shape {x.shape}; expected (num_bbox={n}, D) or (D, num_bbox={n})"
            )
        feats = x if x.shape[0] == n else x.T  # openvqa-style files store D x num_bbox
        out = SourceFeatures(boxes=bbox, feats=np.asarray(feats, dtype=np.float32), hw=hw)
        self.info_keys |= set(info)
        self.unlabelled += "objects_id" not in info
        if "objects_id" in info:
            out.labels = _info_array(info, "objects_id", n, where).astype(np.int64)
            out.scores = (_info_array(info, "objects_conf", n, where).astype(np.float32) if "objects_conf" in info
                          else np.zeros(n, np.float32))
        return out, where

    def close(self):
        pass


def _info_array(info: dict, key: str, n: int, where: str) -> np.ndarray:
    arr = np.asarray(info[key])
    if arr.dtype.kind not in "biuf" or arr.shape != (n,):
        raise FeatureImportError(f"{where}: info['{key}'] has shape {arr.shape} ({arr.dtype}); "
                                 f"expected (num_bbox={n},) numbers")
    return arr


class ScanSource:
    """SCAN's ``{split}_ims.npy`` + ``{split}_ids.txt`` pairs (memory-mapped)."""

    def __init__(self, files: list[Path], ids_file=None):
        if ids_file is not None and len(files) != 1:
            raise ValueError(f"ids_file applies to one _ims.npy file, got {len(files)}: {[str(f) for f in files]}")
        self.files, self.arrays, self.ids = files, [], []
        for path in files:
            ids_path = Path(ids_file) if ids_file else path.with_name(path.name[: -len("_ims.npy")] + "_ids.txt")
            if not ids_path.is_file():
                raise FeatureImportError(f"{path}: no ids file {ids_path}; without it rows cannot be matched to images")
            ims = np.load(path, mmap_mode="r", allow_pickle=False)
            if ims.ndim != 3:
                raise FeatureImportError(f"{path}: shape {ims.shape}; expected (images, regions, D)")
            ids = [s.strip() for s in ids_path.read_text().splitlines() if s.strip()]
            n = len(ims)
            if not n or len(ids) % n:
                raise FeatureImportError(f"{ids_path}: {len(ids)} ids for {n} images in {path}")
            k = len(ids) // n  # SCAN repeats an image's id once per caption (5x)
            for i in range(n):
                if len(set(ids[i * k : (i + 1) * k])) != 1:
                    raise FeatureImportError(
                        f"{ids_path}: lines {i * k + 1}-{(i + 1) * k} should repeat one image id "
                        f"({len(ids)} ids for {n} images), got {ids[i * k:(i + 1) * k]}"
                    )
            self.arrays.append(ims)
            self.ids.append(ids[::k])

    def index(self, progress: bool):
        for k, ids in enumerate(self.ids):
            for i, sid in enumerate(ids):
                yield sid, (k, i)

    def read(self, loc) -> tuple[SourceFeatures, str]:
        k, i = loc
        feats = np.asarray(self.arrays[k][i], dtype=np.float32)
        return SourceFeatures(boxes=np.zeros((len(feats), 4), np.float32), feats=feats), f"{self.files[k]} row {i}"

    def close(self):
        self.arrays = []


# ---------------------------------------------------------------------------------- finding sources
def find_source_files(source, fmt: str = "auto") -> tuple[str, list[Path]]:
    """(format, files) of a source: a file, a directory or a glob pattern."""
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown feature format {fmt!r}; expected auto, {', '.join(FORMATS)}")
    text = os.path.expanduser(os.fspath(source))
    if any(c in text for c in "*?["):
        paths = [Path(p) for p in glob.glob(text) if os.path.isfile(p)]
        given = "glob"
    elif os.path.isdir(text):
        paths, given = [p for p in Path(text).iterdir() if p.is_file()], "dir"
    elif os.path.isfile(text):
        paths, given = [Path(text)], "file"
    else:
        raise FileNotFoundError(f"feature source {text} does not exist")
    paths.sort(key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])  # x.tsv.2 < x.tsv.10
    kinds = {k: [p for p in paths if pat.search(p.name)] for k, pat in _PATTERNS.items()}
    if fmt == "auto":
        found = [k for k, v in kinds.items() if v]
        if len(found) != 1:
            what = "no feature files" if not found else f"files of several formats ({', '.join(found)})"
            raise FeatureImportError(
                f"{text}: {what}; looked for *.tsv / *.tsv.N (tsv), *.npz (npz), *_ims.npy (scan); pass fmt="
            )
        fmt = found[0]
    files = paths if given == "file" else kinds[fmt]  # a single file is taken as the named format
    if not files:
        raise FeatureImportError(f"{text}: no {fmt} files ({_PATTERNS[fmt].pattern})")
    return fmt, files


def describe_files(files: list[Path], hash_limit: int = HASH_LIMIT) -> list[dict]:
    """Provenance of source files: sha256 when small, else size and mtime; many files as one digest."""
    if len(files) > LISTING_LIMIT:
        h = hashlib.sha256()
        total = 0
        for p in files:
            size = p.stat().st_size
            total += size
            h.update(f"{p.name}\t{size}\n".encode())
        return [{"path": str(files[0].parent.resolve()), "files": len(files), "bytes": total,
                 "listing_sha256": h.hexdigest()}]
    out = []
    for p in files:
        st = p.stat()
        entry = {"path": str(p.resolve()), "bytes": st.st_size}
        if st.st_size <= hash_limit:
            entry["sha256"] = sha256_file(p)
        else:
            entry["mtime"] = int(st.st_mtime)
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------ id matching
def _strip_ext(sid: str) -> str:
    return _IMAGE_EXT.sub("", sid[:-4] if sid.lower().endswith(".npz") else sid)


class IdResolver:
    """Maps a source image id to a dataset row: record id, file stem, then trailing integer as COCO id."""

    def __init__(self, records: list[ImageRecord]):
        self.by_id = {r.id: i for i, r in enumerate(records)}
        self.by_coco = {r.coco_id: i for i, r in enumerate(records) if r.coco_id is not None}
        stems: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            stems.setdefault(_strip_ext(Path(r.path).name), []).append(i)
        self.by_stem = {s: rows[0] for s, rows in stems.items() if len(rows) == 1}  # ambiguous stems unused

    def row(self, sid: str) -> int | None:
        for key in (sid, _strip_ext(sid)):
            for table in (self.by_id, self.by_stem):
                if key in table:
                    return table[key]
        m = re.search(r"(\d+)$", _strip_ext(sid))
        if m is None:
            return None
        if int(m.group(1)) in self.by_coco:
            return self.by_coco[int(m.group(1))]
        return self.by_id.get(str(int(m.group(1)))) if m.group(1) == sid else None  # "000123" vs "123"
