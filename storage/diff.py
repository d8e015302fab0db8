"""``diff_stores(a, b)``: do two stores hold the same thing? Schema, config, classes, rows (image ids in
order, done flags), and for every array how many rows differ (floats compared bit for bit); plus both
content fingerprints (:mod:`.fingerprint`). Stores may be in any location and either backend.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .backends import CREATING, Backend, open_backend, redact_url
from .errors import StoreError
from .fingerprint import array_digest, block_digest, combine, compute_fingerprint
from .schema import DONE
from .writer import diff_keys

# Attributes that tell stores apart without being content: who made this copy, and its identity.
_IDENTITY_ATTRS = ("format", "schema_version", "layout", "complete", "store_id", CREATING, "fingerprint",
                   "copied_from")


@dataclass
class DiffReport:
    a: str
    b: str
    schema: list[str] = field(default_factory=list)  # format / schema version / layout differences
    config: list[str] = field(default_factory=list)  # dotted config keys that differ
    classes_same: bool = True
    rows_same: bool = True  # same number of rows and the same image ids in the same order
    ids_differ: int = 0
    done_differ: int = 0  # rows done in one store only
    arrays: dict[str, int] = field(default_factory=dict)  # array -> rows (done in both) whose values differ
    missing: list[str] = field(default_factory=list)  # arrays only one store has / shapes that differ
    attrs: list[str] = field(default_factory=list)  # other root attributes that differ (informational)
    fingerprint_a: str | None = None
    fingerprint_b: str | None = None

    @property
    def identical(self) -> bool:
        """Same schema, config, classes, rows and array values (provenance attributes may differ)."""
        return (not self.schema and not self.config and self.classes_same and self.rows_same
                and not self.done_differ and not self.missing and not any(self.arrays.values()))

    def summary(self) -> str:
        lines = [f"a: {self.a}  (fingerprint {self.fingerprint_a})", f"b: {self.b}  (fingerprint {self.fingerprint_b})"]
        lines.append("IDENTICAL content" if self.identical else "DIFFERENT")
        lines.append("schema   " + ("same" if not self.schema else "; ".join(self.schema)))
        lines.append("config   " + ("same" if not self.config else "; ".join(self.config[:10])))
        lines.append("classes  " + ("same" if self.classes_same else "differ"))
        lines.append("rows     " + ("same ids in the same order" if self.rows_same else
                                    f"differ ({self.ids_differ} rows with another image id)")
                     + (f"; {self.done_differ} rows done in one store only" if self.done_differ else ""))
        differing = {p: n for p, n in self.arrays.items() if n}
        lines.append("arrays   " + ("all equal" if not differing else
                                    ", ".join(f"{p}: {n} rows differ" for p, n in differing.items())))
        lines += [f"missing  {m}" for m in self.missing]
        if self.attrs:
            lines.append("attrs    differ (provenance only): " + ", ".join(self.attrs))
        return "\n".join(lines)

    __str__ = summary


def diff_stores(a, b, *, storage_options_a: dict | None = None, storage_options_b: dict | None = None,
                progress: bool = False) -> DiffReport:
    """Compare two stores (any locations and backends) value by value; reads both once."""
    a, b = (os.fspath(u) if isinstance(u, os.PathLike) else str(u) for u in (a, b))
    with open_backend(a, "r", storage_options_a) as A, open_backend(b, "r", storage_options_b) as B:
        return _diff(A, B, progress)


def _diff(A: Backend, B: Backend, progress: bool) -> DiffReport:
    rep = DiffReport(a=redact_url(A.url), b=redact_url(B.url))
    aa, ba = A.attrs(), B.attrs()
    for key in ("format", "schema_version"):
        if aa.get(key) != ba.get(key):
            rep.schema.append(f"{key} {aa.get(key)!r} != {ba.get(key)!r}")
    rep.schema += ["layout." + d for d in diff_keys(aa.get("layout"), ba.get("layout"))]
    rep.config = diff_keys(aa.get("config"), ba.get("config"))
    rep.classes_same = aa.get("classes") == ba.get("classes")
    skip = set(_IDENTITY_ATTRS) | {"config", "classes"}
    rep.attrs = sorted(k for k in set(aa) | set(ba) if k not in skip and aa.get(k) != ba.get(k))

    la, lb = A.layout, B.layout
    n = la.num_rows
    if n != lb.num_rows:
        rep.rows_same = False
        rep.fingerprint_a, rep.fingerprint_b = _fp(A), _fp(B)
        return rep
    same_blocks = la.block_size == lb.block_size and not rep.schema
    done_a = np.asarray(A.read(DONE, slice(None))) != 0
    done_b = np.asarray(B.read(DONE, slice(None))) != 0
    rep.done_differ = int((done_a != done_b).sum())
    both = done_a & done_b
    present_a, present_b = set(A.arrays()), set(B.arrays())
    specs_b = {s.path: s for s in lb.specs()}
    digests_a: dict[str, list[bytes]] = {}
    digests_b: dict[str, list[bytes]] = {}
    todo = [s for s in la.specs()]
    rep.missing += [f"'{p}' only in b" for p in specs_b if p not in {s.path for s in todo} and p in present_b]
    bar = tqdm(total=len(todo) * la.num_blocks, unit="chunk", desc="diff", disable=not progress)
    for spec in todo:
        if spec.path not in present_a or spec.path not in present_b:
            rep.missing.append(f"'{spec.path}' only in {'a' if spec.path in present_a else 'b'}")
            continue
        if A.shape(spec.path) != B.shape(spec.path) or specs_b.get(spec.path) != spec:
            rep.missing.append(f"'{spec.path}' has shape {A.shape(spec.path)} in a, {B.shape(spec.path)} in b")
            continue
        differ = 0
        for blk in range(la.num_blocks):
            r = la.block_rows(blk)
            sl = slice(r.start, r.stop)
            xa, xb = A.read(spec.path, sl), B.read(spec.path, sl)
            differ += int((_row_differs(spec, xa, xb) & both[sl]).sum())
            if same_blocks:
                digests_a.setdefault(spec.path, []).append(block_digest(spec, xa, done_a[sl]))
                digests_b.setdefault(spec.path, []).append(block_digest(spec, xb, done_b[sl]))
            bar.update(1)
        rep.arrays[spec.path] = differ
    bar.close()
    id_spec = A.spec("images/id")
    ids_differ = _row_differs(id_spec, A.read(id_spec.path, slice(None)), B.read(id_spec.path, slice(None)))
    rep.ids_differ = int((ids_differ & (done_a | done_b)).sum())
    rep.rows_same = rep.ids_differ == 0
    complete = [s.path for s in la.specs()]
    if same_blocks and all(p in digests_a for p in complete):
        rep.fingerprint_a = combine(aa, {p: array_digest(digests_a[p]) for p in complete})
        rep.fingerprint_b = combine(ba, {p: array_digest(digests_b[p]) for p in complete})
    else:
        rep.fingerprint_a, rep.fingerprint_b = _fp(A), _fp(B)
    return rep


def _row_differs(spec, xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
    """(rows,) bool: rows whose values differ (floats compared bit for bit)."""
    if xa.dtype == object or xb.dtype == object:
        neq = np.asarray(xa, dtype=object) != np.asarray(xb, dtype=object)
    else:
        dt = np.dtype(spec.dtype)
        va = np.ascontiguousarray(xa, dtype=dt).view(np.uint8)
        vb = np.ascontiguousarray(xb, dtype=dt).view(np.uint8)
        neq = va != vb
    return np.asarray(neq).reshape(len(xa), -1).any(axis=1)


def _fp(backend: Backend) -> str | None:
    try:
        return compute_fingerprint(backend)
    except StoreError:
        return None
