"""The feature layouts researchers stream from, each written from the same rows and read the way its users do.

Used by ``bench/stream.py``. Every layout holds, per image, 36 x 2048 float16 region features and 36 x 4
float32 boxes (``npz`` stores features as float32, as the bottom-up-attention tools write them). Readers
are per-row map-style ``Dataset`` s (the default collate stacks a batch), except the vlcache store, which is
read by its own ``stream_loader``. File handles are opened lazily in the process that reads (DataLoader
workers fork), as the reference code bases do.

=========== =========================================================== ======================================
layout      what                                                        who uses it
=========== =========================================================== ======================================
store       a vlcache store (Zarr directory or ``.h5``)                 this project
npz         one ``np.savez_compressed`` file per image (float32)        BUTD tools, many captioning repos
h5raw       one HDF5 file, raw float16, one row per chunk               ImageCaptioning.pytorch
lmdb        LMDB, raw bytes per image (features + boxes)                UNITER, ImageCaptioning.pytorch
lmdb-lz4    LMDB, lz4-compressed bytes per image                        UNITER
tsv         TSV lines ``id, n, base64(features), base64(boxes)`` +      Oscar / VinVL
            a line-offset index
npy-mmap    one ``.npy`` per array, memory-mapped                       SCAN-style
ram         the ``.npy`` arrays loaded whole into memory                upper bound
=========== =========================================================== ======================================
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np

R, D = 36, 2048
FEAT_BYTES, BOX_BYTES = R * D * 2, R * 4 * 4
LAYOUTS = ("store", "npz", "h5raw", "lmdb", "lmdb-lz4", "tsv", "npy-mmap", "ram")


# --------------------------------------------------------------------------------------------- rows
def row_block(seed: int, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, start+n): features float16 (n,R,D) and boxes float32 (n,R,4), deterministic.

    Features are ReLU(N(0,1)) (half zeros, like pooled post-ReLU CNN features), so compression behaves
    realistically."""
    rng = np.random.default_rng([seed, start])
    feats = np.maximum(rng.standard_normal((n, R, D), dtype=np.float32), 0).astype(np.float16)
    xy = rng.uniform(0, 400, (n, R, 2)).astype(np.float32)
    return feats, np.concatenate([xy, xy + rng.uniform(8, 200, (n, R, 2)).astype(np.float32)], axis=2)


def write_npy(folder: Path, n: int, seed: int) -> None:
    """The source of every other layout: ``feats.npy`` and ``boxes.npy``."""
    folder.mkdir(parents=True, exist_ok=True)
    feats = np.lib.format.open_memmap(folder / "feats.npy", "w+", np.float16, (n, R, D))
    boxes = np.lib.format.open_memmap(folder / "boxes.npy", "w+", np.float32, (n, R, 4))
    for start in range(0, n, 256):
        feats[start:start + 256], boxes[start:start + 256] = row_block(seed, start, min(256, n - start))
    feats.flush(), boxes.flush()


def load_npy(folder: Path, mmap_mode: str | None = "r") -> tuple[np.ndarray, np.ndarray]:
    """``feats.npy`` and ``boxes.npy`` of ``folder`` (memory-mapped by default)."""
    return tuple(np.load(Path(folder) / f"{name}.npy", mmap_mode=mmap_mode, allow_pickle=False)
                 for name in ("feats", "boxes"))


def source_blocks(src: Path, block: int = 256):
    """(start, feats, boxes) blocks read back from the ``.npy`` source."""
    feats, boxes = load_npy(src)
    for start in range(0, len(feats), block):
        yield start, np.asarray(feats[start:start + block]), np.asarray(boxes[start:start + block])


# ------------------------------------------------------------------------------------------ writers
def write_store(url: str, src: Path, n: int, block: int = 64) -> None:
    from vlcache.storage.schema import Capacities, Layout
    from vlcache.storage.writer import StoreWriter

    layout = Layout(num_rows=n, block_size=block, capacities=Capacities(regions=R, region_dim=D),
                    groups=("images", "captions", "regions"))
    w = StoreWriter(url, layout, {"classes": [], "dataset": {"name": "bench"}}, overwrite=True)
    feats, boxes = load_npy(src)
    for b in w.pending_blocks():
        rows = layout.block_rows(b)
        w.write_block(b, {"regions/feats": np.asarray(feats[rows.start:rows.stop]),
                          "regions/boxes": np.asarray(boxes[rows.start:rows.stop]),
                          "regions/count": np.full(len(rows), R, np.int16),
                          "images/id": np.array([str(i) for i in rows], dtype=object)})
    assert w.finalize()
    w.close()


def _write_npz_part(args) -> None:
    folder, src, part, parts = args
    feats, boxes = load_npy(src)
    for i in range(part, len(feats), parts):
        np.savez_compressed(Path(folder) / f"{i:07d}.npz", x=np.asarray(feats[i], np.float32), bbox=boxes[i],
                            num_bbox=R, image_h=480, image_w=640)


def write_npz(folder: Path, src: Path) -> None:
    from multiprocessing import Pool

    folder.mkdir(parents=True, exist_ok=True)
    parts = max(1, os.cpu_count() or 1)
    with Pool(parts) as pool:
        pool.map(_write_npz_part, [(str(folder), str(src), p, parts) for p in range(parts)])


