"""load_image: every PIL mode to RGB uint8, EXIF orientation, and a clear error for every bad file."""

import numpy as np
import pytest
from PIL import Image, ImageFile

from vlcache.storage.images import BadImageError, load_image, to_rgb


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_rgb_png_roundtrip_exact(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(arr), tmp_path / "a.png"))
    assert out.dtype == np.uint8 and out.shape == (12, 17, 3)
    np.testing.assert_array_equal(out, arr)


def test_exif_orientation_6_rotates_clockwise(tmp_path):
    # stored 40 wide x 20 tall, red block top-left; orientation 6 = "rotate 90 CW to display"
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:8, :8] = (255, 0, 0)
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(img, tmp_path / "o6.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(path)
    assert out.shape == (40, 20, 3)  # displayed: 20 wide, 40 tall
    assert out[2, 17, 0] > 200 and out[2, 17, 1] < 60  # the top-left corner moved to the top-right
    assert out[2, 2, 0] < 60 and out[37, 2, 0] < 60


def test_greyscale_and_one_bit(tmp_path):
    grey = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
    out = load_image(_save(Image.fromarray(grey, "L"), tmp_path / "g.png"))
    assert out.shape == (10, 12, 3)
    np.testing.assert_array_equal(out[..., 0], grey)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])

    bits = np.zeros((6, 9), bool)
    bits[:, :4] = True
    out = load_image(_save(Image.fromarray(bits).convert("1"), tmp_path / "b.png"))
    assert set(np.unique(out).tolist()) == {0, 255}
    assert (out[:, :4] == 255).all() and (out[:, 4:] == 0).all()


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200  # red under everything
    rgba[:, :3, 3] = 255  # left half opaque
    rgba[:, 3:, 3] = 0  # right half fully transparent
    out = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "t.png"))
    np.testing.assert_array_equal(out[:, :3], np.broadcast_to([200, 0, 0], (4, 3, 3)))
    assert (out[:, 3:] == 255).all()

    la = np.zeros((4, 6, 2), np.uint8)
    la[..., 0] = 50
    la[:, :2, 1] = 255
    la[:, 2:, 1] = 128  # half transparent: 50 * 128/255 + 255 * 127/255 ~ 152
    out = load_image(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert (out[:, :2] == 50).all()
    assert np.abs(out[:, 2:].astype(int) - 152).max() <= 1


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (5, 4), 0)
    p.putpalette([0, 0, 255] + [0, 255, 0] + [0, 0, 0] * 254)
    p.putpixel((0, 0), 1)
    p.info["transparency"] = 0  # index 0 (blue) transparent
    out = load_image(_save(p, tmp_path / "p.png", transparency=0))
    np.testing.assert_array_equal(out[0, 0], [0, 255, 0])
    assert (out[1:] == 255).all()  # transparent blue became white, not blue

    opaque = Image.new("P", (3, 3), 1)
    opaque.putpalette([0, 0, 255] + [10, 20, 30] + [0, 0, 0] * 254)
    out = load_image(_save(opaque, tmp_path / "p2.png"))
    assert (out == [10, 20, 30]).all()


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(_save(cmyk, tmp_path / "c.jpg", quality=95))
    assert out.shape == (16, 16, 3)
    r, g, b = out[8, 8].astype(int)
    assert r > 220 and g < 40 and b < 40


def test_sixteen_bit_is_scaled_by_range_not_clipped(tmp_path):
    x = np.array([[0, 257, 30000, 65535]], dtype=np.uint16).repeat(3, axis=0)
    img = Image.fromarray(x)
    assert img.mode.startswith("I;16")
    out = load_image(_save(img, tmp_path / "s.png"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 117, 255])  # a clip would give 255 for 30000


