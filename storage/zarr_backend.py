"""The Zarr v3 backend: a group in a local directory or at any fsspec URL.

Codecs per array: ``bytes`` (``vlen-utf8`` for strings) -> ``zstd`` -> ``crc32c``, so every chunk carries
a checksum. Root attributes and every array's metadata are consolidated into the root ``zarr.json``
whenever they change, and stores are opened as Zarr v3 with consolidated metadata: opening a remote
store is one GET (no probing for Zarr v2 files, no request per array).
"""

from __future__ import annotations

import json
import os
import warnings

import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, VLenUTF8Codec, ZstdCodec

from .base import (
    CREATING,
    Backend,
    is_local,
    local_path,
    protocol,
    redact_url,
    storage_options_for,
    to_jsonable,
    url_to_fs,
)
from .errors import StoreError, StoreNotFoundError
from .schema import FORMAT_NAME, STR, ArraySpec, Layout

# vlcache relies on consolidated metadata (one request to open a remote store) on purpose; zarr warns on
# every consolidation that v3 has not standardised it yet. Filtered once globally (zarr warns from its
# event-loop thread) and again around each call, for callers such as pytest that reset the filters.
_CONSOLIDATED_NOTICE = "Consolidated metadata is currently not part"
warnings.filterwarnings("ignore", message=_CONSOLIDATED_NOTICE, category=UserWarning)
_NO_LISTING = ("http", "https")  # filesystems that cannot list a prefix: probe chunk keys instead


def consolidate(store) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_CONSOLIDATED_NOTICE, category=UserWarning)
        zarr.consolidate_metadata(store)


def zarr_store(url: str, read_only: bool, storage_options: dict | None):
    if is_local(url):
        return zarr.storage.LocalStore(local_path(url), read_only=read_only)
    return zarr.storage.FsspecStore.from_url(
        url, storage_options=storage_options_for(url, storage_options) or None, read_only=read_only
    )


def open_group(store, mode: str):
    """Open the root group from its consolidated metadata (one read); a group being created has none yet."""
    try:
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=True)
    except ValueError as e:
        if isinstance(e, zarr.errors.NodeNotFoundError) or "Consolidated metadata" not in str(e):
            raise
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def chunk_key(path: str, block: int, row_ndim: int) -> str:
    """Storage key of the chunk holding ``block`` of an array with ``row_ndim`` axes after the row axis
    (Zarr v3 default key encoding: ``<path>/c/<block>/0/...``)."""
    return f"{path}/c/{block}" + "/0" * row_ndim


