"""``verify(url)``: read every chunk of a store and list all damage; ``info(url)``: what a store holds.

Both work on zarr and HDF5 stores, local or remote, and on an HDF5 store that is still being written
(they then look at its staging directory). Neither imports torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from tqdm.auto import tqdm

from .backends import Backend, backend_kind, is_local, local_path, open_backend, redact_url, staging_url
from .errors import CorruptChunkError, StoreError, StoreNotFoundError
from .fingerprint import compute_fingerprint
from .schema import DONE, SPLITS, STR

MAX_ERRORS_SHOWN = 5


class DamagedChunk(NamedTuple):
    """One damaged chunk; unpacks as ``(array, chunk, reason)``."""

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

    describe = summary
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


def verify(url, storage_options: dict | None = None, *, progress: bool = False) -> VerifyReport:
    """Read every chunk of every array; collect every damaged or missing chunk (never stop at the first).

    ``progress`` shows a tqdm bar over the chunks (for the CLI).
    """
    url = os.fspath(url)
    backend, staging = _open_any(url, storage_options)
    with backend, tqdm(total=len(backend.layout.specs()) * backend.layout.num_blocks, unit="chunk",
                       desc="verify", disable=not progress) as bar:
        lay = backend.layout
        report = VerifyReport(url=redact_url(url if staging is None else staging), kind=backend.kind)
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
                bar.update(1)
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
            "url": redact_url(url),
            "kind": backend_kind(url),
            "state": "complete" if attrs.get("complete") else "writing" if staging else "incomplete",
            "staging": staging,
            "format": attrs.get("format"),
            "schema_version": attrs.get("schema_version"),
            "store_id": attrs.get("store_id"),
            # recorded at finalize; computed (one full read) for a complete store written before fingerprints
            "fingerprint": attrs.get("fingerprint")
            or (_computed_fingerprint(backend) if attrs.get("complete") else None),
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
            "matches": _match_statistics(backend, done) if "matches" in lay.groups else None,
            "statistics": attrs.get("statistics"),
        }


def _computed_fingerprint(backend: Backend) -> str | None:
    try:
        return compute_fingerprint(backend)
    except StoreError:  # damaged or missing chunks: verify reports them; info still answers
        return None


def _match_statistics(backend: Backend, done: np.ndarray) -> dict:
    """Matches per real caption of done rows (METHODS.md section 2): distinct matched classes ("critical
    objects") and matched spans, and the fraction of captions with a match."""
    n_caps = _safe_read(backend, "captions/count", np.zeros(len(done), np.uint8)).astype(np.int64)
    labels = _safe_read(backend, "matches/label", None)
    C = labels.shape[1]
    real = done[:, None] & (np.arange(C)[None, :] < n_caps[:, None])  # (N, C) captions that exist
    lab = labels[real]  # (captions, K); -1 = padding
    spans = (lab >= 0).sum(1)
    srt = np.sort(lab, axis=1)  # padding (-1) first; a class counts once where it differs from its left
    first = np.concatenate([np.ones((len(srt), 1), bool), srt[:, 1:] != srt[:, :-1]], 1)
    distinct = ((srt >= 0) & first).sum(1)
    n = len(lab)
    return {
        "captions": int(n),
        "mean_matched_objects_per_caption": float(distinct.mean()) if n else 0.0,
        "mean_matched_words_per_caption": float(spans.mean()) if n else 0.0,
        "captions_with_match": float((spans > 0).mean()) if n else 0.0,
        **_top_matched_words(backend, done, n_caps),
    }


def _top_matched_words(backend: Backend, done: np.ndarray, n_caps: np.ndarray, max_rows: int = 5000,
                       top: int = 10) -> dict:
    """The most frequent matched words, counted over the first ``max_rows`` done rows (strings are slow
    to read on big stores; the sample size is reported)."""
    rows = np.flatnonzero(done)[:max_rows]
    if not len(rows) or not backend.has("matches/span"):
        return {"top_words": [], "top_words_rows": 0}
    tokens = backend.read("captions/tokens", rows)
    spans = backend.read("matches/span", rows)
    counts = backend.read("matches/count", rows)
    words: dict[str, int] = {}
    for k in range(len(rows)):
        for c in range(int(n_caps[rows[k]])):
            toks = str(tokens[k, c]).split()
            for j in range(int(counts[k, c])):
                w = " ".join(toks[spans[k, c, j, 0]:spans[k, c, j, 1]])
                words[w] = words.get(w, 0) + 1
    ranked = sorted(words.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return {"top_words": [[w, c] for w, c in ranked], "top_words_rows": int(len(rows))}


def format_info(data: dict) -> str:
    """``info()`` as readable lines (the CLI's ``vlcache store info``)."""

    def size(b):
        for unit in ("B", "KiB", "MiB", "GiB"):
            if b < 1024 or unit == "GiB":
                return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
            b /= 1024

    rows, blocks = data["rows"], data["blocks"]
    lines = [
        f"store      {data['url']} ({data['kind']}, schema v{data['schema_version']}, {data['state']})",
        f"fingerprint {data.get('fingerprint') or '(recorded when the store is finalized)'}",
        f"dataset    {data['dataset']}  created {data['created']}",
        f"rows       {rows['done']}/{rows['total']} done, {rows['with_errors']} with errors",
        f"blocks     {blocks['done']}/{blocks['total']} done (block size {blocks['block_size']})",
        f"splits     {data['splits']}  done: {data['done_per_split']}",
        f"groups     {', '.join(data['groups'])}",
        f"capacities {data['capacities']}",
        f"size       {size(data['size_bytes'])}  ("
        + ", ".join(f"{g} {size(b)}" for g, b in sorted(data["group_bytes"].items())) + ")",
    ]
    if data.get("staging"):
        lines.append(f"staging    {data['staging']}")
    if data.get("matches"):
        m = data["matches"]
        lines.append(
            f"matches    {m['mean_matched_objects_per_caption']:.2f} objects, "
            f"{m['mean_matched_words_per_caption']:.2f} words per caption; "
            f"{100 * m['captions_with_match']:.0f}% of {m['captions']} captions have a match"
        )
        if m.get("top_words"):
            lines.append(f"top words  " + ", ".join(f"{w} ({c})" for w, c in m["top_words"])
                         + f"  (first {m['top_words_rows']} rows)")
    lines += [f"error      {e}" for e in data["first_errors"]]
    lines.append("config     " + json.dumps(data["config"], sort_keys=True))
    return "\n".join(lines)


def _safe_read(backend: Backend, path: str, fallback: np.ndarray | None) -> np.ndarray:
    """Whole array, damaged chunks replaced by ``fallback`` (default: padding), so info still reports."""
    try:
        return backend.read(path, slice(None))
    except CorruptChunkError:
        out = backend.spec(path).empty_rows(backend.layout.num_rows) if fallback is None else fallback.copy()
        for b in range(backend.layout.num_blocks):
            try:
                out[_block_slice(backend.layout, b)] = backend.read_block(path, b)
            except CorruptChunkError:
                pass
        return out
