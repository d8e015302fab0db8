"""Figures of what a store cached, for notebooks and ``vlcache inspect``: one image, or a gallery.

Built on :meth:`Store.show` with matplotlib's object API (``matplotlib.figure.Figure``, no pyplot), so
they render without a display; in Jupyter a returned Figure is shown inline.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:  # annotations only: Store.show imports this module, so no import back at run time
    from .store import Store

__all__ = ["draw_row", "gallery", "inspect_figure", "resolve_row"]

_WIDTH_IN = 6.4  # a single image's figure width (inches); portrait images get narrower figures
_MAX_IMAGE_IN = 7.0  # tallest drawn image (inches)
_TITLE_IN = 0.32  # room above the image for its title
_LINE_IN = 0.25  # one caption line (10 pt text with its highlight box)
_CHARS_PER_IN = 13  # 10 pt caption characters per inch of width, with some room to spare


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


# ------------------------------------------------------------------------------------------- drawing
def _class_color(label: int) -> tuple:
    from matplotlib import colormaps

    return tuple(colormaps["tab10"](int(label) % 10))


def _pixels(store: Store, k: int, h: int, w: int) -> tuple[np.ndarray, str]:
    """What extraction saw (its decoder, so EXIF-rotated, 16-bit and transparent images look right and
    line up with the boxes), and a note for the title when it cannot be drawn."""
    from .images import BadImageError

    try:
        img = np.asarray(store.image(k))
    except FileNotFoundError:  # still useful without the images: masks on grey
        return np.full((h, w, 3), 200, np.uint8), " (image file not found)"
    except (BadImageError, OSError, ValueError) as e:
        return np.full((h, w, 3), 200, np.uint8), f" (image not decodable: {str(e)[-60:]})"
    if img.shape[:2] != (h, w):  # the file changed since extraction: boxes would not line up
        return np.full((h, w, 3), 200, np.uint8), f" (file is {img.shape[1]}x{img.shape[0]}, extracted {w}x{h})"
    return img, ""


def _same_name(words: str, class_name: str) -> bool:
    """Whether the matched words are the class name or its plural (no "→ class" label needed)."""
    from .word_forms import plural_forms

    a, b = words.lower().split(), class_name.lower().split()
    if a == b:
        return True
    return len(a) == len(b) and a[:-1] == b[:-1] and a[-1] in plural_forms(b[-1])


def caption_pieces(text: str, tokens: list[str], matches: list[dict]) -> list[list[tuple[str, dict | None, bool]]]:
    """The caption as written, cut into whitespace-separated words, each a list of parts
    ``(text, match or None, last part of its match)``: a word like "dog," splits into "dog" (matched) and
    ",". Matches carry character spans into the raw caption; when they do not fit it (an imported store),
    the Karpathy tokens are drawn instead, with spans computed over them."""
    fits = all(0 <= m["char_start"] < m["char_end"] <= len(text) and
               text[m["char_start"]:m["char_end"]].lower().split() == m["words"].split() for m in matches)
    if not fits or not text:
        starts = np.cumsum([0] + [len(t) + 1 for t in tokens])
        text = " ".join(tokens)
        matches = [{**m, "char_start": int(starts[m["token_start"]]), "char_end": int(starts[m["token_end"]] - 1)}
                   for m in matches]
    words = []
    for word in re.finditer(r"\S+", text):
        a, b = word.span()
        cuts = sorted({a, b} | {c for m in matches for c in (m["char_start"], m["char_end"]) if a < c < b})
        parts = []
        for s, e in zip(cuts[:-1], cuts[1:]):
            m = next((m for m in matches if m["char_start"] <= s and e <= m["char_end"]), None)
            parts.append((text[s:e], m, m is not None and e == m["char_end"]))
        words.append(parts)
    return words


def _wrap(words: list[list[tuple]], width_chars: int) -> list[list[list[tuple]]]:
    lines, line, used = [], [], 0
    for parts in words:
        n = sum(len(t) + (len(m["class_name"]) + 3 if m and last and not _same_name(m["words"], m["class_name"])
                          else 0) for t, m, last in parts)
        if line and used + n > width_chars:
            lines.append(line)
            line, used = [], 0
        line.append(parts)
        used += n + 1
    return lines + ([line] if line else [])


def _caption_box(lines, shown: set, fontsize: float):
    """Offsetbox of the wrapped caption: matched words bold on their class colour (the colour of their
    masks), followed by "→ class" when the word is not the class name itself."""
    from matplotlib.offsetbox import HPacker, TextArea, VPacker

    rows = []
    for line in lines:
        words = []
        for parts in line:
            areas = []
            for text, m, last in parts:
                props = dict(fontsize=fontsize)
                if m is not None and id(m) in shown:
                    col = _class_color(m["label"])
                    props.update(fontweight="bold", bbox=dict(facecolor=col, alpha=0.6, pad=1, lw=0))
                    areas.append(TextArea(text, textprops=props))
                    if last and not _same_name(m["words"], m["class_name"]):
                        areas.append(TextArea(f"→ {m['class_name']}", textprops=dict(
                            fontsize=fontsize * 0.8, fontstyle="italic", bbox=dict(facecolor=col, alpha=0.3, pad=1, lw=0))))
                else:
                    areas.append(TextArea(text, textprops=props))
            words.append(HPacker(children=areas, align="baseline", pad=0, sep=2) if len(areas) > 1 else areas[0])
        rows.append(HPacker(children=words, align="baseline", pad=0, sep=4))
    return VPacker(children=rows, align="left", pad=0, sep=4)


def draw_row(store: Store, k: int, caption: int = 0, word=None, ax=None, score_threshold: float = 0.5) -> Figure:
    """:meth:`Store.show`: row ``k``'s image as extraction decoded it, instance masks, boxes, class names
    and scores (labels inside the box, so they never run into the title), and caption ``caption`` as
    written below it, matched words in their class colour with the class they matched. Without ``ax``
    the figure is sized to the image and caption, with no empty margin."""
    from matplotlib.offsetbox import AnchoredOffsetbox
    from matplotlib.patches import Rectangle

    h, w = store.hw(k)
    img, note = _pixels(store, k, h, w)
    all_tokens = store.tokens(k)
    if not 0 <= caption < len(all_tokens):
        raise IndexError(f"row {k} (image id {store._id(k)!r}) has {len(all_tokens)} captions; no caption {caption}")
    toks = all_tokens[caption]
    matches = store.matches(k, caption) if "matches" in store.layout.groups and toks else []
    chosen = store._match_of(k, caption, word) if word is not None else None
    shown = {id(m) for m in matches if chosen is None or m == chosen}
    words = caption_pieces(store.captions(k)[caption], toks, matches)

    if ax is None:
        width = _WIDTH_IN if h / w * _WIDTH_IN <= _MAX_IMAGE_IN else _MAX_IMAGE_IN * w / h
        lines = _wrap(words, int(max(width, 4.0) * _CHARS_PER_IN))
        img_in, cap_in = width * h / w, 0.1 + _LINE_IN * len(lines)
        fig_w = max(width, 4.0)  # a very tall image still leaves the caption room to read
        total = _TITLE_IN + img_in + cap_in
        fig = Figure(figsize=(fig_w, total))
        ax = fig.add_axes(((fig_w - width) / 2 / fig_w, cap_in / total, width / fig_w, img_in / total))
    else:
        fig = ax.figure
        lines = _wrap(words, int(ax.get_position().width * fig.get_figwidth() * _CHARS_PER_IN))
    ax.imshow(img)
    ax.set_axis_off()
    ax.set_title(f"row {k} · image {store._id(k)}{note}", fontsize=9, pad=4)

    if "instances" in store.layout.groups:
        inst = store.instances(k)
        keep = inst["scores"] >= score_threshold
        if chosen is not None:
            keep &= inst["labels"] == chosen["label"]
        sel = np.flatnonzero(keep)
        sel = sel[np.argsort(inst["scores"][sel])]  # highest score drawn last, on top
        from .masks import paste_masks

        probs = paste_masks(inst["boxes"][sel], inst["masks"][sel], (h, w), convention=store.mask_paste)
        overlay = np.zeros((h, w, 4), np.float32)
        for p, j in zip(probs, sel):
            col = _class_color(inst["labels"][j])
            overlay[p >= 0.5] = (*col[:3], 0.45)
            x1, y1, x2, y2 = inst["boxes"][j]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=col, linewidth=1.5))
            ax.text(x1, y1, f"{inst['class_names'][j]} {inst['scores'][j]:.2f}", fontsize=7, color="white",
                    va="top", ha="left", clip_on=True, bbox=dict(facecolor=col, alpha=0.8, pad=1, lw=0))
        ax.imshow(overlay)

    if lines:
        ax.add_artist(AnchoredOffsetbox(loc="upper center", child=_caption_box(lines, shown, 10),
                                        bbox_to_anchor=(0.5, 0.0), bbox_transform=ax.transAxes, frameon=False,
                                        pad=0.2, borderpad=0.2))
    return fig
