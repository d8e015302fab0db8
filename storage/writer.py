"""StoreWriter: block-aligned, resumable, multi-process writing of one store.

Protocol (what makes a SIGKILL at any moment harmless):

* A block's arrays are written first, ``images/done`` for its rows last; a block that was already done
  gets ``done = 0`` before it is rewritten. Readers treat rows that are not done as absent, so a kill
  loses at most the blocks in flight and never leaves a half-written row that looks finished.
* Rank ``r`` of ``W`` owns blocks ``r, r+W, ...`` (:meth:`Layout.blocks_of_rank`): writers never touch
  the same chunk, so no locks are needed while writing.
* Only rank 0 creates (or, with ``overwrite=True``, recreates) the store; other ranks wait until it is
  there. Creation writes a marker attribute first and the real attributes last, so a creation that was
  killed half-way is recognised and redone. ``overwrite=True`` is refused on ranks other than 0: a
  store recreated under a rank that is already writing would lose its rows, so the caller recreates on
  rank 0 alone (then e.g. ``dist.barrier()``) before the other ranks open it.
* :meth:`StoreWriter.finalize` marks the store complete once every block of every rank is done (safe to
  call from every rank). HDF5 stores are written through a staging Zarr directory and packed into one
  file at that point; an exclusive ``flock`` on the staging directory makes exactly one process pack.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .backends import (
    Backend,
    HDF5Backend,
    ZarrBackend,
    backend_kind,
    check_writable_url,
    create_backend,
    local_path,
    pack_hdf5,
    remote_errors,
    staging_url,
    to_jsonable,
    zarr_store_exists,
)
from .errors import (
    ConfigMismatchError,
    ReadOnlyStoreError,
    StoreBeingCreatedError,
    StoreError,
    StoreNotFoundError,
)
from .fingerprint import array_digests, combine
from .schema import DONE, STR, ArraySpec, Layout

_CREATING = object()  # sentinel: a store whose creation is in progress or was interrupted


def done_mask(backend: Backend) -> np.ndarray:
    """(N,) bool: which rows are done (written completely)."""
    return np.asarray(backend.read(DONE, slice(None))) != 0


def _flatten(d, prefix=""):
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flatten(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def diff_keys(stored: dict, given: dict) -> list[str]:
    """Dotted keys whose values differ between two nested dicts, with both values."""
    a, b = _flatten(stored or {}), _flatten(given or {})
    missing = object()

    def show(v):
        return "<missing>" if v is missing else repr(v)

    return [
        f"{k} (stored {show(a.get(k, missing))}, given {show(b.get(k, missing))})"
        for k in sorted(set(a) | set(b))
        if a.get(k, missing) != b.get(k, missing)
    ]


class StoreWriter:
    """Writes blocks of one store; rank ``rank`` of ``world_size`` owns every ``world_size``-th block."""

    def __init__(
        self,
        url,
        layout: Layout | None = None,
        attrs: dict | None = None,
        *,
        rank: int = 0,
        world_size: int = 1,
        overwrite: bool = False,
        storage_options: dict | None = None,
        hdf5_compression: str = "gzip",
        wait_timeout: float = 600.0,
        poll_interval: float = 0.05,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if overwrite and rank != 0:
            raise ValueError(
                "overwrite=True is only allowed on rank 0: recreate the store there, then open it on the "
                "other ranks (e.g. after dist.barrier())"
            )
        if hdf5_compression not in ("gzip", "lzf"):
            raise ValueError(f"hdf5_compression must be 'gzip' or 'lzf', got {hdf5_compression!r}")
        self.url = os.fspath(url) if isinstance(url, os.PathLike) else str(url)
        self.kind = backend_kind(self.url)
        self.rank, self.world_size = rank, world_size
        self.storage_options = storage_options
        self.hdf5_compression = hdf5_compression
        self._write_url = staging_url(self.url) if self.kind == "hdf5" else self.url
        self._attrs = None if attrs is None else to_jsonable(attrs)
        self._given_layout = layout
        self._repack = False  # an unpacked HDF5 file being redone (reopen): finalize packs over the old file
        check_writable_url(self.url)
        with remote_errors(self.url):  # missing credentials: one clear line, not a boto traceback
            if rank == 0:
                self.backend = self._open_or_create(layout, overwrite)
            else:
                self.backend = self._wait_for_store(wait_timeout, poll_interval)
        self.layout: Layout = self.backend.layout  # the store's own layout (also when resuming)
        self._owned = set(self.layout.blocks_of_rank(rank, world_size))

    # ------------------------------------------------------------------ opening
    def _existing(self):
        """The store as it is now: a Backend, None (absent) or _CREATING."""
        if self.kind == "hdf5" and os.path.exists(local_path(self.url)):
            shutil.rmtree(local_path(self._write_url), ignore_errors=True)  # left by a kill after packing
            return HDF5Backend(self.url, "r", self.storage_options)
        if not zarr_store_exists(self._write_url, self.storage_options):
            return None
        try:
            probe = ZarrBackend(self._write_url, "r", self.storage_options)
        except StoreBeingCreatedError:
            return _CREATING
        if probe.attr("complete"):
            return probe
        probe.close()
        return ZarrBackend(self._write_url, "r+", self.storage_options)

    def _open_or_create(self, layout: Layout | None, overwrite: bool) -> Backend:
        existing = None if overwrite else self._existing()
        if isinstance(existing, Backend):
            self._check_matches(existing)
            return existing
        if layout is None:
            raise StoreNotFoundError(f"store {self.url} does not exist; pass layout= and attrs= to create it")
        replace = overwrite or existing is _CREATING  # an interrupted creation is simply redone
        return create_backend(
            self.url, layout, self._attrs or {}, overwrite=replace, storage_options=self.storage_options
        )

    def _wait_for_store(self, timeout: float, poll: float) -> Backend:
        deadline = time.monotonic() + timeout
        while True:
            try:
                existing = self._existing()
            except StoreNotFoundError:  # vanished between two looks: rank 0 is (re)creating it
                existing = None
            if isinstance(existing, Backend):
                try:
                    self._check_matches(existing)
                    return existing
                except ConfigMismatchError:
                    existing.close()  # rank 0 may be recreating it right now
                    if time.monotonic() > deadline:
                        raise
            elif time.monotonic() > deadline:
                raise StoreNotFoundError(
                    f"rank {self.rank}: store {self.url} was not created within {timeout:.0f}s (rank 0 creates it)"
                )
            time.sleep(poll)

    def _check_matches(self, backend: Backend) -> None:
        stored = backend.attrs()
        problems = []
        if self._attrs is not None and "config" in self._attrs:
            problems += diff_keys(stored.get("config"), self._attrs["config"])
        if self._given_layout is not None:
            problems += ["layout." + p for p in diff_keys(stored["layout"], self._given_layout.to_attrs())]
        if problems:
            raise ConfigMismatchError(
                f"store {self.url} was created with a different configuration; differing keys: "
                + "; ".join(problems[:10])
                + ("; ..." if len(problems) > 10 else "")
                + ". Pass overwrite=True (`--overwrite` on the command line) to recreate it, or write to another url."
            )

    # ------------------------------------------------------------------ state
    @property
    def complete(self) -> bool:
        """Whether the opened store is marked complete (finalized); a staging store never is."""
        return bool(self.backend.attr("complete"))

    def _packed_elsewhere(self) -> bool:
        """An HDF5 store another rank has packed meanwhile (its staging store is gone): adopt the file."""
        if (self.kind == "hdf5" and not self._repack and not isinstance(self.backend, HDF5Backend)
                and os.path.exists(local_path(self.url))):
            self._adopt_hdf5()
            return True
        return False

    def pending_blocks(self) -> list[int]:
        """Blocks owned by this rank whose rows are not all done, in order."""
        if self.complete or self._packed_elsewhere():
            return []
        done = done_mask(self.backend)
        return [
            b for b in sorted(self._owned)
            if not done[self.layout.block_rows(b).start : self.layout.block_rows(b).stop].all()
        ]

    def is_complete(self) -> bool:
        """True once the store is finalized or every row of every rank is done."""
        return self.complete or self._packed_elsewhere() or bool(done_mask(self.backend).all())

    def reopen(self) -> None:
        """Make a complete store writable again (``complete`` False), so that rows can be redone
        (``vlcache extract --retry-errors``); :meth:`finalize` marks it complete again, with a new fingerprint.

        A packed HDF5 file is never written in place (a kill mid-write can corrupt one): it is unpacked into
        its staging Zarr directory, the rows are redone there, and :meth:`finalize` packs a new file that
        replaces the old one atomically. Until then the old file is untouched; a kill leaves it as it was
        (and the next open deletes the staging directory)."""
        if not self.complete:
            return
        if self.kind == "hdf5":
            self._unpack_hdf5()
            return
        self.backend.close()
        self.backend = ZarrBackend(self.url, "r+", self.storage_options, force=True)
        self.backend.update_attrs(complete=False)

    def _unpack_hdf5(self) -> None:
        if self.world_size > 1:  # every rank would unpack (and repack) the whole file
            raise ReadOnlyStoreError(f"store {self.url} is a packed HDF5 file: redo its rows in one process "
                                     "(without torchrun)")
        packed = self.backend
        own = ("format", "schema_version", "layout", "complete", "store_id")
        attrs = {k: v for k, v in packed.attrs().items() if k not in own}
        staging = create_backend(self._write_url, self.layout, attrs, overwrite=True,
                                 storage_options=self.storage_options)
        staging.update_attrs(store_id=packed.attr("store_id"))  # the same store, some rows redone
        for path in sorted(packed.arrays(), key=lambda p: p == DONE):  # done flags last, as in write_block
            for b in range(self.layout.num_blocks):
                staging.write_rows(path, self.layout.block_rows(b).start, packed.read_block(path, b))
        packed.close()
        self.backend = staging
        self._repack = True

    # ------------------------------------------------------------------ writing
    def write_block(self, block: int, arrays: dict[str, np.ndarray]) -> None:
        """Write every array of ``block`` (missing ones as padding), then its ``done`` flags last."""
        if block not in self._owned:
            owner = block % self.world_size if 0 <= block < self.layout.num_blocks else None
            raise ValueError(
                f"store {self.url}: block {block} is not owned by rank {self.rank} of {self.world_size}"
                + (f" (rank {owner} owns it)" if owner is not None else f" (only {self.layout.num_blocks} blocks)")
            )
        if self.complete or self._packed_elsewhere() or self.backend.mode != "r+":
            raise ReadOnlyStoreError(f"store {self.url} is complete; it cannot be written (block {block})")
        rows = self.layout.block_rows(block)
        specs = [s for s in self.layout.specs() if s.path != DONE]
        unknown = set(arrays) - {s.path for s in specs}
        if unknown:
            hint = " (images/done is written by the writer)" if DONE in unknown else ""
            raise KeyError(f"store {self.url} block {block}: unknown arrays {sorted(unknown)}{hint}")
        where = f"store {self.url} block {block} (rows {rows.start}..{rows.stop - 1})"
        prepared = [
            (s, coerce_rows(s, arrays[s.path], len(rows), where) if s.path in arrays else s.empty_rows(len(rows)))
            for s in specs
        ]  # validate everything before writing anything
        if self.backend.read_block(DONE, block).any():
            self.backend.write_rows(DONE, rows.start, np.zeros(len(rows), np.uint8))
        for spec, data in prepared:
            self.backend.write_rows(spec.path, rows.start, data)
        self.backend.write_rows(DONE, rows.start, np.ones(len(rows), np.uint8))

    # ------------------------------------------------------------------ finishing
    def finalize(self, extra_attrs: dict | None = None) -> bool:
        """Mark the store complete if every block of every rank is done; returns whether it is complete.

        Safe to call from every rank. ``extra_attrs`` (e.g. statistics) are merged into the root attributes,
        with the content ``fingerprint`` (computed by reading the store once, unless ``extra_attrs`` gives it).
        For HDF5 this packs the staging store into the final file.
        """
        if self.complete or self._packed_elsewhere():
            return True
        if not done_mask(self.backend).all():
            return self._packed_elsewhere()  # its staging may have been packed while we read it
        extra = to_jsonable(extra_attrs or {}, "extra_attrs")
        if self.kind == "zarr":
            if not extra.get("fingerprint"):
                extra["fingerprint"] = self._fingerprint(extra)
            self.backend.update_attrs(**extra, complete=True)
            self.backend.close()
            self.backend = ZarrBackend(self.url, "r", self.storage_options)
            return True
        self._pack_once({**extra, "complete": True})
        return True

    def _pack_once(self, attrs: dict) -> None:
        staging, target = local_path(self._write_url), local_path(self.url)
        try:
            fd = os.open(staging, os.O_RDONLY)
        except FileNotFoundError:
            if os.path.exists(target):
                return self._adopt_hdf5()
            raise StoreError(f"store {self.url}: staging directory {staging} vanished before packing") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, also when a packer is killed
            if self._repack or not os.path.exists(target):  # nobody packed while we waited for the lock
                for leftover in Path(target).parent.glob(Path(target).name + ".tmp-*"):
                    leftover.unlink()  # from a packer that was killed (we hold the lock: nobody else packs)
                attrs = {**attrs, "fingerprint": attrs.get("fingerprint") or self._fingerprint(attrs)}
                pack_hdf5(self.backend, target, self.hdf5_compression, attrs)  # replaces a repacked file atomically
                self._repack = False
        finally:
            os.close(fd)
        self._adopt_hdf5()

    def _fingerprint(self, extra: dict) -> str:
        """The content fingerprint recorded at finalize (reads the store once; see storage/fingerprint.py)."""
        return combine({**self.backend.attrs(), **extra}, array_digests(self.backend))

    def _adopt_hdf5(self) -> None:
        self.backend.close()
        shutil.rmtree(local_path(self._write_url), ignore_errors=True)
        self.backend = HDF5Backend(self.url, "r", self.storage_options)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def coerce_rows(spec: ArraySpec, data, n: int, where: str) -> np.ndarray:
    """Check one array's rows for a block (shape, dtype, finiteness) and cast them to the schema dtype."""
    name = f"{where}: array '{spec.path}'"
    if spec.dtype == STR:
        arr = np.asarray(data, dtype=object)
        bad = next((x for x in arr.ravel() if not isinstance(x, str)), None)
        if bad is not None:
            raise TypeError(f"{name} must hold str, found {type(bad).__name__} {bad!r}")
    else:
        arr = np.asarray(data)
        target = np.dtype(spec.dtype)
        src = arr.dtype
        ok = src == target or (src.kind == "b") or (src.kind in "iu" and target.kind in "iuf") or (
            src.kind == "f" and target.kind == "f"
        )
        if not ok:
            raise TypeError(f"{name} has dtype {src}, expected {target}")
        if src.kind in "iu" and target.kind in "iu" and arr.size:
            info = np.iinfo(target)
            if arr.min() < info.min or arr.max() > info.max:
                raise ValueError(f"{name} has values outside the {target} range [{info.min}, {info.max}]")
        with np.errstate(over="ignore"):
            arr = arr.astype(target, copy=False)
        if target.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad_rows = np.unique(np.nonzero(~np.isfinite(arr.reshape(len(arr), -1)))[0])
            raise ValueError(
                f"{name} has non-finite values (NaN/inf, or too large for {target}) in block rows "
                f"{bad_rows[:5].tolist()}; nothing was written"
            )
    expected = (n, *spec.row_shape)
    if arr.shape != expected:
        raise ValueError(f"{name} has shape {arr.shape}, expected {expected}")
    return arr
