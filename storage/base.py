"""What both store backends share: URL handling, root-attribute checks and the :class:`Backend` base class.

URLs are local paths, ``file://`` URLs or any fsspec URL (``s3://``, ``gs://``, ``https://`` read-only,
``memory://``). Credentials come from fsspec's usual configuration (environment, ``~/.aws``, gcloud) or
from ``storage_options``; they are only ever handed to fsspec — never written into a store's attributes,
never shown in a message (URLs are redacted with :func:`redact_url` before they are).
"""

from __future__ import annotations

import abc
import contextlib
import copy
import functools
import json
import os
import re
from typing import Any

import fsspec
import numpy as np

from .errors import (
    CorruptChunkError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreBeingCreatedError,
    StoreError,
)
from .schema import FORMAT_NAME, SCHEMA_VERSION, STR, ArraySpec, Layout

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
CREATING = "vlcache_creating"  # root attribute present only while a store is being created
MODES = ("r", "r+")
READ_ONLY_PROTOCOLS = ("http", "https")


class StoreAccessError(StoreError):
    """Missing credentials or access denied on a remote store (the message says how to configure them)."""


# ----------------------------------------------------------------------------------------------- urls
def backend_kind(url) -> str:
    """``"hdf5"`` for ``.h5``/``.hdf5``/``.hdf`` paths, else ``"zarr"``."""
    return "hdf5" if str(url).rstrip("/").lower().endswith(HDF5_SUFFIXES) else "zarr"


def is_local(url) -> bool:
    url = str(url)
    return "://" not in url or url.startswith("file://")


def local_path(url) -> str:
    url = str(url)
    return os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url)


def protocol(url) -> str:
    """``"file"`` for local paths, else the URL scheme (``s3``, ``gs``, ``https``, ``memory``...)."""
    return "file" if is_local(url) else str(url).split("://", 1)[0].lower()


def staging_url(url) -> str:
    """The staging Zarr directory an HDF5 store is written through."""
    return str(url).rstrip("/") + ".partial.zarr"


