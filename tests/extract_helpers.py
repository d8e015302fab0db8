"""Dataset files and extraction settings shared by the extraction and figure tests."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
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


def offline_build(tmp_path: Path, build: str, import_line: str) -> subprocess.CompletedProcess:
    """What building a model with downloadable default weights prints when it has no internet: ``build``
    runs in a fresh interpreter with an empty torch cache and an HTTPS proxy that refuses connections (a
    real download attempt); the error it raises is printed to stdout as ``<type> <message>``."""
    env = dict(os.environ, TORCH_HOME=str(tmp_path), https_proxy="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", no_proxy="", NO_PROXY="")
    code = f"{import_line}\ntry:\n    {build}\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
