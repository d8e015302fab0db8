"""README tables of the matching and SLAN ablations: one row per variant with the settings that differ
from the shared ones, mean ± sample std over seeds, and the paired Δ rsum against the first variant.

Usage: python summarize.py WORKDIR   (after run.sh; reads runs/{scan,slan}-ablation/ablation.json)
"""

import json
import sys
from pathlib import Path

from vlcache.stages.common.experiment import paired_deltas, summarize

SCAN_COLS = [("i2t_r1", "i→t R@1"), ("t2i_r1", "t→i R@1"), ("rsum", "rsum"), ("attn_precision", "attn P"),
             ("attn_recall", "attn R"), ("attn_f1", "attn F1")]
SLAN_COLS = [("rsum", "rsum"), ("attn_f1", "attn F1"), ("box_inside_before", "inside before"),
             ("box_inside_after", "inside after"), ("box_iou_before", "IoU before"), ("box_iou_after", "IoU after"),
             ("kept_regions", "kept")]


def cell(stats: dict | None, digits: int) -> str:
    if not stats:
        return "n/a"
    sd = "" if stats["std"] is None else f" ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}{sd}"


def table(result: dict, cols) -> str:
    metrics = [m for m, _ in cols] + ["rsum"]
    summary = summarize(result["rows"], metrics)
    base = next(iter(result["variants"]))
    deltas = paired_deltas(result["rows"], base, ["rsum", "attn_f1"])
    lines = ["| variant | settings | " + " | ".join(label for _, label in cols) + " | Δ rsum (paired) |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    for variant, overrides in result["variants"].items():
        settings = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "—"
        digits = {m: (1 if m in ("rsum", "i2t_r1", "t2i_r1", "kept_regions") else 3) for m, _ in cols}
        row = [cell(summary[variant].get(m), digits[m]) for m, _ in cols]
        delta = "—" if variant == base else cell(deltas.get(variant, {}).get("rsum"), 1)
        lines.append(f"| {variant} | {settings} | " + " | ".join(row) + f" | {delta} |")
    return "\n".join(lines)


def main(work: Path) -> None:
    for name, cols in (("scan-ablation", SCAN_COLS), ("slan-ablation", SLAN_COLS)):
        result = json.loads((work / "runs" / name / "ablation.json").read_text())
        print(f"## {name}: seeds {result['seeds']}\n")
        print(table(result, cols))
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "match_ablation"))
