"""Dataset files and extraction settings shared by the extraction and figure tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from vlcache.pipeline.records import karpathy_tokens


def _sentence(raw, imgid, sentid):
    return {"tokens": list(karpathy_tokens(raw)), "raw": raw, "imgid": imgid, "sentid": sentid}


def write_karpathy(root: Path, entries) -> Path:
    """Write dataset_flickr8k.json in the real file's layout. ``entries``: (filename, split, [raw captions])."""
    images, sentid = [], 0
    for i, (fname, split, caps) in enumerate(entries):
        sents = [_sentence(c, i, sentid + k) for k, c in enumerate(caps)]
        images.append({"sentids": [s["sentid"] for s in sents], "imgid": i, "sentences": sents,
                       "split": split, "filename": fname})
        sentid += len(caps)
    path = root / "dataset_flickr8k.json"
    path.write_text(json.dumps({"images": images, "dataset": "flickr8k"}))
    return path


def jpeg_bytes(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def grid_sets(block=4, batch=2, workers=2):
    return ["groups=[grid]", "features.weights=none", "features.input_size=64", "features.grid_size=2",
            f"block_size={block}", f"runtime.batch_size={batch}", f"runtime.num_workers={workers}"]
