"""Zarr v3 and HDF5 backends behind one small, block-oriented API.

Both backends hold the tree of :mod:`vlcache.storage.schema`: every array chunked
``(block_size, *row_shape)``, so one chunk along axis 0 is one block of rows.

* **Zarr v3** (default): a group in a local directory or at any fsspec URL (``s3://``, ``memory://``).
  Codecs per array: ``bytes`` (``vlen-utf8`` for strings) -> ``zstd`` -> ``crc32c``, so every chunk
  carries a checksum. Root attributes are consolidated into the root ``zarr.json`` whenever they
  change, so opening a remote store is one request.
* **HDF5** (``.h5``/``.hdf5``/``.hdf``): the same tree in one file, chunked the same way, ``gzip`` or
  ``lzf`` compression with ``fletcher32`` checksums. Strings are fixed-length UTF-8
  (``h5py.string_dtype('utf-8', L)``, ``L`` = the longest string) because HDF5 cannot filter —
  hence cannot checksum — variable-length data. Root attributes are one JSON string attribute.

Writing an HDF5 store goes through a **staging Zarr directory** ``<file>.partial.zarr`` beside the
target: an HDF5 file cannot survive a SIGKILL mid-write nor take several writer processes, the Zarr
staging store can (same block protocol: arrays first, ``done`` last; resumable; ranks own disjoint
blocks). When every block is done, :func:`pack_hdf5` copies the staging store (checking every chunk's
crc32c on the way) into ``<file>.tmp-<pid>-<id>``, renames it atomically to ``<file>`` and removes the
staging directory (the writer holds an exclusive ``flock`` on the staging directory meanwhile, so
exactly one process packs; a killed packer leaves only its temp file, removed by the next one).
``open_backend`` on an ``.h5`` path that only has its staging directory says the store is still being
written and how many blocks are done.

A store whose ``complete`` attribute is true opens read-only; ``mode="r+"`` needs ``force=True``.
Backends pickle as ``(url, mode)`` and reopen lazily, so no file handle crosses a fork.
"""

from __future__ import annotations

import abc
import copy
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import fsspec
import h5py
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec, ZstdCodec

from .errors import (
    CorruptChunkError,
    ReadOnlyStoreError,
    SchemaVersionError,
    StoreBeingCreatedError,
    StoreError,
    StoreNotFoundError,
)
from .schema import DONE, FORMAT_NAME, SCHEMA_VERSION, STR, ArraySpec, Layout

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
HDF5_ATTRS = "vlcache_attrs"  # the HDF5 root attribute holding the JSON root attributes
CREATING = "vlcache_creating"  # root attribute present only while a store is being created
MODES = ("r", "r+")

# vlcache relies on consolidated metadata (one request to open a remote store) on purpose; zarr warns on
# every consolidation that v3 has not standardised it yet. Set once here: a warnings.catch_warnings()
# per call is not thread-safe, and zarr emits the warning from its own event-loop thread.
warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)


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


def staging_url(url) -> str:
    """The staging Zarr directory an HDF5 store is written through."""
    return str(url).rstrip("/") + ".partial.zarr"


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


