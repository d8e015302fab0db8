"""``vlcache store import``: bring existing bottom-up (BUTD) region features into a store.

Source formats (``tsv`` from bottom-up-attention's generate_tsv.py and LXMERT, per-image ``npz``, SCAN's
``scan`` arrays) are read by :mod:`.feature_sources`, which documents each layout.

Streaming: a TSV's rows come in arbitrary order, so the import makes two passes. Pass one reads every
line once and keeps only ``id -> (file, byte offset, line number)``; pass two seeks to the rows in
store order, so whole blocks are written one after another and memory stays O(block). ``.npy`` files
are memory-mapped. Source ids are matched to dataset record ids, COCO ids (trailing integers) and image
file stems; unmatched source ids and dataset images without features are counted in the report with
examples (the latter get ``images/error``), never dropped silently or misaligned.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ...pipeline.records import Dataset, ImageRecord
from ...storage.provenance import base_attrs
from ...storage.schema import Capacities, Layout
from ...storage.writer import StoreWriter
from .feature_sources import (FeatureImportError, IdResolver, NpzSource, ScanSource, SourceFeatures, TsvSource,
                              describe_files, find_source_files)
from .rows import RowBuilder, RowOutput

_EXAMPLES = 10

@dataclass
class Tally:
    """How many times something happened, with the first few examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(example)


@dataclass
class ImportReport:
    url: str
    format: str
    source: str
    rows: int = 0  # dataset images = store rows
    source_entries: int = 0  # images found in the source
    matched: int = 0  # dataset images that have features
    written: int = 0  # rows written by this call (a resumed import skips done blocks)
    blocks_written: int = 0
    extra_ids: Tally = field(default_factory=Tally)  # source ids that match no dataset image
    missing: Tally = field(default_factory=Tally)  # dataset images with no features
    duplicates: Tally = field(default_factory=Tally)  # source ids seen twice (the first is kept)
    truncated: Tally = field(default_factory=Tally)  # images with more boxes than the capacity
    hw_mismatch: Tally = field(default_factory=Tally)  # source image size differs from the dataset's
    notes: list[str] = field(default_factory=list)
    complete: bool = False
    seconds: float = 0.0


