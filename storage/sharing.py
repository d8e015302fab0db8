"""Sharing stores between teammates: :func:`copy_store` between any two locations, :func:`diff_stores`.

``copy_store`` copies block by block (one block = one chunk of every array) from any store — local,
``s3://``, ``gs://``, ``https://``, Zarr or HDF5 — to any writable location, through the same
:class:`StoreWriter` protocol extraction uses: a block's arrays first, its ``done`` flags last. So a copy
killed at any moment leaves a normal resumable store, and rerunning the copy transfers only the blocks
that are not done. Every block is read back from the destination after it is written and compared with
the source (decoded values, byte for byte), and the destination's fingerprint is computed from what
arrived. A complete destination is never overwritten unless ``force=True``.

``diff_stores`` (:mod:`.diff`) and ``fingerprint`` (:mod:`.fingerprint`) are re-exported here: the three
things a teammate needs to share a store and check that two copies are the same.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .backends import (
    CREATING,
    Backend,
    HDF5Backend,
    StoreAccessError,
    ZarrBackend,
    backend_kind,
    check_writable_url,
    is_local,
    local_path,
    open_backend,
    redact_url,
    remote_errors,
    staging_url,
    url_to_fs,
)
from .errors import StoreBeingCreatedError, StoreError, StoreNotFoundError
from .diff import DiffReport, diff_stores  # noqa: F401 - part of the sharing API
from .fingerprint import array_digest, block_digest, canonical_bytes, combine, compute_fingerprint
from .fingerprint import fingerprint  # noqa: F401 - part of the sharing API
from .provenance import utc_now
from .schema import DONE
from .writer import StoreWriter, done_mask

__all__ = ["copy_store", "CopyReport", "CopyVerifyError", "diff_stores", "DiffReport", "fingerprint"]

# Attributes a copy gets from its destination's creation, never from the source.
_OWN_ATTRS = ("format", "schema_version", "layout", "complete", "store_id", CREATING, "fingerprint", "copied_from")


class CopyVerifyError(StoreError):
    """A block read back from the destination differs from the source."""


@dataclass
class CopyReport:
    src: str
    dst: str
    blocks_total: int
    blocks_copied: int = 0
    blocks_already_done: int = 0  # done in the destination before this run (a resumed copy)
    blocks_not_in_source: int = 0  # not done in the source (an unfinished source): not copied
    bytes_copied: int = 0  # decoded bytes of the copied blocks
    complete: bool = False
    fingerprint: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        state = f"complete, fingerprint {self.fingerprint}" if self.complete else "incomplete (rerun to resume)"
        lines = [
            f"copied {self.src} -> {self.dst}: {self.blocks_copied}/{self.blocks_total} blocks copied, "
            f"{self.blocks_already_done} already there, {self.blocks_not_in_source} not done in the source; "
            f"{self.bytes_copied / 2**20:.1f} MiB in {self.seconds:.1f}s; {state}"
        ]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    __str__ = summary


# ------------------------------------------------------------------------------------------------ copy
def copy_store(src, dst, *, force: bool = False, progress: bool = True, storage_options_src: dict | None = None,
               storage_options_dst: dict | None = None, hdf5_compression: str = "gzip",
               workers: int = 4) -> CopyReport:
    """Copy the store at ``src`` to ``dst`` (any two locations, Zarr or HDF5 by ``dst``'s suffix).

    ``workers`` blocks are copied at once (threads; object stores are latency-bound).
    Resumable: rerunning after an interruption copies only blocks not done in ``dst``. Only done blocks of
    the source are copied; a complete source gives a complete, finalized destination. Raises
    :class:`StoreError` (one line, nothing changed) when ``dst`` is a complete store and ``force`` is
    False, when ``dst`` holds an unfinished copy of another store, or on bad input.
    """
    src, dst = _url(src), _url(dst)
    if _same_location(src, dst):
        raise StoreError(f"source and destination are the same store: {redact_url(src)}")
    check_writable_url(dst)
    start = time.perf_counter()
    with open_backend(src, "r", storage_options_src) as source:
        if backend_kind(dst) == "hdf5" and not is_local(dst):
            report = _copy_to_remote_hdf5(source, src, dst, force, progress, storage_options_dst,
                                          hdf5_compression, workers)
        else:
            report = _copy(source, src, dst, force, progress, storage_options_dst, hdf5_compression, workers)
    report.seconds = time.perf_counter() - start
    return report


def _copy(source: Backend, src: str, dst: str, force: bool, progress: bool, so_dst: dict | None,
          compression: str, workers: int) -> CopyReport:
    overwrite = _check_destination(source, src, dst, force, so_dst)
    lay = source.layout
    src_fp = source.attr("fingerprint")
    attrs = {k: v for k, v in source.attrs().items() if k not in _OWN_ATTRS}
    attrs["copied_from"] = {"url": redact_url(src), "store_id": source.attr("store_id"), "fingerprint": src_fp,
                            "time": utc_now()}
    report = CopyReport(src=redact_url(src), dst=redact_url(dst), blocks_total=lay.num_blocks)
    with StoreWriter(dst, lay, attrs, overwrite=overwrite, storage_options=so_dst,
                     hdf5_compression=compression) as writer:
        if writer.complete:  # completed by a concurrent copy since _check_destination looked
            report.blocks_already_done, report.complete = lay.num_blocks, True
            report.fingerprint = writer.backend.attr("fingerprint")
            return report
        src_done = np.asarray(source.read(DONE, slice(None))) != 0
        pending = set(writer.pending_blocks())
        specs = lay.specs()
        todo = [b for b in range(lay.num_blocks) if src_done[_rows(lay, b)].all()]
        report.blocks_not_in_source = lay.num_blocks - len(todo)

        def one(b: int):
            """Copy (and check) block ``b``, or read it back if an earlier run copied it; its digests."""
            if b in pending:
                arrays = {s.path: source.read_block(s.path, b) for s in specs if s.path != DONE}
                writer.write_block(b, arrays)
                _check_arrived(writer.backend, b, arrays, dst)
            else:
                arrays = {s.path: writer.backend.read_block(s.path, b) for s in specs if s.path != DONE}
            n = len(lay.block_rows(b))
            arrays[DONE] = np.ones(n, np.uint8)
            digest = {s.path: block_digest(s, arrays[s.path], np.ones(n, bool)) for s in specs}
            return b, sum(a.nbytes for a in arrays.values() if a.dtype != object), digest

        digests: dict[str, dict[int, bytes]] = {s.path: {} for s in specs}
        with tqdm(total=len(todo), unit="block", desc=f"copy -> {redact_url(dst)}", disable=not progress) as bar:
            for b, nbytes, digest in _in_order(one, todo, workers):
                if b in pending:
                    report.blocks_copied += 1
                    report.bytes_copied += nbytes
                else:
                    report.blocks_already_done += 1
                for path, d in digest.items():
                    digests[path][b] = d
                bar.update(1)
        if report.blocks_not_in_source or not done_mask(writer.backend).all():
            report.notes.append("the source is not complete: rerun the copy once it is, to finish the destination")
            return report
        content = {p: array_digest([d[b] for b in sorted(d)]) for p, d in digests.items()}
        fp = combine(writer.backend.attrs(), content)
        report.complete = writer.finalize({"fingerprint": fp})
        if isinstance(writer.backend, HDF5Backend):  # packed from the verified staging store: check the file
            packed = compute_fingerprint(writer.backend)
            if packed != fp:
                raise CopyVerifyError(f"{redact_url(dst)}: the packed HDF5 file has fingerprint {packed}, its "
                                      f"verified staging store {fp}; remove it and copy again")
        report.fingerprint = fp
        src_version, dst_version = source.attr("schema_version"), writer.backend.attr("schema_version")
        if src_version != dst_version:  # the fingerprint covers the schema version: an upgrade changes it
            report.notes.append(f"upgraded from schema v{src_version} to v{dst_version}; the copy's fingerprint "
                                f"{fp} replaces the source's {src_fp}")
        src_content = combine(source.attrs(), content)  # what the source's own fingerprint should be
        if src_fp and src_fp != src_content:
            report.notes.append(f"the source records fingerprint {src_fp} but its content hashes to {src_content}: the "
                                "source was modified after it was finalized")
    return report


def _rows(lay, b: int) -> slice:
    r = lay.block_rows(b)
    return slice(r.start, r.stop)


def _in_order(fn, items: list, workers: int):
    """``fn(item)`` for every item on ``workers`` threads (object stores are latency-bound: several blocks
    in flight hide it), results yielded in order, at most ``2 * workers`` pending at once."""
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="vlcache-copy")
    pending: deque = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _check_arrived(backend: Backend, block: int, arrays: dict[str, np.ndarray], dst: str) -> None:
    """Read ``block`` back from the destination; on any difference un-done it (so a rerun redoes it), raise."""
    for path, want in arrays.items():
        spec = backend.spec(path)
        got = backend.read_block(path, block)
        if got.shape != want.shape or canonical_bytes(spec, got) != canonical_bytes(spec, want):
            rows = backend.layout.block_rows(block)
            backend.write_rows(DONE, rows.start, np.zeros(len(rows), np.uint8))
            raise CopyVerifyError(f"{redact_url(dst)}: block {block} of '{path}' differs from the source after "
                                  "writing it; the block was marked not done, rerun the copy")


def _check_destination(source: Backend, src: str, dst: str, force: bool, so_dst: dict | None) -> bool:
    """Whether the writer must recreate ``dst`` (``overwrite``); raises where ``dst`` must not be touched."""
    try:
        existing = _open_destination(dst, so_dst)
    except StoreBeingCreatedError:
        return False  # an interrupted creation: the writer redoes it
    except StoreNotFoundError:
        return False
    except StoreAccessError:
        raise
    except StoreError as e:
        if force:
            return True
        raise StoreError(f"destination {redact_url(dst)} cannot be resumed ({e}); pass force=True to replace it"
                         ) from None
    if existing is None:
        return False
    with existing:
        if existing.attr("complete"):
            if not force:
                raise StoreError(f"destination {redact_url(dst)} is a complete store (fingerprint "
                                 f"{existing.attr('fingerprint')}); pass force=True (--force) to overwrite it")
            return True
        origin = existing.attr("copied_from") or {}
        if origin.get("store_id") != source.attr("store_id"):
            if not force:
                raise StoreError(
                    f"destination {redact_url(dst)} holds an unfinished store that is not a copy of "
                    f"{redact_url(src)}; pass force=True (--force) to replace it"
                )
            return True
    return False


def _open_destination(dst: str, so: dict | None) -> Backend | None:
    if backend_kind(dst) == "hdf5":
        if os.path.exists(local_path(dst)):
            return HDF5Backend(dst, "r", so)
        if os.path.isdir(local_path(staging_url(dst))):
            return ZarrBackend(staging_url(dst), "r", so)
        return None
    return open_backend(dst, "r", so)


def _copy_to_remote_hdf5(source: Backend, src: str, dst: str, force: bool, progress: bool, so_dst: dict | None,
                         compression: str, workers: int) -> CopyReport:
    """An HDF5 file is written locally (resumable, in the temp dir) and uploaded in one PUT once complete."""
    fs, path = url_to_fs(dst, so_dst)
    with remote_errors(dst):
        if fs.exists(path) and not force:
            raise StoreError(f"destination {redact_url(dst)} exists; pass force=True (--force) to overwrite it")
    tag = hashlib.sha1(redact_url(dst).encode()).hexdigest()[:12]
    local = Path(tempfile.gettempdir()) / f"vlcache-copy-{os.getuid()}-{tag}" / Path(path).name
    local.parent.mkdir(parents=True, exist_ok=True)
    if local.exists():  # packed by a run killed before its upload: reuse it if it is a copy of this source
        with HDF5Backend(str(local), "r") as prev:
            reuse = (prev.attr("copied_from") or {}).get("store_id") == source.attr("store_id")
            fp = prev.attr("fingerprint")
        if not reuse:
            local.unlink()
    if local.exists():
        report = CopyReport(src=redact_url(src), dst=redact_url(dst), blocks_total=source.layout.num_blocks,
                            blocks_already_done=source.layout.num_blocks, complete=True, fingerprint=fp)
    else:
        # force: the temp copy is ours; a leftover of another source is replaced, a matching one resumed
        report = _copy(source, src, str(local), True, progress, None, compression, workers)
    report.dst = redact_url(dst)
    if report.complete:
        with remote_errors(dst):
            fs.put_file(str(local), path)
            if fs.size(path) != local.stat().st_size:
                raise CopyVerifyError(f"{redact_url(dst)}: uploaded size differs from the local file {local}")
        local.unlink()
        local.parent.rmdir()
    else:
        report.notes.append(f"the HDF5 file is uploaded once complete; partial copy kept in {local.parent}")
    return report


def _url(u) -> str:
    return os.fspath(u) if isinstance(u, os.PathLike) else str(u)


def _same_location(a: str, b: str) -> bool:
    def norm(u):
        return os.path.abspath(local_path(u)) if is_local(u) else redact_url(u).rstrip("/")

    return norm(a) == norm(b)