def test_int32_and_float_are_stretched_over_their_own_range(tmp_path):
    i32 = np.array([[-1000, 0, 1000, 3000]] * 2, dtype=np.int32)
    out = load_image(_save(Image.fromarray(i32, "I"), tmp_path / "i.tif"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 64, 128, 255])

    f = np.array([[0.0, 0.25, 0.5, 1.0]] * 2, dtype=np.float32)
    out = load_image(_save(Image.fromarray(f, "F"), tmp_path / "f.tif"))
    np.testing.assert_array_equal(out[1, :, 2], [0, 64, 128, 255])

    const = Image.fromarray(np.full((3, 3), 77.0, np.float32), "F")
    assert (to_rgb(const) == 77).all()


def test_non_finite_float_image_is_an_error(tmp_path):
    f = np.array([[0.0, np.nan], [1.0, 2.0]], dtype=np.float32)
    path = _save(Image.fromarray(f, "F"), tmp_path / "nan.tif")
    with pytest.raises(BadImageError, match="NaN or infinite"):
        load_image(path)


def test_multiframe_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (5, 5), c) for c in ((255, 0, 0), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    out = load_image(path)
    assert out.shape == (5, 5, 3) and out[2, 2, 0] > 200 and out[2, 2, 1] < 50


def test_missing_empty_directory(tmp_path):
    with pytest.raises(BadImageError, match="file not found") as e:
        load_image(tmp_path / "nope.jpg")
    assert e.value.path.endswith("nope.jpg") and "nope.jpg" in str(e.value)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match=r"empty file \(0 bytes\)"):
        load_image(tmp_path / "empty.jpg")
    with pytest.raises(BadImageError, match="not a regular file"):
        load_image(tmp_path)


@pytest.mark.parametrize("fmt", ["jpg", "png"])
def test_truncated_is_an_error_not_grey(tmp_path, fmt):
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = tmp_path / f"full.{fmt}"
    Image.fromarray(arr).save(full)
    data = full.read_bytes()
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated or corrupt") as e:
        load_image(cut)
    assert str(cut) in str(e.value)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_and_not_an_image(tmp_path):
    (tmp_path / "text.jpg").write_text("this is not an image")
    with pytest.raises(BadImageError, match="not an image"):
        load_image(tmp_path / "text.jpg")
    good = tmp_path / "good.png"
    Image.new("RGB", (32, 32), (9, 9, 9)).save(good)
    data = bytearray(good.read_bytes())
    data[60:80] = b"\x00" * 20  # smash the compressed data; the size header stays valid
    (tmp_path / "smashed.png").write_bytes(bytes(data))
    with pytest.raises(BadImageError, match="smashed.png"):
        load_image(tmp_path / "smashed.png")


def test_too_small_one_pixel(tmp_path):
    path = _save(Image.new("RGB", (1, 1), (1, 2, 3)), tmp_path / "pixel.gif")
    with pytest.raises(BadImageError, match=r"image too small \(1x1"):
        load_image(path)
    out = load_image(path, min_side=1)  # allowed when asked for
    assert out.shape == (1, 1, 3)


def test_too_large_by_max_pixels_and_by_pil_guard(tmp_path, monkeypatch):
    path = _save(Image.new("1", (300, 200)), tmp_path / "big.png")
    with pytest.raises(BadImageError, match=r"too large 300x200"):
        load_image(path, max_pixels=10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 60k px: PIL warns (> limit) ...
    with pytest.raises(BadImageError, match="decompression-bomb"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # ... or raises (> 2x limit)
    with pytest.raises(BadImageError, match="decompression-bomb"):
        load_image(path)


def test_refuses_to_run_with_load_truncated_images(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (4, 4)), tmp_path / "x.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        load_image(path)


def test_fsspec_url(tmp_path):
    import fsspec

    arr = np.full((3, 4, 3), 42, np.uint8)
    with fsspec.open("memory://vlcache-test/img.png", "wb") as f:
        Image.fromarray(arr).save(f, format="PNG")
    np.testing.assert_array_equal(load_image("memory://vlcache-test/img.png"), arr)
    with pytest.raises(BadImageError, match="file not found"):
        load_image("memory://vlcache-test/missing.png")
