"""The extraction loop: decode in DataLoader workers, batched forward, post-process, write in a thread.

Three things overlap: image decoding (DataLoader worker processes), model compute (this thread) and
store writes (a writer thread fed through a bounded queue). A block is handed to the writer only
when all its rows are in, so the store only ever receives whole blocks (DESIGN.md principle 3).
Resume is automatic: only the blocks this rank owns and that are not done are processed.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...pipeline import dataset_files
from ...pipeline.config import ConfigError, to_dict
from ...pipeline.records import Dataset, ImageRecord
from ...pipeline.signals import Terminated, ignore_stop_signals, sigterm_as_interrupt
from ...storage.provenance import base_attrs
from ...storage.schema import Capacities, Layout
from ...storage.writer import StoreWriter, done_mask
from .config import ExtractConfig
from .detectors import ImageDataError
from ...storage.images import BadImageError, load_image
from .models import build_models
from .rows import RowBuilder


@dataclass
class ExtractSummary:
    url: str
    rows: int
    blocks_written: int
    images_done: int
    seconds: float
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    complete: bool = False
    error_rows: int = 0  # rows of the store (done) whose image failed, from this run or an earlier one
    setup_seconds: float = 0.0  # building models and opening/creating the store, before the first image
    # seconds by part of the loop: main thread waiting for decoded images (decode_wait), in the models
    # (detector, backbone, post), building rows (rows), waiting for the writer (write_wait); the writer
    # thread's busy time (writer, overlapped with the rest); finalize
    timings: dict = field(default_factory=dict)

    @property
    def loop_seconds(self) -> float:
        """Time spent on images: decoding, models, writing and finalizing (setup excluded)."""
        return max(self.seconds - self.setup_seconds, 0.0)

    @property
    def images_per_second(self) -> float:
        return self.images_done / self.loop_seconds if self.loop_seconds > 0 else 0.0

    def describe(self) -> str:
        if self.images_done or self.bad_images:
            first = (f"extracted {self.images_done} images in {self.seconds:.1f}s ({self.setup_seconds:.1f}s loading "
                     f"models and opening the store, then {self.images_per_second:.2f} img/s) into {self.url}")
        else:  # a rerun of a finished extraction: say so, not "0.00 img/s"
            first = (f"extracted 0 images: every row of {self.url} was already done ({self.seconds:.1f}s); "
                     "--retry-errors redoes failed rows, --overwrite starts over")
        lines = [first, f"store complete: {self.complete}"]
        if self.bad_images:
            lines.append(f"{len(self.bad_images)} bad image(s) recorded in images/error:")
            lines += [f"  {p}: {r}" for p, r in self.bad_images[:20]]
            if len(self.bad_images) > 20:
                lines.append(f"  ... and {len(self.bad_images) - 20} more (vlcache store info lists them)")
        if self.error_rows:
            lines.append(f"{self.error_rows} row(s) of the store hold a failed image (images/error): fix the images "
                         "(or --image-root) and rerun with --retry-errors to redo only those rows")
        return "\n".join(lines)


class StrictModeError(RuntimeError):
    pass


def select_records(dataset: Dataset, cfg: ExtractConfig) -> list[ImageRecord]:
    return dataset_files.select_records(dataset, cfg.split, cfg.limit)


def content_config(cfg: ExtractConfig) -> dict:
    """The part of the config that decides the store's content (compared on resume)."""
    data = to_dict(cfg)
    data.pop("runtime")
    if data["detector"]["backend"] == "detectron2":
        data["detector"].pop("arch")  # torchvision's; detectron2 records its own config (models.detector)
    return data


class _DecodeDataset(torch.utils.data.Dataset):
    """Rows -> decoded RGB arrays, in DataLoader workers. Bad images become error strings."""

    def __init__(self, rows: list[int], records: list[ImageRecord], image_root: Path):
        self.rows, self.records, self.image_root = rows, records, Path(image_root)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        row = self.rows[k]
        path = self.image_root / self.records[row].path
        try:
            return row, load_image(path), ""
        except BadImageError as e:
            return row, None, e.reason


def _collate(items):
    return items


def extraction_layout(records: list[ImageRecord], cfg: ExtractConfig, dims: dict) -> Layout:
    f = cfg.features
    regions = f.fixed_regions if f.region_mode == "fixed" else f.max_regions
    cap = Capacities(
        captions=max(1, max(len(r.captions) for r in records)),
        instances=cfg.detector.max_instances,
        regions=regions,
        region_dim=dims.get("region_dim", 2048),
        grid_size=f.grid_size,
        grid_dim=dims.get("grid_dim", 2048),
    )
    # a dataset smaller than one block gets one block of its own size: a chunk is stored whole, padding too
    return Layout(num_rows=len(records), block_size=min(cfg.block_size, len(records)), capacities=cap,
                  groups=("images", "captions", *cfg.groups))