def _chunk_index(spec_row_ndim: int, block: int) -> tuple[int, ...]:
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
        self._ensure_open()  # errors surface at open time, not at first read

    # --- pickling: (url, mode), reopened lazily in the new process
    def __getstate__(self):
        return {"url": self.url, "mode": self.mode, "storage_options": self.storage_options, "force": self.force}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opened = False

    def _ensure_open(self):
        if not self._opened:
            self._open()
            self._attrs = self._load_attrs()
            self._layout = check_root_attrs(self.url, self._attrs)
            self._specs = {s.path: s for s in self._layout.specs()}
            if self.mode == "r+" and self._attrs.get("complete") and not self.force:
                self._close_handle()
                raise ReadOnlyStoreError(
                    f"store {self.url} is complete and opens read-only; pass force=True to modify it"
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
        return f"{type(self).__name__}({self.url!r}, mode={self.mode!r})"

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
            raise ReadOnlyStoreError(f"store {self.url} is opened read-only (mode {self.mode!r})")

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
            raise StoreError(f"store {self.url} has no array {path!r}; arrays: {self.arrays()}")
        return self._specs[path]

    def read(self, path: str, rows) -> np.ndarray:
        """Rows of ``path``: ``rows`` is an int, a slice or an int index array (any order, repeats ok)."""
        self.spec(path)
        n = self.layout.num_rows
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + (n if rows < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"store {self.url}: row {int(rows)} of '{path}' out of range [0, {n})")
            return self._read_sel(path, slice(i, i + 1))[0]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            if step == 1:
                return self._read_sel(path, slice(start, max(start, stop)))
            rows = np.arange(start, stop, step)
        idx = np.asarray(rows)
        if idx.ndim != 1 or (idx.size and idx.dtype.kind not in "iu"):
            raise TypeError(f"store {self.url}: rows of '{path}' must be an int, a slice or a 1-D int array")
        idx = idx.astype(np.int64) + np.where(idx < 0, n, 0)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"store {self.url}: row index out of range [0, {n}) for '{path}'")
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
                raise CorruptChunkError(self.url, path, _chunk_index(ndim, int(block)), reason) from e
        raise first

    def write_rows(self, path: str, start: int, data: np.ndarray) -> None:
        """Write whole blocks of rows starting at block-aligned ``start`` (the last block may be short)."""
        self._ensure_open()
        self._check_writable()
        spec = self.spec(path)
        n, bs = self.layout.num_rows, self.layout.block_size
        data = np.asarray(data, dtype=object) if spec.dtype == STR else np.asarray(data)
        stop = start + len(data)
        if start % bs or not (stop == n or (stop < n and stop % bs == 0)) or len(data) == 0:
            raise ValueError(
                f"store {self.url}: write to '{path}' rows [{start}, {stop}) is not block-aligned "
                f"(block_size {bs}, {n} rows)"
            )
        if data.shape[1:] != spec.row_shape:
            raise ValueError(
                f"store {self.url}: array '{path}' rows have shape {data.shape[1:]}, expected {spec.row_shape}"
            )
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


# ----------------------------------------------------------------------------------------------- Zarr
def _zarr_store(url: str, read_only: bool, storage_options: dict | None):
    if is_local(url):
        return zarr.storage.LocalStore(local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or None, read_only=read_only)


def url_to_fs(url: str, storage_options: dict | None = None):
    """(fsspec filesystem, path) for a store url, local or remote."""
    return fsspec.core.url_to_fs(local_path(url) if is_local(url) else url, **(storage_options or {}))


