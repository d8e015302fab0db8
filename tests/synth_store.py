"""Build a small real store from the synthetic dataset (annotations oracle + random-init ResNet-101).

Shared by the training tests: stores are cached per (arguments) under a session temp dir, so several
test files reuse one extraction (and one text cache of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from vlcache.pipeline.config import load_config
from vlcache.pipeline.datasets import load_dataset
from vlcache.pipeline.synth import generate
from vlcache.stages.extract.config import ExtractConfig
from vlcache.stages.extract.loop import extract

_CACHE = Path(os.environ.get("VLCACHE_TEST_CACHE", tempfile.gettempdir())) / f"vlcache-test-stores-{os.getuid()}"


def make_synth_store(n_images: int = 48, *, size: int = 96, grid: int = 4, input_size: int = 128,
                     block_size: int = 16, regions: int = 12, seed: int = 0, backend: str = "zarr",
                     groups=("instances", "regions", "grid", "matches")) -> tuple[str, Path]:
    """Return (store url, dataset dir) of a complete synthetic store; built once per argument set."""
    key = json.dumps([n_images, size, grid, input_size, block_size, regions, seed, backend, list(groups),
                      "butd-regions"])  # region selection/scale changed: older cached stores do not apply
    tag = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = _CACHE / tag
    data_dir = root / "data"
    url = str(root / ("store.h5" if backend == "hdf5" else "store.zarr"))
    marker = root / "ready"
    if marker.is_file():
        return url, data_dir
    root.mkdir(parents=True, exist_ok=True)
    generate(data_dir, n_images=n_images, seed=seed, size=(size, size))
    dataset = load_dataset(data_dir / "dataset_synth.json", instances=data_dir / "instances.json")
    cfg = load_config(ExtractConfig, overrides=[
        "detector.backend=annotations", "features.weights=none", f"features.input_size={input_size}",
        f"features.grid_size={grid}", f"block_size={block_size}", f"features.max_regions={regions}",
        f"features.fixed_regions={regions}", "features.min_regions=4", "runtime.num_workers=0",
        "runtime.batch_size=8", f"groups={json.dumps(list(groups))}", f"features.region_min_size={size}",
        f"features.region_max_size={2 * size}",
    ])
    extract(dataset, url, cfg, overwrite=True, progress=False)
    marker.write_text(url)
    return url, data_dir


def make_text_cache(store_url: str, max_len: int = 32) -> str:
    """URL of a frozen-BERT text cache of ``store_url`` (a store made by :func:`make_synth_store`); built once."""
    from vlcache.stages.match.text_cache import build_text_cache

    root = Path(store_url).parent
    url = str(root / f"text-{max_len}.zarr")
    marker = root / f"text-{max_len}.ready"
    if not marker.is_file():
        build_text_cache(store_url, url, max_len=max_len, overwrite=True)
        marker.write_text(url)
    return url
