"""Notebook inspection: examples/inspect_store.ipynb executed in a real Jupyter kernel (nbclient +
ipykernel, the venv's python), and the figure helpers' PNGs checked pixel by pixel on a real tiny store
(masks drawn in their class colour where the instances are, a word's merged mask alone, gallery tiles)."""

import base64
import io
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from nbclient import NotebookClient
from PIL import Image

from vlcache.storage.figures import gallery, inspect_figure, resolve_row
from vlcache.storage.inspect_png import inspect_image
from vlcache.storage.masks import paste_masks
from vlcache.storage.store import open_store

torch.set_num_threads(2)
NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "inspect_store.ipynb"
TAB10 = {0: (31, 119, 180), 1: (255, 127, 14), 2: (44, 160, 44), 3: (214, 39, 40), 4: (148, 103, 189)}


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def colour_pixels(pixels: np.ndarray, rgb, tol: int = 12) -> int:
    return int((np.abs(pixels - rgb).max(axis=-1) <= tol).sum())


def test_example_notebook_runs_in_a_real_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("VLCACHE_NOTEBOOK_DIR", str(tmp_path / "work"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"python: {sys.executable}" in text  # the kernel is this venv's python
    assert "fingerprint " in text and "12 rows" in text and "merged mask of" in text
    images = [base64.b64decode(o.data["image/png"]) for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # show, masks, show(word), merged mask, regions, gallery
    for data in images:
        px = png_pixels(data)
        assert min(px.shape[:2]) > 150 and px.std() > 10  # a real picture, not a blank canvas
    gallery_png = png_pixels(images[-1])
    assert gallery_png.shape[1] > 2.5 * gallery_png.shape[0] / 2  # 4 tiles per line, 2 lines
    written = tmp_path / "work" / "inspect.png"
    assert written.is_file() and png_pixels(written.read_bytes()).std() > 10


@pytest.fixture
def tiny(tiny_store_factory):
    ts = tiny_store_factory("tiny.zarr")
    return ts, open_store(ts.url, image_root=ts.image_root)


def _top_instance(ts, row):
    t = ts.truth
    k = int(t["instances/count"][row])
    j = int(np.argmax(t["instances/scores"][row, :k]))
    return j, int(t["instances/labels"][row, j])


def test_masks_are_drawn_where_the_instances_are(tiny, tmp_path):
    ts, store = tiny
    row = next(r for r in range(20) if r not in ts.error_rows and ts.truth["instances/scores"][r].max() >= 0.5)
    fig = inspect_figure(store, store.ids[row])
    assert isinstance(fig, Figure)
    out = tmp_path / "one.png"
    fig.savefig(out, dpi=fig.dpi)
    px = png_pixels(out.read_bytes())
    assert px.shape[:2] == (round(fig.get_figheight() * fig.dpi), round(fig.get_figwidth() * fig.dpi))
    # The highest-scoring instance is drawn last: inside its mask the image is tinted 45% towards its class
    # colour; outside every mask it is the plain image.
    j, label = _top_instance(ts, row)
    h, w = store.hw(row)
    t = ts.truth
    k = int(t["instances/count"][row])
    probs = paste_masks(t["instances/boxes"][row, :k], t["instances/masks"][row, :k], (h, w))
    image = np.asarray(Image.open(ts.image_root / t["images/path"][row]).convert("RGB")).astype(float)
    ax = fig.axes[0]
    inside = np.argwhere(probs[j] >= 0.9)
    outside = np.argwhere((probs < 0.5).all(axis=0))
    x1, y1, x2, y2 = t["instances/boxes"][row, :k].T

    def png_at(y, x):
        dx, dy = ax.transData.transform((x, y))
        return px[int(px.shape[0] - dy), int(dx)]

    def away_from_boxes(y, x):
        return (np.minimum(np.abs(x - x1), np.abs(x - x2)).min() > 1.5 and
                np.minimum(np.abs(y - y1), np.abs(y - y2)).min() > 1.5)

    tinted = [np.abs(png_at(y, x) - (0.55 * image[y, x] + 0.45 * np.array(TAB10[label]))).max()
              for y, x in inside if away_from_boxes(y, x)]
    plain = [np.abs(png_at(y, x) - image[y, x]).max() for y, x in outside if away_from_boxes(y, x)]
    assert len(tinted) > 5 and len(plain) > 5
    assert np.median(tinted) <= 6 and np.median(plain) <= 6


def test_word_draws_only_its_merged_mask(tiny):
    ts, store = tiny
    t = ts.truth
    for row in range(20):
        labels = set(t["instances/labels"][row, :t["instances/count"][row]].tolist())
        good = [c for c in range(int(t["captions/count"][row])) if t["matches/count"][row, c] > 0]
        if row not in ts.error_rows and len(labels) > 1 and good:
            break
    c = good[0]
    match = store.matches(row, c)[0]
    word_label = match["label"]
    others = {lab for lab in labels if lab != word_label}
    full = png_pixels(_png(inspect_figure(store, row, caption=c)))
    only = png_pixels(_png(inspect_figure(store, row, caption=c, word=match["words"].split()[0])))
    for lab in others:  # other classes' boxes and masks disappear
        assert colour_pixels(only, TAB10[lab]) < colour_pixels(full, TAB10[lab]) / 4 + 5
    if t["instances/scores"][row][t["instances/labels"][row] == word_label].max() >= 0.5:
        assert colour_pixels(only, TAB10[word_label]) > 20


def test_gallery_and_inspect_image(tiny, tmp_path):
    ts, store = tiny
    rows = [r for r in range(8) if r not in ts.error_rows]
    fig = gallery(store, rows, cols=3)
    assert len(fig.axes) == len(rows)
    assert fig.get_figwidth() == pytest.approx(3 * 3.2) and fig.get_figheight() == pytest.approx(3 * 4.2)
    px = png_pixels(_png(fig))
    assert px.std() > 20
    ids = [store.ids[r] for r in rows[:2]]
    assert len(gallery(store, ids).axes) == 2
    out = inspect_image(ts.url, "img004", caption=0, out=tmp_path / "figs" / "img004.png", image_root=ts.image_root)
    assert out.is_file() and png_pixels(out.read_bytes()).std() > 20
    assert resolve_row(store, "img004") == 4 and resolve_row(store, "7") == 7 and resolve_row(store, 3) == 3
    with pytest.raises(KeyError, match="no image with id 'cat42'"):
        inspect_image(ts.url, "cat42", out=tmp_path / "x.png", image_root=ts.image_root)
    with pytest.raises(ValueError, match="no rows"):
        gallery(store, [])


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    return buf.getvalue()