class ZarrBackend(Backend):
    kind = "zarr"

    def _open(self):
        if is_local(self.url) and not os.path.isdir(local_path(self.url)):
            raise StoreNotFoundError(f"no vlcache store at {self.url} (no such directory)")
        self._arrays: dict[str, zarr.Array] = {}
        try:
            self._store = _zarr_store(self.url, self.mode == "r", self.storage_options)
            self._group = zarr.open_group(self._store, mode=self.mode)
        except (FileNotFoundError, NotADirectoryError, zarr.errors.BaseZarrError) as e:
            raise StoreNotFoundError(f"no vlcache store at {self.url} ({type(e).__name__}: {e})") from e

    def _close_handle(self):
        self._arrays = {}
        self._group = None
        self._store.close()

    def _load_attrs(self) -> dict:
        return to_jsonable(self._group.attrs.asdict())

    def _raw_put_attrs(self, attrs: dict):
        self._group.attrs.put(attrs)
        zarr.consolidate_metadata(self._store)
        self._group = zarr.open_group(self._store, mode=self.mode)
        self._arrays = {}

    def _raw_arrays(self) -> list[str]:
        return [name for name, node in self._group.members(max_depth=None) if isinstance(node, zarr.Array)]

    def _array(self, path: str) -> zarr.Array:
        a = self._arrays.get(path)
        if a is None:
            try:
                a = self._group[path]
            except KeyError:
                raise StoreError(f"store {self.url} has no array {path!r}") from None
            # Every written block gets a chunk object, even all-padding ones, so verify can tell a
            # missing chunk from a padded one.
            a = self._arrays[path] = a.with_config({"write_empty_chunks": True})
        return a

    def _raw_shape(self, path):
        return self._array(path).shape

    def _raw_read(self, path, sel):
        a = self._array(path)
        out = a[sel] if isinstance(sel, slice) else a.oindex[sel]
        return out.astype(object) if out.dtype.kind in "TUO" else out

    def _raw_write(self, path, start, data):
        self._array(path)[start : start + len(data)] = data

    def _damage_reason(self, exc):
        if isinstance(exc, zarr.errors.BaseZarrError) or not isinstance(exc, (ValueError, RuntimeError, EOFError)):
            return None
        if "checksum" in str(exc).lower():
            return "failed its checksum (crc32c)"
        return f"could not be decoded ({type(exc).__name__}: {exc})"

    def chunk_key(self, path: str, chunk: tuple[int, ...]) -> str:
        """Storage key of one chunk, relative to the store root."""
        return f"{path}/c/" + "/".join(str(int(c)) for c in chunk)

    def stored_blocks(self, path: str) -> set[int]:
        """Blocks of ``path`` that have a chunk object in storage (one listing request)."""
        self._ensure_open()
        fs, root = url_to_fs(self.url, self.storage_options)
        prefix = f"{root.rstrip('/')}/{path}/c/"
        return {int(k[len(prefix):].split("/")[0]) for k in fs.find(prefix) if k.startswith(prefix)}

    def stored_bytes(self) -> dict[str, int]:
        """Bytes in storage per array (chunks and metadata), plus '' for the root metadata."""
        self._ensure_open()
        fs, root = url_to_fs(self.url, self.storage_options)
        root = root.rstrip("/") + "/"
        out: dict[str, int] = {}
        arrays = sorted(self._raw_arrays(), key=len, reverse=True)
        for key, size in fs.du(root, total=False).items():
            rel = key[len(root):] if key.startswith(root) else key
            owner = next((a for a in arrays if rel.startswith(a + "/")), "")
            out[owner] = out.get(owner, 0) + int(size)
        return out


def create_zarr_array(group, spec: ArraySpec, layout: Layout) -> None:
    kw = dict(
        shape=(layout.num_rows, *spec.row_shape),
        chunks=(layout.block_size, *(max(1, d) for d in spec.row_shape)),
        compressors=[ZstdCodec(level=3), Crc32cCodec()],
    )
    if spec.dtype == STR:
        group.create_array(spec.path, dtype=str, serializer=VLenUTF8Codec(), fill_value="", **kw)
    else:
        group.create_array(spec.path, dtype=spec.dtype, serializer=BytesCodec(), fill_value=spec.fill, **kw)


