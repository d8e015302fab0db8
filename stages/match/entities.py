"""Flickr30k Entities (Plummer et al., ICCV 2015) as an attention reference for matching (METHODS §8).

Readers for its published ``Sentences/<id>.txt`` and ``Annotations/<id>.xml``, and
:func:`entity_queries`, which turns a split batch's phrases with boxes into queries whose reference
regions have IoU >= 0.5 with a phrase box.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from ...pipeline.records import karpathy_tokens
from ...storage.backends import open_backend
from .data import TEXT_KEYS, resolve_positions


def read_entities_sentences(path) -> list[dict]:
    """One Flickr30k Entities ``Sentences/<id>.txt``: per line ``{"sentence", "words", "phrases"}`` where
    a phrase is ``{"first_word", "words", "phrase_id", "types"}`` (word indices into ``words``).

    Published format: ``[/EN#18/people A man] with [/EN#19/other pierced ears] ...``: a tag token
    ``[/EN#<id>/<type>[/<type>..]`` opens a phrase, the word ending in ``]`` closes it.
    """
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        words, phrases, cur = [], [], None
        for tok in line.split():
            if cur is None and tok.startswith("[/EN#"):
                tag = tok[len("[/EN#"):].split("/")
                if not tag[0]:
                    raise ValueError(f"{path}:{n}: phrase tag {tok!r} has no id")
                cur = {"first_word": len(words), "words": [], "phrase_id": tag[0], "types": tag[1:]}
                continue
            closes = cur is not None and tok.endswith("]")
            word = tok[:-1] if closes else tok
            words.append(word)
            if cur is not None:
                cur["words"].append(word)
                if closes:
                    phrases.append(cur)
                    cur = None
        if cur is not None:
            raise ValueError(f"{path}:{n}: phrase /EN#{cur['phrase_id']} is never closed with ']'")
        out.append({"sentence": " ".join(words), "words": words, "phrases": phrases})
    return out


def read_entities_annotation(path) -> dict:
    """One Flickr30k Entities ``Annotations/<id>.xml``: ``{"width", "height", "boxes": {phrase_id: [[x1,
    y1, x2, y2], ...]}, "scene": [ids], "nobox": [ids]}``. The XML's 1-based inclusive pixel indices
    become continuous pixel boxes ``[xmin - 1, ymin - 1, xmax, ymax]`` (the store's convention)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid XML: {e}") from None
    size = root.find("size")
    out = {"width": int(size.findtext("width")) if size is not None else None,
           "height": int(size.findtext("height")) if size is not None else None, "boxes": {}, "scene": [], "nobox": []}
    for k, obj in enumerate(root.iter("object")):
        ids = [e.text.strip() for e in obj.findall("name") if e.text]
        box = obj.find("bndbox")
        if box is not None:
            try:
                xyxy = [float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError):
                raise ValueError(f"{path}: object {k} has an incomplete <bndbox>") from None
            for i in ids:
                out["boxes"].setdefault(i, []).append([xyxy[0] - 1, xyxy[1] - 1, xyxy[2], xyxy[3]])
        if obj.findtext("scene", "0").strip() == "1":
            out["scene"] += ids
        if obj.findtext("nobndbox", "0").strip() == "1":
            out["nobox"] += ids
    return out


def token_char_spans(raw: str, tokens: list[str]) -> list[tuple[int, int] | None]:
    """Character span of each Karpathy token in the raw caption (searched in order, case-insensitive)."""
    low, at, out = raw.lower(), 0, []
    for t in tokens:
        i = low.find(t, at)
        out.append(None if i < 0 else (i, i + len(t)))
        at = at if i < 0 else i + len(t)
    return out


def entity_queries(entities_dir, url, data: dict, text: str) -> dict:
    """Queries for the Entities phrases of a split batch: ``txt (n,)``, ``pos (n, L)``, ``reference
    (n, R)`` bool (regions with IoU >= 0.5 with any of the phrase's boxes) and counting ``stats``.

    Images are found by file stem (``images/path``), sentences by equal Karpathy tokens; a phrase maps to
    the caption's tokens through each Entities word's own tokens."""
    root = Path(entities_dir)
    if not (root / "Sentences").is_dir() or not (root / "Annotations").is_dir():
        raise FileNotFoundError(f"{root} is not a Flickr30k Entities directory (needs Sentences/ and Annotations/)")
    with open_backend(str(url), "r") as be:
        paths = np.asarray(be.read("images/path", data["rows"].numpy()), dtype=object)
    stats = dict.fromkeys(["images", "sentences", "sentences_unmatched", "phrases_boxed", "phrases_no_region"], 0)
    by_img: dict[int, list[int]] = {}
    for t, i in enumerate(data["txt_img"].tolist()):
        by_img.setdefault(i, []).append(t)
    txt, tok, char, ref = [], [], [], []
    for i, p in enumerate(paths):
        stem = Path(str(p)).stem
        sfile, afile = root / "Sentences" / f"{stem}.txt", root / "Annotations" / f"{stem}.xml"
        if not sfile.is_file() or not afile.is_file():
            continue
        stats["images"] += 1
        boxes = read_entities_annotation(afile)["boxes"]
        nreg = int(data["region_mask"][i].sum())
        caps = {tuple(data["token_texts"][t].split()): t for t in by_img.get(i, [])}
        for sent in read_entities_sentences(sfile):
            per_word = [karpathy_tokens(w) for w in sent["words"]]
            t = caps.get(tuple(x for toks in per_word for x in toks))
            stats["sentences"] += 1
            if t is None:
                stats["sentences_unmatched"] += 1
                continue
            start = np.cumsum([0] + [len(x) for x in per_word])
            spans = token_char_spans(data["texts"][t], data["token_texts"][t].split())
            for ph in sent["phrases"]:
                a, b = int(start[ph["first_word"]]), int(start[ph["first_word"] + len(ph["words"])])
                if ph["phrase_id"] not in boxes or b <= a:
                    continue
                stats["phrases_boxed"] += 1
                iou = box_iou(data["region_boxes"][i, :nreg], torch.tensor(boxes[ph["phrase_id"]]))
                r = torch.zeros(data["region_mask"].shape[1], dtype=torch.bool)
                r[:nreg] = (iou >= 0.5).any(1)
                stats["phrases_no_region"] += int(not r.any())
                cs = spans[a][0] if spans[a] else -1
                ce = spans[b - 1][1] if spans[b - 1] and cs >= 0 else -1
                txt.append(t), tok.append((a, b)), char.append((cs, ce)), ref.append(r)
    q = {k: data[k] for k in TEXT_KEYS if k in data}
    q.update(match_txt=torch.tensor(txt, dtype=torch.long),
             match_tok=torch.tensor(tok, dtype=torch.long).reshape(-1, 2),
             match_char=torch.tensor(char, dtype=torch.long).reshape(-1, 2),
             match_ref=torch.stack(ref) if ref else torch.zeros(0, data["region_mask"].shape[1], dtype=torch.bool))
    resolve_positions(q, text)
    stats["phrases_used"] = int(len(q["match_txt"]))
    return {"txt": q["match_txt"], "pos": q["match_pos"], "reference": q["match_ref"], "stats": stats}
