"""Zarr v3 and HDF5 backends behind one small, block-oriented API: open, create and remove stores.

Both backends hold the tree of :mod:`vlcache.storage.schema`: every array chunked
``(block_size, *row_shape)``, so one chunk along axis 0 is one block of rows.

* **Zarr v3** (default, :mod:`.zarr_backend`): a group in a local directory or at any fsspec URL
  (``s3://``, ``gs://``, ``https://`` read-only, ``file://``, ``memory://``). Every chunk carries a crc32c
  checksum; metadata is consolidated into the root ``zarr.json``, so opening a remote store is one request.
* **HDF5** (``.h5``/``.hdf5``/``.hdf``, :mod:`.hdf5_backend`): the same tree in one file with
  ``fletcher32`` checksums, written through a staging Zarr directory ``<file>.partial.zarr`` and packed
  by :func:`pack_hdf5` once every block is done (``open_backend`` on an ``.h5`` path that only has its
  staging directory says the store is still being written and how many blocks are done).

A store whose ``complete`` attribute is true opens read-only; ``mode="r+"`` needs ``force=True``.
Backends pickle as ``(url, mode)`` and reopen lazily, so no file handle crosses a fork. Credentials come
from fsspec's usual configuration or ``storage_options`` and are never stored (see :mod:`.base`).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import zarr

from .base import (  # noqa: F401 - re-exported: the backend API lives here
    CREATING,
    HDF5_SUFFIXES,
    MODES,
    Backend,
    StoreAccessError,
    backend_kind,
    check_root_attrs,
    check_writable_url,
    is_local,
    local_path,
    protocol,
    redact_url,
    remote_errors,
    staging_url,
    storage_options_for,
    to_jsonable,
    url_to_fs,
)
from .errors import StoreError
from .hdf5_backend import HDF5_ATTRS, HDF5Backend, encode_fixed, ours_hdf5, pack_hdf5  # noqa: F401
from .schema import FORMAT_NAME, SCHEMA_VERSION, Layout
from .zarr_backend import (  # noqa: F401
    ZarrBackend,
    consolidate,
    create_zarr_array,
    ours_zarr,
    zarr_store,
    zarr_store_exists,
)


def open_backend(url, mode: str = "r", storage_options: dict | None = None, *, force: bool = False) -> Backend:
    """Open an existing store (zarr directory/URL or HDF5 file, by suffix)."""
    cls = HDF5Backend if backend_kind(url) == "hdf5" else ZarrBackend
    return cls(url, mode, storage_options, force)


def remove_store(url: str, storage_options: dict | None = None) -> None:
    """Delete a store and what an interrupted write of it may have left (staging, temp files).

    Refuses to delete anything that is not a vlcache store (an empty directory is fine).
    """
    kind = backend_kind(url)
    zurl = staging_url(url) if kind == "hdf5" else str(url)
    fs, path = url_to_fs(zurl, storage_options)
    with remote_errors(zurl):
        if fs.exists(path):
            if fs.ls(path) and not ours_zarr(fs, path):
                raise StoreError(f"{redact_url(zurl)} exists and is not a vlcache store; refusing to delete it")
            fs.rm(path, recursive=True)
    if kind == "hdf5":
        target = Path(local_path(url))
        if target.exists():
            if not ours_hdf5(str(target)):
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
    check_writable_url(url)
    if kind == "hdf5" and not is_local(url):
        raise StoreError(
            f"HDF5 stores are written to local paths only, not {redact_url(url)}; write a zarr store there "
            "(or copy_store a local .h5 there)"
        )
    zurl = staging_url(url) if kind == "hdf5" else url
    with remote_errors(url):
        exists = zarr_store_exists(zurl, storage_options) or (kind == "hdf5" and os.path.exists(local_path(url)))
        if exists and not overwrite:
            raise StoreError(f"store {redact_url(url)} already exists; pass overwrite=True to replace it")
        remove_store(url, storage_options)
        root = {
            **to_jsonable(attrs or {}),
            "format": FORMAT_NAME,
            "schema_version": SCHEMA_VERSION,
            "layout": layout.to_attrs(),
            "complete": False,
            "store_id": uuid.uuid4().hex,
        }
        # The CREATING marker is the first thing written and is replaced by the full attributes last, so
        # a creation killed half-way is recognisable (and is redone by the next writer).
        if is_local(zurl):
            store = zarr_store(zurl, False, storage_options)
            group = zarr.create_group(store, overwrite=True, attributes={CREATING: True})
            for spec in layout.specs():
                create_zarr_array(group, spec, layout)
            group.attrs.put(root)
            consolidate(store)
        else:
            _create_remote(zurl, layout, root, storage_options)
    return ZarrBackend(zurl, "r+", storage_options)


def _metadata_documents(layout: Layout | None, attrs: dict) -> dict[str, bytes]:
    """The metadata files (``zarr.json`` of the root, groups and arrays) of an empty store, built in memory."""
    docs: dict = {}
    mem = zarr.storage.MemoryStore(store_dict=docs)
    group = zarr.create_group(mem, attributes=attrs)
    for spec in layout.specs() if layout is not None else ():
        create_zarr_array(group, spec, layout)
    if layout is not None:
        consolidate(mem)
    return {key: buf.to_bytes() for key, buf in docs.items()}


def _create_remote(url: str, layout: Layout, root: dict, storage_options: dict | None) -> None:
    """Create a store on an object store in three steps (marker, every array's metadata at once, root):
    ~30 sequential round trips of zarr's array-by-array creation become 3."""
    fs, path = url_to_fs(url, storage_options)
    path = path.rstrip("/")
    docs = _metadata_documents(layout, root)
    fs.pipe({f"{path}/zarr.json": _metadata_documents(None, {CREATING: True})["zarr.json"]})
    fs.pipe({f"{path}/{key}": doc for key, doc in docs.items() if key != "zarr.json"})
    fs.pipe({f"{path}/zarr.json": docs["zarr.json"]})