# ----------------------------------------------------------------------------------------------- HDF5
class HDF5Backend(Backend):
    kind = "hdf5"

    def _open(self):
        self._fobj = None
        if is_local(self.url):
            path = local_path(self.url)
            if not os.path.exists(path):
                raise StoreNotFoundError(_missing_hdf5_message(self.url))
            try:
                self._file = h5py.File(path, self.mode)
            except OSError as e:
                raise StoreNotFoundError(f"{self.url} is not a readable HDF5 file ({e})") from e
            return
        if self.mode != "r":
            raise StoreError(f"remote HDF5 store {self.url} can only be opened read-only")
        try:
            self._fobj = fsspec.open(self.url, "rb", **self.storage_options).open()
            self._file = h5py.File(self._fobj, "r")
        except (FileNotFoundError, OSError) as e:
            raise StoreNotFoundError(f"no HDF5 store at {self.url} ({e})") from e

    def _close_handle(self):
        self._file.close()
        if self._fobj is not None:
            self._fobj.close()

    def _load_attrs(self) -> dict:
        raw = self._file.attrs.get(HDF5_ATTRS)
        if raw is None:
            raise StoreError(f"{self.url} is an HDF5 file but not a vlcache store (no {HDF5_ATTRS!r} attribute)")
        return json.loads(raw)

    def _raw_put_attrs(self, attrs):
        self._file.attrs[HDF5_ATTRS] = json.dumps(attrs)
        self._file.flush()

    def _raw_arrays(self):
        names: list[str] = []
        self._file.visititems(lambda name, node: names.append(name) if isinstance(node, h5py.Dataset) else None)
        return names

    def _ds(self, path) -> h5py.Dataset:
        node = self._file.get(path)
        if not isinstance(node, h5py.Dataset):
            raise StoreError(f"store {self.url} has no array {path!r}")
        return node

    def _raw_shape(self, path):
        return self._ds(path).shape

    def _raw_read(self, path, sel):
        ds = self._ds(path)
        if h5py.check_string_dtype(ds.dtype):
            return np.asarray(ds.asstr()[sel], dtype=object)
        return ds[sel]

    def _raw_write(self, path, start, data):
        ds = self._ds(path)
        if h5py.check_string_dtype(ds.dtype):
            data = encode_fixed(data, ds.dtype, f"store {self.url}: array '{path}'")
        ds[start : start + len(data)] = data
        self._file.flush()

    def stored_blocks(self, path: str) -> set[int]:
        """Blocks of ``path`` that have an allocated chunk in the file."""
        self._ensure_open()
        ds = self._ds(path)
        return {ds.id.get_chunk_info(i).chunk_offset[0] // ds.chunks[0] for i in range(ds.id.get_num_chunks())}

    def stored_bytes(self) -> dict[str, int]:
        """Bytes in the file per array (compressed chunks), plus '' for everything else (metadata)."""
        self._ensure_open()
        out = {p: int(self._ds(p).id.get_storage_size()) for p in self._raw_arrays()}
        total = os.path.getsize(local_path(self.url)) if is_local(self.url) else int(self._fobj.size)
        out[""] = max(0, total - sum(out.values()))
        return out

    def _damage_reason(self, exc):
        if not isinstance(exc, (OSError, RuntimeError, ValueError)):
            return None
        if "filter" in str(exc).lower():
            return "failed its checksum (fletcher32) or could not be decompressed"
        return f"could not be read ({type(exc).__name__}: {exc})"


def encode_fixed(data: np.ndarray, dtype, where: str) -> np.ndarray:
    """Strings -> fixed-width UTF-8 bytes of an HDF5 string dtype; too-long strings are an error."""
    enc = [str(s).encode("utf-8") for s in np.asarray(data, dtype=object).ravel()]
    width = dtype.itemsize
    longest = max((len(b) for b in enc), default=0)
    if longest > width:
        raise StoreError(f"{where}: a string of {longest} UTF-8 bytes exceeds the file's fixed width {width}")
    return np.array(enc, dtype=dtype).reshape(np.shape(data))


def _missing_hdf5_message(url: str) -> str:
    staging = staging_url(url)
    if os.path.isdir(local_path(staging)):
        try:
            with ZarrBackend(staging, "r") as b:
                done = b.read(DONE, slice(None)).astype(bool)
                lay = b.layout
            n = sum(bool(done[lay.block_rows(k).start : lay.block_rows(k).stop].all()) for k in range(lay.num_blocks))
            progress = f"{n}/{lay.num_blocks} blocks done"
        except StoreError as e:
            progress = f"staging store unreadable: {e}"
        return f"HDF5 store {url} is still being written ({progress} in {staging}); it appears when the writer finalizes"
    return f"no vlcache store at {url} (no such file)"


def pack_hdf5(src: Backend, target: str, compression: str = "gzip", extra_attrs: dict | None = None) -> None:
    """Copy a staging store into one HDF5 file at ``target``: write a temp file, rename atomically.

    The file's root attributes are the source's merged with ``extra_attrs`` (e.g. ``complete=True``).
    Every chunk is read through its crc32c, so a damaged staging store fails here instead of being packed.
    """
    comp = {"gzip": dict(compression="gzip", compression_opts=4), "lzf": dict(compression="lzf")}.get(compression)
    if comp is None:
        raise ValueError(f"HDF5 compression must be 'gzip' or 'lzf', got {compression!r}")
    lay = src.layout
    tmp = f"{target}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with h5py.File(tmp, "w") as f:
            for path in src.arrays():
                spec = src.spec(path)
                chunks = (min(lay.block_size, lay.num_rows), *(max(1, d) for d in spec.row_shape))
                kw = dict(shape=src.shape(path), chunks=chunks, fletcher32=True, **comp)
                if spec.dtype == STR:
                    longest = max(
                        max((len(s.encode("utf-8")) for s in src.read_block(path, b).ravel()), default=0)
                        for b in range(lay.num_blocks)
                    )
                    ds = f.create_dataset(path, dtype=h5py.string_dtype("utf-8", max(1, longest)), **kw)
                else:
                    ds = f.create_dataset(path, dtype=spec.dtype, fillvalue=spec.fill, **kw)
                for b in range(lay.num_blocks):
                    r = lay.block_rows(b)
                    data = src.read_block(path, b)
                    if spec.dtype == STR:
                        data = encode_fixed(data, ds.dtype, f"packing {target}: array '{path}'")
                    ds[r.start : r.stop] = data
            f.attrs[HDF5_ATTRS] = json.dumps({**src.attrs(), **to_jsonable(extra_attrs or {})})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_dir(os.path.dirname(os.path.abspath(target)))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ open / create
def open_backend(url, mode: str = "r", storage_options: dict | None = None, *, force: bool = False) -> Backend:
    """Open an existing store (zarr directory/URL or HDF5 file, by suffix)."""
    cls = HDF5Backend if backend_kind(url) == "hdf5" else ZarrBackend
    return cls(url, mode, storage_options, force)


def zarr_store_exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` holds a zarr group (finished or not)."""
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path.rstrip("/") + "/zarr.json")


def _ours_zarr(fs, path: str) -> bool:
    """Whether ``path`` holds a vlcache zarr store (finished, or one whose creation was interrupted)."""
    try:
        attrs = json.loads(fs.cat(path.rstrip("/") + "/zarr.json")).get("attributes", {})
    except (FileNotFoundError, ValueError):
        return False
    return attrs.get("format") == FORMAT_NAME or bool(attrs.get(CREATING))


def _ours_hdf5(path: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return HDF5_ATTRS in f.attrs
    except OSError:
        return False


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete a store and what an interrupted write of it may have left (staging, temp files).

    Refuses to delete anything that is not a vlcache store (an empty directory is fine).
    """
    kind = backend_kind(url)
    zurl = staging_url(url) if kind == "hdf5" else str(url)
    fs, path = url_to_fs(zurl, storage_options)
    if fs.exists(path):
        if fs.ls(path) and not _ours_zarr(fs, path):
            raise StoreError(f"{zurl} exists and is not a vlcache store; refusing to delete it")
        fs.rm(path, recursive=True)
    if kind == "hdf5":
        target = Path(local_path(url))
        if target.exists():
            if not _ours_hdf5(str(target)):
                raise StoreError(f"{url} exists and is not a vlcache HDF5 store; refusing to delete it")
            target.unlink()
        for tmp in target.parent.glob(target.name + ".tmp-*"):
            tmp.unlink()


def create_backend(
    url, layout: Layout, attrs: dict, *, overwrite: bool = False, storage_options: dict | None = None
) -> Backend:
    """Create an empty store and return it opened ``r+``.

    For an HDF5 url this creates (and returns) the staging Zarr store ``<file>.partial.zarr``; the HDF5
    file itself is written by :func:`pack_hdf5` once every block is done.
    """
    url = os.fspath(url) if isinstance(url, os.PathLike) else str(url)
    kind = backend_kind(url)
    if kind == "hdf5" and not is_local(url):
        raise StoreError(f"HDF5 stores are written to local paths only, not {url}; write a zarr store there")
    zurl = staging_url(url) if kind == "hdf5" else url
    exists = zarr_store_exists(zurl, storage_options) or (kind == "hdf5" and os.path.exists(local_path(url)))
    if exists and not overwrite:
        raise StoreError(f"store {url} already exists; pass overwrite=True to replace it")
    remove_store(url, storage_options)
    root = {
        **to_jsonable(attrs or {}),
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "layout": layout.to_attrs(),
        "complete": False,
        "store_id": uuid.uuid4().hex,
    }
    store = _zarr_store(zurl, False, storage_options)
    # The CREATING marker is the first thing written and is replaced by the full attributes last, so
    # a creation killed half-way is recognisable (and is redone by the next writer).
    group = zarr.create_group(store, overwrite=True, attributes={CREATING: True})
    for spec in layout.specs():
        create_zarr_array(group, spec, layout)
    group.attrs.put(root)
    zarr.consolidate_metadata(store)
    return ZarrBackend(zurl, "r+", storage_options)
