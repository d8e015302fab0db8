"""``verify(url)``: read every chunk of a store and list all damage; ``info(url)``: what a store holds.

Both work on zarr and HDF5 stores, local or remote, and on an HDF5 store that is still being written
(they then look at its staging directory). Neither imports torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from .backends import Backend, backend_kind, is_local, local_path, open_backend, staging_url
from .errors import CorruptChunkError, StoreNotFoundError
from .schema import DONE, SPLITS, STR

MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class DamagedChunk:
    array: str
    chunk: tuple[int, ...]
    reason: str

    def __str__(self):
        return f"array '{self.array}' chunk {self.chunk}: {self.reason}"


@dataclass
class VerifyReport:
    url: str
    kind: str
    arrays_checked: int = 0
    chunks_checked: int = 0
    damaged: list[DamagedChunk] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # store-level findings (missing arrays, ...)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.problems

    def summary(self) -> str:
        head = (
            f"store {self.url} ({self.kind}): {self.arrays_checked} arrays, {self.chunks_checked} chunks read — "
            + ("OK" if self.ok else f"{len(self.damaged)} damaged chunks, {len(self.problems)} problems")
        )
        return "\n".join([head, *(f"  damaged: {d}" for d in self.damaged), *(f"  problem: {p}" for p in self.problems)])

    __str__ = summary


def _open_any(url: str, storage_options: dict | None) -> tuple[Backend, str | None]:
    """Open ``url``; an HDF5 store still being written is opened through its staging directory."""
    try:
        return open_backend(url, "r", storage_options), None
    except StoreNotFoundError:
        staging = staging_url(url)
        if backend_kind(url) == "hdf5" and is_local(url) and os.path.isdir(local_path(staging)):
            return open_backend(staging, "r", storage_options), staging
        raise


def _block_slice(layout, block: int) -> slice:
    r = layout.block_rows(block)
    return slice(r.start, r.stop)


def verify(url, storage_options: dict | None = None) -> VerifyReport:
    """Read every chunk of every array; collect every damaged or missing chunk (never stop at the first)."""
    url = os.fspath(url)
    backend, staging = _open_any(url, storage_options)
    with backend:
        lay = backend.layout
        report = VerifyReport(url=url if staging is None else staging, kind=backend.kind)
        present = set(backend.arrays())
        done = np.zeros(lay.num_rows, dtype=bool)
        specs = [s for s in lay.specs() if s.path == DONE] + [s for s in lay.specs() if s.path != DONE]
        for spec in specs:  # done first: it decides which missing chunks are damage
            if spec.path not in present:
                report.problems.append(f"array '{spec.path}' is missing")
                continue
            expected = (lay.num_rows, *spec.row_shape)
            if backend.shape(spec.path) != expected:
                report.problems.append(f"array '{spec.path}' has shape {backend.shape(spec.path)}, expected {expected}")
                continue
            report.arrays_checked += 1
            stored = backend.stored_blocks(spec.path)
            chunk0 = (0,) * len(spec.row_shape)
            for block in range(lay.num_blocks):
                rows = _block_slice(lay, block)
                report.chunks_checked += 1
                try:
                    data = backend.read_block(spec.path, block)
                except CorruptChunkError as e:
                    report.damaged.append(DamagedChunk(spec.path, e.chunk, e.reason))
                    continue
                if spec.path == DONE:
                    done[rows] = data != 0
                if block not in stored and done[rows].any():
                    report.damaged.append(DamagedChunk(spec.path, (block, *chunk0), "is missing (its rows are done)"))
                elif spec.dtype != STR and np.dtype(spec.dtype).kind == "f" and not np.isfinite(data).all():
                    report.damaged.append(DamagedChunk(spec.path, (block, *chunk0), "holds NaN/inf values"))
        extra = sorted(present - {s.path for s in lay.specs()})
        if extra:
            report.problems.append(f"arrays not in the schema: {extra}")
        if backend.attr("complete") and not done.all():
            report.problems.append(f"store is marked complete but {int((~done).sum())} rows are not done")
    return report


def info(url, storage_options: dict | None = None) -> dict:
    """A JSON-able summary: provenance, config, counts per split, progress, errors, sizes, capacities."""
    url = os.fspath(url)
    backend, staging = _open_any(url, storage_options)
    with backend:
        attrs = backend.attrs()
        lay = backend.layout
        done = _safe_read(backend, DONE, np.zeros(lay.num_rows, np.uint8)) != 0
        split = _safe_read(backend, "images/split", np.full(lay.num_rows, 255, np.uint8))
        errors = _safe_read(backend, "images/error", np.full(lay.num_rows, "", dtype=object))
        ids = _safe_read(backend, "images/id", np.full(lay.num_rows, "", dtype=object))
        bad = np.nonzero(done & (errors != ""))[0]
        blocks_done = sum(bool(done[_block_slice(lay, b)].all()) for b in range(lay.num_blocks))
        sizes = backend.stored_bytes()
        groups: dict[str, int] = {}
        for path, nbytes in sizes.items():
            g = path.split("/", 1)[0] if path else "(metadata)"
            groups[g] = groups.get(g, 0) + nbytes
        return {
            "url": url,
            "kind": backend_kind(url),
            "state": "complete" if attrs.get("complete") else "writing" if staging else "incomplete",
            "staging": staging,
            "format": attrs.get("format"),
            "schema_version": attrs.get("schema_version"),
            "store_id": attrs.get("store_id"),
            "dataset": attrs.get("dataset"),
            "created": attrs.get("created"),
            "software": attrs.get("software"),
            "sources": attrs.get("sources"),
            "config": attrs.get("config"),
            "num_classes": None if attrs.get("classes") is None else len(attrs["classes"]),
            "complete": bool(attrs.get("complete")),
            "splits": attrs.get("splits"),
            "done_per_split": {s: int((done & (split == i)).sum()) for i, s in enumerate(SPLITS)},
            "rows": {"total": lay.num_rows, "done": int(done.sum()), "with_errors": int(len(bad))},
            "blocks": {"total": lay.num_blocks, "done": blocks_done, "block_size": lay.block_size},
            "first_errors": [f"{ids[i] or f'row {i}'}: {errors[i]}" for i in bad[:MAX_ERRORS_SHOWN]],
            "size_bytes": int(sum(sizes.values())),
            "group_bytes": groups,
            "groups": list(lay.groups),
            "capacities": dataclasses.asdict(lay.capacities),
        }


def _safe_read(backend: Backend, path: str, fallback: np.ndarray) -> np.ndarray:
    """Whole array, or ``fallback`` where a chunk is damaged (info still reports; verify names the chunk)."""
    try:
        return backend.read(path, slice(None))
    except CorruptChunkError:
        out = fallback.copy()
        for b in range(backend.layout.num_blocks):
            try:
                out[_block_slice(backend.layout, b)] = backend.read_block(path, b)
            except CorruptChunkError:
                pass
        return out
