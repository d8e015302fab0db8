"""What `store.show()` and `vlcache inspect` draw (issue 13, items 3 and 11): the pixels extraction saw
(EXIF orientation, 16-bit, transparency...), the caption as written with the class each matched word
matched, box labels clear of the title, and no empty margin."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text
from PIL import Image, features
from synth_store import make_synth_store
from extract_helpers import grid_sets, jpeg_bytes, write_karpathy

from vlcache.pipeline.config import load_config
from vlcache.pipeline.datasets import load_dataset
from vlcache.stages.extract.config import ExtractConfig
from vlcache.storage.images import load_image
from vlcache.stages.extract.loop import extract
from vlcache.storage.figures import caption_pieces
from vlcache.storage.inspect_png import inspect_image
from vlcache.storage.schema import SPLITS
from vlcache.storage.store import open_store

RED, BLUE = (230, 20, 20), (20, 20, 230)


def write_odd_images(folder) -> list[str]:
    """One file per format whose raw pixels differ from what a viewer (and extraction) shows."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    halves = np.zeros((48, 80, 3), np.uint8)
    halves[:, :40], halves[:, 40:] = RED, BLUE  # stored 80 wide: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 48 wide, 80 high, red on top
    (folder / "exif6.jpg").write_bytes(jpeg_bytes(halves, exif=exif.tobytes()))
    Image.fromarray(np.full((40, 56), 20000, np.uint16)).save(folder / "deep16.png")  # raw convert: white
    pal = np.zeros((40, 56), np.uint8)
    pal[10:30, 10:40] = 1
    img = Image.fromarray(pal, "P")
    img.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    img.save(folder / "palette_transparent.png", transparency=0)  # index 0 is black and transparent
    rgba = np.zeros((40, 56, 4), np.uint8)
    rgba[10:30, 10:40] = (30, 160, 30, 255)  # elsewhere: black, fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 256, (40, 56), dtype=np.uint8)).save(folder / "grey.png")
    names = ["exif6.jpg", "deep16.png", "palette_transparent.png", "rgba.png", "cmyk.jpg", "grey.png"]
    if features.check("webp"):
        Image.fromarray(rgba, "RGBA").save(folder / "alpha.webp", lossless=True)
        names.append("alpha.webp")
    return names


@pytest.fixture(scope="module")
def odd_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    names = write_odd_images(root / "images")
    write_karpathy(root, [(n, SPLITS[i % 3], [f"A dog in picture {i}."]) for i, n in enumerate(names)])
    ds = load_dataset(root / "dataset_flickr8k.json", root / "images")
    url = str(root / "odd.zarr")
    summary = extract(ds, url, load_config(ExtractConfig, overrides=grid_sets(workers=0)), progress=False)
    assert summary.complete and not summary.bad_images
    return url, root, names


def test_show_draws_what_extraction_decoded_for_every_odd_format(odd_store):
    url, root, names = odd_store
    store = open_store(url)
    for row, name in enumerate(names):
        drawn = np.asarray(store.show(row).axes[0].images[0].get_array())
        assert drawn.shape[:2] == store.hw(row), name  # the frame the boxes are in
        np.testing.assert_array_equal(drawn, load_image(root / "images" / name), err_msg=name)
    exif = np.asarray(store.show(names.index("exif6.jpg")).axes[0].images[0].get_array()).astype(int)
    assert exif.shape[:2] == (80, 48)
    assert np.abs(exif[:30].mean((0, 1)) - RED).max() < 30 and np.abs(exif[50:].mean((0, 1)) - BLUE).max() < 30
    deep = np.asarray(store.image(names.index("deep16.png")))
    assert np.abs(deep.astype(int) - round(20000 * 255 / 65535)).max() <= 1  # not a white silhouette
    for name in ("palette_transparent.png", "rgba.png"):
        px = np.asarray(store.image(names.index(name)))
        assert (px[0, 0] == 255).all() and (px[:10].reshape(-1, 3) == 255).all(), name  # on white, not black


def _saturated_box(png: np.ndarray) -> tuple[int, int]:
    sat = (png.max(2).astype(int) - png.min(2)) > 120
    ys, xs = np.nonzero(sat)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


