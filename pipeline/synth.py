"""The built-in synthetic dataset: coloured shapes on textured backgrounds, with captions and masks.

``generate(out_dir)`` writes ``images/synth_XXXXXX.png``, ``instances.json`` (COCO instances: RLE masks
of the *visible* parts, ``bbox`` xywh, ``area``, ``iscrowd`` 0, categories 1..8 in ``SYNTH_CLASSES``
order) and ``dataset_synth.json`` (Karpathy format, ~80/10/10 train/val/test, 5 captions per image).
Load it with ``load_dataset(out_dir / "dataset_synth.json", instances=out_dir / "instances.json")``
and match its captions with ``ClassWordMatcher(SYNTH_CLASSES, SYNTH_SYNONYMS)``.

Scenes hold 1-4 objects; later objects are drawn over earlier ones, and every mask is cut from the final
label map, so occluded pixels belong to the object in front. Captions come from a small grammar with
counts, colours, sizes, spatial relations, synonyms, plurals and the multi-word names "stop sign" and
"half moon". Output is a pure function of ``(seed, n_images, size)``: same arguments, same bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from .records import karpathy_tokens

SYNTH_CLASSES = ["ball", "box", "triangle", "star", "ring", "cross", "stop sign", "half moon"]
SYNTH_SYNONYMS = {
    "ball": ["sphere", "orb"],
    "box": ["square", "cube", "crate"],
    "triangle": ["pyramid"],
    "ring": ["hoop"],
    "cross": ["plus sign"],
    "stop sign": ["octagon"],
    "half moon": ["crescent", "semicircle"],
}
SYNTH_COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
NOISE = 6  # +- per channel, added to the whole image after drawing
BACKGROUNDS = ("striped", "gradient", "noisy", "checkered", "plain")
_NUMBERS = ["zero", "one", "two", "three", "four"]
_MIN_VISIBLE = 0.4  # an object keeps at least this fraction of its pixels visible


def generate(out_dir: str | Path, n_images: int = 200, seed: int = 0, size: tuple[int, int] = (160, 160)) -> Path:
    """Write the synthetic dataset into ``out_dir`` and return the path of its Karpathy JSON."""
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    h, w = int(size[0]), int(size[1])
    if h < 32 or w < 32:
        raise ValueError(f"synthetic images must be at least 32x32, got {h}x{w}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    split_of = _splits(n_images, seed)
    kimages, cimages, anns = [], [], []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])  # per image: image i does not depend on n_images
        image, objects, bg = render_scene(rng, (h, w))
        fname = f"synth_{i:06d}.png"
        Image.fromarray(image).save(out / "images" / fname, compress_level=1)
        captions = describe(rng, objects, bg, (h, w))
        kimages.append(
            {
                "filepath": "images",
                "filename": fname,
                "imgid": i,
                "cocoid": i,
                "split": split_of[i],
                "sentids": list(range(5 * i, 5 * i + 5)),
                "sentences": [
                    {"raw": c, "tokens": list(karpathy_tokens(c)), "imgid": i, "sentid": 5 * i + k}
                    for k, c in enumerate(captions)
                ],
            }
        )
        cimages.append({"id": i, "file_name": fname, "height": h, "width": w})
        for o in objects:
            rle = mask_utils.encode(np.asfortranarray(o["mask"].astype(np.uint8)))
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": SYNTH_CLASSES.index(o["cls"]) + 1,
                    "bbox": [x, y, bw, bh],
                    "area": float(o["mask"].sum()),
                    "iscrowd": 0,
                    "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
                    "attributes": {"color": o["colour"], "size": o["size"], "full_area": o["full_area"]},
                }
            )
    categories = [{"id": k + 1, "name": n, "supercategory": "shape"} for k, n in enumerate(SYNTH_CLASSES)]
    info = {"description": "vlcache synthetic shapes", "seed": seed, "n_images": n_images, "size": [h, w]}
    instances = {"info": info, "images": cimages, "annotations": anns, "categories": categories}
    _write_json(out / "instances.json", instances)
    path = out / "dataset_synth.json"
    _write_json(path, {"dataset": "synth", "images": kimages})
    # The synonym table beside the dataset: extraction picks up `class_words.txt` next to the dataset file.
    table = "".join(", ".join([c, *SYNTH_SYNONYMS.get(c, [])]) + "\n" for c in SYNTH_CLASSES)
    (out / "class_words.txt").write_text("# synthetic shapes: class name, then synonyms\n" + table)
    return path


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, separators=(",", ":")), encoding="utf-8")


def _splits(n: int, seed: int) -> list[str]:
    """~80/10/10, at least one val and one test image once there are 3 images."""
    k = max(1, n // 10) if n >= 3 else 0
    order = np.random.default_rng([seed, 2**31]).permutation(n)
    split = ["train"] * n
    for j in order[:k]:
        split[j] = "val"
    for j in order[k : 2 * k]:
        split[j] = "test"
    return split


# ---------------------------------------------------------------------------------------------------
# rendering


def render_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, list[dict], str]:
    """One image (H, W, 3) uint8, its objects (cls, colour, size, mask, full_area, centroid) in drawing
    order, and the background kind. Masks are the visible parts, taken from the final label map."""
    h, w = size
    for _ in range(100):
        objects = _sample_objects(rng, h, w)
        label = np.zeros((h, w), np.uint8)
        ok = True
        for k, o in enumerate(objects):
            layer = Image.new("L", (w, h), 0)
            _draw(ImageDraw.Draw(layer), o, 1)
            own = np.asarray(layer, dtype=bool)
            o["full_area"] = int(own.sum())
            # touching objects of one colour would read as one blob: redraw the scene
            below = np.unique(label[own])
            ok &= all(objects[j - 1]["colour"] != o["colour"] for j in below if j)
            label[own] = k + 1  # later objects cover earlier ones
        for k, o in enumerate(objects):
            o["mask"] = label == k + 1
            visible = int(o["mask"].sum())
            ok &= visible >= max(12, _MIN_VISIBLE * o["full_area"])
        if ok:
            break
    else:  # pragma: no cover - 100 failed draws of 1-4 objects does not happen at >= 32 px
        raise RuntimeError("could not place objects without hiding one")
    bg_kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    img = _background(rng, bg_kind, h, w).astype(np.int16)
    for k, o in enumerate(objects):
        img[o["mask"]] = SYNTH_COLOURS[o["colour"]]
        ys, xs = np.nonzero(o["mask"])
        o["centroid"] = (float(xs.mean()), float(ys.mean()))
    img += rng.integers(-NOISE, NOISE + 1, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8), objects, bg_kind


def _sample_objects(rng: np.random.Generator, h: int, w: int) -> list[dict]:
    scale = min(h, w) / 160.0
    colours = list(SYNTH_COLOURS)
    objects: list[dict] = []
    for _ in range(int(rng.integers(1, 5))):
        if objects and rng.random() < 0.35:  # repeat a class, so captions get counts and plurals
            prev = objects[int(rng.integers(len(objects)))]
            cls = prev["cls"]
            colour = prev["colour"] if rng.random() < 0.5 else colours[rng.integers(len(colours))]
        else:
            cls = SYNTH_CLASSES[rng.integers(len(SYNTH_CLASSES))]
            colour = colours[rng.integers(len(colours))]
        size = "large" if rng.random() < 0.4 else "small"
        lo, hi = (22, 32) if size == "large" else (10, 16)
        r = max(5.0, float(rng.uniform(lo, hi)) * scale)
        cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
        angle = float(rng.uniform(0, 2 * math.pi))
        objects.append({"cls": cls, "colour": colour, "size": size, "geom": (cx, cy, r, angle)})
    return objects


def _ring_points(cx, cy, radii, angle, n):
    """n points around (cx, cy), cycling through ``radii``, starting at ``angle``."""
    return [
        (cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
         cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n))
        for k in range(n)
    ]  # fmt: skip


def _draw(d: ImageDraw.ImageDraw, o: dict, fill: int) -> None:
    cx, cy, r, a = o["geom"]
    box = (cx - r, cy - r, cx + r, cy + r)
    cls = o["cls"]
    if cls == "ball":
        d.ellipse(box, fill=fill)
    elif cls == "ring":
        d.ellipse(box, outline=fill, width=max(3, int(0.35 * r)))
    elif cls == "half moon":
        start = math.degrees(a)
        d.chord(box, start, start + 180, fill=fill)
    elif cls == "box":
        d.polygon(_ring_points(cx, cy, [r], a, 4), fill=fill)
    elif cls == "triangle":
        d.polygon(_ring_points(cx, cy, [r], a, 3), fill=fill)
    elif cls == "star":
        d.polygon(_ring_points(cx, cy, [r, 0.45 * r], a, 10), fill=fill)
    elif cls == "stop sign":
        d.polygon(_ring_points(cx, cy, [r], a, 8), fill=fill)
    elif cls == "cross":
        t = 0.33 * r  # arm half-width
        arm = [(t, r), (t, t), (r, t)]  # one quarter of the outline; the others are rotations of it
        pts = arm + [(y, -x) for x, y in arm] + [(-x, -y) for x, y in arm] + [(-y, x) for x, y in arm]
        c, s = math.cos(a), math.sin(a)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts], fill=fill)
    else:  # pragma: no cover - classes come from SYNTH_CLASSES
        raise ValueError(f"unknown synthetic class {cls!r}")


def _background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """Muted textured background (H, W, 3) float; mid-grey tones keep every object colour visible."""
    c1, c2 = rng.uniform(90, 170, size=(2, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    theta = rng.uniform(0, math.pi)
    along = xx * math.cos(theta) + yy * math.sin(theta)
    if kind == "gradient":
        t = (along - along.min()) / max(1e-6, float(along.max() - along.min()))
        return c1 + t[..., None] * (c2 - c1)
    if kind == "striped":
        period = rng.uniform(6, 16) * min(h, w) / 160.0 + 2
        return np.where(((along // period) % 2 == 0)[..., None], c1, c2)
    if kind == "checkered":
        cell = max(2, int(rng.integers(8, 20) * min(h, w) / 160.0))
        return np.where((((xx // cell) + (yy // cell)) % 2 == 0)[..., None], c1, c2)
    if kind == "noisy":
        return c1 + rng.normal(0, 18, size=(h, w, 3))
    return np.broadcast_to(c1, (h, w, 3)).copy()


# ---------------------------------------------------------------------------------------------------
# captions


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun(rng, cls: str) -> str:
    options = [cls, cls] + SYNTH_SYNONYMS.get(cls, [])  # the class name about half the time
    return options[rng.integers(len(options))]


def _one(rng, o: dict, article: bool = True) -> str:
    adj = [x for x in (o["size"], o["colour"]) if rng.random() < 0.6]
    phrase = " ".join(adj + [_noun(rng, o["cls"])])
    return _article(phrase) if article else phrase


def _group(rng, objs: list[dict]) -> str:
    if len(objs) == 1:
        return _one(rng, objs[0])
    noun = _plural(_noun(rng, objs[0]["cls"]))
    colours = sorted({o["colour"] for o in objs})
    num = _NUMBERS[len(objs)]
    if len(colours) == 1:
        return f"{num} {colours[0]} {noun}" if rng.random() < 0.7 else f"{num} {noun}"
    if rng.random() < 0.5:
        return f"{num} {noun} in {', '.join(colours[:-1])} and {colours[-1]}"
    return f"{num} {noun}"


def _listing(rng, objects: list[dict]) -> str:
    groups: dict[str, list[dict]] = {}
    for o in objects:
        groups.setdefault(o["cls"], []).append(o)
    parts = [_group(rng, g) for g in groups.values()]
    parts = [parts[k] for k in rng.permutation(len(parts))]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _relation(a: dict, b: dict) -> str:
    dx = b["centroid"][0] - a["centroid"][0]
    dy = b["centroid"][1] - a["centroid"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _place(o: dict, size: tuple[int, int]) -> str:
    x, y = o["centroid"]
    h, w = size
    row = "top" if y < h / 3 else "bottom" if y > 2 * h / 3 else "middle"
    col = "left" if x < w / 3 else "right" if x > 2 * w / 3 else "center"
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def _caption(rng, template: int, objects: list[dict], bg: str, size) -> str:
    n = len(objects)
    if template == 0:
        return f"{_listing(rng, objects)} on a {bg} background"
    if template == 1:
        lead = ["a picture", "an image", "a drawing", "a rendering"][rng.integers(4)]
        return f"{lead} of {_listing(rng, objects)}"
    if template == 2:
        if n == 1:
            return f"a single {_one(rng, objects[0], article=False)} on a {bg} background"
        kind = ["shapes", "objects"][rng.integers(2)]
        return f"{_NUMBERS[n]} {kind}: {_listing(rng, objects)}"
    if template == 3:
        verb = "is" if n == 1 else "are"
        return f"there {verb} {_listing(rng, objects)} on the {bg} background"
    # template 4: a spatial relation between two objects, or where a single object is
    if n == 1:
        where = ["picture", "image"][rng.integers(2)]
        return f"{_one(rng, objects[0])} in the {_place(objects[0], size)} of the {where}"
    i, j = rng.choice(n, size=2, replace=False)
    a, b = objects[i], objects[j]
    return f"{_one(rng, a)} {_relation(a, b)} {_one(rng, b)}"


def describe(rng: np.random.Generator, objects: list[dict], bg: str, size: tuple[int, int]) -> list[str]:
    """Five different captions; the first lists every object."""
    seen: list[str] = []
    for _ in range(500):
        template = 0 if not seen else int(rng.integers(1, 5))
        text = _caption(rng, template, objects, bg, size)
        text = text[0].upper() + text[1:] + "."
        if text not in seen:
            seen.append(text)
        if len(seen) == 5:
            return seen
    raise RuntimeError(f"caption grammar found only {len(seen)} different captions: {seen}")  # pragma: no cover