def dist_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def extract(dataset: Dataset, url: str, cfg: ExtractConfig, *, overwrite: bool = False,
            rank: int | None = None, world_size: int | None = None, progress: bool = True,
            class_words: str | Path | None = None, retry_errors: bool = False) -> ExtractSummary:
    """Run stage one over ``dataset`` into the store at ``url`` (created, or resumed).

    ``retry_errors``: also redo the done rows whose image failed (``images/error``), e.g. after fixing the
    image root; the other rows of their blocks are written back unchanged. A complete store is reopened for it
    and finalized again (new fingerprint); a packed HDF5 file is redone in its staging directory and repacked
    (:meth:`StoreWriter.reopen`). Ctrl-C stops after the blocks already handed to the writer
    and raises ``KeyboardInterrupt`` saying how many rows are done.
    """
    if rank is None or world_size is None:
        rank, world_size = dist_rank()
    if overwrite and world_size > 1:  # rank 0 would delete the store while the others open or write it
        raise ConfigError(f"--overwrite with {world_size} ranks would race: delete {url} first, then start the "
                          "ranks without --overwrite (they create it afresh)")
    start = time.perf_counter()
    records = select_records(dataset, cfg)
    dataset_files.check_image_root(dataset.image_root, records[: cfg.block_size])  # before building or writing
    models = build_models(cfg, dataset, class_words=class_words)
    layout = extraction_layout(records, cfg, models.dims)
    attrs = base_attrs(
        dataset_name=dataset.name,
        splits=_split_counts(records),
        sources=dataset.sources,
        config=content_config(cfg),
        classes=models.class_names,
        image_root=Path(dataset.image_root).resolve(),
    )
    attrs["models"] = models.describe()
    writer = StoreWriter(url, layout, attrs, rank=rank, world_size=world_size, overwrite=overwrite)
    pending = writer.pending_blocks()
    builder = RowBuilder(layout, records, models.matcher)
    retry = _failed_rows(writer, rank, world_size, pending) if retry_errors else {}
    if retry:
        dataset_files.check_image_root(dataset.image_root, [records[r] for r in retry[min(retry)]])
        writer.reopen()
        writer.backend.update_attrs(image_root=str(Path(dataset.image_root).resolve()))
        for block, redo in retry.items():
            builder.keep(block, {p: writer.backend.read_block(p, block) for p in builder.specs}, redo)
    rows = sorted([r for b in pending for r in layout.block_rows(b)] + [r for redo in retry.values() for r in redo])
    summary = ExtractSummary(url=str(url), rows=layout.num_rows, blocks_written=0, images_done=0, seconds=0.0)

    write_queue: queue.Queue = queue.Queue(maxsize=2)
    write_error: list[BaseException] = []
    timings = dict.fromkeys(("decode_wait", "rows", "write_wait", "writer", "finalize"), 0.0)

    def write_loop():
        while True:
            item = write_queue.get()
            if item is None:
                return
            block, arrays = item
            try:
                t = time.perf_counter()
                writer.write_block(block, arrays)
                timings["writer"] += time.perf_counter() - t
                summary.blocks_written += 1
            except BaseException as e:  # surfaced in the main thread
                write_error.append(e)
                return

    def record_bad(row: int, reason: str) -> None:
        path = str(Path(dataset.image_root) / records[row].path)
        if cfg.runtime.strict:
            raise StrictModeError(f"bad image {path}: {reason} (--strict stops at the first one)")
        summary.bad_images.append((path, reason))
        builder.add_error(row, reason)

    thread = threading.Thread(target=write_loop, name="vlcache-writer", daemon=True)
    thread.start()
    summary.setup_seconds = time.perf_counter() - start
    loader = DataLoader(
        _DecodeDataset(rows, records, dataset.image_root),
        batch_size=cfg.runtime.batch_size,
        num_workers=cfg.runtime.num_workers,
        collate_fn=_collate,
        worker_init_fn=ignore_stop_signals,  # the main process stops them (pipeline/signals.py)
        persistent_workers=False,
    )
    bar = tqdm(total=len(rows), desc=f"extract r{rank}/{world_size}", unit="img", disable=not progress,
               dynamic_ncols=True)
    with sigterm_as_interrupt():  # a scheduler's SIGTERM stops like Ctrl-C (pipeline/signals.py)
        interrupted = None  # the KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM) that stopped the loop
        try:
            t_prev = time.perf_counter()
            for batch in loader:
                t_batch = time.perf_counter()
                timings["decode_wait"] += t_batch - t_prev
                if write_error:
                    raise write_error[0]
                good = [(row, img) for row, img, err in batch if img is not None]
                for row, img, err in batch:
                    if img is None:
                        record_bad(row, err)
                failed: dict[int, str] = {}
                if good:
                    outputs, failed = _run_isolating(models, [img for _, img in good], [records[row] for row, _ in good])
                    t_rows = time.perf_counter()
                    for k, ((row, img), out) in enumerate(zip(good, outputs)):
                        if out is not None:
                            builder.add(row, img.shape[:2], out)
                        else:
                            record_bad(row, failed[k])
                    timings["rows"] += time.perf_counter() - t_rows
                t_put = time.perf_counter()
                for block, arrays in builder.pop_finished_blocks():
                    _put(write_queue, (block, arrays), write_error)
                timings["write_wait"] += time.perf_counter() - t_put
                summary.images_done += len(good) - len(failed)
                bar.update(len(batch))
                t_prev = time.perf_counter()
            timings["decode_wait"] += time.perf_counter() - t_prev  # the end of the epoch: workers shut down
        except KeyboardInterrupt as e:
            interrupted = e  # the blocks already queued are whole: write them, then say where we are
            if write_queue.qsize():
                what = "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"
                print(f"\n{what}: writing the {write_queue.qsize()} finished block(s) already queued, then stopping "
                      f"({what} again stops at once; those blocks are redone on resume)", file=sys.stderr, flush=True)
        finally:
            bar.close()
            t_drain = time.perf_counter()
            _stop_writer(write_queue, thread)  # blocks already queued are whole: they are still written
            timings["write_wait"] += time.perf_counter() - t_drain
        if write_error:
            raise write_error[0]
        if interrupted is not None:
            done = int(done_mask(writer.backend).sum())
            writer.close()
            how = "terminated (SIGTERM)" if isinstance(interrupted, Terminated) else "interrupted"
            raise type(interrupted)(f"{how}: {done} of {layout.num_rows} rows of {url} are done")
    t_fin = time.perf_counter()
    summary.complete = writer.finalize()
    summary.error_rows = _count_failed(writer)
    writer.close()
    timings["finalize"] = time.perf_counter() - t_fin
    summary.timings = {**timings, **models.seconds}
    summary.seconds = time.perf_counter() - start
    return summary