def test_inspect_cli_draws_the_exif_rotated_photo_upright(odd_store, tmp_path):
    url, _, names = odd_store
    out = tmp_path / "exif.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    res = subprocess.run([sys.executable, "-m", "vlcache", "inspect", url, "--image", "exif6.jpg", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    png = np.asarray(Image.open(out).convert("RGB"))
    h, w = _saturated_box(png)  # the photo's red and blue halves
    assert h / w == pytest.approx(80 / 48, rel=0.1)  # upright (was 48/80: drawn sideways)
    ys = np.nonzero(((png.max(2).astype(int) - png.min(2)) > 120).any(1))[0]
    top, bottom = png[ys.min() + 5].astype(int), png[ys.max() - 5].astype(int)
    assert (top[:, 0] > top[:, 2] + 100).sum() > 10 and (bottom[:, 2] > bottom[:, 0] + 100).sum() > 10


@pytest.fixture(scope="module")
def synth():
    return open_store(make_synth_store()[0])


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text) if t.get_text()]


def test_caption_as_written_with_the_class_each_word_matched(synth):
    row = next(r for r in range(len(synth)) if any(m["words"] != m["class_name"] for m in synth.matches(r, 0)))
    text = synth.captions(row)[0]
    matches = synth.matches(row, 0)
    texts = _texts(synth.show(row, caption=0))
    words = text.split()
    assert words[0][0].isupper() and words[0] in texts  # capitalised, as written (tokens are lowercase)
    assert any(t in texts for t in (".", words[-1]))  # punctuation kept
    for m in matches:
        assert text[m["char_start"]:m["char_end"]].split()[-1] in texts
        if m["words"] != m["class_name"] and not m["words"].startswith(m["class_name"]):  # a synonym
            assert f"→ {m['class_name']}" in texts, (m, texts)
    assert not [t for t in texts if t.startswith("→") and t[2:] in {m["words"] for m in matches}]


def test_caption_pieces_split_punctuation_and_fall_back_to_tokens():
    matches = [{"char_start": 2, "char_end": 7, "words": "woman", "class_name": "person", "label": 0,
                "token_start": 1, "token_end": 2}]
    pieces = caption_pieces("A Woman, smiling.", ["a", "woman", "smiling"], matches)
    assert [[(t, m is not None, last) for t, m, last in w] for w in pieces] == [
        [("A", False, False)], [("Woman", True, True), (",", False, False)], [("smiling.", False, False)]]
    moved = [{**matches[0], "char_start": 40, "char_end": 45}]  # spans that do not fit the text: tokens
    assert [[t for t, _, _ in w] for w in caption_pieces("A Woman, smiling.", ["a", "woman", "smiling"], moved)] == [
        ["a"], ["woman"], ["smiling"]]


def test_box_labels_stay_inside_the_image_clear_of_the_title(synth):
    checked = 0
    for row in range(12):
        fig = synth.show(row, score_threshold=0.0)
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        ax = fig.axes[0]
        title, frame = ax.title.get_window_extent(renderer), ax.get_window_extent(renderer)
        for label in ax.texts:
            box = label.get_window_extent(renderer)
            assert not box.overlaps(title), (row, label.get_text())
            assert box.y1 <= frame.y1 + 1 and box.x0 >= frame.x0 - 1, (row, label.get_text())
            checked += 1
    assert checked >= 12


def test_inspect_png_has_no_large_empty_margin(synth, tmp_path):
    for row, shape in ((0, None), (1, None)):
        out = inspect_image(synth.url, row, out=tmp_path / f"r{row}.png")
        png = np.asarray(Image.open(out).convert("RGB")).astype(int)
        ink = np.nonzero((png < 235).any(2))
        h, w = png.shape[:2]
        top, bottom = ink[0].min(), h - 1 - ink[0].max()
        left, right = ink[1].min(), w - 1 - ink[1].max()
        assert max(top, bottom) <= 0.03 * h + 4 and max(left, right) <= 0.03 * w + 4, (row, top, bottom, left, right)
        # the image fills the width: the drawn picture is at least 90% of the PNG's width
        assert _image_width(png) >= 0.9 * w


def _image_width(png: np.ndarray) -> int:
    mid = png[png.shape[0] // 3]  # a row through the picture
    cols = np.nonzero((mid < 235).any(1))[0]
    return int(cols.max() - cols.min() + 1)


def test_show_of_a_caller_axes_and_gallery_still_render(synth):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4))
    ax = fig.add_subplot()
    assert synth.show(0, ax=ax) is fig
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert np.asarray(Image.open(buf).convert("RGB")).std() > 10
