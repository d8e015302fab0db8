"""Assemble per-image model outputs into whole store blocks (padding, counts, matches)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...pipeline.records import ImageRecord
from ...storage.schema import Layout, split_code


@dataclass
class RowOutput:
    """Everything stage one produced for one image (numpy, CPU). Absent groups are ``None``."""

    inst_boxes: np.ndarray | None = None  # (n,4) float32 xyxy, original pixels
    inst_labels: np.ndarray | None = None  # (n,) int
    inst_scores: np.ndarray | None = None  # (n,) float32
    inst_masks: np.ndarray | None = None  # (n,M,M) float probabilities in [0,1]
    reg_boxes: np.ndarray | None = None  # (r,4)
    reg_labels: np.ndarray | None = None
    reg_scores: np.ndarray | None = None
    reg_feats: np.ndarray | None = None  # (r,D) float16
    grid_feats: np.ndarray | None = None  # (G*G,D) float16


class RowBuilder:
    """Collects rows into block buffers; a block is released once every one of its rows is in."""

    def __init__(self, layout: Layout, records: list[ImageRecord], matcher=None):
        self.layout, self.records, self.matcher = layout, records, matcher
        self.specs = {s.path: s for s in layout.specs() if s.path != "images/done"}
        self._open: dict[int, dict] = {}

    def _slot(self, row: int) -> tuple[dict, int]:
        block, offset = divmod(row, self.layout.block_size)
        if block not in self._open:
            n = len(self.layout.block_rows(block))
            self._open[block] = {
                "left": set(self.layout.block_rows(block)),
                "arrays": {p: s.empty_rows(n) for p, s in self.specs.items()},
            }
        return self._open[block], offset

    def keep(self, block: int, stored: dict[str, np.ndarray], redo: list[int]) -> None:
        """Start ``block`` from its ``stored`` arrays: only the rows in ``redo`` are computed again (they
        start as padding); every other row is written back exactly as it was."""
        rows = self.layout.block_rows(block)
        arrays = {p: np.array(stored[p]) for p in self.specs}
        for row in redo:
            for p, spec in self.specs.items():
                arrays[p][row - rows.start] = spec.empty_rows(1)[0]
        self._open[block] = {"left": set(redo), "arrays": arrays}

    def _common(self, row: int, hw: tuple[int, int] | None, error: str) -> tuple[dict, int]:
        slot, k = self._slot(row)
        a, rec = slot["arrays"], self.records[row]
        a["images/id"][k] = rec.id
        a["images/path"][k] = rec.path
        if hw is not None:
            a["images/hw"][k] = hw
        elif rec.height and rec.width:
            a["images/hw"][k] = (rec.height, rec.width)
        a["images/split"][k] = split_code(rec.split)
        a["images/error"][k] = error
        cap = self.layout.capacities.captions
        a["captions/count"][k] = min(len(rec.captions), cap)
        for c, (raw, toks) in enumerate(list(zip(rec.captions, rec.tokens))[:cap]):
            a["captions/text"][k, c] = raw
            a["captions/tokens"][k, c] = " ".join(toks)
            if self.matcher is not None and "matches/count" in a:
                self._matches(a, k, c, raw, list(toks))
        slot["left"].discard(row)
        return a, k

    def _matches(self, a: dict, k: int, c: int, raw: str, tokens: list[str]) -> None:
        found = self.matcher.match(raw, tokens)[: self.layout.capacities.matches]
        a["matches/count"][k, c] = len(found)
        for j, m in enumerate(found):
            a["matches/span"][k, c, j] = (m.token_start, m.token_end, m.char_start, m.char_end)
            a["matches/label"][k, c, j] = m.label

    def add_error(self, row: int, error: str) -> None:
        self._common(row, None, error or "unknown error")

    def add(self, row: int, hw: tuple[int, int], out: RowOutput) -> None:
        a, k = self._common(row, hw, "")
        cap = self.layout.capacities
        if out.inst_boxes is not None and "instances/count" in a:
            n = min(len(out.inst_boxes), cap.instances)
            a["instances/count"][k] = n
            a["instances/boxes"][k, :n] = out.inst_boxes[:n]
            a["instances/labels"][k, :n] = out.inst_labels[:n]
            a["instances/scores"][k, :n] = out.inst_scores[:n]
            probs = np.clip(np.asarray(out.inst_masks[:n], dtype=np.float32), 0.0, 1.0)
            a["instances/masks"][k, :n] = np.rint(probs * 255).astype(np.uint8)
        if out.reg_boxes is not None and "regions/count" in a:
            n = min(len(out.reg_boxes), cap.regions)
            a["regions/count"][k] = n
            a["regions/boxes"][k, :n] = out.reg_boxes[:n]
            a["regions/labels"][k, :n] = out.reg_labels[:n]
            a["regions/scores"][k, :n] = out.reg_scores[:n]
            a["regions/feats"][k, :n] = out.reg_feats[:n]
        if out.grid_feats is not None and "grid/feats" in a:
            a["grid/feats"][k] = out.grid_feats

    def pop_finished_blocks(self) -> list[tuple[int, dict]]:
        done = sorted(b for b, slot in self._open.items() if not slot["left"])
        return [(b, self._open.pop(b)["arrays"]) for b in done]