def redact_url(url) -> str:
    """``url`` without user:password@ and query string (presigned tokens), safe to print or store."""
    url = str(url)
    if is_local(url):
        return url
    url = re.sub(r"^([a-zA-Z][\w+.-]*://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]


@functools.lru_cache(maxsize=None)
def _accepts(proto: str, option: str) -> bool:
    import inspect

    try:
        cls = fsspec.get_filesystem_class(proto)
    except (ImportError, ValueError):
        return False
    return option in inspect.signature(cls.__init__).parameters


def storage_options_for(url, storage_options: dict | None = None) -> dict:
    """``storage_options`` plus vlcache's defaults for ``url``'s filesystem.

    s3fs: ``max_concurrency=1`` — otherwise s3fs sends a HEAD before every GET to decide whether to split
    the download, doubling the requests per chunk (chunks are far below its split size anyway).
    """
    opts = dict(storage_options or {})
    if protocol(url) in ("s3", "s3a") and _accepts("s3", "max_concurrency"):
        opts.setdefault("max_concurrency", 1)
    return opts


def url_to_fs(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) for a store url, local or remote."""
    with remote_errors(url):
        return fsspec.core.url_to_fs(
            local_path(url) if is_local(url) else url, **storage_options_for(url, storage_options)
        )


_CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE / ~/.aws/credentials), or pass "
          "storage_options={'key': ..., 'secret': ...}; storage_options={'anon': True} for a public bucket",
    "gs": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS, or pass "
          "storage_options={'token': ...}; storage_options={'token': 'anon'} for a public bucket",
}
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                   "DefaultCredentialsError", "RefreshError")


def access_error(url, exc: BaseException) -> StoreAccessError | None:
    """A clear :class:`StoreAccessError` for a credentials/permission failure on ``url``, else None."""
    proto = protocol(url)
    hint = _CREDENTIAL_HINTS.get("s3" if proto in ("s3", "s3a") else "gs" if proto in ("gs", "gcs") else "",
                                 "configure credentials for fsspec or pass storage_options")
    names = {c.__name__ for c in type(exc).__mro__}
    if names & set(_NO_CREDENTIALS):
        return StoreAccessError(f"no credentials to access {redact_url(url)}: {hint}")
    if isinstance(exc, PermissionError) and not is_local(url):
        return StoreAccessError(f"access to {redact_url(url)} was denied ({exc}); check its credentials: {hint}")
    return None


@contextlib.contextmanager
def remote_errors(url):
    """Turn credential/permission failures of fsspec clients into one-line :class:`StoreAccessError`."""
    try:
        yield
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - re-raised unchanged unless it is an access failure
        err = access_error(url, e)
        if err is None:
            raise
        raise err from None  # the client's traceback may carry request details: not chained


def check_writable_url(url) -> None:
    if protocol(url) in READ_ONLY_PROTOCOLS:
        raise StoreError(f"{redact_url(url)}: {protocol(url)}:// stores are read-only; write to a local path, "
                         "s3://, gs:// or file:// instead")


# -------------------------------------------------------------------------------------------- attrs
def to_jsonable(obj: Any, where: str = "attrs") -> Any:
    """A JSON-normalised deep copy (tuples -> lists, numpy scalars -> python); errors name the key."""

    def default(o):
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, os.PathLike):
            return os.fspath(o)
        raise TypeError(f"{where}: value of type {type(o).__name__} is not JSON-serialisable: {o!r}")

    try:
        return json.loads(json.dumps(obj, default=default, allow_nan=False))
    except ValueError as e:  # NaN/inf: not valid JSON, and would not compare equal on resume
        raise ValueError(f"{where}: {e}") from None


def check_root_attrs(url: str, attrs: dict) -> Layout:
    """Validate root attributes of a store at ``url``; return its layout."""
    url = redact_url(url)
    if attrs.get(CREATING):
        raise StoreBeingCreatedError(f"store {url} is still being created (or its creation was interrupted)")
    fmt = attrs.get("format")
    if fmt != FORMAT_NAME:
        raise StoreError(f"{url} is not a vlcache store (format attribute is {fmt!r}, expected {FORMAT_NAME!r})")
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"store {url} has schema_version {version}, newer than this vlcache ({SCHEMA_VERSION}); upgrade vlcache"
        )
    if version < 1 or "layout" not in attrs:
        raise StoreError(f"store {url}: root attributes lack a valid schema_version/layout")
    return Layout.from_attrs(attrs["layout"])


def chunk_index(spec_row_ndim: int, block: int) -> tuple[int, ...]:
    return (block,) + (0,) * spec_row_ndim


# -------------------------------------------------------------------------------------------- Backend
class Backend(abc.ABC):
    """One opened store. Subclasses implement the ``_raw_*`` hooks; rows and blocks are handled here."""

    kind = "?"

    def __init__(self, url, mode: str = "r", storage_options: dict | None = None, force: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.url = os.fspath(url) if isinstance(url, os.PathLike) else str(url)
        self.mode = mode
        self.storage_options = dict(storage_options or {})
        self.force = force
        self._opened = False
        if mode == "r+":
            check_writable_url(self.url)
        self._ensure_open()  # errors surface at open time, not at first read

    # --- pickling: (url, mode), reopened lazily in the new process
    def __getstate__(self):
        return {"url": self.url, "mode": self.mode, "storage_options": self.storage_options, "force": self.force}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opened = False

    def _ensure_open(self):
        if not self._opened:
            with remote_errors(self.url):
                self._open()
            self._attrs = self._load_attrs()
            self._layout = check_root_attrs(self.url, self._attrs)
            self._specs = {s.path: s for s in self._layout.specs()}
            if self.mode == "r+" and self._attrs.get("complete") and not self.force:
                self._close_handle()
                raise ReadOnlyStoreError(
                    f"store {redact_url(self.url)} is complete and opens read-only; pass force=True to modify it"
                )
            self._opened = True

    @property
    def layout(self) -> Layout:
        self._ensure_open()
        return self._layout

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"{type(self).__name__}({redact_url(self.url)!r}, mode={self.mode!r})"

    # --- attributes
    def attrs(self) -> dict:
        self._ensure_open()
        return copy.deepcopy(self._attrs)

    def attr(self, key: str, default=None):
        """One root attribute (a copy), without copying all of them."""
        self._ensure_open()
        return copy.deepcopy(self._attrs.get(key, default))

    def update_attrs(self, **kv) -> None:
        self._ensure_open()
        self._check_writable()
        new = {**self._attrs, **to_jsonable(kv)}
        self._raw_put_attrs(new)
        self._attrs = new

    def _check_writable(self):
        if self.mode != "r+":
            raise ReadOnlyStoreError(f"store {redact_url(self.url)} is opened read-only (mode {self.mode!r})")

    # --- arrays
    def arrays(self) -> list[str]:
        self._ensure_open()
        present = set(self._raw_arrays())
        ordered = [p for p in self._specs if p in present]
        return ordered + sorted(present - set(ordered))

    def has(self, path: str) -> bool:
        return path in self.arrays()

    def shape(self, path: str) -> tuple[int, ...]:
        self._ensure_open()
        return tuple(self._raw_shape(path))

    def chunk_rows(self) -> int:
        self._ensure_open()
        return self.layout.block_size

    def spec(self, path: str) -> ArraySpec:
        self._ensure_open()
        if path not in self._specs:
            raise StoreError(f"store {redact_url(self.url)} has no array {path!r}; arrays: {self.arrays()}")
        return self._specs[path]

    def read(self, path: str, rows) -> np.ndarray:
        """Rows of ``path``: ``rows`` is an int, a slice or an int index array (any order, repeats ok)."""
        self.spec(path)
        n = self.layout.num_rows
        where = f"store {redact_url(self.url)}"
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + (n if rows < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"{where}: row {int(rows)} of '{path}' out of range [0, {n})")
            return self._read_sel(path, slice(i, i + 1))[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._read_sel(path, slice(start, max(start, stop)))
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"{where}: rows of '{path}' must be an int, a slice or a 1-D int array")
        idx = idx.astype(np.int64) + np.where(idx < 0, n, 0)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"{where}: row index out of range [0, {n}) for '{path}'")
        uniq, inverse = np.unique(idx, return_inverse=True)
        if uniq.size == 0:
            return self._read_sel(path, slice(0, 0))
        return self._read_sel(path, uniq)[inverse]

    def read_block(self, path: str, block: int) -> np.ndarray:
        self._ensure_open()
        self.spec(path)
        r = self.layout.block_rows(block)
        return self._read_sel(path, slice(r.start, r.stop))

    def _read_sel(self, path: str, sel) -> np.ndarray:
        """Read ``sel`` (a slice or sorted unique indices); a damaged chunk becomes CorruptChunkError."""
        try:
            return self._raw_read(path, sel)
        except Exception as e:  # noqa: BLE001 - classified below, re-raised if not chunk damage
            if self._damage_reason(e) is None:
                raise
            first = e
        # Re-read block by block to name the damaged chunk.
        bs = self.layout.block_size
        rows = np.arange(sel.start, sel.stop) if isinstance(sel, slice) else sel
        for block in np.unique(rows // bs):
            r = self.layout.block_rows(int(block))
            try:
                self._raw_read(path, slice(r.start, r.stop))
            except Exception as e:  # noqa: BLE001
                reason = self._damage_reason(e)
                if reason is None:
                    raise
                ndim = len(self.spec(path).row_shape)
                raise CorruptChunkError(redact_url(self.url), path, chunk_index(ndim, int(block)), reason) from e
        raise first

    def write_rows(self, path: str, start: int, data: np.ndarray) -> None:
        """Write whole blocks of rows starting at block-aligned ``start`` (the last block may be short)."""
        self._ensure_open()
        self._check_writable()
        spec = self.spec(path)
        n, bs = self.layout.num_rows, self.layout.block_size
        data = np.asarray(data, dtype=object) if spec.dtype == STR else np.asarray(data)
        stop = start + len(data)
        where = f"store {redact_url(self.url)}"
        if start % bs or not (stop == n or (stop < n and stop % bs == 0)) or len(data) == 0:
            raise ValueError(
                f"{where}: write to '{path}' rows [{start}, {stop}) is not block-aligned "
                f"(block_size {bs}, {n} rows)"
            )
        if data.shape[1:] != spec.row_shape:
            raise ValueError(f"{where}: array '{path}' rows have shape {data.shape[1:]}, expected {spec.row_shape}")
        self._raw_write(path, start, data if spec.dtype == STR else data.astype(spec.dtype, copy=False))

    def close(self) -> None:
        if self.__dict__.get("_opened"):
            self._close_handle()
        self._opened = False

    # --- hooks
    @abc.abstractmethod
    def _open(self) -> None: ...
    @abc.abstractmethod
    def _close_handle(self) -> None: ...
    @abc.abstractmethod
    def _load_attrs(self) -> dict: ...
    @abc.abstractmethod
    def _raw_put_attrs(self, attrs: dict) -> None: ...
    @abc.abstractmethod
    def _raw_arrays(self) -> list[str]: ...
    @abc.abstractmethod
    def _raw_shape(self, path: str) -> tuple[int, ...]: ...
    @abc.abstractmethod
    def _raw_read(self, path: str, sel) -> np.ndarray: ...
    @abc.abstractmethod
    def _raw_write(self, path: str, start: int, data: np.ndarray) -> None: ...
    @abc.abstractmethod
    def stored_blocks(self, path: str) -> set[int]:
        """Blocks of ``path`` that have a chunk in storage."""

    @abc.abstractmethod
    def stored_bytes(self) -> dict[str, int]:
        """Bytes in storage per array path ('' for metadata and anything outside arrays)."""

    @abc.abstractmethod
    def _damage_reason(self, exc: Exception) -> str | None:
        """Why ``exc`` (raised reading one chunk) means the chunk is damaged, or None if it does not."""
