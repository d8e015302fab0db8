"""The HDF5 backend: the store's tree in one ``.h5`` file, for single-file hand-over.

Chunked like the Zarr backend (one chunk = one block of rows), ``fletcher32`` checksums on every chunk,
``gzip`` or ``lzf`` compression on every array but the float16 features (stored raw since schema v2).
Strings are fixed-length UTF-8 (``h5py.string_dtype('utf-8', L)``, ``L`` = the
longest string) because HDF5 cannot filter — hence cannot checksum — variable-length data. Root
attributes are one JSON string attribute.

An HDF5 file cannot survive a SIGKILL mid-write nor take several writer processes, so stores are written
through a staging Zarr directory ``<file>.partial.zarr`` and packed by :func:`pack_hdf5` once every
block is done (temp file, then an atomic rename). Remote HDF5 files (``s3://.../x.h5``) open read-only.
"""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import h5py
import numpy as np

from .base import Backend, is_local, local_path, redact_url, staging_url, storage_options_for, to_jsonable
from .errors import StoreError, StoreNotFoundError
from .schema import DONE, STR
from .zarr_backend import ZarrBackend

HDF5_ATTRS = "vlcache_attrs"  # the HDF5 root attribute holding the JSON root attributes


class HDF5Backend(Backend):
    kind = "hdf5"

    def _open(self):
        self._fobj = None
        if is_local(self.url):
            path = local_path(self.url)
            if not os.path.exists(path):
                raise StoreNotFoundError(missing_hdf5_message(self.url))
            try:
                self._file = h5py.File(path, self.mode)
            except OSError as e:
                raise StoreNotFoundError(f"{self.url} is not a readable HDF5 file ({e})") from e
            return
        if self.mode != "r":
            raise StoreError(f"remote HDF5 store {redact_url(self.url)} can only be opened read-only")
        try:
            self._fobj = fsspec.open(self.url, "rb", **storage_options_for(self.url, self.storage_options)).open()
        except FileNotFoundError:
            raise StoreNotFoundError(f"no vlcache store at {redact_url(self.url)} (no such file)") from None
        try:
            self._file = h5py.File(self._fobj, "r")
        except OSError as e:
            self._fobj.close()
            raise StoreNotFoundError(f"{redact_url(self.url)} is not a readable HDF5 file ({e})") from None

    def _close_handle(self):
        self._file.close()
        if self._fobj is not None:
            self._fobj.close()

    def _load_attrs(self) -> dict:
        raw = self._file.attrs.get(HDF5_ATTRS)
        if raw is None:
            raise StoreError(
                f"{redact_url(self.url)} is an HDF5 file but not a vlcache store (no {HDF5_ATTRS!r} attribute)"
            )
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
            raise StoreError(f"store {redact_url(self.url)} has no array {path!r}")
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


def missing_hdf5_message(url: str) -> str:
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
        return (f"HDF5 store {url} is still being written ({progress} in {staging}); "
                "it appears when the writer finalizes")
    return f"no vlcache store at {url} (no such file)"


def ours_hdf5(path: str) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return HDF5_ATTRS in f.attrs
    except OSError:
        return False


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
                # float16 features are stored raw (schema v2): gzip saved ~2% on them and was most of a read
                kw = dict(shape=src.shape(path), chunks=chunks, fletcher32=True,
                          **({} if spec.dtype == "float16" else comp))
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