class ZarrBackend(Backend):
    kind = "zarr"

    def _open(self):
        if is_local(self.url) and not os.path.isdir(local_path(self.url)):
            raise StoreNotFoundError(f"no vlcache store at {self.url} (no such directory)")
        self._arrays: dict[str, zarr.Array] = {}
        try:
            self._store = zarr_store(self.url, self.mode == "r", self.storage_options)
            self._group = open_group(self._store, self.mode)
        except zarr.errors.NodeNotFoundError:
            raise StoreNotFoundError(
                f"no vlcache store at {redact_url(self.url)} (no Zarr v3 group there: zarr.json not found)"
            ) from None
        except (FileNotFoundError, NotADirectoryError, zarr.errors.BaseZarrError) as e:
            raise StoreNotFoundError(f"no vlcache store at {redact_url(self.url)} ({type(e).__name__}: {e})") from e

    def _close_handle(self):
        self._arrays = {}
        self._group = None
        self._store.close()

    def _load_attrs(self) -> dict:
        return to_jsonable(self._group.attrs.asdict())

    def _raw_put_attrs(self, attrs: dict):
        self._group.attrs.put(attrs)
        consolidate(self._store)
        self._group = open_group(self._store, self.mode)
        self._arrays = {}

    def _raw_arrays(self) -> list[str]:
        return [name for name, node in self._group.members(max_depth=None) if isinstance(node, zarr.Array)]

    def _array(self, path: str) -> zarr.Array:
        a = self._arrays.get(path)
        if a is None:
            try:
                a = self._group[path]
            except KeyError:
                raise StoreError(f"store {redact_url(self.url)} has no array {path!r}") from None
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

    def chunk_key(self, path: str, block: int) -> str:
        """Storage key (relative to the store root) of ``path``'s chunk for ``block``."""
        return chunk_key(path, block, len(self.spec(path).row_shape))

    def stored_blocks(self, path: str) -> set[int]:
        """Blocks of ``path`` that have a chunk object in storage (one listing request; one HEAD per block
        on HTTP, which cannot list)."""
        self._ensure_open()
        fs, root = url_to_fs(self.url, self.storage_options)
        root = root.rstrip("/")
        if protocol(self.url) in _NO_LISTING:
            return {b for b in range(self.layout.num_blocks) if fs.exists(f"{root}/{self.chunk_key(path, b)}")}
        prefix = f"{root}/{path}/c/"
        names = (k[len(prefix):].split("/")[0] for k in fs.find(prefix) if k.startswith(prefix))
        # a writer killed mid-chunk leaves Zarr's temporary '<block>.<uuid>.partial' file: not a chunk
        return {int(name) for name in names if name.isdigit()}

    def stored_bytes(self) -> dict[str, int]:
        """Bytes in storage per array (chunks and metadata), plus '' for the root metadata."""
        self._ensure_open()
        fs, root = url_to_fs(self.url, self.storage_options)
        root = root.rstrip("/") + "/"
        if protocol(self.url) in _NO_LISTING:
            sizes = self._probed_sizes(fs, root)
        else:
            sizes = fs.du(root, total=False)
        out: dict[str, int] = {}
        arrays = sorted(self._raw_arrays(), key=len, reverse=True)
        for key, size in sizes.items():
            rel = key[len(root):] if key.startswith(root) else key
            owner = next((a for a in arrays if rel.startswith(a + "/")), "")
            out[owner] = out.get(owner, 0) + int(size)
        return out

    def _probed_sizes(self, fs, root: str) -> dict[str, int]:
        """Sizes of the root metadata and every chunk, one request each (for filesystems without listing)."""
        keys = ["zarr.json"] + [self.chunk_key(p, b) for p in self._raw_arrays() for b in range(self.layout.num_blocks)]
        out = {}
        for key in keys:
            try:
                out[root + key] = int(fs.size(root + key) or 0)
            except FileNotFoundError:
                continue
        return out


def create_zarr_array(group, spec: ArraySpec, layout: Layout) -> None:
    # Schema v2: float16 feature arrays (the bulk of a store) are stored raw, then crc32c: LZ4 saved ~2%
    # on them (post-ReLU features have little byte-level redundancy) and its decoding was the reader's
    # bottleneck; raw chunks are memory-mapped by the streaming fast path (storage/chunks.py). The rest
    # (masks, strings, boxes) compresses well with zstd. Every chunk ends with a crc32c checksum.
    compressors = [Crc32cCodec()] if spec.dtype == "float16" else [ZstdCodec(level=3), Crc32cCodec()]
    kw = dict(
        shape=(layout.num_rows, *spec.row_shape),
        chunks=(layout.block_size, *(max(1, d) for d in spec.row_shape)),
        compressors=compressors,
    )
    if spec.dtype == STR:
        group.create_array(spec.path, dtype=str, serializer=VLenUTF8Codec(), fill_value="", **kw)
    else:
        group.create_array(spec.path, dtype=spec.dtype, serializer=BytesCodec(), fill_value=spec.fill, **kw)


def zarr_store_exists(url: str, storage_options: dict | None = None) -> bool:
    """Whether ``url`` holds a zarr group (finished or not)."""
    fs, path = url_to_fs(url, storage_options)
    return fs.exists(path.rstrip("/") + "/zarr.json")


def ours_zarr(fs, path: str) -> bool:
    """Whether ``path`` holds a vlcache zarr store (finished, or one whose creation was interrupted)."""
    try:
        attrs = json.loads(fs.cat(path.rstrip("/") + "/zarr.json")).get("attributes", {})
    except (FileNotFoundError, ValueError):
        return False
    return attrs.get("format") == FORMAT_NAME or bool(attrs.get(CREATING))
