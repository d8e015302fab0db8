"""A diagnostic copy of a store whose grid features *do* say which class covers each cell.

    python oracle_features.py SRC_STORE DST_STORE

grid/feats[i, cell] = N(0, 1) noise over all channels, plus 3 x (coverage of the cell by class c's
instances, from the store's own masks) in channels 16c .. 16c + 15. It tells apart "ICA cannot
localise" from "these features cannot": an upper bound, never a result about real features. The copy
records a note in its attributes and gets its own fingerprint.
"""

import shutil
import sys

import numpy as np

from vlcache.storage.backends import open_backend
from vlcache.storage.masks import grid_coverage
from vlcache.storage.store import open_store


def main(src: str, dst: str, amplitude: float = 3.0, width: int = 16) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    store = open_store(dst)
    grid = store.attrs["layout"]["capacities"]["grid_size"]
    dim = store.attrs["layout"]["capacities"]["grid_dim"]
    if len(store.classes) * width > dim:
        raise ValueError(f"{len(store.classes)} classes x {width} channels do not fit in {dim}")
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((len(store.ids), grid * grid, dim)).astype(np.float32)
    for i in range(len(store.ids)):
        inst = store.instances(i)
        if len(inst["labels"]):
            cover = np.asarray(grid_coverage(inst["boxes"], inst["masks"], store.hw(i), grid,
                                             convention=store.mask_paste))
            for k, c in enumerate(inst["labels"]):
                feats[i, :, width * c:width * (c + 1)] += amplitude * cover[k].reshape(-1, 1)
    store.close()
    backend = open_backend(dst, "r+", force=True)
    backend.write_rows("grid/feats", 0, feats.astype(np.float16))
    backend.update_attrs(fingerprint=None, features_note="oracle grid features from annotation masks (diagnostic)")
    backend.close()
    print(f"wrote {dst}: grid/feats {feats.shape}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
