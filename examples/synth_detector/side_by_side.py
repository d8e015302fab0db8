"""The README's trained-vs-random tables: each ablation's variants on both stores, side by side.

    python side_by_side.py WORKDIR        (after ablations.sh; reads runs/{scan,ica,slan}-{trained,random}/ablation.json)

Each cell is mean ± sample std over seeds; Δ is paired by seed against the experiment's first variant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXPERIMENTS = {  # experiment -> metrics shown (key, label, digits)
    "scan": [("rsum", "rsum", 1), ("attn_precision", "attn P", 3), ("attn_f1", "attn F1", 3)],
    "ica": [("CIDEr", "CIDEr", 3), ("BLEU_4", "BLEU-4", 3), ("attn_correctness", "attn corr.", 3)],
    "slan": [("rsum", "rsum", 1), ("attn_f1", "attn F1", 3), ("iou_before", "IoU before", 3), ("iou_after", "IoU after", 3)],
}
STORES = ("trained", "random")


def cell(stat: dict | None, digits: int, signed: bool = False) -> str:
    if not stat:
        return "—"
    sign = "+" if signed else ""
    std = stat.get("std")
    return f"{stat['mean']:{sign}.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def metric_key(summary: dict, key: str) -> str | None:
    """Metric names differ slightly between runners (BLEU_4 / Bleu_4, iou_after / box_iou_after ...)."""
    keys = {k for v in summary.values() for k in v}
    for k in (key, key.replace("BLEU", "Bleu"), f"box_{key}", f"slan_{key}"):
        if k in keys:
            return k
    return None


def table(work: Path, experiment: str) -> str:
    results = {}
    for store in STORES:
        path = work / "runs" / f"{experiment}-{store}" / "ablation.json"
        if path.is_file():
            results[store] = json.loads(path.read_text())
    if not results:
        return f"(no {experiment} results yet)\n"
    first = next(iter(results.values()))
    variants = list(first["variants"])
    metrics = EXPERIMENTS[experiment]
    head = ["variant"] + [f"{label} ({store})" for store in results for _, label, _ in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        row = [v]
        for store, r in results.items():
            for key, _, digits in metrics:
                k = metric_key(r["summary"], key)
                row.append(cell(r["summary"].get(v, {}).get(k) if k else None, digits))
        lines.append("| " + " | ".join(row) + " |")
    for v in variants[1:]:
        row = [f"Δ {v} (paired)"]
        for store, r in results.items():
            for key, _, digits in metrics:
                k = metric_key(r["summary"], key)
                row.append(cell(r["deltas"].get(v, {}).get(k) if k else None, digits, signed=True))
        lines.append("| " + " | ".join(row) + " |")
    seeds = {store: r["seeds"] for store, r in results.items()}
    return "\n".join(lines) + f"\n\nseeds: {seeds}\n"


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    for experiment in EXPERIMENTS:
        print(f"### {experiment}\n\n{table(work, experiment)}")


if __name__ == "__main__":
    main()