def format_import_report(report: ImportReport) -> str:
    """A human-readable summary of an import, for the CLI."""
    r = report
    lines = [
        f"imported {r.matched}/{r.rows} dataset images from {r.source} ({r.format}, {r.source_entries} "
        f"source entries) into {r.url} in {r.seconds:.1f}s; rows written now: {r.written} "
        f"({r.blocks_written} blocks); store complete: {r.complete}",
    ]
    for tally, what in [
        (r.extra_ids, "source id(s) match no dataset image (not imported)"),
        (r.missing, "dataset image(s) have no features (images/error = 'no features in ...')"),
        (r.duplicates, "duplicate source id(s) (first occurrence kept)"),
        (r.truncated, "image(s) had more boxes than the region capacity (truncated)"),
        (r.hw_mismatch, "image(s) whose size in the source differs from the dataset's"),
    ]:
        if tally.count:
            more = f", ... ({tally.count - len(tally.examples)} more)" if tally.count > len(tally.examples) else ""
            lines.append(f"  {tally.count} {what}: {', '.join(tally.examples)}{more}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- the import
def _record_hw(dataset: Dataset, rec: ImageRecord) -> tuple[int, int]:
    if rec.height and rec.width:
        return rec.height, rec.width
    try:  # PIL reads only the header
        with Image.open(Path(dataset.image_root) / rec.path) as im:
            return im.height, im.width
    except (OSError, ValueError):
        return 0, 0


def _check_finite(feat: SourceFeatures, where: str) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        f16 = feat.feats.astype(np.float16)
    if not np.isfinite(f16).all():
        raise FeatureImportError(
            f"{where}: features are NaN/inf or outside the float16 range (max |x| = "
            f"{np.nanmax(np.abs(feat.feats)) if feat.feats.size else 0:g}); they cannot be stored as float16"
        )
    if not np.isfinite(feat.boxes).all():
        raise FeatureImportError(f"{where}: boxes contain NaN/inf")
    return f16


def _feature_dim(src, where_of: dict) -> int:
    """D of the first matched image (in row order) that has any boxes; 2048 if none has."""
    for row in sorted(where_of):
        feat, _ = src.read(where_of[row])
        if len(feat.feats):
            return int(feat.feats.shape[1])
    return 2048


def match_source(src, records: list[ImageRecord], report: ImportReport, progress: bool) -> dict:
    """Pass one: ``row -> source locator`` for every dataset image found in ``src``; the rest is reported."""
    resolver, where_of = IdResolver(records), {}
    for sid, loc in src.index(progress):
        report.source_entries += 1
        row = resolver.row(sid)
        if row is None:
            report.extra_ids.add(sid)
        elif row in where_of:
            report.duplicates.add(sid)
        else:
            where_of[row] = loc
    report.matched = len(where_of)
    for i, rec in enumerate(records):
        if i not in where_of:
            report.missing.add(rec.id)
    return where_of


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def import_features(
    dataset: Dataset,
    source,
    url: str,
    *,
    fmt: str = "auto",
    ids_file=None,
    block_size: int = 64,
    regions: int = 36,
    matcher=None,
    classes: list[str] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ImportReport:
    """Write a store (images, captions, regions, and matches when ``matcher`` is given) at ``url`` from
    existing BUTD features at ``source``; resumes an interrupted import of the same source.

    ``regions`` is the per-image capacity (extra boxes are truncated and counted). ``ids_file`` names
    the ids of a single SCAN ``_ims.npy`` (default: the ``{split}_ids.txt`` beside it). ``classes``
    names the source's label ids (e.g. Visual Genome's objects_vocab for LXMERT/cls_prob files); with a
    ``matcher`` its ``class_names`` are used instead, since match labels index them.
    """
    start = time.perf_counter()
    if not dataset.records:
        raise ValueError(f"dataset {dataset.name} has no images")
    if regions < 1:
        raise ValueError(f"regions must be >= 1, got {regions}")
    fmt, files = find_source_files(source, fmt)
    if ids_file is not None and fmt != "scan":
        raise ValueError(f"ids_file is only used by the scan format, not {fmt}")
    src = TsvSource(files) if fmt == "tsv" else NpzSource(files) if fmt == "npz" else ScanSource(files, ids_file)
    report = ImportReport(url=str(url), format=fmt, source=str(source), rows=len(dataset.records))
    records = dataset.records
    try:
        where_of = match_source(src, records, report, progress)
        if not where_of:
            raise FeatureImportError(
                f"none of the {report.source_entries} image ids in {source} match dataset {dataset.name} "
                f"(source ids e.g. {report.extra_ids.examples[:5]}, dataset ids e.g. {[r.id for r in records[:5]]})"
            )
        dim = _feature_dim(src, where_of)
        layout = Layout(
            num_rows=len(records), block_size=block_size,
            capacities=Capacities(captions=max(1, max(len(r.captions) for r in records)), regions=regions,
                                  region_dim=dim),
            groups=("images", "captions", "regions") + (("matches",) if matcher is not None else ()),
        )
        config = {
            "source": "import", "format": fmt, "source_files": describe_files(files), "regions": regions,
            "region_dim": dim, "matches": matcher is not None,
            "boxes": "unavailable (SCAN format)" if fmt == "scan" else "source",
        }
        if fmt == "tsv":
            config["tsv_columns"] = sorted(src.columns)
        if fmt == "scan":
            report.notes.append("boxes unavailable (SCAN format): regions/boxes are zeros")
        if fmt == "npz":
            report.notes.append("npz: region labels and scores come from info['objects_id'] and "
                                "info['objects_conf'] (read with a restricted unpickler); no other info key")
        if matcher is not None and fmt == "tsv" and src.columns - {6}:
            report.notes.append("regions/labels are the source's class ids; attrs.classes are the matcher's")
        names = list(getattr(matcher, "class_names", None) or classes or [])
        attrs = base_attrs(dataset.name, dataset.split_counts(), dataset.sources, config, names,
                           image_root=Path(dataset.image_root).resolve())
        attrs["import_notes"] = list(report.notes)
        _write(dataset, src, where_of, layout, attrs, report, matcher, overwrite, progress)
        if fmt == "npz":
            report.notes += _npz_notes(src)
    finally:
        src.close()
    report.seconds = time.perf_counter() - start
    if any(t.count for t in (report.extra_ids, report.missing, report.duplicates, report.truncated,
                             report.hw_mismatch)):
        _say(format_import_report(report))
    return report


def _npz_notes(src: NpzSource) -> list[str]:
    """What the npz files held that the store does not: info keys, and files without labels."""
    notes = []
    skipped = sorted(src.info_keys - set(NpzSource.IMPORTED_INFO))
    if skipped:
        notes.append(f"npz info keys not imported: {', '.join(skipped)}")
    if src.unlabelled:
        notes.append(f"{src.unlabelled} npz file(s) read without info['objects_id']: their regions have "
                     "labels -1 and scores 0")
    return notes


def _row_output(feat: SourceFeatures, where: str, rec: ImageRecord, layout: Layout, report: ImportReport) -> RowOutput:
    """Check one image's source data (shapes, float16 range, size) and wrap it for the RowBuilder."""
    dim, n = layout.capacities.region_dim, len(feat.feats)
    if n != len(feat.boxes):
        raise FeatureImportError(f"{where}: {len(feat.boxes)} boxes but {n} feature rows")
    if n and feat.feats.shape[1] != dim:
        raise FeatureImportError(f"{where}: features are {feat.feats.shape[1]}-d, other images' are {dim}-d")
    f16 = _check_finite(feat, where) if n else np.zeros((0, dim), np.float16)
    if n > layout.capacities.regions:
        report.truncated.add(f"{rec.id} ({n} boxes)")
    known = (rec.height, rec.width) if rec.height and rec.width else None
    if feat.hw is not None and known is not None and tuple(feat.hw) != known:
        report.hw_mismatch.add(f"{rec.id} (source {feat.hw}, dataset {known})")
    return RowOutput(
        reg_boxes=feat.boxes,
        reg_labels=feat.labels if feat.labels is not None else np.full(n, -1, np.int16),
        reg_scores=feat.scores if feat.scores is not None else np.zeros(n, np.float32),
        reg_feats=f16,
    )


def _write(dataset, src, where_of, layout, attrs, report, matcher, overwrite, progress) -> None:
    """Pass two: rows of the pending blocks in store order, each block written once all its rows are in."""
    records = dataset.records
    writer = StoreWriter(report.url, layout, attrs, overwrite=overwrite)
    try:
        builder = RowBuilder(layout, records, matcher)
        pending = writer.pending_blocks()  # all blocks, or those an interrupted import left undone
        with tqdm(total=sum(len(layout.block_rows(b)) for b in pending), unit="img", desc="import",
                  disable=not progress, dynamic_ncols=True) as bar:
            for block in pending:
                for row in layout.block_rows(block):
                    rec = records[row]
                    if row not in where_of:
                        builder.add_error(row, f"no features in {report.source} for image id {rec.id}")
                    else:
                        feat, where = src.read(where_of[row])
                        out = _row_output(feat, where, rec, layout, report)
                        builder.add(row, feat.hw or _record_hw(dataset, rec), out)
                    bar.update(1)
                for b, arrays in builder.pop_finished_blocks():
                    writer.write_block(b, arrays)
                    report.blocks_written += 1
                    report.written += len(layout.block_rows(b))
        report.complete = writer.finalize()
    finally:
        writer.close()
