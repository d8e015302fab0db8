"""A store's fingerprint: a short hash of what it holds, equal for every copy of the same data.

``fingerprint = sha256(canonical JSON of format, schema_version, layout, config, classes
                        + for each schema array, in schema order: path + sha256(sha256 of each block's rows))``
shortened to 16 hex digits (block digests make it computable in any block order, e.g. while copying).
Rows are hashed *decoded*, in a canonical form (numbers little-endian in the schema dtype; strings as
UTF-8 with a length prefix), so a Zarr store and its HDF5 copy — different codecs, different chunk
bytes — have the same fingerprint. Rows that are not done are hashed as padding
(an interrupted write may have left anything there), and ``images/done`` itself is hashed, so a partial
store differs from its finished self.

Writers record it in ``attrs["fingerprint"]`` when they finalize; training runs record it in their
config; ``store info`` prints it. :func:`fingerprint` returns the recorded value, computing it for
stores that have none.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from tqdm.auto import tqdm

from .base import Backend, redact_url
from .errors import StoreError
from .schema import DONE, STR, ArraySpec

FINGERPRINT_KEYS = ("format", "schema_version", "layout", "config", "classes")
HEX_DIGITS = 16


def canonical_bytes(spec: ArraySpec, data: np.ndarray) -> bytes:
    """Rows of ``spec`` as bytes independent of the backend that stored them."""
    if spec.dtype == STR:
        parts = []
        for s in np.asarray(data, dtype=object).ravel():
            b = str(s).encode("utf-8")
            parts.append(len(b).to_bytes(8, "little") + b)
        return b"".join(parts)
    dtype = np.dtype(spec.dtype).newbyteorder("<")
    return np.ascontiguousarray(np.asarray(data), dtype=dtype).tobytes()


def mask_not_done(spec: ArraySpec, data: np.ndarray, done: np.ndarray) -> np.ndarray:
    """``data`` with the rows whose ``done`` is False replaced by padding (their content is not data)."""
    if spec.path == DONE or done.all():
        return data
    data = np.array(data, copy=True)
    data[~done] = spec.empty_rows(int((~done).sum()))
    return data


def block_digest(spec: ArraySpec, data: np.ndarray, done: np.ndarray) -> bytes:
    """sha256 of one block of ``spec``'s rows, rows not done counted as padding."""
    return hashlib.sha256(canonical_bytes(spec, mask_not_done(spec, data, done))).digest()


def array_digest(block_digests: list[bytes]) -> str:
    return hashlib.sha256(b"".join(block_digests)).hexdigest()


def header_digest(attrs: dict) -> str:
    head = {k: attrs.get(k) for k in FINGERPRINT_KEYS}
    return hashlib.sha256(json.dumps(head, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def combine(attrs: dict, array_digests: dict[str, str]) -> str:
    """The fingerprint from the store's attributes and per-array content digests (in schema order)."""
    h = hashlib.sha256(header_digest(attrs).encode())
    for path, digest in array_digests.items():
        h.update(f"\n{path}:{digest}".encode())
    return h.hexdigest()[:HEX_DIGITS]


def array_digests(backend: Backend, *, progress: bool = False) -> dict[str, str]:
    """Digest of every schema array's canonical rows, block by block (reads the whole store once)."""
    lay = backend.layout
    present = set(backend.arrays())
    missing = [s.path for s in lay.specs() if s.path not in present]
    if missing:
        raise StoreError(f"store {redact_url(backend.url)} lacks arrays {missing}; run `vlcache store verify`")
    done = np.asarray(backend.read(DONE, slice(None))) != 0
    out = {}
    with tqdm(total=len(lay.specs()) * lay.num_blocks, unit="chunk", desc="fingerprint",
              disable=not progress) as bar:
        for spec in lay.specs():
            blocks = []
            for block in range(lay.num_blocks):
                rows = lay.block_rows(block)
                blocks.append(block_digest(spec, backend.read_block(spec.path, block), done[rows.start:rows.stop]))
                bar.update(1)
            out[spec.path] = array_digest(blocks)
    return out


def compute_fingerprint(backend: Backend, *, progress: bool = False) -> str:
    """The fingerprint of an opened store, from its content (ignores a recorded one)."""
    return combine(backend.attrs(), array_digests(backend, progress=progress))


def fingerprint(url, storage_options: dict | None = None, *, recompute: bool = False, progress: bool = False) -> str:
    """The store's recorded fingerprint (``attrs["fingerprint"]``), or one computed from its content.

    ``url`` may also be an opened :class:`Backend`. ``recompute=True`` ignores the recorded value.
    """
    from .backends import open_backend

    if isinstance(url, Backend):
        return _fingerprint_of(url, recompute, progress)
    with open_backend(os.fspath(url), "r", storage_options) as backend:
        return _fingerprint_of(backend, recompute, progress)


def _fingerprint_of(backend: Backend, recompute: bool, progress: bool) -> str:
    recorded = backend.attr("fingerprint")
    if recorded and not recompute:
        return str(recorded)
    return compute_fingerprint(backend, progress=progress)