def write_h5raw(path: Path, src: Path, n: int) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        fe = f.create_dataset("feats", (n, R, D), np.float16, chunks=(1, R, D))
        bo = f.create_dataset("boxes", (n, R, 4), np.float32, chunks=(1, R, 4))
        for start, feats, boxes in source_blocks(src):
            fe[start:start + len(feats)], bo[start:start + len(feats)] = feats, boxes


def write_lmdb(path: Path, src: Path, n: int, lz4: bool) -> None:
    import lmdb

    if lz4:
        import lz4.frame
    env = lmdb.open(str(path), map_size=int(n * (FEAT_BYTES + BOX_BYTES) * 1.3) + (64 << 20))
    for start, feats, boxes in source_blocks(src):
        with env.begin(write=True) as txn:
            for k in range(len(feats)):
                value = feats[k].tobytes() + boxes[k].tobytes()
                txn.put(f"{start + k:07d}".encode(), lz4.frame.compress(value) if lz4 else value)
    env.sync()
    env.close()


def write_tsv(folder: Path, src: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    offsets = []
    with open(folder / "feats.tsv", "wb") as f:
        for start, feats, boxes in source_blocks(src):
            for k in range(len(feats)):
                offsets.append(f.tell())
                f.write(b"%d\t%d\t%s\t%s\n" % (start + k, R, base64.b64encode(feats[k].tobytes()),
                                               base64.b64encode(boxes[k].tobytes())))
    np.save(folder / "feats.lineidx.npy", np.asarray(offsets, np.int64))


def write_layout(kind: str, path: Path, src: Path, n: int) -> None:
    """Write layout ``kind`` at ``path`` from the ``.npy`` rows in ``src`` (npy-mmap and ram read ``src``)."""
    if kind == "store":
        write_store(str(path), src, n)
    elif kind == "npz":
        write_npz(path, src)
    elif kind == "h5raw":
        write_h5raw(path, src, n)
    elif kind in ("lmdb", "lmdb-lz4"):
        write_lmdb(path, src, n, lz4=kind == "lmdb-lz4")
    elif kind == "tsv":
        write_tsv(path, src)
    elif kind not in ("npy-mmap", "ram"):
        raise ValueError(f"unknown layout {kind!r}")


# ------------------------------------------------------------------------------------------ readers
def row_dataset(kind: str, path: str):
    """A per-row ``Dataset`` -> ``{"x": (R,D), "bbox": (R,4), "num_bbox": R}`` over layout ``kind``."""
    from torch.utils.data import Dataset

    class Rows(Dataset):
        def __init__(self):
            self.handle = None
            if kind == "npz":
                self.files = sorted(Path(path).glob("*.npz"))
                self.n = len(self.files)
            elif kind in ("npy-mmap", "ram"):
                mode = "r" if kind == "npy-mmap" else None
                self.feats, self.boxes = load_npy(path, mode)
                self.n = len(self.feats)
            elif kind == "tsv":
                self.offsets = np.load(Path(path) / "feats.lineidx.npy", allow_pickle=False)
                self.n = len(self.offsets)
            elif kind == "h5raw":
                import h5py

                with h5py.File(path, "r") as f:
                    self.n = len(f["feats"])
            elif kind in ("lmdb", "lmdb-lz4"):
                import lmdb

                with lmdb.open(path, readonly=True, lock=False) as env:
                    self.n = env.stat()["entries"]
            else:
                raise ValueError(f"unknown layout {kind!r}")

        def __len__(self):
            return self.n

        def _open(self):
            if self.handle is None:  # in the process that reads (after a DataLoader fork)
                if kind == "h5raw":
                    import h5py

                    self.handle = h5py.File(path, "r")
                elif kind == "tsv":
                    self.handle = open(Path(path) / "feats.tsv", "rb")
                else:
                    import lmdb

                    self.handle = lmdb.open(path, readonly=True, lock=False).begin(buffers=False)
            return self.handle

        def __getitem__(self, i):
            if kind == "npz":
                z = np.load(self.files[i], allow_pickle=False)
                return {"x": z["x"], "bbox": z["bbox"], "num_bbox": int(z["num_bbox"])}
            if kind in ("npy-mmap", "ram"):
                return {"x": self.feats[i], "bbox": self.boxes[i], "num_bbox": R}
            h = self._open()
            if kind == "h5raw":
                return {"x": h["feats"][i], "bbox": h["boxes"][i], "num_bbox": R}
            if kind == "tsv":
                h.seek(int(self.offsets[i]))
                _, n, feats, boxes = h.readline().split(b"\t")
                return {"x": np.frombuffer(base64.b64decode(feats), np.float16).reshape(R, D),
                        "bbox": np.frombuffer(base64.b64decode(boxes), np.float32).reshape(R, 4), "num_bbox": int(n)}
            value = h.get(f"{i:07d}".encode())
            if kind == "lmdb-lz4":
                import lz4.frame

                value = lz4.frame.decompress(value)
            return {"x": np.frombuffer(value, np.float16, R * D).reshape(R, D),
                    "bbox": np.frombuffer(value, np.float32, R * 4, offset=FEAT_BYTES).reshape(R, 4), "num_bbox": R}

    return Rows()


def files_of(kind: str, path: Path) -> list[Path]:
    """The files a layout reads (to warm or measure them)."""
    if kind in ("npy-mmap", "ram"):
        return [path / "feats.npy", path / "boxes.npy"]
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
