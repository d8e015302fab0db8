"""Figures of what a store cached, for notebooks and ``vlcache inspect``: one image, or a gallery.

Built on :meth:`Store.show` with matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), so
they render without a display; in Jupyter a returned Figure is shown inline.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .store import Store, open_store

__all__ = ["gallery", "inspect_figure", "inspect_image", "resolve_row"]


def resolve_row(store: Store, image) -> int:
    """Row index of ``image``: an int row, or an image id (str); a digit string that is no id is a row."""
    if isinstance(image, (int, np.integer)):
        return int(image)
    try:
        return store.index_of(str(image))
    except KeyError:
        if str(image).lstrip("-").isdigit():
            return int(image)
        raise


def inspect_figure(store: Store, image, caption: int = 0, word=None, score_threshold: float = 0.5) -> Figure:
    """One image (row or image id) with its instance masks, class names and scores, and caption
    ``caption`` with matched words highlighted; with ``word`` only that word's merged mask."""
    return store.show(resolve_row(store, image), caption=caption, word=word, score_threshold=score_threshold)


def gallery(store: Store, rows, cols: int = 4, caption: int = 0, score_threshold: float = 0.5,
            tile_inches: float = 3.2) -> Figure:
    """A grid of :meth:`Store.show` tiles for ``rows`` (row indices or image ids), ``cols`` per line."""
    rows = [resolve_row(store, r) for r in rows]
    if not rows:
        raise ValueError(f"gallery of store {store.url}: no rows given")
    if cols < 1:
        raise ValueError(f"gallery: cols must be >= 1, got {cols}")
    cols = min(cols, len(rows))
    lines = -(-len(rows) // cols)
    # Each tile leaves room below the image for its caption (Store.show anchors it under the axes).
    fig = Figure(figsize=(tile_inches * cols, (tile_inches + 1.0) * lines))
    grid = fig.add_gridspec(lines, cols, left=0.01, right=0.99, top=0.97, bottom=0.06, wspace=0.05, hspace=0.45)
    for n, row in enumerate(rows):
        ax = fig.add_subplot(grid[n // cols, n % cols])
        store.show(row, caption=min(caption, max(0, len(store.captions(row)) - 1)), ax=ax,
                   score_threshold=score_threshold)
    return fig


def inspect_image(url, image, caption: int = 0, word=None, out="fig.png", image_root=None,
                  storage_options: dict | None = None, dpi: int = 120) -> Path:
    """``vlcache inspect``: draw ``image`` (row or id) of the store at ``url`` into the PNG ``out``."""
    out = Path(os.fspath(out))
    with open_store(url, image_root=image_root, storage_options=storage_options) as store:
        fig = inspect_figure(store, image, caption=caption, word=word)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi)
    return out
