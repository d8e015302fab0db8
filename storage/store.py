"""A read-only store for notebooks: ``vlcache.open(url)`` -> :class:`Store`.

Everything is read per row on demand (one ``Backend.read`` per array asked for); nothing but the small
per-image index arrays (done flags, ids, splits) is ever loaded whole. Rows whose ``images/done`` flag
is 0 are absent: asking for one raises :class:`RowNotDoneError` naming the row and image id.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .backends import Backend, open_backend
from .errors import StoreError
from .schema import SPLITS, split_code


def _masks():
    """storage.masks, imported on first use: it needs torch (seconds to import), which opening a store
    and reading captions should not pay."""
    from . import masks

    return masks

__all__ = ["Store", "open_store", "RowNotDoneError"]


class RowNotDoneError(StoreError, LookupError):
    """A row that extraction has not finished (``images/done`` is 0) or that failed (``images/error``)."""


def open_store(url, image_root=None, storage_options: dict | None = None) -> "Store":
    """Open the store at ``url`` (a path, a Zarr URL or an ``.h5`` file) read-only.

    ``image_root`` overrides the dataset's image folder recorded in the store (for images that moved).
    """
    return Store(open_backend(os.fspath(url), "r", storage_options=storage_options), image_root=image_root)


class Store:
    """Read-only, row-by-row view of one store. ``i`` is always a store row index (see :meth:`index_of`)."""

    def __init__(self, backend: Backend, image_root=None):
        self.backend = backend
        self.url = backend.url
        self._attrs = backend.attrs()
        self.layout = backend.layout
        self._image_root = image_root
        self._done = np.asarray(backend.read("images/done", slice(None))).astype(bool)
        self._errors: np.ndarray | None = None
        self._ids: np.ndarray | None = None
        self._id_index: dict[str, int] | None = None

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------- metadata
    def __len__(self) -> int:
        return self.layout.num_rows

    def __repr__(self) -> str:
        name = self._attrs.get("dataset") or "?"
        return (f"Store({self.url!r}, dataset={name!r}, rows={len(self)}, done={int(self._done.sum())}, "
                f"groups={list(self.layout.groups)})")

    @property
    def attrs(self) -> dict:
        return self._attrs

    @property
    def mask_paste(self) -> str:
        """How the stored masks are pasted to pixels: "torchvision" or "detectron2", the convention of the
        detector that produced them (METHODS.md section 12); unrecorded in older stores: "torchvision"."""
        return _masks().paste_convention(self._attrs)

    @property
    def classes(self) -> list[str]:
        return list(self._attrs.get("classes") or [])

    @property
    def ids(self) -> np.ndarray:
        """Image ids of all rows (strings; '' for rows never written)."""
        if self._ids is None:
            self._ids = np.asarray(self.backend.read("images/id", slice(None)), dtype=object)
        return self._ids

    def index_of(self, image_id) -> int:
        """Row index of ``image_id``; KeyError naming the id when the store does not hold it."""
        if self._id_index is None:
            self._id_index = {str(v): k for k, v in enumerate(self.ids) if v != ""}
        try:
            return self._id_index[str(image_id)]
        except KeyError:
            raise KeyError(f"store {self.url} has no image with id {image_id!r}") from None

    @property
    def done(self) -> np.ndarray:
        """(N,) bool done flags, as read when the store was opened (see :meth:`refresh`)."""
        return self._done

    def refresh(self) -> None:
        """Re-read the done flags (for a store still being extracted)."""
        self._done = np.asarray(self.backend.read("images/done", slice(None))).astype(bool)
        self._errors = None

    @property
    def errors(self) -> np.ndarray:
        """(N,) extraction error per row ('' = good)."""
        if self._errors is None:
            self._errors = np.asarray(self.backend.read("images/error", slice(None)), dtype=object)
        return self._errors

    def rows(self, split: str | None = None, done_only: bool = True) -> np.ndarray:
        """Row indices, optionally of one split (``train``/``val``/``test``); by default only good rows
        (done and without an extraction error)."""
        keep = np.ones(len(self), bool)
        if split is not None:
            keep &= np.asarray(self.backend.read("images/split", slice(None))) == split_code(split)
        if done_only:
            keep &= self._done & (self.errors == "")
        return np.flatnonzero(keep)

    def _row(self, i) -> int:
        n = len(self)
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"row index must be an int, got {type(i).__name__} (use index_of(image_id))")
        k = int(i) + (n if i < 0 else 0)
        if not 0 <= k < n:
            raise IndexError(f"row {int(i)} out of range for store {self.url} with {n} rows")
        if not self._done[k]:
            raise RowNotDoneError(f"row {k} (image id {self._id(k)!r}) is not extracted yet in store {self.url}")
        err = self.errors[k]
        if err:
            raise RowNotDoneError(f"row {k} (image id {self._id(k)!r}) failed extraction: {err}")
        return k

    def _id(self, k: int) -> str:
        return str(self.ids[k]) if self._ids is not None else str(self.backend.read("images/id", k))

    def _need(self, group: str) -> None:
        if group not in self.layout.groups:
            raise StoreError(f"store {self.url} has no {group!r} group (it has {list(self.layout.groups)})")

    def _read(self, path: str, k: int) -> np.ndarray:
        return np.asarray(self.backend.read(path, k))

    def hw(self, i) -> tuple[int, int]:
        k = self._row(i)
        h, w = (int(v) for v in self._read("images/hw", k))
        return h, w

    def split(self, i) -> str:
        return SPLITS[int(self._read("images/split", self._row(i)))]

    # ---------------------------------------------------------------------------------------- images
    def image_path(self, i) -> str:
        """Where the image of row ``i`` is: image root (override or the store's) joined with its path."""
        k = self._row(i)
        rel = str(self.backend.read("images/path", k))
        root = self._image_root
        if root is None:
            root = self._attrs.get("image_root")
        if root in (None, ""):
            raise StoreError(f"store {self.url} records no image_root; pass image_root=... to vlcache.open()")
        root = os.fspath(root)
        return f"{root.rstrip('/')}/{rel}" if "://" in root else str(Path(root) / rel)

    def image(self, i):
        """The image of row ``i`` as extraction saw it, a PIL RGB image: decoded from the dataset's file by
        the extraction's own decoder (EXIF orientation applied, transparency on white, 16-bit scaled,
        CMYK/palette converted; ``storage/images.py``), so its size is ``images/hw``."""
        from PIL import Image

        from .images import BadImageError, load_image

        path = self.image_path(i)
        k = self._row(i)
        try:
            return Image.fromarray(load_image(path))
        except BadImageError as e:
            if e.reason == "file not found":
                raise FileNotFoundError(
                    f"row {k} (image id {self._id(k)!r}): image file {path} not found; "
                    f"pass image_root=... to vlcache.open() if the images moved"
                ) from None
            raise

    # ---------------------------------------------------------------------------------------- captions
    def captions(self, i) -> list[str]:
        k = self._row(i)
        n = int(self._read("captions/count", k))
        return [str(t) for t in self._read("captions/text", k)[:n]]

    def tokens(self, i) -> list[list[str]]:
        k = self._row(i)
        n = int(self._read("captions/count", k))
        return [str(t).split() for t in self._read("captions/tokens", k)[:n]]

    # --------------------------------------------------------------------------------------- instances
    def _class_name(self, label: int, names: list[str]) -> str:
        return names[label] if 0 <= label < len(names) else f"class {label}"

    def instances(self, i) -> dict:
        """The valid instances of row ``i``: boxes (n,4), labels (n,), scores (n,), masks (n,M,M) uint8
        (box-relative probabilities x 255), class_names (n)."""
        self._need("instances")
        k = self._row(i)
        n = int(self._read("instances/count", k))
        out = {name: self._read(f"instances/{name}", k)[:n] for name in ("boxes", "labels", "scores", "masks")}
        out["class_names"] = [self._class_name(int(c), self.classes) for c in out["labels"]]
        return out

    def masks(self, i, size="image") -> np.ndarray:
        """Instance mask probabilities of row ``i``: ``"image"`` (n,H,W), ``(h, w)`` (n,h,w) or ``"grid"``
        (n,G,G) covered fractions of the G x G feature grid."""
        inst = self.instances(i)
        hw = self.hw(i)
        if isinstance(size, str) and size == "image":
            return _masks().paste_masks(inst["boxes"], inst["masks"], hw, convention=self.mask_paste)
        if isinstance(size, str) and size == "grid":
            return _masks().grid_coverage(inst["boxes"], inst["masks"], hw, self.layout.capacities.grid_size,
                                          convention=self.mask_paste)
        if isinstance(size, str) or len(size) != 2:
            raise ValueError(f"size must be 'image', 'grid' or (h, w), got {size!r}")
        return _masks().resize_masks(inst["boxes"], inst["masks"], hw, size, convention=self.mask_paste)

    # ----------------------------------------------------------------------------------------- matches
    def matches(self, i, c: int) -> list[dict]:
        """Word spans of caption ``c`` of row ``i`` that name a detected class."""
        self._need("matches")
        k = self._row(i)
        n_caps = int(self._read("captions/count", k))
        if not 0 <= c < n_caps:
            raise IndexError(f"row {k} (image id {self._id(k)!r}) has {n_caps} captions; no caption {c}")
        n = int(self._read("matches/count", k)[c])
        spans = self._read("matches/span", k)[c, :n]
        labels = self._read("matches/label", k)[c, :n]
        toks = str(self._read("captions/tokens", k)[c]).split()
        out = []
        for (ts, te, cs, ce), lab in zip(spans.tolist(), labels.tolist()):
            out.append({"token_start": ts, "token_end": te, "char_start": cs, "char_end": ce, "label": lab,
                        "class_name": self._class_name(lab, self.classes), "words": " ".join(toks[ts:te])})
        return out

    def _match_of(self, k: int, c: int, word) -> dict:
        found = self.matches(k, c)
        if isinstance(word, (int, np.integer)):
            hit = [m for m in found if m["token_start"] <= int(word) < m["token_end"]]
        else:
            w = str(word).lower().strip()
            hit = [m for m in found if m["words"] == w] or [m for m in found if w in m["words"].split()]
        if not hit:
            words = [m["words"] for m in found]
            raise KeyError(f"row {k} (image id {self._id(k)!r}) caption {c}: word {word!r} is not matched to a "
                           f"detected class (matched words: {words})")
        return hit[0]

    def merged_mask(self, i, c: int, word, score_threshold: float = 0.5, size="image") -> np.ndarray:
        """Union of the instances of the class that ``word`` (a token string or token index) of caption
        ``c`` names, keeping instances with score >= ``score_threshold`` (METHODS.md section 2).

        ``size="image"`` or ``(h, w)``: bool mask (pixel in any instance's mask with probability >= 0.5);
        ``"grid"``: (G, G) float32 fraction of each grid cell the merged mask covers.
        """
        k = self._row(i)
        match = self._match_of(k, c, word)
        inst = self.instances(k)
        keep = (inst["labels"] == match["label"]) & (inst["scores"] >= score_threshold)
        boxes, masks, hw = inst["boxes"][keep], inst["masks"][keep], self.hw(k)
        if isinstance(size, str) and size == "grid":
            return _masks().merged_grid_coverage(boxes, masks, hw, self.layout.capacities.grid_size,
                                                 convention=self.mask_paste)
        if isinstance(size, str) and size == "image":
            out_hw = hw
        elif not isinstance(size, str) and len(size) == 2:
            out_hw = tuple(int(s) for s in size)
        else:
            raise ValueError(f"size must be 'image', 'grid' or (h, w), got {size!r}")
        if not len(boxes):
            return np.zeros(out_hw, bool)
        return (_masks().resize_masks(boxes, masks, hw, out_hw, convention=self.mask_paste) >= 0.5).any(axis=0)

    # ---------------------------------------------------------------------------------------- features
    def regions(self, i) -> dict:
        """Bottom-up regions of row ``i``: boxes (r,4), labels (r,), scores (r,), feats (r,D) float16,
        class_names (r) (from the ``region_classes`` attribute when present, else ``classes``)."""
        self._need("regions")
        k = self._row(i)
        n = int(self._read("regions/count", k))
        out = {name: self._read(f"regions/{name}", k)[:n] for name in ("boxes", "labels", "scores", "feats")}
        names = self._attrs.get("region_classes") or self.classes
        out["class_names"] = [self._class_name(int(c), names) for c in out["labels"]]
        return out

    def grid(self, i) -> np.ndarray:
        """Grid features (G*G, D) float16 of row ``i``, row-major over the G x G cells."""
        self._need("grid")
        return self._read("grid/feats", self._row(i))

    # -------------------------------------------------------------------------------------------- show
    def show(self, i, caption: int = 0, word=None, ax=None, score_threshold: float = 0.5):
        """A matplotlib Figure: the image with instance masks, boxes and class names + scores, caption
        ``caption`` below with matched words highlighted in their class colours. With ``word`` only the
        merged mask of that word is drawn. Uses the object API (no pyplot), so it works headless."""
        from .figures import draw_row  # matplotlib, imported on first use

        return draw_row(self, self._row(i), caption, word, ax, score_threshold)
