"""What a store records about where it came from: source files with their sha256, software, time."""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata

from .backends import to_jsonable

_PACKAGES = ("numpy", "torch", "torchvision", "zarr", "h5py", "vlcache")


def sha256_file(path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces (source files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:  # a missing file's OSError already names the path
        for piece in iter(lambda: f.read(chunk_bytes), b""):
            h.update(piece)
    return h.hexdigest()


def software_versions() -> dict:
    """Versions of python, the platform and the packages that shape a store (read without importing them)."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def base_attrs(
    dataset_name: str,
    splits: dict,
    sources: list,
    config: dict,
    classes: list[str] | None = None,
    image_root=None,
) -> dict:
    """Root attributes describing a store's dataset, sources, config and software (JSON-normalised).

    ``splits`` maps split name -> image count; ``sources`` are the dataset files the records were read
    from (each hashed); ``config`` is the full extraction config.
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    srcs = []
    for p in sources:
        p = os.fspath(p)
        srcs.append({"path": p, "sha256": sha256_file(p), "bytes": os.path.getsize(p)})
    return {
        "dataset": str(dataset_name),
        "image_root": None if image_root is None else os.fspath(image_root),
        "splits": to_jsonable({str(k): int(v) for k, v in splits.items()}, "splits"),
        "sources": srcs,
        "config": to_jsonable(config, "config"),
        "classes": None if classes is None else [str(c) for c in classes],
        "software": software_versions(),
        "created": utc_now(),
    }