def _run_isolating(models, images: list, records: list) -> tuple[list, dict[int, str]]:
    """``models.run`` on a batch; when one image's own data is wrong (:class:`ImageDataError`, e.g. annotations
    for another size), rerun image by image so only that image fails. Returns the outputs (None where an
    image failed) and {batch index: reason}."""
    try:
        return models.run(images, records), {}
    except ImageDataError:
        pass
    outputs, failed = [], {}
    for k, (img, rec) in enumerate(zip(images, records)):
        try:
            outputs.append(models.run([img], [rec])[0])
        except ImageDataError as e:
            outputs.append(None)
            failed[k] = str(e)
    return outputs, failed


def _put(q: queue.Queue, item, errors: list) -> None:
    while True:
        if errors:
            raise errors[0]
        try:
            q.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def _stop_writer(q: queue.Queue, thread: threading.Thread) -> None:
    # A writer that died on an error no longer drains the queue: a blocking put(None) would hang.
    while thread.is_alive():
        try:
            q.put(None, timeout=0.5)
            break
        except queue.Full:
            continue
    thread.join()


def _failed_rows(writer: StoreWriter, rank: int, world_size: int, pending: list[int]) -> dict[int, list[int]]:
    """Done rows whose image failed, by block, in the finished blocks this rank owns."""
    errors = np.asarray(writer.backend.read("images/error", slice(None)), dtype=object)
    done = done_mask(writer.backend)
    out = {}
    for block in writer.layout.blocks_of_rank(rank, world_size):
        if block in pending:
            continue
        redo = [r for r in writer.layout.block_rows(block) if done[r] and errors[r]]
        if redo:
            out[block] = redo
    return out


def _count_failed(writer: StoreWriter) -> int:
    errors = np.asarray(writer.backend.read("images/error", slice(None)), dtype=object)
    return int(sum(1 for e, d in zip(errors, done_mask(writer.backend)) if d and e))


def _split_counts(records: list[ImageRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    return counts
