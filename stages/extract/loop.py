"""The extraction loop: decode in DataLoader workers, batched forward, post-process, write in a thread.

Three things overlap: image decoding (DataLoader worker processes), model compute (this thread) and
store writes (a writer thread fed through a bounded queue). A block is handed to the writer only
when all its rows are in, so the store only ever receives whole blocks (DESIGN.md principle 3).
Resume is automatic: only the blocks this rank owns and that are not done are processed.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ...pipeline.config import ConfigError, to_dict
from ...pipeline.records import Dataset, ImageRecord
from ...storage.provenance import base_attrs
from ...storage.schema import Capacities, Layout, split_code
from ...storage.writer import StoreWriter
from .config import ExtractConfig
from .images import BadImageError, load_image
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
        lines = [
            f"extracted {self.images_done} images in {self.seconds:.1f}s ({self.setup_seconds:.1f}s loading models "
            f"and opening the store, then {self.images_per_second:.2f} img/s) into {self.url}",
            f"store complete: {self.complete}",
        ]
        if self.bad_images:
            lines.append(f"{len(self.bad_images)} bad image(s) recorded in images/error:")
            lines += [f"  {p}: {r}" for p, r in self.bad_images[:20]]
            if len(self.bad_images) > 20:
                lines.append(f"  ... and {len(self.bad_images) - 20} more (vlcache store info lists them)")
        return "\n".join(lines)


class StrictModeError(RuntimeError):
    pass


def select_records(dataset: Dataset, cfg: ExtractConfig) -> list[ImageRecord]:
    records = dataset.records
    if cfg.split is not None:
        split_code(cfg.split)  # validates the name
        records = [r for r in records if r.split == cfg.split]
    if cfg.limit is not None:
        records = records[: cfg.limit]
    if not records:
        raise ValueError(f"no images selected from {dataset.name} (split={cfg.split}, limit={cfg.limit})")
    return records


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
    return Layout(num_rows=len(records), block_size=cfg.block_size, capacities=cap,
                  groups=("images", "captions", *cfg.groups))


def dist_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def extract(dataset: Dataset, url: str, cfg: ExtractConfig, *, overwrite: bool = False,
            rank: int | None = None, world_size: int | None = None, progress: bool = True,
            class_words: str | Path | None = None) -> ExtractSummary:
    """Run stage one over ``dataset`` into the store at ``url`` (created, or resumed)."""
    if rank is None or world_size is None:
        rank, world_size = dist_rank()
    if overwrite and world_size > 1:  # rank 0 would delete the store while the others open or write it
        raise ConfigError(f"--overwrite with {world_size} ranks would race: delete {url} first, then start the "
                          "ranks without --overwrite (they create it afresh)")
    start = time.perf_counter()
    records = select_records(dataset, cfg)
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
    rows = [r for b in pending for r in layout.block_rows(b)]
    builder = RowBuilder(layout, records, models.matcher)
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

    thread = threading.Thread(target=write_loop, name="vlcache-writer", daemon=True)
    thread.start()
    summary.setup_seconds = time.perf_counter() - start
    loader = DataLoader(
        _DecodeDataset(rows, records, dataset.image_root),
        batch_size=cfg.runtime.batch_size,
        num_workers=cfg.runtime.num_workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    bar = tqdm(total=len(rows), desc=f"extract r{rank}/{world_size}", unit="img", disable=not progress,
               dynamic_ncols=True)
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
                    path = str(Path(dataset.image_root) / records[row].path)
                    if cfg.runtime.strict:
                        raise StrictModeError(f"bad image {path}: {err} (--strict stops at the first one)")
                    summary.bad_images.append((path, err))
                    builder.add_error(row, err)
            if good:
                outputs = models.run([img for _, img in good], [records[row] for row, _ in good])
                t_rows = time.perf_counter()
                for (row, img), out in zip(good, outputs):
                    builder.add(row, img.shape[:2], out)
                timings["rows"] += time.perf_counter() - t_rows
            t_put = time.perf_counter()
            for block, arrays in builder.pop_finished_blocks():
                _put(write_queue, (block, arrays), write_error)
            timings["write_wait"] += time.perf_counter() - t_put
            summary.images_done += len(good)
            bar.update(len(batch))
            t_prev = time.perf_counter()
        timings["decode_wait"] += time.perf_counter() - t_prev  # the end of the epoch: workers shut down
    finally:
        bar.close()
        t_drain = time.perf_counter()
        _stop_writer(write_queue, thread)  # blocks already queued are whole: they are still written
        timings["write_wait"] += time.perf_counter() - t_drain
    if write_error:
        raise write_error[0]
    t_fin = time.perf_counter()
    summary.complete = writer.finalize()
    writer.close()
    timings["finalize"] = time.perf_counter() - t_fin
    summary.timings = {**timings, **models.seconds}
    summary.seconds = time.perf_counter() - start
    return summary


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


def _split_counts(records: list[ImageRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.split] = counts.get(r.split, 0) + 1
    return counts
