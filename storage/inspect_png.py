"""``vlcache inspect``: open a store, draw one of its images with what was cached, write a PNG."""

from __future__ import annotations

import os
from pathlib import Path

from .figures import inspect_figure
from .store import open_store

__all__ = ["inspect_image"]


def inspect_image(url, image, caption: int = 0, word=None, out="fig.png", image_root=None,
                  storage_options: dict | None = None, dpi: int = 120) -> Path:
    """``vlcache inspect``: draw ``image`` (row or id) of the store at ``url`` into the PNG ``out``."""
    out = Path(os.fspath(out))
    with open_store(url, image_root=image_root, storage_options=storage_options) as store:
        fig = inspect_figure(store, image, caption=caption, word=word)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, bbox_inches="tight", pad_inches=0.05)  # no empty margin
    return out
